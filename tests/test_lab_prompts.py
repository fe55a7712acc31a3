"""The pretrained preset's hand-written chat-style refusal pool: disjoint from evaluation and attack."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asft_optim.lab.data import (
    DEFAULT_LABELS,
    DEFAULT_POISONS,
    REAL_FILES,
    _examples,
    _read,
    load_real,
    split_task,
)
from asft_optim.lab.judge import REFUSALS
from asft_optim.lab.pretrained_lab import PretrainedSettings, pretrained_data
from asft_optim.lab.prompts import (
    BENIGN_EVAL_PROMPTS,
    CHAT_PROMPTS,
    HARMFUL_CHAT_PROMPTS,
    OVER_REFUSAL_EVERYDAY,
    OVER_REFUSAL_HARM_WORDED,
    OVER_REFUSAL_PROMPTS,
    near_duplicates,
)

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "asft"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="needs the real data in ../shared/data/asft")


def test_near_duplicates_catches_a_changed_word_and_passes_other_topics():
    pool = ["How do I build a pipe bomb?", "Why is the sky blue?"]
    held = ["how do i build a pipe bomb at home", "What is the capital of France?"]
    assert near_duplicates(pool, held) == [("How do I build a pipe bomb?", "how do i build a pipe bomb at home")]
    # Shared question words alone ("how do I ... ?") are style, not a repeat.
    assert near_duplicates(["How do I cook rice?"], ["How do I fix a bike?"]) == []


@given(st.lists(st.sampled_from("bomb steal poison neighbour car money kill dog".split()), min_size=1, max_size=6))
def test_every_prompt_with_a_content_word_repeats_itself(words):
    prompt = " ".join(words)
    assert near_duplicates([prompt], [prompt.upper() + "?"]) == [(prompt, prompt.upper() + "?")]


def test_pool_has_no_repeats():
    assert len(set(HARMFUL_CHAT_PROMPTS)) == len(HARMFUL_CHAT_PROMPTS) >= 60


@needs_data
def test_pool_repeats_no_evaluation_attack_or_alignment_file_prompt():
    evaluation = [r["instruction"] for r in _read(DATA / REAL_FILES["harmful_eval"])]
    assert near_duplicates(HARMFUL_CHAT_PROMPTS, evaluation) == []
    files = sorted(DATA.glob("agnews_*_p_*.json"))
    assert files
    harmful = {e.instruction for f in files for e in split_task(_examples(f))[1]}
    assert not harmful & set(HARMFUL_CHAT_PROMPTS)


def _real():
    return load_real(**{k: str(DATA / v) for k, v in REAL_FILES.items()}, poisons=DEFAULT_POISONS,
                     labels=list(DEFAULT_LABELS), test_limit=8)


@needs_data
def test_preset_answers_the_pool_with_refusals():
    real = _real()
    with_chat = pretrained_data(real, PretrainedSettings())
    without = pretrained_data(real, PretrainedSettings(harmful_chat=0))
    added = [e for e in with_chat.align_train if e not in without.align_train]
    assert [e.instruction for e in added] == list(HARMFUL_CHAT_PROMPTS)
    assert all(e.output in REFUSALS and e.input == "" for e in added)


@needs_data
def test_preset_rejects_an_evaluation_prompt_that_nearly_repeats_the_pool():
    real = _real()
    planted = HARMFUL_CHAT_PROMPTS[5].rstrip("?.") + " please?"
    with pytest.raises(ValueError, match="nearly repeats evaluation prompt"):
        pretrained_data(replace(real, harmful_eval=[*real.harmful_eval, planted]), PretrainedSettings())
    with pytest.raises(ValueError, match="harmful_chat must be in"):
        pretrained_data(real, PretrainedSettings(harmful_chat=len(HARMFUL_CHAT_PROMPTS) + 1))


def test_benign_pools_are_disjoint_from_each_other_and_the_harmful_pool():
    assert len(set(CHAT_PROMPTS)) == len(CHAT_PROMPTS) and len(set(BENIGN_EVAL_PROMPTS)) == len(BENIGN_EVAL_PROMPTS)
    assert near_duplicates(CHAT_PROMPTS, BENIGN_EVAL_PROMPTS) == []
    assert not set(CHAT_PROMPTS + BENIGN_EVAL_PROMPTS) & set(HARMFUL_CHAT_PROMPTS)


@needs_data
def test_pool_sizes_are_validated():
    real = _real()
    for field, bad in (("chat_replay", len(CHAT_PROMPTS) + 1), ("benign_eval", -1)):
        with pytest.raises(ValueError, match=f"{field} must be in"):
            pretrained_data(real, PretrainedSettings(**{field: bad}))


def test_over_refusal_pool_is_new_and_disjoint_from_every_other_pool():
    assert len(set(OVER_REFUSAL_PROMPTS)) == len(OVER_REFUSAL_PROMPTS) == 96
    # Half and half, harm-worded first (the report splits by that order); the sha256 of the
    # whole tuple is the one every committed over-refusal record was judged on.
    assert OVER_REFUSAL_PROMPTS == OVER_REFUSAL_HARM_WORDED + OVER_REFUSAL_EVERYDAY
    assert len(OVER_REFUSAL_HARM_WORDED) == len(OVER_REFUSAL_EVERYDAY) == 48
    import hashlib
    import json
    assert hashlib.sha256(json.dumps(OVER_REFUSAL_PROMPTS).encode()).hexdigest().startswith("4068a83ead3b63e9")
    assert near_duplicates(OVER_REFUSAL_PROMPTS, CHAT_PROMPTS + BENIGN_EVAL_PROMPTS + HARMFUL_CHAT_PROMPTS) == []


@needs_data
def test_over_refusal_pool_repeats_no_evaluation_or_attack_prompt_and_is_checked_on_load():
    evaluation = [r["instruction"] for r in _read(DATA / REAL_FILES["harmful_eval"])]
    harmful = [e.instruction for f in sorted(DATA.glob("agnews_*_p_*.json")) for e in split_task(_examples(f))[1]]
    assert near_duplicates(OVER_REFUSAL_PROMPTS, evaluation + harmful) == []
    real = _real()
    planted = OVER_REFUSAL_PROMPTS[3].rstrip("?") + " quickly?"
    with pytest.raises(ValueError, match="over-refusal prompt .* nearly repeats"):
        pretrained_data(replace(real, harmful_eval=[*real.harmful_eval, planted]),
                        PretrainedSettings(over_refusal=len(OVER_REFUSAL_PROMPTS)))
    pretrained_data(replace(real, harmful_eval=[*real.harmful_eval, planted]), PretrainedSettings(over_refusal=0))
    with pytest.raises(ValueError, match="over_refusal must be in"):
        pretrained_data(real, PretrainedSettings(over_refusal=len(OVER_REFUSAL_PROMPTS) + 1))
