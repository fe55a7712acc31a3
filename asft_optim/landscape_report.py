"""The files ``asft landscape`` writes: cosines, the 1-D landscape with its EPL, the 2-D landscape.

The command (:mod:`asft_optim.landscape_cli`) parses its arguments and computes; these
functions write what it computed into its output folder and return the tables it prints.

* ``cosines.json`` / ``cosines.md``: :func:`write_cosines`;
* ``landscape_1d.json``, ``epl.md``, ``landscape_1d.png``: :func:`write_landscape_1d`;
* ``landscape_2d.json``, ``landscape_2d.png``: :func:`write_landscape_2d`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from .directions import CosineResult, Direction, layer_norms, off_anchor_fraction
from .landscape import EPL, Landscape1D, Landscape2D, plot_1d, plot_2d

__all__ = ["off_anchor_overall", "write_cosines", "write_landscape_1d", "write_landscape_2d"]


def off_anchor_overall(direction: Direction, anchors) -> tuple[float, dict[str, float]]:
    """The off-anchor fraction of a whole direction and of each of its layers.

    .. math::
        \\frac{\\|(I - C)d\\|}{\\|d\\|} = \\sqrt{\\frac{\\sum_l (f_l \\|d_l\\|)^2}{\\sum_l \\|d_l\\|^2}}

    over the layers ``l`` the anchors cover, ``f_l`` each layer's own fraction.

    Args:
        direction: weight name -> tensor.
        anchors: the :class:`~asft_optim.anchors.Anchors` giving ``C`` per layer.

    Returns:
        ``(overall, per_layer)``; ``overall`` is 0 for a direction of norm 0 there.

    Example::

        >>> overall, per_layer = off_anchor_overall(d, Anchors.load("a.anchors.safetensors"))  # doctest: +SKIP
    """
    frac, norms = off_anchor_fraction(direction, anchors), layer_norms(direction)
    total = sum(norms[n] ** 2 for n in frac)
    overall = (sum((f * norms[n]) ** 2 for n, f in frac.items()) / total) ** 0.5 if total > 0 else 0.0
    return overall, frac


def write_cosines(out: Path, raw: Mapping[str, Direction], cosines: Mapping[str, CosineResult],
                  anchors=None) -> str:
    """Write ``cosines.json`` and ``cosines.md``: each direction's cosine with ``d_aligned``
    and, with ``anchors``, its off-anchor fraction :math:`\\|(I - C)d\\|/\\|d\\|`.

    Args:
        out: the output folder (it exists).
        raw: the raw directions by label, ``"aligned"`` among them.
        cosines: label -> cosine with ``raw["aligned"]`` (every label but ``"aligned"``).
        anchors: also report the off-anchor fraction (default: None: not reported).

    Returns:
        The markdown table written to ``cosines.md``.

    Example::

        >>> table = write_cosines(Path("out"), raw, {k: cosine(raw["aligned"], d) for k, d in others})  # doctest: +SKIP
    """
    cos_json = {k: {"overall": c.overall, "per_layer": c.per_layer, "n_weights": c.n_weights}
                for k, c in cosines.items()}
    off = {}
    if anchors is not None:
        for k, d in raw.items():
            off[k], frac = off_anchor_overall(d, anchors)
            cos_json.setdefault(k, {})["off_anchor_fraction"] = {"overall": off[k], "per_layer": frac}
    (out / "cosines.json").write_text(json.dumps(cos_json, indent=2) + "\n")
    extra = " ‖(I−C)d‖/‖d‖ |" if off else ""
    lines = ["| direction | cos(d_aligned, d) overall | per-layer min | per-layer max | weights |" + extra,
             "|---|---|---|---|---|" + ("---|" if off else "")]
    for k, d in raw.items():
        c = cosines.get(k)
        row = (f"| {k} | {c.overall:.3e} | {min(c.per_layer.values()):.3e} | {max(c.per_layer.values()):.3e} | "
               f"{c.n_weights} |" if c else f"| {k} | 1 (itself) | | | {len(d)} |")
        lines.append(row + (f" {off[k]:.4f} |" if off else ""))
    table = "\n".join(lines)
    (out / "cosines.md").write_text(table + "\n")
    return table


def write_landscape_1d(out: Path, curves: Sequence[Landscape1D], epls: Mapping[str, EPL], *, normalize: str,
                       threshold: float, alpha_of_update: Mapping[str, float], restored: bool) -> str:
    """Write ``landscape_1d.json``, ``epl.md`` and ``landscape_1d.png``.

    Args:
        out: the output folder (it exists).
        curves: the 1-D landscapes, ``d_aligned``'s first (its value at α = 0 is the model's score).
        epls: label -> the curve's EPL at ``threshold``.
        normalize: the directions' normalisation (``--normalize``).
        threshold: the harmful-score threshold τ.
        alpha_of_update: label -> the α at which θ + α·d̂ is the update itself.
        restored: the model's weights were bit-identical to before after the curves.

    Returns:
        The EPL table written to ``epl.md`` (without its threshold line).

    Example::

        >>> table = write_landscape_1d(out, curves, epls, normalize="layer", threshold=30.0,
        ...                            alpha_of_update=alpha_self, restored=True)  # doctest: +SKIP
    """
    own = curves[0].at_origin()
    (out / "landscape_1d.json").write_text(json.dumps(
        {"normalize": normalize, "score_at_origin": own, "threshold": threshold,
         "curves": [c.to_dict() for c in curves], "epl": {k: e.to_dict() for k, e in epls.items()},
         "alpha_of_update": dict(alpha_of_update), "weights_bit_identical_after_1d": restored}, indent=2) + "\n")
    rows = ["| direction | EPL | reach α<0 | reach α>0 | sup safe |α| (Eq. 5 literal) | lower bound only | "
            "α of the update itself |", "|---|---|---|---|---|---|---|"]
    rows += [f"| {k} | {e.epl:.3g} | {e.negative:.3g} | {e.positive:.3g} | {e.sup_safe:.3g} | "
             f"{'yes' if e.censored else 'no'} | {alpha_of_update[k]:.3g} |" for k, e in epls.items()]
    table = "\n".join(rows)
    (out / "epl.md").write_text(f"threshold τ = {threshold:g} (score at θ: {own:g}); normalisation: {normalize}\n\n"
                                + table + "\n")
    plot_1d(curves, out / "landscape_1d.png", threshold=threshold,
            title=f"1-D safety landscape around θ_aligned ({normalize}-normalised)")
    return table


def write_landscape_2d(out: Path, land: Landscape2D, *, threshold: float, restored: bool) -> None:
    """Write ``landscape_2d.json`` and ``landscape_2d.png`` (white contour: τ).

    Args:
        out: the output folder (it exists).
        land: the 2-D landscape.
        threshold: the harmful-score threshold τ.
        restored: the model's weights were bit-identical to before after the grid.

    Example::

        >>> write_landscape_2d(out, land, threshold=30.0, restored=True)  # doctest: +SKIP
    """
    (out / "landscape_2d.json").write_text(json.dumps(
        {**land.to_dict(), "threshold": threshold, "weights_bit_identical_after": restored}, indent=2) + "\n")
    plot_2d(land, out / "landscape_2d.png", threshold=threshold,
            title=f"2-D safety landscape (white: τ = {threshold:g})")
