"""Safe LoRA (Hsu et al. 2024): post hoc, per LoRA adapter, compare ``K·B·A`` with ``B·A``
and replace ``B`` by ``K·B`` on the least aligned layers.

``K`` is the operator that *keeps* the safe part of an update, ``K x = x - R x``:
``K = C`` for the alignment modes (``safelora``: Safe LoRA's own ``V Vᵀ/‖V‖_F``;
``orthogonal``: ``U_k U_kᵀ``) and ``K = I - C`` for ``subspace`` anchors (project the
harmful directions out).

No d×d (or d_out×d_in) product is formed: with ``G = A Aᵀ`` (r×r),
``⟨KBA, BA⟩ = tr((KB)ᵀB·G)``, ``‖KBA‖² = tr((KB)ᵀKB·G)``, ``‖BA‖² = tr(BᵀB·G)``;
the LoRA scaling ``s`` cancels in the cosine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..discovery import check_shapes, find_targets
from ..layout import math_dtype
from ..projection import AnchorError, Projection
from ..targets import DeltaWeightTarget, LoraTarget, Target

__all__ = ["DEFAULT_THRESHOLD", "SafeLoRALayer", "kept", "lora_cosine", "safe_lora_project"]

#: Safe LoRA's default similarity threshold (mode "threshold" of IBM/SafeLoRA).
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class SafeLoRALayer:
    """One row of :func:`safe_lora_project`'s report.

    ``cosine`` is ``cos(K·B·A, B·A)`` before projection (NaN when ``B·A = 0``: such an
    adapter is never selected); ``projected`` says whether ``B`` was (or, in a dry run,
    would be) replaced by ``K·B``.
    """

    name: str
    adapter: str
    cosine: float
    projected: bool


def kept(proj: Projection, x: Tensor) -> Tensor:
    """``K x``: the component of ``x`` (d_out, n) the anchor allows (``x - R x``)."""
    return x - proj.residual(x)


def lora_cosine(proj: Projection, lora_b: Tensor, lora_a: Tensor) -> Tensor:
    """``cos(K·B·A, B·A)`` through r×r Gram matrices (0-d tensor; NaN if ``B·A = 0``).

    Args:
        proj: the anchor of the weight.
        lora_b: ``B`` (d_out, r), in the dtype and device of ``proj``.
        lora_a: ``A`` (r, d_in).
    """
    kb = kept(proj, lora_b)
    gram_a = lora_a @ lora_a.transpose(0, 1)
    inner = ((kb.transpose(0, 1) @ lora_b) * gram_a).sum()
    kept_sq = ((kb.transpose(0, 1) @ kb) * gram_a).sum().clamp_min(0.0)
    delta_sq = ((lora_b.transpose(0, 1) @ lora_b) * gram_a).sum().clamp_min(0.0)
    denom = torch.sqrt(kept_sq * delta_sq)
    if float(delta_sq) == 0.0:
        return torch.full_like(inner, math.nan)
    if float(denom) == 0.0:  # the whole update is penalised: K·B·A = 0
        return torch.zeros_like(inner)
    return (inner / denom).clamp(-1.0, 1.0)


def _select(cosines: list[float], threshold: float | None, num_layers: int | None) -> list[bool]:
    finite = [i for i, c in enumerate(cosines) if not math.isnan(c)]
    if num_layers is not None:
        lowest = sorted(finite, key=lambda i: cosines[i])[:num_layers]  # stable: model order on ties
        chosen = set(lowest)
    else:
        chosen = {i for i in finite if cosines[i] <= threshold}
    return [i in chosen for i in range(len(cosines))]


@torch.no_grad()
def safe_lora_project(
    model: nn.Module,
    anchors: Mapping[str, Projection],
    *,
    threshold: float | None = None,
    num_layers: int | None = None,
    dry_run: bool = False,
) -> list[SafeLoRALayer]:
    r"""Safe LoRA: replace ``B`` by ``K·B`` for the LoRA adapters least aligned with the anchors.

    .. math::
        \cos_\ell = \frac{\langle K B A,\, B A\rangle_F}{\lVert K B A\rVert_F\,\lVert B A\rVert_F},
        \qquad B \leftarrow K B \text{ where selected}

    Every cosine is computed before anything changes; then the selected ``B`` are
    replaced in place (never in a dry run). Each active, unmerged adapter of each
    anchored LoRA module is one row.

    Args:
        model: a PEFT LoRA model.
        anchors: ``{HF weight name: Projection}`` (any mode but ``l2``).
        threshold: project rows with ``cos <= threshold`` (default: 0.5 when
            ``num_layers`` is not given either).
        num_layers: project the ``num_layers`` rows with the lowest cosine instead.
        dry_run: compute the report only; the model is left untouched (default: False).

    Returns:
        One :class:`SafeLoRALayer` per (anchored module, adapter), in model order.

    Example::

        >>> report = safe_lora_project(peft_model, anchors, threshold=0.5)
        >>> [r.name for r in report if r.projected]
    """
    threshold = _checked_selection(threshold, num_layers)
    rows = _adapter_rows(model, anchors)
    cosines = [float(r.cosine) for r in rows]
    chosen = _select(cosines, threshold, num_layers)
    if not dry_run:
        for row, yes in zip(rows, chosen, strict=True):
            if yes:
                row.b_param.copy_(row.kept_b.reshape(row.b_param.shape).to(row.b_param.dtype))
    return [SafeLoRALayer(r.name, r.adapter, c, yes) for r, c, yes in zip(rows, cosines, chosen, strict=True)]


def _checked_selection(threshold: float | None, num_layers: int | None) -> float | None:
    """The threshold to use (Safe LoRA's default when neither rule is given)."""
    if threshold is not None and num_layers is not None:
        raise ValueError("give threshold or num_layers, not both")
    if num_layers is None:
        threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
        if math.isnan(threshold):
            raise ValueError("threshold must not be NaN")
    elif not (isinstance(num_layers, int) and num_layers >= 0):
        raise ValueError(f"Invalid num_layers: {num_layers!r} (must be an int >= 0)")
    return threshold


def _plain_lora_targets(model: nn.Module, anchors: Mapping[str, Projection]) -> list[Target]:
    """The anchored targets, refusing what Safe LoRA cannot project (``B`` of ``s·B·A`` only)."""
    if any(p.mode == "l2" for p in anchors.values()):
        raise AnchorError("l2 anchors keep nothing (C = 0): Safe LoRA needs an alignment or subspace anchor")
    targets, missing = find_targets(model, anchors)
    if missing:
        raise AnchorError(f"{len(missing)} anchor(s) match no module of the model (first: {missing[:5]})")
    check_shapes(targets, anchors)
    bad = [t.name for t in targets if isinstance(t, DeltaWeightTarget)]
    if bad:
        raise AnchorError(f"Safe LoRA projects plain LoRA adapters only; DoRA/other tuners on {bad[:5]}")
    bad = [t.name for t in targets if isinstance(t, LoraTarget) and t.needs_origin]
    if bad:
        raise AnchorError(
            "Safe LoRA projects B of ΔW = s·B·A; a PiSSA/OLoRA/LoftQ/CorDA/LoRA-GA adapter's update is "
            f"s·B·A - s₀·B₀A₀ (on {bad[:5]}): convert it to a plain LoRA adapter first (PEFT's "
            "save_pretrained(path_initial_model_for_weight_conversion=...))"
        )
    return targets


@dataclass(frozen=True)
class _AdapterRow:
    """One (anchored module, adapter) before anything changes: its cosine and ``K·B``."""

    name: str
    adapter: str
    cosine: Tensor
    kept_b: Tensor
    b_param: Tensor


def _adapter_rows(model: nn.Module, anchors: Mapping[str, Projection]) -> list[_AdapterRow]:
    rows = []
    for t in _plain_lora_targets(model, anchors):
        if not isinstance(t, LoraTarget):
            continue  # anchored weight without a LoRA adapter: nothing to project
        for f in t.lora_factors():
            dtype = math_dtype(f.b)
            proj = anchors[t.name].to(f.b.device, dtype)
            b, a = f.b.detach().to(dtype), f.a.detach().to(dtype)
            rows.append(_AdapterRow(t.name, f.adapter, lora_cosine(proj, b, a), kept(proj, b), f.b_param))
    if not rows:
        raise AnchorError("no anchored module has an active, unmerged LoRA adapter")
    return rows
