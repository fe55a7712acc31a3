"""Properties of the operator C and the closed-form penalty math, against the dense oracle."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import lora_shapes, matrix_shapes, modes, scalings, seeds, shape_and_rank

from asft_optim.projection import (
    AnchorError,
    Projection,
    dense_terms,
    lora_terms,
    projection_from_delta,
)

D = torch.float64


def _rand(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _dense_c_of(proj: Projection) -> torch.Tensor:
    f = proj.factor
    return f @ f.T


def _rank_for(mode, d_out, d_in, k):
    return None if mode in ("safelora", "l2") else k


@given(shape_and_rank(), seeds)
def test_orthogonal_is_symmetric_idempotent_and_complement_is_perpendicular(shape, seed):
    d_out, d_in, k = shape
    v = _rand(seed, d_out, d_in)
    proj = projection_from_delta(v, "orthogonal", rank=k)
    c = _dense_c_of(proj)
    torch.testing.assert_close(c, c.T)
    torch.testing.assert_close(c @ c, c, atol=1e-10, rtol=0)
    u = torch.linalg.svd(v, full_matrices=False)[0][:, :k]
    x = _rand(seed + 1, d_out, 3)
    # (I - C) x is orthogonal to every kept singular vector, and C x lies in their span.
    torch.testing.assert_close(u.T @ proj.residual(x), torch.zeros(k, 3, dtype=D), atol=1e-10, rtol=0)
    torch.testing.assert_close(u @ (u.T @ proj.apply_c(x)), proj.apply_c(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(c, ref.dense_c(v, "orthogonal", k), atol=1e-10, rtol=0)


@given(matrix_shapes(), seeds)
def test_safelora_exact_equals_dense_formula(shape, seed):
    v = _rand(seed, *shape)
    proj = projection_from_delta(v, "safelora")
    dense = v @ v.T / torch.linalg.matrix_norm(v)
    torch.testing.assert_close(_dense_c_of(proj), dense, atol=1e-12, rtol=1e-12)
    assert not proj.is_projector


@given(shape_and_rank(), seeds)
def test_safelora_low_rank_equals_dense_truncation(shape, seed):
    d_out, d_in, k = shape
    v = _rand(seed, d_out, d_in)
    proj = projection_from_delta(v, "safelora", rank=k)
    torch.testing.assert_close(_dense_c_of(proj), ref.dense_c(v, "safelora", k), atol=1e-10, rtol=1e-10)
    if k == min(d_out, d_in):  # full rank cut: back to the exact operator
        torch.testing.assert_close(_dense_c_of(proj), v @ v.T / torch.linalg.matrix_norm(v), atol=1e-10, rtol=1e-10)


@given(modes, shape_and_rank(), seeds)
def test_metric_is_r_transpose_r(mode, shape, seed):
    """``metric`` is RᵀR = I - 2C + C² (not I - C: safelora's C is no projector)."""
    d_out, d_in, k = shape
    v = _rand(seed, d_out, d_in)
    proj = projection_from_delta(v, mode, rank=_rank_for(mode, d_out, d_in, k))
    r = ref.dense_r(v, mode, _rank_for(mode, d_out, d_in, k))
    x = _rand(seed + 7, d_out, 2)
    torch.testing.assert_close(proj.metric(x), r.T @ r @ x, atol=1e-10, rtol=1e-10)
    if mode == "safelora":
        c = ref.dense_c(v, mode)
        torch.testing.assert_close(r.T @ r, torch.eye(d_out, dtype=D) - 2 * c + c @ c, atol=1e-10, rtol=1e-10)


@given(modes, shape_and_rank(), seeds)
def test_dense_terms_match_autograd(mode, shape, seed):
    d_out, d_in, k = shape
    rank = _rank_for(mode, d_out, d_in, k)
    v = _rand(seed, d_out, d_in)
    delta = _rand(seed + 1, d_out, d_in).requires_grad_()
    terms = dense_terms(projection_from_delta(v, mode, rank=rank), delta.detach())
    loss = ref.penalty_of(delta, v, mode, rank)
    (grad,) = torch.autograd.grad(loss, delta)
    torch.testing.assert_close(terms.penalty, loss.detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(terms.grads[0], grad, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(terms.delta_sq, delta.detach().pow(2).sum())


@given(modes, lora_shapes(), scalings, seeds)
def test_lora_terms_match_autograd_of_dense_delta(mode, shape, s, seed):
    d_out, d_in, r = shape
    k = max(1, min(d_out, d_in) // 2)
    rank = _rank_for(mode, d_out, d_in, k)
    v = _rand(seed, d_out, d_in)
    b = _rand(seed + 1, d_out, r).requires_grad_()
    a = _rand(seed + 2, r, d_in).requires_grad_()
    proj = projection_from_delta(v, mode, rank=rank)
    terms = lora_terms(proj, b.detach(), a.detach(), s)
    loss = ref.penalty_of(s * b @ a, v, mode, rank)
    gb, ga = torch.autograd.grad(loss, (b, a))
    torch.testing.assert_close(terms.penalty, loss.detach(), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(terms.grads[0], gb, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(terms.grads[1], ga, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(
        terms.off_anchor_fraction(), ref.off_anchor_fraction((s * b @ a).detach(), v, mode, rank), atol=1e-9, rtol=1e-9
    )


def test_energy_cut_keeps_fewest_directions():
    u = torch.linalg.qr(_rand(0, 6, 6))[0]
    v = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.1, 0.0, 0.0], dtype=D)) @ torch.linalg.qr(_rand(1, 6, 6))[0]
    total = 9 + 4 + 1 + 0.01
    p = projection_from_delta(v, "orthogonal", energy=13 / total - 1e-9)
    assert p.rank == 2 and abs(p.energy - 13 / total) < 1e-9
    assert projection_from_delta(v, "orthogonal", energy=13 / total + 1e-6).rank == 3
    assert projection_from_delta(v, "orthogonal", energy=1.0).rank >= 4


def test_low_precision_factor_still_gives_exact_metric():
    """A projector factor stored in float32 is not exactly orthonormal: R is applied twice."""
    v = _rand(3, 6, 4)
    p = projection_from_delta(v, "orthogonal", rank=2)
    p32 = Projection(p.factor.float().double(), "orthogonal")
    r = torch.eye(6, dtype=D) - p32.factor @ p32.factor.T
    x = _rand(4, 6, 3)
    torch.testing.assert_close(p32.metric(x), r @ r @ x, atol=1e-14, rtol=1e-14)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="orthogonal"), "needs rank"),
        (dict(mode="orthogonal", rank=5), "rank 5"),
        (dict(mode="orthogonal", rank=0), "rank 0"),
        (dict(mode="safelora", rank=2, energy=0.5), "not both"),
        (dict(mode="orthogonal", energy=1.5), "energy"),
        (dict(mode="nope"), "unknown anchor mode"),
    ],
)
def test_bad_arguments_name_the_weight(kwargs, match):
    with pytest.raises(AnchorError, match=match) as info:
        projection_from_delta(_rand(0, 4, 3), name="layers.0.q_proj.weight", **kwargs)
    assert "layers.0.q_proj.weight" in str(info.value)


