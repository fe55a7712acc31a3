"""The safety-gradient subspace: the basis against an SVD oracle, and the guarantee QᵀΔW = 0
under Adam (update projected) versus its failure when only the gradient is projected."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import seeds

from asft_optim.projection import AnchorError
from asft_optim.safety_subspace import SafetySubspace, captured_share, left_gram, subspace_from_gram

D = torch.float64


def _rand(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


@st.composite
def case(draw):
    d_out, d_in = draw(st.integers(2, 7)), draw(st.integers(1, 7))
    n = draw(st.integers(1, 4))
    return d_out, d_in, n, draw(st.integers(1, d_out - 1))


@given(case(), seeds)
def test_basis_spans_the_top_left_singular_vectors_of_the_stacked_gradients(shape, seed):
    d_out, d_in, n, k = shape
    grads = [_rand(seed + i, d_out, d_in) for i in range(n)]
    k = min(k, n * d_in)  # the stacked matrix has rank ≤ n·d_in
    sub = subspace_from_gram(left_gram(grads), rank=k, d_in=d_in)
    u, s, _ = torch.linalg.svd(torch.cat(grads, 1), full_matrices=False)  # oracle
    torch.testing.assert_close(sub.basis @ sub.basis.T, u[:, :k] @ u[:, :k].T, atol=1e-8, rtol=0)
    assert sub.energy == pytest.approx(float(s[:k].pow(2).sum() / s.pow(2).sum()))
    x = _rand(seed + 99, d_out, 3)
    torch.testing.assert_close(sub.remove(x), x - u[:, :k] @ (u[:, :k].T @ x), atol=1e-10, rtol=0)
    assert sub.fits((d_out, d_in)) is None and "rebuild" in sub.fits((d_out, d_in + 1))


def _random_subspace(seed, d_out, k):
    return SafetySubspace(torch.linalg.qr(_rand(seed, d_out, k)).Q)


@given(st.integers(2, 7), st.integers(1, 7), st.integers(1, 3), st.integers(1, 4), seeds)
def test_projecting_b_after_each_adam_step_keeps_the_lora_update_out_of_the_subspace(d_out, d_in, r, k, seed):
    k = min(k, d_out - 1)
    sub, s = _random_subspace(seed, d_out, k), 2.0
    b = torch.zeros(d_out, r, dtype=D, requires_grad=True)  # PEFT's B₀ = 0
    a = _rand(seed + 1, r, d_in).requires_grad_(True)
    opt = torch.optim.AdamW([b, a], lr=0.05, weight_decay=0.1)
    target = _rand(seed + 2, d_out, d_in)  # the task pulls ΔW toward a target inside span(Q) too
    for _ in range(8):
        opt.zero_grad()
        (s * b @ a - target).pow(2).sum().backward()
        opt.step()
        with torch.no_grad():
            sub.project_lora_(b)
            delta = s * b @ a
            assert float(sub.inside(delta).abs().max()) < 1e-12
    assert float(delta.norm()) > 0  # the update did move, outside span(Q)


@given(st.integers(2, 7), st.integers(1, 7), seeds)
def test_projecting_the_dense_update_after_adam_keeps_it_out(d_out, d_in, seed):
    sub = _random_subspace(seed, d_out, 1)
    w_ref = _rand(seed + 1, d_out, d_in)
    w = w_ref.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=0.1)
    target = _rand(seed + 2, d_out, d_in)
    for _ in range(5):
        opt.zero_grad()
        (w - target).pow(2).sum().backward()
        opt.step()
        with torch.no_grad():
            sub.project_dense_(w, w_ref)
            assert float(sub.inside(w - w_ref).abs().max()) < 1e-12
    assert float((w - w_ref).norm()) > 0


def _train_b_with_projected_gradient(optimizer_cls, seed=0, **kw):
    d_out, d_in, r = 6, 5, 2
    sub = _random_subspace(seed, d_out, 2)
    b = torch.zeros(d_out, r, dtype=D, requires_grad=True)
    a = _rand(seed + 1, r, d_in).requires_grad_(True)
    opt = optimizer_cls([b, a], **kw)
    target = _rand(seed + 2, d_out, d_in)
    for _ in range(10):
        opt.zero_grad()
        (b @ a - target).pow(2).sum().backward()
        with torch.no_grad():
            b.grad.copy_(sub.remove(b.grad))  # SPF's literal form: the gradient, before the step
        opt.step()
    with torch.no_grad():
        return float(sub.fraction_inside(b @ a))


def test_projecting_only_the_gradient_holds_for_sgd_but_not_for_adam():
    assert _train_b_with_projected_gradient(torch.optim.SGD, lr=0.01, momentum=0.9) < 1e-12
    # Adam rescales each coordinate by 1/√v: the step leaves the complement.
    assert _train_b_with_projected_gradient(torch.optim.Adam, lr=0.05) > 1e-3


def test_bad_bases_and_gradients_name_the_fix():
    with pytest.raises(AnchorError, match="orthonormal columns"):
        SafetySubspace(2 * torch.eye(4, 2, dtype=D))
    with pytest.raises(AnchorError, match="1 ≤ k ≤ d_out"):
        SafetySubspace(torch.zeros(4, 0, dtype=D))
    with pytest.raises(AnchorError, match="no refusal gradient"):
        left_gram([])
    with pytest.raises(AnchorError, match="does not move this weight"):
        subspace_from_gram(torch.zeros(3, 3, dtype=D), rank=1)
    with pytest.raises(AnchorError, match="give rank= or energy="):
        subspace_from_gram(torch.eye(3, dtype=D))
    sub = subspace_from_gram(torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=D)), energy=0.7)
    assert sub.rank == 2 and sub.energy == pytest.approx(0.7)


@given(st.integers(2, 8), st.integers(1, 8), st.integers(1, 5), seeds)
def test_captured_share_is_the_held_out_energy_inside_the_span(d, k, n, seed):
    """Oracle: Σ_i ‖P x_i‖² / Σ_i ‖x_i‖² with the dense projector P = BBᵀ, vector by vector."""
    k = min(k, d)
    basis = torch.linalg.qr(_rand(seed, d, k)).Q
    xs = _rand(seed + 1, d, n)
    p = basis @ basis.T
    oracle = sum(float((p @ xs[:, i]).pow(2).sum()) for i in range(n)) / float(xs.pow(2).sum())
    assert captured_share(basis, xs @ xs.T) == pytest.approx(oracle, rel=1e-10, abs=1e-12)
    assert captured_share(basis, torch.zeros(d, d, dtype=D)) == 0.0
    with pytest.raises(AnchorError, match="do not fit"):
        captured_share(basis, torch.zeros(d + 1, d + 1, dtype=D))
