"""Checks of an :class:`~asft_optim.AnchoredOptimizer`'s arguments, run before it is built.

Kept apart from the optimizer so that its module holds the torch.optim shim and the
step; every check here raises ``ValueError`` (bad values). They run at construction or
when a param group is added; the cheap ones (no device sync) again at the start of each
``step()``, before it changes anything.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["Coupling", "check_decoupled", "check_inner", "lambda_value"]

Coupling = Literal["coupled", "decoupled"]


def _same_lambda(a: Any, b: Any) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def lambda_value(value: Any, where: str = "anchor_lambda") -> float | Tensor:
    """``value`` as a penalty strength λ, or ``ValueError`` naming ``where``: the one check
    every route runs (constructors, ``add_param_group``, each ``step()`` before it changes
    anything, :class:`~asft_optim.AnchorPenalty`, the λ scheduler).

    Accepts a real number (NumPy scalars too; returned as a Python float) that is finite
    and >= 0, or a 0-d floating-point tensor (kept as is, so a schedule can drive it on the
    device; its value is not read here: that would synchronise).
    """
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.dtype.is_floating_point:
            raise ValueError(f"Invalid {where}: a tensor λ must be a 0-d floating tensor, got {tuple(value.shape)} {value.dtype}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {where}: {value!r} ({type(value).__name__}; must be a finite number >= 0)")
    v = float(value)
    if not (v >= 0.0 and math.isfinite(v)):
        raise ValueError(f"Invalid {where}: {value!r} (must be finite and >= 0)")
    return v


def check_decoupled(lr: Any, lam: Any, where: str) -> None:
    """Decoupled mode moves the weights by ``-lr·λ·∇P``: refuse a step size that
    overshoots (``2·lr·λ >= 1`` flips the sign of the off-anchor part each step and runs to
    NaN) and an lr that is not a number (Adafactor's relative step: lr is None)."""
    if lr is None or isinstance(lr, bool) or not isinstance(lr, (numbers.Real, Tensor)):
        raise ValueError(
            f"coupling='decoupled' needs a numeric lr in every param group ({where} has lr={lr!r}, "
            "e.g. Adafactor with relative_step=True): give the inner optimizer an lr, or use coupling='coupled'"
        )
    if isinstance(lr, numbers.Real) and isinstance(lam, numbers.Real) and 2.0 * float(lr) * float(lam) >= 1.0:
        raise ValueError(
            f"coupling='decoupled' with lr={lr!r} and anchor_lambda={lam!r} ({where}): 2·lr·λ = "
            f"{2.0 * float(lr) * float(lam):.3g} >= 1 overshoots every step (the pull -lr·λ·∇P then flips the "
            "off-anchor part of ΔW and diverges); lower λ or lr so that 2·lr·λ < 1, or use coupling='coupled'"
        )


def check_inner(optimizer: Optimizer, anchor_lambda: Any, coupling: str) -> Any:
    """Check the inner optimizer, λ and the coupling; return the λ to use.

    ``anchor_lambda=None`` means 1.0, or the λ an already anchored inner optimizer
    carries; wrapping it again with a different explicit λ raises (its param groups
    would keep theirs).
    """
    previous = optimizer.defaults.get("anchor_lambda")  # set by an earlier wrapper
    if anchor_lambda is None:
        anchor_lambda = 1.0 if previous is None else previous
    anchor_lambda = lambda_value(anchor_lambda)
    if previous is not None:
        held = {g.get("anchor_lambda", previous) for g in optimizer.param_groups} | {previous}
        if any(not _same_lambda(v, anchor_lambda) for v in held):
            raise ValueError(
                f"this inner optimizer is already anchored with anchor_lambda={sorted(map(float, held))}; "
                f"re-wrapping it with anchor_lambda={anchor_lambda!r} would be ignored by its param "
                "groups: pass anchor_lambda=None to keep them, or set group['anchor_lambda'] to change λ"
            )
    if coupling not in ("coupled", "decoupled"):
        raise ValueError(f"Invalid coupling: {coupling!r} (expected 'coupled' or 'decoupled')")
    if coupling == "decoupled" and isinstance(optimizer, torch.optim.LBFGS):
        # LBFGS re-evaluates the closure inside its step; a decoupled move of the
        # weights between evaluations has no meaning there.
        raise ValueError("coupling='decoupled' does not support LBFGS; use coupling='coupled'")
    if any(g.get("fused") for g in optimizer.param_groups) or getattr(
        optimizer, "_step_supports_amp_scaling", False
    ):
        # A fused step unscales AMP gradients itself, after ours would have been added to
        # still-scaled gradients: the penalty would be off by the loss scale.
        raise ValueError("fused inner optimizers are not supported; build it with fused=False")
    if coupling == "decoupled":
        for i, g in enumerate(optimizer.param_groups):
            check_decoupled(g.get("lr"), g.get("anchor_lambda", anchor_lambda), f"param group {i}")
    return anchor_lambda
