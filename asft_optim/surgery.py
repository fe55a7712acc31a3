"""Online safety-gradient surgery (SafeGrad-like; issue 31, item 3).

Symbols, over the tensors the optimizer trains (for LoRA: the factors A and B, not ΔW):

* ``g``: the task gradient, what ``.grad`` holds when ``step()`` starts;
* ``s``: the gradient of a *safety loss* at the current weights (e.g. the NLL of the aligned
  model's own refusals to harmful prompts), from a closure the user hands over, refreshed
  every ``every`` steps and reused in between;
* ``μ``: ``safety_weight``.

.. math::
    c = \\begin{cases} \\min(0, \\langle g, s\\rangle) / \\lVert s\\rVert^2 & \\text{conflict} \\\\
                       \\langle g, s\\rangle / \\lVert s\\rVert^2 & \\text{always} \\end{cases},
    \\qquad g \\leftarrow g - c\\,s + \\mu\\,s .

"conflict" is SafeGrad's rule (arXiv 2508.07172): a descent step along ``-g`` raises the
safety loss to first order exactly when ``⟨g, s⟩ < 0``; then the component along ``s`` is
removed, so the step leaves the safety loss unchanged to first order, and nothing is
done otherwise. ``μ > 0`` also descends the safety loss (the multi-objective form). The
inner products run over all trained tensors at once (``"global"``, SafeGrad's) or per
tensor (``"tensor"``). A tensor with no ``.grad`` at this step takes no part: the inner
optimizer will not move it, so its part of ``s`` cannot conflict.

What it guarantees: ``⟨g', s⟩ = 0`` (``always``) or ``≥ 0`` (``conflict``) for the gradient
the inner optimizer receives (with μ = 0). It is a rule on the *gradient*: Adam's
per-coordinate scaling turns ``g'`` into an update that may still have a component along
``-s``; no subspace is kept exactly (use ``subspaces=`` for that, :mod:`.safety_subspace`).

Cost: one forward and backward pass of the safety batch every ``every`` steps (with a safety
batch as large as the task's, ``1/every`` of a training step), plus O(number of trained
parameters) per step for two inner products and one ``axpy``, without a host sync.
The stored ``s`` is one extra copy of the trained tensors (LoRA: a few MB).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .projection import AnchorError

__all__ = ["GradientSurgery", "surgery_coefficients", "surgery_project_"]

_MODES = ("conflict", "always")
_GRANULARITIES = ("global", "tensor")


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """⟨a, b⟩ accumulated in at least float32 (bf16 weights would round every product)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    return torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype))


def surgery_coefficients(grads: Sequence[Tensor], safety: Sequence[Tensor], mode: str,
                         granularity: str) -> list[Tensor]:
    """The coefficient ``c`` of ``g ← g − c·s`` for each tensor (0-d tensors, no host sync).

    ``"global"`` gives every tensor the same ``c`` from the summed inner products;
    ``"tensor"`` one ``c`` per tensor. A zero ``s`` gives ``c = 0``.
    """
    dots = [_dot(g, s) for g, s in zip(grads, safety, strict=True)]
    norms = [_dot(s, s) for s in safety]
    if granularity == "global":
        dots, norms = [torch.stack(dots).sum()] * len(dots), [torch.stack(norms).sum()] * len(norms)
    out = []
    for d, n in zip(dots, norms, strict=True):
        if mode == "conflict":
            d = torch.clamp(d, max=0.0)
        out.append(torch.where(n > 0, d / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(d)))
    return out


def surgery_project_(grads: Sequence[Tensor], safety: Sequence[Tensor], mode: str, granularity: str,
                     safety_weight: float = 0.0) -> list[Tensor]:
    """In place: ``g ← g − c·s + μ·s`` for every pair; returns the coefficients ``c``."""
    coefs = surgery_coefficients(grads, safety, mode, granularity)
    for g, s, c in zip(grads, safety, coefs, strict=True):
        dtype = torch.promote_types(g.dtype, torch.float32)
        if g.dtype == dtype:
            g.sub_(s.to(dtype) * (c.to(dtype) - safety_weight))
        else:  # bf16/fp16: c and the axpy in float32, one rounding (c in bf16 would leave ~0.3 % of ⟨g, s⟩)
            g.copy_(g.to(dtype) - s.to(dtype) * (c.to(dtype) - safety_weight))
    return coefs


