"""HF Trainer route: ``optimizers=(AnchoredAdamW(...), None)``.

The default scheduler drives the inner LR, gradient accumulation applies the penalty
once per optimizer step, the penalty is added after the Trainer clips (and is not part of
the logged ``grad_norm``), bf16 autocast on CPU, and resume-from-checkpoint reproduces an
uninterrupted run. The logging callback puts the anchor statistics into the logs.
"""

import math

import pytest
import torch
from integration_models import TokenDataset, trainable_state, trainer_args
from reference import oracle_penalty
from tiny_models import anchor_deltas, tiny_anchors, tiny_llama, tiny_lora_llama
from transformers import Trainer, TrainerCallback

from asft_optim import AnchoredAdamW, AnchoredOptimizer, AnchorLoggingCallback, add_anchor_logging
from asft_optim.integrations import unwrap_optimizer

KEYS = ("anchor/penalty", "anchor/off_anchor_mean", "anchor/off_anchor_max")

pytestmark = pytest.mark.usefixtures("clean_accelerate")


class Recorder(TrainerCallback):
    """Stands for TensorBoard/W&B: records the logs it receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_scheduler_drives_inner_lr_and_logging(tmp_path):
    model = tiny_lora_llama()
    anchors = tiny_anchors(model)
    before = trainable_state(model)
    opt = AnchoredAdamW(model, anchors, anchor_lambda=1.0, lr=1e-2, weight_decay=0.0)
    recorder = Recorder()
    trainer = Trainer(
        model=model, args=trainer_args(tmp_path, max_steps=3), train_dataset=TokenDataset(12),
        optimizers=(opt, None), callbacks=[recorder],
    )
    add_anchor_logging(trainer)  # first in line, so report_to integrations see the keys
    trainer.train()

    assert unwrap_optimizer(trainer.optimizer) is opt
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "loss" in h]
    assert lrs == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3])  # linear decay, logged before each step
    # The scheduler moved the *inner* optimizer's LR (live param_groups through accelerate).
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0)

    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 3
    for h in steps:
        assert all(k in h and math.isfinite(h[k]) for k in KEYS), h
        assert h["anchor/penalty"] > 0 and 0 < h["anchor/off_anchor_mean"] <= h["anchor/off_anchor_max"]
    assert steps[-1]["anchor/penalty"] == pytest.approx(opt.anchor_summary()["anchor/penalty"])
    assert all(all(k in logs for k in KEYS) for logs in recorder.logs if "loss" in logs)
    after = trainable_state(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_callback_in_callbacks_list_fills_log_history(tmp_path):
    model = tiny_lora_llama()
    opt = AnchoredAdamW(model, tiny_anchors(model), lr=1e-2)
    trainer = Trainer(
        model=model, args=trainer_args(tmp_path, max_steps=2), train_dataset=TokenDataset(8),
        optimizers=(opt, None), callbacks=[AnchorLoggingCallback()],
    )
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2 and all(all(k in h for k in KEYS) for h in steps)


def test_callback_rejects_plain_optimizer(tmp_path):
    model = tiny_lora_llama()
    trainer = Trainer(
        model=model, args=trainer_args(tmp_path, max_steps=1), train_dataset=TokenDataset(4),
        callbacks=[AnchorLoggingCallback()],
    )
    with pytest.raises(TypeError, match="not an AnchoredOptimizer"):
        trainer.train()


def _train(tmp_path, **kw):
    model = tiny_lora_llama()
    opt = AnchoredAdamW(model, tiny_anchors(model), anchor_lambda=1.0, lr=1e-2, weight_decay=0.0)
    trainer = Trainer(model=model, args=trainer_args(tmp_path, **kw), train_dataset=TokenDataset(16),
                      optimizers=(opt, None))
    trainer.train()
    return trainable_state(model)


def test_gradient_accumulation_applies_penalty_once_per_step(tmp_path):
    # 2 micro-batches of 2 == 1 batch of 4: the penalty joins once per optimizer step.
    whole = _train(tmp_path / "a", per_device_train_batch_size=4, gradient_accumulation_steps=1)
    accum = _train(tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    for n in whole:
        torch.testing.assert_close(accum[n], whole[n], rtol=1e-5, atol=1e-6)


def test_penalty_is_added_after_clipping(tmp_path):
    # SGD inner + max_grad_norm ~ 0: the task gradient is clipped away; the update is the
    # unclipped penalty gradient alone, and the logged grad_norm is the task's.
    model = tiny_lora_llama()
    deltas = anchor_deltas(model)
    anchors = tiny_anchors(model)
    lam, lr = 0.5, 0.1
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AnchoredOptimizer(torch.optim.SGD(params, lr=lr), model, anchors, lam)

    oracle_model = tiny_lora_llama()
    oracle = {n: (v, "safelora", None) for n, v in deltas.items()}
    oracle_penalty(oracle_model, oracle, lam).backward()
    want = {n: p.detach() - lr * p.grad for n, p in oracle_model.named_parameters() if p.requires_grad}
    data = TokenDataset(4)
    ids = data.ids
    oracle_model.zero_grad()
    oracle_model(input_ids=ids, labels=ids).loss.backward()
    task_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in oracle_model.parameters() if p.grad is not None]))

    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=1, max_grad_norm=1e-9, learning_rate=lr,
                                                     lr_scheduler_type="constant"),
                      train_dataset=data, optimizers=(opt, None))
    trainer.train()
    got = trainable_state(model)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6)
    assert max((got[n] - want[n]).abs().max() for n in want) < 1e-6
    assert max((got[n] - p).abs().max() for n, p in trainable_state(tiny_lora_llama()).items()) > 1e-3
    assert trainer.state.log_history[0]["grad_norm"] == pytest.approx(task_norm.item(), rel=1e-4)


def test_bf16_autocast_on_cpu(tmp_path):
    model = tiny_lora_llama()
    before = trainable_state(model)
    opt = AnchoredAdamW(model, tiny_anchors(model), lr=1e-2)
    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=2, bf16=True), train_dataset=TokenDataset(8),
                      optimizers=(opt, None), callbacks=[AnchorLoggingCallback()])
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(h["loss"]) and h["anchor/penalty"] > 0 for h in steps)
    after = trainable_state(model)
    assert all(after[n].dtype == torch.float32 for n in after)  # master weights stay fp32
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_bf16_weights_penalty_matches_fp32_oracle(tmp_path):
    # Pure bf16 model (adapters in bf16 too): the penalty math runs in fp32 inside step().
    model = tiny_lora_llama(dtype=torch.bfloat16)
    deltas = anchor_deltas(model)
    opt = AnchoredAdamW(model, tiny_anchors(model), lr=1e-2)
    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=1), train_dataset=TokenDataset(4),
                      optimizers=(opt, None))
    fp32 = tiny_lora_llama(dtype=torch.bfloat16).float()
    oracle = {n: (v, "safelora", None) for n, v in deltas.items()}
    want = oracle_penalty(fp32, oracle, 1.0).item()
    trainer.train()
    assert opt.anchor_summary()["anchor/penalty"] == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_resume_from_checkpoint_equals_uninterrupted_run_bit_exactly(tmp_path, full):
    def make(out):
        if full:  # q/v trained directly: W_ref must come back from optimizer.pt
            model = tiny_llama(0, torch.float32, size="integration")
            for n, p in model.named_parameters():
                p.requires_grad_(n.endswith(("q_proj.weight", "v_proj.weight")))
        else:
            model = tiny_lora_llama()
        opt = AnchoredAdamW(model, tiny_anchors(model), anchor_lambda=1.0, lr=1e-2)
        args = trainer_args(out, max_steps=4, save_strategy="steps", save_steps=2, save_only_model=False)
        return model, Trainer(model=model, args=args, train_dataset=TokenDataset(16), optimizers=(opt, None))

    model, trainer = make(tmp_path)
    trainer.train()
    uninterrupted = trainable_state(model)

    model2, trainer2 = make(tmp_path)
    trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    resumed = trainable_state(model2)
    assert trainer2.state.global_step == 4
    for n in uninterrupted:
        assert torch.equal(resumed[n], uninterrupted[n]), n
    saved = torch.load(tmp_path / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert saved["param_groups"][0]["anchor_version"] == 2
    refs = [e["anchor_ref"] for e in saved["state"].values() if "anchor_ref" in e]
    assert len(refs) == (4 if full else 0)


def test_lambda_callback_schedules_and_resumes(tmp_path):
    from asft_optim import AnchorLambdaCallback

    def make(out):
        model = tiny_lora_llama()
        opt = AnchoredAdamW(model, tiny_anchors(model), anchor_lambda=2.0, lr=1e-2)
        args = trainer_args(out, max_steps=4, save_strategy="steps", save_steps=2, save_only_model=False)
        seen = []

        class Seen(TrainerCallback):
            def on_step_begin(self, args, state, control, optimizer=None, **kw):
                seen.append(unwrap_optimizer(optimizer).param_groups[0]["anchor_lambda"])

        cbs = [AnchorLambdaCallback(lambda t: t / 4), Seen()]
        trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(16), optimizers=(opt, None), callbacks=cbs)
        return model, trainer, seen

    model, trainer, seen = make(tmp_path)
    trainer.train()
    assert seen == [0.0, 0.5, 1.0, 1.5]
    model2, trainer2, seen2 = make(tmp_path)
    trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert seen2 == [1.0, 1.5]
    for n, p in trainable_state(model2).items():
        assert torch.equal(p, trainable_state(model)[n]), n
