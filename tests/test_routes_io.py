"""Routes through files, arguments and the command line (issue 30), each ending in the exact
value against an independent float64 oracle or in a clear error whose message is asserted.

* anchor files: the checksum covers the whole header (a same-length edit of a weight's mode,
  bit flips in recorded shapes, a pre-release format);
* anchors given as a path, a ``pathlib.Path`` or a ``{name: V}`` dict (:func:`as_anchors`);
* ``asft anchors build -o missing_dir/x.safetensors``: refused before the build;
* :class:`AnchorLambdaScheduler` then ``add_param_group``;
* the HF Trainer under DeepSpeed (ZeRO 0-3): refused by name, never trained unanchored;
* a Hub repo id for ``build_anchors`` / ``asft anchors build --base``, read offline from a
  cache populated here;
* ``asft`` keeps bitsandbytes' kernel-download warning out of its output.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import reference as ref
import torch
from tiny_models import (
    DIMS,
    Q,
    V,
    join,
    llama_config,
    lm_loss,
    lora,
    make_anchors,
    model_pair,
    split,
    tiny_llama,
)

from asft_optim import (
    AnchoredAdamW,
    AnchorError,
    AnchorLambdaScheduler,
    Anchors,
    anchor_penalty,
    build_anchors,
)
from asft_optim.anchor_io import checksum
from asft_optim.anchors import as_anchors
from asft_optim.cli import main

ROOT = Path(__file__).resolve().parents[1]
LAM = 0.7


def _lora_model_and_file(tmp_path, mode="safelora"):
    model = lora(tiny_llama(0), ["q_proj", "v_proj"])
    anchors, oracle = make_anchors(model, DIMS, mode, None)
    path = tmp_path / "qv.anchors.safetensors"
    anchors.save(path)
    return model, anchors, oracle, path


def _oracle(model, oracle) -> float:
    """Dense float64 ``Σ ‖(I − C) s·B·A‖²`` with C = V Vᵀ/‖V‖_F built from V (tests/reference.py)."""
    return float(ref.oracle_penalty(copy.deepcopy(model), oracle, 1.0).detach())


# -- #5: the checksum covers the whole header -----------------------------------------------


def test_same_length_edit_of_a_weights_mode_fails_to_load(tmp_path):
    model, _, oracle, path = _lora_model_and_file(tmp_path)
    header, body = split(path.read_bytes())
    weights = json.loads(header["__metadata__"]["weights"])
    weights[Q]["mode"] = "subspace"  # same length as "safelora": the edit moves no byte
    header["__metadata__"]["weights"] = json.dumps(weights, sort_keys=True)
    edited = tmp_path / "edited.safetensors"
    edited.write_bytes(join(header, body))
    with pytest.raises(AnchorError, match="checksum mismatch") as err:
        Anchors.load(edited)
    assert str(edited) in str(err.value) and "mode" in str(err.value) and "asft anchors build" in str(err.value)

    # The edit itself is well formed: re-signed over the edited header it loads, with the
    # other operator. Only the header checksum tells the two files apart.
    header["__metadata__"]["checksum"] = checksum(_tensors(path), header["__metadata__"])
    edited.write_bytes(join(header, body))
    assert Anchors.load(edited)[Q].mode == "subspace"
    # And the untouched file gives the float64 oracle's penalty exactly.
    got = float(anchor_penalty(model, Anchors.load(path)).detach())
    assert got == pytest.approx(_oracle(model, oracle), rel=1e-12, abs=0)


def _tensors(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _shape_digits(text: str) -> list[int]:
    """Offsets in the header ``text`` of every digit of a recorded shape: the factors'
    ``"shape": [..]`` and the weights' ``\\"shape\\": [..]`` inside the escaped metadata."""
    import re

    out = []
    for m in re.finditer(r'(\\)?"shape(\\)?":\s*\[([^\]]*)\]', text):
        out += [m.start(3) + k for k, ch in enumerate(m.group(3)) if ch.isdigit()]
    return out


