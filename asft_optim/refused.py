"""Routes the library refuses with a clear error instead of training silently without the penalty.

DeepSpeed's optimizer route is the one such route today (its loss-level route, ZeRO stage
0-2, is :class:`~asft_optim.integrations.hf.AnchorPenaltyMixin`). Its engine, set up by the HF Trainer when
``TrainingArguments(deepspeed=...)`` is given (or by ``accelerate launch`` with a DeepSpeed
plugin), drops the optimizer passed in ``optimizers=(opt, None)`` and builds its own AdamW;
ZeRO-1/2 flatten the parameters the anchored step must see, and ZeRO-3 partitions them to
empty placeholders. Any of them would train without the anchor penalty, or with a wrong one.

Nothing here imports transformers, accelerate or DeepSpeed: the checks read what those
libraries already set up (the Trainer's DeepSpeed config and accelerate's environment flag).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from .projection import AnchorError

__all__ = [
    "DEEPSPEED_ALTERNATIVES",
    "deepspeed_in_use",
    "refuse_deepspeed",
    "refuse_zero3_partitions",
    "zero3_partitioned",
]

#: What to use instead, named in every DeepSpeed refusal.
DEEPSPEED_ALTERNATIVES = (
    "with DeepSpeed ZeRO stage 0-2, the loss-level penalty: class AnchoredTrainer(AnchorPenaltyMixin, "
    "Trainer) from asft_optim.integrations, built with anchors=...; or train without deepspeed=: "
    "one process, DDP, or sharded with FSDP2 "
    "(TrainingArguments(fsdp='full_shard', fsdp_config={'fsdp_version': 2})) or torch's "
    "ZeroRedundancyOptimizer, with optimizers=(AnchoredAdamW(model, anchors, ...), None) or "
    "optimizer_cls_and_kwargs=(AnchoredAdamWFactory, {...})"
)


def deepspeed_in_use(args: Any = None) -> str | None:
    """A description of the DeepSpeed set-up in use (``"DeepSpeed ZeRO stage 3"``), or None.

    With ``args`` (HF ``TrainingArguments``), their ``deepspeed`` setting decides alone.
    Without, looks at the DeepSpeed config the HF Trainer registers while its
    ``TrainingArguments`` live, then at accelerate's ``ACCELERATE_USE_DEEPSPEED`` flag
    (``accelerate launch`` with a DeepSpeed plugin).

    Args:
        args: HF ``TrainingArguments``, or None (default: None).
    """
    config = None
    if args is not None:
        hf_ds = getattr(args, "hf_deepspeed_config", None)
        if hf_ds is not None:
            config = getattr(hf_ds, "config", None)
        elif getattr(args, "deepspeed", None):
            config = args.deepspeed if isinstance(args.deepspeed, dict) else {}
        return None if config is None else _describe(config)
    module = sys.modules.get("transformers.integrations.deepspeed")
    if module is not None and hasattr(module, "deepspeed_config"):
        config = module.deepspeed_config()
    if config is None:
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes", "on"):
            return "DeepSpeed (ACCELERATE_USE_DEEPSPEED is set)"
        return None
    return _describe(config)


def _describe(config: Any) -> str:
    zero = config.get("zero_optimization", {}) if isinstance(config, dict) else {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    return f"DeepSpeed ZeRO stage {stage}"


def refuse_deepspeed(where: str, args: Any = None) -> None:
    """Raise :class:`AnchorError` if DeepSpeed is in use (see :func:`deepspeed_in_use`).

    Args:
        where: who refuses, first words of the message (e.g. ``"AnchoredAdamW"``).
        args: HF ``TrainingArguments``, or None (default: None).

    Example::

        >>> refuse_deepspeed("AnchoredAdamWFactory")  # at the top of a constructor
    """
    found = deepspeed_in_use(args)
    if found is not None:
        raise AnchorError(
            f"{where}: {found} is not supported: the DeepSpeed engine replaces the optimizer given to "
            "the Trainer by its own AdamW, and ZeRO flattens (stages 1-2) or partitions (stage 3) the "
            "weights the anchored step reads, so training would go on without the anchor penalty or "
            f"with a wrong one. Supported instead: {DEEPSPEED_ALTERNATIVES}"
        )


def zero3_partitioned(model: Any) -> list[str]:
    """Names of ``model``'s parameters that DeepSpeed ZeRO-3 has partitioned.

    Such a parameter is an empty placeholder (``shape == (0,)``) carrying ``ds_id`` and
    ``ds_shape``; its values live in DeepSpeed's partitions.
    """
    return [n for n, p in model.named_parameters() if hasattr(p, "ds_id") and hasattr(p, "ds_shape")]


def refuse_zero3_partitions(model: Any, where: str) -> None:
    """Raise :class:`AnchorError` if any parameter of ``model`` is a ZeRO-3 partition.

    For constructors that read weight shapes (anchors bound to a model): a partitioned
    weight reads as shape ``(0,)``, which would otherwise surface as a shape mismatch or
    an ``IndexError``.

    Example::

        >>> refuse_zero3_partitions(model, "AnchoredAdamW")  # before binding anchors
    """
    names = zero3_partitioned(model)
    if names:
        raise AnchorError(
            f"{where}: {len(names)} parameter(s) of the model are DeepSpeed ZeRO-3 partitions "
            f"(empty placeholders, first: {names[:3]}); DeepSpeed is not supported. "
            f"Supported instead: {DEEPSPEED_ALTERNATIVES}"
        )
