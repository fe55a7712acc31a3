"""The loss-level twin of the optimizer: ``loss = task + penalty()``.

:class:`AnchorPenalty` is built once, like the optimizer, from the same targets
(:mod:`~asft_optim.targets`): its value and gradient come from the very
:meth:`~asft_optim.targets.Target.terms` the optimizer's ``step()`` adds to ``.grad``, so
the two routes agree by construction. :func:`anchor_penalty` is the one-shot, stateless
shortcut; it keeps its targets per model in a weak cache, checked at every call against
the anchors and the place of each target module in the model (no process-wide hooks, so it
runs inside ``torch.compile``\\d code).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .anchors import as_anchors
from .discovery import bind_targets, match_references
from .projection import AnchorError, Projection
from .targets import Target
from .validation import lambda_value

__all__ = ["AnchorPenalty", "anchor_penalty", "clear_cache"]


@contextlib.contextmanager
def full_precision(device_types: set[str]) -> Iterator[None]:
    """Autocast off on these device types: the penalty runs in the math dtype (float32 for
    bf16/fp16 weights), as ``step()`` does, not in autocast's bf16."""
    with contextlib.ExitStack() as stack:
        for d in device_types:
            if torch.is_autocast_enabled(d):
                stack.enter_context(torch.autocast(d, enabled=False))
        yield


# Eager under torch.compile: the closed-form backward keeps its gradients on the autograd
# context, which a traced graph cannot hold; the terms are a few products per weight.
@torch.compiler.disable
def total_penalty(targets: list[Target], anchors: Mapping[str, Projection]) -> Tensor | None:
    """``Σ ‖R ΔW‖²`` over the targets with a trainable update (None: none has one)."""
    total: Tensor | None = None
    with full_precision({t.base_weight().device.type for t in targets}):
        for t in targets:
            if not any(p.requires_grad for p in t.params()):
                continue  # frozen now: a constant, not part of what is trained
            p = t.penalty(anchors[t.name])
            if p is not None:
                total = p if total is None else total + p
    return total


class AnchorPenalty:
    r"""Differentiable :math:`\lambda \sum \lVert R\,\Delta W\rVert_F^2`, built once.

    Adding ``penalty()`` to the task loss and stepping a plain optimizer equals stepping
    :class:`~asft_optim.AnchoredOptimizer` (coupled) on the task loss alone, at the same
    cost per call: the gradients are the closed forms the optimizer uses (not twice
    differentiable, except for DoRA and the other autograd-kind adapters). Like the
    optimizer, it measures ΔW from the model as it is at construction: W_ref of a fully
    tuned weight and the initial factors of PiSSA/OLoRA/... adapters are recorded then,
    unless given. The value is float32 (or float64) even under bf16 autocast.

    Args:
        model: the model being tuned (plain or PEFT).
        anchors: ``{HF weight name: Projection}``.
        anchor_lambda: λ (default: 1.0); the attribute ``anchor_lambda`` may be changed.
        reference: ``{name: W_ref}`` for fully tuned weights (default: the weights now).
        origins: ``{name: {adapter: (B₀, A₀)}}`` for adapters measured from an origin
            (default: their values now).
        strict: raise if an anchor matches no module (default: True).

    Example::

        >>> penalty = AnchorPenalty(peft_model, anchors, anchor_lambda=1.0)
        >>> loss = task_loss + penalty(); loss.backward()
    """

    def __init__(
        self,
        model: nn.Module,
        anchors: Mapping[str, Projection],
        anchor_lambda: float = 1.0,
        *,
        reference: Mapping[str, Tensor] | None = None,
        origins: Mapping[str, Mapping[str, tuple[Tensor, Tensor]]] | None = None,
        strict: bool = True,
    ) -> None:
        self.anchor_lambda = lambda_value(anchor_lambda)
        self.anchors = anchors = as_anchors(anchors)
        self.targets, self.missing = bind_targets(model, anchors, strict=strict, start=True)
        references = match_references(reference, self.targets)
        for t in self.targets:
            t.use_start(references, origins or {}, stateless=False)

    def __call__(self) -> Tensor:
        lam = lambda_value(self.anchor_lambda)
        total = total_penalty(self.targets, self.anchors)
        if total is None:
            # Every adapter merged/disabled or no weight trainable: ΔW has no trainable part now.
            return torch.zeros((), dtype=torch.float32)
        return lam * total

    def __repr__(self) -> str:
        return f"AnchorPenalty({len(self.targets)} anchored weights, anchor_lambda={self.anchor_lambda!r})"


