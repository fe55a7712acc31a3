"""Build safety-gradient subspaces from the aligned model's own refusals (SPF-like).

Two stages, both explicit:

1. :func:`greedy_refusals`: the aligned model answers each harmful *prompt* greedily
   (no sampling); the prompt plus its answer becomes one example whose labels cover
   the answer only. No compliant answer and no evaluation prompt is ever needed.
2. :func:`refusal_subspaces`: per example, the gradient ``G_i`` of the answer's NLL with
   respect to every anchored (dense, base) weight, accumulated per weight as
   ``S = Σ_i G_i G_iᵀ`` (float64, streaming), then ``Q`` = top-k eigenvectors of S
   (:func:`~asft_optim.safety_subspace.subspace_from_gram`).

Build cost: n greedy generations (``max_new_tokens`` forward passes each, with the KV
cache) and n forward+backward passes (one per prompt: per-example gradients carry the
directions a summed gradient would cancel); memory one d_out×d_out float64 matrix per
anchored weight. The model is returned as found: weights untouched, ``requires_grad``
flags and train/eval modes restored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .anchors import _natural
from .baselines.targeted import targeted_weights
from .basis_io import BasisOperators
from .layout import WeightInfo, to_out_in
from .projection import AnchorError
from .safety_subspace import SafetySubspace, subspace_from_gram
from .version import __version__

__all__ = ["GRADIENT_SIDE", "SafetySubspaces", "greedy_refusals", "refusal_grams", "refusal_subspaces"]

#: The ``side`` metadata value of a safety-subspace file.
GRADIENT_SIDE = "gradient"


class SafetySubspaces(BasisOperators[SafetySubspace]):
    """Read-only mapping ``weight name -> SafetySubspace`` plus string metadata; saved as an
    anchor file of side ``gradient`` (:mod:`asft_optim.basis_io`). A subspace without
    ``d_in`` needs its weight's :class:`WeightInfo` in ``weights``.

    Example::

        >>> subs = refusal_subspaces(aligned, greedy_refusals(aligned, prompt_ids), target_modules=["q_proj"], rank=4)
        >>> subs.save("q.gradient.anchors.safetensors"); subs = SafetySubspaces.load("q.gradient.anchors.safetensors")
    """

    _what = "safety subspaces"
    side = GRADIENT_SIDE

    def __init__(
        self,
        subspaces: Mapping[str, SafetySubspace],
        metadata: Mapping[str, str] | None = None,
        weights: Mapping[str, WeightInfo] | None = None,
    ) -> None:
        super().__init__(subspaces, metadata, weights)

    def _weight_info(self, name: str, sub: SafetySubspace, info: WeightInfo | None) -> WeightInfo:
        if info is None and sub.d_in is None:
            raise AnchorError(f"{name}: give its WeightInfo (the subspace does not know d_in)")
        return super()._weight_info(name, sub, info)

    @classmethod
    def _operator(cls, basis: Tensor, info: WeightInfo, energy: float) -> SafetySubspace:
        return SafetySubspace(basis, info.out_in_shape[1], energy)


IGNORE_INDEX = -100


def greedy_refusals(
    model: nn.Module,
    prompts: Sequence[Tensor],
    *,
    max_new_tokens: int = 48,
    eos_token_id: int | None = None,
) -> list[dict[str, Tensor]]:
    """The aligned model's greedy answers to ``prompts``, as training examples.

    Args:
        model: the aligned HF causal LM.
        prompts: 1-D token-id tensors, chat-templated with the generation prompt (one
            per harmful prompt; never an evaluation prompt).
        max_new_tokens: longest answer (default: 48; a refusal's first tokens carry it).
        eos_token_id: stops an answer, and is kept as its last label (default: None,
            the model's generation config).

    Returns:
        One dict per prompt: ``input_ids`` and ``labels`` (1, T), the prompt's labels -100.
    """
    if not prompts:
        raise AnchorError("no harmful prompt was given")
    eos = eos_token_id
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    training = [(m, m.training) for m in model.modules()]
    out = []
    try:
        model.eval()
        with torch.no_grad():
            for p in prompts:
                ids = p.reshape(1, -1)
                full = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                    max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0 if eos is None else eos,
                )[0]
                answer = full[ids.shape[1]:]
                if eos is not None and bool((answer == eos).any()):
                    answer = answer[: int((answer == eos).nonzero()[0]) + 1]
                if answer.numel() == 0:
                    raise AnchorError("the model gave an empty answer to a prompt; raise max_new_tokens")
                input_ids = torch.cat([ids[0], answer])[None]
                labels = input_ids.clone()
                labels[0, : ids.shape[1]] = IGNORE_INDEX
                out.append({"input_ids": input_ids, "labels": labels})
    finally:
        for m, flag in training:
            m.training = flag
    return out


def _answer_nll(model: nn.Module, example: Mapping[str, Tensor]) -> Tensor:
    return model(**example).loss


@contextmanager
def _differentiable_in_eval(model: nn.Module, params: Sequence[Tensor]) -> Iterator[None]:
    """Run the body with ``model`` in eval mode (no dropout: the gradient of the model as
    it answers), ``params`` requiring grad and grad enabled; every ``requires_grad`` flag
    and train/eval mode is given back on exit, even on error."""
    flags = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training


def _gradient_grams(
    model: nn.Module,
    examples: Iterable[Mapping[str, Any]],
    weights: Mapping[str, tuple[Tensor, str]],
    loss_fn: Callable[[nn.Module, Any], Tensor],
) -> tuple[dict[int, Tensor], int]:
    """``({id(weight): Σ_i G_i G_iᵀ}, n examples)``: float64 (d_out, d_out) Gram matrices of
    the per-example gradients, streamed; a weight no loss reaches has no entry."""
    params = list({id(w): w for w, _ in weights.values()}.values())
    index = {id(p): i for i, p in enumerate(params)}
    grams: dict[int, Tensor] = {}
    n = 0
    with _differentiable_in_eval(model, params):
        for example in examples:
            grads = torch.autograd.grad(loss_fn(model, example), params, allow_unused=True)
            for w, layout in weights.values():
                g = grads[index[id(w)]]
                if g is None:
                    continue
                g64 = to_out_in(g, layout).double()
                key = id(w)
                grams[key] = g64 @ g64.T if key not in grams else grams[key].addmm_(g64, g64.T)
            n += 1
    return grams, n


def refusal_grams(
    model: nn.Module,
    examples: Iterable[Mapping[str, Any]],
    *,
    target_modules: str | Iterable[str],
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
) -> tuple[dict[str, Tensor], dict[str, WeightInfo], int]:
    """Per-weight Gram matrices of per-example loss gradients: what :func:`refusal_subspaces`
    cuts, public so that held-out gradients can be measured against a subspace
    (:func:`~asft_optim.safety_subspace.captured_share` of ``S`` is the share of their energy
    the projection removes).

    Args:
        model, examples, target_modules, loss_fn: as :func:`refusal_subspaces`.

    Returns:
        ``({name: S = Σ_i G_i G_iᵀ}, {name: WeightInfo}, n examples)``, S float64
        (d_out, d_out) in (out, in) terms, names in file order.
    """
    weights = targeted_weights(model, target_modules)
    grams, n = _gradient_grams(model, examples, weights, loss_fn or _answer_nll)
    if n == 0:
        raise AnchorError("no refusal example was given")
    out, infos = {}, {}
    for name in sorted(weights, key=_natural):  # the order files are read in
        w, layout = weights[name]
        if id(w) not in grams:
            raise AnchorError(f"{name}: the refusal loss does not reach this weight; drop it from target_modules")
        out[name], infos[name] = grams[id(w)], WeightInfo(tuple(w.shape), layout)
    return out, infos, n


def refusal_subspaces(
    model: nn.Module,
    examples: Iterable[Mapping[str, Any]],
    *,
    target_modules: str | Iterable[str],
    rank: int | None = None,
    energy: float | None = None,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> SafetySubspaces:
    """Per-weight :class:`SafetySubspace` from per-example refusal-loss gradients.

    Args:
        model: the aligned model (plain or PEFT: the tuners' base weights are used).
        examples: one example per prompt, e.g. from :func:`greedy_refusals`.
        target_modules: module-name suffixes or a regex, as :func:`~asft_optim.build_anchors`.
        rank / energy: directions kept per weight (give one).
        loss_fn: ``loss_fn(model, example) -> loss`` (default: ``model(**example).loss``,
            the mean NLL over the answer's tokens).
        dtype: storage dtype of the bases (default: float32).
    """
    grams, infos, n = refusal_grams(model, examples, target_modules=target_modules, loss_fn=loss_fn)
    out = {}
    for name, gram in grams.items():
        sub = subspace_from_gram(gram, rank, energy, d_in=infos[name].out_in_shape[1], name=name)
        out[name] = sub.to("cpu", dtype)
    metadata = {
        "side": GRADIENT_SIDE, "source": "refusal-gradients", "examples": str(n),
        "rank": "" if rank is None else str(rank), "energy": "" if energy is None else str(energy),
        "storage_dtype": str(dtype).removeprefix("torch."),
        "target_modules": target_modules if isinstance(target_modules, str) else ",".join(target_modules),
        "library": f"asft-optim {__version__}",
    }
    return SafetySubspaces(out, metadata, infos)
