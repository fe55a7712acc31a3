"""Tiny Llama models and the HF ``Trainer`` runs of the lab's stages.

The base model is trained from scratch (task + compliant answers), the aligned model is
the base fully fine-tuned (task replay + refusals); both are saved with
``save_pretrained`` so the anchors are built from the checkpoint directories, as a user
would build them from ``Llama-2-7b`` and ``Llama-2-7b-chat``.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, set_seed

from .data import Example
from .tokenizer import Collator, encode_example


@dataclass(frozen=True)
class ModelConfig:
    """Size of the lab's Llama (default: about 1 M parameters with a 2k vocabulary)."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_length: int = 96


@dataclass(frozen=True)
class TrainConfig:
    """One HF Trainer run: epochs, peak LR (linear warm-up, cosine decay), batch size."""

    epochs: float
    lr: float
    batch_size: int = 32
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0


def seed_everything(seed: int) -> None:
    """Same seed, same numbers: Python, NumPy and torch RNGs, deterministic kernels."""
    set_seed(seed)
    # Cheap on CPU; raises rather than silently using a nondeterministic kernel.
    torch.use_deterministic_algorithms(True, warn_only=True)


def new_model(config: ModelConfig, tokenizer, seed: int) -> LlamaForCausalLM:
    """A randomly initialised tiny ``LlamaForCausalLM`` for ``tokenizer``'s vocabulary."""
    seed_everything(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=max(256, 2 * config.max_length),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


def answer_loss(model: nn.Module, inputs: dict[str, torch.Tensor],
                num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    """The causal-LM loss of ``inputs`` with the LM head applied at the answer positions only.

    Equal to the model's own loss (cross-entropy of position t's logits against label
    t + 1, summed over the labelled tokens and divided by ``num_items``, or by their
    count). Why: a task row is about 86 tokens with a label of 1-3, and SmolLM2's
    49k-way head on every position is about a fifth of a training step's work; the
    boolean ``logits_to_keep`` of transformers' causal LMs projects only the kept rows.
    """
    labels = inputs["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), logits_to_keep=keep)
    target = labels[:, 1:][keep[:, :-1]]
    logits = out.logits.reshape(-1, out.logits.shape[-1])
    if logits.dtype in (torch.float16, torch.bfloat16):  # as the model's loss does
        logits = logits.float()
    loss = F.cross_entropy(logits, target, reduction="sum")
    n = target.numel() if num_items is None else num_items
    return loss / max(n, 1) if isinstance(n, int) else loss / n.clamp(min=1).to(loss.device)


class _AnswerLossTrainer(Trainer):
    """``Trainer`` whose loss is :func:`answer_loss` (same value, less work)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:  # evaluation paths want the full logits
            return super().compute_loss(model, inputs, True, num_items_in_batch)
        return answer_loss(model, inputs, num_items_in_batch)


def fit(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    train: TrainConfig,
    seed: int,
    max_length: int,
    *,
    optimizers: tuple = (None, None),
    progress: bool = True,
    callbacks: list | None = None,
    answer_logits: bool = False,
) -> list[float]:
    """Train ``model`` on ``examples`` with the HF ``Trainer``; returns the logged losses.

    The model trains where it is: on the CPU, or on the GPU the Trainer picks when the
    model is already on one (the optimizer, built beforehand, holds its parameters there).

    ``optimizers`` is handed to the Trainer as is: ``(AnchoredAdamW(...), None)`` lets
    the Trainer build its LR schedule around the library's optimizer. ``answer_logits``:
    compute the loss with :func:`answer_loss` (the pretrained preset's attacks; the
    embedded lab keeps the model's own loss, so its published runs stay bit-exact).
    """
    seed_everything(seed)
    rows = [encode_example(tokenizer, e, max_length) for e in examples]
    lost = sum(all(t == -100 for t in r["labels"]) for r in rows)
    if lost:
        # A prompt that fills max_length leaves no answer token: the row trains nothing.
        warnings.warn(f"{lost} of {len(rows)} rows lose their whole answer at max_length={max_length}; "
                      "raise --max-length or lower --input-chars", stacklevel=2)
    with tempfile.TemporaryDirectory(prefix="asft-lab-") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            num_train_epochs=train.epochs,
            per_device_train_batch_size=train.batch_size,
            learning_rate=train.lr,
            weight_decay=train.weight_decay,
            warmup_steps=train.warmup_ratio,
            lr_scheduler_type="cosine",
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            seed=seed,
            data_seed=seed,
            use_cpu=model_device(model).type == "cpu",
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=not progress,
        )
        trainer = (_AnswerLossTrainer if answer_logits else Trainer)(
            model=model,
            args=args,
            train_dataset=rows,
            data_collator=Collator(tokenizer.pad_token_id),
            optimizers=optimizers,
            callbacks=callbacks,
        )
        if not progress:  # with tqdm off the Trainer prints every log dict instead
            from transformers import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def save(model: nn.Module, tokenizer, directory: Path) -> None:
    """``save_pretrained`` of the model and its tokenizer (what the anchors are built from)."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def load(directory: Path, device: str | torch.device = "cpu") -> LlamaForCausalLM:
    """A saved lab model in float32, eval mode, on ``device``."""
    return LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).to(device).eval()


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s weights are (the lab keeps a model on one device)."""
    return next(model.parameters()).device
