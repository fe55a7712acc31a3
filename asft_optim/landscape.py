"""Safety landscapes and the Effective Perturbation Length (AsFT §3.1, §4.3).

Paper symbols, mapped once:

* ``f(α, β) = S(θ + α·d̂₁ + β·d̂₂)`` (Eq. 1): :func:`landscape_1d` / :func:`landscape_2d`
  evaluate a user ``score(model) -> float`` on a grid. The directions are used as
  given: normalise them first (:func:`~asft_optim.directions.normalize`; ``"global"``
  is the paper's ``d̂ = d/‖d‖``, ``"layer"`` the poloclub/llm-landscape convention).
* EPL (Eq. 5): :func:`epl`, see there for the safety convention.

Weights are perturbed in place, each grid point computed from saved originals
(``W = W₀ + α·d₁ + β·d₂``, never accumulated), and restored with ``copy_`` in a
``finally`` block: after a run the model is bit-identical to before, even if the
score raises.

Directions, cosines and normalisation live in :mod:`asft_optim.directions` and are
re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .directions import (
    CosineResult,
    Direction,
    cosine,
    direction_from_adapter,
    direction_from_models,
    direction_norm,
    layer_norms,
    model_weights,
    normalize,
    off_anchor_fraction,
    orthogonalize,
    random_direction,
    weight_key,
)
from .projection import AnchorError

__all__ = [
    "EPL",
    "CosineResult",
    "Direction",
    "Landscape1D",
    "Landscape2D",
    "cosine",
    "direction_from_adapter",
    "direction_from_models",
    "direction_norm",
    "epl",
    "grid",
    "landscape_1d",
    "landscape_2d",
    "layer_norms",
    "model_weights",
    "normalize",
    "off_anchor_fraction",
    "orthogonalize",
    "perturbed",
    "plot_1d",
    "plot_2d",
    "random_direction",
]

Score = Callable[[nn.Module], float]


def grid(spec: str) -> list[float]:
    """``"-1:1:21"`` -> 21 evenly spaced values from -1 to 1 (both included)."""
    try:
        lo, hi, n = spec.split(":")
        lo_f, hi_f, n_i = float(lo), float(hi), int(n)
    except ValueError as exc:
        raise ValueError(f"grid {spec!r} is not LO:HI:N") from exc
    if n_i < 1 or (n_i == 1 and lo_f != hi_f):
        raise ValueError(f"grid {spec!r}: N must be >= 2 (or 1 with LO == HI)")
    # rounded so that 0.3 prints as 0.3, not 0.30000000000000004 (and 0 is exactly 0)
    return [lo_f] if n_i == 1 else [round(lo_f + (hi_f - lo_f) * i / (n_i - 1), 12) for i in range(n_i)]


@contextmanager
def perturbed(model: nn.Module, directions: Sequence[Mapping[str, Tensor]]) -> Iterator[Callable[..., None]]:
    """Context manager yielding ``set(*coefficients)``: ``W = W₀ + Σ cᵢ·dᵢ`` for every weight touched.

    Each point is computed from the saved ``W₀`` in float32 (or the weight's dtype if
    wider) and cast back; all-zero coefficients restore ``W₀`` exactly. On exit every
    touched weight is restored with ``copy_`` from its saved original, whatever happened.
    Weights tied to each other (embeddings and LM head) are perturbed once.
    """
    weights = model_weights(model)
    aliases = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(weight_key(n), p)
    names: dict[int, tuple[nn.Parameter, list[Tensor | None]]] = {}
    missing = []
    for i, d in enumerate(directions):
        for n, t in d.items():
            p = weights.get(n, aliases.get(n))
            if p is None:
                missing.append(n)
                continue
            if tuple(t.shape) != tuple(p.shape):
                raise AnchorError(f"{n}: direction shape {tuple(t.shape)} vs weight {tuple(p.shape)}")
            entry = names.setdefault(id(p), (p, [None] * len(directions)))
            if entry[1][i] is None:  # a tied alias names the same tensor again: count it once
                entry[1][i] = t.detach().to(device=p.device, dtype=torch.promote_types(p.dtype, torch.float32))
    if missing:
        raise AnchorError(f"direction weights missing from the model: {sorted(set(missing))[:5]}")
    originals = {k: p.detach().clone() for k, (p, _) in names.items()}

    @torch.no_grad()
    def set_point(*coefficients: float) -> None:
        if len(coefficients) != len(directions):
            raise ValueError(f"expected {len(directions)} coefficients, got {len(coefficients)}")
        for k, (p, ds) in names.items():
            w0 = originals[k]
            math_dtype = torch.promote_types(w0.dtype, torch.float32)
            w = w0.to(math_dtype, copy=True)
            for c, d in zip(coefficients, ds):
                if d is not None and c != 0:
                    w.add_(d.to(math_dtype), alpha=float(c))
            p.copy_(w)

    try:
        yield set_point
    finally:
        with torch.no_grad():
            for k, (p, _) in names.items():
                p.copy_(originals[k])


@dataclass
class Landscape1D:
    """``values[i] = S(θ + alphas[i]·d)``."""

    alphas: list[float]
    values: list[float]
    label: str = ""

    def at_origin(self) -> float | None:
        return next((v for a, v in zip(self.alphas, self.values) if a == 0), None)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Landscape2D:
    """``values[i][j] = S(θ + alphas[i]·d₁ + betas[j]·d₂)``."""

    alphas: list[float]
    betas: list[float]
    values: list[list[float]]
    labels: tuple[str, str] = ("d1", "d2")

    def to_dict(self) -> dict:
        return asdict(self)


def _progress(total: int, desc: str, progress: bool | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="point", disable=None if progress is None else not progress)


def landscape_1d(
    model: nn.Module, direction: Mapping[str, Tensor], alphas: Sequence[float], score: Score,
    *, label: str = "", progress: bool | None = None,
) -> Landscape1D:
    """``S(θ + α·d)`` for every ``α`` in ``alphas``; the model is restored bit-identically."""
    values = []
    with perturbed(model, [direction]) as set_point, _progress(len(alphas), label or "landscape", progress) as bar:
        for a in alphas:
            set_point(a)
            values.append(float(score(model)))
            bar.update()
    return Landscape1D([float(a) for a in alphas], values, label)


def landscape_2d(
    model: nn.Module, d1: Mapping[str, Tensor], d2: Mapping[str, Tensor],
    alphas: Sequence[float], betas: Sequence[float], score: Score,
    *, labels: tuple[str, str] = ("d1", "d2"), progress: bool | None = None,
) -> Landscape2D:
    """``S(θ + α·d₁ + β·d₂)`` on the grid ``alphas × betas``; the model is restored bit-identically."""
    values = []
    with perturbed(model, [d1, d2]) as set_point, _progress(len(alphas) * len(betas), "landscape 2-D", progress) as bar:
        for a in alphas:
            row = []
            for b in betas:
                set_point(a, b)
                row.append(float(score(model)))
                bar.update()
            values.append(row)
    return Landscape2D([float(a) for a in alphas], [float(b) for b in betas], values, labels)


@dataclass
class EPL:
    """Effective Perturbation Length of one 1-D landscape.

    ``epl`` is the symmetric reach ``min(negative, positive)``: the largest ``r`` such
    that every evaluated ``α`` in ``[-r, r]`` is safe. ``negative`` / ``positive`` are the
    contiguous safe reach on each side of 0; ``sup_safe`` is Eq. 5 read literally (the
    largest safe ``|α|`` anywhere, contiguous or not). ``censored`` is true when the
    reach that sets ``epl`` ran to the end of the grid: then ``epl`` is only a lower bound.
    All are 0 when the origin itself is unsafe.
    """

    epl: float
    negative: float
    positive: float
    sup_safe: float
    censored: bool
    threshold: float
    higher_is_safer: bool

    def to_dict(self) -> dict:
        return asdict(self)


def epl(
    alphas: Sequence[float], values: Sequence[float], threshold: float,
    *, higher_is_safer: bool = False, interpolate: bool = False,
) -> EPL:
    """EPL (AsFT Eq. 5) from a 1-D landscape.

    Safety convention: by default ``values`` are a *harmful* score (lower is safer, the
    convention of AsFT §3.1, Definitions 1-2 and Figure 1) and a point is safe when
    ``value ≤ threshold``. Eq. 5 writes ``S ≥ τ`` for a score where higher is safer;
    pass ``higher_is_safer=True`` for that (safe when ``value ≥ threshold``).

    The origin ``α = 0`` must be on the grid. Each side's reach is the last grid
    point before the first unsafe one. With ``interpolate``, the reach is extended
    to where the straight line between that point and the first unsafe one crosses
    ``threshold`` (exact for a score linear between grid points).
    """
    pts = sorted(zip((float(a) for a in alphas), (float(v) for v in values)))
    if not any(a == 0 for a, _ in pts):
        raise ValueError("the grid must contain alpha = 0")
    if any(math.isnan(v) for _, v in pts):
        raise ValueError("landscape values contain NaN")

    def safe(v: float) -> bool:
        return v >= threshold if higher_is_safer else v <= threshold

    def reach(side: list[tuple[float, float]]) -> tuple[float, bool]:
        """``side`` runs outward from the origin; returns (reach, ran to grid end)."""
        if not safe(side[0][1]):
            return 0.0, False
        last = side[0]
        for a, v in side[1:]:
            if not safe(v):
                if interpolate and v != last[1]:
                    t = (threshold - last[1]) / (v - last[1])
                    return abs(last[0] + t * (a - last[0])), False
                return abs(last[0]), False
            last = (a, v)
        return abs(last[0]), True

    pos, pos_end = reach([p for p in pts if p[0] >= 0])
    neg, neg_end = reach([p for p in reversed(pts) if p[0] <= 0])
    value = min(pos, neg)
    censored = (pos_end and pos <= neg) or (neg_end and neg <= pos)
    sup = max((abs(a) for a, v in pts if safe(v)), default=0.0)
    return EPL(value, neg, pos, sup, bool(censored) and value > 0, float(threshold), higher_is_safer)


# -- plots (matplotlib, Agg, imported lazily) -------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_1d(curves: Sequence[Landscape1D], path, *, threshold: float | None = None,
            ylabel: str = "harmful score (lower is safer)", title: str = "") -> None:
    """1-D landscapes on one axis (Figure 1 style); a dashed line at ``threshold``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in curves:
        ax.plot(c.alphas, c.values, marker="o", markersize=3, label=c.label or None)
    if threshold is not None:
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xlabel("α (perturbation along the normalised direction)")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_2d(land: Landscape2D, path, *, threshold: float | None = None,
            zlabel: str = "harmful score", title: str = "") -> None:
    """Filled contour of a 2-D landscape; the ``threshold`` level drawn in white."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    z = torch.tensor(land.values, dtype=torch.float64).T.numpy()  # rows: betas
    cs = ax.contourf(land.alphas, land.betas, z, levels=20, cmap="viridis")
    fig.colorbar(cs, ax=ax, label=zlabel)
    if threshold is not None and z.min() < threshold < z.max():
        ax.contour(land.alphas, land.betas, z, levels=[threshold], colors="white", linewidths=1.5)
    ax.plot([0], [0], marker="*", color="red", markersize=10)
    ax.set_xlabel(f"α along {land.labels[0]}")
    ax.set_ylabel(f"β along {land.labels[1]}")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
