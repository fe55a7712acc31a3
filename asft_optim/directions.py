"""Directions in weight space: the alignment direction, fine-tuning updates, random probes.

A :data:`Direction` is a plain ``{weight name: tensor}`` dict keyed by Hugging Face
state-dict names (``model.layers.0.self_attn.q_proj.weight``), each tensor in the
weight's *stored* layout, so ``W + α·d[name]`` is the perturbed weight. PEFT, DDP and
``torch.compile`` prefixes are stripped (:func:`asft_optim.discovery.hf_name`), so a
direction computed on one wrapping applies to another.

Paper symbols (AsFT §3.2): ``d_aligned = θ_aligned − θ_unaligned``; ``d_harm`` /
``d_benign`` are the updates of fine-tuning on harmful / benign data; ``d_random``
is Gaussian, scaled per layer to the layer's norm as in poloclub/llm-landscape
(Peng et al. 2024), with 1-D tensors (norms, biases) and normalisation layers excluded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .anchors import module_name_matcher
from .checkpoints import open_source
from .discovery import hf_name
from .layout import to_out_in
from .projection import AnchorError
from .targets import is_tuner

__all__ = [
    "CosineResult",
    "Direction",
    "cosine",
    "direction_from_adapter",
    "direction_from_models",
    "direction_norm",
    "layer_norms",
    "model_weights",
    "normalize",
    "off_anchor_fraction",
    "orthogonalize",
    "random_direction",
    "weight_key",
]

Direction = dict[str, Tensor]
Normalization = Literal["global", "layer", "none"]


def weight_key(param_name: str) -> str:
    """HF state-dict key of a parameter of a plain or wrapped model (PEFT ``base_layer`` too)."""
    return hf_name(param_name).replace(".base_layer.", ".")


def _is_norm_module(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def model_weights(model: nn.Module, *, include_adapters: bool = False) -> dict[str, nn.Parameter]:
    """``{HF weight name: parameter}`` of ``model``, tied weights listed once.

    PEFT adapter parameters (``lora_A``/``lora_B``/...) are left out unless
    ``include_adapters``: a landscape perturbs the model's own weights.
    """
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if id(p) in seen:
                continue
            if not include_adapters and any(part.startswith("lora_") for part in full.split(".")):
                continue
            seen.add(id(p))
            out[weight_key(full)] = p
    return out


def _perturbable(model: nn.Module, target_modules) -> dict[str, nn.Parameter]:
    """≥2-D weights outside normalisation modules, optionally restricted to ``target_modules``."""
    matches = module_name_matcher(target_modules) if target_modules is not None else None
    norm_weights = set()
    for module_name, module in model.named_modules():
        if _is_norm_module(module):
            norm_weights.update(weight_key(f"{module_name}.{n}") for n, _ in module.named_parameters(recurse=False))
    picked = {}
    for name, p in model_weights(model).items():
        if p.dim() < 2 or name in norm_weights:
            continue
        if matches is not None and not (name.endswith(".weight") and matches(name[: -len(".weight")])):
            continue
        picked[name] = p
    if not picked:
        raise AnchorError(f"no ≥2-D weight of the model matches target_modules={target_modules!r}")
    return picked


def _weights_of(obj: Any) -> tuple[list[str], Any]:
    """Names and a reader for a module (HF names), a state dict or a checkpoint directory."""
    if isinstance(obj, nn.Module):
        weights = model_weights(obj)
        return list(weights), lambda n: weights[n].detach()
    src = open_source(obj)
    return src.names(), src.read


def direction_from_models(
    start: Any,
    end: Any,
    target_modules: str | Iterable[str] | None = None,
    *,
    include_1d: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Direction:
    """``end − start`` over the ≥2-D weights both hold (e.g. ``d_aligned = aligned − base``).

    Args:
        start, end: ``nn.Module`` (plain or PEFT-wrapped: its base weights), state dict or
            HF checkpoint directory.
        target_modules: module-name suffixes or a full-match regex, as in PEFT
            (default: None, every ≥2-D weight).
        include_1d: also take 1-D tensors (norm weights, biases), so that with
            ``target_modules=None`` ``start + 1·d`` is ``end`` exactly (default: False).
        dtype: dtype of the difference (default: float32).

    Raises :class:`AnchorError` if a selected weight is missing from ``end`` or changes shape.
    """
    names_a, read_a = _weights_of(start)
    names_b, read_b = _weights_of(end)
    matches = module_name_matcher(target_modules) if target_modules is not None else None
    in_b = set(names_b)
    out: Direction = {}
    problems = []
    for name in names_a:
        if matches is not None and not (name.endswith(".weight") and matches(name[: -len(".weight")])):
            continue
        a = read_a(name)
        if a.dim() < 2 and not include_1d:
            continue
        if name not in in_b:
            problems.append(f"{name}: missing from the second model")
            continue
        b = read_b(name)
        if b.shape != a.shape:
            problems.append(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
            continue
        out[name] = b.to(dtype) - a.to(dtype)
    if problems:
        raise AnchorError("models do not match:\n  " + "\n  ".join(problems))
    if not out:
        raise AnchorError(f"no ≥2-D weight matches target_modules={target_modules!r}")
    return out


def direction_from_adapter(model: nn.Module, *, dtype: torch.dtype = torch.float32) -> Direction:
    """The update ``ΔW`` a PEFT adapter applies to each base weight, in the weight's stored layout.

    Sums ``get_delta_weight`` over the active adapters of every tuner layer (LoRA
    scaling included; GPT-2 ``Conv1D`` and embeddings come back stored-layout, as
    PEFT merges them). DoRA's magnitude rescaling is not included.
    """
    out: Direction = {}
    for module_name, module in model.named_modules():
        if not (is_tuner(module) and hasattr(module, "get_delta_weight")):
            continue
        if getattr(module, "disable_adapters", False):
            continue
        deltas = [module.get_delta_weight(a).detach().to(dtype) for a in module.active_adapters
                  if a in getattr(module, "lora_A", {}) or a in getattr(module, "lora_embedding_A", {})]
        if deltas:
            out[hf_name(module_name) + ".weight"] = torch.stack(deltas).sum(0)
    if not out:
        raise AnchorError("the model has no active PEFT adapter exposing get_delta_weight")
    return out


def random_direction(
    model: nn.Module,
    seed: int = 0,
    target_modules: str | Iterable[str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Direction:
    """Gaussian direction over the model's ≥2-D non-normalisation weights, each layer scaled to ``‖W‖``.

    The convention of poloclub/llm-landscape: per weight ``d ← d · ‖W‖_F / ‖d‖_F``, so
    ``α = 1`` moves every layer by its own norm. Deterministic in ``seed`` (CPU generator).
    """
    g = torch.Generator().manual_seed(seed)
    out: Direction = {}
    for name, p in _perturbable(model, target_modules).items():
        d = torch.randn(p.shape, generator=g, dtype=torch.float64)
        w_norm = p.detach().double().norm()
        out[name] = (d * (w_norm / d.norm())).to(dtype)
    return out


def layer_norms(direction: Mapping[str, Tensor]) -> dict[str, float]:
    """``{name: ‖d‖_F}`` computed in float64."""
    return {n: float(t.double().norm()) for n, t in direction.items()}


def direction_norm(direction: Mapping[str, Tensor]) -> float:
    """Global Frobenius norm over all tensors."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in direction.values()))


