"""benchmarks/judge_tokens.py's bookkeeping: the share of changed verdicts and the length chosen
(the generation itself runs on the pretrained model, in the benchmark)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "judge_tokens.py"


def _bench():
    spec = importlib.util.spec_from_file_location("judge_tokens_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(seed, changed):
    return {"reference_tokens": 48, "models": [{"seed": seed, "prompts": 250, "changed": changed, "hs": {}}]}


def test_merge_sums_the_changed_verdicts_and_picks_the_shortest_length_under_one_percent(tmp_path):
    bench = _bench()
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    # 8 tokens: 30 of 500 changed (6 %); 16: 5 of 500 (1.0 %, not under); 24: 2 (0.4 %); 32: 0.
    a.write_text(json.dumps(_run(0, {"8": 20, "16": 3, "24": 1, "32": 0})))
    b.write_text(json.dumps(_run(1, {"8": 10, "16": 2, "24": 1, "32": 0})))
    out = tmp_path / "study.json"
    assert bench.main(["--merge", str(a), str(b), "--json", str(out)]) == 0
    study = json.loads(out.read_text())
    assert study["changed_vs_reference"]["8"] == {"changed": 30, "of": 500, "percent": 6.0}
    assert study["changed_vs_reference"]["16"]["percent"] == 1.0
    assert study["shortest_under_1_percent"] == 24 and len(study["models"]) == 2


def test_merge_refuses_runs_of_two_reference_lengths(tmp_path):
    bench = _bench()
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_run(0, {"16": 0})))
    b.write_text(json.dumps(dict(_run(1, {"16": 0}), reference_tokens=32)))
    with pytest.raises(SystemExit, match="different --max-tokens"):
        bench.main(["--merge", str(a), str(b), "--json", str(tmp_path / "o.json")])
