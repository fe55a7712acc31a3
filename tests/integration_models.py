"""Tiny real models, anchors and data for the integration tests (configs only, no hub)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from asft_optim import Anchors

VOCAB = 64
TARGETS = ("q_proj", "v_proj")


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).to(dtype)


def lora_config(**kw) -> LoraConfig:
    """LoRA on q/v with a random B, so ΔW ≠ 0 and the penalty acts from the first step."""
    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=list(TARGETS))
    cfg.update(kw)
    return LoraConfig(**cfg)


def tiny_lora_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> nn.Module:
    model = tiny_llama(seed, dtype)
    torch.manual_seed(seed + 1)
    return get_peft_model(model, lora_config(**kw)).to(dtype)


def anchor_deltas(model: nn.Module, seed: int = 7, dtype: torch.dtype = torch.float32) -> dict:
    """Random alignment directions V for every q/v weight of ``model`` (plain or PEFT)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in model.named_modules():
        name = name.removesuffix(".base_layer")
        if name.endswith(TARGETS) and isinstance(mod, nn.Linear):
            key = name.removeprefix("base_model.model.") + ".weight"
            out[key] = torch.randn(mod.out_features, mod.in_features, generator=g).to(dtype)
    return out


def tiny_anchors(model: nn.Module, seed: int = 7, dtype: torch.dtype = torch.float32) -> Anchors:
    # Build from a plain copy of the shapes: the names of q/v weights are the HF names.
    return Anchors.from_deltas(anchor_deltas(model, seed, dtype), "safelora", dtype=dtype)


def token_batches(n: int, batch: int = 4, length: int = 12, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (batch, length), generator=g) for _ in range(n)]


class TokenDataset(torch.utils.data.Dataset):
    """Rows of random token ids; the Trainer's causal-LM path uses ``labels = input_ids``."""

    def __init__(self, rows: int = 16, length: int = 12, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (rows, length), generator=g)

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
