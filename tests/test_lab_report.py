"""The Table-2 markdown table and the public JSON records, exactly."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


def test_markdown_table_names_the_seed_count_of_a_thinner_cell():
    records = RECORDS + [_rec("l2", 0.1, 0, 30.0, 70.5)]
    assert markdown_table(records).splitlines()[-1] == (
        "| l2 | – | 30.0 ± 0.0 (n=1) | 30.0 ± 0.0 | – | 70.5 ± 0.0 (n=1) | 70.5 ± 0.0 |")
    assert "(n=" not in markdown_table(RECORDS)  # every cell over both seeds


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


# -- safety at equal task accuracy -----------------------------------------------------

def _swept(method, field, value, p, seed, hs, fa):
    label = method if field is None else f"{method} {field}={value:g}"
    variant = {"method": method} if field is None else {"method": method, "field": field, "value": value}
    return {**_rec(label, p, seed, hs, fa), "variant": variant}


SWEEP = [
    _rec("aligned", None, 0, 13.0, 21.0),
    _rec("aligned", None, 1, 13.0, 21.0),
    _swept("sft", None, None, 0.1, 0, 80.0, 70.0),
    _swept("sft", None, None, 0.1, 1, 60.0, 66.0),
    _swept("l2", "l2_lambda", 0.01, 0.1, 0, 50.0, 60.0),
    _swept("l2", "l2_lambda", 0.01, 0.1, 1, 40.0, 52.0),
    _swept("l2", "l2_lambda", 0.1, 0.1, 0, 20.0, 44.0),
    _swept("l2", "l2_lambda", 0.1, 0.1, 1, 22.0, 42.0),
    # An attacker-side point: another attacker, not a setting of l2; it must not count.
    _swept("l2", "lr", 0.0004, 0.1, 0, 1.0, 99.0),
    _swept("l2", "lr", 0.0004, 0.1, 1, 1.0, 99.0),
]


def test_matched_fa_table_exact():
    from asft_optim.lab.report import matched_fa_table

    assert matched_fa_table(SWEEP, levels=(40.0, 50.0, 60.0, 90.0)) == (
        "p = 0.1:\n\n"
        "| Method | FA ≥ 40 | FA ≥ 50 | FA ≥ 60 |\n"
        "|---|---|---|---|\n"
        # sft: one setting (no bracket); seed-mean point (68, 70).
        "| sft | 70.0 (80, 60) | 70.0 (80, 60) | 70.0 (80, 60) |\n"
        # l2 at FA ≥ 40: λ = 0.1 (mean FA 43, HS 21); seed-wise 20 and 22. At FA ≥ 50 only
        # λ = 0.01 reaches (mean 56, HS 45); seed 1's λ = 0.01 point has FA 52, its own 40.
        # At FA ≥ 60 no mean point of l2 reaches, though seed 0's does (HS 50).
        "| l2 | 21.0 [l2_lambda=0.1] (20, 22) | 45.0 [l2_lambda=0.01] (50, 40) | – |\n"
    )


def test_matched_fa_table_leaves_out_levels_no_one_reaches_and_empty_grids():
    from asft_optim.lab.report import matched_fa_table

    assert matched_fa_table(SWEEP, levels=(95.0,)) == ""
    assert matched_fa_table(SWEEP[:2]) == ""  # the aligned model alone: nothing attacked


@given(
    st.lists(st.tuples(st.integers(0, 100), st.integers(0, 100)), min_size=1, max_size=12),
    st.integers(0, 100),
)
def test_safest_at_reads_the_pareto_front(points, level):
    # Oracle: the Pareto front sorted by FA has HS rising with FA; the safest point with FA
    # at least ``level`` is the front's first point at or past that level.
    from asft_optim.lab.report import pareto_front, safest_at

    pts = [(float(fa), float(hs), f"s{i}") for i, (fa, hs) in enumerate(points)]
    got = safest_at(pts, float(level))
    front = [pt for pt in pareto_front([(fa, hs) for fa, hs, _ in pts]) if pt[0] >= level]
    if not front:
        assert got is None
        return
    assert got is not None and got[0] == front[0][1]
    fa_of = {label: fa for fa, _, label in pts}
    assert fa_of[got[1]] >= level and (fa_of[got[1]], got[0]) == front[0]


# -- the verdict, and the capability guard -----------------------------------------------

def _vec(method, field, value, seed, harmful, correct, broken=False):
    """A record with per-prompt verdicts and per-row correctness (strings of 0/1)."""
    rec = _swept(method, field, value, 0.1, seed, 100.0 * harmful.count("1") / len(harmful),
                 100.0 * correct.count("1") / len(correct))
    return {**rec, "harmful_verdicts": harmful, "task_correct": correct,
            "capability": {"degenerate_share": 1.0 if broken else 0.0, "answers": len(harmful), "broken": broken}}


VERDICT = [
    _rec("aligned", None, 0, 13.0, 21.0),
    # l2, seeds 0 and 1: (FA, HS) = (25, 50), (75, 100); x: (25, 25), (75, 75), a shift of -25.
    *[_vec("l2", "l2_lambda", lam, s, h, c) for s in (0, 1)
      for lam, h, c in ((1.0, "1100", "1000"), (0.01, "1111", "1110"))],
    *[_vec("x", "l2_lambda", lam, s, h, c) for s in (0, 1)
      for lam, h, c in ((1.0, "1000", "1000"), (0.01, "1110", "1110"))],
    # A broken point with HS 0 inside x's range: were it counted, x at FA 50 would be safer still.
    _vec("x", "l2_lambda", 0.1, 0, "0000", "1100", broken=True),
    _swept("x", "lr", 0.01, 0.1, 0, 0.0, 50.0),  # attacker-side: never in the verdict
]


def test_verdict_section_reads_the_vectors_and_leaves_broken_points_out():
    from asft_optim.lab.report import verdict_section
    from asft_optim.lab.verdict import Point, paired_differences, per_seed_table, verdict_table

    text = verdict_section(VERDICT, levels=(50.0, 90.0), replicates=300)
    points = [Point(r["variant"]["method"], r["seed"], r["harmful_verdicts"], r["task_correct"])
              for r in VERDICT if "harmful_verdicts" in r and not r["capability"]["broken"]]
    diffs = paired_differences(points, (50.0, 90.0), replicates=300)
    assert diffs[0].mean == -25.0 and not diffs[1].reached
    # l2's own curve, (25, 50) to (75, 100) on both seeds: HS 75 at FA 50; no aligned verdicts here.
    line = "\nl2's own HS on its curve, mean over the seeds that reach each level: FA 50: 75.0 (2 seeds); FA 90: not reached.\n"
    per_seed = ("\nEach seed's own difference, of which each cell above is the mean (whether many seeds agree or "
                "one drives it):\n\n" + per_seed_table(diffs))
    assert text.startswith("p = 0.1:\n\n" + verdict_table(diffs) + line + per_seed + "\nEach setting at its own FA")
    assert "| x | 50 | seed 0: " in per_seed and "| x | 90 |" not in per_seed
    # With the aligned model's verdicts (one model serving both seeds: counted once).
    aligned = [{**_rec("aligned", None, s, 25.0, 21.0), "harmful_verdicts": "1000", "task_correct": "1000"}
               for s in (0, 1)]
    text = verdict_section(aligned + VERDICT[1:], levels=(50.0, 90.0), replicates=30)
    assert line.replace("reached.", "reached. The aligned model's: 25.0.") in text
    assert text.endswith("\nLeft out, broken (more than 25 % of answers empty or degenerate): x l2_lambda=0.1 seed 0.\n")
    assert "| x | " in text and "not reached" in text


def test_each_setting_is_read_at_its_own_fa():
    """safegrad-like: one point per seed per setting at FA 75, beyond every fixed level
    asked; the section adds each setting's reading at its own FA (here HS 25 against l2's 100
    at FA 75: -75), and x's settings' too (x is l2 shifted by -25: -25 at FA 25 and 75)."""
    from asft_optim.lab.report import verdict_section

    one = [_vec("y", "safegrad_weight", mu, s, "1000", "1101") for s in (0, 1) for mu in (0.0, 1.0)]
    text = verdict_section(VERDICT + one, levels=(50.0,), replicates=300)
    head = "Each setting at its own FA"
    assert head in text
    own = text.split(head)[1].splitlines()
    rows = [line for line in own if line.startswith("| y ")]
    assert len(rows) == 2 and all("-75.0" in r and "2 seeds" in r for r in rows)
    rows = [line for line in own if line.startswith("| x ")]
    assert len(rows) == 2 and all("-25.0" in r and "2 seeds" in r for r in rows)  # the broken one left out
    only_l2 = [r for r in VERDICT if not r["method"].startswith("x")]
    assert head not in verdict_section(only_l2, levels=(50.0,), replicates=50)


def test_sft_ends_l2s_curve():
    """l2 at λ = 0 is sft: sft's point extends l2's curve, and sft gets no row of its own.
    Here l2 spans FA 25-75 on both seeds; sft at FA 100 (HS 100) lets x's point at FA 100
    (HS 50) be read: -50."""
    from asft_optim.lab.report import verdict_section

    sft = [_vec("sft", None, None, s, "1111", "1111") for s in (0, 1)]
    z = [_vec("z", "safegrad_weight", 1.0, s, "1100", "1111") for s in (0, 1)]
    text = verdict_section(VERDICT + z, levels=(50.0,), replicates=100)
    assert "| z " in text and "not reached" in text.split("| z ")[1].splitlines()[0]
    text = verdict_section(VERDICT + sft + z, levels=(50.0,), replicates=100)
    assert "l2's curve ends at its strength 0, sft" in text
    assert not any(line.startswith("| sft") for line in text.splitlines())
    row = [line for line in text.splitlines() if line.startswith("| z ")][-1]  # the own-FA table's
    assert "-50.0" in row and "2 seeds" in row


def _cfg(rec, **config):
    return {**rec, "config": config}


def test_safegrad_ends_safegrad_l2s_curve_at_the_same_settings_only():
    """CURVE_ENDS: safegrad-l2 at λ = 0 is safegrad at the same μ. safegrad-l2 (μ 0.3) at
    (FA, HS) (25, 25) and (50, 25); safegrad μ = 0.3 at (100, 25) ends its curve, so at FA 75
    it reads 25 against l2's 100: -75. safegrad μ = 1 at (75, 0) must not join (were it
    joined, FA 75 would read 0 - 100 = -100)."""
    from asft_optim.lab.report import curve_ends, fixed_settings_text, verdict_section

    rest = {"safegrad_weight": 0.3, "safegrad_every": 1}
    ours = [_cfg(_vec("safegrad-l2", "l2_lambda", lam, s, "1000", c), l2_lambda=lam, **rest)
            for s in (0, 1) for lam, c in ((1.0, "1000"), (0.1, "1100"))]
    ends = [_cfg(_vec("safegrad", "safegrad_weight", mu, s, h, c), safegrad_weight=mu, safegrad_every=1)
            for s in (0, 1) for mu, h, c in ((0.3, "1000", "1111"), (1.0, "0000", "1110"))]
    base = [r for r in VERDICT if not r["method"].startswith("x")]
    text = verdict_section(base + ours, levels=(75.0,), replicates=100)
    assert "| safegrad-l2 | not reached" in text  # no end: its curve stops at FA 50
    text = verdict_section(base + ours + ends, levels=(75.0,), replicates=100)
    row = next(line for line in text.splitlines() if line.startswith("| safegrad-l2 |"))
    assert "-75.0" in row and "2 seeds" in row
    assert ("safegrad-l2's curve ends at its l2_lambda = 0, which is safegrad safegrad_weight=0.3 "
            "(the same training; the same seed's point); that point keeps its own row.") in text
    # safegrad keeps its own row (its μ sweep is its own curve), and in the own-FA table no
    # "(end of ...)" copy appears.
    assert any(line.startswith("| safegrad |") for line in text.splitlines())
    assert "end of" not in text.split("Each setting at its own FA")[1]
    points, said = curve_ends(ends)  # no safegrad-l2 point: nothing to end
    assert points == [] and said == []
    # Records without config (written before the lab kept it) join nothing.
    bare = [{k: v for k, v in r.items() if k != "config"} for r in ends]
    assert curve_ends(ours + bare) == ([], [])
    # Two settings besides λ on one seed are two curves: refused, not merged.
    other = _cfg(_vec("safegrad-l2", "l2_lambda", 0.3, 0, "1000", "1100"), l2_lambda=0.3,
                 safegrad_weight=1.0, safegrad_every=1)
    with pytest.raises(ValueError, match="2 settings besides l2_lambda"):
        verdict_section(base + ours + ends + [other], levels=(75.0,), replicates=10)
    fixed = fixed_settings_text(ours + ends)
    assert "- safegrad-l2: safegrad_weight=0.3, safegrad_every=1" in fixed
    assert "- safegrad: safegrad_every=1" in fixed


def test_verdict_section_without_vectors_says_so_and_refuses_mixed_settings():
    import pytest

    from asft_optim.lab.report import verdict_section

    assert verdict_section(SWEEP) == (
        "p = 0.1: 6 of 6 points have no per-prompt verdicts (evaluated before the lab stored them): "
        "no interval can be computed.\n")
    mixed = [dict(r, setting="a") for r in VERDICT[:3]] + [dict(r, setting="b") for r in VERDICT[3:]]
    with pytest.raises(ValueError, match="one verdict averages one setting only"):
        verdict_section(mixed)


def test_broken_points_are_marked_and_kept_off_the_fronts(tmp_path):
    from asft_optim.lab.report import broken_points, matched_fa_table

    records = [_vec("sft", None, None, 0, "0000", "1111", broken=True), _vec("sft", None, None, 1, "1111", "1100"),
               _vec("l2", "l2_lambda", 0.1, 0, "1000", "1100")]
    assert broken_points(records) == {("sft", 0.1, 0)}
    # sft's broken seed (HS 0, FA 100) is not its front: only seed 1's point (50, 100).
    assert "| sft | 100.0 (–, 100) |" in matched_fa_table(records, levels=(50.0,))
    paths = write_report(records, tmp_path, title="t")
    table = paths["table"].read_text()
    assert "| sft | 50.0 ± 70.7 † |" in table
    assert "## Broken models" in table and "- sft p=0.1 seed 0: 100 % degenerate answers" in table


def _fake_lab(fronts: bool, not_run=()):
    from types import SimpleNamespace

    return SimpleNamespace(
        report_fronts=fronts, records=None, not_run=list(not_run), stage_seconds={("attack", "k"): 2.0},
        timings={"attack": 2.0}, recorded={}, over_refusals=lambda: ["- base: 5.0 % of 20 held-out benign prompts refused"],
        base_evals=lambda: [_rec("base", None, 0, 60.0, 30.0)])


def test_write_lab_report_writes_the_run_and_the_fronts_only_for_a_swept_grid(tmp_path):
    import pytest

    from asft_optim.lab.report import compute_text, write_lab_report

    missing = [{"seed": 1, "method": "l2", "poison_ratio": 0.1, "missing_stage": "attack"}]
    paths, wall = write_lab_report(_fake_lab(False, missing), SWEEP, tmp_path / "plain", title="t", device="cpu",
                                   config="CFG", started=None)
    table = paths["table"].read_text()
    assert "\nDevice: cpu.\n" in table and "- seed 0: HS 60.0, FA 30.0" in table
    assert "## Over-refusal" in table and "- seed 1: l2 p=0.1 (no attack stage)" in table
    assert "Verdict" not in table and "Safety at equal task accuracy" not in table
    assert not any(k.startswith("pareto") for k in paths)
    run = json.loads((tmp_path / "plain" / "run.json").read_text())
    assert run["device"] == "cpu" and run["config"] == "'CFG'" and run["not_run"] == missing
    assert run["used_stage_seconds"] == 2.0 and wall == 0.0 and run["wall_seconds"] == 0.0
    assert compute_text(_fake_lab(False)) == "2 s to build (1 stages)"

    paths, _ = write_lab_report(_fake_lab(True), SWEEP, tmp_path / "swept", title="t", device="cpu", config="CFG")
    table = paths["table"].read_text()
    assert "## Verdict: safer than L2 at equal task accuracy?" in table
    assert "## Safety at equal task accuracy (the Pareto fronts as numbers)" in table
    assert paths["pareto_0.1"].stat().st_size > 0
    mixed = [dict(r, setting="a") for r in VERDICT[:3]] + [dict(r, setting="b") for r in VERDICT[3:]]
    with pytest.raises(ValueError, match="one verdict averages one setting only"):
        write_lab_report(_fake_lab(True), mixed, tmp_path / "mixed", title="t", device="cpu", config="CFG")


def test_capability_table_averages_the_nll_over_seeds_and_is_absent_without_it():
    from asft_optim.lab.report import capability_table

    def rec(method, seed, nll, share):
        return {"method": method, "poison_ratio": 0.1, "seed": seed,
                "capability": {"benign_nll": nll, "degenerate_share": share, "broken": False}}

    table = capability_table([rec("sft", 0, 1.0, 0.0), rec("sft", 1, 2.0, 0.1), rec("l2", 0, 0.5, 0.0)])
    assert "| sft | 0.1 | 1.500 | 5.0 | 2 |" in table and "| l2 | 0.1 | 0.500 | 0.0 | 1 |" in table
    assert capability_table([{"method": "sft", "poison_ratio": 0.1, "seed": 0, "capability": {"broken": False}}]) == ""


def test_over_refusal_section_means_intervals_and_the_paired_table():
    """Records with per-request refusals: the mean over seeds with Student's interval
    (hand-computed: 25 and 75 % over 2 seeds, mean 50, half-width 12.706·35.36/√2 ≈ 317.7,
    clipped to [0, 100]), and the verdict's estimator on the refusals: y refuses "1111"
    where l2 refuses "0000" at the same FA: +100, "refuses more"."""
    from asft_optim.lab.report import over_refusal_section

    assert over_refusal_section(VERDICT) == ""  # no record holds refusals
    refusing = [{**r, "refused": "0000", "over_refusal": 0.0} for r in VERDICT if r["method"].startswith("l2")]
    refusing += [{**_vec("y", "l2_lambda", lam, s, h, c), "refused": "1111", "over_refusal": 100.0}
                 for s in (0, 1) for lam, h, c in ((1.0, "1100", "1000"), (0.01, "1111", "1110"))]
    refusing += [{**_rec("aligned", None, s, 13.0, 21.0), "refused": ref, "over_refusal": 25.0 * ref.count("1")}
                 for s, ref in ((0, "1000"), (1, "1110"))]
    text = over_refusal_section(refusing, replicates=100)
    # 4 requests: all in the harm-worded half (the first 48), none everyday.
    assert "| aligned |  | 4 | 50.0 | [0.0, 100.0] | 2 | 50.0 | – |" in text
    # One aligned model serving both seeds (one stage key) is one model, not two seeds; a
    # broken point (its empty answers refuse nothing) is left out.
    shared = [{**r, "refusal_key": "k", "refused": "1000", "over_refusal": 25.0} if r["method"] == "aligned" else r
              for r in refusing]
    broken = {**_vec("w", "l2_lambda", 1.0, 0, "0000", "1000", broken=True), "refused": "0000", "over_refusal": 0.0}
    text2 = over_refusal_section(shared + [broken], replicates=20)
    assert "| aligned |  | 4 | 25.0 | – | 1 |" in text2 and "| w " not in text2
    assert "| l2 l2_lambda=1 | 0.1 | 4 | 0.0 | [0.0, 0.0] | 2 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| y |"))
    assert "+100.0" in row and "refuses more" in row and "OR − OR(l2) at FA = 40" in text
    assert "safer" not in text.split("Over-refusal (OR) against l2")[1]

    assert "everyday requests alone" not in text  # 4 requests: no everyday half
    # With an everyday half, its own paired table: y refuses every harm-worded request and no
    # everyday one, so its everyday OR − OR(l2) is 0 where the whole is above it.
    halves = [{**r, "refused": r["refused"] * 12 + "00"} for r in refusing]
    halves = [{**r, "refused": r["refused"][:48] + ("11" if r["method"].startswith("l2") else "00")}
              for r in halves]
    text3 = over_refusal_section(halves, replicates=50)
    everyday = text3.split("everyday requests alone")[1]
    row = next(line for line in everyday.splitlines() if line.startswith("| y |"))
    assert "-100.0" in row and "refuses less" in row  # l2 refuses both everyday requests, y neither
    row = next(line for line in text3.split("everyday requests alone")[0].splitlines() if line.startswith("| y |"))
    assert "refuses more" in row  # on all 50: y refuses 48, l2 2
    # The halves: 48 harm-worded requests all refused, 2 everyday ones, one refused.
    split = [{**_rec("aligned", None, 0, 13.0, 21.0), "refused": "1" * 48 + "01", "over_refusal": 98.0}]
    assert "| aligned |  | 50 | 98.0 | – | 1 | 100.0 | 50.0 |" in over_refusal_section(split, replicates=10)
    # Two prompt counts are never averaged or paired.
    other = [{**r, "refused": "11110", "over_refusal": 80.0} for r in refusing
             if r["method"] == "y l2_lambda=1" and r["seed"] == 0]
    text = over_refusal_section(refusing + other, replicates=20)
    assert "| y l2_lambda=1 | 0.1 | 5 | 80.0 | – | 1 |" in text and "No paired table" in text
    # Counts that differ between seeds only (seed 0 on 8 requests, seed 1 on 4): no pairing either.
    longer = [{**r, "refused": r["refused"] * 2} if r.get("seed") == 0 else r for r in refusing]
    assert "No paired table" in over_refusal_section(longer, replicates=20)