# -- the one-shot shortcut: (model, anchors) -> targets, found once per model ------------


@dataclass
class _Bound:
    anchors: Mapping[str, Projection]
    entries: tuple[tuple[str, Projection], ...]  # the anchors' items when bound
    places: tuple[tuple[dict, str, nn.Module], ...]  # (parent's _modules, attribute, target module)
    targets: list[Target]
    missing: list[str]

    def valid(self, anchors: Mapping[str, Projection]) -> bool:
        """Same anchors, every target module still where it was bound (a PEFT wrap or a
        replaced module moves one), and no anchor left unmatched. O(anchors), no walk."""
        if self.anchors is not anchors or len(anchors) != len(self.entries) or self.missing:
            return False
        if any(children.get(attr) is not module for children, attr, module in self.places):
            return False
        return all(anchors.get(n) is p for n, p in self.entries)


def _places(model: nn.Module, targets: list[Target]) -> tuple[tuple[dict, str, nn.Module], ...]:
    """Where each target's module hangs in the model: its parent's child dict and name."""
    wanted = {id(t.module) for t in targets}
    out = []
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None and id(child) in wanted:
                out.append((parent._modules, attr, child))
    return tuple(out)


_BOUND: weakref.WeakKeyDictionary[nn.Module, _Bound] = weakref.WeakKeyDictionary()


@torch.compiler.disable
def _as_anchors(anchors):
    return as_anchors(anchors)


@torch.compiler.disable
def _bind(model: nn.Module, anchors: Mapping[str, Projection]) -> _Bound:
    """Targets of ``model`` for ``anchors``, found and checked once, found again when the
    anchors object or an entry changes, or the model's modules do (PEFT wrapping the model
    later, an adapter added, a module replaced). Tensors are looked up at every call."""
    bound = _BOUND.get(model)
    if bound is not None and bound.valid(anchors):
        return bound
    targets, missing = bind_targets(model, anchors, strict=False, start=False)
    bound = _Bound(anchors, tuple(anchors.items()), _places(model, targets), targets, missing)
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
    r"""One-shot :math:`\lambda \sum \lVert R\,\Delta W\rVert_F^2`, stateless (see :class:`AnchorPenalty`).

    Being stateless, it cannot know where ΔW started: a fully tuned weight needs its
    ``reference`` (except a PEFT ``modules_to_save`` copy, measured from its frozen
    original) and an adapter initialised from the base weight (PiSSA, OLoRA, LoftQ, CorDA,
    LoRA-GA) its ``origins``, else :class:`AnchorError`. Build an :class:`AnchorPenalty`
    once to have them recorded.

    Args:
        model: the model being tuned.
        anchors: ``{HF weight name: Projection}``.
        anchor_lambda: λ (default: 1.0).
        reference: ``{name: W_ref}`` for fully tuned weights (default: None).
        origins: ``{name: {adapter: (B₀, A₀)}}``, shaped like the parameters (default:
            None; ``{t.name: t.origin for t in opt.targets}`` is what an optimizer holds).
        strict: raise if an anchor matches no module (default: True).

    Example::

        >>> loss = task_loss + anchor_penalty(peft_model, anchors, anchor_lambda=1.0)
    """
    lam = lambda_value(anchor_lambda)
    anchors = _as_anchors(anchors)
    bound = _bind(model, anchors)
    if bound.missing and strict:
        missing = bound.missing
        raise AnchorError(f"{len(missing)} anchor(s) match no module of the model (first: {missing[:5]})")
    if not bound.targets:
        raise AnchorError(f"no anchor matches a module of the model (anchors: {list(anchors)[:5]})")
    references = match_references(reference, bound.targets)
    for t in bound.targets:
        # Replaced at every call: the cached target must not keep an earlier call's start.
        t.use_start(references, origins or {}, stateless=True)
    total = total_penalty(bound.targets, anchors)
    if total is None:
        return torch.zeros((), dtype=torch.float32)
    return lam * total
