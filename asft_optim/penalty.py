"""The loss-level twin of the optimizer: ``loss = task + anchor_penalty(model, anchors)``.

Target discovery and the shape checks (a device sync per anchor) run once per
(model, anchors) pair and are cached (the model weakly referenced). The cache is dropped
when the anchors object or any of its entries changes, or when a module of a bound model
registers a submodule or a parameter (PEFT wrapping the model later, an adapter added, a
weight replaced): global registration hooks count those events (registrations on other
modules, such as the temporary ``ModuleList`` a slice ``layers[:n]`` creates in a forward
pass, are ignored). Tensors are still looked up at every call, like the optimizer does.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .layout import to_out_in
from .projection import AnchorError, PenaltyTerms, Projection, dense_terms, lora_terms
from .targets import Target, check_shapes, find_targets
from .terms import effective_delta, operator, origin_blocks, reference_on

__all__ = ["anchor_penalty", "clear_cache", "target_penalty"]


class _ClosedForm(torch.autograd.Function):
    """``‖R ΔW‖²`` whose backward returns the closed-form gradients ``terms(...)`` computed
    in the forward pass: the two passes over F the optimizer makes, instead of autograd's
    four (two for ``R x``, two more to differentiate them). Not twice differentiable."""

    @staticmethod
    def forward(ctx, terms: Callable[..., PenaltyTerms], *inputs: Tensor) -> Tensor:
        t = terms(*(x.detach() for x in inputs))
        ctx.grads = t.grads
        return t.penalty

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        return (None, *(g * grad_out for g in ctx.grads))


def _closed_form(terms: Callable[..., PenaltyTerms], *inputs: Tensor) -> Tensor:
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        return _ClosedForm.apply(terms, *inputs)
    return terms(*inputs).penalty


def target_penalty(target: Target, proj: Projection, reference: Tensor | None = None) -> Tensor | None:
    """Differentiable raw penalty ``‖R ΔW‖²`` of one target (None: no active update).

    A LoRA adapter that needs an origin (PiSSA, OLoRA, LoftQ, ...) uses ``target.origin``:
    ΔW = s·B·A - s₀·B₀A₀ (:class:`AnchorError` if it was not recorded).
    """
    if target.kind == "lora":
        factors = target.lora_factors()
        if not factors:
            return None
        op, gram = operator(target, proj, factors[0][0])
        dtype = op.factor.dtype
        origins = origin_blocks(target, target.adapters()) if target.needs_origin else []
        if len(factors) == 1 and not origins:
            b, a, s = factors[0][0].to(dtype), factors[0][1].to(dtype), factors[0][2]
        else:  # ΔW = Σ sᵢBᵢAᵢ − s₀B₀A₀ = [s₁B₁, …, −s₀B₀] @ [A₁; …; A₀], s = 1
            dev = factors[0][0].device
            b = torch.cat([f[0].to(dtype) * f[2] for f in factors]
                          + [b0.to(device=dev, dtype=dtype) for b0, _ in origins], 1)
            a = torch.cat([f[1].to(dtype) for f in factors]
                          + [a0.to(device=dev, dtype=dtype) for _, a0 in origins], 0)
            s = 1.0
        # ‖R B A‖² = s² tr((RB)ᵀ RB · A Aᵀ): no d_out × d_in product.
        return _closed_form(lambda b_, a_: lora_terms(op, b_, a_, s, gram), b, a)
    if target.kind == "full":
        if reference is None:
            reference = target.default_reference()
        if reference is None:
            raise AnchorError(f"{target.name}: fully tuned weight needs a reference weight")
        w = target.base_weight()
        op, gram = operator(target, proj, w)
        dtype = op.factor.dtype
        delta = to_out_in(w.to(dtype) - reference_on(target, reference, w).to(dtype), target.layout)
        return _closed_form(lambda d: dense_terms(op, d, gram), delta)
    delta = effective_delta(target)
    if delta is None:
        return None
    proj = operator(target, proj, delta)[0]
    return proj.residual(delta.to(proj.factor.dtype)).pow(2).sum()


# -- (model, anchors) -> targets, checked once ------------------------------------------

_registrations = 0  # modules/parameters registered on a watched module since the hooks were installed
_watched: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # every module of every bound model
_hooks: tuple | None = None


def _count_registration(module: nn.Module, *_args) -> None:
    global _registrations
    if module in _watched:
        _registrations += 1  # returns None: the hook never replaces what is registered


def _install_hooks() -> None:
    global _hooks
    if _hooks is None:
        from torch.nn.modules import module as _module

        _hooks = (
            _module.register_module_module_registration_hook(_count_registration),
            _module.register_module_parameter_registration_hook(_count_registration),
        )


@dataclass
class _Bound:
    anchors: Mapping[str, Projection]
    entries: tuple[tuple[str, Projection], ...]  # the anchors' items when bound
    registrations: int
    targets: list[Target]
    missing: list[str]

    def valid(self, anchors: Mapping[str, Projection]) -> bool:
        if self.anchors is not anchors or self.registrations != _registrations or len(anchors) != len(self.entries):
            return False
        return all(anchors.get(n) is p for n, p in self.entries)


_BOUND: weakref.WeakKeyDictionary[nn.Module, _Bound] = weakref.WeakKeyDictionary()


def _bind(model: nn.Module, anchors: Mapping[str, Projection]) -> _Bound:
    """Targets of ``model`` for ``anchors``, found and checked once (see the module docstring)."""
    _install_hooks()
    bound = _BOUND.get(model)
    if bound is not None and bound.valid(anchors):
        return bound
    count = _registrations
    targets, missing = find_targets(model, anchors, record_origin=False)
    check_shapes(targets, anchors)
    _watched.update(model.modules())
    bound = _Bound(anchors, tuple(anchors.items()), count, targets, missing)
    _BOUND[model] = bound  # one entry per model: a new anchors object replaces the old one
    return bound


def clear_cache() -> None:
    """Forget every (model, anchors) binding of :func:`anchor_penalty` (they rebuild on the next call)."""
    _BOUND.clear()


def anchor_penalty(
    model: nn.Module,
    anchors: Mapping[str, Projection],
    anchor_lambda: float = 1.0,
    *,
    reference: Mapping[str, Tensor] | None = None,
    origins: Mapping[str, Mapping[str, tuple[Tensor, Tensor]]] | None = None,
    strict: bool = True,
) -> Tensor:
    r"""Differentiable :math:`\lambda \sum \lVert R\,\Delta W\rVert_F^2` over the anchored weights.

    Adding it to the task loss and stepping a plain optimizer equals stepping
    :class:`AnchoredOptimizer` (coupled) on the task loss alone, at the same cost per call
    (the gradients are the closed forms the optimizer uses; the penalty is not twice
    differentiable except for DoRA and other autograd-kind adapters).

    Args:
        model: the model being tuned.
        anchors: ``{HF weight name: Projection}``.
        anchor_lambda: λ (default: 1.0).
        reference: ``{name: W_ref}`` for fully tuned weights (default: None; required
            when an anchored weight is trained directly, except a PEFT ``modules_to_save``
            copy, measured from its frozen original).
        origins: ``{name: {adapter: (B₀, A₀)}}`` for LoRA adapters whose init rewrote the
            base weight (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA): ΔW = s·B·A - s₀·B₀A₀ with
            ``(B₀, A₀)`` the adapter's value before training, shaped like the parameters
            (default: None). Being stateless, this function cannot know them: without them
            such a model raises :class:`AnchorError` (the optimizer records them itself;
            ``{t.name: t.origin for t in opt.targets}`` is what it holds).
        strict: raise if an anchor matches no module (default: True).

    Example::

        >>> loss = task_loss + anchor_penalty(peft_model, anchors, anchor_lambda=1.0)
    """
    if isinstance(anchor_lambda, (int, float)) and not 0.0 <= anchor_lambda < float("inf"):
        raise ValueError(f"Invalid anchor_lambda: {anchor_lambda!r} (must be finite and >= 0)")
    bound = _bind(model, anchors)
    if bound.missing and strict:
        missing = bound.missing
        raise AnchorError(f"{len(missing)} anchor(s) match no module of the model (first: {missing[:5]})")
    total: Tensor | None = None
    for t in bound.targets:
        if t.kind == "full" and not t.base_weight().requires_grad:
            continue
        ref = (reference or {}).get(t.name)
        if t.needs_origin:  # replaced, not updated: the cached target must not keep an old call's
            t.origin = dict((origins or {}).get(t.name, {}))
        p = target_penalty(t, anchors[t.name], ref)
        if p is not None:
            total = p if total is None else total + p
    if not bound.targets:
        raise AnchorError(f"no anchor matches a module of the model (anchors: {list(anchors)[:5]})")
    if total is None:
        # Matched, but every adapter is merged/disabled or no weight is trainable: ΔW has no
        # trainable part right now, so the penalty is a constant 0.
        return torch.zeros((), dtype=torch.float32)
    return anchor_lambda * total
