"""Smoke test: every performance benchmark runs on tiny sizes and writes its results.

No timing is asserted (CI machines are shared and noisy): only the structure of the
JSON/Markdown output and the benchmarks' own correctness checks.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module", autouse=True)
def _bench_path():
    sys.path.insert(0, str(BENCH))
    yield
    sys.path.remove(str(BENCH))


def _run(module: str, tmp_path: Path, *extra: str) -> dict:
    main = importlib.import_module(module).main
    payload = main(["--tiny", "--device", "cpu", "--out", str(tmp_path), *extra])
    saved = json.loads((tmp_path / f"{module}.json").read_text())
    assert saved["benchmark"] == module
    assert saved["command"].startswith(f"PYTHONPATH=. python benchmarks/{module}.py --tiny")
    assert {"torch", "torch_threads", "cpu", "device"} <= set(saved["environment"])
    assert (tmp_path / f"{module}.md").read_text().count("|") > 10
    assert payload["results"]
    return saved


def test_penalty_cost_smoke(tmp_path):
    out = _run("penalty_cost", tmp_path)
    (r,) = out["results"]
    assert set(r["stats"]) == {"reference", "safelora_exact", "orthogonal_r16", "safelora_exact_decoupled",
                             "floor_2_passes_exact", "anchor_penalty_exact", "input_k32", "spf_k32"}
    assert r["anchor_penalty_over_apply_penalty"] > 0
    for s in r["stats"].values():
        assert s["median_s"] > 0 and s["ratio_vs_reference"] > 0
    assert r["penalty_check"]["rel_err_ours"] < 1e-4  # ours == s² · the formula, in float64


def test_anchor_memory_smoke(tmp_path):
    out = _run("anchor_memory", tmp_path)
    assert out["samples"] and all(s["match"] for s in out["samples"])  # measured == computed
    fractions = {(r["model"], r["variant"]): r["fraction_of_reference"] for r in out["results"]}
    assert all(f > 0 for f in fractions.values())
    assert fractions[("tiny-7B-like q/v", "reference dense C fp32")] == 1.0


def test_step_overhead_smoke(tmp_path):
    out = _run("step_overhead", tmp_path, "--profile")
    (r,) = out["results"]
    assert {"adamw", "anchored", "anchored_decoupled", "penalty_only"} <= set(r["stats"])
    assert r["targets"] == 4  # q_proj and v_proj of two layers
    assert (tmp_path / r["profile"]["file"]).exists()


def test_operator_cost_smoke(tmp_path):
    out = _run("operator_cost", tmp_path)
    (r,) = out["results"]
    assert r["lora_pairs"] == 4  # q_proj, v_proj of 2 layers
    assert set(r["stats"]) == {"adamw", "input_k4", "sum_k4", "spf_k4", "surgery_project", "surgery_refresh"}
    assert all(s["share_of_adamw_step"] > 0 for k, s in r["stats"].items() if k != "adamw")