def test_every_bit_flip_of_a_recorded_shape_fails_to_load(tmp_path):
    """One bit flipped in any digit of the recorded weight shapes (metadata) or factor
    shapes (tensor entries): every such file is refused, naming the file."""
    _, _, _, path = _lora_model_and_file(tmp_path)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    where = _shape_digits(data[8:8 + n].decode())
    assert len(where) >= 8  # both weights' shapes and both factors' shapes
    loaded = []
    for pos in where:
        for bit in range(8):
            raw = bytearray(data)
            raw[8 + pos] ^= 1 << bit
            flipped = tmp_path / "flip.safetensors"
            flipped.write_bytes(bytes(raw))
            try:
                Anchors.load(flipped)
            except AnchorError as exc:
                assert str(flipped) in str(exc)
                continue
            loaded.append((pos, bit))
    assert loaded == []


def test_a_pre_release_format_version_is_refused_with_the_rebuild_command(tmp_path):
    _, _, _, path = _lora_model_and_file(tmp_path)
    header, body = split(path.read_bytes())
    assert header["__metadata__"]["format_version"] == "3"
    header["__metadata__"]["format_version"] = "2"  # checksummed the tensors only
    old = tmp_path / "v2.safetensors"
    old.write_bytes(join(header, body))
    with pytest.raises(AnchorError, match=r"format version '2'.*asft anchors build --base BASE"):
        Anchors.load(old)


# -- #15: anchors given as a path, a Path, or a {name: V} dict ----------------------------


@pytest.mark.parametrize("kind", [str, Path])
def test_as_anchors_loads_a_path_and_the_penalty_is_the_oracles(tmp_path, kind):
    model, anchors, oracle, path = _lora_model_and_file(tmp_path)
    got = as_anchors(kind(path))
    assert isinstance(got, Anchors) and sorted(got) == sorted(anchors)
    assert all(torch.equal(got[n].factor, anchors[n].factor) for n in anchors)
    value = float(anchor_penalty(model, got).detach())
    assert value > 0 and value == pytest.approx(_oracle(model, oracle), rel=1e-12, abs=0)


def test_as_anchors_returns_projection_mappings_as_they_are(tmp_path):
    _, anchors, _, _ = _lora_model_and_file(tmp_path)
    assert as_anchors(anchors) is anchors
    plain = dict(anchors)
    assert as_anchors(plain) is plain


def test_as_anchors_refuses_raw_tensors_naming_the_builders():
    deltas = {Q: torch.randn(8, 8, dtype=torch.float64)}
    with pytest.raises(AnchorError, match=r"raw tensors.*build_anchors.*projection_from_delta") as err:
        as_anchors(deltas)
    assert Q in str(err.value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (42, "not int"),
        ([Q, V], r"\[0\]: no anchor file at"),  # a list combines anchors: each item is checked
        ([], "empty list"),
        (b"qv.safetensors", "not bytes"),
        ({Q: "safelora"}, r"values must be operators \(Projection, InputProjection, ...\); got \['str'\]"),
        ({}, "empty mapping"),
    ],
)
def test_as_anchors_refuses_other_types_by_name(value, message):
    with pytest.raises(AnchorError, match=message):
        as_anchors(value, where="AnchoredAdamW(anchors=...)")


