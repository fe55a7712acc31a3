"""Input-side anchors: ``{weight name: InputProjection}`` and their safetensors file.

The file is the project's anchor format with the side marked ``input``
(:mod:`asft_optim.basis_io`): tensors are the bases ``U`` (d_in, k). An output-side reader
refuses such a file (and this reader an output-side one) naming the right loader.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .basis_io import read_bases, save_bases
from .input_projection import InputProjection
from .layout import WeightInfo
from .projection import AnchorError

__all__ = ["INPUT_SIDE", "InputAnchors"]

#: The ``side`` metadata value of an input-side anchor file (output-side files have none).
INPUT_SIDE = "input"


class InputAnchors(Mapping[str, InputProjection]):
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

    def __init__(
        self,
        projections: Mapping[str, InputProjection],
        metadata: Mapping[str, str] | None = None,
        weights: Mapping[str, WeightInfo] | None = None,
    ) -> None:
        if not projections:
            raise AnchorError("input anchors are empty: no weight matched")
        self._projections = dict(projections)
        self.metadata: dict[str, str] = {k: str(v) for k, v in (metadata or {}).items()}
        weights = dict(weights or {})
        for name, p in self._projections.items():
            info = weights.setdefault(name, WeightInfo((p.d_out, p.d_in)))
            if (problem := p.fits(info.out_in_shape)) is not None:
                raise AnchorError(f"{name}: {problem}")
        self.weights: dict[str, WeightInfo] = {n: weights[n] for n in self._projections}

    def __getitem__(self, name: str) -> InputProjection:
        return self._projections[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._projections)

    def __len__(self) -> int:
        return len(self._projections)

    def __repr__(self) -> str:
        return f"InputAnchors({len(self)} weights, {self.nbytes / 2**20:.1f} MiB)"

    @property
    def nbytes(self) -> int:
        return sum(p.basis.numel() * p.basis.element_size() for p in self.values())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> InputAnchors:
        return InputAnchors({n: p.to(device, dtype) for n, p in self.items()}, self.metadata, self.weights)

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

    # -- file --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the anchor file, side ``input`` (see :mod:`asft_optim.basis_io`)."""
        save_bases(path, INPUT_SIDE, {n: p.basis for n, p in self.items()},
                   {n: p.energy for n, p in self.items()}, self.weights, self.metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> InputAnchors:
        """Read and validate an input-side anchor file; any defect raises :class:`AnchorError`."""
        bases, energies, weights, metadata = read_bases(path, INPUT_SIDE)
        projections = {n: InputProjection(b, weights[n].out_in_shape[0], energies[n]) for n, b in bases.items()}
        return cls(projections, metadata, weights)
