"""benchmarks/update_share.py: ΔW read from a saved PEFT adapter against PEFT's own
``get_delta_weight``, and the energy-weighted shares against dense float64 projectors (a tiny
config-built Llama; the measurement itself runs on the lab's cached attacks, in the benchmark)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from strategies import seeds
from tiny_models import tiny_llama

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
D = torch.float64


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCH_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load("update_share")


@pytest.fixture(scope="module")
def shares_mod():
    return _load("harmful_gradient_share")


def _saved_adapter(tmp_path: Path, seed: int, **lora) -> tuple[Path, dict[str, torch.Tensor]]:
    """A LoRA adapter on q/v of a tiny Llama with nonzero B, saved; and PEFT's own ΔW per weight."""
    torch.manual_seed(seed)
    model = get_peft_model(tiny_llama(seed, dtype=torch.float32),
                           LoraConfig(target_modules=["q_proj", "v_proj"], **lora))
    want = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            torch.nn.init.normal_(module.lora_B["default"].weight)
            key = name.removeprefix("base_model.model.") + ".weight"
            want[key] = module.get_delta_weight("default").double()
    model.save_pretrained(tmp_path)
    return tmp_path, want


@settings(max_examples=6, deadline=None)
@given(seed=seeds, r=st.integers(1, 4), alpha=st.sampled_from([1, 8, 16]), rslora=st.booleans())
def test_adapter_deltas_are_peft_delta_weights(bench, tmp_path_factory, seed, r, alpha, rslora):
    path, want = _saved_adapter(tmp_path_factory.mktemp("adapter"), seed % 1000, r=r, lora_alpha=alpha,
                                use_rslora=rslora)
    got = bench.adapter_deltas(path)
    assert sorted(got) == sorted(want) and len(want) > 0
    for n, w in want.items():
        assert got[n].dtype == D
        assert float((got[n] - w).norm()) <= 1e-6 * float(w.norm())


@pytest.mark.parametrize("field,value", [("use_dora", True), ("rank_pattern", {"q_proj": 2}),
                                         ("alpha_pattern", {"q_proj": 4}), ("peft_type", "IA3")])
def test_adapter_deltas_refuse_what_changes_delta_w_otherwise(bench, tmp_path, field, value):
    path, _ = _saved_adapter(tmp_path, 0, r=2, lora_alpha=4)
    cfg_file = path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg[field] = value
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match=field if field != "peft_type" else "not LORA"):
        bench.adapter_deltas(path)


@settings(deadline=None, max_examples=30)
@given(seed=seeds, n_weights=st.integers(1, 4), k=st.integers(1, 3))
def test_shares_are_energy_weighted_dense_projections(bench, shares_mod, seed, n_weights, k):
    """Σ_w ‖P_w ΔW_w Q_w‖² / Σ_w ‖ΔW_w‖², P and Q written out as dense matrices."""
    gen = torch.Generator().manual_seed(seed)
    deltas, ops, num = {}, {"in": {}, "out": {}, "orth": {}}, {"in": 0.0, "out": 0.0, "orth": 0.0}
    for i in range(n_weights):
        d_out, d_in = (int(x) for x in torch.randint(k + 1, 7, (2,), generator=gen))
        dw = torch.randn(d_out, d_in, generator=gen, dtype=D) * float(torch.rand(1, generator=gen) * 3)
        u = torch.linalg.qr(torch.randn(d_in, k, generator=gen, dtype=D)).Q
        q = torch.linalg.qr(torch.randn(d_out, k, generator=gen, dtype=D)).Q
        name = f"w{i}"
        deltas[name] = dw
        ops["in"][name], ops["out"][name] = shares_mod.InputShare(u), shares_mod.OutputShare(q)
        ops["orth"][name] = shares_mod.OrthogonalShare(q)
        num["in"] += float((dw @ (u @ u.T)).square().sum())
        num["out"] += float(((q @ q.T) @ dw).square().sum())
        num["orth"] += float(((torch.eye(d_out, dtype=D) - q @ q.T) @ dw).square().sum())
    total = sum(float(d.square().sum()) for d in deltas.values())
    got = bench.shares(deltas, ops)
    for op in ops:
        assert got[op] == pytest.approx(num[op] / total, rel=1e-9, abs=1e-12)
    assert got["out"] + got["orth"] == pytest.approx(1.0, rel=1e-12)  # Q and I − QQᵀ split ΔW


def test_shares_refuse_an_operator_on_other_weights(bench, shares_mod):
    deltas = {"a": torch.ones(2, 2, dtype=D)}
    with pytest.raises(SystemExit, match="covers"):
        bench.shares(deltas, {"l2": {"b": shares_mod.WholeShare()}})


@settings(deadline=None, max_examples=30)
@given(seed=seeds, n_weights=st.integers(1, 4))
def test_cosine_is_the_concatenated_updates_cosine(bench, seed, n_weights):
    gen = torch.Generator().manual_seed(seed)
    shapes = [tuple(int(x) for x in torch.randint(1, 6, (2,), generator=gen)) for _ in range(n_weights)]
    deltas = {f"w{i}": torch.randn(*s, generator=gen, dtype=D) for i, s in enumerate(shapes)}
    v = {n: torch.randn(*d.shape, generator=gen, dtype=D) for n, d in deltas.items()}
    flat_d = torch.cat([deltas[n].flatten() for n in deltas])
    flat_v = torch.cat([v[n].flatten() for n in deltas])
    want = float(flat_d @ flat_v / (flat_d.norm() * flat_v.norm()))
    assert bench.cosine(deltas, v) == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert bench.cosine({n: -2.5 * t for n, t in v.items()}, v) == pytest.approx(-1.0, rel=1e-12)
    assert bench.cosine({n: torch.zeros_like(t) for n, t in v.items()}, v) == 0.0