def test_as_anchors_names_a_missing_file_and_how_to_build_one(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(AnchorError, match=r"no anchor file at .*nope\.safetensors.*asft anchors build"):
        as_anchors(str(missing), where="anchors")
    with pytest.raises(AnchorError, match="no anchor file"):
        as_anchors(missing)  # a Path is never iterated character by character


def test_as_anchors_reports_a_corrupt_file_by_name(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(AnchorError, match="bad.safetensors"):
        as_anchors(bad)


# -- #16: asft anchors build checks its output path before building ----------------------


@pytest.fixture
def no_build(monkeypatch):
    """Any build is a failure: the output check must come first."""
    import asft_optim.anchors as anchors_module

    def forbidden(*a, **k):  # pragma: no cover - reached only if the check is missing
        raise AssertionError("build_anchors ran before the output path was checked")

    monkeypatch.setattr(anchors_module, "build_anchors", forbidden)


def test_cli_build_refuses_a_missing_output_directory_before_building(tmp_path, capsys, no_build):
    out = tmp_path / "missing_dir" / "x.safetensors"
    rc = main(["anchors", "build", "--base", "b", "--aligned", "a", "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"output {str(out)!r}" in err and "does not exist" in err and "mkdir -p" in err
    assert not out.parent.exists()


def test_cli_build_refuses_a_directory_or_a_file_as_parent(tmp_path, capsys, no_build):
    rc = main(["anchors", "build", "--base", "b", "--aligned", "a", "-o", str(tmp_path)])
    assert rc == 1 and "is a directory; give a file name" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    rc = main(["anchors", "build", "--base", "b", "--aligned", "a", "-o", str(tmp_path / "file" / "x.safetensors")])
    assert rc == 1 and "is not a directory" in capsys.readouterr().err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_cli_build_refuses_an_unwritable_directory(tmp_path, capsys, no_build):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc = main(["anchors", "build", "--base", "b", "--aligned", "a", "-o", str(ro / "x.safetensors")])
    finally:
        ro.chmod(0o700)
    assert rc == 1 and "cannot write in" in capsys.readouterr().err


# -- #13: AnchorLambdaScheduler then add_param_group ---------------------------------------


def _two_group_optimizer():
    model = lora(tiny_llama(0), ["q_proj", "v_proj"])
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    # strict=False: v_proj joins later, through add_param_group (what is scheduled here).
    opt = AnchoredAdamW(model, anchors, LAM, lr=1e-2, params=[{"params": params[:2]}], strict=False)
    return model, opt, params[2:]


def test_scheduler_takes_in_a_group_added_later_with_its_own_initial_lambda():
    model, opt, rest = _two_group_optimizer()
    f = lambda t: 1.0 / (1 + t)  # noqa: E731
    sched = AnchorLambdaScheduler(opt, f)
    for t in range(2):
        lm_loss(model, t).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    opt.add_param_group({"params": rest, "anchor_lambda": 3.0})
    lm_loss(model, 5).backward()
    opt.step()
    opt.zero_grad()
    sched.step()  # step 3: the new group joins with λ₀ = 3.0
    assert sched.get_last_lambda() == [LAM * f(3), 3.0 * f(3)]
    assert opt.param_groups[1]["initial_anchor_lambda"] == 3.0
    sched.step()
    assert sched.get_last_lambda() == [LAM * f(4), 3.0 * f(4)]
    assert len(sched.lambda_fns) == 2


def test_scheduler_with_one_function_per_group_names_the_fix():
    model, opt, rest = _two_group_optimizer()
    sched = AnchorLambdaScheduler(opt, [lambda t: 0.5])
    opt.add_param_group({"params": rest, "anchor_lambda": 3.0})
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=r"2 param group\(s\).*1 lambda function.*scheduler\.lambda_fns"):
        sched.step()
    assert sched.last_step == 0
    assert [g["anchor_lambda"] for g in opt.param_groups] == [b["anchor_lambda"] for b in before]
    sched.lambda_fns.append(lambda t: 0.25)
    sched.step()
    assert sched.get_last_lambda() == [LAM * 0.5, 3.0 * 0.25]


def test_scheduler_changes_nothing_when_one_groups_value_is_invalid():
    model, opt, rest = _two_group_optimizer()
    opt.add_param_group({"params": rest, "anchor_lambda": 3.0})
    sched = AnchorLambdaScheduler(opt, [lambda t: 1.0, lambda t: 1.0 if t < 1 else float("nan")])
    with pytest.raises(ValueError, match="param group 1 at step 1"):
        sched.step()
    assert sched.last_step == 0
    assert sched.get_last_lambda() == [LAM, 3.0]


# -- #2: the HF Trainer under DeepSpeed ------------------------------------------------------


@pytest.fixture(scope="module")
def one_rank_group():
    """DeepSpeed's one-rank process group lives for this module's tests (DeepSpeed caches its
    groups), and is destroyed after them: later test modules see no process group."""
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def deepspeed_env(monkeypatch, clean_accelerate, one_rank_group):
    """One CPU process, no MPI, no shared-memory kernel build (one rank needs none)."""
    pytest.importorskip("deepspeed")
    saved = dict(os.environ)  # accelerate sets ACCELERATE_USE_DEEPSPEED=true for good
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0",
                     WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", DS_ACCELERATOR="cpu").items():
        monkeypatch.setenv(k, v)
    import importlib

    # (``deepspeed.comm.torch`` as an attribute is the torch package: import the module by name.)
    monkeypatch.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)
    # The one-rank process group stays up for the next test: DeepSpeed caches its groups.
    yield
    # transformers keeps the last DeepSpeed config process-wide (a weak reference the Trainer
    # may keep alive): later tests must not see ZeRO-3 as enabled.
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    for k in set(os.environ) - set(saved):
        del os.environ[k]
    os.environ.update(saved)


def _ds_args(tmp_path, stage):
    from integration_models import trainer_args

    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4,
          "zero_optimization": {"stage": stage}}
    return trainer_args(tmp_path, deepspeed=ds, max_steps=1)


DS_REFUSAL = (r"DeepSpeed ZeRO stage {}.*not supported.*Supported instead: with DeepSpeed ZeRO stage 0-2, "
              r"the loss-level penalty: class AnchoredTrainer\(AnchorPenaltyMixin, Trainer\).*"
              r"or train without deepspeed=")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_trainer_with_anchored_optimizer_is_refused_not_dropped(tmp_path, deepspeed_env, stage):
    """``optimizers=(AnchoredAdamW(...), None)``: the Trainer's DeepSpeed engine would train with
    its own AdamW. With the logging callback the run stops before the first step, naming
    DeepSpeed, and no weight has moved."""
    from integration_models import TokenDataset, trainable_state
    from tiny_models import tiny_anchors, tiny_lora_llama
    from transformers import Trainer

    from asft_optim import AnchorLoggingCallback

    model = tiny_lora_llama(0)
    # Built before the DeepSpeed arguments exist: nothing can refuse it at construction.
    opt = AnchoredAdamW(model, tiny_anchors(model), 1.0, lr=1e-2)
    args = _ds_args(tmp_path, stage)
    before = trainable_state(model)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), optimizers=(opt, None),
                      callbacks=[AnchorLoggingCallback()])
    with pytest.raises(AnchorError, match=DS_REFUSAL.format(stage)) as err:
        trainer.train()
    assert "AnchorLoggingCallback" in str(err.value)
    assert len(opt.state) == 0  # the anchored optimizer never stepped, nor did any other
    after = trainable_state(model)
    if stage < 3:  # ZeRO-3 partitions the live parameters: nothing to compare in place
        assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_trainer_with_the_factory_is_refused_by_name(tmp_path, deepspeed_env, stage):
    """``optimizer_cls_and_kwargs=(AnchoredAdamWFactory, ...)`` under ZeRO-1/2/3: the factory
    refuses, naming DeepSpeed (before: an error blaming PEFT/TRL, or a raw IndexError)."""
    from integration_models import TokenDataset
    from tiny_models import tiny_anchors, tiny_lora_llama
    from transformers import Trainer

    from asft_optim import AnchoredAdamWFactory

    model = tiny_lora_llama(0)
    trainer = Trainer(model=model, args=_ds_args(tmp_path, stage), train_dataset=TokenDataset(),
                      optimizer_cls_and_kwargs=(AnchoredAdamWFactory, {"anchors": tiny_anchors(model), "lr": 1e-2}))
    with pytest.raises(AnchorError, match=DS_REFUSAL.format(stage)) as err:
        trainer.train()
    assert str(err.value).startswith("AnchoredAdamWFactory")


