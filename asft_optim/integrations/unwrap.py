"""The anchored optimizer behind a wrapper (accelerate, DeepSpeed-style), and its statistics.

No third-party import: ``asft_optim.integrations`` re-exports these eagerly, and
:mod:`~asft_optim.integrations.hf` imports them from here (not from the package, which
imports ``hf`` lazily).
"""

from __future__ import annotations

from typing import Any

__all__ = ["anchor_summary", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: Any):
    """The :class:`~asft_optim.AnchoredOptimizer` inside ``optimizer``, or None.

    Follows ``.optimizer`` links (accelerate's ``AcceleratedOptimizer``, DeepSpeed-style
    wrappers) until an anchored optimizer is found.
    """
    from ..optimizer import AnchoredOptimizer

    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, AnchoredOptimizer):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def anchor_summary(optimizer: Any) -> dict[str, float]:
    """``{"anchor/penalty", "anchor/off_anchor_mean", "anchor/off_anchor_max"}`` of the last step.

    Accepts the anchored optimizer or anything wrapping it; ``{}`` before the first step.
    Raises ``TypeError`` when no anchored optimizer is inside.
    """
    opt = unwrap_optimizer(optimizer)
    if opt is None:
        raise TypeError(f"{type(optimizer).__name__} does not contain an AnchoredOptimizer")
    return opt.anchor_summary()
