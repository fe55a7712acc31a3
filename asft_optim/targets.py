"""One anchored weight and how its update ΔW is parameterised: one class per kind of update.

Both penalty routes, the optimizer's ``step()`` and the loss-level
:class:`~asft_optim.AnchorPenalty`, ask a target for its :meth:`Target.terms` (closed-form
gradients) or its :meth:`Target.penalty` (differentiable, built from the same terms), so
they agree by construction. What differs by kind lives in the subclass:

* :class:`FullTarget`: the weight itself is trained (also PEFT ``modules_to_save`` copies);
  ΔW = W - W_ref, and the target owns ``W_ref``;
* :class:`LoraTarget`: PEFT LoRA (Linear, GPT-2 Conv1D, Embedding, Conv); closed-form
  gradients, never forming ΔW. Several active adapters on one module are penalised jointly
  (ΔW = Σ sᵢBᵢAᵢ = ``[s₁B₁, s₂B₂] @ [A₁; A₂]``). Adapters whose init rewrote the base weight
  (PiSSA, OLoRA, LoftQ, ...) are measured from their value at construction, the *origin*,
  which the target owns: ΔW = s·B·A - s₀·B₀A₀ = ``[sB, -s₀B₀] @ [A; A₀]``;
* :class:`DeltaWeightTarget`: DoRA and the PEFT tuners of
  :data:`~asft_optim.tuners.DELTA_WEIGHT_TUNERS` (AdaLoRA, LoHa, LoKr, VeRA, ...): the
  effective ΔW is built and differentiated with autograd (the one kind whose gradients
  are not in closed form; its loss-level penalty is the differentiable ΔW itself, so that
  a tuner's own gradient hooks fire once).

A target keeps a reference to the *module*, never to its tensors: accelerate, FSDP2 and
PEFT swap parameters after the optimizer is built, so tensors are looked up at every step.
It caches only the anchor moved to the weight's device and math dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .layout import math_dtype, to_out_in
from .projection import AnchorError, PenaltyTerms, Projection
from .sharding import gather, is_dtensor, scale, shard_like
from .tuners import is_quantized

__all__ = [
    "DeltaWeightTarget",
    "FullTarget",
    "LoraFactor",
    "LoraTarget",
    "Target",
    "TargetTerms",
    "is_modules_to_save",
    "is_tuner",
]

#: Keys of a target's entries in the optimizer's per-parameter state (see :mod:`asft_optim.state`).
REF_KEY = "anchor_ref"
ORIGIN_KEY = "anchor_origin"


def is_tuner(module: nn.Module) -> bool:
    return hasattr(module, "get_base_layer") and hasattr(module, "active_adapters")


def is_modules_to_save(module: nn.Module) -> bool:
    """A PEFT ``ModulesToSaveWrapper``: a trainable copy per adapter next to the frozen original."""
    return "modules_to_save" in getattr(module, "_modules", {}) and "original_module" in module._modules


@dataclass(frozen=True)
class LoraFactor:
    """One active LoRA adapter: ``b``/``a`` are 2-D (out, r)/(r, in) views of its parameters."""

    adapter: str
    b: Tensor
    a: Tensor
    scaling: float
    b_param: Tensor
    a_param: Tensor


@dataclass(frozen=True)
class TargetTerms:
    """A target's raw penalty terms; ``values.grads[i]`` belongs to ``params[i]``."""

    values: PenaltyTerms
    params: tuple[Tensor, ...]


@dataclass(frozen=True)
class _MovedAnchor:
    """The anchor on one device and math dtype, with its cached Gram matrix (see
    :meth:`Projection.prepare`); rebuilt when the anchor object, the device, the dtype or
    the factor's contents (its in-place version counter) change."""

    source: Projection
    key: tuple
    operator: Projection


