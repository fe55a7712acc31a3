"""Hypothesis strategies for the core tests: small shapes, ranks, λ and seeds."""

from __future__ import annotations

from hypothesis import strategies as st

dims = st.integers(min_value=1, max_value=7)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
lambdas = st.floats(min_value=0.0, max_value=10.0, allow_nan=False, allow_infinity=False)
positive_lambdas = st.floats(min_value=1e-3, max_value=10.0, allow_nan=False, allow_infinity=False)
modes = st.sampled_from(["safelora", "orthogonal", "subspace", "l2"])


@st.composite
def matrix_shapes(draw, min_side: int = 1):
    """``(d_out, d_in)`` with both sides in [min_side, 7]."""
    return draw(st.integers(min_side, 7)), draw(st.integers(min_side, 7))


@st.composite
def shape_and_rank(draw):
    """``(d_out, d_in, k)`` with ``1 <= k <= min(d_out, d_in)``."""
    d_out, d_in = draw(matrix_shapes())
    return d_out, d_in, draw(st.integers(1, min(d_out, d_in)))


@st.composite
def lora_shapes(draw):
    """``(d_out, d_in, r)`` of a LoRA pair B (d_out, r), A (r, d_in)."""
    d_out, d_in = draw(matrix_shapes())
    return d_out, d_in, draw(st.integers(1, 4))


scalings = st.floats(min_value=0.1, max_value=8.0, allow_nan=False, allow_infinity=False)
