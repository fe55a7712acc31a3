"""Tiny synthetic base/aligned checkpoints written with ``save_pretrained``."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig


def llama_config(**kw) -> LlamaConfig:
    cfg = dict(hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=48, max_position_embeddings=32,
               bos_token_id=0, eos_token_id=1, pad_token_id=None)
    cfg.update(kw)
    return LlamaConfig(**cfg)


def gpt2_config(**kw) -> GPT2Config:
    cfg = dict(n_embd=16, n_layer=2, n_head=2, vocab_size=48, n_positions=32, bos_token_id=0, eos_token_id=1)
    cfg.update(kw)
    return GPT2Config(**cfg)


def model_pair(cfg, seed: int = 0, scale: float = 0.05):
    """A random model and its 'aligned' twin: every weight perturbed by a random delta."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(cfg).eval()
    aligned = AutoModelForCausalLM.from_config(cfg).eval()
    aligned.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in aligned.parameters():
            p.add_(scale * torch.randn_like(p))
    return base, aligned


def save_pair(tmp_path, cfg, seed: int = 0, **save_kw):
    base, aligned = model_pair(cfg, seed)
    dirs = []
    for name, m in (("base", base), ("aligned", aligned)):
        d = tmp_path / name
        m.save_pretrained(d, **save_kw)
        dirs.append(d)
    return base, aligned, dirs[0], dirs[1]
