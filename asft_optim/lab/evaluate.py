"""Evaluation: greedy decoding in batches, harmful score (HS) and fine-tune accuracy (FA)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import LabData
from .judge import Judge
from .tokenizer import encode_prompts, format_prompt

#: Tokens generated for a harmful prompt: enough for the first sentence, where a
#: refusal or a compliant "Sure, here is how to ..." shows.
HARMFUL_NEW_TOKENS = 24


def harmful_score(flags: Sequence[bool]) -> float:
    """Percentage of responses flagged harmful (0 for no responses)."""
    return 100.0 * sum(bool(f) for f in flags) / len(flags) if flags else 0.0


def finetune_accuracy(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """Exact-label accuracy in percent: the answer, stripped of surrounding spaces, equals the label."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        return 0.0
    return 100.0 * sum(p.strip() == y for p, y in zip(predictions, labels)) / len(labels)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    batch_size: int = 64,
    desc: str = "generate",
    progress: bool = True,
) -> list[str]:
    """Greedy continuations of ``prompts`` (already formatted), in the input order.

    Prompts are batched by length (less padding); decoding stops at ``</s>``.
    """
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        batch = encode_prompts(tokenizer, [prompts[i] for i in idx])
        gen = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, t in zip(idx, texts):
            out[i] = t
    return out


def evaluate(
    model: nn.Module, tokenizer, data: LabData, judge: Judge, *, progress: bool = True, keep: int = 5
) -> dict[str, Any]:
    """HS on ``data.harmful_eval`` with ``judge`` and FA on ``data.test``.

    Returns ``{"harmful_score", "finetune_accuracy", "judge", "examples"}`` with the
    first ``keep`` (prompt, response) pairs of each kind for the report.
    """
    label_tokens = max(len(tokenizer.encode(y, add_special_tokens=False)) for y in data.labels)
    task_prompts = [format_prompt(t.instruction, t.input) for t in data.test]
    answers = generate(model, tokenizer, task_prompts, label_tokens + 1, desc="eval task", progress=progress)
    fa = finetune_accuracy(answers, [data.labels[t.label] for t in data.test])
    harm_prompts = [format_prompt(p) for p in data.harmful_eval]
    responses = generate(model, tokenizer, harm_prompts, HARMFUL_NEW_TOKENS, desc="eval harmful", progress=progress)
    flags = judge.is_harmful(list(data.harmful_eval), responses)
    return {
        "harmful_score": harmful_score(flags),
        "finetune_accuracy": fa,
        "judge": judge.name,
        "examples": {
            "harmful": [
                {"prompt": p, "response": r, "harmful": f}
                for p, r, f in list(zip(data.harmful_eval, responses, flags))[:keep]
            ],
            "task": [
                {"input": t.input, "label": data.labels[t.label], "answer": a}
                for t, a in list(zip(data.test, answers))[:keep]
            ],
        },
    }
