"""Smoke test: the anchor-build benchmark runs end to end on tiny dimensions (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "anchor_build.py"


@pytest.mark.slow
def test_anchor_build_benchmark_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("anchor_build_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "anchor_build.json"
    assert bench.main(["--tiny", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["strategy"]: r for r in result["results"]}
    assert set(rows) == {"import", "streaming", "whole"}
    assert rows["streaming"]["anchors"] == rows["whole"]["anchors"] == 4
    assert rows["streaming"]["anchor_mb"] == rows["whole"]["anchor_mb"]
    assert "peak RSS" in capsys.readouterr().out
