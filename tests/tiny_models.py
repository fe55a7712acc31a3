"""Tiny float64 models and anchors shared by the core tests (seeded, CPU, a few ms each)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from asft_optim import Anchors

D = torch.float64
VOCAB = 32


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
    )
    return LlamaForCausalLM(cfg).to(D)


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=8, n_layer=1, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).to(D)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


def tiny_convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet().to(D)


def lora(model: nn.Module, targets, seed: int = 1, **kw) -> nn.Module:
    """PEFT LoRA with a random B (so ΔW ≠ 0 from the start)."""
    torch.manual_seed(seed)
    cfg = dict(r=2, lora_alpha=4, lora_dropout=0.0, init_lora_weights=False, target_modules=list(targets))
    cfg.update(kw)
    return get_peft_model(model, LoraConfig(**cfg)).to(D)


def out_in(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    w = weight.T if transposed else weight
    return w.reshape(w.shape[0], -1)



#: The two anchored weights of :func:`tiny_llama`'s first block, and their (d_out, d_in).
Q = "model.layers.0.self_attn.q_proj.weight"
V = "model.layers.0.self_attn.v_proj.weight"
DIMS = {Q: (8, 8), V: (4, 8)}


def make_anchors(model: nn.Module, names_and_dims: dict[str, int], mode: str, rank, seed: int = 7):
    """Random alignment directions V (d_out, d_in): library anchors + oracle dict."""
    g = torch.Generator().manual_seed(seed)
    deltas = {n: torch.randn(d_out, d_in, generator=g, dtype=D) for n, (d_out, d_in) in names_and_dims.items()}
    if mode in ("orthogonal", "subspace"):
        rank = rank or 2
    else:
        rank = None
    anchors = Anchors.from_deltas(deltas, mode, rank=rank, dtype=D)
    oracle = {n: (v, mode, rank) for n, v in deltas.items()}
    return anchors, oracle


def tokens(seed: int, batch: int = 2, length: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def lm_loss(model, seed: int) -> torch.Tensor:
    ids = tokens(seed)
    return model(input_ids=ids, labels=ids).loss
