"""The anchored optimizer's diagnostics: per-weight penalties and off-anchor fractions.

:class:`AnchorDiagnostics` is a mixin of :class:`~asft_optim.AnchoredOptimizer`: its step
keeps ``self._last``, ``[(name, λ, PenaltyTerms without gradients)]`` of the last step
(no host-device sync on the hot path), and everything here is derived from it on demand.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .projection import PenaltyTerms

__all__ = ["AnchorDiagnostics"]


class AnchorDiagnostics:
    """``anchor_stats`` / ``anchor_tensors`` / ``anchor_summary`` of the last step."""

    #: set by the optimizer's step: ``(name, λ, terms)`` per penalised weight
    _last: list[tuple[str, Any, PenaltyTerms]]
    #: :meth:`anchor_tensors`, computed once per step (None: not yet)
    _last_tensors: dict[str, tuple[Tensor, Tensor, Tensor]] | None

    def anchor_stats(self) -> dict[str, dict[str, float]]:
        """Per weight, from the last step (one device sync, here, not in ``step()``).

        ``{"penalty": λ‖RΔW‖², "raw_penalty": ‖RΔW‖², "off_anchor_fraction": ‖RΔW‖/‖ΔW‖}``,
        with R = I - C (or C in mode ``"subspace"``), all at the weights the step started from
        (under LBFGS, which evaluates its closure several times a step: the last evaluation's).
        """
        tensors = self.anchor_tensors()
        if not tensors:
            return {}
        values = torch.stack(
            [torch.stack([v.detach().double().cpu(), r.detach().double().cpu(), f.detach().double().cpu()])
             for v, r, f in tensors.values()]
        ).tolist()
        return {
            n: {"penalty": v[0], "raw_penalty": v[1], "off_anchor_fraction": v[2]}
            for n, v in zip(tensors, values, strict=True)
        }

    def anchor_tensors(self) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """Like :meth:`anchor_stats` but as 0-d device tensors (no sync): ``(penalty, raw, fraction)``.

        Computed on the first call after a step from the small tensors the step kept
        (a few r×r products per LoRA weight), then reused until the next step.
        """
        if self._last_tensors is None:
            self._last_tensors = {
                n: (terms.penalty * lam, terms.penalty, terms.off_anchor_fraction()) for n, lam, terms in self._last
            }
        return dict(self._last_tensors)

    def anchor_summary(self) -> dict[str, float]:
        """``anchor/penalty`` (sum), ``anchor/off_anchor_mean`` and ``anchor/off_anchor_max``;
        with gradient surgery also ``surgery/coefficient`` and ``surgery/calls``
        (:meth:`~asft_optim.surgery.GradientSurgery.stats`)."""
        surgery = getattr(self, "surgery", None)
        extra = surgery.stats() if surgery is not None else {}
        stats = self.anchor_stats()
        if not stats:
            return extra
        fr = [s["off_anchor_fraction"] for s in stats.values()]
        return {
            "anchor/penalty": sum(s["penalty"] for s in stats.values()),
            "anchor/off_anchor_mean": sum(fr) / len(fr),
            "anchor/off_anchor_max": max(fr),
            **extra,
        }