def test_zero3_partitioned_weights_are_named_not_read_as_shape_0(tmp_path, deepspeed_env):
    """Under ZeRO-3 every weight is an empty placeholder: a constructor binding anchors to
    that model gets an AnchorError naming ZeRO-3 (before: a raw IndexError or "weight (0,)")."""
    from integration_models import TokenDataset
    from tiny_models import tiny_lora_llama
    from transformers import Trainer, TrainerCallback

    from asft_optim.refused import refuse_zero3_partitions, zero3_partitioned

    model = tiny_lora_llama(0)
    assert zero3_partitioned(model) == []
    refuse_zero3_partitions(model, "AnchoredAdamW")  # not partitioned: no error
    seen = {}

    class Stop(Exception):
        pass

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["names"] = zero3_partitioned(model)
            with pytest.raises(AnchorError, match=r"AnchoredAdamW: \d+ parameter\(s\) of the model are DeepSpeed "
                                                  r"ZeRO-3 partitions.*Supported instead"):
                refuse_zero3_partitions(model, "AnchoredAdamW")
            raise Stop  # before any step

    trainer = Trainer(model=model, args=_ds_args(tmp_path, 3), train_dataset=TokenDataset(), callbacks=[Probe()])
    with pytest.raises(Stop):
        trainer.train()
    lora_a = [n for n in seen["names"] if "lora_A" in n]
    assert lora_a and len(seen["names"]) == len(list(model.parameters()))


