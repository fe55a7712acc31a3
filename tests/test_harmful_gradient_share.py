"""benchmarks/harmful_gradient_share.py: the shares each operator takes of a gradient, against
dense float64 projectors, and the summed gradient against the lab's loss over one batch (a
tiny config-built Llama; the measurement itself runs on the pretrained model, in the benchmark)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import seeds, shape_and_rank
from tiny_models import tiny_llama

from asft_optim.lab.models import answer_loss
from asft_optim.lab.tokenizer import Collator

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "harmful_gradient_share.py"
D = torch.float64


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("harmful_gradient_share_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _orthonormal(d: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=D)).Q


def _dense_share(projector_out, g, projector_in) -> float:
    """‖P_out G P_in‖² / ‖G‖² with the projectors written out as dense (d, d) matrices."""
    return float((projector_out @ g @ projector_in).square().sum() / g.square().sum())


@settings(deadline=None)
@given(shape=shape_and_rank(), seed=seeds)
def test_shares_match_dense_projectors(bench, shape, seed):
    d_out, d_in, k = shape
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(d_out, d_in, generator=gen, dtype=D)
    u, q, f = _orthonormal(d_in, k, gen), _orthonormal(d_out, k, gen), _orthonormal(d_out, k, gen)
    eye_in, eye_out = torch.eye(d_in, dtype=D), torch.eye(d_out, dtype=D)
    assert bench.WholeShare()(g) == 1.0
    assert bench.InputShare(u)(g) == pytest.approx(_dense_share(eye_out, g, u @ u.T), rel=1e-9, abs=1e-12)
    assert bench.OutputShare(q)(g) == pytest.approx(_dense_share(q @ q.T, g, eye_in), rel=1e-9, abs=1e-12)
    assert bench.OrthogonalShare(f)(g) == pytest.approx(_dense_share(eye_out - f @ f.T, g, eye_in),
                                                        rel=1e-9, abs=1e-12)
    # The limits: every input direction (U = I), Q spanning G's columns, C spanning them.
    assert bench.InputShare(eye_in)(g) == pytest.approx(1.0, rel=1e-12)
    cols = torch.linalg.svd(g, full_matrices=False).U
    assert bench.OutputShare(cols)(g) == pytest.approx(1.0, rel=1e-12)
    assert bench.OrthogonalShare(cols)(g) == pytest.approx(0.0, abs=1e-12)
    assert bench.InputShare(u).chance == k / d_in and bench.OutputShare(q).chance == k / d_out


def test_a_zero_gradient_has_no_share(bench):
    zero = torch.zeros(3, 4, dtype=D)
    assert bench.WholeShare()(zero) == bench.InputShare(torch.eye(4, dtype=D))(zero) == 0.0


@settings(max_examples=5, deadline=None)
@given(seed=seeds, n_rows=st.integers(1, 3), data=st.data())
def test_summed_gradient_is_the_lab_loss_over_one_batch(bench, seed, n_rows, data):
    model = tiny_llama(seed % 1000, size="wide")
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_rows):
        n = data.draw(st.integers(3, 10))
        start = data.draw(st.integers(1, n - 1))  # the first answer token
        ids = torch.randint(1, 32, (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * start + ids[start:]})
    names = [n for n, _ in model.named_parameters() if n.endswith(("q_proj.weight", "v_proj.weight"))]
    got = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n in names}
    tokens = 0
    for n_tok, grads in bench.row_gradients(model, rows, names, answer_loss):
        tokens += n_tok
        for n, g in grads.items():
            got[n] += g
    params = dict(model.named_parameters())
    want = torch.autograd.grad(answer_loss(model, Collator(0)(rows)), [params[n] for n in names])
    for n, w in zip(names, want):
        # float32-level agreement: Llama's RMSNorm runs in float32 even in a float64 model, so
        # the sum-then-divide and the mean round differently (by ~1e-7 of the gradient).
        assert float((got[n] / tokens - w).norm() / w.norm()) < 1e-6
    ops = {"l2": {n: bench.WholeShare() for n in names},
           "all inputs": {n: bench.InputShare(torch.eye(params[n].shape[1], dtype=D)) for n in names},
           "no inputs": {n: bench.InputShare(torch.zeros(params[n].shape[1], 1, dtype=D)) for n in names}}
    result = bench.measure(model, rows, ops, answer_loss)
    for op, want_share in (("l2", 1.0), ("all inputs", 1.0), ("no inputs", 0.0)):
        for agg in ("summed", "per_row"):
            assert set(result[op][agg]) == set(names)
            assert all(v == pytest.approx(want_share, abs=1e-12) for v in result[op][agg].values())


@settings(deadline=None, max_examples=30)
@given(shape=shape_and_rank(), seed=seeds)
def test_the_conflict_share_is_what_the_surgery_removes(bench, shape, seed):
    """ConflictShare equals ‖G − G'‖² / ‖G‖² for G' the library's surgery (conflict mode, one
    tensor), and is 0 when G and S agree."""
    from asft_optim.surgery import surgery_project_

    d_out, d_in, _ = shape
    gen = torch.Generator().manual_seed(seed)
    g, s = torch.randn(d_out, d_in, generator=gen, dtype=D), torch.randn(d_out, d_in, generator=gen, dtype=D)
    for sign in (1.0, -1.0):
        projected = g.clone()
        surgery_project_([projected], [sign * s], "conflict", "tensor")
        removed = float((g - projected).square().sum() / g.square().sum())
        assert bench.ConflictShare(sign * s)(g) == pytest.approx(removed, rel=1e-9, abs=1e-12)
    assert bench.ConflictShare(g)(g) == 0.0 and bench.ConflictShare(-g)(g) == pytest.approx(1.0)