class Target:
    """One anchored weight. Subclasses say how ΔW is built from the module's tensors."""

    #: ``"full"``, ``"lora"`` or ``"autograd"``: shown to users, never dispatched on.
    kind: ClassVar[str]

    def __init__(self, name: str, module: nn.Module, layout: str = "out_in", tuner: str = "") -> None:
        self.name = name
        self.module = module
        self.layout = layout
        #: ``peft.tuners.<tuner>`` the module comes from (``"lora"``, ``"vera"``, ...); "" if none.
        self.tuner = tuner
        self._moved: _MovedAnchor | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, tuner={self.tuner!r})"

    # -- tensors, looked up now -------------------------------------------------------
    def base_weight(self) -> Tensor:
        m = self.module.get_base_layer() if is_tuner(self.module) else self.module
        return m.weight

    def out_in_shape(self) -> tuple[int, ...]:
        """``(out, in)`` of ΔW (a quantized base weight is packed: ask the layer)."""
        w = self.base_weight()
        if is_quantized(w) and hasattr(self.module, "in_features") and hasattr(self.module, "out_features"):
            return int(self.module.out_features), int(self.module.in_features)
        return tuple(to_out_in(w, self.layout).shape) if w.dim() >= 2 else tuple(w.shape)

    def out_features(self) -> int:
        shape = self.out_in_shape()
        return shape[0] if len(shape) == 2 else -1

    def params(self) -> list[Tensor]:
        """The tensors whose gradient the penalty touches, now."""
        raise NotImplementedError

    def all_params(self) -> list[Tensor]:
        """Every tensor this target can train, active or not (adapters of all names)."""
        return [p for n, p in self.module.named_parameters() if "base_layer" not in n]

    def paused(self) -> bool:
        """True while the update is switched off (PEFT ``disable_adapters``): ΔW = 0 now."""
        return bool(getattr(self.module, "disable_adapters", False))

    # -- the penalty --------------------------------------------------------------------
    def terms(self, anchor: Projection) -> TargetTerms | None:
        """``‖R ΔW‖²``, ``‖ΔW‖²`` and the closed-form gradients (None: no active update)."""
        raise NotImplementedError

    def penalty(self, anchor: Projection) -> Tensor | None:
        """Differentiable ``‖R ΔW‖²``: the value of :meth:`terms`, whose backward returns
        its closed-form gradients (the two passes over F the optimizer makes, instead of
        autograd's four). Not twice differentiable."""
        params = self.params()
        if not params:
            return None
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            t = self.terms(anchor)
            return None if t is None else t.values.penalty
        return _ClosedForm.apply(lambda: self.terms(anchor), *params)

    def operator(self, anchor: Projection, like: Tensor) -> Projection:
        """``anchor`` on ``like``'s device and math dtype, prepared once (see :class:`_MovedAnchor`)."""
        key = (like.device, math_dtype(like), anchor.version)
        moved = self._moved
        if moved is None or moved.source is not anchor or moved.key != key:
            moved = self._moved = _MovedAnchor(anchor, key, anchor.prepare(key[0], key[1]))
        return moved.operator

    def project_update(self, subspace: Any) -> None:
        """After the inner step: take ΔW out of a safety subspace, ``QᵀΔW = 0`` exactly
        (:class:`~asft_optim.safety_subspace.SafetySubspace`)."""
        raise AnchorError(
            f"{self.name}: safety subspaces keep ΔW out of span(Q) exactly for LoRA and full weights "
            f"only, not for {self.tuner or type(self).__name__} (DoRA's magnitude rescales W's rows)"
        )

    def check_subspace(self, subspace: Any) -> None:
        """Raise unless ΔW starts outside ``span(Q)`` (the projection keeps it there)."""

    # -- state that must survive a resume (see asft_optim.state) ------------------------
    def saved_state(self) -> list[tuple[Tensor, dict[str, Tensor]]]:
        """``(param, {key: tensor})`` pairs to keep in the optimizer's per-parameter state."""
        return []

    def restore(self, saved: dict[int, dict[str, Tensor]]) -> bool:
        """Take this target's entries out of ``saved`` (keyed by ``id(param)``); False when
        it needs state that ``saved`` does not hold (then nothing is changed)."""
        return True

    def start(self) -> None:
        """Take the model as it is now as the start of ΔW (a new run, or a reset on purpose)."""

    def assumed_start(self) -> list[str]:
        """What :meth:`start` took from the model without a way to check it (the factors of
        adapters measured from an origin): the caller says so, since a trained adapter
        reloaded from disk looks the same as a fresh one."""
        return []

    def use_start(self, references: Mapping[str, Tensor], origins: Mapping[str, Mapping], *,
                  stateless: bool) -> None:
        """Take the start of ΔW the user gave (``reference=``/``origins=`` by weight name).

        ``stateless`` (:func:`~asft_optim.anchor_penalty`): what is not given is unknown
        (the default W_ref of a ``modules_to_save`` copy aside), and the given tensors are
        used as they are; otherwise they are copied and the rest stays as recorded.
        """


