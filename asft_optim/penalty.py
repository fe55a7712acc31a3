"""The loss-level twin of the optimizer: ``loss = task + anchor_penalty(model, anchors)``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .anchors import to_out_in
from .projection import AnchorError, Projection
from .targets import Target, check_shapes, find_targets


def target_penalty(target: Target, proj: Projection, reference: Tensor | None = None) -> Tensor | None:
    """Differentiable raw penalty ``‖R ΔW‖²`` of one target (None: no active update).

    A LoRA adapter that needs an origin (PiSSA, OLoRA, LoftQ, ...) uses ``target.origin``:
    ΔW = s·B·A - s₀·B₀A₀ (:class:`AnchorError` if it was not recorded).
    """
    if target.kind == "lora":
        factors = target.lora_factors()
        if not factors:
            return None
        origins = target.origin_blocks(target.adapters()) if target.needs_origin else []
        like = factors[0][0]
        b = torch.cat([f[0] * f[2] for f in factors] + [b0.to(like) for b0, _ in origins], 1)
        a = torch.cat([f[1] for f in factors] + [a0.to(like) for _, a0 in origins], 0)
        proj = target._proj(proj, b)
        b, a = b.to(proj.factor.dtype), a.to(proj.factor.dtype)
        rb = proj.residual(b)
        # ‖R B A‖² = tr((RB)ᵀ RB · A Aᵀ): no d_out × d_in product.
        return ((rb.transpose(0, 1) @ rb) * (a @ a.transpose(0, 1))).sum()
    if target.kind == "full":
        if reference is None:
            reference = target.default_reference()
        if reference is None:
            raise AnchorError(f"{target.name}: fully tuned weight needs a reference weight")
        w = target.base_weight()
        proj = target._proj(proj, w)
        delta = to_out_in(w.to(proj.factor.dtype) - reference.to(w.device, proj.factor.dtype), target.layout)
        return proj.residual(delta).pow(2).sum()
    delta = target.effective_delta()
    if delta is None:
        return None
    proj = target._proj(proj, delta)
    return proj.residual(delta.to(proj.factor.dtype)).pow(2).sum()


def anchor_penalty(
    model: nn.Module,
    anchors: Mapping[str, Projection],
    anchor_lambda: float = 1.0,
    *,
    reference: Mapping[str, Tensor] | None = None,
    origins: Mapping[str, Mapping[str, tuple[Tensor, Tensor]]] | None = None,
    strict: bool = True,
) -> Tensor:
    r"""Differentiable :math:`\lambda \sum \lVert R\,\Delta W\rVert_F^2` over the anchored weights.

    Adding it to the task loss and stepping a plain optimizer equals stepping
    :class:`AnchoredOptimizer` (coupled) on the task loss alone.

    Args:
        model: the model being tuned.
        anchors: ``{HF weight name: Projection}``.
        anchor_lambda: λ (default: 1.0).
        reference: ``{name: W_ref}`` for fully tuned weights (default: None; required
            when an anchored weight is trained directly, except a PEFT ``modules_to_save``
            copy, measured from its frozen original).
        origins: ``{name: {adapter: (B₀, A₀)}}`` for LoRA adapters whose init rewrote the
            base weight (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA): ΔW = s·B·A - s₀·B₀A₀ with
            ``(B₀, A₀)`` the adapter's value before training, shaped like the parameters
            (default: None). Being stateless, this function cannot know them: without them
            such a model raises :class:`AnchorError` (the optimizer records them itself;
            ``{t.name: t.origin for t in opt.targets}`` is what it holds).
        strict: raise if an anchor matches no module (default: True).

    Example::

        >>> loss = task_loss + anchor_penalty(peft_model, anchors, anchor_lambda=1.0)
    """
    if isinstance(anchor_lambda, (int, float)) and not 0.0 <= anchor_lambda < float("inf"):
        raise ValueError(f"Invalid anchor_lambda: {anchor_lambda!r} (must be finite and >= 0)")
    targets, missing = find_targets(model, anchors, record_origin=False)
    if missing and strict:
        raise AnchorError(f"{len(missing)} anchor(s) match no module of the model (first: {missing[:5]})")
    check_shapes(targets, anchors)
    total: Tensor | None = None
    for t in targets:
        if t.kind == "full" and not t.base_weight().requires_grad:
            continue
        ref = (reference or {}).get(t.name)
        if t.needs_origin:
            t.origin.update((origins or {}).get(t.name, {}))
        p = target_penalty(t, anchors[t.name], ref)
        if p is not None:
            total = p if total is None else total + p
    if not targets:
        raise AnchorError(f"no anchor matches a module of the model (anchors: {list(anchors)[:5]})")
    if total is None:
        # Matched, but every adapter is merged/disabled or no weight is trainable: ΔW has no
        # trainable part right now, so the penalty is a constant 0.
        return torch.zeros((), dtype=torch.float32)
    return anchor_lambda * total
