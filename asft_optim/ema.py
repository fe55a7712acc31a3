"""A parameter-space exponential moving average (EMA) of the trained tensors.

``θ_ema ← β·θ_ema + (1−β)·θ`` after every optimizer step, started at the tensors' values
when the EMA is built (before training: the aligned model, for a LoRA adapter ``B = 0``).
At the end, :meth:`ParameterEMA.copy_to` puts the average in place of the trained values.
Starting at the aligned model, with no bias correction, is the point as a safety
baseline (Kim et al. 2025, arXiv 2508.12531: parameter-space EMA keeps the aligned
model's refusals): after ``T`` steps the start still weighs ``β^T``, so a short attack
is pulled back toward where it began, more for a larger β.

The arithmetic is torch's own (:func:`torch.optim.swa_utils.get_ema_multi_avg_fn`, a
``_foreach_lerp_``); :class:`torch.optim.swa_utils.AveragedModel` is not used because
it deep-copies the whole module (a second base model beside a LoRA adapter) and its
first update copies the model instead of averaging (the EMA would start after the first
step, not at the aligned model). A Trainer callback that updates an EMA after every
step is :class:`asft_optim.integrations.hf.EMACallback`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.swa_utils import get_ema_multi_avg_fn

__all__ = ["ParameterEMA"]


def _describe(t: Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


class ParameterEMA:
    """An EMA of a fixed list of tensors (the trainable ones, as handed to an optimizer).

    For LoRA this is the EMA of the factors ``A`` and ``B``, not of the update: the
    averaged adapter is ``ΔW_ema = s·B_ema·A_ema``, which is not the EMA of
    ``ΔW = s·B·A`` (a product of averages is not the average of products). That is what
    an EMA of a PEFT model's trainable parameters gives, and what can be saved and
    loaded as an adapter: ΔW is never a tensor of the model, only the factors are.

    The shadow tensors have their tensor's dtype (a bfloat16 EMA loses small updates at
    β near 1: keep float32 trainable tensors for such β) and follow it to its device
    (a Trainer may move the model after the EMA is built).

    Args:
        params: the tensors to average, in a fixed order (e.g. ``[p for p in
            model.parameters() if p.requires_grad]``); floating point.
        beta: the decay β in [0, 1) (default: 0.9): the EMA's window is about
            ``1/(1−β)`` steps; β = 0 follows the tensors exactly.

    Example::

        >>> ema = ParameterEMA([p for p in model.parameters() if p.requires_grad], beta=0.9)
        >>> for batch in loader:
        ...     loss(model, batch).backward(); opt.step(); opt.zero_grad(); ema.update()
        >>> ema.copy_to()  # the model now holds the average
    """

    def __init__(self, params: Iterable[Tensor], beta: float = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"ParameterEMA: beta must be in [0, 1), got {beta} "
                             "(1 would never move from the start)")
        self.params = list(params)
        if not self.params:
            raise ValueError("ParameterEMA: no tensors to average (is anything trainable?)")
        if bad := [i for i, p in enumerate(self.params) if not torch.is_floating_point(p)]:
            raise ValueError(f"ParameterEMA: tensor {bad[0]} is {self.params[bad[0]].dtype}; "
                             "only floating-point tensors can be averaged")
        self.beta = float(beta)
        self.steps = 0  # updates so far
        self.shadow = [p.detach().clone() for p in self.params]
        self._lerp = get_ema_multi_avg_fn(self.beta)

    def _checked(self, params: Iterable[Tensor] | None, what: str) -> list[Tensor]:
        """``params`` (default: the tensors given at construction), checked against the
        shadow: same count, shapes and dtypes, in order."""
        params = self.params if params is None else list(params)
        if len(params) != len(self.shadow):
            raise ValueError(f"ParameterEMA.{what}: the parameter set changed: the EMA holds "
                             f"{len(self.shadow)} tensors, got {len(params)}")
        for i, (p, s) in enumerate(zip(params, self.shadow)):
            if p.shape != s.shape or p.dtype != s.dtype:
                raise ValueError(f"ParameterEMA.{what}: the parameter set changed: tensor {i} is "
                                 f"{_describe(p)}, the EMA's is {_describe(s)}")
        return params

    def _matched(self, params: Iterable[Tensor] | None, what: str) -> list[Tensor]:
        """:meth:`_checked`, and the shadow moved to each tensor's device."""
        params = self._checked(params, what)
        self.shadow = [s if s.device == p.device else s.to(p.device) for p, s in zip(params, self.shadow)]
        return params

    @torch.no_grad()
    def update(self, params: Iterable[Tensor] | None = None) -> None:
        """One EMA step, ``θ_ema ← β·θ_ema + (1−β)·θ``, on ``params`` (default: the
        tensors given at construction); call it after every optimizer step."""
        params = self._matched(params, "update")
        self._lerp(self.shadow, [p.detach() for p in params], self.steps)
        self.steps += 1

    @torch.no_grad()
    def copy_to(self, params: Iterable[Tensor] | None = None) -> None:
        """Write the average into ``params`` (default: the tensors given at construction)."""
        for p, s in zip(self._matched(params, "copy_to"), self.shadow):
            p.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        """β, the update count and the shadow tensors (copies): ``torch.save`` it and load it
        back with ``torch.load(weights_only=True)``."""
        return {"beta": self.beta, "steps": self.steps, "shadow": [s.detach().clone() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the same β and tensors (count, shapes, dtypes),
        else ValueError; the shadow keeps its devices."""
        if float(state["beta"]) != self.beta:
            raise ValueError(f"ParameterEMA.load_state_dict: the state has beta={state['beta']}, "
                             f"this EMA beta={self.beta}")
        self._checked(state["shadow"], "load_state_dict")
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)
        self.steps = int(state["steps"])

    def __repr__(self) -> str:
        return f"ParameterEMA(tensors={len(self.shadow)}, beta={self.beta}, steps={self.steps})"
