"""Baselines sharing the anchors: Safe LoRA, AsFT_Alt's harmful subspace, and ``l2``.

* :func:`safe_lora_project` is Safe LoRA (Hsu et al. 2024): post hoc, per LoRA adapter,
  compare ``K·B·A`` with ``B·A`` and replace ``B`` by ``K·B`` on the least aligned layers.
  ``K`` is the operator that *keeps* the safe part of an update, ``K x = x - R x``:
  ``K = C`` for the alignment modes (``safelora``: Safe LoRA's own ``V Vᵀ/‖V‖_F``;
  ``orthogonal``: ``U_k U_kᵀ``) and ``K = I - C`` for ``subspace`` anchors (project the
  harmful directions out).
* :func:`harmful_anchors` is AsFT_Alt (paper §5 "Method Adaptability", Table 8): with no
  base model, the harmful directions of each weight come from harmful data, and the
  ``subspace`` penalty ``λ‖C_harm ΔW‖²`` pushes fine-tuning into their orthogonal complement.
* :func:`l2_anchors`: ``C = 0`` for every targeted weight, so the penalty is ``λ‖ΔW‖²``
  (the ablation the reference code's users ask about).

No d×d (or d_out×d_in) product is formed by Safe LoRA: with ``G = A Aᵀ`` (r×r),
``⟨KBA, BA⟩ = tr((KB)ᵀB·G)``, ``‖KBA‖² = tr((KB)ᵀKB·G)``, ``‖BA‖² = tr(BᵀB·G)``;
the LoRA scaling ``s`` cancels in the cosine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .anchors import Anchors, module_name_matcher
from .layout import math_dtype, to_out_in, weight_layout
from .projection import AnchorError, Projection, projection_from_delta
from .targets import check_shapes, find_targets, hf_name, is_tuner

HarmfulMethod = Literal["gradient", "delta"]

#: Safe LoRA's default similarity threshold (mode "threshold" of IBM/SafeLoRA).
DEFAULT_THRESHOLD = 0.5


# -- Safe LoRA ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SafeLoRALayer:
    """One row of :func:`safe_lora_project`'s report.

    ``cosine`` is ``cos(K·B·A, B·A)`` before projection (NaN when ``B·A = 0``: such an
    adapter is never selected); ``projected`` says whether ``B`` was (or, in a dry run,
    would be) replaced by ``K·B``.
    """

    name: str
    adapter: str
    cosine: float
    projected: bool


def kept(proj: Projection, x: Tensor) -> Tensor:
    """``K x``: the component of ``x`` (d_out, n) the anchor allows (``x - R x``)."""
    return x - proj.residual(x)


def lora_cosine(proj: Projection, lora_b: Tensor, lora_a: Tensor) -> Tensor:
    """``cos(K·B·A, B·A)`` through r×r Gram matrices (0-d tensor; NaN if ``B·A = 0``).

    Args:
        proj: the anchor of the weight.
        lora_b: ``B`` (d_out, r), in the dtype and device of ``proj``.
        lora_a: ``A`` (r, d_in).
    """
    kb = kept(proj, lora_b)
    gram_a = lora_a @ lora_a.transpose(0, 1)
    inner = ((kb.transpose(0, 1) @ lora_b) * gram_a).sum()
    kept_sq = ((kb.transpose(0, 1) @ kb) * gram_a).sum().clamp_min(0.0)
    delta_sq = ((lora_b.transpose(0, 1) @ lora_b) * gram_a).sum().clamp_min(0.0)
    denom = torch.sqrt(kept_sq * delta_sq)
    if float(delta_sq) == 0.0:
        return torch.full_like(inner, math.nan)
    if float(denom) == 0.0:  # the whole update is penalised: K·B·A = 0
        return torch.zeros_like(inner)
    return (inner / denom).clamp(-1.0, 1.0)


def _select(cosines: list[float], threshold: float | None, num_layers: int | None) -> list[bool]:
    finite = [i for i, c in enumerate(cosines) if not math.isnan(c)]
    if num_layers is not None:
        lowest = sorted(finite, key=lambda i: cosines[i])[:num_layers]  # stable: model order on ties
        chosen = set(lowest)
    else:
        chosen = {i for i in finite if cosines[i] <= threshold}
    return [i in chosen for i in range(len(cosines))]


@torch.no_grad()
def safe_lora_project(
    model: nn.Module,
    anchors: Mapping[str, Projection],
    *,
    threshold: float | None = None,
    num_layers: int | None = None,
    dry_run: bool = False,
) -> list[SafeLoRALayer]:
    r"""Safe LoRA: replace ``B`` by ``K·B`` for the LoRA adapters least aligned with the anchors.

    .. math::
        \cos_\ell = \frac{\langle K B A,\, B A\rangle_F}{\lVert K B A\rVert_F\,\lVert B A\rVert_F},
        \qquad B \leftarrow K B \text{ where selected}

    Every cosine is computed before anything changes; then the selected ``B`` are
    replaced in place (never in a dry run). Each active, unmerged adapter of each
    anchored LoRA module is one row.

    Args:
        model: a PEFT LoRA model.
        anchors: ``{HF weight name: Projection}`` (any mode but ``l2``).
        threshold: project rows with ``cos <= threshold`` (default: 0.5 when
            ``num_layers`` is not given either).
        num_layers: project the ``num_layers`` rows with the lowest cosine instead.
        dry_run: compute the report only; the model is left untouched (default: False).

    Returns:
        One :class:`SafeLoRALayer` per (anchored module, adapter), in model order.

    Example::

        >>> report = safe_lora_project(peft_model, anchors, threshold=0.5)
        >>> [r.name for r in report if r.projected]
    """
    if threshold is not None and num_layers is not None:
        raise ValueError("give threshold or num_layers, not both")
    if num_layers is None:
        threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
        if math.isnan(threshold):
            raise ValueError("threshold must not be NaN")
    elif not (isinstance(num_layers, int) and num_layers >= 0):
        raise ValueError(f"Invalid num_layers: {num_layers!r} (must be an int >= 0)")
    if any(p.mode == "l2" for p in anchors.values()):
        raise AnchorError("l2 anchors keep nothing (C = 0): Safe LoRA needs an alignment or subspace anchor")
    targets, missing = find_targets(model, anchors)
    if missing:
        raise AnchorError(f"{len(missing)} anchor(s) match no module of the model (first: {missing[:5]})")
    check_shapes(targets, anchors)
    bad = [t.name for t in targets if t.kind == "autograd"]
    if bad:
        raise AnchorError(f"Safe LoRA projects plain LoRA adapters only; DoRA/other tuners on {bad[:5]}")
    bad = [t.name for t in targets if t.needs_origin]
    if bad:
        raise AnchorError(
            "Safe LoRA projects B of ΔW = s·B·A; a PiSSA/OLoRA/LoftQ/CorDA/LoRA-GA adapter's update is "
            f"s·B·A - s₀·B₀A₀ (on {bad[:5]}): convert it to a plain LoRA adapter first (PEFT's "
            "save_pretrained(path_initial_model_for_weight_conversion=...))"
        )

    rows: list[tuple[str, str, Tensor, Tensor, Tensor]] = []  # name, adapter, cos, K·B, B param
    for t in targets:
        if t.kind != "lora":
            continue  # anchored weight without a LoRA adapter: nothing to project
        for adapter, (b2, a2, _s, b_param, _a) in zip(t.adapters(), t.lora_factors(), strict=True):
            dtype = math_dtype(b2)
            proj = anchors[t.name].to(b2.device, dtype)
            b, a = b2.detach().to(dtype), a2.detach().to(dtype)
            rows.append((t.name, adapter, lora_cosine(proj, b, a), kept(proj, b), b_param))
    if not rows:
        raise AnchorError("no anchored module has an active, unmerged LoRA adapter")

    cosines = [float(r[2]) for r in rows]
    chosen = _select(cosines, threshold, num_layers)
    if not dry_run:
        for (_n, _a, _c, kb, b_param), yes in zip(rows, chosen, strict=True):
            if yes:
                b_param.copy_(kb.reshape(b_param.shape).to(b_param.dtype))
    return [SafeLoRALayer(n, a, c, yes) for (n, a, *_), c, yes in zip(rows, cosines, chosen, strict=True)]


# -- targeted weights of a model, without anchors ---------------------------------------


def targeted_weights(model: nn.Module, target_modules: str | Iterable[str]) -> dict[str, tuple[Tensor, str]]:
    """``{HF weight name: (weight, layout)}`` of the modules matching ``target_modules``.

    PEFT tuners count as the module they wrap (their live base weight); modules inside
    a tuner (``base_layer``, ``lora_A``...) are never matched themselves.
    """
    matches = module_name_matcher(target_modules)
    inside: list[str] = []
    out: dict[str, tuple[Tensor, str]] = {}
    for mod_name, module in model.named_modules():
        if any(mod_name.startswith(p) for p in inside):
            continue
        base = module
        if is_tuner(module):
            inside.append(mod_name + ".")
            base = module.get_base_layer()
        w = getattr(base, "weight", None)
        name = hf_name(mod_name)
        if isinstance(w, Tensor) and w.dim() >= 2 and name and matches(name):
            out.setdefault(name + ".weight", (w, weight_layout(base)))
    if not out:
        raise AnchorError(f"no 2-D weight of the model matches target_modules={target_modules!r}")
    return out


def l2_anchors(model: nn.Module, target_modules: str | Iterable[str], *, dtype: torch.dtype = torch.float32) -> Anchors:
    """Anchors with ``C = 0`` (penalty ``λ‖ΔW‖²``) for the targeted weights: shapes only."""
    weights = targeted_weights(model, target_modules)
    projections = {
        n: Projection(torch.zeros(to_out_in(w, layout).shape[0], 0, dtype=dtype), "l2", orthogonal_columns=True)
        for n, (w, layout) in weights.items()
    }
    return Anchors(projections, _metadata("l2", None, None, dtype, target_modules))


def _metadata(mode, rank, energy, dtype, target_modules, **extra) -> dict[str, str]:
    meta = {
        "mode": mode,
        "rank": "" if rank is None else str(rank),
        "energy": "" if energy is None else str(energy),
        "storage_dtype": str(dtype).removeprefix("torch."),
        "target_modules": target_modules if isinstance(target_modules, str) else ",".join(target_modules),
    }
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


# -- AsFT_Alt: harmful directions from harmful data ---------------------------------------


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
    if method not in ("gradient", "delta"):
        raise ValueError(f"Invalid method: {method!r} (expected 'gradient' or 'delta')")
    if rank is None and energy is None:
        raise AnchorError("harmful_anchors needs rank= or energy= (how many harmful directions to keep)")
    if method == "delta" and not (isinstance(epochs, int) and epochs >= 1 and math.isfinite(lr) and lr > 0):
        raise ValueError(f"Invalid delta fine-tune: lr={lr!r}, epochs={epochs!r}")
    loss_fn = loss_fn or _default_loss
    batches = list(harmful_batches)
    if not batches:
        raise ValueError("harmful_batches is empty")
    weights = targeted_weights(model, target_modules)
    params = list({id(w): w for w, _ in weights.values()}.values())
    index = {id(p): i for i, p in enumerate(params)}
    flags = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    originals = [p.detach().clone() for p in params] if method == "delta" else []
    try:
        model.eval()
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            if method == "gradient":
                totals = _summed_gradients(model, batches, params, loss_fn)
            else:
                totals = _sgd_deltas(model, batches, params, loss_fn, lr, epochs)
    finally:
        with torch.no_grad():
            for p, w0 in zip(params, originals, strict=False):
                p.copy_(w0)
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training

    projections = {}
    for name, (w, layout) in weights.items():
        g = to_out_in(totals[index[id(w)]], layout)
        if not bool(g.ne(0).any()):
            raise AnchorError(f"{name}: the harmful loss does not move this weight (zero {method}); drop it from target_modules")
        p = projection_from_delta(g, "subspace", rank=rank, energy=energy, name=name)
        projections[name] = p.to("cpu", dtype)
    return Anchors(projections, _metadata("subspace", rank, energy, dtype, target_modules, source=f"harmful-{method}"))


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
