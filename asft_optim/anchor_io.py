"""Anchor files: safetensors with validated metadata; nothing is ever unpickled.

Layout of a file (format version 3)::

    tensors   {weight name: factor F (d_out, m)}  all in one storage dtype
    metadata  format          "asft-anchors"
              format_version  "3"
              dtype           "float32" | "bfloat16" | "float16" | "float64"
              weights         JSON {name: {"shape", "layout", "mode", "rank", "energy"}}
              checksum        sha256 of the whole header (every metadata entry but the
                              checksum itself) and of every tensor's name, dtype, shape
                              and bytes
              ...             build metadata (mode, rank, energy, target_modules,
                              base_fingerprint, aligned_fingerprint, library)

``shape`` is the weight's shape as stored in the model and ``layout`` tells how to view
it as (out, in); ``rank`` is the number of columns of F and ``energy`` the fraction of
``‖V‖²_F`` it keeps. Every way a file can be wrong (truncated, edited, another format)
raises :class:`~asft_optim.AnchorError`.

Every F has orthogonal columns, ``F = U diag(√c)`` (C = F Fᵀ), which lets the step read F
twice instead of four times. The checksum covers the metadata as well as the tensors: an
edit of a weight's ``"mode"`` or recorded ``"shape"`` of the same length (which would change
the penalty silently) fails to load. Files of earlier, never released versions (1 and 2:
version 2 checksummed the tensors only) are refused with the command that rebuilds them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .checkpoints import read_safetensors_header
from .layout import WeightInfo, out_in_shape
from .projection import MODES, AnchorError, Projection

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "STORAGE_DTYPES",
    "check_output_path",
    "checksum",
    "dtype_name",
    "listed_weights",
    "read_anchors",
    "save_anchors",
    "write_checksummed",
]

FORMAT = "asft-anchors"
FORMAT_VERSION = "3"
_REBUILD = "rebuild the file with `asft anchors build --base BASE --aligned ALIGNED -o FILE`"
_RESERVED = ("format", "format_version", "dtype", "weights", "checksum")
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
_LAYOUTS = ("out_in", "in_out")


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in STORAGE_DTYPES.items():
        if d == dtype:
            return name
    raise AnchorError(f"unsupported anchor storage dtype {dtype}; use one of {list(STORAGE_DTYPES)}")


def checksum(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """sha256 of the header and the data: every ``metadata`` entry but ``"checksum"``
    (sorted, as canonical JSON), then every tensor's name, dtype, shape and bytes.

    Example::

        >>> meta["checksum"] = checksum(tensors, meta)  # what save_anchors writes
    """
    h = hashlib.sha256(FORMAT.encode())
    header = {str(k): str(v) for k, v in metadata.items() if k != "checksum"}
    h.update(json.dumps(header, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def check_output_path(path: str | os.PathLike) -> None:
    """Raise :class:`AnchorError` unless an anchor file can be written at ``path``.

    Checked before a long build: the directory exists and is a writable directory, and
    ``path`` is not itself a directory. A probe file is created and removed (permission
    bits alone do not tell, e.g. for root or on read-only mounts).
    """
    import tempfile

    target = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(target))
    if os.path.isdir(target):
        example = os.path.join(target, "anchors.safetensors")
        raise AnchorError(f"output {target!r} is a directory; give a file name such as {example!r}")
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise AnchorError(
            f"output {target!r}: its directory {parent!r} {what}; create it first (mkdir -p) "
            "or write elsewhere"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".asft-probe-", dir=parent)
    except OSError as exc:
        raise AnchorError(
            f"output {target!r}: cannot write in {parent!r} ({exc.strerror or exc}); "
            "pick a writable directory"
        ) from exc
    os.close(fd)
    os.remove(probe)


def save_anchors(anchors: Mapping[str, Projection], path: str | os.PathLike) -> None:
    """Write ``anchors`` to ``path`` (atomically: a temporary file is renamed).

    ``anchors`` is an :class:`~asft_optim.Anchors` (any mapping with its ``weights`` and
    ``metadata``): this module sits below it and does not import it.
    """

    # Version 2 guarantees orthogonal columns: a factor built elsewhere is converted (an SVD).
    projections = {n: p.with_orthogonal_columns() for n, p in anchors.items()}
    dtypes = {p.factor.dtype for p in projections.values()}
    if len(dtypes) != 1:
        raise AnchorError(f"anchors mix storage dtypes {sorted(map(str, dtypes))}; cast them with .to(dtype=...)")
    tensors = {n: p.factor.detach().to("cpu").contiguous() for n, p in projections.items()}
    weights = {
        n: {
            "shape": list(anchors.weights[n].shape),
            "layout": anchors.weights[n].layout,
            "mode": p.mode,
            "rank": p.rank,
            "energy": float(p.energy),
        }
        for n, p in projections.items()
    }
    meta = {k: str(v) for k, v in anchors.metadata.items() if k not in _RESERVED}
    meta.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        dtype=dtype_name(dtypes.pop()),
        weights=json.dumps(weights, sort_keys=True),
    )
    write_checksummed(tensors, meta, path)


def write_checksummed(tensors: Mapping[str, Tensor], meta: dict[str, str], path: str | os.PathLike) -> None:
    """Add the whole-header :func:`checksum` to ``meta`` and write the file atomically (a
    temporary file, then a rename: a crash never leaves half a file under ``path``)."""
    from safetensors.torch import save_file

    meta["checksum"] = checksum(tensors, meta)
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    try:
        save_file(dict(tensors), tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fail(path: Any, msg: str) -> AnchorError:
    return AnchorError(f"{path}: {msg}")


def _check_entry(path: Any, name: str, entry: Any) -> tuple[tuple[int, ...], str, str, int, float]:
    if not isinstance(entry, dict):
        raise _fail(path, f"{name}: weight entry is not an object")
    shape, layout, mode = entry.get("shape"), entry.get("layout"), entry.get("mode")
    rank, energy = entry.get("rank"), entry.get("energy")
    if (
        not isinstance(shape, list)
        or len(shape) < 2
        or not all(type(s) is int and 0 < s < 2**40 for s in shape[:1] + shape[2:])
        or not (type(shape[1]) is int and (0 < shape[1] < 2**40 or shape[1] == -1))  # -1: unknown
    ):
        raise _fail(path, f"{name}: bad weight shape {shape!r}")
    if layout not in _LAYOUTS or (layout == "in_out" and len(shape) != 2):
        raise _fail(path, f"{name}: bad layout {layout!r}")
    if mode not in MODES:
        raise _fail(path, f"{name}: unknown mode {mode!r}")
    if type(rank) is not int or rank < 0:
        raise _fail(path, f"{name}: bad rank {rank!r}")
    if type(energy) not in (int, float) or not math.isfinite(energy) or not 0.0 <= energy <= 1.0 + 1e-6:
        raise _fail(path, f"{name}: bad energy {energy!r}")
    return tuple(shape), layout, mode, rank, float(energy)


def read_anchors(
    path: str | os.PathLike,
) -> tuple[dict[str, Projection], dict[str, str], dict[str, WeightInfo]]:
    """Read and validate an anchor file written by :func:`save_anchors`.

    Returns ``(projections, metadata, weights)``, the arguments of
    :class:`~asft_optim.Anchors` (whose :meth:`~asft_optim.Anchors.load` calls this).
    """
    header, _ = read_safetensors_header(path)  # cheap structural check before mapping
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _fail(path, "not an anchor file (no 'format: asft-anchors' metadata)")
    if meta.get("side", "output") != "output":  # data-driven operators: asft_optim.basis_io
        raise _fail(path, f"holds {meta.get('side')}-side anchors, not output-side ones; load it with "
                    "InputAnchors.load (side input) or SafetySubspaces.load (side gradient)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise _fail(
            path,
            f"unsupported anchor format version {version!r} (this library reads version "
            f"{FORMAT_VERSION} only; a newer file needs a newer asft-optim, an older one: {_REBUILD})",
        )
    storage = meta.get("dtype")
    if storage not in STORAGE_DTYPES:
        raise _fail(path, f"bad storage dtype {storage!r}")
    weights = listed_weights(path, header, meta)
    # Check every tensor's declared dtype and shape before reading any data.
    for name, entry in weights.items():
        shape, layout, _, rank, _ = _check_entry(path, name, entry)
        d_out, d_in = out_in_shape(shape, layout)
        info = header[name]
        if not isinstance(info, dict) or _ST_DTYPES.get(info.get("dtype")) != storage:
            raise _fail(path, f"{name}: tensor dtype {info.get('dtype') if isinstance(info, dict) else info!r} is not {storage}")
        if info.get("shape") != [d_out, rank] or rank > (min(d_out, d_in) if d_in > 0 else d_out):
            raise _fail(path, f"{name}: factor shape {info.get('shape')!r} does not fit a weight {shape} (rank {rank})")
    tensors = _read_tensors(path, sorted(weights))
    if meta.get("checksum") != checksum(tensors, meta):
        raise _fail(
            path,
            "checksum mismatch: the header (metadata, a weight's mode, shape, rank or energy) or "
            f"the tensor data was modified or corrupted; {_REBUILD}",
        )
    projections, infos = {}, {}
    for name in sorted(weights):
        shape, layout, mode, _, energy = _check_entry(path, name, weights[name])
        t = tensors[name]
        if not torch.isfinite(t).all():
            raise _fail(path, f"{name}: factor has non-finite values")
        try:
            projections[name] = Projection(t, mode, energy, orthogonal_columns=True)
        except AnchorError as exc:
            raise _fail(path, f"{name}: {exc}") from exc
        infos[name] = WeightInfo(shape, layout)
    extra = {k: v for k, v in meta.items() if k not in _RESERVED}
    return projections, extra, infos


def listed_weights(path: Any, header: dict, meta: dict) -> dict:  # also read by basis_io
    """The ``weights`` metadata, checked to list exactly the file's tensors."""
    try:
        weights = json.loads(meta.get("weights", ""))
    except (TypeError, ValueError) as exc:
        raise _fail(path, f"unreadable 'weights' metadata: {exc}") from exc
    if not isinstance(weights, dict) or not weights:
        raise _fail(path, "the 'weights' metadata lists no weight")
    tensor_names = {k for k in header if k != "__metadata__"}
    if tensor_names != set(weights):
        extra, lost = sorted(tensor_names - set(weights)), sorted(set(weights) - tensor_names)
        raise _fail(path, f"tensors and metadata disagree (unlisted tensors {extra[:5]}, missing tensors {lost[:5]})")
    return weights


def _read_tensors(path: Any, names: list[str]) -> dict[str, Tensor]:
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            for name in names:
                # Copy out of the memory map: a later edit of the file must not reach us.
                out[name] = f.get_tensor(name).clone()
    except AnchorError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise _fail(path, f"unreadable tensor data: {exc}") from exc
    return out