class FullTarget(Target):
    """A weight trained directly: ΔW = W - W_ref (``W_ref`` owned here)."""

    kind = "full"

    def __init__(self, name: str, module: nn.Module, layout: str = "out_in", tuner: str = "") -> None:
        super().__init__(name, module, layout, tuner)
        #: ``W_ref`` (None until :meth:`start` or :meth:`set_reference`).
        self.reference: Tensor | None = None
        self._moved_ref: tuple[Tensor, tuple, Tensor] | None = None

    def base_weight(self) -> Tensor:
        if is_modules_to_save(self.module):
            m = self.module  # the trained copy of the active adapter (the original stays frozen)
            return m.modules_to_save[m.active_adapters[0]].weight
        return super().base_weight()

    def default_reference(self) -> Tensor | None:
        """The frozen original of a ``modules_to_save`` copy; None for a plain weight."""
        return self.module.original_module.weight if is_modules_to_save(self.module) else None

    def params(self) -> list[Tensor]:
        return [self.base_weight()]

    def all_params(self) -> list[Tensor]:
        return [self.base_weight()]

    def paused(self) -> bool:
        return False

    def set_reference(self, reference: Tensor | None, *, copy: bool = True) -> None:
        """Use ``reference`` as W_ref (None: the default, else the weight now)."""
        w = self.base_weight()
        ref = self.default_reference() if reference is None else reference
        if ref is None:
            ref = w
        if tuple(ref.shape) != tuple(w.shape):
            raise AnchorError(f"{self.name}: reference shape {tuple(ref.shape)} != weight {tuple(w.shape)}")
        # Moved to the weight's device once here, not on every step.
        self.reference = ref.detach().to(w.device).clone() if copy else ref.detach()

    def start(self) -> None:
        self.set_reference(None)

    def use_start(self, references: Mapping[str, Tensor], origins: Mapping[str, Mapping], *,
                  stateless: bool) -> None:
        ref = references.get(self.name)
        if stateless:
            self.reference = (self.default_reference() if ref is None else ref)
            self.reference = None if self.reference is None else self.reference.detach()
        elif ref is not None:
            self.set_reference(ref)

    def terms(self, anchor: Projection) -> TargetTerms | None:
        if self.reference is None:
            raise AnchorError(f"{self.name}: fully tuned weight needs a reference weight")
        w = self.base_weight()
        delta = to_out_in(self._delta(w.detach()), self.layout)
        t = self.operator(anchor, delta).dense_terms(delta)
        g = t.grads[0].t() if self.layout == "in_out" else t.grads[0]
        return TargetTerms(t.with_grads((shard_like(g.reshape(w.shape).contiguous(), w),)), (w,))

    def _delta(self, w: Tensor) -> Tensor:
        """``W - W_ref`` as a whole tensor in the math dtype. FSDP2: the shards are
        subtracted locally and the *difference* gathered (one all-gather per weight)."""
        dtype = math_dtype(w)
        return gather(w.to(dtype) - self._reference_on(w).to(dtype))

    def _reference_on(self, like: Tensor) -> Tensor:
        """W_ref on ``like``'s device, sharded like it when ``like`` is a DTensor: moved or
        sliced once and cached, rebuilt when the reference, its contents or the weight's
        device or sharding change."""
        ref = self.reference
        sharded = is_dtensor(like)
        where = (like.device_mesh, tuple(like.placements)) if sharded else None
        if sharded == is_dtensor(ref) and ref.device == like.device and (
            not sharded or (ref.device_mesh, tuple(ref.placements)) == where
        ):
            return ref
        key = (like.device, where, ref._version)
        cached = self._moved_ref
        if cached is None or cached[0] is not ref or cached[1] != key:
            moved = gather(ref).to(like.device)
            if sharded:
                moved = shard_like(moved, like)
            cached = self._moved_ref = (ref, key, moved)
        return cached[2]

    def project_update(self, subspace: Any) -> None:
        w = self.base_weight()
        if is_dtensor(w):
            raise AnchorError(f"{self.name}: safety subspaces are not supported on sharded (FSDP2) weights")
        sub = self.operator(subspace, w)
        view = to_out_in(w.data, self.layout)  # a view: the projection writes W itself
        ref = to_out_in(self._reference_on(w), self.layout)
        if view.dtype == sub.basis.dtype:
            sub.project_dense_(view, ref)
        else:  # bf16/fp16 weights: the projection in the math dtype, written back once
            view.copy_(sub.project_dense_(view.to(sub.basis.dtype), ref.to(sub.basis.dtype)))

    def saved_state(self) -> list[tuple[Tensor, dict[str, Tensor]]]:
        return [(self.base_weight(), {REF_KEY: self.reference})]

    def restore(self, saved: dict[int, dict[str, Tensor]]) -> bool:
        w = self.base_weight()
        ref = saved.get(id(w), {}).get(REF_KEY)
        if ref is None:
            return False
        if tuple(ref.shape) != tuple(w.shape):
            raise AnchorError(f"{self.name}: saved reference has shape {tuple(ref.shape)}, the weight {tuple(w.shape)}")
        saved.pop(id(w))
        # The saved dtype is kept (torch would cast state to the parameter's dtype).
        self.reference = ref.to(device=w.device)
        return True


