"""The defender's prompts as model inputs: chat-templated token ids, right-padded batches.

Both data-driven builders read prompts the way the model will see them at fine-tuning
and evaluation time: through the tokenizer's chat template with the generation prompt
(the assistant turn's header), so that the activations and the refusals are those of
the model about to answer. Padding goes on the *right* and is masked: a Llama computes
its positions from the token index, so left padding would shift every real token.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .projection import AnchorError

__all__ = ["prompt_ids", "prompts_fingerprint", "read_prompts", "right_padded_batches", "shared_prefix_length"]

#: File suffixes read as JSON (a list) or JSON lines; any other file is one prompt a line.
JSON_SUFFIXES = (".json", ".jsonl")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a file: UTF-8 text with one prompt a line (blank lines skipped), or, for
    ``.json`` / ``.jsonl``, a JSON list or JSON lines of strings or of objects with an
    ``"instruction"`` (the lab's and the reference data's rows; a non-empty ``"input"`` is
    appended after a blank line, as the lab renders it) or a ``"prompt"`` string.

    Raises:
        AnchorError: the file is missing or unreadable, a row has no prompt, or there is none.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AnchorError(f"prompt file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise AnchorError(f"prompt file {path!r} cannot be read as UTF-8 text: {exc}") from None
    if path.lower().endswith(JSON_SUFFIXES):
        prompts = [_row_prompt(path, i, row) for i, row in enumerate(_json_rows(path, text), 1)]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise AnchorError(f"prompt file {path!r} holds no prompt")
    return prompts


def _json_rows(path: str, text: str) -> list:
    """A JSON list, or JSON lines (one value a line)."""
    try:
        rows = json.loads(text)
        return rows if isinstance(rows, list) else [rows]
    except json.JSONDecodeError:
        pass
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise AnchorError(f"{path}: neither a JSON list nor JSON lines (line {i}: {exc.msg})") from None
    return rows


def _row_prompt(path: str, i: int, row) -> str:
    if isinstance(row, str) and row.strip():
        return row.strip()
    if isinstance(row, dict):
        text = row.get("instruction", row.get("prompt"))
        if isinstance(text, str) and text.strip():
            extra = row.get("input") if "instruction" in row else None
            return text.strip() + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")
    raise AnchorError(f"{path}: row {i} has no prompt: give a string or an object with a non-empty "
                      "'instruction' or 'prompt' string")


def prompts_fingerprint(prompts: Sequence[str]) -> str:
    """A short hash of the prompts, in order (recorded in the files built from them)."""
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()[:16]


def prompt_ids(tokenizer: Any, prompts: Sequence[str], *, chat_template: bool | None = None) -> list[Tensor]:
    """One 1-D ``long`` tensor of token ids per prompt.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompts: the defender's harmful (or task) prompts, as plain user messages.
        chat_template: wrap each prompt as a user turn with the generation prompt
            (default: None, when the tokenizer has a chat template).
    """
    if not prompts:
        raise AnchorError("no prompt was given")
    use_template = getattr(tokenizer, "chat_template", None) is not None if chat_template is None else chat_template
    out = []
    for text in prompts:
        if use_template:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            if isinstance(ids, Tensor):
                ids = ids.reshape(-1).tolist()
            elif hasattr(ids, "keys"):  # a BatchEncoding from tokenizers that always return a dict
                ids = ids["input_ids"]
        else:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if not ids:
            raise AnchorError(f"prompt {text[:40]!r} tokenises to nothing")
        out.append(torch.tensor(ids, dtype=torch.long))
    return out


def shared_prefix_length(ids: Sequence[Tensor]) -> int:
    """Length of the longest token prefix every prompt shares (a chat template's system prompt
    and user header): causal models give those tokens the same activations in every prompt."""
    if not ids:
        return 0
    n = min(len(t) for t in ids)
    first = ids[0][:n]
    for t in ids[1:]:
        diff = (t[:n] != first).nonzero()
        n = int(diff[0]) if len(diff) else n
        first = first[:n]
    return n


def right_padded_batches(
    ids: Sequence[Tensor], batch_size: int = 8, pad_id: int = 0, *, skip_prefix: int = 0
) -> list[dict[str, Tensor]]:
    """Batches ``{"input_ids", "attention_mask"}`` padded on the right with ``pad_id`` (masked).

    ``skip_prefix > 0`` adds a ``token_mask`` leaving out each prompt's first ``skip_prefix``
    tokens from the statistics (they still run through the model), e.g.
    :func:`shared_prefix_length` of all the prompts (default: 0, no ``token_mask``).
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not (isinstance(skip_prefix, int) and 0 <= skip_prefix < min(len(t) for t in ids)):
        raise ValueError(f"skip_prefix must be an int in [0, shortest prompt's length), got {skip_prefix!r}")
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        length = max(len(t) for t in chunk)
        input_ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), length, dtype=torch.long)
        for row, t in enumerate(chunk):
            input_ids[row, : len(t)], mask[row, : len(t)] = t, 1
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if skip_prefix:
            batch["token_mask"] = mask.clone()
            batch["token_mask"][:, :skip_prefix] = 0
        out.append(batch)
    return out