class GradientSurgery:
    r"""Projects the task gradient off a safety gradient inside ``step()`` (SafeGrad-like).

    .. math::
        g \leftarrow g - \frac{\min(0, \langle g, s\rangle)}{\lVert s\rVert^2}\, s + \mu s,
        \qquad s = \nabla_\theta \mathcal{L}_\text{safety}(\theta_t) \text{ every } k \text{ steps}

    The safety gradient comes from ``safety_closure``, an explicit hook: the optimizer calls
    it (and nothing else runs a forward pass) at its first step, every ``every`` steps
    after, and at any step where a trained tensor has no ``s`` yet (``add_param_group``, a
    tensor unfrozen since), under ``torch.enable_grad()``, and differentiates the loss it returns with
    ``torch.autograd.grad`` with respect to the trained tensors, so ``.grad`` and the
    task's graph are left alone. The closure picks its own batch (e.g. cycles an iterator
    over refusal examples) and must call the model the task uses, unwrapped from DDP
    (``model.module``: DDP's hooks do not support ``autograd.grad``); under DDP the
    safety gradient is averaged over the ranks, so all of them apply the same surgery.
    See :mod:`asft_optim.surgery` for the rule, its guarantee and its cost.

    One ``GradientSurgery`` per optimizer (a second one refuses it). Gradient checkpointing
    must be non-reentrant (``use_reentrant=False``): a reentrant one is refused. A copy of
    the optimizer (``copy.deepcopy``) keeps the closure, which still calls the original
    model: set ``copy.surgery.safety_closure``. ``pickle`` needs a picklable closure (a
    module-level function); ``state_dict()`` is the way to save a run.

    The last safety gradient and the step count are optimizer state (saved in
    ``state_dict()``, so a resumed run equals an uninterrupted one); the settings are
    checked on load.

    Args:
        safety_closure: ``() -> Tensor``, a scalar safety loss with its graph.
        every: refresh the safety gradient every this many steps (default: 1).
        mode: ``"conflict"`` (project only when the task gradient raises the safety loss,
            SafeGrad) or ``"always"`` (default: ``"conflict"``).
        granularity: ``"global"`` (one inner product over all trained tensors) or
            ``"tensor"`` (per tensor) (default: ``"global"``).
        safety_weight: μ, also descend the safety loss with weight μ (default: 0.0).

    Example::

        >>> refusals = itertools.cycle(refusal_batches)      # e.g. from greedy_refusals()
        >>> def safety_loss():
        ...     return model(**next(refusals)).loss
        >>> opt = AnchoredAdamW(model, anchors, 0.0, lr=1e-4, surgery=GradientSurgery(safety_loss, every=4))
    """

    def __init__(self, safety_closure: Callable[[], Tensor], *, every: int = 1, mode: str = "conflict",
                 granularity: str = "global", safety_weight: float = 0.0) -> None:
        if not callable(safety_closure):
            raise ValueError(f"safety_closure must be callable, got {type(safety_closure).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if granularity not in _GRANULARITIES:
            raise ValueError(f"granularity must be one of {_GRANULARITIES}, got {granularity!r}")
        if isinstance(safety_weight, bool) or not isinstance(safety_weight, (int, float)) \
                or not math.isfinite(safety_weight) or safety_weight < 0:
            raise ValueError(f"safety_weight must be a finite number >= 0, got {safety_weight!r}")
        self.safety_closure = safety_closure
        self.every, self.mode, self.granularity = every, mode, granularity
        self.safety_weight = float(safety_weight)
        self.steps = 0  # step() calls so far (a skipped AMP step does not call step())
        # param -> its part of s. Keyed by the tensor (hashed by identity, as torch.optim's
        # state), not id(): copy.deepcopy/pickle of the optimizer remap the keys to the copies.
        self.safety: dict[Tensor, Tensor] = {}
        self.bound = False  # taken by an optimizer (one each: the state is that run's)
        self.calls = 0  # closure calls (diagnostics)
        self._last: list[Tensor] = []

    def settings(self) -> str:
        """The settings a saved state must match (stored in its param groups)."""
        return f"mode={self.mode},granularity={self.granularity},every={self.every},weight={self.safety_weight!r}"

    def due(self, params: Sequence[Tensor]) -> bool:
        """Whether ``step()`` refreshes ``s`` now: every ``every`` steps, and whenever a trained
        tensor has none (joined by ``add_param_group`` or unfrozen since the last refresh):
        the inner products must run over all of them, with an ``s`` of the current weights."""
        return self.steps % self.every == 0 or any(p not in self.safety for p in params)

    @torch.compiler.disable  # a forward and autograd.grad of the user's: eager, under torch.compile(opt.step) too
    def refresh(self, params: Sequence[Tensor]) -> None:
        """Call the closure and keep ``s`` (zeros for tensors the safety loss does not reach)."""
        before = _grad_marks(params)
        with torch.enable_grad():
            loss = self.safety_closure()
        if _grad_marks(params) != before:
            raise AnchorError("safety_closure changed the trained tensors' .grad (it called backward() or "
                              "zero_grad()?): it must only return the safety loss; the optimizer "
                              "differentiates it apart, and the task gradient in .grad is now mixed")
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"safety_closure must return a scalar tensor, got {_describe(loss)}")
        if not loss.requires_grad:
            raise AnchorError("the safety loss has no graph (computed under torch.no_grad() or detached?): "
                              "the closure must return a loss the trained tensors can be differentiated through")
        grads = _safety_grads(loss, params)
        safety = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)]
        _average_over_ranks(safety)
        self.safety = dict(zip(params, safety, strict=True))
        self.calls += 1

    @torch.no_grad()
    def project_(self, params: Sequence[Tensor]) -> None:
        """Apply the rule to the ``.grad`` of ``params`` (those with one)."""
        live = [p for p in params if p.grad is not None and p in self.safety]
        if not live:
            return
        self._last = surgery_project_([p.grad for p in live], [self.safety[p] for p in live],
                                      self.mode, self.granularity, self.safety_weight)

    def stats(self) -> dict[str, float]:
        """``surgery/coefficient``: the last step's ``c`` (largest magnitude over tensors;
        0 when nothing was removed), ``surgery/calls``: closure calls so far."""
        if not self._last:
            return {"surgery/calls": float(self.calls)}
        c = max(self._last, key=lambda t: float(t.abs()))
        return {"surgery/coefficient": float(c), "surgery/calls": float(self.calls)}


