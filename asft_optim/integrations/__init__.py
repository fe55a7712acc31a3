"""Glue for the training loops people already run (imported lazily).

* :mod:`asft_optim.integrations.hf`: :class:`AnchorLoggingCallback` (Trainer logs) and
  :class:`AnchoredAdamWFactory` (``optimizer_cls_and_kwargs=``, TRL ``peft_config=``).
* :func:`unwrap_optimizer` / :func:`anchor_summary`: the anchored optimizer behind
  accelerate's ``AcceleratedOptimizer`` (or any ``.optimizer`` wrapper), and its
  statistics in one line for plain loops.

Nothing here imports transformers until an ``hf`` name is used.
"""

from __future__ import annotations

from typing import Any

_HF_NAMES = ("AnchorLambdaCallback", "AnchorLoggingCallback", "AnchoredAdamWFactory")

__all__ = ["AnchorLambdaCallback", "AnchorLoggingCallback", "AnchoredAdamWFactory", "anchor_summary", "unwrap_optimizer"]


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


def __getattr__(name: str):
    if name in _HF_NAMES:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
