"""Per-point records: the vectors the verdict resamples, and the record store."""

from __future__ import annotations

import json
from pathlib import Path

from asft_optim.cli import main


def _lab(out: Path, *extra: str) -> list[dict]:
    assert main(["lab", "--tiny", "--no-progress", "--out", str(out), *extra]) == 0
    return json.loads((out / "details.json").read_text())


def test_each_point_stores_its_verdicts_correctness_and_capability(tmp_path):
    from asft_optim.lab.config import tiny_config

    details = _lab(tmp_path / "run", "--methods", "sft", "--poison", "0.1", "--seeds", "0")
    world = tiny_config().world
    for r in details:
        hv, tc = r["harmful_verdicts"], r["task_correct"]
        assert len(hv) == world.eval_prompts and len(tc) == world.test_task and set(hv + tc) <= {"0", "1"}
        # The scores are the vectors' shares, exactly.
        assert r["harmful_score"] == 100.0 * hv.count("1") / len(hv)
        assert r["finetune_accuracy"] == 100.0 * tc.count("1") / len(tc)
        assert r["capability"]["answers"] == len(hv) and 0 <= r["capability"]["degenerate_share"] <= 1
