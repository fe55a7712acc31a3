"""Checks of an :class:`~asft_optim.AnchoredOptimizer`'s arguments, run before it is built.

Kept apart from the optimizer so that its module holds the torch.optim shim and the
step; every check here raises ``ValueError`` (bad values) and runs once, at construction
or when a param group is added, never in ``step()``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.optim import Optimizer

__all__ = ["Coupling", "check_inner", "check_lambda"]

Coupling = Literal["coupled", "decoupled"]


def _same_lambda(a: Any, b: Any) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def check_lambda(value: Any, where: str = "anchor_lambda") -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number >= 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {where}: {value!r} (must be a finite number >= 0)") from None
    if not v >= 0.0 or v == float("inf"):
        raise ValueError(f"Invalid {where}: {value!r} (must be finite and >= 0)")


def check_inner(optimizer: Optimizer, anchor_lambda: Any, coupling: str) -> Any:
    """Check the inner optimizer, λ and the coupling; return the λ to use.

    ``anchor_lambda=None`` means 1.0, or the λ an already anchored inner optimizer
    carries; wrapping it again with a different explicit λ raises (its param groups
    would keep theirs).
    """
    previous = optimizer.defaults.get("anchor_lambda")  # set by an earlier wrapper
    if anchor_lambda is None:
        anchor_lambda = 1.0 if previous is None else previous
    check_lambda(anchor_lambda)
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
    return anchor_lambda
