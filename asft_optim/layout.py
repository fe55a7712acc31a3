"""How a stored weight is viewed by the penalty math: its (out, in) layout and math dtype.

Every anchor acts on the *output* side of a weight in (out, in) layout. GPT-2 ``Conv1D``
and ``nn.Embedding`` store theirs transposed (``"in_out"``); convolution kernels are
flattened to (out, in·kh·kw), matching PEFT's ``B @ A``. Everything that reads, builds or
applies anchors imports these helpers from here (the bottom of the dependency order,
next to :mod:`~asft_optim.projection`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["WeightInfo", "math_dtype", "out_in_shape", "to_out_in", "weight_layout"]


def weight_layout(module: nn.Module) -> str:
    """``"in_out"`` for modules storing W as (in, out), else ``"out_in"``."""
    if isinstance(module, nn.Embedding) or type(module).__name__ == "Conv1D":
        return "in_out"
    return "out_in"


def to_out_in(weight: Tensor, layout: str) -> Tensor:
    """View a stored weight in (out, in) layout (flattening conv kernels)."""
    w = weight.t() if layout == "in_out" else weight
    return w.flatten(1) if w.dim() > 2 else w


def out_in_shape(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    """Shape of :func:`to_out_in` of a weight of stored ``shape``."""
    if layout == "in_out":
        shape = (shape[1], shape[0], *shape[2:])
    rest = 1
    for s in shape[1:]:
        rest *= s
    return (shape[0], rest)


def math_dtype(t: Tensor) -> torch.dtype:
    """The dtype the penalty math runs in: bf16/fp16 weights in float32; float64 stays float64."""
    return torch.promote_types(t.dtype, torch.float32)


@dataclass(frozen=True)
class WeightInfo:
    """How an anchored weight is stored in the model: ``shape`` and ``layout``."""

    shape: tuple[int, ...]
    layout: str = "out_in"

    @property
    def out_in_shape(self) -> tuple[int, int]:
        return out_in_shape(self.shape, self.layout)
