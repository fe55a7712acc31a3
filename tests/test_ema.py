"""ParameterEMA and its Trainer callback: the EMA formula against a float64 oracle, a
bit-exact resume from its state, clear errors, and a Trainer run whose final adapter is
the EMA of the LoRA factors started at B = 0."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from integration_models import TokenDataset, trainable_state, trainer_args
from strategies import matrix_shapes, seeds
from tiny_models import tiny_lora_llama
from transformers import Trainer, TrainerCallback

from asft_optim import EMACallback, ParameterEMA

betas = st.floats(min_value=0.0, max_value=0.999, allow_nan=False)


def _trajectory(shapes, steps: int, seed: int, dtype=torch.float64) -> list[list[torch.Tensor]]:
    """``steps + 1`` random values of tensors of ``shapes`` (index 0: the start)."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(steps + 1)]


def _oracle(trajectory, beta: float) -> list[torch.Tensor]:
    """θ_ema = θ_0, then θ_ema ← β·θ_ema + (1−β)·θ_t, in float64."""
    ema = [t.double().clone() for t in trajectory[0]]
    for values in trajectory[1:]:
        ema = [beta * e + (1.0 - beta) * v.double() for e, v in zip(ema, values)]
    return ema


@settings(max_examples=40, deadline=None)
@given(beta=betas, shapes=st.lists(matrix_shapes(), min_size=1, max_size=3), steps=st.integers(0, 6), seed=seeds)
def test_update_is_the_ema_formula_in_float64(beta, shapes, steps, seed):
    traj = _trajectory(shapes, steps, seed)
    params = [t.clone() for t in traj[0]]
    ema = ParameterEMA(params, beta)
    for values in traj[1:]:
        for p, v in zip(params, values):
            p.copy_(v)  # the optimizer's step, in place as an optimizer does
        ema.update()
    want = _oracle(traj, beta)
    assert ema.steps == steps
    for got, w in zip(ema.shadow, want):
        torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)
    ema.copy_to()
    for p, w in zip(params, want):
        torch.testing.assert_close(p, w, rtol=1e-12, atol=1e-12)


def test_beta_zero_follows_and_the_start_is_kept():
    start = torch.tensor([1.0, -2.0])
    p = start.clone()
    ema = ParameterEMA([p], 0.0)
    p.add_(3.0)
    assert torch.equal(ema.shadow[0], start)  # built at the start, not moved by the step itself
    ema.update()
    assert torch.equal(ema.shadow[0], p)


@settings(max_examples=15, deadline=None)
@given(beta=betas, k=st.integers(1, 4), seed=seeds)
def test_resume_from_state_dict_is_bit_exact(beta, k, seed):
    shapes = [(3, 5), (4,)]
    traj = _trajectory(shapes, 2 * k, seed, torch.float32)

    def run(ema, params, values):
        for vals in values:
            for p, v in zip(params, vals):
                p.copy_(v)
            ema.update()

    params = [t.clone() for t in traj[0]]
    straight = ParameterEMA(params, beta)
    run(straight, params, traj[1:])

    params = [t.clone() for t in traj[0]]
    first = ParameterEMA(params, beta)
    run(first, params, traj[1 : k + 1])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = ParameterEMA(params, beta)  # a fresh process: its start is overwritten
    resumed.load_state_dict(state)
    run(resumed, params, traj[k + 1 :])
    assert resumed.steps == straight.steps == 2 * k
    for a, b in zip(resumed.shadow, straight.shadow):
        assert torch.equal(a, b)


def test_state_dict_is_a_copy():
    p = torch.ones(3)
    ema = ParameterEMA([p], 0.5)
    state = ema.state_dict()
    p.fill_(3.0)
    ema.update()
    assert torch.equal(state["shadow"][0], torch.ones(3)) and state["steps"] == 0
    assert torch.equal(ema.shadow[0], torch.full((3,), 2.0))


@pytest.mark.parametrize("beta", [1.0, -0.1, 1.5, float("nan")])
def test_beta_outside_zero_one_is_refused(beta):
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\)"):
        ParameterEMA([torch.zeros(2)], beta)