def normalize(
    direction: Mapping[str, Tensor],
    how: Normalization = "global",
    model: nn.Module | None = None,
) -> Direction:
    """Rescale a direction.

    Args:
        how: ``"global"``: unit global norm (the paper's ``d̂ = d/‖d‖``); ``"layer"``:
            each weight's direction scaled to that weight's norm in ``model`` (the
            poloclub/llm-landscape convention; zero tensors stay zero); ``"none"``: a copy.
        model: needed for ``"layer"``.
    """
    if how == "none":
        return {n: t.clone() for n, t in direction.items()}
    if how == "global":
        norm = direction_norm(direction)
        if norm == 0:
            raise ValueError("cannot normalise a zero direction")
        return {n: t / norm for n, t in direction.items()}
    if how == "layer":
        if model is None:
            raise ValueError('normalize(how="layer") needs the model whose weight norms to use')
        weights = model_weights(model)
        missing = [n for n in direction if n not in weights]
        if missing:
            raise AnchorError(f"direction weights missing from the model: {missing[:5]}")
        out = {}
        for n, t in direction.items():
            d_norm = float(t.double().norm())
            out[n] = t * (float(weights[n].detach().double().norm()) / d_norm) if d_norm > 0 else t.clone()
        return out
    raise ValueError(f"unknown normalisation {how!r}; expected 'global', 'layer' or 'none'")


