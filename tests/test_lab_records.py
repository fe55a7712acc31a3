"""Per-point records: the vectors the verdict resamples, and the record store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from asft_optim.cli import main


def _lab(out: Path, *extra: str) -> list[dict]:
    assert main(["lab", "--tiny", "--no-progress", "--out", str(out), *extra]) == 0
    return json.loads((out / "details.json").read_text())


GRID = ("--methods", "sft,asft", "--poison", "0.1", "--seeds", "0")


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> tuple[Path, list[dict]]:
    """One tiny lab run of :data:`GRID` writing its point records, shared by the module's
    tests: ``(root, details)``, the run in ``root / "a"``, the records in ``root / "points"``.
    A test copies them (:func:`_copy`) before it writes there."""
    root = tmp_path_factory.mktemp("records")
    return root, _lab(root / "a", *GRID, "--records", str(root / "points"))


def _copy(grid, tmp_path: Path) -> Path:
    """The shared run's folder and records copied to ``tmp_path / "a"`` and ``tmp_path / "points"``; the records."""
    root, _ = grid
    shutil.copytree(root / "a", tmp_path / "a", symlinks=True)
    return Path(shutil.copytree(root / "points", tmp_path / "points"))


def test_each_point_stores_its_verdicts_correctness_and_capability(grid):
    from asft_optim.lab.config import tiny_config

    _, details = grid
    world = tiny_config().world
    assert [r["method"] for r in details] == ["aligned", "sft", "asft"]
    for r in details:
        hv, tc = r["harmful_verdicts"], r["task_correct"]
        assert len(hv) == world.eval_prompts and len(tc) == world.test_task and set(hv + tc) <= {"0", "1"}
        # The scores are the vectors' shares, exactly.
        assert r["harmful_score"] == 100.0 * hv.count("1") / len(hv)
        assert r["finetune_accuracy"] == 100.0 * tc.count("1") / len(tc)
        assert r["capability"]["answers"] == len(hv) and 0 <= r["capability"]["degenerate_share"] <= 1


def _stages(out: Path) -> set[str]:
    cache = out / "cache"
    return {p.name for p in cache.iterdir() if (p / "done.json").exists()} if cache.is_dir() else set()


def test_a_report_rebuilt_from_the_records_equals_the_one_from_the_cache(grid, tmp_path):
    records, first = _copy(grid, tmp_path), grid[1]
    names = sorted(p.name for p in records.iterdir())
    # One file per point, named by its stage key: the base's and aligned model's own
    # evaluations and the two attacked points; no temporary file left behind.
    assert [n.split("-")[0] for n in names] == ["aligned", "base", "eval", "eval"]
    assert all(n.endswith(".json") and not n.startswith(".") for n in names)
    rec = json.loads((records / names[-1]).read_text())
    assert rec["kind"] == "eval" and rec["lab_version"] == 1 and rec["meta"]["poison"] == 0.1
    assert rec["info"]["eval"]["harmful_verdicts"] and rec["info"]["eval"]["task_correct"]
    # A bare machine: no cache. --cached-only reports from the records alone, the same report.
    again = _lab(tmp_path / "b", *GRID, "--records", str(records), "--cached-only")
    assert again == first
    for name in ("table.md", "results.json", "details.json"):
        assert (tmp_path / "b" / name).read_text() == (tmp_path / "a" / name).read_text(), name
    assert json.loads((tmp_path / "b" / "run.json").read_text())["recorded_stages"] == 4
    # Without --cached-only, the points in the records are not built again, nor their models.
    assert _lab(tmp_path / "c", *GRID, "--records", str(records)) == first
    assert _stages(tmp_path / "c") == set()