def test_errors_name_what_changed():
    with pytest.raises(ValueError, match="no tensors to average"):
        ParameterEMA([], 0.9)
    with pytest.raises(ValueError, match="only floating-point"):
        ParameterEMA([torch.zeros(2, dtype=torch.int64)], 0.9)
    a, b = torch.zeros(2, 3), torch.zeros(4)
    ema = ParameterEMA([a, b], 0.9)
    with pytest.raises(ValueError, match="parameter set changed: the EMA holds 2 tensors, got 1"):
        ema.update([a])
    with pytest.raises(ValueError, match=r"parameter set changed: tensor 1 is \(5,\) float32, the EMA's is \(4,\)"):
        ema.copy_to([a, torch.zeros(5)])
    with pytest.raises(ValueError, match="parameter set changed: tensor 0 is .* float64"):
        ema.update([a.double(), b])
    with pytest.raises(ValueError, match="the state has beta=0.5, this EMA beta=0.9"):
        ema.load_state_dict(ParameterEMA([a, b], 0.5).state_dict())
    with pytest.raises(ValueError, match="load_state_dict: the parameter set changed"):
        ema.load_state_dict(ParameterEMA([a], 0.9).state_dict())
    assert ema.steps == 0  # nothing half-applied


# -- the Trainer callback ------------------------------------------------------------------


class _Trajectory(TrainerCallback):
    """Records the trainable tensors after every optimizer step."""

    def __init__(self, model):
        self.model, self.states = model, []

    def on_step_end(self, args, state, control, **kw):
        self.states.append(trainable_state(self.model))


def _ema_run(out, beta: float, **args):
    model = tiny_lora_llama(init_lora_weights=True)  # PEFT's default: B = 0, the aligned model
    start = trainable_state(model)
    ema = ParameterEMA([p for p in model.parameters() if p.requires_grad], beta)
    seen = _Trajectory(model)
    trainer = Trainer(model=model, args=trainer_args(out, **args), train_dataset=TokenDataset(16),
                      callbacks=[EMACallback(ema, copy_at_end=True), seen])
    return model, ema, start, seen, trainer


@pytest.mark.usefixtures("clean_accelerate")
def test_callback_leaves_the_ema_of_the_factors_in_the_model(tmp_path):
    beta = 0.7
    model, ema, start, seen, trainer = _ema_run(tmp_path, beta, max_steps=3, gradient_accumulation_steps=2)
    assert all(not v.any() for n, v in start.items() if "lora_B" in n)
    trainer.train()
    assert ema.steps == trainer.state.global_step == len(seen.states) == 3  # once per optimizer step
    final = trainable_state(model)
    names = list(start)
    for n in names:
        want = _oracle([[start[n]]] + [[s[n]] for s in seen.states], beta)[0]
        torch.testing.assert_close(final[n].double(), want, rtol=1e-6, atol=1e-7)
        assert not torch.equal(final[n], seen.states[-1][n]), n  # not the trained values
    cb = trainer.callback_handler.callbacks
    assert next(c for c in cb if isinstance(c, EMACallback)).summary() == {"ema/beta": beta, "ema/updates": 3}


@pytest.mark.usefixtures("clean_accelerate")
def test_callback_checkpoints_its_state_and_resumes_bit_exactly(tmp_path):
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, save_only_model=False)
    model, ema, _, _, trainer = _ema_run(tmp_path, 0.8, **kw)
    trainer.train()
    uninterrupted = trainable_state(model)
    saved = torch.load(tmp_path / "checkpoint-2" / EMACallback.FILE, weights_only=True)
    assert saved["steps"] == 2 and saved["beta"] == 0.8

    _, ema2, _, _, trainer2 = _ema_run(tmp_path, 0.8, **kw)
    with pytest.raises(ValueError, match="starts at step 2 but the EMA has seen 0 updates"):
        trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))

    model3, ema3, _, _, trainer3 = _ema_run(tmp_path, 0.8, **kw)
    ema3.load_state_dict(saved)
    trainer3.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert ema3.steps == 4
    resumed = trainable_state(model3)
    for n in uninterrupted:
        assert torch.equal(resumed[n], uninterrupted[n]), n
