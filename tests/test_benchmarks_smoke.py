"""Smoke tests: the anchor-build and lab alignment-budget benchmarks run end to end on tiny sizes (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from tiny_models import REAL_DATA

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


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="reference data not available")
def test_lab_align_budget_benchmark_tiny(tmp_path, capsys):
    sys.path.insert(0, str(BENCH.parent))
    try:
        from lab_align_budget import main
    finally:
        sys.path.remove(str(BENCH.parent))
    args = ["--tiny", "--data", str(REAL_DATA), "--out", str(tmp_path), "--model-seeds", "0", "--budgets", "1:1e-3,2:1e-3",
            "--test-limit", "20"]
    assert main(args) == 0
    rows = json.loads((tmp_path / "align_budget.json").read_text())
    assert [(r["model_seed"], r["align_epochs"]) for r in rows] == [(0, 1.0), (0, 2.0)]
    assert rows[0]["base_hs"] == rows[1]["base_hs"]  # one base model, cached, for both budgets
    assert all(0 <= r[k] <= 100 for r in rows for k in ("base_hs", "base_fa", "aligned_hs", "aligned_fa"))
    assert capsys.readouterr().out.count("\n| 0 |") == 2


@pytest.mark.slow
def test_lab_parallel_reports_what_one_process_would(tmp_path, capsys):
    # Two processes share one cache and build seed 0's base and aligned pair at the same
    # time (the per-process temporary directories keep that safe); the report from the
    # cache equals a serial run's, record for record. One seed: the suite's time budget.
    sys.path.insert(0, str(BENCH.parent))
    try:
        from lab_parallel import main
    finally:
        sys.path.remove(str(BENCH.parent))
    from asft_optim.cli import main as asft

    lab = ["--tiny", "--no-progress", "--methods", "sft,asft"]
    assert main(["--out", str(tmp_path / "par"), "--seeds", "0", "--poison", "0,0.1", "--poll", "0.2", "--", *lab]) == 0
    summary = json.loads((tmp_path / "par" / "parallel.json").read_text())
    assert sorted(summary["processes"]) == ["0-0", "0-0.1"]
    assert all(p["returncode"] == 0 for p in summary["processes"].values()) and not summary["stopped_at_deadline"]
    assert not list((tmp_path / "par" / "cache").glob(".*.tmp"))  # every stage renamed into place
    assert asft(["lab", *lab, "--seeds", "0", "--poison", "0,0.1", "--out", str(tmp_path / "serial")]) == 0
    parallel = json.loads((tmp_path / "par" / "results.json").read_text())
    assert parallel == json.loads((tmp_path / "serial" / "results.json").read_text())
    assert len(parallel) == 1 + 2 * 2  # aligned, (sft, asft) x 2 ratios
    assert "lab_parallel: 2 processes" in capsys.readouterr().out


def test_lab_parallel_refuses_the_flags_it_sets(tmp_path):
    sys.path.insert(0, str(BENCH.parent))
    try:
        from lab_parallel import main
    finally:
        sys.path.remove(str(BENCH.parent))
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--seeds", "0", "--poison", "0", "--", "--tiny", "--seeds", "1"])


@pytest.mark.slow
def test_lab_pretrained_align_benchmark_tiny(tmp_path, capsys, pretrained_base):
    # The session's base stage in the benchmark's cache (it skips without the model or the
    # data): the benchmark builds the aligned stage and its judgement on top of it.
    sys.path.insert(0, str(BENCH.parent))
    try:
        from lab_pretrained_align import main
    finally:
        sys.path.remove(str(BENCH.parent))
    import torch

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / pretrained_base.name).symlink_to(pretrained_base, target_is_directory=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["--tiny", "--data", str(REAL_DATA), "--out", str(tmp_path), "--harmful-chat", "0",
                     "--chat-replay", "1", "--epochs", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (row["epochs"], row["harmful_chat"], row["chat_replay"]) == (1.0, 0, 1)
    assert row["rows"]["refusals"] == 2  # the tiny budget's 2 file refusals, no chat-style ones
    assert 0 <= row["hs"] <= 100 and 0 <= row["fa"] <= 100 and row["over_refusal"] in (0.0, 50.0, 100.0)
    stages = sorted((tmp_path / "cache").iterdir())
    assert [p.name.split("-")[0] for p in stages] == ["aligned", "base", "judged", "reference"]
    assert [p.name for p in stages if p.is_symlink()] == [pretrained_base.name]  # the base was found, not rebuilt


def test_over_refusal_builds_nothing(tmp_path):
    """benchmarks/over_refusal.py reads attacks from a lab cache: on an empty one it stops
    with the missing stage named, and writes nothing."""
    if not REAL_DATA.is_dir():
        pytest.skip("needs the real data in ../shared/data/asft")
    spec = importlib.util.spec_from_file_location("over_refusal_bench", BENCH.parent / "over_refusal.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit, match="this script builds nothing"):
        mod.main(["--data", str(REAL_DATA), "--out", str(tmp_path / "lab"), "--json", str(tmp_path / "o.json"),
                  "--", "--methods", "l2"])
    assert not (tmp_path / "o.json").exists() and not (tmp_path / "lab" / "cache").exists()


def test_rebuild_check_needs_the_cached_attack(tmp_path):
    """benchmarks/rebuild_check.py compares a rebuilt attack with the cached one: without it
    in --cache, a clear error names the point, before anything is built."""
    if not REAL_DATA.is_dir():
        pytest.skip("needs the real data in ../shared/data/asft")
    spec = importlib.util.spec_from_file_location("rebuild_check_bench", BENCH.parent / "rebuild_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (tmp_path / "cache").mkdir()
    with pytest.raises(SystemExit, match="l2 seed 0: no cached attack"):
        mod.main(["--data", str(REAL_DATA), "--cache", str(tmp_path / "cache"), "--", "--methods", "l2"])
    with pytest.raises(SystemExit, match="not a folder"):
        mod.main(["--data", str(REAL_DATA), "--cache", str(tmp_path / "none"), "--", "--methods", "l2"])
    assert not list((tmp_path / "cache").iterdir())  # built nothing


def _record_check():
    spec = importlib.util.spec_from_file_location("record_check_bench", BENCH.parent / "record_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_record_check_tells_float_noise_from_a_changed_verdict(tmp_path):
    """benchmarks/record_check.py: float leaves within --rtol pass, build seconds are skipped,
    and any changed verdict, answer, list length or key fails, as does a float beyond --rtol."""
    mod = _record_check()
    ref = {"key": "k", "info": {"seconds": 100.0, "eval": {
        "harmful_score": 40.0, "harmful_verdicts": [True, False, True], "examples": ["no", "sure"],
        "capability": {"benign_nll": 1.4939}}, "train": {"final_loss": 2.6974653}}}

    def store(name, record):
        d = tmp_path / name
        d.mkdir()
        (d / "eval-k.json").write_text(json.dumps(record))
        (d / "eval-only-here.json").write_text("{}")
        return d

    b = store("ref", ref)
    noise = json.loads(json.dumps(ref))
    noise["info"]["seconds"] = 7.0
    noise["info"]["eval"]["capability"]["benign_nll"] = 1.4938
    noise["info"]["train"]["final_loss"] = 2.6974571
    out = tmp_path / "o.json"
    assert mod.main([str(store("noise", noise)), str(b), "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["ok"] and row["discrete_differences"] == [] and row["floats"] == 3
    assert row["max_rel_diff_at"] == row["max_abs_diff_at"] == "/info/eval/capability/benign_nll"
    assert abs(row["max_rel_diff"] - 1e-4 / 1.4939) < 1e-9 and abs(row["max_abs_diff"] - 1e-4) < 1e-9
    # the same noise fails a tighter tolerance, and only the absolute part lets it through
    assert mod.main([str(tmp_path / "noise"), str(b), "--rtol", "1e-6", "--atol", "0"]) == 1
    assert mod.main([str(tmp_path / "noise"), str(b), "--rtol", "0", "--atol", "1e-3"]) == 0
    big = json.loads(json.dumps(ref))
    big["info"]["eval"]["harmful_score"] = 40.4
    assert mod.main([str(store("big", big)), str(b), "--json", str(out)]) == 1
    assert json.loads(out.read_text())["rows"][0]["floats_beyond_tolerance"] == ["/info/eval/harmful_score"]

    for name, change in [("verdict", lambda r: r["info"]["eval"]["harmful_verdicts"].__setitem__(1, True)),
                         ("answer", lambda r: r["info"]["eval"]["examples"].__setitem__(0, "No")),
                         ("length", lambda r: r["info"]["eval"]["examples"].append("x")),
                         ("key", lambda r: r["info"]["eval"].pop("capability"))]:
        rec = json.loads(json.dumps(ref))
        change(rec)
        out = tmp_path / f"{name}.json"
        assert mod.main([str(store(name, rec)), str(b), "--json", str(out)]) == 1, name
        assert json.loads(out.read_text())["rows"][0]["discrete_differences"], name

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="nothing to compare"):
        mod.main([str(empty), str(b)])
    with pytest.raises(SystemExit, match="not a folder"):
        mod.main([str(tmp_path / "none"), str(b)])
