"""AsFT_Alt (paper §5 "Method Adaptability", Table 8): with no base model, the harmful
directions of each weight come from harmful data, and the ``subspace`` penalty
``λ‖C_harm ΔW‖²`` pushes fine-tuning into their orthogonal complement."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..anchors import Anchors, anchor_metadata
from ..layout import math_dtype, to_out_in
from ..projection import AnchorError, Projection, projection_from_delta
from .targeted import targeted_weights

__all__ = ["HarmfulMethod", "harmful_anchors"]

HarmfulMethod = Literal["gradient", "delta"]


def _default_loss(model: nn.Module, batch: Any) -> Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError("harmful batches must be dicts of model inputs (with labels), or pass loss_fn=")
    return model(**batch).loss


def harmful_anchors(
    model: nn.Module,
    harmful_batches: Iterable[Any],
    *,
    target_modules: str | Iterable[str],
    rank: int | None = None,
    energy: float | None = None,
    method: HarmfulMethod = "gradient",
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    lr: float = 1e-3,
    epochs: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Anchors:
    r"""AsFT_Alt anchors: the harmful subspace of each targeted weight, mode ``"subspace"``.

    Per weight, ``C_harm = U_k U_kᵀ`` with ``U_k`` the top-k left singular vectors (output
    side, (out, in) layout) of

    * ``method="gradient"``: the gradient of the harmful loss w.r.t. the weight, summed
      over ``harmful_batches`` (model in eval mode: no dropout);
    * ``method="delta"``: ``W_T - W_0`` after a short harmful fine-tune: ``epochs`` passes
      of plain SGD (``lr``) over the batches on the targeted weights only, kept in
      float32 or wider so low-precision rounding cannot erase the update.

    The targeted weights are the *dense* weights, also in a PEFT model: a LoRA model's
    frozen base weights get ``requires_grad`` for the duration. The gradient w.r.t. W is
    the direction a harmful fine-tune of W would follow, and its left singular vectors
    live on the output side where ``C_harm`` acts, so the same anchors constrain a LoRA
    update ``s·B·A`` (through B) and a full update alike. The LoRA factors' own
    gradients would only see the directions the current random ``A`` lets through.
    Gradients are taken with ``torch.autograd.grad``, so no ``.grad`` is written. Afterwards the model is restored
    exactly: weights (bit for bit), ``requires_grad`` flags and train/eval modes.

    Use the result with the penalty ``λ‖C_harm ΔW‖²`` (e.g. ``AnchoredAdamW(model,
    anchors)``): fine-tuning is pushed toward the orthogonal complement of the harmful
    directions.

    Args:
        model: plain or PEFT model; it is returned to its state on exit.
        harmful_batches: iterable of batches (dicts for ``model(**batch).loss``).
        target_modules: module-name suffixes or a regex, as :func:`build_anchors`.
        rank / energy: directions kept per weight (give one).
        method: ``"gradient"`` or ``"delta"`` (default: ``"gradient"``).
        loss_fn: ``loss_fn(model, batch) -> loss`` (default: ``model(**batch).loss``).
        lr, epochs: the SGD fine-tune of ``method="delta"`` (default: 1e-3, 1).
        dtype: storage dtype of the factors (default: float32).
    """
    batches = list(harmful_batches)
    _check_settings(method, rank, energy, lr, epochs, batches)
    weights = targeted_weights(model, target_modules)
    params = list({id(w): w for w, _ in weights.values()}.values())
    with _restored(model, params, weights=method == "delta"), torch.enable_grad():
        totals = _harmful_totals(model, batches, params, method, loss_fn or _default_loss, lr, epochs)
    projections = _harmful_projections(weights, params, totals, method, rank, energy, dtype)
    meta = anchor_metadata("subspace", rank, energy, dtype, target_modules, source=f"harmful-{method}")
    return Anchors(projections, meta)


def _check_settings(method, rank, energy, lr, epochs, batches) -> None:
    if method not in ("gradient", "delta"):
        raise ValueError(f"Invalid method: {method!r} (expected 'gradient' or 'delta')")
    if rank is None and energy is None:
        raise AnchorError("harmful_anchors needs rank= or energy= (how many harmful directions to keep)")
    if method == "delta" and not (isinstance(epochs, int) and epochs >= 1 and math.isfinite(lr) and lr > 0):
        raise ValueError(f"Invalid delta fine-tune: lr={lr!r}, epochs={epochs!r}")
    if not batches:
        raise ValueError("harmful_batches is empty")


@contextmanager
def _restored(model: nn.Module, params: list[Tensor], *, weights: bool) -> Iterator[None]:
    """Eval mode and ``requires_grad`` on ``params`` for the duration; on exit the model's
    train/eval modes, the flags and (``weights=True``) the weights come back bit for bit."""
    flags = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    originals = [p.detach().clone() for p in params] if weights else []
    try:
        model.eval()
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        with torch.no_grad():
            for p, w0 in zip(params, originals, strict=False):
                p.copy_(w0)
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training


def _harmful_totals(model, batches, params, method, loss_fn, lr, epochs) -> list[Tensor]:
    """Per parameter: the summed harmful gradient, or the SGD fine-tune's ``W_T - W_0``."""
    if method == "gradient":
        return _summed_gradients(model, batches, params, loss_fn)
    return _sgd_deltas(model, batches, params, loss_fn, lr, epochs)


def _harmful_projections(weights, params, totals, method, rank, energy, dtype) -> dict[str, Projection]:
    """The ``subspace`` operator of each targeted weight from its harmful total, on the CPU."""
    total_of = {id(p): t for p, t in zip(params, totals, strict=True)}
    projections = {}
    for name, (w, layout) in weights.items():
        g = to_out_in(total_of[id(w)], layout)
        if not bool(g.ne(0).any()):
            raise AnchorError(f"{name}: the harmful loss does not move this weight (zero {method}); drop it from target_modules")
        p = projection_from_delta(g, "subspace", rank=rank, energy=energy, name=name)
        projections[name] = p.to("cpu", dtype)
    return projections


def _grads(model, batch, params, loss_fn) -> list[Tensor]:
    loss = loss_fn(model, batch)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def _summed_gradients(model, batches, params, loss_fn) -> list[Tensor]:
    totals = [torch.zeros_like(p, dtype=math_dtype(p)) for p in params]
    for batch in batches:
        for total, g in zip(totals, _grads(model, batch, params, loss_fn), strict=True):
            total.add_(g.to(total.dtype))
    return totals


def _sgd_deltas(model, batches, params, loss_fn, lr, epochs) -> list[Tensor]:
    start = [p.detach().to(math_dtype(p), copy=True) for p in params]
    master = [s.clone() for s in start]  # full-precision copies the SGD steps act on
    for _ in range(epochs):
        for batch in batches:
            grads = _grads(model, batch, params, loss_fn)
            with torch.no_grad():
                for p, m, g in zip(params, master, grads, strict=True):
                    m.sub_(g.to(m.dtype), alpha=lr)
                    p.copy_(m.to(p.dtype))
    return [m - s for m, s in zip(master, start, strict=True)]
