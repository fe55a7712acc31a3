"""Anchors: the alignment operator C of every targeted weight, keyed by HF weight name.

Every operator acts on the *output* side of the weight in (out, in) layout. Weights
that are stored transposed (GPT-2 ``Conv1D``: (in, out); ``nn.Embedding``:
(vocab, dim) whose output is ``dim``) are transposed before ``V`` is formed, and
convolution kernels are flattened to (out, in·kh·kw), matching PEFT's ``B @ A``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .projection import AnchorError, Mode, Projection, projection_from_delta


def weight_layout(module: nn.Module) -> str:
    """``"in_out"`` for modules storing W as (in, out), else ``"out_in"``."""
    if isinstance(module, nn.Embedding) or type(module).__name__ == "Conv1D":
        return "in_out"
    return "out_in"


def to_out_in(weight: Tensor, layout: str) -> Tensor:
    """View a stored weight in (out, in) layout (flattening conv kernels)."""
    w = weight.t() if layout == "in_out" else weight
    return w.flatten(1) if w.dim() > 2 else w


class Anchors(Mapping[str, Projection]):
    """Read-only mapping ``weight name -> Projection`` plus free-form string metadata.

    Example::

        >>> anchors = build_anchors(base, aligned, target_modules=["q_proj", "v_proj"])
        >>> anchors["model.layers.0.self_attn.q_proj.weight"].factor.shape
    """

    def __init__(self, projections: Mapping[str, Projection], metadata: Mapping[str, str] | None = None):
        if not projections:
            raise AnchorError("anchors are empty: no weight matched")
        self._projections = dict(projections)
        self.metadata: dict[str, str] = dict(metadata or {})

    def __getitem__(self, name: str) -> Projection:
        return self._projections[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._projections)

    def __len__(self) -> int:
        return len(self._projections)

    def __repr__(self) -> str:
        modes = sorted({p.mode for p in self._projections.values()})
        return f"Anchors({len(self)} weights, mode={'/'.join(modes)})"

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
        projections = {}
        for name, v in deltas.items():
            p = projection_from_delta(v, mode, rank=rank, energy=energy, name=name)
            projections[name] = Projection(p.factor.to(dtype), p.mode, p.energy)
        return cls(projections, {"mode": mode})


def module_name_matcher(target_modules: str | Iterable[str]):
    """PEFT-style matcher on module names: a regex (full match) or a list of suffixes."""
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return lambda module_name: pattern.fullmatch(module_name) is not None
    suffixes = list(target_modules)
    if not suffixes:
        raise AnchorError("target_modules is empty")
    return lambda module_name: any(
        module_name == s or module_name.endswith("." + s) for s in suffixes
    )


def _state_and_layouts(source: Any) -> tuple[Mapping[str, Tensor], dict[str, str]]:
    if isinstance(source, nn.Module):
        layouts = {f"{n}.weight": weight_layout(m) for n, m in source.named_modules()}
        return source.state_dict(), layouts
    if isinstance(source, Mapping):
        return source, {}
    raise AnchorError(
        f"cannot read weights from {type(source).__name__}; pass an nn.Module or a state dict"
    )


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
) -> Anchors:
    """Build anchors from a base model and its aligned twin, matching weights by name.

    Args:
        base, aligned: ``nn.Module`` or state dict.
        target_modules: module-name suffixes, or a regex matched in full (default: q/v).
        mode: operator kind (default: ``"safelora"``); see :class:`~asft_optim.Projection`.
        rank / energy: rank cut (required for ``"orthogonal"``).
        dtype: storage dtype of the factors (default: float32); the math runs in float32.
        layouts: ``{weight name: "in_out"}`` for transposed weights in plain state dicts
            (detected automatically from modules).
    """
    base_sd, base_layouts = _state_and_layouts(base)
    aligned_sd, aligned_layouts = _state_and_layouts(aligned)
    layout_of = {**base_layouts, **aligned_layouts, **(layouts or {})}
    matches = module_name_matcher(target_modules)
    names = [
        k for k, t in base_sd.items()
        if k.endswith(".weight") and t.dim() >= 2 and matches(k[: -len(".weight")])
    ]
    if not names:
        raise AnchorError(f"no 2-D weight of the base model matches target_modules={target_modules!r}")
    problems = []
    for k in names:
        if k not in aligned_sd:
            problems.append(f"{k}: missing from the aligned model")
        elif aligned_sd[k].shape != base_sd[k].shape:
            problems.append(f"{k}: shape {tuple(base_sd[k].shape)} vs {tuple(aligned_sd[k].shape)}")
    if problems:
        raise AnchorError("base and aligned weights do not match:\n  " + "\n  ".join(problems))
    deltas = {}
    for k in names:
        layout = layout_of.get(k, "out_in")
        deltas[k] = to_out_in(aligned_sd[k].float() - base_sd[k].float(), layout)
    anchors = Anchors.from_deltas(deltas, mode, rank=rank, energy=energy, dtype=dtype)
    return anchors
