"""The lab's data-driven methods (input, input-contrast, spf, safegrad) on the tiny world: each trains,
its operator comes from the defender's prompts only (rebuilt here from them), spf keeps
QᵀΔW = 0 for the trained LoRA, and the operator is one cached stage per aligned model."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from asft_optim.activation_anchors import build_input_anchors
from asft_optim.input_anchors import InputAnchors
from asft_optim.lab.attack import METHODS
from asft_optim.lab.config import tiny_config
from asft_optim.lab.data import Example
from asft_optim.lab.models import load
from asft_optim.lab.operators import (
    OPERATOR_FILE,
    _batches,
    _ids,
    defender_prompts,
    load_refusal_examples,
    load_safety_subspaces,
    split_prompts,
)
from asft_optim.lab.runner import Lab, _key
from asft_optim.lab.world import World
from asft_optim.prompt_tokens import shared_prefix_length
from asft_optim.refusal_gradients import greedy_refusals, refusal_subspaces

NEW = ("input", "input-contrast", "spf", "safegrad", "safegrad-l2")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    cfg = replace(tiny_config(), methods=NEW, poisons=(0.1,))
    lab = Lab(cfg, World(cfg.world).data(), tmp_path_factory.mktemp("ops"), progress=False)
    lab.trained = {m: lab.attack(m, 0.1, 0) for m in NEW}
    return lab


def _update_norm(attack_dir) -> float:
    """‖ΔW‖_F over the adapter's layers: ΔW = B·A (the same scale s for every method)."""
    from safetensors.torch import load_file

    w = load_file(str(attack_dir / "adapter" / "adapter_model.safetensors"))
    total = 0.0
    for name, a in w.items():
        if "lora_A" in name:
            total += float((w[name.replace("lora_A", "lora_B")].double() @ a.double()).square().sum())
    assert total > 0
    return total ** 0.5


def _projector(basis):
    b = basis.double()
    return b @ b.T


def test_each_method_trains_with_its_operator(lab):
    for m in NEW:
        _, info = lab.trained[m]
        assert info["rows"] == len(lab.data.attack_set(0.1, 0))
        if m == "spf":
            assert info["train"]["subspaces"] == 4
        elif m.startswith("safegrad"):  # the surgery's closure ran at every step (safegrad_every = 1)
            t = lab.config.attack.train
            steps = math.ceil(info["rows"] / t.batch_size) * math.ceil(t.epochs)
            assert info["train"]["surgery/calls"] == steps > 0
            # safegrad-l2: the same surgery with l2's penalty in the same optimizer
            lam = lab.config.attack.l2_lambda if m == "safegrad-l2" else 0.0
            assert info["train"]["anchor_lambda"] == lam and info["train"]["anchors"] == 4
        else:
            assert info["train"]["anchors"] == 4
    # safegrad-l2's penalty acts: the same surgery, seed and rows, a smaller update.
    assert lab.config.attack.l2_lambda > 0
    assert _update_norm(lab.trained["safegrad-l2"][0]) < 0.9 * _update_norm(lab.trained["safegrad"][0])
    assert lab.trained["input"][1]["train"]["anchor_lambda"] == lab.config.attack.input_lambda
    assert lab.trained["spf"][1]["train"]["spf_rank"] == lab.config.attack.spf_rank
    # The default grid stays as it was: none of them runs unless asked for.
    from asft_optim.lab.config import default_config

    assert not set(NEW) & set(default_config().methods)


