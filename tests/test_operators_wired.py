"""The data-driven operators through the one penalty path: input-side anchors and sums of
anchors in the optimizer and the loss-level twin (exact against a dense float64 oracle),
and safety subspaces projected after the inner step (QᵀΔW = 0 under AdamW)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import DIMS, lm_loss, lora, make_anchors, tiny_llama

from asft_optim import AnchoredAdamW, AnchoredOptimizer, AnchorError, AnchorPenalty, anchor_penalty
from asft_optim.input_projection import InputProjection
from asft_optim.safety_subspace import SafetySubspace

D = torch.float64
LAM = 0.7


def _modules(model):
    return {n.removeprefix("base_model.model.") + ".weight": m for n, m in model.named_modules()
            if hasattr(m, "lora_A")}


def _delta(m):
    """ΔW = s·B·A of the active adapter, dense (the oracle's view)."""
    return m.scaling["default"] * (m.lora_B["default"].weight @ m.lora_A["default"].weight)


def _input_anchors(k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, (d_out, d_in) in DIMS.items():
        u = torch.linalg.qr(torch.randn(d_in, k, generator=g, dtype=D)).Q
        out[n] = InputProjection(u, d_out=d_out)
    return out


def _oracle(model, input_anchors, output=None, output_oracle=None):
    """λ Σ (‖ΔW U‖² [+ ‖R ΔW‖²]) written densely from the definitions."""
    import reference as ref

    total = 0.0
    for n, m in _modules(model).items():
        dw = _delta(m)
        u = input_anchors[n].basis
        p = u @ u.T  # the d_in × d_in projector, formed only here in the oracle
        total = total + (dw @ p).pow(2).sum()
        if output_oracle is not None:
            total = total + ref.penalty_of(dw, *output_oracle[n])
    return LAM * total


@settings(max_examples=8, deadline=None)
@given(k=st.integers(1, 6), seed=st.integers(0, 10_000), combine=st.booleans())
def test_input_side_anchors_and_their_sum_are_exact_in_both_routes(k, seed, combine):
    model = lora(tiny_llama(seed % 7), ["q_proj", "v_proj"], seed=seed % 5 + 1)
    inputs = _input_anchors(k, seed)
    outputs, out_oracle = make_anchors(model, DIMS, "safelora", None, seed=seed % 11)
    anchors = [outputs, inputs] if combine else inputs
    params = [p for p in model.parameters() if p.requires_grad]
    want = torch.autograd.grad(_oracle(model, inputs, outputs, out_oracle if combine else None), params)
    opt = AnchoredOptimizer(torch.optim.SGD(params, lr=0.0), model, anchors, LAM)
    for p in params:
        p.grad = None
    opt.step()
    for p, w in zip(params, want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-10, atol=1e-12)
    for value in (AnchorPenalty(model, anchors, LAM)(), anchor_penalty(model, anchors, LAM)):
        got = torch.autograd.grad(value, params)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_a_full_weight_with_input_side_anchors_is_exact():
    model = tiny_llama(0)
    for n, p in model.named_parameters():
        p.requires_grad_(n in DIMS)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if n in DIMS}
    inputs = _input_anchors(3, 1)
    opt = AnchoredAdamW(model, inputs, LAM, lr=1e-2)
    for t in range(3):
        opt.zero_grad()
        lm_loss(model, t).backward()
        opt.step()
    params = dict(model.named_parameters())
    want = sum(((params[n] - w0[n]) @ inputs[n].basis).pow(2).sum() for n in DIMS) * LAM
    opt.zero_grad()
    lm_loss(model, 9).backward()
    opt.step()
    assert opt.anchor_summary()["anchor/penalty"] == pytest.approx(float(want), rel=1e-9)


def _subspaces(model, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: SafetySubspace(torch.linalg.qr(torch.randn(d_out, k, generator=g, dtype=D)).Q)
            for n, (d_out, _) in DIMS.items()}


def test_safety_subspace_keeps_the_lora_update_out_of_its_span_under_adamw():
    model = lora(tiny_llama(0), ["q_proj", "v_proj"], init_lora_weights=True)  # B₀ = 0
    anchors, _ = make_anchors(model, DIMS, "l2", None)
    subs = _subspaces(model)
    opt = AnchoredAdamW(model, anchors, 0.0, lr=5e-2, subspaces=subs)
    for t in range(5):
        opt.zero_grad()
        lm_loss(model, t).backward()
        opt.step()
    for n, m in _modules(model).items():
        dw = _delta(m).detach()
        assert dw.norm() > 1e-3  # it trained
        assert (subs[n].basis.T @ dw).abs().max() < 1e-12
    # Without the subspaces the same run leaves part of ΔW inside span(Q): the check can fail.
    model2 = lora(tiny_llama(0), ["q_proj", "v_proj"], init_lora_weights=True)
    opt2 = AnchoredAdamW(model2, anchors, 0.0, lr=5e-2)
    for t in range(5):
        opt2.zero_grad()
        lm_loss(model2, t).backward()
        opt2.step()
    assert max(float((subs[n].basis.T @ _delta(m).detach()).abs().max()) for n, m in _modules(model2).items()) > 1e-4


def test_safety_subspace_on_full_weights_keeps_q_transpose_delta_zero():
    model = tiny_llama(0)
    for n, p in model.named_parameters():
        p.requires_grad_(n in DIMS)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if n in DIMS}
    anchors, _ = make_anchors(model, DIMS, "safelora", None)
    subs = _subspaces(model, k=3, seed=4)
    opt = AnchoredAdamW(model, anchors, LAM, lr=1e-2, subspaces=subs)
    for t in range(4):
        opt.zero_grad()
        lm_loss(model, t).backward()
        opt.step()
    params = dict(model.named_parameters())
    for n in DIMS:
        dw = params[n].detach() - w0[n]
        assert dw.norm() > 1e-3
        assert (subs[n].basis.T @ dw).abs().max() < 1e-12


def test_safety_subspace_refuses_what_it_cannot_keep_exact():
    model = lora(tiny_llama(0), ["q_proj", "v_proj"])  # random B₀: already inside span(Q) in part
    anchors, _ = make_anchors(model, DIMS, "l2", None)
    with pytest.raises(AnchorError, match="B₀ = 0"):
        AnchoredAdamW(model, anchors, LAM, lr=1e-2, subspaces=_subspaces(model))
    dora = lora(tiny_llama(0), ["q_proj", "v_proj"], use_dora=True, init_lora_weights=True)
    with pytest.raises(AnchorError, match="not for"):
        opt = AnchoredAdamW(dora, anchors, LAM, lr=1e-2, subspaces=_subspaces(dora))
        lm_loss(dora, 0).backward()
        opt.step()
    with pytest.raises(AnchorError, match="non-empty"):
        AnchoredAdamW(model, anchors, LAM, lr=1e-2, subspaces={})
