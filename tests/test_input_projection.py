"""Input-side anchors and sums of operators, against the dense definition and autograd (float64)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import lora_shapes, matrix_shapes, scalings, seeds

from asft_optim.input_projection import InputProjection, SumOperator
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


def _orthonormal(seed, d, k):
    return torch.linalg.qr(_rand(seed, d, k)).Q


def _oracle(delta, u, orthonormal):
    """The penalty from its definition: ‖ΔW P‖² with the d_in×d_in projector P = UUᵀ
    (orthonormal U), else tr(ΔW UUᵀ ΔWᵀ), formed densely."""
    m = u @ u.T
    if orthonormal:
        return (delta @ m).pow(2).sum()
    return torch.trace(delta @ m @ delta.T)


@st.composite
def basis_case(draw):
    d_out, d_in = draw(matrix_shapes())
    k = draw(st.integers(1, d_in))
    return d_out, d_in, k, draw(st.booleans())


@given(basis_case(), seeds)
def test_dense_terms_match_the_definition_and_autograd(case, seed):
    d_out, d_in, k, orthonormal = case
    u = _orthonormal(seed, d_in, k) if orthonormal else _rand(seed, d_in, k)
    op = InputProjection(u, d_out)
    delta = _rand(seed + 1, d_out, d_in).requires_grad_(True)
    expected = _oracle(delta, u, orthonormal)
    (grad,) = torch.autograd.grad(expected, delta)
    terms = op.dense_terms(delta.detach())
    torch.testing.assert_close(terms.penalty, expected.detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(terms.grads[0], grad, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(terms.delta_sq, delta.detach().pow(2).sum())
    torch.testing.assert_close(op.residual(delta.detach()).pow(2).sum(), expected.detach(), atol=1e-10, rtol=1e-10)


@given(lora_shapes(), st.integers(1, 7), scalings, st.booleans(), seeds)
def test_lora_terms_match_the_dense_definition_differentiated(shape, k, s, orthonormal, seed):
    d_out, d_in, r = shape
    k = min(k, d_in)
    u = _orthonormal(seed, d_in, k) if orthonormal else _rand(seed, d_in, k)
    b = _rand(seed + 1, d_out, r).requires_grad_(True)
    a = _rand(seed + 2, r, d_in).requires_grad_(True)
    delta = s * b @ a  # formed here only, by the oracle
    expected = _oracle(delta, u, orthonormal)
    gb, ga = torch.autograd.grad(expected, (b, a))
    terms = InputProjection(u, d_out).lora_terms(b.detach(), a.detach(), s)
    torch.testing.assert_close(terms.penalty, expected.detach(), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(terms.grads[0], gb, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(terms.grads[1], ga, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(terms.delta_sq, delta.detach().pow(2).sum(), atol=1e-9, rtol=1e-9)


def test_lora_terms_values_are_taken_before_the_step_changes_the_factors():
    u, b, a = _orthonormal(0, 6, 2), _rand(1, 4, 3), _rand(2, 3, 6)
    terms = InputProjection(u, 4).lora_terms(b, a, 1.5)
    expected = _oracle(1.5 * b @ a, u, True)
    b.add_(1.0)  # the inner step writes the parameter in place
    a.mul_(3.0)
    torch.testing.assert_close(terms.penalty, expected)


def test_an_update_orthogonal_to_the_inputs_costs_nothing_and_inputs_see_it_unchanged():
    u = _orthonormal(3, 8, 3)
    comp = torch.eye(8, dtype=D) - u @ u.T
    delta = _rand(4, 5, 8) @ comp  # ΔW U = 0: the layer's output on span(U) is unchanged
    terms = InputProjection(u, 5).dense_terms(delta)
    assert float(terms.penalty) < 1e-20 and float(terms.grads[0].abs().max()) < 1e-10
    x = u @ _rand(5, 3, 2)  # two inputs in span(U)
    torch.testing.assert_close(delta @ x, torch.zeros(5, 2, dtype=D), atol=1e-12, rtol=0)


def test_fits_and_bad_bases_name_the_problem():
    op = InputProjection(_orthonormal(0, 6, 2), 4)
    assert op.fits((4, 6)) is None
    assert "(4, 6)" in op.fits((4, 7)) and "rebuild" in op.fits((5, 6))
    with pytest.raises(AnchorError, match="k ≥ 1"):
        InputProjection(torch.zeros(6, 0, dtype=D), 4)
    with pytest.raises(AnchorError, match="d_out must be a positive int"):
        InputProjection(_orthonormal(0, 6, 2), 0)
    assert op.orthonormality_error() < 1e-12
    assert InputProjection(2 * _orthonormal(0, 6, 2), 4).orthonormality_error() == pytest.approx(3.0)


def test_to_moves_and_casts():
    op = InputProjection(_orthonormal(0, 6, 2), 4).to(dtype=torch.float32)
    assert op.basis.dtype == torch.float32 and op.d_out == 4 and op.d_in == 6


class _Output:
    """Test-local adapter giving an output-side Projection the shared interface (the lead
    adds these methods to Projection itself)."""

    def __init__(self, proj: Projection, d_in=None):
        self.proj, self.d_out, self.d_in = proj, proj.d_out, d_in

    def to(self, device=None, dtype=None):
        return _Output(self.proj.to(device, dtype), self.d_in)

    def fits(self, shape):
        return None if shape[0] == self.d_out else f"{shape[0]} outputs, anchor has {self.d_out}"

    def residual(self, delta):
        return self.proj.residual(delta)

    def dense_terms(self, delta):
        return dense_terms(self.proj, delta)

    def lora_terms(self, b, a, s):
        return lora_terms(self.proj, b, a, s)


@given(lora_shapes(), scalings, st.floats(0.0, 5.0), seeds)
def test_sum_operator_is_the_weighted_sum_of_its_parts(shape, s, w, seed):
    d_out, d_in, r = shape
    out_side = _Output(projection_from_delta(_rand(seed, d_out, d_in), "safelora"))
    in_side = InputProjection(_orthonormal(seed + 1, d_in, max(1, d_in // 2)), d_out)
    total = SumOperator([out_side, in_side], weights=[1.0, w])
    assert (total.d_out, total.d_in) == (d_out, d_in)
    b, a = _rand(seed + 2, d_out, r), _rand(seed + 3, r, d_in)
    delta = s * b @ a
    for got, parts in (
        (total.dense_terms(delta), [op.dense_terms(delta) for op in (out_side, in_side)]),
        (total.lora_terms(b, a, s), [op.lora_terms(b, a, s) for op in (out_side, in_side)]),
    ):
        torch.testing.assert_close(got.penalty, parts[0].penalty + w * parts[1].penalty)
        torch.testing.assert_close(got.delta_sq, parts[0].delta_sq)
        for g, g0, g1 in zip(got.grads, parts[0].grads, parts[1].grads, strict=True):
            torch.testing.assert_close(g, g0 + w * g1)
    torch.testing.assert_close(total.residual(delta).pow(2).sum(), total.dense_terms(delta).penalty)


def test_sum_operator_rejects_mismatched_parts_and_bad_weights():
    a, b = InputProjection(_orthonormal(0, 6, 2), 4), InputProjection(_orthonormal(0, 5, 2), 4)
    with pytest.raises(AnchorError, match="disagree on the weight's shape"):
        SumOperator([a, b])
    with pytest.raises(AnchorError, match="non-negative"):
        SumOperator([a, a], weights=[1.0, -1.0])
    with pytest.raises(AnchorError, match="at least one"):
        SumOperator([])
    nested = SumOperator([SumOperator([a, a]), a]).to(dtype=torch.float32)
    assert nested.fits((4, 6)) is None and "not (4, 5)" in nested.fits((4, 5))
    delta = _rand(1, 4, 6)
    torch.testing.assert_close(
        SumOperator([SumOperator([a, a]), a]).dense_terms(delta).penalty, 3 * a.dense_terms(delta).penalty
    )
