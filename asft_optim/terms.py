"""The penalty terms of one anchored weight, per kind of update (see :mod:`~asft_optim.targets`).

* ``lora``: one adapter: ``lora_terms`` on (B, A) with its scaling; several active adapters
  (and the constant origin blocks of PiSSA/OLoRA/... adapters) jointly, folded into one
  pair ``[s₁B₁, …, −s₀B₀] @ [A₁; …; A₀]`` with s = 1, gradients cut back per adapter;
* ``full``: ``dense_terms`` on ΔW = W - W_ref;
* ``autograd``: DoRA and the ``get_delta_weight`` tuners: the effective ΔW is built and
  differentiated with autograd.

The public functions here are the interface both penalty routes use: the optimizer
(:func:`target_terms`, closed-form gradients added to ``.grad``) and
:func:`~asft_optim.anchor_penalty` (:func:`operator`, :func:`reference_on`,
:func:`origin_blocks`, :func:`effective_delta`, inside its autograd function). They read
the target's tensors now (accelerate/FSDP2/PEFT swap them) and keep only the moved
anchor, its Gram matrix and a moved reference in ``target._cache``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layout import math_dtype, to_out_in
from .projection import AnchorError, PenaltyTerms, Projection, dense_terms, lora_terms
from .targets import Target
from .tuners import is_quantized

__all__ = ["effective_delta", "operator", "origin_blocks", "reference_on", "target_terms"]


def target_terms(
    target: Target, proj: Projection, reference: Tensor | None, factors: list | None = None
) -> tuple[PenaltyTerms, list[Tensor]] | None:
    """Raw penalty terms of ``target`` and the tensors their gradients belong to (None: no update).

    ``reference``: W_ref of a ``full`` target. ``factors``: this step's
    :meth:`Target.lora_factors`, if the caller already looked them up.
    """
    if target.kind == "full":
        w = target.base_weight()
        delta = to_out_in(_full_delta(target, w.detach(), reference), target.layout)
        op, gram = operator(target, proj, delta)
        t = dense_terms(op, delta, gram)
        g = t.grads[0]
        g = g.t() if target.layout == "in_out" else g
        return PenaltyTerms(t.penalty, t.delta_sq, (_like(g.reshape(w.shape).contiguous(), w),)), [w]
    if target.kind == "lora":
        factors = target.lora_factors() if factors is None else factors
        if not factors:
            return None
        dtype = math_dtype(factors[0][3])
        op, gram = operator(target, proj, factors[0][3])
        origins = origin_blocks(target, target.adapters()) if target.origin_adapters else []
        if len(factors) == 1 and not origins:
            # One adapter (the common case): no concatenation, s applied inside lora_terms.
            b2, a2, s, bp, ap = factors[0]
            b, a = _full(b2.detach()), _full(a2.detach())
            if b.dtype != dtype:  # bf16/fp16 adapters: the math runs in float32
                b, a = b.to(dtype), a.to(dtype)
            t = lora_terms(op, b, a, s, gram)
            gb, ga = t.grads
            return t.with_grads(
                (_like(gb.reshape(bp.shape), bp), _like(ga.reshape(ap.shape), ap))
            ), [bp, ap]
        bs = [_full(f[0].detach()).to(dtype) * f[2] for f in factors] + [b.to(dtype) for b, _ in origins]
        as_ = [_full(f[1].detach()).to(dtype) for f in factors] + [a.to(dtype) for _, a in origins]
        # Joint update of all active adapters (and the constant origin blocks, whose
        # gradients are dropped), folded into one (B, A) pair with s = 1.
        t = lora_terms(op, torch.cat(bs, 1), torch.cat(as_, 0), 1.0, gram)
        gb, ga = t.grads
        grads, params, col = [], [], 0
        for (b2, _a2, s, bp, ap) in factors:
            r = b2.shape[1]
            grads += [
                _like((gb[:, col:col + r] * s).reshape(bp.shape), bp),
                _like(ga[col:col + r].reshape(ap.shape), ap),
            ]
            params += [bp, ap]
            col += r
        return t.with_grads(tuple(grads)), params
    return _autograd_terms(target, proj)


def origin_blocks(target: Target, adapters: list[str]) -> list[tuple[Tensor, Tensor]]:
    """``(-s₀B₀, A₀)`` as 2-D (out, r)/(r, in) for those of ``adapters`` with an origin.

    ``s₀`` is the adapter's configured scaling (α/r, or α/√r for rsLoRA): the one PEFT
    used to rewrite the base weight, whatever ``set_scale`` did since.
    """
    m, out = target.module, []
    for a in adapters:
        if a not in target.origin_adapters:
            continue
        if a not in target.origin:
            raise AnchorError(
                f"{target.name}: adapter {a!r} was initialised by PEFT from the base weight "
                "(PiSSA/OLoRA/LoftQ/CorDA/LoRA-GA), so ΔW is measured from its value at "
                "construction, which was not recorded: build the optimizer before training, "
                "load its saved state, or pass origins= to anchor_penalty"
            )
        b0, a0 = target.origin[a]
        r = m.r[a]
        s0 = m.lora_alpha[a] / (r ** 0.5 if m.use_rslora.get(a, False) else r)
        out.append((-s0 * _full(b0).flatten(1), _full(a0).flatten(1)))
    return out


def effective_delta(target: Target) -> Tensor:
    """ΔW of the adapter(s) in (out, in) layout, differentiable (autograd kind)."""
    m = target.module
    delta = None
    for a in target.adapters():
        if getattr(m, "use_dora", {}).get(a, False):
            d = _dora_delta(m, a, target.layout)
        elif hasattr(m, "get_delta_weight"):
            # Eval-mode ΔW: LoHa/LoKr drop ranks at random in get_delta_weight while training;
            # the penalty is on the weights themselves.
            training, m.training = m.training, False
            try:
                d = m.get_delta_weight(a)
            finally:
                m.training = training
            w = target.base_weight()
            if not is_quantized(w) and tuple(d.shape) != tuple(w.shape):
                raise AnchorError(
                    f"{target.name}: {target.tuner} get_delta_weight gave shape {tuple(d.shape)}, the base "
                    f"weight is {tuple(w.shape)}: this layer type is not supported for {target.tuner}"
                )
            d = to_out_in(d, target.layout)
        else:
            raise AnchorError(f"{target.name}: adapter {type(m).__name__} exposes no get_delta_weight")
        delta = d if delta is None else delta + d
    return delta


def _autograd_terms(target: Target, proj: Projection):
    params = target.params()
    if not params:
        return None
    if any(_is_dtensor(p) for p in params) or _is_dtensor(target.base_weight()):
        raise AnchorError(
            f"{target.name}: DoRA and other non-LoRA adapters are not supported on sharded (FSDP2 "
            "DTensor) parameters; use plain LoRA or full fine-tuning, or do not shard this module"
        )
    with torch.enable_grad():
        delta = effective_delta(target)
        delta = delta.to(math_dtype(delta))
        r = operator(target, proj, delta)[0].residual(delta)
        penalty = r.pow(2).sum()
        grads = torch.autograd.grad(penalty, params, allow_unused=True)
    grads = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True))
    return PenaltyTerms(penalty.detach(), delta.detach().pow(2).sum(), grads), params


def operator(target: Target, proj: Projection, like: Tensor) -> tuple[Projection, Tensor | None]:
    """The anchor on ``like``'s device and math dtype, and its Gram matrix ``FᵀF``.

    Both are computed once and reused across steps: anchors move lazily, once, to the
    device and math dtype of what they anchor, and G (:meth:`Projection.compact_gram`:
    m×m for low rank, the vector ``diag(FᵀF)`` for orthogonal columns) follows them. The
    cache (``target._cache["proj"]``) is rebuilt when the anchor object, the device, the
    dtype or the factor's contents (its in-place version counter) change. It holds no
    parameter: tensors are looked up at every step.
    """
    key = (like.device, math_dtype(like), proj.factor._version)
    cached = target._cache.get("proj")
    if cached is None or cached[0] != key or cached[1] is not proj:
        moved = proj.to(device=key[0], dtype=key[1])
        gram = moved.compact_gram()
        cached = target._cache["proj"] = (key, proj, moved, gram)
    return cached[2], cached[3]


def reference_on(target: Target, reference: Tensor, like: Tensor) -> Tensor:
    """``reference`` on ``like``'s device, sharded like it when ``like`` is a DTensor.

    Moved (a CPU ``reference=`` on a GPU model) or sliced to the local shard (no
    communication) once and cached, instead of a copy at every step; rebuilt when the
    reference object, its contents (version counter) or the weight's device or
    sharding change. Already in place: ``reference`` itself, nothing cached.
    """
    sharded = _is_dtensor(like)
    where = (like.device_mesh, tuple(like.placements)) if sharded else None
    if sharded == _is_dtensor(reference) and reference.device == like.device and (
        not sharded or (reference.device_mesh, tuple(reference.placements)) == where
    ):
        return reference
    key = (like.device, where, reference._version)
    cached = target._cache.get("reference")
    if cached is None or cached[0] is not reference or cached[1] != key:
        moved = _full(reference).to(like.device)
        if sharded:
            from torch.distributed.tensor import distribute_tensor

            moved = distribute_tensor(moved, like.device_mesh, like.placements, src_data_rank=None)
        cached = target._cache["reference"] = (reference, key, moved)
    return cached[2]


def _full_delta(target: Target, w: Tensor, reference: Tensor) -> Tensor:
    """``W - W_ref`` as a full tensor in the math dtype (``w`` detached).

    FSDP2 (``w`` a DTensor): the shards are subtracted locally and the *difference* is
    gathered, one all-gather per weight instead of one for W and one for W_ref.
    """
    dtype = math_dtype(w)
    return _full(w.to(dtype) - reference_on(target, reference, w).to(dtype))


# -- FSDP2: sharded (DTensor) parameters ----------------------------------------------
# The math runs on full tensors and each gradient is cut back to the parameter's own
# sharding. ``full_tensor()`` is a collective: every rank calls it for the same tensors in
# the same order (targets and adapters are visited in module order on every rank);
# ``distribute_tensor(..., src_data_rank=None)`` only slices locally (no communication).


def _is_dtensor(t: object) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "full_tensor")


def _full(t: Tensor | None) -> Tensor | None:
    """The global value of a DTensor (a collective), or ``t`` itself."""
    return t.full_tensor() if _is_dtensor(t) else t


def _like(g: Tensor, param: Tensor) -> Tensor:
    """``g`` (global shape) distributed like ``param`` when it is a DTensor."""
    if not _is_dtensor(param):
        return g
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(g, param.device_mesh, param.placements, src_data_rank=None)


def _dora_delta(m: nn.Module, adapter: str, layout: str) -> Tensor:
    """Effective DoRA update ``mag ⊙ (W + sBA)/‖W + sBA‖_row - W`` in (out, in) layout.

    Linear, GPT-2 ``Conv1D`` (``fan_in_fan_out``) and conv layers (kernels flattened).
    PEFT detaches the row norm in its forward pass (DoRA §4.3) to save memory; the
    penalty is a function of the effective ΔW, so here the norm is differentiated too.
    """
    base = m.get_base_layer()
    if isinstance(base, nn.Embedding) or not hasattr(m, "lora_A") or adapter not in m.lora_A:
        raise AnchorError(f"DoRA is supported on Linear, Conv1D and conv layers, got {type(base).__name__}")
    w = to_out_in(base.weight.detach(), layout)
    w = w.to(math_dtype(w))
    lora = m.lora_B[adapter].weight.flatten(1) @ m.lora_A[adapter].weight.flatten(1)
    combined = w + m.scaling[adapter] * lora.to(w.dtype)
    mag = m.lora_magnitude_vector[adapter].weight.reshape(-1).to(w.dtype)
    norm = torch.linalg.vector_norm(combined, dim=1)
    return (mag / norm).unsqueeze(1) * combined - w
