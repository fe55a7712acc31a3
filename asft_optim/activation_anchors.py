"""Build input-side anchors from prompts: each anchored layer's input covariance, its eigenvectors.

Per anchored weight (a ``Linear``, or a GPT-2 ``Conv1D``, or the PEFT tuner wrapping one),
a forward pre-hook on the aligned model collects the layer's inputs ``x`` (d_in) on every
*unmasked* token of the defender's prompts and accumulates, in float64 and streaming over
batches, ``Σ = Σ_tokens x xᵀ = XᵀX`` (d_in × d_in), uncentred on purpose: the change of
the output is ``ΔW x`` for the input itself, its mean included. The basis ``U`` is then

* ``plain``: the top-k eigenvectors of ``Σ_h / n_h`` (harmful prompts): the directions
  the layer reads most on those prompts;
* ``contrast``: the top-k generalised eigenvectors of ``Σ_h u = μ (Σ_t + εI) u`` with
  both covariances per token (harmful vs task prompts), orthonormalised by a QR (same
  span): the directions whose harmful-prompt energy is large *relative* to task-prompt
  energy, so that the penalty leaves the inputs the task needs free.

Build cost: one forward pass (no backward) per batch of harmful prompts, plus one per
batch of task prompts for ``contrast``; per weight O(tokens · d_in²) for the covariance
and one O(d_in³) eigendecomposition (with a Cholesky factorisation for ``contrast``).
Memory: one d_in × d_in float64 matrix per anchored weight while building.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .anchors import _natural
from .baselines.targeted import targeted_modules
from .input_anchors import INPUT_SIDE, InputAnchors
from .input_projection import InputProjection
from .layout import WeightInfo, out_in_shape, weight_layout
from .projection import AnchorError
from .targets import is_tuner
from .version import __version__

__all__ = [
    "InputCovariance",
    "anchors_from_covariances",
    "build_input_anchors",
    "contrast_directions",
    "input_covariances",
    "top_directions",
]


@dataclass
class InputCovariance:
    """``XᵀX`` of one layer's inputs over ``tokens`` unmasked tokens (float64)."""

    total: Tensor
    tokens: int = 0

    @property
    def mean(self) -> Tensor:
        """``XᵀX / tokens``: the per-token second moment (what the eigenproblems use)."""
        if self.tokens == 0:
            raise AnchorError("no token reached this layer: the prompts are empty or fully masked")
        return self.total / self.tokens


def _anchored_modules(model: nn.Module, target_modules) -> dict[str, nn.Module]:
    """``{HF weight name: module to hook}``; a PEFT tuner counts as the layer it wraps."""
    out: dict[str, nn.Module] = {}
    for name, module, base in targeted_modules(model, target_modules):
        if base.weight.dim() != 2:
            continue
        if isinstance(base, nn.Embedding):
            raise AnchorError(f"{name[:-7]}: an embedding reads token ids, not activations; drop it from target_modules")
        out[name] = module
    if not out:
        raise AnchorError(f"no 2-D weight of the model matches target_modules={target_modules!r}")
    return {n: out[n] for n in sorted(out, key=_natural)}  # the order files are read in


def _base_layer(module: nn.Module) -> nn.Module:
    """The layer holding the anchored weight: a PEFT tuner's base layer, else ``module``."""
    return module.get_base_layer() if is_tuner(module) else module


def _model_inputs(batch: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
    """``(inputs, mask)``: what the model is called with, and the tokens that count.

    ``labels`` and ``token_mask`` are not model inputs here; ``mask`` is the attention
    mask and the optional ``token_mask`` together (``None``: every token counts).
    """
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "token_mask")}
    mask = inputs.get("attention_mask")
    mask = None if mask is None else mask.to(torch.bool)
    if batch.get("token_mask") is not None:
        keep = batch["token_mask"].to(torch.bool)
        mask = keep if mask is None else mask & keep
    return inputs, mask


def _counted_rows(name: str, x: Tensor, mask: Tensor | None) -> Tensor:
    """The rows (tokens, d_in) of the activation ``x`` on the counted tokens, in float64."""
    d_in = x.shape[-1]
    rows = x.detach().reshape(-1, d_in)
    if mask is not None:
        if tuple(x.shape[:-1]) != tuple(mask.shape):
            raise AnchorError(
                f"{name}: input of shape {tuple(x.shape)} does not line up with the attention "
                f"mask {tuple(mask.shape)}; anchor layers that see one activation per token"
            )
        rows = rows[mask.reshape(-1)]
    return rows.to(torch.float64)


