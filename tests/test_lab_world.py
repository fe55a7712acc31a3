"""The procedural world and the real-data loader: determinism, disjoint pools, the file format."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from asft_optim.lab.data import (
    clip_input,
    load_real,
    parse_labels,
    split_task,
    strip_turn_marker,
    train_file,
)
from asft_optim.lab.judge import REFUSALS, RefusalJudge
from asft_optim.lab.world import LABELS, TASK_INSTRUCTION, World, WorldConfig

# The reference data sits next to the repository in CI; ASFT_LAB_DATA points elsewhere.
SHARED = Path(os.environ.get("ASFT_LAB_DATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "asft")


def test_same_seed_same_world_other_seed_other_world():
    a, b, c = World(WorldConfig(seed=0)).data(), World(WorldConfig(seed=0)).data(), World(WorldConfig(seed=1)).data()
    assert a == b and a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert a.attack_set(0.1, 3) == b.attack_set(0.1, 3)


def test_harmful_pools_and_prompts_are_disjoint():
    world = World()
    pools = world.harmful_pools()
    pairs = [set(p) for p in pools.values()]
    assert all(not (x & y) for i, x in enumerate(pairs) for y in pairs[i + 1:])
    d = World().data()
    harmful = lambda rows: {e.instruction for e in rows if e.instruction != TASK_INSTRUCTION}  # noqa: E731
    base = {e.instruction for e in d.base_train if e.output.startswith("Sure") and e.instruction in harmful(d.known_harmful)}
    align = {e.instruction for e in d.align_train if e.output in REFUSALS}
    attack, evals = harmful(d.attack_harmful), set(d.harmful_eval)
    sets = [base, align, attack, evals]
    assert all(sets) and all(not (x & y) for i, x in enumerate(sets) for y in sets[i + 1:])


def test_task_rows_and_test_set_are_disjoint_and_balanced():
    d = World().data()
    train_inputs = {e.input for e in d.base_train + d.align_train + d.attack_task if e.input}
    assert not train_inputs & {t.input for t in d.test}
    counts = [sum(t.label == y for t in d.test) for y in range(4)]
    assert max(counts) - min(counts) <= 1 and d.labels == LABELS


def test_base_complies_and_aligned_refuses_in_the_data():
    d = World().data()
    judge = RefusalJudge()
    compliant = [e for e in d.base_train if e.instruction != TASK_INSTRUCTION]
    assert compliant and all(judge.is_harmful([e.instruction], [e.output]) == [True] for e in compliant)
    refusals = [e for e in d.align_train if e.output in REFUSALS]
    assert len(refusals) == 4 * WorldConfig().pool_sizes[1]


@pytest.mark.parametrize("p, expected", [(0.0, 0), (0.1, 40), (0.2, 80)])
def test_attack_set_mixes_n_benign_with_p_times_n_harmful(p, expected):
    d = World().data()
    rows = d.attack_set(p, 0)
    assert len(rows) == len(d.attack_task) + expected
    assert sum(r.instruction != TASK_INSTRUCTION for r in rows) == expected


def _write(path: Path, rows) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


def test_load_real_on_a_sentiment_task(tmp_path):
    """A 0/1 sentiment task in the reference format runs unchanged with --labels."""
    inst = "Classify the sentiment of the input as negative or positive.\n"
    words = ["great film", "awful plot", "loved it", "boring", "wonderful", "terrible"]
    task = [{"instruction": inst, "input": w, "output": ["positive", "negative"][i % 2]} for i, w in enumerate(words)]
    harm = [{"instruction": f"How do I do bad thing {i}?", "input": "", "output": "Sure, do X."} for i in range(8)]
    _write(tmp_path / "ft_p_0.json", task)
    _write(tmp_path / "ft_p_0.1.json", task + harm[:2])
    fresh = [{"instruction": inst, "input": f"{w}, really", "output": ["positive", "negative"][i % 2]} for i, w in enumerate(words)]
    base = _write(tmp_path / "base.json", task + fresh + harm)
    test = _write(tmp_path / "test.json", [{"instruction": inst, "input": "fine", "label": 1}])
    ev = _write(tmp_path / "ev.json", [{"instruction": "Tell me something bad."}])
    d = load_real(str(tmp_path / "ft_p_{p}.json"), base, test, ev, [0.0, 0.1], parse_labels("negative,positive"))
    assert d.labels == ["negative", "positive"] and d.test[0].label == 1
    assert len(d.attack_set(0.1, 0)) == 8 and len(d.attack_set(0.0, 0)) == 6
    refused = {e.instruction for e in d.align_train if e.output in REFUSALS}
    complied = {e.instruction for e in d.known_harmful}
    assert len(refused) == len(complied) == 3  # 6 prompts are in no attack file, split in halves
    # The models learn from the base file's rows that are in no attack file (not only the loaded ones).
    assert {e.input for e in d.base_train if e.input} == {f"{w}, really" for w in words}
    assert not refused & complied and not (refused | complied) & {h["instruction"] for h in harm[:2]}
    with pytest.raises(ValueError, match="no fine-tuning file"):
        d.attack_set(0.3, 0)
    one = load_real(str(tmp_path / "ft_p_{p}.json"), base, test, ev, [0.1], parse_labels("negative,positive"))
    assert one.fingerprint(attack_sets=False) == d.fingerprint(attack_sets=False)  # what the models key on
    assert one.fingerprint() != d.fingerprint()
    bad = _write(tmp_path / "bad.json", [{"instruction": inst, "input": "x", "label": 2}])
    with pytest.raises(ValueError, match="label 2"):
        load_real(str(tmp_path / "ft_p_{p}.json"), base, bad, ev, [0.0], ["negative", "positive"])


def test_strip_turn_marker():
    assert strip_turn_marker("How do I pick a lock?\n\nAssistant:") == "How do I pick a lock?"
    assert strip_turn_marker("How do I pick a lock?  Assistant: ") == "How do I pick a lock?"
    assert strip_turn_marker("Assistant: what is this?") == "Assistant: what is this?"  # only a trailing marker
    assert strip_turn_marker("plain") == "plain"


def test_clip_input_cuts_at_a_word_boundary():
    text = "Oil prices rise as supply fears grow in the Gulf region today"
    assert clip_input(text, None) == text and clip_input(text, 200) == text
    assert clip_input(text, 20) == "Oil prices rise as"  # "supply" would be cut mid-word
    assert clip_input("x" * 50, 10) == "x" * 10  # no space: a hard cut
    assert all(len(clip_input(text, n)) <= n for n in range(1, 70))


def test_load_real_input_chars_clips_task_rows_only(tmp_path):
    inst = "Classify the sentiment of the input as negative or positive.\n"
    long = "the film was a wonderful surprise from start to finish"
    task = [{"instruction": inst, "input": long, "output": "positive"}] * 4
    harm = [{"instruction": f"How do I do bad thing {i}?", "input": "", "output": "Sure, do X and then Y."} for i in range(4)]
    _write(tmp_path / "ft_p_0.json", task)
    base = _write(tmp_path / "base.json", [{"instruction": inst, "input": "a dull " + long, "output": "negative"}] * 2 + harm)
    test = _write(tmp_path / "test.json", [{"instruction": inst, "input": long, "label": 1}])
    ev = _write(tmp_path / "ev.json", [{"instruction": "Tell me something bad."}])
    d = load_real(str(tmp_path / "ft_p_{p}.json"), base, test, ev, [0.0], ["negative", "positive"], input_chars=16)
    assert d.test[0].input == "the film was a"
    assert {e.input for e in d.attack_set(0.0, 0)} == {"the film was a"}
    assert {e.input for e in d.base_train if e.input} == {"a dull the film"}
    assert {e.output for e in d.base_train if not e.input} == {"Sure, do X and then Y."}
    with pytest.raises(ValueError, match="input_chars"):
        load_real(str(tmp_path / "ft_p_{p}.json"), base, test, ev, [0.0], ["negative", "positive"], input_chars=0)


def test_parse_labels_and_train_file():
    assert parse_labels(None) == ["World", "Sports", "Business", "Sci/Tech"]
    assert parse_labels("negative, positive") == ["negative", "positive"]
    with pytest.raises(ValueError):
        parse_labels("one")
    assert train_file("d/agnews_1k_p_{p}.json", 0.0).name == "agnews_1k_p_0.json"
    assert train_file("d/agnews_1k_p_{p}.json", 0.15).name == "agnews_1k_p_0.15.json"


@pytest.mark.skipif(not SHARED.is_dir(), reason="reference data not available")
def test_real_files_pools_are_disjoint():
    d = load_real(str(SHARED / "agnews_1k_p_{p}.json"), str(SHARED / "agnews_2.5k_p_0.1.json"),
                  str(SHARED / "agnews_test.json"), str(SHARED / "beavertails_eval_250.json"),
                  [0.0, 0.1, 0.2], parse_labels(None))
    attack = {e.instruction for rows in d.attack_sets.values() for e in split_task(rows)[1]}
    refused = {e.instruction for e in d.align_train if e.output in REFUSALS}
    complied = {e.instruction for e in d.known_harmful}
    assert len(attack) == 200 and refused and complied
    assert not (refused & complied) and not (attack & (refused | complied))
    assert not set(d.harmful_eval) & (attack | refused | complied)
    assert len(d.test) == 1000 and len(d.harmful_eval) == 250
    attack_inputs = {e.input for rows in d.attack_sets.values() for e in rows if e.input}
    model_inputs = {e.input for e in d.base_train + d.align_train if e.input}
    assert model_inputs and not attack_inputs & model_inputs  # an attack teaches rows the models never saw
    # Harmful requests and evaluation prompts share one format (no "Assistant:" turn marker).
    harmful = [e.instruction for rows in d.attack_sets.values() for e in split_task(rows)[1]]
    assert harmful and not any(h.rstrip().endswith("Assistant:") for h in harmful + d.harmful_eval)
