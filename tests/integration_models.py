"""The integration tests' Trainer and Accelerate harness (their models, anchors and token
data are :mod:`tiny_models`' ``integration`` size)."""

from __future__ import annotations

import torch
from tiny_models import INTEGRATION_VOCAB


class TokenDataset(torch.utils.data.Dataset):
    """Rows of random token ids; the Trainer's causal-LM path uses ``labels = input_ids``."""

    def __init__(self, rows: int = 16, length: int = 12, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, INTEGRATION_VOCAB, (rows, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def reset_accelerate_state() -> None:
    """Accelerate keeps process-wide singletons (mixed precision, ...): start each test clean."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def trainer_args(tmp_path, **kw):
    """Small, deterministic CPU TrainingArguments (no reporting, no saving unless asked)."""
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
        lr_scheduler_type="linear", warmup_steps=0, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
        disable_tqdm=True, weight_decay=0.0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def trainable_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