def _accumulating_hook(name: str, cov: InputCovariance, current: dict[str, Tensor | None]):
    """A forward pre-hook adding the layer's inputs on the current batch's counted tokens
    (``current["mask"]``) to ``cov``."""
    d_in = cov.total.shape[0]

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        if not isinstance(x, Tensor) or x.shape[-1] != d_in:
            raise AnchorError(
                f"{name}: its input is not a (..., {d_in}) activation; drop it from target_modules"
            )
        rows = _counted_rows(name, x, current["mask"])
        cov.total.addmm_(rows.transpose(0, 1), rows)
        cov.tokens += rows.shape[0]

    return hook


@contextmanager
def _covariance_hooks(
    modules: Mapping[str, nn.Module], current: dict[str, Tensor | None]
) -> Iterator[dict[str, InputCovariance]]:
    """Hook every anchored module to accumulate its inputs' ``XᵀX`` (yielded, zero at
    first); the hooks are removed on exit, even on error."""
    covs: dict[str, InputCovariance] = {}
    handles = []
    try:
        for name, module in modules.items():
            base = _base_layer(module)
            d_in = out_in_shape(tuple(base.weight.shape), weight_layout(base))[1]
            zeros = torch.zeros(d_in, d_in, dtype=torch.float64, device=base.weight.device)
            covs[name] = InputCovariance(zeros)
            hook = _accumulating_hook(name, covs[name], current)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield covs
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the body with ``model`` in eval mode; every submodule gets its mode back on exit."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


def input_covariances(
    model: nn.Module, batches: Iterable[Mapping[str, Tensor]], target_modules
) -> dict[str, InputCovariance]:
    """``{weight name: XᵀX}`` of every anchored layer's inputs over the batches' unmasked tokens.

    Args:
        model: HF causal LM (plain or PEFT); run in eval mode under ``no_grad`` and
            returned to its train/eval modes.
        batches: dicts of model inputs (``input_ids``, ``attention_mask``; ``labels`` is
            ignored). Tokens with ``attention_mask == 0`` are left out; pad on the
            *right* (left padding shifts the positions of a Llama's tokens). An optional
            ``token_mask`` (same shape, not passed to the model) further selects the tokens
            that count, e.g. to leave out a chat template's shared system prompt, whose
            activations are the same for every prompt
            (:func:`~asft_optim.prompt_tokens.right_padded_batches` ``skip_prefix``).
        target_modules: module-name suffixes or a full-match regex, as in PEFT.
    """
    modules = _anchored_modules(model, target_modules)
    # Shared with the hooks: they run inside model(...), which cannot hand them the mask.
    current: dict[str, Tensor | None] = {"mask": None}
    with _eval_mode(model), _covariance_hooks(modules, current) as covs, torch.no_grad():
        n_batches = 0
        for batch in batches:
            inputs, current["mask"] = _model_inputs(batch)
            model(**inputs)
            n_batches += 1
        if n_batches == 0:
            raise AnchorError("no batch of prompts was given")
    silent = [n for n, c in covs.items() if c.tokens == 0]
    if silent:
        raise AnchorError(f"no unmasked token reached {silent[:5]}: the model never called them on these prompts")
    return covs


def _cut(values: Tensor, rank: int | None, energy: float | None, d: int, name: str) -> int:
    """How many leading (descending) ``values`` to keep, by rank or by energy fraction."""
    if (rank is None) == (energy is None):
        raise AnchorError(f"{name}: give rank= or energy= (one of them)")
    if rank is not None:
        if not (isinstance(rank, int) and 1 <= rank <= d):
            raise AnchorError(f"{name}: rank {rank!r} must be an int in [1, {d}]")
        return rank
    if not (0.0 < energy <= 1.0):
        raise AnchorError(f"{name}: energy must lie in (0, 1], got {energy!r}")
    v = values.clamp_min(0)
    if float(v.sum()) == 0.0:
        raise AnchorError(f"{name}: the inputs carry no energy; this layer cannot be anchored")
    cum = torch.cumsum(v, 0) / v.sum()
    return min(int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12).item()) + 1, d)