def _sgd_oracle_step(model, anchors_oracle, lam, batch, lr, with_penalty=True):
    """One float64 SGD step on task loss + λ·(dense oracle penalty), by autograd on a copy."""
    m = copy.deepcopy(model).double()
    params = {n: p for n, p in m.named_parameters() if p.requires_grad}
    loss = m(input_ids=batch, labels=batch).loss
    if with_penalty:
        loss = loss + ref.oracle_penalty(m, anchors_oracle, lam)
    grads = torch.autograd.grad(loss, list(params.values()))
    return {n: (p - lr * g).detach() for (n, p), g in zip(params.items(), grads)}


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_zero_0_1_2_with_the_penalty_mixin_is_exact(tmp_path, deepspeed_env, stage):
    """The supported DeepSpeed route: ``AnchorPenaltyMixin`` puts λ·P on the loss; one SGD
    step under ZeRO-0/1/2 equals the float64 oracle step on task + λ·P (C = V Vᵀ/‖V‖_F dense).
    DeepSpeed reduces float32 gradients only, so the run is float32 and the oracle float64 from
    the same weights, hence the tolerance; without the penalty the step would differ by far
    more than that."""
    from integration_models import TokenDataset, trainable_state
    from transformers import Trainer

    from asft_optim.integrations import AnchorPenaltyMixin

    class AnchoredTrainer(AnchorPenaltyMixin, Trainer):
        pass

    model = lora(tiny_llama(0), ["q_proj", "v_proj"]).float()
    anchors, oracle = make_anchors(model, DIMS, "safelora", None)
    data = TokenDataset(rows=4, length=5)
    batch = data.ids % 32  # tiny_llama's vocabulary
    data.ids = batch
    lr, lam = 0.05, 0.7
    want = _sgd_oracle_step(model, oracle, lam, batch, lr)
    without = _sgd_oracle_step(model, oracle, lam, batch, lr, with_penalty=False)
    # No clipping (DeepSpeed clips at norm 1.0 unless told otherwise): the oracle step is plain SGD.
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4,
          "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0}
    from integration_models import trainer_args

    args = trainer_args(tmp_path, deepspeed=ds, max_steps=1, optim="sgd", learning_rate=lr,
                        lr_scheduler_type="constant", max_grad_norm=0.0)
    AnchoredTrainer(model=model, args=args, train_dataset=data, anchors=anchors, anchor_lambda=lam).train()
    got = {n: t.double() for n, t in trainable_state(model).items()}
    tol = 1e-6
    gap = max(float((want[n] - without[n]).abs().max()) for n in want)
    assert gap > 1000 * tol  # the penalty moves the step well beyond the tolerance
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=tol)