def orthogonalize(direction: Mapping[str, Tensor], against: Mapping[str, Tensor]) -> Direction:
    """Remove, weight by weight, the component of ``direction`` along ``against``.

    Per-weight Gram-Schmidt keeps the result orthogonal both per layer and globally,
    and stays so after :func:`normalize` with ``"layer"`` (each layer is only rescaled).
    """
    out = {}
    for n, t in direction.items():
        a = against.get(n)
        if a is None:
            out[n] = t.clone()
            continue
        t64, a64 = t.double(), a.double()
        aa = float((a64 * a64).sum())
        out[n] = (t64 - a64 * (float((t64 * a64).sum()) / aa) if aa > 0 else t64).to(t.dtype)
    return out


@dataclass
class CosineResult:
    """Cosine over the weights two directions share: ``overall`` (all flattened together) and per weight."""

    overall: float
    per_layer: dict[str, float] = field(default_factory=dict)
    n_weights: int = 0


def cosine(d1: Mapping[str, Tensor], d2: Mapping[str, Tensor], per_layer: bool = True) -> CosineResult:
    """Cosine similarity of two directions (AsFT Table 1), in float64, over their shared weights.

    Raises if they share no weight or a shared weight differs in shape. A zero tensor
    has cosine 0 with anything.
    """
    shared = [n for n in d1 if n in d2]
    if not shared:
        raise AnchorError("the two directions share no weight")
    dot = n1 = n2 = 0.0
    layers = {}
    for n in shared:
        a, b = d1[n].double().reshape(-1), d2[n].double().reshape(-1)
        if a.shape != b.shape:
            raise AnchorError(f"{n}: shapes differ ({tuple(d1[n].shape)} vs {tuple(d2[n].shape)})")
        ab, aa, bb = float(a @ b), float(a @ a), float(b @ b)
        dot, n1, n2 = dot + ab, n1 + aa, n2 + bb
        if per_layer:
            layers[n] = ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else 0.0
    overall = dot / math.sqrt(n1 * n2) if n1 > 0 and n2 > 0 else 0.0
    return CosineResult(overall, layers, len(shared))


def off_anchor_fraction(direction: Mapping[str, Tensor], anchors: Mapping[str, Any]) -> dict[str, float]:
    """``‖R·d‖_F / ‖d‖_F`` per anchored weight: the share of an update the AsFT penalty sees.

    ``R = I − C`` (``C`` for ``subspace`` anchors), applied on the output side of ``d`` in
    (out, in) layout, as the optimizer does. Anchor files hold ``C``, not ``V``, so this is
    the anchors' view of an update; cosines with ``d_aligned`` need the checkpoints.
    For an orthogonal (projector) anchor the value lies in [0, 1]; 1 means the update is
    entirely off the alignment subspace. Weights without an anchor are skipped.
    """
    layouts = getattr(anchors, "weights", {})
    out = {}
    for name, t in direction.items():
        if name not in anchors:
            continue
        layout = layouts[name].layout if name in layouts else "out_in"
        proj = anchors[name]
        x = to_out_in(t.detach(), layout).to(torch.promote_types(proj.factor.dtype, torch.float32))
        x = x.to(torch.promote_types(x.dtype, t.dtype))
        r = proj.to(x.device, x.dtype).residual(x)
        norm = float(x.double().norm())
        out[name] = float(r.double().norm()) / norm if norm > 0 else 0.0
    if not out:
        raise AnchorError("the direction touches no anchored weight")
    return out
