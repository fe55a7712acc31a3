"""Anchor files of data-driven operators: one orthonormal basis per weight, the side marked.

The project's anchor format (``format: asft-anchors``, version 2, see
:mod:`asft_optim.anchor_io`) with a ``side`` in the top-level metadata and in each
weight's entry (which also carries ``"mode": side``, unknown to output-side readers)::

    tensors   {weight name: basis (rows, k)}      one storage dtype
    metadata  side       "input"    (U, rows = d_in:  penalty ‖ΔW U‖², InputProjection)
                         "gradient" (Q, rows = d_out: the update kept ⊥ Q, SafetySubspace)
              weights    JSON {name: {"shape", "layout", "side", "mode", "rank", "energy"}}
              checksum   :func:`asft_optim.anchor_io.checksum` of the whole header and the tensors
              ...        build metadata

Every defect raises :class:`~asft_optim.AnchorError`; a file of another side is refused
with the loader to use; nothing is unpickled. :class:`BasisOperators` is the container
both kinds share: ``save`` and ``load`` of this file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any, TypeVar

from torch import Tensor

from . import anchor_io
from .anchors import _natural
from .checkpoints import read_safetensors_header
from .layout import WeightInfo, out_in_shape
from .operator_mapping import Op, OperatorMapping
from .projection import AnchorError

__all__ = ["SIDES", "BasisOperators", "read_bases", "save_bases"]

#: Sides of the operators stored as bases, and the loader of each (named in errors).
SIDES = {"input": "InputAnchors.load", "gradient": "SafetySubspaces.load"}
_ROWS = {"input": 1, "gradient": 0}  # which side of the (out, in) shape a basis spans
_RESERVED = ("format", "format_version", "dtype", "weights", "checksum", "side")
_ST_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


def save_bases(
    path: str | os.PathLike,
    side: str,
    bases: Mapping[str, Tensor],
    energies: Mapping[str, float],
    weights: Mapping[str, WeightInfo],
    metadata: Mapping[str, str],
) -> None:
    """Write ``{name: basis}`` as an anchor file of ``side`` (atomically)."""

    if side not in SIDES:
        raise AnchorError(f"unknown operator side {side!r}; expected one of {sorted(SIDES)}")
    dtypes = {b.dtype for b in bases.values()}
    if len(dtypes) != 1:
        raise AnchorError(f"bases mix storage dtypes {sorted(map(str, dtypes))}; cast them with .to(dtype=...)")
    tensors = {n: b.detach().to("cpu").contiguous() for n, b in bases.items()}
    entries = {
        n: {"shape": list(weights[n].shape), "layout": weights[n].layout, "side": side, "mode": side,
            "rank": b.shape[1], "energy": float(energies[n])}
        for n, b in tensors.items()
    }
    meta = {k: str(v) for k, v in metadata.items() if k not in _RESERVED}
    meta.update(
        format=anchor_io.FORMAT, format_version=anchor_io.FORMAT_VERSION, side=side,
        dtype=anchor_io.dtype_name(dtypes.pop()), weights=json.dumps(entries, sort_keys=True),
    )
    anchor_io.write_checksummed(tensors, meta, path)  # the whole header and the data


def _fail(path: Any, msg: str) -> AnchorError:
    return AnchorError(f"{path}: {msg}")


def _entry(path: Any, side: str, name: str, entry: Any) -> tuple[tuple[int, ...], str, int, float]:
    if not isinstance(entry, dict) or entry.get("side") != side or entry.get("mode") != side:
        raise _fail(path, f"{name}: weight entry is not a {side}-side operator")
    shape, layout, rank, energy = entry.get("shape"), entry.get("layout"), entry.get("rank"), entry.get("energy")
    if not isinstance(shape, list) or len(shape) < 2 or not all(type(s) is int and 0 < s < 2**40 for s in shape):
        raise _fail(path, f"{name}: bad weight shape {shape!r}")
    if layout not in ("out_in", "in_out") or (layout == "in_out" and len(shape) != 2):
        raise _fail(path, f"{name}: bad layout {layout!r}")
    if type(rank) is not int or rank < 1:
        raise _fail(path, f"{name}: bad rank {rank!r}")
    if type(energy) not in (int, float) or not math.isfinite(energy) or not 0.0 <= energy <= 1.0 + 1e-6:
        raise _fail(path, f"{name}: bad energy {energy!r}")
    return tuple(shape), layout, rank, float(energy)


def read_bases(
    path: str | os.PathLike, side: str
) -> tuple[dict[str, Tensor], dict[str, float], dict[str, WeightInfo], dict[str, str]]:
    """Read and validate a ``side`` file: ``(bases, energies, weights, metadata)``, by weight name."""
    header, _ = read_safetensors_header(path)  # cheap structural check before mapping
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != anchor_io.FORMAT:
        raise _fail(path, "not an anchor file (no 'format: asft-anchors' metadata)")
    found = meta.get("side", "output")
    if found != side:
        loader = SIDES.get(found, "Anchors.load")
        raise _fail(path, f"holds {found}-side anchors, not {side}-side ones; load it with {loader}")
    if meta.get("format_version") != anchor_io.FORMAT_VERSION:
        raise _fail(path, f"unsupported {side}-side format version {meta.get('format_version')!r}; rebuild the file")
    storage = meta.get("dtype")
    if storage not in _ST_NAMES:
        raise _fail(path, f"bad storage dtype {storage!r}")
    entries = anchor_io.listed_weights(path, header, meta)
    for name, entry in entries.items():  # every declared dtype and shape before any data
        shape, layout, rank, _ = _entry(path, side, name, entry)
        rows = out_in_shape(shape, layout)[_ROWS[side]]
        info = header[name]
        if not isinstance(info, dict) or info.get("dtype") != _ST_NAMES[storage]:
            raise _fail(path, f"{name}: tensor dtype is not {storage}")
        if info.get("shape") != [rows, rank] or rank > rows:
            raise _fail(path, f"{name}: basis shape {info.get('shape')!r} does not fit a weight "
                        f"{list(shape)} (rank {rank})")
    names = sorted(entries, key=_natural)
    tensors = anchor_io._read_tensors(path, names)
    if meta.get("checksum") != anchor_io.checksum(tensors, meta):
        raise _fail(path, "checksum mismatch: the header or the data was modified or corrupted")
    energies, infos = {}, {}
    for name in names:
        shape, layout, _, energy = _entry(path, side, name, entries[name])
        if not bool(tensors[name].isfinite().all()):
            raise _fail(path, f"{name}: basis has non-finite values")
        energies[name], infos[name] = energy, WeightInfo(shape, layout)
    return {n: tensors[n] for n in names}, energies, infos, {k: v for k, v in meta.items() if k not in _RESERVED}


Self = TypeVar("Self", bound="BasisOperators")


class BasisOperators(OperatorMapping[Op]):
    """An :class:`~asft_optim.operator_mapping.OperatorMapping` of operators stored as one
    basis per weight (``op.basis``, ``op.energy``), saved as an anchor file of
    :attr:`side`. A kind gives its side and :meth:`_operator`; a weight without a given
    :class:`WeightInfo` is taken as ``(op.d_out, op.d_in)`` in (out, in) layout."""

    #: The file's side: a key of :data:`SIDES`.
    side = ""

    def _weight_info(self, name: str, op: Op, info: WeightInfo | None) -> WeightInfo:
        if info is None:
            info = WeightInfo((op.d_out, op.d_in))
        if (problem := op.fits(info.out_in_shape)) is not None:
            raise AnchorError(f"{name}: {problem}")
        return info

    @classmethod
    def _operator(cls, basis: Tensor, info: WeightInfo, energy: float) -> Op:
        """The operator of a basis read from a file, for a weight of ``info``."""
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> None:
        """Write the anchor file, side :attr:`side` (atomically)."""
        save_bases(path, self.side, {n: op.basis for n, op in self.items()},
                   {n: op.energy for n, op in self.items()}, self.weights, self.metadata)

    @classmethod
    def load(cls: type[Self], path: str | os.PathLike) -> Self:
        """Read and validate a file of side :attr:`side`; any defect raises :class:`~asft_optim.AnchorError`."""
        bases, energies, weights, metadata = read_bases(path, cls.side)
        return cls({n: cls._operator(b, weights[n], energies[n]) for n, b in bases.items()}, metadata, weights)