def test_deepspeed_zero3_with_the_penalty_mixin_is_refused(tmp_path, deepspeed_env):
    from integration_models import TokenDataset
    from tiny_models import tiny_anchors, tiny_lora_llama
    from transformers import Trainer

    from asft_optim.integrations import AnchorPenaltyMixin

    class AnchoredTrainer(AnchorPenaltyMixin, Trainer):
        pass

    model = tiny_lora_llama(0)
    trainer = AnchoredTrainer(model=model, args=_ds_args(tmp_path, 3), train_dataset=TokenDataset(),
                              anchors=tiny_anchors(model))
    with pytest.raises(AnchorError, match=r"AnchorPenaltyMixin: DeepSpeed ZeRO-3 is not supported.*stage 0-2"):
        trainer.train()


def test_penalty_mixin_refuses_accumulation_and_a_second_penalty(tmp_path, clean_accelerate):
    from integration_models import TokenDataset, trainer_args
    from tiny_models import tiny_anchors, tiny_lora_llama
    from transformers import Trainer

    from asft_optim.integrations import AnchorPenaltyMixin

    class AnchoredTrainer(AnchorPenaltyMixin, Trainer):
        pass

    model = tiny_lora_llama(0)
    anchors = tiny_anchors(model)
    with pytest.raises(AnchorError, match="gradient_accumulation_steps=2 is not supported"):
        AnchoredTrainer(model=model, args=trainer_args(tmp_path, gradient_accumulation_steps=2),
                        train_dataset=TokenDataset(), anchors=anchors)
    opt = AnchoredAdamW(model, anchors, 1.0, lr=1e-2)
    trainer = AnchoredTrainer(model=model, args=trainer_args(tmp_path, max_steps=1), train_dataset=TokenDataset(),
                              anchors=anchors, optimizers=(opt, None))
    with pytest.raises(AnchorError, match="anchored already.*not both"):
        trainer.train()


