"""The Table-2 markdown table and the public JSON records, exactly."""

from __future__ import annotations

import json

from asft_optim.lab.report import (
    RECORD_KEYS,
    markdown_table,
    public_records,
    seed_table,
    write_report,
)


def _rec(method, p, seed, hs, fa):
    return {"method": method, "poison_ratio": p, "seed": seed, "harmful_score": hs, "finetune_accuracy": fa}


RECORDS = [
    _rec("aligned", None, 0, 2.0, 80.0),
    _rec("aligned", None, 1, 4.0, 82.0),
    _rec("sft", 0.0, 0, 10.0, 90.0),
    _rec("sft", 0.0, 1, 20.0, 92.0),
    _rec("sft", 0.1, 0, 50.0, 91.0),
    _rec("sft", 0.1, 1, 70.0, 89.0),
]


def test_markdown_table_exact():
    assert markdown_table(RECORDS) == (
        "| Method | HS p=0 | HS p=0.1 | HS avg | FA p=0 | FA p=0.1 | FA avg |\n"
        "|---|---|---|---|---|---|---|\n"
        "| aligned | 3.0 ± 1.4 | 3.0 ± 1.4 | 3.0 ± 1.4 | 81.0 ± 1.4 | 81.0 ± 1.4 | 81.0 ± 1.4 |\n"
        "| sft | 15.0 ± 7.1 | 60.0 ± 14.1 | 37.5 ± 10.6 | 91.0 ± 1.4 | 90.0 ± 1.4 | 90.5 ± 0.0 |\n"
    )


def test_seed_table_exact():
    records = RECORDS + [_rec("l2", 0.1, 0, 30.0, 70.5)]
    assert seed_table(records) == (
        "| Method | HS p=0 (seeds 0, 1) | FA p=0 (seeds 0, 1) | HS p=0.1 (seeds 0, 1) | FA p=0.1 (seeds 0, 1) |\n"
        "|---|---|---|---|---|\n"
        "| aligned | 2, 4 | 80, 82 | 2, 4 | 80, 82 |\n"
        "| sft | 10, 20 | 90, 92 | 50, 70 | 91, 89 |\n"
        "| l2 | –, – | –, – | 30, – | 70.5, – |\n"
    )


def test_write_report_files(tmp_path):
    detailed = [dict(r, _detail={"geometry": [{"cos_delta_v": -0.5, "off_span_fraction": 0.25, "delta_norm": 2.0}]})
                if r["method"] == "sft" else r for r in RECORDS]
    paths = write_report(detailed, tmp_path / "out", title="t", json_path=tmp_path / "user" / "r.json")
    public = json.loads(paths["json"].read_text())
    assert public == public_records(RECORDS) == json.loads((tmp_path / "user" / "r.json").read_text())
    assert all(tuple(r) == RECORD_KEYS for r in public)
    table = paths["table"].read_text()
    assert "| sft | 0.1 | -0.500 | 0.500 | 0.250 | 2.000 |" in table
    assert "## Per seed\n\n" + seed_table(RECORDS) in table
    for key in ("hs_plot", "fa_plot"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