def test_non_finite_and_zero_deltas_rejected():
    v = _rand(0, 4, 3)
    v[1, 2] = float("nan")
    with pytest.raises(AnchorError, match="q.weight: .*non-finite"):
        projection_from_delta(v, name="q.weight")
    with pytest.raises(AnchorError, match="q.weight: .*zero"):
        projection_from_delta(torch.zeros(4, 3, dtype=D), name="q.weight")
    assert projection_from_delta(torch.zeros(4, 3, dtype=D), "l2").rank == 0


@given(st.integers(1, 6), seeds)
def test_l2_mode_penalises_everything(d, seed):
    x = _rand(seed, d, 3)
    p = projection_from_delta(_rand(seed + 1, d, 2), "l2")
    torch.testing.assert_close(p.residual(x), x)
    torch.testing.assert_close(dense_terms(p, x).grads[0], 2 * x)


@given(modes, shape_and_rank(), st.integers(1, 4), seeds)
def test_residual_and_metric_with_and_without_gram(mode, shape, n, seed):
    """``(R x, RᵀR x)`` in two passes (cached G = FᵀF) or four: both equal the dense oracle."""
    d_out, d_in, k = shape
    v = _rand(seed, d_out, d_in)
    proj = projection_from_delta(v, mode, rank=_rank_for(mode, d_out, d_in, k))
    r = ref.dense_r(v, mode, _rank_for(mode, d_out, d_in, k))
    x = _rand(seed + 3, d_out, n)
    for gram in (None, proj.gram(), proj.compact_gram()):
        rx, mx = proj.residual_and_metric(x, gram)
        torch.testing.assert_close(rx, r @ x, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(mx, r.T @ r @ x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(proj.gram(), proj.factor.T @ proj.factor)


@given(modes, lora_shapes(), scalings, seeds)
def test_terms_with_cached_gram_equal_autograd(mode, shape, s, seed):
    d_out, d_in, r = shape
    rank = _rank_for(mode, d_out, d_in, max(1, min(d_out, d_in) // 2))
    v = _rand(seed, d_out, d_in)
    proj = projection_from_delta(v, mode, rank=rank)
    b = _rand(seed + 1, d_out, r).requires_grad_()
    a = _rand(seed + 2, r, d_in).requires_grad_()
    terms = lora_terms(proj, b.detach(), a.detach(), s, proj.compact_gram())
    loss = ref.penalty_of(s * b @ a, v, mode, rank)
    gb, ga = torch.autograd.grad(loss, (b, a))
    torch.testing.assert_close(terms.penalty, loss.detach(), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(terms.grads[0], gb, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(terms.grads[1], ga, atol=1e-9, rtol=1e-9)
    delta = _rand(seed + 4, d_out, d_in).requires_grad_()
    dense = dense_terms(proj, delta.detach(), proj.compact_gram())
    (grad,) = torch.autograd.grad(ref.penalty_of(delta, v, mode, rank), delta)
    torch.testing.assert_close(dense.grads[0], grad, atol=1e-10, rtol=1e-10)


def test_gram_is_cached_only_when_it_is_small():
    """G = FᵀF costs m² memory: the matrix only for m ≤ d_out/4 (low rank); else its diagonal."""
    assert projection_from_delta(_rand(0, 16, 16), "orthogonal", rank=4).compact_gram().shape == (4, 4)
    assert projection_from_delta(_rand(0, 16, 16), "orthogonal", rank=5).compact_gram().shape == (5,)
    assert projection_from_delta(_rand(0, 16, 16), "safelora").compact_gram().shape == (16,)
    assert projection_from_delta(_rand(0, 16, 3), "safelora").compact_gram().shape == (3, 3)  # tall: F is (16, 3)
    assert projection_from_delta(_rand(0, 16, 3), "l2").compact_gram() is None
    # A factor not known to have orthogonal columns, too wide for G: R is applied twice.
    assert Projection(_rand(0, 16, 16), "safelora").compact_gram() is None


@given(modes, shape_and_rank(), st.integers(1, 4), seeds)
def test_orthogonal_columns_form_matches_the_dense_oracle(mode, shape, n, seed):
    """The new form F = U diag(√c), float64: FᵀF = diag(c), C = F Fᵀ is the oracle's C, and
    the two-pass (R x, RᵀR x) with G = diag(c) equals the dense R x and RᵀR x, in every mode."""
    d_out, d_in, k = shape
    rank = _rank_for(mode, d_out, d_in, k)
    v = _rand(seed, d_out, d_in)
    proj = projection_from_delta(v, mode, rank=rank)
    assert proj.orthogonal_columns
    f = proj.factor
    assert f.shape[1] == (0 if mode == "l2" else min(d_out, d_in) if rank is None else k)
    c = f.pow(2).sum(0)
    torch.testing.assert_close(f.T @ f, torch.diag(c), atol=1e-10, rtol=0)
    if mode in ("orthogonal", "subspace"):
        torch.testing.assert_close(c, torch.ones_like(c), atol=1e-10, rtol=0)
    torch.testing.assert_close(_dense_c_of(proj), ref.dense_c(v, mode, rank), atol=1e-10, rtol=1e-10)
    r = ref.dense_r(v, mode, rank)
    x = _rand(seed + 5, d_out, n)
    # The diagonal form, also where the step would use the m×m G (low rank).
    for gram in (None if mode == "l2" else c, proj.compact_gram()):
        rx, mx = proj.residual_and_metric(x, gram)
        torch.testing.assert_close(rx, r @ x, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(mx, r.T @ r @ x, atol=1e-10, rtol=1e-10)
    # ... and the readable twin (R applied as written, twice).
    torch.testing.assert_close(proj.residual(x), r @ x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(proj.metric(x), r.T @ r @ x, atol=1e-10, rtol=1e-10)


@given(matrix_shapes(), st.sampled_from(["safelora", "orthogonal"]), seeds)
def test_with_orthogonal_columns_keeps_the_operator(shape, mode, seed):
    """Any factor (e.g. an old file's F = V/√‖V‖_F) converts to U diag(σ) with the same C."""
    f = _rand(seed, *shape)
    old = Projection(f, mode)
    new = old.with_orthogonal_columns()
    assert new.orthogonal_columns and new.mode == mode and new.rank == min(shape)
    torch.testing.assert_close(_dense_c_of(new), f @ f.T, atol=1e-10, rtol=1e-10)
    g = new.factor.T @ new.factor
    torch.testing.assert_close(g, torch.diag(torch.diagonal(g)), atol=1e-10, rtol=0)
    assert new.with_orthogonal_columns() is new
    assert new.to(dtype=torch.float32).orthogonal_columns


def test_lora_values_are_lazy_and_do_not_alias_the_factors():
    """The values are computed on first access, from tensors the inner step cannot change."""
    proj = projection_from_delta(_rand(0, 6, 5), "safelora")
    b, a = _rand(1, 6, 2), _rand(2, 2, 5)
    terms = lora_terms(proj, b, a, 2.0)
    expected = ref.penalty_of(2.0 * b @ a, _rand(0, 6, 5), "safelora", None)
    b.mul_(3.0), a.zero_()  # what an optimizer step does to the parameters' storage
    torch.testing.assert_close(terms.penalty, expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(terms.delta_sq, (2.0 * _rand(1, 6, 2) @ _rand(2, 2, 5)).pow(2).sum())


@pytest.mark.parametrize("shape", [(96, 96), (64, 160), (160, 64)])
def test_exact_safelora_from_float32_is_float32_accurate(shape):
    """A float32 V gives a float32 factor whose C is V Vᵀ/‖V‖_F (float64 oracle) to float32
    rounding: the decomposition runs in float64 (a float32 SVD left errors ~cond·eps)."""
    g = torch.Generator().manual_seed(3)
    # Decaying singular values, like a real V: a float32 decomposition loses the small ones.
    u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=g, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=g, dtype=torch.float64))
    s = torch.logspace(0, -6, min(shape), dtype=torch.float64)
    v64 = (u * s) @ w.T
    proj = projection_from_delta(v64.float(), "safelora")
    assert proj.factor.dtype == torch.float32 and proj.orthogonal_columns
    v = v64.float().double()
    want = v @ v.T / torch.linalg.matrix_norm(v)
    f = proj.factor.double()
    err = (f @ f.T - want).abs().max() / want.abs().max()
    # float64 route: <= 1 eps here; the float32 SVD it replaces: 4.6-6.9 eps.
    assert err < 2 * torch.finfo(torch.float32).eps, float(err)
    c = f.pow(2).sum(0)
    off = (f.T @ f - torch.diag(c)).abs().max() / c.max()
    assert off < 0.5 * torch.finfo(torch.float32).eps, float(off)  # float32 SVD: 1.3-2.7 eps


@settings(max_examples=25, deadline=None)
@given(d_out=st.integers(1, 9), d_in=st.integers(1, 9), scale=st.floats(1e-3, 1e2), seed=st.integers(0, 2**16))
def test_largest_eigenvalue_is_that_of_the_dense_operator(d_out, d_in, scale, seed):
    """Oracle: eigvalsh of the dense float64 C (safelora: σ_max²/‖V‖_F, whatever the form)."""
    g = torch.Generator().manual_seed(seed)
    v = scale * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    p = projection_from_delta(v, "safelora")
    dense = v @ v.T / torch.linalg.matrix_norm(v)
    want = float(torch.linalg.eigvalsh(dense).max())
    assert p.largest_eigenvalue() == pytest.approx(want, rel=1e-9)
    mixed = Projection(p.factor @ torch.linalg.qr(torch.randn(p.rank, p.rank, generator=g, dtype=torch.float64))[0],
                       "safelora")  # same C, columns no longer orthogonal: the spectral-norm path
    assert not mixed.orthogonal_columns
    assert mixed.largest_eigenvalue() == pytest.approx(want, rel=1e-9)
    if min(d_out, d_in) > 1:
        assert projection_from_delta(v, "orthogonal", rank=1).largest_eigenvalue() == pytest.approx(1.0)
    assert projection_from_delta(v, "l2").largest_eigenvalue() == 0.0
