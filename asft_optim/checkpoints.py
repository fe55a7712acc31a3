"""Read weights one tensor at a time from modules, state dicts or HF checkpoint directories.

A *source* answers three questions without loading the model: which tensors exist
(:meth:`names`, :meth:`shape`), how each 2-D weight is laid out (:meth:`layout`:
``"out_in"`` or ``"in_out"``), and a cheap :meth:`fingerprint`. :meth:`read` returns
one tensor; for safetensors it is a zero-copy view of a memory map that is released
as soon as the caller drops it, so a streaming build touches one pair of tensors at a
time whatever the size of the checkpoint.

Directories hold ``model.safetensors``, a sharded ``model.safetensors.index.json``,
or (only through ``torch.load(weights_only=True)``) ``pytorch_model.bin`` and its
index. A string that is no local path but a Hub repo id (``"org/name"``) is resolved
through huggingface_hub's cache (:func:`resolve_hub_checkpoint`): only ``config.json`` and
the safetensors weights are fetched, then read as a directory, one tensor at a time. Layouts and tied weights come from a skeleton of the model built from
``config.json`` on the meta device; without a config every weight is ``"out_in"``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .layout import weight_layout
from .projection import AnchorError

__all__ = [
    "SafetensorsSource",
    "TensorSource",
    "TorchBinSource",
    "WeightSource",
    "module_layouts",
    "open_directory",
    "open_source",
    "read_safetensors_header",
    "resolve_hub_checkpoint",
    "tied_aliases",
]

#: safetensors refuses headers larger than this; so do we.
_MAX_HEADER = 100 * 1024 * 1024
_SAMPLE = 32  # values sampled per tensor for in-memory fingerprints


def module_layouts(model: nn.Module) -> dict[str, str]:
    """``{"<module>.weight": layout}`` for every module of ``model``."""
    return {f"{n}.weight" if n else "weight": weight_layout(m) for n, m in model.named_modules()}


def tied_aliases(model: nn.Module) -> dict[str, list[str]]:
    """``{param name: [other names of the same tensor]}`` for tied parameters."""
    groups: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    return {n: [o for o in g if o != n] for g in groups.values() if len(g) > 1 for n in g}


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], bytes]:
    """Parsed JSON header of a safetensors file and its raw bytes (length prefix included)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise AnchorError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            n = int.from_bytes(prefix, "little")
            if n > _MAX_HEADER or n > size - 8:
                raise AnchorError(f"{path}: corrupt safetensors header (claims {n} bytes, file has {size})")
            raw = fh.read(n)
        header = json.loads(raw)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, AnchorError):
            raise
        raise AnchorError(f"{path}: cannot read safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise AnchorError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, prefix + raw


class WeightSource:
    """Weights of one model: names, shapes, layouts, one-tensor reads, a fingerprint."""

    description = "weights"

    def __init__(self) -> None:
        self._layouts: dict[str, str] = {}
        self._aliases: dict[str, str] = {}  # tied name absent from storage -> stored name

    def names(self) -> list[str]:
        """Every readable tensor name, tied aliases included."""
        return [*self._stored_names(), *(a for a in self._aliases if a not in self._stored())]

    def has(self, name: str) -> bool:
        return name in self._stored() or name in self._aliases

    def shape(self, name: str) -> tuple[int, ...]:
        return self._stored_shape(self._aliases.get(name, name) if name not in self._stored() else name)

    def read(self, name: str) -> Tensor:
        return self._read(name if name in self._stored() else self._aliases[name])

    def layout(self, name: str) -> str | None:
        return self._layouts.get(name)

    def fingerprint(self) -> str:
        raise NotImplementedError

    def set_skeleton(self, model: nn.Module, prefix: str = "") -> None:
        """Take layouts and tied weights from ``model``, whose names may carry ``prefix``."""
        layouts = module_layouts(model)
        stored = self._stored()

        def key(n: str) -> str | None:  # skeleton name -> checkpoint name
            for k in (n, n[len(prefix) + 1:] if prefix and n.startswith(prefix + ".") else None,
                      f"{prefix}.{n}" if prefix else None):
                if k is not None and k in stored:
                    return k
            return None

        for n, lay in layouts.items():
            k = key(n)
            self._layouts[k or n] = lay
        for n, others in tied_aliases(model).items():
            if key(n) is None:
                present = [key(o) for o in others if key(o) is not None]
                if present:
                    self._aliases[n] = present[0]

    # -- backends ---------------------------------------------------------------------
    def _stored(self) -> Mapping[str, Any]:
        raise NotImplementedError

    def _stored_names(self) -> list[str]:
        return list(self._stored())

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def _read(self, name: str) -> Tensor:
        raise NotImplementedError


class TensorSource(WeightSource):
    """An ``nn.Module`` (layouts and tied weights from its modules) or a state dict."""

    def __init__(self, obj: nn.Module | Mapping[str, Tensor]):
        super().__init__()
        if isinstance(obj, nn.Module):
            self.description = f"module {type(obj).__name__}"
            self._state = obj.state_dict()
            self.set_skeleton(obj)
        else:
            self.description = "state dict"
            self._state = dict(obj)
            bad = [k for k, v in self._state.items() if not isinstance(v, Tensor)]
            if bad:
                raise AnchorError(f"state dict values must be tensors; not for {bad[:5]}")

    def _stored(self):
        return self._state

    def _stored_shape(self, name):
        return tuple(self._state[name].shape)

    def _read(self, name):
        return self._state[name].detach()

    def fingerprint(self) -> str:
        """Names, shapes, dtypes and a strided sample of each tensor's values."""
        h = hashlib.sha256(b"asft-tensors-v1")
        for name in sorted(self._state):
            t = self._state[name].detach()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            flat = t.reshape(-1)
            if flat.numel():
                k = min(_SAMPLE, flat.numel())
                idx = torch.arange(k, dtype=torch.long) * (flat.numel() - 1) // max(k - 1, 1)
                h.update(flat[idx.to(flat.device)].to("cpu", torch.float64).numpy().tobytes())
        return h.hexdigest()


class SafetensorsSource(WeightSource):
    """``model.safetensors``, a sharded index, or a single ``.safetensors`` file."""

    def __init__(self, files: list[Path], index: Path | None, root: Path):
        super().__init__()
        self.description = str(root)
        self._root, self._index = root, index
        self._files = files
        self._headers: dict[Path, bytes] = {}
        self._where: dict[str, tuple[Path, tuple[int, ...]]] = {}
        for f in files:
            header, raw = read_safetensors_header(f)
            self._headers[f] = raw
            for name, entry in header.items():
                if name != "__metadata__":
                    self._where[name] = (f, tuple(entry.get("shape", ())))
        if index is not None:
            weight_map = _read_index(index)
            lost = [n for n, f in weight_map.items() if n not in self._where]
            if lost:
                raise AnchorError(f"{index}: {len(lost)} indexed tensor(s) missing from the shards: {lost[:5]}")

    def _stored(self):
        return self._where

    def _stored_shape(self, name):
        return self._where[name][1]

    def _read(self, name):
        from safetensors import safe_open

        with safe_open(str(self._where[name][0]), framework="pt") as f:
            return f.get_tensor(name)

    def fingerprint(self) -> str:
        """File names, sizes, headers and 8 sampled 4 KiB blocks of data per file, plus index
        and config: cheap, and it tells apart twins whose headers are identical."""
        h = hashlib.sha256(b"asft-safetensors-v1")
        for f in sorted(self._files):
            size = f.stat().st_size
            h.update(f"{f.name}|{size}|".encode())
            h.update(self._headers[f])
            start = len(self._headers[f])
            with open(f, "rb") as fh:
                for i in range(8):
                    fh.seek(start + (size - start) * i // 8)
                    h.update(fh.read(4096))
        for extra in (self._index, self._root / "config.json"):
            if extra is not None and extra.is_file():
                h.update(extra.name.encode() + b"|" + extra.read_bytes())
        return h.hexdigest()


class TorchBinSource(WeightSource):
    """``pytorch_model.bin`` (or sharded), read with ``torch.load(weights_only=True, mmap=True)``."""

    def __init__(self, files: list[Path], index: Path | None, root: Path):
        super().__init__()
        self.description = str(root)
        self._root, self._index, self._files = root, index, files
        self._where: dict[str, tuple[Path, tuple[int, ...]]] = {}
        self._cache: tuple[Path, dict[str, Tensor]] | None = None
        for f in files:
            for name, t in self._load(f).items():
                self._where[name] = (f, tuple(t.shape))
        self._cache = None

    def _load(self, f: Path) -> dict[str, Tensor]:
        if self._cache is not None and self._cache[0] == f:
            return self._cache[1]
        self._cache = None
        try:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                sd = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
            raise AnchorError(f"{f}: cannot load with weights_only=True: {exc}") from exc
        if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise AnchorError(f"{f}: not a state dict of tensors")
        self._cache = (f, dict(sd))
        return self._cache[1]

    def _stored(self):
        return self._where

    def _stored_shape(self, name):
        return self._where[name][1]

    def _read(self, name):
        return self._load(self._where[name][0])[name]

    def fingerprint(self) -> str:
        """File names, sizes, first and last 64 KiB of each file, plus index and config."""
        h = hashlib.sha256(b"asft-torchbin-v1")
        for f in sorted(self._files):
            size = f.stat().st_size
            h.update(f"{f.name}|{size}|".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(65536))
                fh.seek(max(0, size - 65536))
                h.update(fh.read())
        for extra in (self._index, self._root / "config.json"):
            if extra is not None and extra.is_file():
                h.update(extra.name.encode() + b"|" + extra.read_bytes())
        return h.hexdigest()


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AnchorError(f"{index}: unreadable checkpoint index: {exc}") from exc
    return weight_map


def _shards(root: Path, index: Path) -> list[Path]:
    files = sorted({root / f for f in _read_index(index).values()})
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise AnchorError(f"{index}: shard file(s) not found: {missing}")
    return files


def open_directory(path: str | os.PathLike) -> WeightSource:
    """A source over an HF checkpoint directory (or one ``.safetensors`` file)."""
    root = Path(path)
    if root.is_file() and root.suffix == ".safetensors":
        return SafetensorsSource([root], None, root.parent)
    if not root.is_dir():
        raise AnchorError(f"{root}: no such checkpoint directory (nor a Hub repo id such as 'org/name')")
    candidates: list[tuple[str, str, type[WeightSource]]] = [
        ("model.safetensors.index.json", "model.safetensors", SafetensorsSource),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", TorchBinSource),
    ]
    source: WeightSource | None = None
    for index_name, single, cls in candidates:
        if (root / index_name).is_file():
            source = cls(_shards(root, root / index_name), root / index_name, root)
        elif (root / single).is_file():
            source = cls([root / single], None, root)
        if source is not None:
            break
    if source is None:
        raise AnchorError(
            f"{root}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json) found"
        )
    skeleton = _skeleton(root)
    if skeleton is not None:
        source.set_skeleton(skeleton, getattr(skeleton, "base_model_prefix", ""))
    return source


def _skeleton(root: Path) -> nn.Module | None:
    """The model built from ``config.json`` on the meta device (no memory), or None."""
    if not (root / "config.json").is_file():
        return None
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(str(root))
    except Exception as exc:  # noqa: BLE001 - unknown architectures fall back to out_in
        warnings.warn(f"{root}: cannot read config.json ({exc}); assuming (out, in) layouts", stacklevel=3)
        return None
    for auto in (AutoModelForCausalLM, AutoModel):
        try:
            with torch.device("meta"):
                return auto.from_config(cfg)
        except Exception:  # noqa: BLE001, S112 - try the next auto class
            continue
    warnings.warn(f"{root}: cannot build a skeleton of {cfg.model_type}; assuming (out, in) layouts", stacklevel=3)
    return None


#: What is fetched from the Hub: the config (layouts, tied weights) and safetensors weights.
HUB_PATTERNS = ("config.json", "model*.safetensors", "model.safetensors.index.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def _looks_like_hub_id(path: str) -> bool:
    """``org/name`` with Hub characters only, and no such local path."""
    return (
        not os.path.exists(path)
        and _HUB_ID.fullmatch(path) is not None
        and not path.endswith((".safetensors", ".bin", ".json"))
        and ".." not in path
    )


def _hub_help(repo_id: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    include = " ".join(repr(p) if "*" in p else p for p in HUB_PATTERNS)
    return (
        f"download it where there is network: `hf download {repo_id}{rev} --include {include}` "
        "(it is then read from the cache, offline too), or pass a local checkpoint directory"
    )


def resolve_hub_checkpoint(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot directory of Hub model ``repo_id`` at ``revision``, fetched if needed.

    Only :data:`HUB_PATTERNS` are fetched (no ``pytorch_model.bin``, no other files). Offline
    (``HF_HUB_OFFLINE=1``, or no network) a cached snapshot is used; when there is none the
    :class:`AnchorError` says how to fetch it.

    Args:
        repo_id: ``"org/name"`` on the Hugging Face Hub.
        revision: branch, tag or commit (default: None, ``"main"``).

    Example::

        >>> root = resolve_hub_checkpoint("HuggingFaceTB/SmolLM2-135M", revision="main")
    """
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as exc:  # pragma: no cover - installed with transformers
        raise AnchorError(
            f"{repo_id}: no such local directory, and huggingface_hub is not installed to read it "
            "from the Hub"
        ) from exc
    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_PATTERNS)))
    except HFValidationError as exc:
        raise AnchorError(f"{repo_id}: no such checkpoint directory, and not a valid Hub repo id ({exc})") from exc
    except RevisionNotFoundError as exc:
        raise AnchorError(
            f"{where}: the Hub repo has no such revision; pass an existing branch, tag or commit"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise AnchorError(
            f"{repo_id}: no such checkpoint directory, and no such Hub repo (or it is private or gated: "
            "log in with `hf auth login` and accept its licence on the Hub)"
        ) from exc
    except LocalEntryNotFoundError as exc:  # offline, or the Hub unreachable, and not cached
        offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise AnchorError(
            f"{where}: no such checkpoint directory, and this Hub model is not in the local cache "
            f"({constants.HF_HUB_CACHE}) while {offline}; {_hub_help(repo_id, revision)}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - network and cache errors of several kinds
        raise AnchorError(
            f"{where}: cannot fetch the Hub model ({type(exc).__name__}: {exc}); "
            f"{_hub_help(repo_id, revision)}"
        ) from exc
    if not any(root.glob("*.safetensors")):
        raise AnchorError(
            f"{where}: the cached Hub snapshot ({root}) has no safetensors weights (only those are read "
            f"from the Hub); {_hub_help(repo_id, revision)}, or convert the checkpoint to safetensors"
        )
    return root


def open_source(obj: Any, revision: str | None = None) -> WeightSource:
    """Wrap an ``nn.Module``, a state dict, a checkpoint directory, a Hub repo id or a source.

    ``revision`` (a branch, tag or commit) applies to Hub repo ids only.
    """
    if isinstance(obj, WeightSource) and revision is None:
        return obj
    if isinstance(obj, str) and _looks_like_hub_id(obj):
        source = open_directory(resolve_hub_checkpoint(obj, revision))
        source.description = f"hub:{obj}" + (f"@{revision}" if revision else "")
        return source
    if revision is not None:
        raise AnchorError(
            f"revision={revision!r} applies to Hub repo ids ('org/name'), not to {type(obj).__name__} "
            f"{str(obj)[:80]!r}; drop it, or check out that revision into the directory"
        )
    if isinstance(obj, (str, os.PathLike)):
        return open_directory(obj)
    if isinstance(obj, (nn.Module, Mapping)):
        return TensorSource(obj)
    raise AnchorError(
        f"cannot read weights from {type(obj).__name__}; pass an nn.Module, a state dict "
        "or a checkpoint directory"
    )
