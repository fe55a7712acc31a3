"""``l2`` anchors: ``C = 0`` for every targeted weight, so the penalty is ``λ‖ΔW‖²``
(the ablation the reference code's users ask about)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..anchors import Anchors, anchor_metadata
from ..layout import to_out_in
from ..projection import Projection
from .targeted import targeted_weights

__all__ = ["l2_anchors"]


def l2_anchors(model: nn.Module, target_modules: str | Iterable[str], *, dtype: torch.dtype = torch.float32) -> Anchors:
    """Anchors with ``C = 0`` (penalty ``λ‖ΔW‖²``) for the targeted weights: shapes only."""
    weights = targeted_weights(model, target_modules)
    projections = {
        n: Projection(torch.zeros(to_out_in(w, layout).shape[0], 0, dtype=dtype), "l2", orthogonal_columns=True)
        for n, (w, layout) in weights.items()
    }
    return Anchors(projections, anchor_metadata("l2", None, None, dtype, target_modules))