class _AdapterTarget(Target):
    """A PEFT tuner layer: the update lives in its active, unmerged adapters."""

    def adapters(self) -> list[str]:
        m = self.module
        if getattr(m, "disable_adapters", False):
            return []
        merged = set(getattr(m, "merged_adapters", ()))
        return [a for a in m.active_adapters if a not in merged and self._holds(a)]

    def _holds(self, adapter: str) -> bool:
        raise NotImplementedError


class LoraTarget(_AdapterTarget):
    """PEFT LoRA: ΔW = Σ sᵢ·Bᵢ·Aᵢ (minus s₀·B₀A₀ for adapters measured from an origin)."""

    kind = "lora"

    def __init__(self, name: str, module: nn.Module, layout: str = "out_in", tuner: str = "lora",
                 origin_adapters: frozenset[str] = frozenset()) -> None:
        super().__init__(name, module, layout, tuner)
        #: Adapters whose ΔW is measured from an origin (see :data:`~asft_optim.tuners.ORIGIN_INITS`).
        self.origin_adapters = origin_adapters
        #: ``{adapter: (B₀, A₀)}``: detached clones shaped like the parameters.
        self.origin: dict[str, tuple[Tensor, Tensor]] = {}
        self._given: set[str] = set()  # adapters whose origin the user gave (origins=)

    @property
    def needs_origin(self) -> bool:
        """True if ΔW of some adapter here is measured from its initial B₀A₀ (PiSSA, OLoRA, ...)."""
        return bool(self.origin_adapters)

    def _holds(self, adapter: str) -> bool:
        return adapter in getattr(self.module, "lora_A", {}) or adapter in getattr(self.module, "lora_embedding_A", {})

    def factor_params(self, adapter: str) -> tuple[Tensor, Tensor]:
        """The ``(B, A)`` parameters of one adapter, as stored."""
        m = self.module
        if adapter in getattr(m, "lora_A", {}):
            return m.lora_B[adapter].weight, m.lora_A[adapter].weight
        return m.lora_embedding_B[adapter], m.lora_embedding_A[adapter]  # (dim, r), (r, vocab)

    def lora_factors(self) -> list[LoraFactor]:
        out = []
        for a in self.adapters():
            bp, ap = self.factor_params(a)
            out.append(LoraFactor(a, bp.flatten(1), ap.flatten(1), float(self.module.scaling[a]), bp, ap))
        return out

    def params(self) -> list[Tensor]:
        return [t for f in self.lora_factors() for t in (f.b_param, f.a_param)]

    def start(self) -> None:
        """Snapshot ``(B₀, A₀)`` of every adapter measured from an origin."""
        for a in self.origin_adapters:
            b, aa = self.factor_params(a)
            self.origin[a] = (b.detach().clone(), aa.detach().clone())
        self._given = set()

    def assumed_start(self) -> list[str]:
        return sorted(set(self.origin) - self._given)

    def _origin_blocks(self, adapters: list[str]) -> list[tuple[Tensor, Tensor]]:
        """``(-s₀B₀, A₀)`` as 2-D blocks for those of ``adapters`` measured from an origin.

        ``s₀`` is the adapter's configured scaling (α/r, or α/√r for rsLoRA): the one PEFT
        used to rewrite the base weight, whatever ``set_scale`` did since.
        """
        m, out = self.module, []
        for a in adapters:
            if a not in self.origin_adapters:
                continue
            if a not in self.origin:
                raise AnchorError(
                    f"{self.name}: adapter {a!r} was initialised by PEFT from the base weight "
                    "(PiSSA/OLoRA/LoftQ/CorDA/LoRA-GA), so ΔW is measured from its value at "
                    "construction, which was not recorded: build the optimizer before training, "
                    "load its saved state, or pass origins="
                )
            b0, a0 = self.origin[a]
            r = m.r[a]
            s0 = m.lora_alpha[a] / (r ** 0.5 if m.use_rslora.get(a, False) else r)
            out.append((-s0 * gather(b0).flatten(1), gather(a0).flatten(1)))
        return out

    def terms(self, anchor: Projection) -> TargetTerms | None:
        factors = self.lora_factors()
        if not factors:
            return None
        if self.base_weight().requires_grad:
            raise AnchorError(
                f"{self.name}: the base weight under its LoRA adapter is trainable too, so ΔW = W - W₀ + s·B·A "
                "and the penalty on s·B·A alone would miss the base weight's drift: freeze the base weight "
                "(PEFT does), or fully fine-tune this weight without the adapter"
            )
        dtype = math_dtype(factors[0].b)
        op = self.operator(anchor, factors[0].b)
        origins = self._origin_blocks([f.adapter for f in factors])
        if len(factors) == 1 and not origins:
            # One adapter (the common case): no concatenation, s applied inside lora_terms.
            f = factors[0]
            b, a = gather(f.b.detach()).to(dtype), gather(f.a.detach()).to(dtype)
            t = op.lora_terms(b, a, f.scaling)
            gb, ga = t.grads
            return TargetTerms(t.with_grads((shard_like(gb.reshape(f.b_param.shape), f.b_param),
                                             shard_like(ga.reshape(f.a_param.shape), f.a_param))),
                               (f.b_param, f.a_param))
        # Joint update of all active adapters (and the constant origin blocks, whose
        # gradients are dropped), folded into one (B, A) pair with s = 1.
        dev = factors[0].b.device
        bs = [gather(f.b.detach()).to(dtype) * f.scaling for f in factors]
        as_ = [gather(f.a.detach()).to(dtype) for f in factors]
        bs += [b0.to(device=dev, dtype=dtype) for b0, _ in origins]
        as_ += [a0.to(device=dev, dtype=dtype) for _, a0 in origins]
        t = op.lora_terms(torch.cat(bs, 1), torch.cat(as_, 0), 1.0)
        gb, ga = t.grads
        grads: list[Tensor] = []
        params: list[Tensor] = []
        col = 0
        for f in factors:
            r = f.b.shape[1]
            grads += [shard_like((gb[:, col:col + r] * f.scaling).reshape(f.b_param.shape), f.b_param),
                      shard_like(ga[col:col + r].reshape(f.a_param.shape), f.a_param)]
            params += [f.b_param, f.a_param]
            col += r
        return TargetTerms(t.with_grads(tuple(grads)), tuple(params))

    def check_subspace(self, subspace: Any) -> None:
        if self.origin_adapters:
            raise AnchorError(
                f"{self.name}: a safety subspace keeps ΔW = s·B·A out of span(Q) by projecting B, which needs "
                "B₀ = 0; a PiSSA/OLoRA/LoftQ-style adapter starts elsewhere: use init_lora_weights=True"
            )
        for f in self.lora_factors():
            sub = self.operator(subspace, f.b)
            inside = float(sub.fraction_inside(gather(f.b.detach()).to(sub.basis.dtype)))
            if inside > 1e-6:
                raise AnchorError(
                    f"{self.name}: adapter {f.adapter!r} already has {inside:.1%} of B inside the safety "
                    "subspace; projecting it would change the model: start from a fresh adapter "
                    "(init_lora_weights=True, B₀ = 0)"
                )

    def project_update(self, subspace: Any) -> None:
        for f in self.lora_factors():
            if is_dtensor(f.b):
                raise AnchorError(f"{self.name}: safety subspaces are not supported on sharded (FSDP2) adapters")
            sub = self.operator(subspace, f.b)
            b = f.b.data  # (out, r) view of the parameter: A is left as it is
            if b.dtype == sub.basis.dtype:
                sub.project_lora_(b)
            else:
                b.copy_(sub.project_lora_(b.to(sub.basis.dtype)))

    def saved_state(self) -> list[tuple[Tensor, dict[str, Tensor]]]:
        out = []
        for adapter in sorted(self.origin_adapters):
            b0, a0 = self.origin[adapter]
            bp, ap = self.factor_params(adapter)
            out += [(bp, {ORIGIN_KEY: b0}), (ap, {ORIGIN_KEY: a0})]
        return out

    def restore(self, saved: dict[int, dict[str, Tensor]]) -> bool:
        found = {}
        for adapter in sorted(self.origin_adapters):
            bp, ap = self.factor_params(adapter)
            vb, va = saved.get(id(bp), {}), saved.get(id(ap), {})
            if ORIGIN_KEY not in vb or ORIGIN_KEY not in va:
                return False
            b0, a0 = vb[ORIGIN_KEY], va[ORIGIN_KEY]
            if b0.shape != bp.shape or a0.shape != ap.shape:
                raise AnchorError(f"{self.name}: saved initial adapter factors of adapter {adapter!r} have other shapes")
            found[adapter] = (b0.to(bp.device), a0.to(ap.device))
        for adapter in found:
            bp, ap = self.factor_params(adapter)
            saved.pop(id(bp)), saved.pop(id(ap))
        self.origin = {**self.origin, **found}  # rebound, not mutated: a trial copy stays apart
        return True

    def use_start(self, references: Mapping[str, Tensor], origins: Mapping[str, Mapping], *,
                  stateless: bool) -> None:
        given = dict(origins.get(self.name, {}))
        unknown = set(given) - set(self.origin_adapters)
        if unknown:
            raise AnchorError(
                f"origins[{self.name!r}] names adapter(s) {sorted(unknown)} that are not measured from an "
                f"origin here (those are {sorted(self.origin_adapters)})"
            )
        for adapter, (b0, a0) in given.items():
            bp, ap = self.factor_params(adapter)
            if tuple(b0.shape) != tuple(bp.shape) or tuple(a0.shape) != tuple(ap.shape):
                raise AnchorError(f"origins[{self.name!r}][{adapter!r}]: shapes differ from the adapter's (B, A)")
            if not stateless:
                given[adapter] = (b0.detach().to(bp.device).clone(), a0.detach().to(ap.device).clone())
        if stateless:
            self.origin = given
        else:
            self.origin.update(given)
            self._given = self._given | set(given)


