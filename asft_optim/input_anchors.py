"""Input-side anchors: ``{weight name: InputProjection}`` and their safetensors file.

The file is the project's anchor format with the side marked ``input``
(:mod:`asft_optim.basis_io`): tensors are the bases ``U`` (d_in, k). An output-side reader
refuses such a file (and this reader an output-side one) naming the right loader.
"""

from __future__ import annotations

from typing import Any

import torch

from .basis_io import BasisOperators
from .input_projection import InputProjection
from .layout import WeightInfo

__all__ = ["INPUT_SIDE", "InputAnchors"]

#: The ``side`` metadata value of an input-side anchor file (output-side files have none).
INPUT_SIDE = "input"


class InputAnchors(BasisOperators[InputProjection]):
    """Read-only mapping ``weight name -> InputProjection`` plus string metadata.

    Args:
        projections: ``{HF weight name: InputProjection}`` (non-empty).
        metadata: build metadata (strings; default: None).
        weights: ``{name: WeightInfo}`` stored shape and layout of each weight (default:
            None: (d_out, d_in) in (out, in) layout from each operator).

    Example::

        >>> anchors = build_input_anchors(model, batches, target_modules=["q_proj", "v_proj"], rank=8)
        >>> anchors.save("qv.input.anchors.safetensors")
        >>> anchors = InputAnchors.load("qv.input.anchors.safetensors")
    """

    _what = "input anchors"
    side = INPUT_SIDE

    @classmethod
    def _operator(cls, basis: torch.Tensor, info: WeightInfo, energy: float) -> InputProjection:
        return InputProjection(basis, info.out_in_shape[0], energy)

    def summary(self) -> list[dict[str, Any]]:
        """One row per weight: name, shape, rank k, energy kept, dtype, bytes."""
        return [
            {
                "weight": n, "shape": self.weights[n].shape, "side": INPUT_SIDE, "rank": p.rank,
                "energy": p.energy, "dtype": str(p.basis.dtype).removeprefix("torch."),
                "bytes": p.basis.numel() * p.basis.element_size(),
            }
            for n, p in self.items()
        ]
