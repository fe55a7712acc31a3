"""Glue for the training loops people already run (imported lazily).

* :mod:`asft_optim.integrations.hf`: :class:`AnchorLoggingCallback` (Trainer logs),
  :class:`AnchoredAdamWFactory` (``optimizer_cls_and_kwargs=``, TRL ``peft_config=``) and
  :class:`AnchorPenaltyMixin` (the loss-level penalty in a Trainer, DeepSpeed ZeRO-0/1/2),
  :class:`EMACallback` (a :class:`~asft_optim.ema.ParameterEMA` of the trained tensors).
* :func:`unwrap_optimizer` / :func:`anchor_summary`: the anchored optimizer behind
  accelerate's ``AcceleratedOptimizer`` (or any ``.optimizer`` wrapper), and its
  statistics in one line for plain loops.

Nothing here imports transformers until an ``hf`` name is used.
"""

from __future__ import annotations

from .unwrap import anchor_summary, unwrap_optimizer

_HF_NAMES = ("AnchorLambdaCallback", "AnchorLoggingCallback", "AnchorPenaltyMixin", "AnchoredAdamWFactory",
             "EMACallback")

__all__ = [
    "AnchorLambdaCallback",
    "AnchorLoggingCallback",
    "AnchorPenaltyMixin",
    "AnchoredAdamWFactory",
    "EMACallback",
    "anchor_summary",
    "unwrap_optimizer",
]


def __getattr__(name: str):
    if name in _HF_NAMES:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
