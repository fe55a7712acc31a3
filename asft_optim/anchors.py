"""Anchors: the alignment operator C of every targeted weight, keyed by HF weight name.

Every operator acts on the *output* side of the weight in (out, in) layout. Weights
that are stored transposed (GPT-2 ``Conv1D``: (in, out); ``nn.Embedding``:
(vocab, dim) whose output is ``dim``) are transposed before ``V`` is formed, and
convolution kernels are flattened to (out, in·kh·kw), matching PEFT's ``B @ A``.

Factors stay on the CPU in their storage dtype; the optimizer moves and casts each
one lazily, once, to the device and math dtype of the weight it anchors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from . import anchor_io
from .checkpoints import WeightSource, open_source
from .discovery import find_targets, tuned_weights
from .layout import WeightInfo, to_out_in
from .operator_mapping import OperatorMapping
from .projection import AnchorError, Mode, Projection, projection_from_delta
from .version import __version__

__all__ = [
    "L2_LIKE_EIGENVALUE",
    "Anchors",
    "BindingReport",
    "WeightInfo",
    "anchor_fingerprint",
    "anchor_metadata",
    "as_anchors",
    "combine_anchors",
    "is_operator",
    "build_anchors",
    "module_name_matcher",
]


#: Below this largest eigenvalue of C, every direction keeps at least (1 - 0.2)² = 64 % of
#: L2's penalty: the anchor barely differs from L2 (on SmolLM2-135M the reference C's
#: largest eigenvalue is 0.135 and asft and l2 gave the same HS and FA at every λ).
L2_LIKE_EIGENVALUE = 0.2


def l2_like_warning(anchors: Mapping[str, Projection]) -> str | None:
    """A sentence when most ``safelora`` anchors act as L2 (C's largest eigenvalue below
    :data:`L2_LIKE_EIGENVALUE`), naming the alternatives; None otherwise. One pass over
    each factor: run it once, at construction, never in ``step()``."""
    eigs = [p.largest_eigenvalue() for p in anchors.values() if p.mode == "safelora"]
    small = sum(c < L2_LIKE_EIGENVALUE for c in eigs)
    if not eigs or 2 * small <= len(eigs):
        return None
    return (
        f"{small} of {len(eigs)} safelora anchors have a largest eigenvalue of C below "
        f"{L2_LIKE_EIGENVALUE} (max {max(eigs):.3f}): C = V Vᵀ/‖V‖_F is near 0 when the alignment "
        "update is small, so this penalty is almost plain L2 on ΔW. To constrain more than L2 does, "
        "use mode='orthogonal' with a rank (the projector onto V's top directions), harmful-direction "
        "anchors (mode='subspace'), or the data-driven operators (input-side anchors from the "
        "defender's harmful prompts, a safety-gradient subspace)"
    )


@dataclass
class BindingReport:
    """Result of :meth:`Anchors.bind`: anchored weights found and tuned weights left unanchored."""

    found: list[str]
    unanchored: list[str]


class Anchors(OperatorMapping[Projection]):
    """Read-only mapping ``weight name -> Projection`` plus string metadata
    (:class:`~asft_optim.operator_mapping.OperatorMapping`: ``Anchors(projections,
    metadata=None, weights=None)``; a weight without a given :class:`WeightInfo` is
    checked on its outputs only).

    Example::

        >>> anchors = build_anchors(base, aligned, target_modules=["q_proj", "v_proj"])
        >>> anchors.save("qv.anchors.safetensors"); anchors = Anchors.load("qv.anchors.safetensors")
        >>> anchors["model.layers.0.self_attn.q_proj.weight"].factor.shape
    """

    _what = "anchors"

    def _weight_info(self, name: str, p: Projection, info: WeightInfo | None) -> WeightInfo:
        if info is None:  # input size unknown (-1): bind() checks outputs only
            return WeightInfo((p.d_out, -1))
        if info.out_in_shape[0] != p.d_out:
            raise AnchorError(f"{name}: factor has {p.d_out} rows, weight {info.shape} has {info.out_in_shape[0]} outputs")
        return info

    def __repr__(self) -> str:
        modes = sorted({p.mode for p in self.values()})
        return f"Anchors({len(self)} weights, mode={'/'.join(modes)}, {self.nbytes / 2**20:.1f} MiB)"

    # -- construction and files -----------------------------------------------------------
    @classmethod
    def from_deltas(
        cls,
        deltas: Mapping[str, Tensor],
        mode: Mode = "safelora",
        *,
        rank: int | None = None,
        energy: float | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Anchors:
        """Anchors from ``{name: V}`` already in (out, in) layout."""
        projections = {
            name: _projection(v, mode, rank, energy, dtype, name) for name, v in deltas.items()
        }
        weights = {name: WeightInfo(tuple(v.shape)) for name, v in deltas.items()}
        return cls(projections, anchor_metadata(mode, rank, energy, dtype), weights)

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors anchor file (see :mod:`asft_optim.anchor_io`)."""
        anchor_io.save_anchors(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Anchors:
        """Read and validate an anchor file; any defect raises :class:`AnchorError`."""
        return cls(*anchor_io.read_anchors(path))

    # -- use --------------------------------------------------------------------------
    def bind(self, model: nn.Module, *, warn: bool = True) -> BindingReport:
        """Check these anchors fit ``model`` (plain, PEFT-wrapped or compiled).

        Raises :class:`AnchorError` listing every anchored weight that is missing from the
        model or has another shape. Returns the anchored weights found and the 2-D weights
        being tuned (trainable LoRA modules or trainable weights) that carry no anchor;
        those are also reported with a warning when ``warn`` is true.
        """
        targets, missing = find_targets(model, self)
        problems = [f"{n}: no such weight in the model" for n in missing]
        for t in targets:
            w = t.base_weight()
            expected = self.weights[t.name].out_in_shape
            got = t.out_in_shape()
            if len(got) != 2 or got[0] != expected[0] or (expected[1] >= 0 and got[1] != expected[1]):
                problems.append(
                    f"{t.name}: anchored as (out, in) = {expected}, the model's weight is "
                    f"{tuple(w.shape)} ({t.layout}) = {got}"
                )
        if problems:
            raise AnchorError(
                f"anchors do not fit the model ({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
            )
        unanchored = [n for n in tuned_weights(model) if n not in self]
        if unanchored and warn:
            warnings.warn(
                f"{len(unanchored)} tuned 2-D weight(s) carry no anchor and will not be penalised: "
                f"{unanchored[:10]}{' ...' if len(unanchored) > 10 else ''}",
                stacklevel=2,
            )
        return BindingReport(found=[t.name for t in targets], unanchored=unanchored)

    def summary(self) -> list[dict[str, Any]]:
        """One row per weight: name, shape, mode, rank kept, energy kept, the largest
        eigenvalue of C (``c_max``: near 0, the penalty is nearly L2's), bytes."""
        return [
            {
                "weight": n,
                "shape": self.weights[n].shape,
                "layout": self.weights[n].layout,
                "mode": p.mode,
                "rank": p.rank,
                "energy": p.energy,
                "c_max": p.largest_eigenvalue(),
                "dtype": str(p.factor.dtype).removeprefix("torch."),
                "bytes": p.factor.numel() * p.factor.element_size(),
            }
            for n, p in self.items()
        ]


def is_operator(value: Any) -> bool:
    """Whether ``value`` is a penalty operator of the one interface the targets call
    (``prepare``, ``version``, ``fits``, ``dense_terms``, ``lora_terms``, ``residual``):
    a :class:`Projection`, an input-side :class:`~asft_optim.input_projection.InputProjection`
    or a :class:`~asft_optim.input_projection.SumOperator` of them."""
    return isinstance(value, Projection) or all(
        callable(getattr(value, m, None)) for m in ("prepare", "fits", "dense_terms", "lora_terms", "residual")
    )


def combine_anchors(mappings: list[Mapping[str, Any]], where: str = "anchors") -> Mapping[str, Any]:
    """One mapping from several: a weight in one of them keeps its operator, a weight in
    several gets their :class:`~asft_optim.input_projection.SumOperator` (penalties sum)."""
    from .input_projection import SumOperator

    if not mappings:
        raise AnchorError(f"{where} is an empty list: no weight is anchored")
    if len(mappings) == 1:
        return mappings[0]
    names = list(dict.fromkeys(n for m in mappings for n in m))
    out = {}
    for n in names:
        parts = [m[n] for m in mappings if n in m]
        out[n] = parts[0] if len(parts) == 1 else SumOperator(parts)
    return out


def as_anchors(value: Any, *, where: str = "anchors") -> Mapping[str, Projection]:
    """The anchors a user passed, as a mapping ``weight name -> Projection``.

    Accepts an anchor file's path (``str`` or ``os.PathLike``: loaded with
    :meth:`Anchors.load`), a mapping whose values are all operators (:func:`is_operator`:
    an :class:`Anchors`, an ``InputAnchors``, returned as is), or a list of those, whose
    penalties sum (:func:`combine_anchors`). A mapping of raw tensors ``{name: V}`` and any other
    type raise :class:`AnchorError` naming what to pass instead, so that a path is never
    iterated character by character.

    Args:
        value: a path to an anchor file, an :class:`Anchors`, or ``{name: Projection}``.
        where: the argument's name in error messages (default: ``"anchors"``).

    Example::

        >>> anchors = as_anchors("qv.anchors.safetensors")  # same as Anchors.load(...)
        >>> as_anchors(anchors) is anchors
        True
    """
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not os.path.isfile(path):
            raise AnchorError(
                f"{where}: no anchor file at {path!r}; build one with "
                "`asft anchors build --base BASE --aligned ALIGNED -o FILE.safetensors` "
                "or pass Anchors (build_anchors(...))"
            )
        return Anchors.load(path)
    if isinstance(value, (list, tuple)):
        return combine_anchors([as_anchors(v, where=f"{where}[{i}]") for i, v in enumerate(value)], where)
    if isinstance(value, Mapping):
        if not value:
            raise AnchorError(f"{where} is an empty mapping: no weight is anchored")
        bad = {k: type(v).__name__ for k, v in value.items() if not is_operator(v)}
        if not bad:
            return value
        first = ", ".join(map(str, list(bad)[:3])) + (", ..." if len(bad) > 3 else "")
        if all(isinstance(value[k], Tensor) for k in bad):
            raise AnchorError(
                f"{where} maps weight names to raw tensors ({first}): anchors are operators, "
                "not ΔW. Build them with build_anchors(base, aligned, target_modules), "
                "Anchors.from_deltas({name: V}, mode) or projection_from_delta(V, mode) per weight"
            )
        raise AnchorError(
            f"{where} values must be operators (Projection, InputProjection, ...); got {sorted(set(bad.values()))} for {first}. "
            "Build anchors with build_anchors(...) or Anchors.load(path)"
        )
    raise AnchorError(
        f"{where} must be Anchors, a {{name: Projection}} mapping, the path of an anchor file "
        f"(str or pathlib.Path) or a list of those, not {type(value).__name__}"
    )


def module_name_matcher(target_modules: str | Iterable[str]):
    """PEFT-style matcher on module names: a regex (full match) or a list of suffixes."""
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise AnchorError(f"target_modules {target_modules!r} is not a valid regex: {exc}") from exc
        return lambda module_name: pattern.fullmatch(module_name) is not None
    suffixes = list(target_modules)
    if not suffixes:
        raise AnchorError("target_modules is empty")
    return lambda module_name: any(
        module_name == s or module_name.endswith("." + s) for s in suffixes
    )


def _projection(v: Tensor, mode: Mode, rank, energy, dtype: torch.dtype, name: str) -> Projection:
    """The operator of one weight, in compact form, stored in ``dtype``."""
    p = projection_from_delta(v, mode, rank=rank, energy=energy, name=name)
    return replace(p, factor=p.factor.to(dtype).contiguous())


# Metadata that identifies what anchors were built from (see build_anchors): the factors'
# exact bytes may change with the storage form, these do not.
_IDENTITY_META = ("mode", "rank", "energy", "storage_dtype", "target_modules",
                  "base_fingerprint", "aligned_fingerprint")


def anchor_metadata(
    mode: Mode,
    rank: int | None,
    energy: float | None,
    dtype: torch.dtype,
    target_modules: str | Iterable[str] | None = None,
    **extra: Any,
) -> dict[str, str]:
    """The string metadata of built anchors: the one writer, for every builder.

    ``target_modules`` is stored as given when a string (a regex), else as a JSON list;
    other values in ``extra`` are stored as given when strings, else as JSON.
    :func:`anchor_fingerprint` reads it.
    """
    meta = {
        "mode": mode,
        "rank": "" if rank is None else str(rank),
        "energy": "" if energy is None else str(energy),
        "storage_dtype": str(dtype).removeprefix("torch."),
        "library": f"asft-optim {__version__}",
    }
    if target_modules is not None:
        meta["target_modules"] = target_modules if isinstance(target_modules, str) else json.dumps(list(target_modules))
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta


def anchor_fingerprint(anchors: Mapping[str, Projection]) -> str:
    """A short stable hash of ``anchors``: names, modes, shapes and what they were built from.

    Anchors built by :func:`build_anchors` (or loaded from its files) are identified by
    their metadata (the base and aligned checkpoints' fingerprints and the build options,
    as :func:`anchor_metadata` wrote them); any other mapping by the bytes of its factors.
    One pass on the CPU, computed once per optimizer, never in ``step()``.
    """
    h = hashlib.sha256()
    meta = getattr(anchors, "metadata", None) or {}
    by_meta = all(meta.get(k) for k in ("base_fingerprint", "aligned_fingerprint"))
    if by_meta:
        for k in _IDENTITY_META:
            h.update(f"{k}={meta.get(k, '')};".encode())
    for name in sorted(anchors):
        p = anchors[name]
        if isinstance(p, Projection):
            h.update(f"{name}|{p.mode}|{p.d_out}|{p.rank};".encode())
        else:  # another operator (input-side, a sum): its kind and every defining tensor
            h.update(f"{name}|{type(p).__name__}|{getattr(p, 'mode', '')}|{p.d_out};".encode())
        if not by_meta:
            for f in p.state_tensors():
                f = f.detach()
                f = f.full_tensor() if hasattr(f, "full_tensor") else f
                f = f.to("cpu").contiguous()
                h.update(str(f.dtype).encode() if isinstance(p, Projection) else f"{f.dtype}{tuple(f.shape)}".encode())
                # The raw bytes (any dtype, bf16 included), one tensor at a time.
                h.update(f.view(-1).view(torch.uint8).numpy().tobytes() if f.numel() else b"")
    return h.hexdigest()[:16]


def _natural(name: str) -> list:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def _match(base: WeightSource, aligned: WeightSource, target_modules) -> list[str]:
    """Targeted ≥2-D weights, checked by name and shape; all problems reported at once."""
    matches = module_name_matcher(target_modules)

    def targeted(src: WeightSource) -> list[str]:
        return [
            k for k in src.names()
            if k.endswith(".weight") and len(src.shape(k)) >= 2 and matches(k[: -len(".weight")])
        ]

    names = sorted(targeted(base), key=_natural)  # same order whatever the source
    problems = []
    for k in names:
        if not aligned.has(k):
            problems.append(f"{k}: missing from the aligned model")
        elif aligned.shape(k) != base.shape(k):
            problems.append(f"{k}: shape {base.shape(k)} in the base model, {aligned.shape(k)} in the aligned one")
    problems += [f"{k}: missing from the base model" for k in targeted(aligned) if not base.has(k)]
    if problems:
        raise AnchorError(
            f"base and aligned weights do not match ({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
        )
    if not names:
        seen = sorted({k.rsplit(".", 2)[-2] for k in base.names() if k.count(".") >= 1 and len(base.shape(k)) >= 2})
        raise AnchorError(
            f"no 2-D weight of the base model matches target_modules={target_modules!r} "
            f"(module names end in: {seen[:20]})"
        )
    return names


def _weight_difference(base: WeightSource, aligned: WeightSource, name: str) -> Tensor:
    """``V = W_aligned - W_base`` of one weight, stored layout, float32 at least. One pair
    at a time; the float32 copy is the only full-size allocation."""
    a = aligned.read(name)
    v = a.to(torch.promote_types(a.dtype, torch.float32), copy=True)
    del a
    return v.sub_(base.read(name))


def build_anchors(
    base: Any,
    aligned: Any,
    target_modules: str | Iterable[str] = ("q_proj", "v_proj"),
    mode: Mode = "safelora",
    rank: int | None = None,
    *,
    energy: float | None = None,
    dtype: torch.dtype = torch.float32,
    layouts: Mapping[str, str] | None = None,
    progress: bool | None = None,
    base_revision: str | None = None,
    aligned_revision: str | None = None,
) -> Anchors:
    """Build anchors from a base model and its aligned twin, matching weights by name and shape.

    Weights are read one matching pair at a time; from checkpoint directories nothing
    else is loaded, so peak memory is about one pair of tensors plus the anchors.

    Args:
        base, aligned: ``nn.Module``, state dict, HF checkpoint directory
            (``model.safetensors``, sharded ``model.safetensors.index.json``, or
            ``pytorch_model.bin`` read with ``weights_only=True``), or a Hub repo id
            ``"org/name"`` (its ``config.json`` and safetensors weights are fetched into
            the huggingface_hub cache, or read from it offline).
        target_modules: module-name suffixes, or a regex matched in full as in PEFT
            (default: ``("q_proj", "v_proj")``). 1-D tensors are skipped.
        mode: operator kind (default: ``"safelora"``); see :class:`~asft_optim.Projection`.
        rank: keep the top ``rank`` directions (default: None, exact for ``"safelora"``).
        energy: keep the fewest directions holding this fraction of ``‖V‖²_F``
            (``"orthogonal"`` needs ``rank`` or ``energy``).
        dtype: storage dtype of the factors (default: float32; bfloat16 halves memory).
            The math runs in float32.
        layouts: ``{weight name: "in_out"}`` overrides for transposed weights (detected
            from modules, or from ``config.json`` for directories).
        progress: show a tqdm bar (default: None, only on a terminal).
        base_revision, aligned_revision: branch, tag or commit of a Hub repo id
            (default: None, ``"main"``); an error for anything but a Hub repo id.
    """
    from tqdm.auto import tqdm

    anchor_io.dtype_name(dtype)  # reject unsupported storage dtypes before any work
    base_src, aligned_src = open_source(base, base_revision), open_source(aligned, aligned_revision)
    names = _match(base_src, aligned_src, target_modules)
    projections, weights = {}, {}
    for name in tqdm(names, desc="anchors", unit="weight", disable=None if progress is None else not progress):
        layout = (layouts or {}).get(name) or base_src.layout(name) or aligned_src.layout(name) or "out_in"
        v = _weight_difference(base_src, aligned_src, name)
        projections[name] = _projection(to_out_in(v, layout), mode, rank, energy, dtype, name)
        weights[name] = WeightInfo(tuple(base_src.shape(name)), layout)
        del v
    metadata = anchor_metadata(
        mode, rank, energy, dtype, target_modules,
        base_fingerprint=base_src.fingerprint(),
        aligned_fingerprint=aligned_src.fingerprint(),
        base_source=base_src.description,
        aligned_source=aligned_src.description,
    )
    return Anchors(projections, metadata, weights)