def top_directions(
    cov: Tensor, rank: int | None = None, energy: float | None = None, *, name: str = "weight"
) -> tuple[Tensor, Tensor, float]:
    """Top-k eigenvectors ``U`` (d, k) of a covariance, their eigenvalues, the energy kept.

    ``energy``: keep the fewest eigenvectors holding this fraction of ``tr(Σ)``.
    """
    evals, evecs = torch.linalg.eigh(cov.double())
    evals, evecs = evals.flip(0), evecs.flip(1)
    k = _cut(evals, rank, energy, cov.shape[0], name)
    total = float(evals.clamp_min(0).sum())
    kept = float(evals[:k].clamp_min(0).sum()) / total if total > 0 else 1.0
    return evecs[:, :k].contiguous(), evals[:k].contiguous(), kept


def contrast_directions(
    harmful: Tensor,
    task: Tensor,
    rank: int | None = None,
    energy: float | None = None,
    *,
    eps: float = 1e-3,
    name: str = "weight",
) -> tuple[Tensor, Tensor, Tensor, float]:
    r"""Directions where harmful-input energy is large relative to task-input energy.

    .. math::
        Σ_h v = μ (Σ_t + ε I) v, \qquad ε = \text{eps} \cdot \operatorname{tr}(Σ_t)/d,

    solved through the Cholesky factor ``Σ_t + εI = L Lᵀ``: ``L⁻¹ Σ_h L⁻ᵀ w = μ w``,
    ``v = L⁻ᵀ w``. ``μ`` is a per-direction energy ratio (harmful / task, both per token).

    Args:
        harmful, task: per-token covariances (d, d), e.g. :attr:`InputCovariance.mean`.
        rank / energy: keep the top ``rank`` ratios, or the fewest holding ``energy`` of Σμ.
        eps: ridge relative to the task covariance's mean eigenvalue (default: 1e-3); it
            bounds μ where the task inputs have no energy at all.

    Returns:
        ``(U, mu, V, kept)``: ``U`` (d, k) orthonormal (QR of V, same span), ``mu`` (k,)
        descending, ``V`` (d, k) the raw generalised eigenvectors, ``kept`` their share of Σμ.
    """
    if not (math.isfinite(eps) and eps > 0):
        raise AnchorError(f"{name}: eps must be a positive number, got {eps!r}")
    h, t = harmful.double(), task.double()
    d = h.shape[0]
    ridge = eps * float(torch.trace(t)) / d
    if ridge <= 0:
        raise AnchorError(f"{name}: the task inputs carry no energy; use the plain (non-contrast) form")
    eye = torch.eye(d, dtype=h.dtype, device=h.device)
    chol, info = torch.linalg.cholesky_ex(t + ridge * eye)
    if int(info) != 0:
        raise AnchorError(f"{name}: the task covariance is not positive definite even with ε; raise eps")
    m = torch.linalg.solve_triangular(chol, h, upper=False)  # L⁻¹ Σ_h
    m = torch.linalg.solve_triangular(chol, m.transpose(0, 1), upper=False)  # L⁻¹ Σ_h L⁻ᵀ (symmetric)
    mu, w = torch.linalg.eigh((m + m.transpose(0, 1)) / 2)
    mu, w = mu.flip(0), w.flip(1)
    k = _cut(mu, rank, energy, d, name)
    v = torch.linalg.solve_triangular(chol.transpose(0, 1), w[:, :k], upper=True)  # L⁻ᵀ w
    u = torch.linalg.qr(v).Q
    total = float(mu.clamp_min(0).sum())
    kept = float(mu[:k].clamp_min(0).sum()) / total if total > 0 else 1.0
    return u.contiguous(), mu[:k].contiguous(), v, kept


