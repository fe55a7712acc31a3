"""Hugging Face Trainer / TRL glue: a logging callback and a model-aware optimizer factory.

Both routes of the Trainer are covered:

* ``Trainer(..., optimizers=(AnchoredAdamW(model, anchors, lr=...), None))``, with
  ``callbacks=[AnchorLoggingCallback()]`` for the statistics;
* ``Trainer(..., optimizer_cls_and_kwargs=(AnchoredAdamWFactory, {"anchors": anchors,
  "lr": 5e-4}))``, which also works with TRL's ``SFTTrainer(peft_config=...)`` because
  the optimizer is built on the model the Trainer finally trains.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from transformers import TrainerCallback

from ..ema import ParameterEMA
from ..optimizer import AnchoredAdamW, Coupling
from ..penalty import anchor_penalty
from ..projection import AnchorError, Projection
from ..refused import DEEPSPEED_ALTERNATIVES, refuse_deepspeed, zero3_partitioned
from ..schedule import AnchorLambdaScheduler, LambdaFn
from .unwrap import unwrap_optimizer

__all__ = [
    "AnchorLambdaCallback",
    "AnchorLoggingCallback",
    "AnchorPenaltyMixin",
    "AnchoredAdamWFactory",
    "EMACallback",
    "add_anchor_logging",
    "check_trainer_optimizer",
]

# The Trainer's own rule for parameters that get no weight decay (transformers 5.x
# ``Trainer.get_decay_parameter_names``): biases, LayerNorm modules and *norm* names.
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def check_trainer_optimizer(optimizer: Any, args: Any = None, *, who: str = "asft-optim"):
    """The :class:`~asft_optim.AnchoredOptimizer` the Trainer will step, or an error.

    Called by the callbacks at ``on_train_begin``: a Trainer that replaced the anchored
    optimizer (DeepSpeed drops ``optimizers=(opt, None)``) would otherwise train without
    the penalty and say nothing.

    Raises:
        AnchorError: DeepSpeed is in use (its message names the supported routes).
        TypeError: the Trainer's optimizer is not anchored for another reason.
    """
    opt = unwrap_optimizer(optimizer)
    if opt is not None:
        return opt
    refuse_deepspeed(f"{who}: the Trainer's optimizer is {type(optimizer).__name__}, not the anchored one", args)
    raise TypeError(
        f"{who}: the Trainer's optimizer ({type(optimizer).__name__}) is not an AnchoredOptimizer; pass "
        "optimizers=(AnchoredAdamW(model, anchors, ...), None) or "
        "optimizer_cls_and_kwargs=(AnchoredAdamWFactory, {...})"
    )


class AnchorLoggingCallback(TrainerCallback):
    """Adds ``opt.anchor_summary()`` to the Trainer's logs at every logging step.

    The keys ``anchor/penalty`` (Σ λ‖RΔW‖²), ``anchor/off_anchor_mean`` and
    ``anchor/off_anchor_max`` (‖RΔW‖/‖ΔW‖) are the values of the *last* optimizer step
    before the log, not averages over ``logging_steps``. They go into
    ``trainer.state.log_history`` and into the ``logs`` every later callback receives.
    The Trainer runs its ``report_to`` callbacks (TensorBoard, W&B, ...) before the
    ones passed in ``callbacks=``; use :func:`add_anchor_logging` so that they see the
    anchor keys too.

    Args:
        prefix: replaces the ``"anchor/"`` prefix of the keys (default: None, keep it).
        strict: raise if the Trainer's optimizer is not anchored (default: True);
            with False such logs are left unchanged.
    """

    def __init__(self, prefix: str | None = None, strict: bool = True) -> None:
        self.prefix = prefix
        self.strict = strict

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        # Before the first step: a replaced optimizer (DeepSpeed) must not train unanchored.
        if self.strict:
            check_trainer_optimizer(optimizer, args, who="AnchorLoggingCallback")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs and "train_loss" not in logs:
            return  # evaluation / end-of-training summaries: nothing new to add
        opt = unwrap_optimizer(kwargs.get("optimizer"))
        if opt is None:
            if self.strict:
                raise TypeError(
                    "AnchorLoggingCallback: the Trainer's optimizer "
                    f"({type(kwargs.get('optimizer')).__name__}) is not an AnchoredOptimizer"
                )
            return
        summary = opt.anchor_summary()
        if self.prefix is not None:
            summary = {self.prefix + k.split("/", 1)[1]: v for k, v in summary.items()}
        logs.update(summary)
        # Trainer.log() appends a *copy* of ``logs`` to the history before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(summary)


class AnchorLambdaCallback(TrainerCallback):
    """Schedule λ in a Trainer run: ``anchor_lambda = λ₀ · lambda_fn(global_step)``.

    The step comes from the Trainer's own ``global_step``, so a run resumed from a
    checkpoint continues the schedule where it stopped (λ₀ is saved in the optimizer's
    param groups as ``initial_anchor_lambda``).

    Example::

        >>> ramp = AnchorLambdaCallback(lambda t: min(1.0, t / 100))
        >>> Trainer(..., optimizers=(opt, None), callbacks=[ramp])
    """

    def __init__(self, lambda_fn: LambdaFn) -> None:
        self.lambda_fn = lambda_fn
        self.scheduler: AnchorLambdaScheduler | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = check_trainer_optimizer(optimizer, args, who="AnchorLambdaCallback")
        self.scheduler = AnchorLambdaScheduler(opt, self.lambda_fn)
        self.scheduler.set_step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.scheduler is not None:
            self.scheduler.set_step(state.global_step)


class EMACallback(TrainerCallback):
    """Keep a :class:`~asft_optim.ema.ParameterEMA` in a Trainer run: one
    :meth:`~asft_optim.ema.ParameterEMA.update` after every optimizer step (``on_step_end``:
    after the step, once per gradient-accumulation cycle).

    Build the EMA on the model before ``trainer.train()``, so that it starts at the
    model's weights (an aligned model; a fresh LoRA adapter's ``B = 0``). Each checkpoint
    the Trainer saves gets the EMA's state as ``ema.pt``; to resume, load it before
    ``train(resume_from_checkpoint=...)``: ``ema.load_state_dict(torch.load(ckpt / "ema.pt",
    weights_only=True))``. A run resumed at step N with an EMA that has not seen N updates
    is refused at ``on_train_begin`` (it would restart the average at the trained weights).

    Args:
        ema: the EMA to update.
        copy_at_end: write the average into the model's tensors when training ends
            (default: False: the model keeps its trained weights; call ``ema.copy_to()``).

    Example::

        >>> ema = ParameterEMA([p for p in model.parameters() if p.requires_grad], beta=0.9)
        >>> Trainer(model, args, ..., callbacks=[EMACallback(ema, copy_at_end=True)]).train()
    """

    FILE = "ema.pt"

    def __init__(self, ema: ParameterEMA, copy_at_end: bool = False) -> None:
        self.ema = ema
        self.copy_at_end = copy_at_end

    def on_train_begin(self, args, state, control, **kwargs):
        if self.ema.steps != state.global_step:
            raise ValueError(
                f"EMACallback: the Trainer starts at step {state.global_step} but the EMA has seen "
                f"{self.ema.steps} updates; when resuming, load the checkpoint's {self.FILE} into it first")

    def on_step_end(self, args, state, control, **kwargs):
        self.ema.update()

    def on_save(self, args, state, control, **kwargs):
        import os

        import torch
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if state.is_world_process_zero:  # where the Trainer has just written its checkpoint
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            torch.save(self.ema.state_dict(), os.path.join(folder, self.FILE))

    def on_train_end(self, args, state, control, **kwargs):
        if self.copy_at_end:
            self.ema.copy_to()

    def summary(self) -> dict[str, float]:
        """``ema/beta`` and ``ema/updates`` (the optimizer steps averaged so far)."""
        return {"ema/beta": self.ema.beta, "ema/updates": self.ema.steps}


def add_anchor_logging(trainer, **kwargs: Any) -> AnchorLoggingCallback:
    """Register an :class:`AnchorLoggingCallback` *first* among ``trainer``'s callbacks.

    Then the ``report_to`` integrations (TensorBoard, W&B, MLflow, ...) log the anchor
    statistics too. Returns the callback.
    """
    cb = AnchorLoggingCallback(**kwargs)
    trainer.callback_handler.callbacks.insert(0, cb)
    return cb


def _decay_parameter_names(model: nn.Module) -> set[str]:
    from transformers.trainer_pt_utils import get_parameter_names

    return set(get_parameter_names(model, [nn.LayerNorm], _NO_DECAY_PATTERNS))


class AnchoredAdamWFactory:
    r"""Model-aware factory for ``Trainer(optimizer_cls_and_kwargs=(AnchoredAdamWFactory, kw))``.

    transformers treats a class that is not a ``torch.optim.Optimizer`` subclass as a
    factory: it calls ``AnchoredAdamWFactory()(model, **kw)`` with the model it trains
    (after TRL's ``peft_config=`` wrapping), so the optimizer sees the final parameters.
    The parameter groups follow the Trainer's own rule: ``weight_decay`` for weights,
    none for biases and norms.

    The Trainer passes no ``TrainingArguments`` to a factory: ``lr`` (required) and
    ``weight_decay`` must be given in ``kw``; the Trainer's LR scheduler still drives the
    LR from there. Do not put ``model`` in ``kw``.

    Args (of the call):
        model: the model being trained (passed by the Trainer).
        anchors: ``{HF weight name: Projection}``, e.g. from :func:`~asft_optim.build_anchors`.
        anchor_lambda: λ (default: 1.0).
        lr: peak learning rate (required).
        weight_decay: AdamW weight decay of weight matrices (default: 0.0, the Trainer's).
        coupling, reference, strict: see :class:`~asft_optim.AnchoredOptimizer`.
        **adamw_kwargs: ``betas``, ``eps``, ``amsgrad``, ``foreach``, ... as
            :class:`torch.optim.AdamW`.

    Example::

        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
        ...     optimizer_cls_and_kwargs=(AnchoredAdamWFactory, {"anchors": anchors, "lr": 5e-4}))
    """

    def __call__(
        self,
        model: nn.Module,
        anchors: Mapping[str, Projection] | None = None,
        anchor_lambda: float = 1.0,
        *,
        lr: float | None = None,
        weight_decay: float = 0.0,
        coupling: Coupling = "coupled",
        reference: Mapping[str, Tensor] | None = None,
        strict: bool = True,
        **adamw_kwargs: Any,
    ) -> AnchoredAdamW:
        # The Trainer calls the factory inside DeepSpeed's set-up, before ZeRO touches the
        # parameters: refusing here gives the reason, not an error from deep inside.
        refuse_deepspeed("AnchoredAdamWFactory")
        if anchors is None:
            raise TypeError("AnchoredAdamWFactory needs anchors=... in optimizer_cls_and_kwargs")
        if lr is None:
            raise TypeError(
                "AnchoredAdamWFactory needs lr=... in optimizer_cls_and_kwargs: the Trainer does not "
                "pass args.learning_rate to optimizer factories"
            )
        if "params" in adamw_kwargs:
            raise TypeError("AnchoredAdamWFactory builds the param groups itself; do not pass params=")
        decay = _decay_parameter_names(model)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in trainable if n in decay], "weight_decay": weight_decay},
            {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        return AnchoredAdamW(
            model, anchors, anchor_lambda, lr=lr, weight_decay=weight_decay, params=groups,
            coupling=coupling, reference=reference, strict=strict, **adamw_kwargs,
        )

    def __repr__(self) -> str:
        return "AnchoredAdamWFactory()"


class AnchorPenaltyMixin:
    r"""Trainer mixin adding the loss-level penalty to the training loss, for DeepSpeed ZeRO-0/1/2.

    .. math::
        L = L_\text{task} + \lambda \sum_W \|(I - C_W)\,\Delta W\|_F^2

    Under ``TrainingArguments(deepspeed=...)`` the Trainer steps DeepSpeed's optimizer, not an
    :class:`~asft_optim.AnchoredOptimizer`; the penalty then rides on the loss
    (:func:`~asft_optim.anchor_penalty`), whose gradient DeepSpeed reduces and applies like the
    task's. Equal to the coupled optimizer route for SGD-like updates; with AdamW the penalty
    gradient is normalised by Adam's second moment (coupled AsFT, as the reference code).

    Evaluation losses stay the task's. Refused (:class:`~asft_optim.AnchorError`): ZeRO-3
    (the weights are partitioned outside the forward pass), gradient accumulation (the
    Trainer rescales the loss per micro-batch in ways that differ by model), and an anchored
    optimizer (the penalty would count twice).

    Args (keyword, besides the Trainer's):
        anchors: ``{HF weight name: Projection}``, an :class:`~asft_optim.Anchors`.
        anchor_lambda: λ (default: 1.0).
        penalty_kwargs: passed to :func:`~asft_optim.anchor_penalty` (``reference=``, ...).

    Example::

        >>> class AnchoredTrainer(AnchorPenaltyMixin, Trainer): pass
        >>> AnchoredTrainer(model=peft_model, args=args_with_deepspeed, train_dataset=ds,
        ...                 anchors=anchors, anchor_lambda=1.0).train()
    """

    def __init__(self, *args: Any, anchors: Mapping[str, Projection], anchor_lambda: float = 1.0,
                 penalty_kwargs: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.anchors, self.anchor_lambda = anchors, anchor_lambda
        self.penalty_kwargs = dict(penalty_kwargs or {})
        if self.args.gradient_accumulation_steps != 1:
            raise AnchorError(
                f"AnchorPenaltyMixin: gradient_accumulation_steps={self.args.gradient_accumulation_steps} "
                "is not supported (the penalty must count once per step); use 1 and a larger batch"
            )

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        if not self.model.training:  # evaluation: the task's loss alone, as the optimizer route
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if unwrap_optimizer(self.optimizer) is not None:
            raise AnchorError(
                "AnchorPenaltyMixin: the Trainer's optimizer is anchored already and adds the penalty "
                "itself; use the mixin (DeepSpeed) or the anchored optimizer, not both"
            )
        partitioned = zero3_partitioned(self.model)
        if partitioned:
            raise AnchorError(
                f"AnchorPenaltyMixin: DeepSpeed ZeRO-3 is not supported ({len(partitioned)} partitioned "
                f"weights); use ZeRO stage 0-2 with this mixin, or: {DEEPSPEED_ALTERNATIVES}"
            )
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        penalty = anchor_penalty(self.model, self.anchors, self.anchor_lambda, **self.penalty_kwargs)
        # No cast down: the penalty is in its math dtype (float32, or float64 for float64 weights)
        # while HF losses are upcast to float32 only.
        if return_outputs:
            loss, outputs = out
            return loss + penalty, outputs
        return out + penalty
