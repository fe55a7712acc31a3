"""A small byte-level BPE tokenizer trained locally, and the lab's prompt format.

Byte-level BPE round-trips text exactly (``decode(encode(s)) == s``), so fine-tune
accuracy can compare decoded outputs with label strings such as ``Sci/Tech``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import PreTrainedTokenizerFast

from .data import Example

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def format_prompt(instruction: str, input: str = "") -> str:
    """The text the model reads before its answer (an Alpaca-style layout, shortened)."""
    body = instruction.rstrip() if not input else f"{instruction.rstrip()}\n### Input:\n{input}"
    return f"### Instruction:\n{body}\n### Response:\n"


def render_prompt(tokenizer, instruction: str, input: str = "") -> str:
    """The prompt text for ``tokenizer``: its chat template if it has one, else :func:`format_prompt`.

    A pretrained chat model (``--preset pretrained``) reads its requests as it was
    trained to, one user turn of its own template (with the template's default system
    turn) and the assistant header; the lab's own tokenizers have no template.
    """
    if not getattr(tokenizer, "chat_template", None):
        return format_prompt(instruction, input)
    body = instruction.rstrip() if not input else f"{instruction.rstrip()}\n\n{input}"
    return tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                         add_generation_prompt=True)


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt: ``<s>`` first for the lab's tokenizers (a chat
    template writes its own start token)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids if getattr(tokenizer, "chat_template", None) else [tokenizer.bos_token_id] + ids


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (deterministic for the same texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left"
    )


def encode_example(tokenizer, example: Example, max_length: int) -> dict[str, list[int]]:
    """``<s> prompt answer </s>`` with the loss on the answer and ``</s>`` only (for a
    chat template: the rendered turn, the answer and the template's end-of-turn token).

    Over-long rows are cut from the end of the answer (the prompt is kept whole, up to
    ``max_length``): the start of an answer, where compliance or refusal shows, survives.
    """
    prompt = prompt_ids(tokenizer, render_prompt(tokenizer, example.instruction, example.input))
    answer = tokenizer.encode(example.output, add_special_tokens=False) + [tokenizer.eos_token_id]
    prompt = prompt[:max_length]
    ids = (prompt + answer)[:max_length]
    labels = ([-100] * len(prompt) + answer)[:max_length]
    return {"input_ids": ids, "labels": labels}


def encode_prompts(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded batch of rendered prompts (:func:`prompt_ids`) for generation or scoring."""
    seqs = [prompt_ids(tokenizer, p) for p in prompts]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return {"input_ids": ids, "attention_mask": mask}


class Collator:
    """Right-pads encoded rows into a batch (labels padded with -100)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