def test_penalty_mixin_adds_the_oracle_penalty_to_training_loss_only(tmp_path, clean_accelerate):
    """No DeepSpeed: the mixin's training loss is task + λ·(float64 oracle penalty); its
    evaluation loss is the task's alone."""
    from integration_models import TokenDataset, trainer_args
    from transformers import Trainer

    from asft_optim.integrations import AnchorPenaltyMixin

    seen = []

    class AnchoredTrainer(AnchorPenaltyMixin, Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            task = Trainer.compute_loss(self, model, inputs, **kwargs).detach()
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            value = (loss[0] if return_outputs else loss).detach()
            seen.append((self.model.training, task.double(), value.double()))
            return loss

    model = lora(tiny_llama(0), ["q_proj", "v_proj"])
    anchors, oracle = make_anchors(model, DIMS, "safelora", None)
    data = TokenDataset(rows=4, length=5)
    data.ids = data.ids % 32
    want = float(ref.oracle_penalty(copy.deepcopy(model), oracle, LAM).detach())
    trainer = AnchoredTrainer(model=model, args=trainer_args(tmp_path, max_steps=1, learning_rate=0.0),
                              train_dataset=data, eval_dataset=data, anchors=anchors, anchor_lambda=LAM)
    trainer.train()
    trainer.evaluate()
    (train_mode, task, loss), (eval_mode, eval_task, eval_loss) = seen[0], seen[-1]
    assert train_mode and not eval_mode
    assert float(loss - task) == pytest.approx(want, rel=1e-12, abs=0)  # the penalty in float64
    assert float(eval_loss) == float(eval_task)


def test_deepspeed_refusal_reads_training_arguments_without_a_run(monkeypatch):
    """The check itself, from the arguments alone (no DeepSpeed engine, no deepspeed package)."""
    from types import SimpleNamespace

    from asft_optim.refused import deepspeed_in_use, refuse_deepspeed

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    args = SimpleNamespace(deepspeed={"zero_optimization": {"stage": 2}})
    assert deepspeed_in_use(args) == "DeepSpeed ZeRO stage 2"
    with pytest.raises(AnchorError, match=r"X: DeepSpeed ZeRO stage 2 is not supported.*FSDP2"):
        refuse_deepspeed("X", args)
    refuse_deepspeed("X", SimpleNamespace(deepspeed=None))  # no DeepSpeed: no error
    if "transformers.integrations.deepspeed" in sys.modules:
        from transformers.integrations.deepspeed import deepspeed_config

        assert deepspeed_config() is None  # no DeepSpeed TrainingArguments alive
    assert deepspeed_in_use() is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(AnchorError, match="ACCELERATE_USE_DEEPSPEED"):
        refuse_deepspeed("X")


def test_trainer_without_an_anchored_optimizer_is_stopped_at_train_begin(tmp_path, clean_accelerate, monkeypatch):
    """No DeepSpeed, plain optimizer: a TypeError naming both supported routes, before step 1."""
    from integration_models import TokenDataset, trainable_state, trainer_args
    from tiny_models import tiny_lora_llama
    from transformers import Trainer

    from asft_optim import AnchorLambdaCallback

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    model = tiny_lora_llama(0)
    before = trainable_state(model)
    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=1), train_dataset=TokenDataset(4),
                      callbacks=[AnchorLambdaCallback(lambda t: 1.0)])
    with pytest.raises(TypeError, match=r"AnchorLambdaCallback.*not an AnchoredOptimizer.*AnchoredAdamWFactory"):
        trainer.train()
    after = trainable_state(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


# -- A Hub repo id, read from a cache populated here (offline) ------------------------------

COMMIT_MAIN = "a" * 40
COMMIT_V1 = "b" * 40


def _hub_repo(cache: Path, repo_id: str, models: dict[str, tuple[str, torch.nn.Module]]) -> None:
    """Write ``models`` ({ref: (commit, model)}) in the huggingface_hub cache layout."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    for ref_name, (commit, model) in models.items():
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref_name).write_text(commit)
        model.save_pretrained(folder / "snapshots" / commit)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline huggingface_hub cache in ``tmp_path`` holding ``org/base`` (main, and tag
    v1 with other weights) and ``org/chat`` (main)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    # float64 weights: the library's V = W_aligned − W_base is then the oracle's, bit for bit.
    base, aligned = (m.double() for m in model_pair(llama_config()))
    other = model_pair(llama_config(), seed=3)[0].double()
    _hub_repo(cache, "org/base", {"main": (COMMIT_MAIN, base), "v1": (COMMIT_V1, other)})
    _hub_repo(cache, "org/chat", {"main": (COMMIT_MAIN, aligned)})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # "org/base" is no local path here
    return base, aligned, other


def _dense_oracle(base, aligned, names) -> dict[str, torch.Tensor]:
    """C = V Vᵀ/‖V‖_F in float64, V from the two state dicts (no library code)."""
    out = {}
    for n in names:
        v = (aligned.state_dict()[n] - base.state_dict()[n]).double()
        out[n] = v @ v.T / torch.linalg.matrix_norm(v)
    return out


QV = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
      "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"]


def test_build_anchors_resolves_hub_ids_from_the_cache_offline(hub_cache):
    base, aligned, other = hub_cache
    anchors = build_anchors("org/base", "org/chat", ["q_proj", "v_proj"], dtype=torch.float64)
    assert sorted(anchors) == sorted(QV)
    assert anchors.metadata["base_source"] == "hub:org/base"
    for n, c in _dense_oracle(base, aligned, QV).items():
        f = anchors[n].factor
        torch.testing.assert_close(f @ f.T, c, rtol=1e-10, atol=1e-12)
    tagged = build_anchors("org/base", "org/chat", ["q_proj"], dtype=torch.float64, base_revision="v1")
    assert tagged.metadata["base_source"] == "hub:org/base@v1"
    for n, c in _dense_oracle(other, aligned, [QV[0], QV[2]]).items():
        f = tagged[n].factor
        torch.testing.assert_close(f @ f.T, c, rtol=1e-10, atol=1e-12)


def test_cli_build_takes_hub_ids_and_revisions(hub_cache, tmp_path, capsys):
    base, aligned, other = hub_cache
    out = tmp_path / "hub.anchors.safetensors"
    rc = main(["anchors", "build", "--base", "org/base", "--base-revision", "v1", "--aligned", "org/chat",
               "--targets", "q_proj", "-o", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    loaded = Anchors.load(out)
    for n, c in _dense_oracle(other, aligned, [QV[0], QV[2]]).items():
        f = loaded[n].factor.double()
        torch.testing.assert_close(f @ f.T, c, rtol=1e-5, atol=1e-6)  # stored in float32


def test_an_uncached_hub_id_offline_says_what_to_do(hub_cache, capsys, tmp_path):
    with pytest.raises(AnchorError, match=r"org/missing: no such checkpoint directory, and this Hub model is "
                                          r"not in the local cache .*HF_HUB_OFFLINE is set.*hf download org/missing"):
        build_anchors("org/missing", "org/chat")
    with pytest.raises(AnchorError, match=r"org/base \(revision v9\).*hf download org/base --revision v9"):
        build_anchors("org/base", "org/chat", base_revision="v9")
    rc = main(["anchors", "build", "--base", "org/missing", "--aligned", "org/chat", "-o", str(tmp_path / "x.safetensors")])
    assert rc == 1 and "hf download org/missing" in capsys.readouterr().err


def test_a_revision_for_a_local_directory_is_refused(tmp_path):
    base, aligned = model_pair(llama_config())
    base.save_pretrained(tmp_path / "b")
    with pytest.raises(AnchorError, match="revision='v1' applies to Hub repo ids"):
        build_anchors(str(tmp_path / "b"), aligned, base_revision="v1")


def test_a_missing_local_path_still_says_no_such_directory(tmp_path):
    with pytest.raises(AnchorError, match=r"no such checkpoint directory \(nor a Hub repo id"):
        build_anchors(str(tmp_path / "nowhere"), str(tmp_path / "nowhere"))


# -- asft keeps third-party import noise out of its output --------------------------------

_NOISE = "Failed to load CPU gemm_4bit_forward from kernels-community"
# bitsandbytes logs the warning at import only on CPUs with AVX512-BF16 (and no `kernels`
# package or no network): the probe makes every CPU such a CPU, and hides `kernels`.
_PROBE = r"""
import importlib.abc, importlib.machinery, sys
sys.modules["kernels"] = None  # no `kernels` package: `from kernels import ...` fails
class Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        exec_module = spec.loader.exec_module
        def patched(module):
            exec_module(module)
            module.has_avx512bf16 = lambda: True
        spec.loader.exec_module = patched
        return spec
sys.meta_path.insert(0, Patch())
if sys.argv[1] == "bare":
    import bitsandbytes
else:
    from asft_optim.cli import main
    try:
        main(sys.argv[2:])
    except SystemExit:
        pass
    import bitsandbytes  # whatever the command imported, the import is done by now
    print("bitsandbytes imported")
"""


def _run_probe(*argv: str) -> str:
    pytest.importorskip("bitsandbytes")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout + out.stderr


def test_asft_lab_output_has_no_bitsandbytes_kernel_warning():
    assert _NOISE in _run_probe("bare")  # the probe does reproduce the warning
    text = _run_probe("cli", "lab", "--help")
    assert "usage: asft lab" in text and "bitsandbytes imported" in text
    assert _NOISE not in text


def test_the_filter_drops_that_warning_only():
    import logging

    from asft_optim.cli import quiet_third_party_noise

    quiet_third_party_noise()
    quiet_third_party_noise()  # idempotent
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    [f] = logger.filters

    def record(msg, level=logging.WARNING):
        return logging.LogRecord(logger.name, level, __file__, 1, msg, (), None)

    assert not f.filter(record(_NOISE + ": %s. Please make sure"))
    assert f.filter(record("Failed to load the CPU library"))
    assert f.filter(record(_NOISE, logging.ERROR))  # errors always pass