def test_safegrad_l2_at_lambda_0_is_safegrad(lab):
    """The report's CURVE_ENDS joins safegrad's point to safegrad-l2's curve as its λ = 0
    end; that holds only if the two train to the same adapter, bit for bit."""
    from safetensors.torch import load_file

    from asft_optim.lab.report import CURVE_ENDS

    assert CURVE_ENDS["safegrad-l2"] == ("safegrad", "l2_lambda")
    # The join matches the records' settings: the same fields besides λ, or it never joins.
    assert set(METHODS["safegrad-l2"].uses) - {"l2_lambda"} == set(METHODS["safegrad"].uses)
    zero = replace(lab.config.attack, l2_lambda=0.0)
    got, info = lab.attack("safegrad-l2", 0.1, 0, zero)
    want, _ = lab.trained["safegrad"]
    assert got != want and info["train"]["anchor_lambda"] == 0.0  # its own stage, not safegrad's
    a = load_file(str(got / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(want / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # ... and a λ > 0 does not (the check above can fail).
    c = load_file(str(lab.trained["safegrad-l2"][0] / "adapter" / "adapter_model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_input_anchors_are_rebuilt_from_the_defenders_build_half_alone(lab):
    a, tok = lab.config.attack, lab.tokenizer()[0]
    prompts = defender_prompts(lab.data)
    harm_b, harm_v = split_prompts(prompts.harmful, a.operator_prompts)
    task_b, task_v = split_prompts([(e.instruction, e.input) for e in prompts.task], a.operator_prompts)
    evaluation = set(lab.data.harmful_eval)
    assert harm_b and not {i for i, _ in harm_b + harm_v} & evaluation
    assert not set(harm_b) & set(harm_v) and not set(task_b) & set(task_v)
    model = load(lab.aligned(0)[0])
    ml = lab.config.model.max_length
    ids = {k: _ids(tok, v, ml) for k, v in (("h", harm_b), ("hv", harm_v), ("tv", task_v), ("t", task_b))}
    skip = shared_prefix_length([t for v in ids.values() for t in v])
    for name, contrast in (("input", False), ("input-contrast", True)):
        stage, info = lab.operator(name, 0)
        saved = InputAnchors.load(stage / OPERATOR_FILE)
        mine = build_input_anchors(model, _batches(tok, ids["h"], skip, "cpu"), target_modules=list(a.target_modules),
                                   rank=a.input_rank, eps=a.input_eps,
                                   task_batches=_batches(tok, ids["t"], skip, "cpu") if contrast else None)
        assert list(saved) == list(mine) and len(saved) == 4
        for n in saved:
            assert torch.allclose(_projector(saved[n].basis), _projector(mine[n].basis), atol=1e-5), (name, n)
        assert info["prompts"]["harmful_build"] == len(harm_b) and info["form"] == ("contrast" if contrast else "plain")
        val = info["validation"]
        assert 0 < val["harmful_validation"] <= 1 and 0 < val["task_validation"] <= 1
        assert info["design_table"][str(a.input_rank)] == val


def test_spf_subspace_is_refusal_subspaces_of_the_defenders_prompts_and_keeps_the_update_out(lab):
    a, tok = lab.config.attack, lab.tokenizer()[0]
    stage, info = lab.operator("spf", 0)
    subs = load_safety_subspaces(stage, a.spf_rank)
    harm_b, _ = split_prompts(defender_prompts(lab.data).harmful, a.operator_prompts)
    model = load(lab.aligned(0)[0])
    ids = _ids(tok, harm_b, lab.config.model.max_length)
    examples = greedy_refusals(model, ids, max_new_tokens=a.refusal_tokens, eos_token_id=tok.eos_token_id)
    mine = refusal_subspaces(model, examples, target_modules=list(a.target_modules), rank=a.spf_rank)
    assert info["prompts"]["harmful_build"] == len(harm_b) and list(subs) == list(mine)
    for n in subs:
        assert torch.allclose(_projector(subs[n].basis), _projector(mine[n].basis), atol=1e-5), n
        assert subs[n].energy == pytest.approx(mine[n].energy, rel=1e-6)
    # The trained adapter: ΔW = s·B·A has no component in span(Q), and it moved.
    from asft_optim.lab.attack import load_attacked

    peft = load_attacked(lab.aligned(0)[0], lab.trained["spf"][0] / "adapter")
    checked = 0
    for name, m in peft.named_modules():
        if hasattr(m, "lora_A"):
            delta = m.scaling["default"] * (m.lora_B["default"].weight @ m.lora_A["default"].weight)
            q = subs[name.removeprefix("base_model.model.") + ".weight"].basis
            assert delta.norm() > 1e-4
            assert (q.T @ delta).norm() <= 1e-5 * delta.norm(), name
            checked += 1
    assert checked == 4


def test_one_operator_stage_serves_every_lambda_and_enters_the_attack_key(tmp_path):
    cfg = tiny_config()
    lab = Lab(cfg, World(cfg.world).data(), tmp_path, plan=True, progress=False)
    other = replace(cfg.attack, input_lambda=7.0)
    assert lab.operator("input", 0)[1]["key"] == lab.operator("input", 0, other)[1]["key"]
    assert lab.attack("input", 0.1, 0)[1]["key"] != lab.attack("input", 0.1, 0, other)[1]["key"]
    # The design enters the operator's key; another method's setting does not.
    assert lab.operator("input", 0, replace(cfg.attack, input_rank=2))[1]["key"] != lab.operator("input", 0)[1]["key"]
    assert lab.operator("spf", 0, replace(cfg.attack, spf_rank=2))[1]["key"] == lab.operator("spf", 0)[1]["key"]
    # The attack key: the shared fields, the method's uses, and the operator's key.
    a = cfg.attack
    from asft_optim.lab.runner import _examples_hash

    payload = {"stage": "attack", "aligned": lab.aligned(0)[1]["key"], "method": "spf", "poison": 0.1, "seed": 0,
               "rows": _examples_hash(lab.data.attack_set(0.1, 0)),
               "config": {f: getattr(a, f) for f in ("r", "lora_alpha", "lora_dropout", "target_modules", "train")
                          + METHODS["spf"].uses},
               "operator": lab.operator("spf", 0)[1]["key"]}
    assert lab.attack("spf", 0.1, 0)[1]["key"] == _key(payload)
    assert {k for k, _ in lab.planned} >= {"input-anchors", "refusal-subspace"}
    with pytest.raises(ValueError, match="reads no data-driven operator"):
        lab.operator("l2", 0)


def test_the_defenders_prompts_never_include_evaluation_or_attack_rows():
    data = World(tiny_config().world).data()
    prompts = defender_prompts(data)
    from asft_optim.lab.judge import REFUSALS

    refused = [(e.instruction, e.input) for e in data.align_train if e.output in REFUSALS]
    assert prompts.harmful == list(dict.fromkeys([(e.instruction, e.input) for e in data.known_harmful] + refused))
    assert prompts.task and all(e.output not in REFUSALS and e in data.align_train for e in prompts.task)
    leaked = replace(data, known_harmful=data.known_harmful + [Example(data.harmful_eval[0], "", "sure")])
    with pytest.raises(ValueError, match="is a harmful evaluation prompt"):
        defender_prompts(leaked)
    attacked = replace(data, known_harmful=data.known_harmful + [data.attack_harmful[0]])
    with pytest.raises(ValueError, match="is an attack row"):
        defender_prompts(attacked)
    task = replace(data, align_train=data.align_train + [data.attack_task[0]])
    with pytest.raises(ValueError, match="defender's task prompt .* is an attack row"):
        defender_prompts(task)
    with pytest.raises(ValueError, match="holds no harmful prompt"):
        defender_prompts(replace(data, known_harmful=[], align_train=[e for e in data.align_train
                                                                      if e.instruction not in dict(prompts.harmful)]))
    with pytest.raises(ValueError, match="operator_prompts must be a positive int"):
        split_prompts(prompts.harmful, 0)


def test_safegrad_examples_are_the_aligned_models_own_answers_to_the_build_half(lab):
    """The stage holds exactly the aligned model's greedy answers to the defender's build
    half (prompt labels -100), and counts its refusals."""
    from asft_optim.lab.judge import is_refusal

    a, tok = lab.config.attack, lab.tokenizer()[0]
    harm_b, _ = split_prompts(defender_prompts(lab.data).harmful, a.operator_prompts)
    ids = _ids(tok, harm_b, lab.config.model.max_length)
    examples = greedy_refusals(load(lab.aligned(0)[0]), ids, max_new_tokens=a.refusal_tokens,
                               eos_token_id=tok.eos_token_id)
    refused = sum(is_refusal(tok.decode(e["input_ids"][0, len(t):], skip_special_tokens=True))
                  for e, t in zip(examples, ids, strict=True))
    stage, info = lab.operator("safegrad", 0)
    rows = load_refusal_examples(stage)
    assert info["examples"] == len(rows) == len(harm_b) > 0 and info["refused"] == refused
    for row, e, t in zip(rows, examples, ids, strict=True):
        assert row["input_ids"] == e["input_ids"][0].tolist() and row["labels"] == e["labels"][0].tolist()
        assert set(row["labels"][: len(t)]) == {-100} and any(x != -100 for x in row["labels"][len(t):])
    assert lab.trained["safegrad"][1]["train"]["refusal_examples"] == len(rows)