def test_plan_counts_what_the_records_lack(grid, tmp_path):
    records = _copy(grid, tmp_path)
    out = tmp_path / "fresh"
    assert main(["lab", "--tiny", "--no-progress", "--plan", "--out", str(out), *GRID, "--records", str(records)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["to_build"] == 0 and plan["recorded"] == 4
    assert plan["recorded_per_kind"] == {"aligned": 1, "base": 1, "eval": 2}
    # One more ratio: its attack and evaluation, and the models they need (no cache here).
    assert main(["lab", "--tiny", "--no-progress", "--plan", "--out", str(out), "--methods", "sft,asft",
                 "--poison", "0.1,0.2", "--seeds", "0", "--records", str(records)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    rows = {r["kind"]: r["to_build"] for r in plan["stages"]}
    assert rows == {"tokenizer": 1, "base": 1, "aligned": 1, "attack": 2, "eval": 2} and plan["recorded"] == 4
    assert not records.joinpath("x").exists() and len(list(records.iterdir())) == 4  # --plan writes nothing


def test_records_of_another_code_version_or_setting_are_refused(grid, tmp_path):
    records = _copy(grid, tmp_path)
    evals = sorted(records.glob("eval-*.json"))
    old = json.loads(evals[0].read_text())
    evals[0].write_text(json.dumps({**old, "lab_version": 0}))
    other = json.loads(evals[1].read_text())
    evals[1].write_text(json.dumps({**other, "setting": "0123456789abcdef"}))
    with pytest.raises(SystemExit, match="no grid point of this command is in .* or in the records"):
        _lab(tmp_path / "b", *GRID, "--records", str(records), "--cached-only")
    # With one good point the report is written: the refused ones are named, never averaged in.
    evals[1].write_text(json.dumps(other))
    details = _lab(tmp_path / "b", *GRID, "--records", str(records), "--cached-only")
    assert [r["method"] for r in details] == ["aligned", other["meta"]["method"]]
    table = (tmp_path / "b" / "table.md").read_text()
    assert f"- {evals[0].name}: refused, another code version (lab 0, this lab 1)" in table
    assert "1 of another code version" in table
    not_run = json.loads((tmp_path / "b" / "run.json").read_text())["not_run"]
    # A bare machine: nothing cached, so the refused point misses its first stage.
    assert [(m["method"], m["missing_stage"]) for m in not_run] == [(old["meta"]["method"], "tokenizer")]


def test_a_killed_run_keeps_every_finished_point(tmp_path, monkeypatch):
    from dataclasses import replace

    from asft_optim.lab import runner
    from asft_optim.lab.config import tiny_config
    from asft_optim.lab.runner import Lab
    from asft_optim.lab.world import World

    cfg = replace(tiny_config(), methods=("sft", "asft"), poisons=(0.1,))
    real, calls = runner.train_attack, []

    def dies_on_the_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the machine goes away mid-attack
        return real(*a, **k)

    monkeypatch.setattr(runner, "train_attack", dies_on_the_second)
    records = tmp_path / "points"
    with pytest.raises(KeyboardInterrupt):
        Lab(cfg, World(cfg.world).data(), tmp_path / "run", progress=False, records=records).run()
    kept = sorted(json.loads(p.read_text())["meta"].get("method", "model") for p in records.glob("*.json"))
    assert kept == ["model", "model", "sft"] and not list(records.glob(".*"))


def test_records_dir_must_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        from asft_optim.lab.records import RecordStore

        RecordStore(tmp_path / "file", 1, {})


def test_a_refused_record_is_replaced_when_its_point_is_built(grid, tmp_path):
    records = _copy(grid, tmp_path)
    path = sorted(records.glob("eval-*.json"))[0]
    good = json.loads(path.read_text())
    path.write_text(json.dumps({**good, "lab_version": 0}))
    # The cache still holds the point: a run reads it there and writes a good record back.
    _lab(tmp_path / "a", *GRID, "--records", str(records))
    assert json.loads(path.read_text()) == good


def test_a_kind_with_its_own_setting_is_shared_by_two_evaluation_settings(tmp_path):
    """A record kind whose numbers do not depend on the evaluation set (the per-point
    over-refusal) is stamped with its own setting: a store of another evaluation set reads
    it and never overwrites it, while its other kinds stay apart; the folder scan counts it usable."""
    from asft_optim.lab.records import RecordStore

    own = {"overrefusal": {"lab_version": 1, "device": "cpu", "kind": "overrefusal"}}
    a = RecordStore(tmp_path, 1, {"test": "A"}, own)
    b = RecordStore(tmp_path, 1, {"test": "B"}, own)
    a.put("overrefusal", "k1", {"over_refusal": 12.5})
    a.put("eval", "k2", {"harmful_score": 1.0})
    assert b.get("overrefusal", "k1") == {"over_refusal": 12.5} and b.has("overrefusal", "k1")
    assert b.get("eval", "k2") is None and b.refused == [("eval-k2.json", "another evaluation setting")]
    assert b.scan() == {"usable": 1, "other_version": 0, "other_setting": 1, "unreadable": 0}
    # Without the kind's own setting, the same file is another setting's.
    plain = RecordStore(tmp_path, 1, {"test": "B"})
    assert plain.get("overrefusal", "k1") is None
    assert json.loads((tmp_path / "overrefusal-k1.json").read_text())["setting_detail"] == own["overrefusal"]