class DeltaWeightTarget(_AdapterTarget):
    """DoRA and the ``get_delta_weight`` tuners: the effective ΔW, differentiated by autograd."""

    kind = "autograd"

    def _holds(self, adapter: str) -> bool:
        # Active on the model but not injected into this layer: no ΔW here.
        pools = [getattr(self.module, n, {}) for n in getattr(self.module, "adapter_layer_names", ())]
        return not pools or any(adapter in p for p in pools)

    def params(self) -> list[Tensor]:
        names = set(self.adapters())
        return [
            p for n, p in self.module.named_parameters()
            if "base_layer" not in n and p.requires_grad and names.intersection(n.split("."))
        ]

    def delta(self) -> Tensor | None:
        """ΔW of the active adapter(s) in (out, in) layout, differentiable."""
        m, delta = self.module, None
        for a in self.adapters():
            if getattr(m, "use_dora", {}).get(a, False):
                d = _dora_delta(m, a, self.layout)
            elif hasattr(m, "get_delta_weight"):
                # Eval-mode ΔW: LoHa/LoKr drop ranks at random in get_delta_weight while
                # training; the penalty is on the weights themselves.
                training, m.training = m.training, False
                try:
                    d = m.get_delta_weight(a)
                finally:
                    m.training = training
                w = self.base_weight()
                if not is_quantized(w) and tuple(d.shape) != tuple(w.shape):
                    raise AnchorError(
                        f"{self.name}: {self.tuner} get_delta_weight gave shape {tuple(d.shape)}, the base "
                        f"weight is {tuple(w.shape)}: this layer type is not supported for {self.tuner}"
                    )
                d = to_out_in(d, self.layout)
            else:
                raise AnchorError(f"{self.name}: adapter {type(m).__name__} exposes no get_delta_weight")
            delta = d if delta is None else delta + d
        return delta

    def _check_unsharded(self, params: list[Tensor]) -> None:
        if any(is_dtensor(p) for p in params) or is_dtensor(self.base_weight()):
            raise AnchorError(
                f"{self.name}: DoRA and other non-LoRA adapters are not supported on sharded (FSDP2 "
                "DTensor) parameters; use plain LoRA or full fine-tuning, or do not shard this module"
            )

    def penalty(self, anchor: Projection) -> Tensor | None:
        # Differentiated by autograd directly, not through terms(): a tuner may put gradient
        # hooks on its parameters (OSF projects its gradients), which must fire once; a
        # closed-form backward would hand them gradients that already went through them.
        self._check_unsharded(self.params())
        delta = self.delta()
        if delta is None:
            return None
        delta = delta.to(math_dtype(delta))
        return self.operator(anchor, delta).residual(delta).pow(2).sum()

    def terms(self, anchor: Projection) -> TargetTerms | None:
        params = self.params()
        if not params:
            return None
        self._check_unsharded(params)
        with torch.enable_grad():
            delta = self.delta()
            if delta is None:
                return None
            delta = delta.to(math_dtype(delta))
            penalty = self.operator(anchor, delta).residual(delta).pow(2).sum()
            grads = torch.autograd.grad(penalty, params, allow_unused=True)
        grads = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True))
        return TargetTerms(PenaltyTerms(penalty.detach(), delta.detach().pow(2).sum(), grads), tuple(params))


class _ClosedForm(torch.autograd.Function):
    """``‖R ΔW‖²`` from a target's terms; backward returns their closed-form gradients."""

    @staticmethod
    def forward(ctx: Any, compute: Callable[[], TargetTerms | None], *params: Tensor) -> Tensor:
        t = compute()
        if t is None:
            ctx.grads = tuple(torch.zeros_like(p) for p in params)
            return params[0].new_zeros((), dtype=torch.float32)
        if len(t.params) != len(params) or any(a is not b for a, b in zip(t.params, params, strict=True)):
            raise AnchorError("the target's tensors changed while its penalty was computed")
        ctx.grads = t.values.grads
        return t.values.penalty

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor):
        return (None, *(scale(g, grad_out) for g in ctx.grads))


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