_REENTRANT = "reentrant gradient checkpointing"
_REENTRANT_FIX = ("autograd.grad cannot see through the recomputation of " + _REENTRANT + " (the layers' "
                  "tensors are not in the graph): enable it with gradient_checkpointing_kwargs="
                  "{'use_reentrant': False}, or run safety_closure's forward without checkpointing")


def _safety_grads(loss: Tensor, params: Sequence[Tensor]) -> tuple[Tensor | None, ...]:
    """``∂loss/∂params`` (None where unused); raises when none is reached, or when part of the
    graph is hidden by reentrant checkpointing (its tensors would silently get ``s = 0``)."""
    try:
        with torch.enable_grad():  # step() runs under no_grad: the reshape must keep the graph
            grads = torch.autograd.grad(loss.reshape(()), list(params), allow_unused=True)
    except RuntimeError as e:
        if "Checkpointing is not compatible" in str(e):
            raise AnchorError(f"the safety loss runs through {_REENTRANT}: {_REENTRANT_FIX}") from e
        raise
    if any(g is None for g in grads) and _has_reentrant_checkpoint(loss):
        raise AnchorError(f"the safety loss runs through {_REENTRANT}, so some trained tensors would get "
                          f"a zero safety gradient: {_REENTRANT_FIX}")
    if all(g is None for g in grads):
        raise AnchorError("the safety loss does not depend on any trained tensor: call the model this "
                          "optimizer trains in safety_closure (a copy.deepcopy of the optimizer keeps the "
                          "original's closure: set copy.surgery.safety_closure to one on the copied model)")
    return grads


def _has_reentrant_checkpoint(loss: Tensor) -> bool:
    """Whether the graph holds a reentrant checkpoint (only walked when a tensor got no gradient)."""
    seen, todo = set(), [loss.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "CheckpointFunctionBackward":
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False


def _grad_marks(params: Sequence[Tensor]) -> list[tuple[int, int] | None]:
    """Which ``.grad`` tensor each parameter holds and its version: any write shows."""
    return [None if p.grad is None else (id(p.grad), p.grad._version) for p in params]


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _average_over_ranks(tensors: list[Tensor]) -> None:
    """Under DDP every rank computes ``s`` on its own safety batch: average them, so every
    rank projects the (identical, already averaged) task gradient the same way."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for t in tensors:
        dist.all_reduce(t)
        t.div_(world)