def build_input_anchors(
    model: nn.Module,
    harmful_batches: Iterable[Mapping[str, Tensor]],
    *,
    target_modules: str | Iterable[str],
    rank: int | None = None,
    energy: float | None = None,
    task_batches: Iterable[Mapping[str, Tensor]] | None = None,
    eps: float = 1e-3,
    dtype: torch.dtype = torch.float32,
) -> InputAnchors:
    """Input-side anchors of the aligned ``model`` from the defender's prompts.

    With ``task_batches`` the ``contrast`` form is built (:func:`contrast_directions`),
    else the ``plain`` form (:func:`top_directions` of the harmful inputs). The penalty
    ``λ‖ΔW U‖²`` then keeps each layer's response to those inputs fixed.

    Args:
        model: the aligned HF causal LM (plain or PEFT: a tuner counts as its base layer).
        harmful_batches: tokenised harmful *prompts* (chat-templated, right-padded, with
            ``attention_mask``); never the evaluation prompts.
        target_modules: module-name suffixes or a regex, as :func:`~asft_optim.build_anchors`.
        rank / energy: directions kept per weight (give one).
        task_batches: tokenised task prompts, for the contrast form (default: None).
        eps: the contrast's relative ridge (default: 1e-3).
        dtype: storage dtype of the bases (default: float32).

    Example::

        >>> anchors = build_input_anchors(aligned, harmful, target_modules=["q_proj", "v_proj"], rank=8)
        >>> anchors.save("qv.input.anchors.safetensors")
    """
    from .anchor_io import dtype_name

    dtype_name(dtype)  # reject unsupported storage dtypes before any forward pass
    harmful = input_covariances(model, harmful_batches, target_modules)
    task = input_covariances(model, task_batches, target_modules) if task_batches is not None else None
    return anchors_from_covariances(model, harmful, task, target_modules=target_modules, rank=rank,
                                    energy=energy, eps=eps, dtype=dtype)


def anchors_from_covariances(
    model: nn.Module,
    harmful: Mapping[str, InputCovariance],
    task: Mapping[str, InputCovariance] | None = None,
    *,
    target_modules: str | Iterable[str],
    rank: int | None = None,
    energy: float | None = None,
    eps: float = 1e-3,
    dtype: torch.dtype = torch.float32,
) -> InputAnchors:
    """:func:`build_input_anchors` from covariances already collected (no forward pass).

    Why separate: a caller that also measures the anchors on held-out prompts
    (:func:`~asft_optim.safety_subspace.captured_share`) collects every set's covariances
    with :func:`input_covariances` once and builds from those.

    Args:
        model: the model the covariances were collected on (for the weights' shapes).
        harmful: ``{weight name: InputCovariance}`` of the harmful prompts.
        task: the same for the task prompts: the contrast form (default: None, plain).
        target_modules, rank, energy, eps, dtype: as :func:`build_input_anchors`.
    """
    from .anchor_io import dtype_name

    dtype_name(dtype)
    modules = _anchored_modules(model, target_modules)
    missing = [n for n in modules if n not in harmful or (task is not None and n not in task)]
    if missing:
        raise AnchorError(f"no covariance for {missing[:5]}: collect them with the same target_modules")
    projections, weights = {}, {}
    for name, cov in ((n, harmful[n]) for n in modules):
        task_cov = None if task is None else task[name]
        projections[name], weights[name] = _input_projection(
            name, modules[name], cov, task_cov, rank, energy, eps, dtype
        )
    metadata = _input_metadata(harmful, task, target_modules, rank, energy, eps, dtype)
    return InputAnchors(projections, metadata, weights)


def _input_projection(
    name: str,
    module: nn.Module,
    harmful: InputCovariance,
    task: InputCovariance | None,
    rank: int | None,
    energy: float | None,
    eps: float,
    dtype: torch.dtype,
) -> tuple[InputProjection, WeightInfo]:
    """One weight's basis, plain (``task`` None) or contrast, stored on the CPU in ``dtype``."""
    base = _base_layer(module)
    info = WeightInfo(tuple(base.weight.shape), weight_layout(base))
    if task is None:
        u, _, kept = top_directions(harmful.mean, rank, energy, name=name)
    else:
        u, _, _, kept = contrast_directions(
            harmful.mean, task.mean, rank, energy, eps=eps, name=name
        )
    return InputProjection(u.to("cpu", dtype).contiguous(), info.out_in_shape[0], kept), info


def _input_metadata(
    harmful: Mapping[str, InputCovariance],
    task: Mapping[str, InputCovariance] | None,
    target_modules: str | Iterable[str],
    rank: int | None,
    energy: float | None,
    eps: float,
    dtype: torch.dtype,
) -> dict[str, str]:
    """The anchor file's record of how its bases were built (form, cut, token counts)."""
    return {
        "side": INPUT_SIDE,
        "form": "plain" if task is None else "contrast",
        "rank": "" if rank is None else str(rank),
        "energy": "" if energy is None else str(energy),
        "eps": "" if task is None else str(eps),
        "harmful_tokens": str(next(iter(harmful.values())).tokens),
        "task_tokens": "" if task is None else str(next(iter(task.values())).tokens),
        "storage_dtype": str(dtype).removeprefix("torch."),
        "target_modules": target_modules if isinstance(target_modules, str) else ",".join(target_modules),
        "library": f"asft-optim {__version__}",
    }
