"""The tests' fixtures: tiny seeded models (CPU, a few ms each), anchors, token data,
base/aligned checkpoint pairs and where the reference data lies. ``tests/reference.py`` is the oracle they are checked against.

One builder per kind of model; the sizes are named in :data:`LLAMA_SIZES` and
:data:`GPT2_SIZES`.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from asft_optim import Anchors

#: The reference data (``../shared/data/asft`` next to the repository in CI;
#: ``ASFT_LAB_DATA`` points elsewhere). Tests that need it skip where it is missing.
REAL_DATA = Path(os.environ.get("ASFT_LAB_DATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "asft")

D = torch.float64
VOCAB = 32
INTEGRATION_VOCAB = 64

#: ``LlamaConfig`` fields of the tiny Llamas, by size: ``core`` (width 8, one block: the
#: float64 oracle comparisons), ``wide`` (width 16: room for the PEFT tuners' blocks and
#: rank-3 anchors), ``integration`` (width 32, two blocks, special tokens: the Trainer, TRL
#: and torchrun tests) and ``checkpoint`` (width 16, two blocks: pairs written to disk).
LLAMA_SIZES = {
    "core": dict(vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16),
    "wide": dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16),
    "integration": dict(vocab_size=INTEGRATION_VOCAB, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "checkpoint": dict(hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=48,
                       max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=None),
}

#: ``GPT2Config`` fields of the tiny GPT-2s, by size (as :data:`LLAMA_SIZES`).
GPT2_SIZES = {
    "core": dict(vocab_size=VOCAB, n_embd=8, n_layer=1, n_head=2, n_positions=16,
                 bos_token_id=0, eos_token_id=0),
    "checkpoint": dict(n_embd=16, n_layer=2, n_head=2, vocab_size=48, n_positions=32,
                       bos_token_id=0, eos_token_id=1),
}


# -- models ---------------------------------------------------------------------------------

def tiny_llama(seed: int = 0, dtype: torch.dtype = D, *, size: str = "core", **config) -> nn.Module:
    """A seeded random Llama of :data:`LLAMA_SIZES` ``[size]``; ``config`` overrides fields."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**LLAMA_SIZES[size], **config})).to(dtype)


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = D) -> nn.Module:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**GPT2_SIZES["core"])).to(dtype)


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


# -- anchors --------------------------------------------------------------------------------

#: The two anchored weights of :func:`tiny_llama`'s first block, and their (d_out, d_in)
#: in the ``core`` size.
Q = "model.layers.0.self_attn.q_proj.weight"
V = "model.layers.0.self_attn.v_proj.weight"
DIMS = {Q: (8, 8), V: (4, 8)}
#: :func:`tiny_gpt2`'s fused attention weight (a Conv1D, stored (in, out)).
C_ATTN = "transformer.h.0.attn.c_attn.weight"


def make_anchors(
    model: nn.Module | None,
    names_and_dims: dict[str, tuple[int, int]],
    mode: str = "orthogonal",
    rank: int | None = None,
    seed: int = 7,
):
    """Random alignment directions V (d_out, d_in): library anchors + oracle dict.

    ``rank`` is used by the projector modes (``orthogonal``/``subspace``; default: 2);
    ``model`` is not read (the anchors depend on the names and shapes only).
    """
    g = torch.Generator().manual_seed(seed)
    deltas = {n: torch.randn(d_out, d_in, generator=g, dtype=D) for n, (d_out, d_in) in names_and_dims.items()}
    if mode in ("orthogonal", "subspace"):
        rank = rank or 2
    else:
        rank = None
    anchors = Anchors.from_deltas(deltas, mode, rank=rank, dtype=D)
    oracle = {n: (v, mode, rank) for n, v in deltas.items()}
    return anchors, oracle


# -- data -----------------------------------------------------------------------------------

def tokens(seed: int, batch: int = 2, length: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def lm_loss(model, seed: int) -> torch.Tensor:
    ids = tokens(seed)
    return model(input_ids=ids, labels=ids).loss


# -- the integration size: LoRA on q/v, float32 by default, real token ids ------------------

TARGETS = ("q_proj", "v_proj")


def lora_config(**kw) -> LoraConfig:
    """LoRA on q/v with a random B, so ΔW ≠ 0 and the penalty acts from the first step."""
    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
               target_modules=list(TARGETS))
    cfg.update(kw)
    return LoraConfig(**cfg)


def tiny_lora_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> nn.Module:
    """The ``integration`` Llama under :func:`lora_config` (``kw`` overrides its fields)."""
    model = tiny_llama(seed, dtype, size="integration")
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
    return [torch.randint(3, INTEGRATION_VOCAB, (batch, length), generator=g) for _ in range(n)]


# -- base/aligned checkpoint pairs written with ``save_pretrained`` ---------------------------

def llama_config(**kw) -> LlamaConfig:
    """The ``checkpoint`` size of :data:`LLAMA_SIZES`, ``kw`` overriding fields."""
    return LlamaConfig(**{**LLAMA_SIZES["checkpoint"], **kw})


def gpt2_config(**kw) -> GPT2Config:
    """The ``checkpoint`` size of :data:`GPT2_SIZES`, ``kw`` overriding fields."""
    return GPT2Config(**{**GPT2_SIZES["checkpoint"], **kw})


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


# -- a safetensors file's header, for tests that edit anchor files ------------------------


def split(data: bytes) -> tuple[dict, bytes]:
    """``(header, body)`` of a safetensors file's bytes."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict, body: bytes) -> bytes:
    """The bytes of a safetensors file with ``header`` (padded to 8 bytes) and ``body``."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def assert_same_bases(loaded, built, dim: str) -> None:
    """A basis container (``InputAnchors``, ``SafetySubspaces``) read back equals the one saved:
    names, weights, metadata without the file's ``side``, each basis, ``dim`` and energy."""
    assert list(loaded) == list(built) and loaded.weights == built.weights
    assert loaded.metadata == {k: v for k, v in built.metadata.items() if k != "side"}
    for name in built:
        assert torch.equal(loaded[name].basis, built[name].basis)
        assert (getattr(loaded[name], dim), loaded[name].energy) == (getattr(built[name], dim), built[name].energy)
