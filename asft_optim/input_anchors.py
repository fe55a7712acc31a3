"""Input-side anchors: ``{weight name: InputProjection}`` and their safetensors file.

The file is the project's anchor format (``format: asft-anchors``, version 2, see
:mod:`asft_optim.anchor_io`) with the side marked: top-level metadata ``side: "input"``
and, per weight, ``"side": "input"`` and ``"mode": "input"``. Tensors are the bases
``U`` of shape (d_in, k), all in one storage dtype; the checksum is
:func:`asft_optim.anchor_io.checksum`. An output-side reader refuses such a file (and this
reader an output-side one) with a message naming the right loader; nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from . import anchor_io
from .anchors import _natural
from .checkpoints import read_safetensors_header
from .input_projection import InputProjection
from .layout import WeightInfo, out_in_shape
from .projection import AnchorError

__all__ = ["INPUT_SIDE", "InputAnchors"]

#: The ``side`` metadata value of an input-side anchor file (output-side files have none).
INPUT_SIDE = "input"
_RESERVED = ("format", "format_version", "dtype", "weights", "checksum", "side")


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
        """Write the anchor file (atomically: a temporary file is renamed)."""
        from safetensors.torch import save_file

        dtypes = {p.basis.dtype for p in self.values()}
        if len(dtypes) != 1:
            raise AnchorError(f"input anchors mix storage dtypes {sorted(map(str, dtypes))}; cast them with .to(dtype=...)")
        tensors = {n: p.basis.detach().to("cpu").contiguous() for n, p in self.items()}
        weights = {
            n: {"shape": list(self.weights[n].shape), "layout": self.weights[n].layout, "side": INPUT_SIDE,
                "mode": INPUT_SIDE, "rank": p.rank, "energy": float(p.energy)}
            for n, p in self.items()
        }
        meta = {k: v for k, v in self.metadata.items() if k not in _RESERVED}
        meta.update(
            format=anchor_io.FORMAT, format_version=anchor_io.FORMAT_VERSION, side=INPUT_SIDE,
            dtype=anchor_io.dtype_name(dtypes.pop()), weights=json.dumps(weights, sort_keys=True),
            checksum=anchor_io.checksum(tensors),
        )
        tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> InputAnchors:
        """Read and validate an input-side anchor file; any defect raises :class:`AnchorError`."""
        return cls(*_read(path))


def _fail(path: Any, msg: str) -> AnchorError:
    return AnchorError(f"{path}: {msg}")


def _entry(path: Any, name: str, entry: Any) -> tuple[tuple[int, ...], str, int, float]:
    if not isinstance(entry, dict) or entry.get("side") != INPUT_SIDE or entry.get("mode") != INPUT_SIDE:
        raise _fail(path, f"{name}: weight entry is not an input-side anchor")
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


def _read(path: str | os.PathLike) -> tuple[dict[str, InputProjection], dict[str, str], dict[str, WeightInfo]]:
    header, _ = read_safetensors_header(path)  # cheap structural check before mapping
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != anchor_io.FORMAT:
        raise _fail(path, "not an anchor file (no 'format: asft-anchors' metadata)")
    if meta.get("side") != INPUT_SIDE:
        raise _fail(path, "holds output-side anchors (no 'side: input' metadata); load it with Anchors.load")
    if meta.get("format_version") != anchor_io.FORMAT_VERSION:
        raise _fail(path, f"unsupported input-anchor format version {meta.get('format_version')!r}; rebuild the file")
    storage = meta.get("dtype")
    if storage not in anchor_io.STORAGE_DTYPES:
        raise _fail(path, f"bad storage dtype {storage!r}")
    try:
        weights = json.loads(meta.get("weights", ""))
    except (TypeError, ValueError) as exc:
        raise _fail(path, f"unreadable 'weights' metadata: {exc}") from exc
    if not isinstance(weights, dict) or not weights:
        raise _fail(path, "the 'weights' metadata lists no weight")
    tensor_names = {k for k in header if k != "__metadata__"}
    if tensor_names != set(weights):
        raise _fail(path, f"tensors and metadata disagree ({sorted(tensor_names ^ set(weights))[:5]})")
    st_dtype = {v: k for k, v in anchor_io._ST_DTYPES.items()}[storage]
    for name, entry in weights.items():  # every declared dtype and shape before any data
        shape, layout, rank, _ = _entry(path, name, entry)
        d_in = out_in_shape(shape, layout)[1]
        info = header[name]
        if not isinstance(info, dict) or info.get("dtype") != st_dtype:
            raise _fail(path, f"{name}: tensor dtype is not {storage}")
        if info.get("shape") != [d_in, rank] or rank > d_in:
            raise _fail(path, f"{name}: basis shape {info.get('shape')!r} does not fit a weight {list(shape)} (rank {rank})")
    tensors = anchor_io._read_tensors(path, sorted(weights))
    if meta.get("checksum") != anchor_io.checksum(tensors):
        raise _fail(path, "checksum mismatch: the file was modified or corrupted")
    projections, infos = {}, {}
    for name in sorted(weights, key=_natural):
        shape, layout, _, energy = _entry(path, name, weights[name])
        t: Tensor = tensors[name]
        if not torch.isfinite(t).all():
            raise _fail(path, f"{name}: basis has non-finite values")
        projections[name] = InputProjection(t, out_in_shape(shape, layout)[0], energy)
        infos[name] = WeightInfo(shape, layout)
    return projections, {k: v for k, v in meta.items() if k not in _RESERVED}, infos
