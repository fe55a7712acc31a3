"""Find what is being tuned for each anchored weight, and compute its penalty terms.

A :class:`Target` keeps a reference to the *module*, never to tensors: accelerate,
FSDP2 and PEFT swap parameters after the optimizer is built, so every tensor is
looked up when the penalty is computed.

Kinds:

* ``lora``: PEFT LoRA (Linear, GPT-2 Conv1D, Embedding, Conv); closed-form gradients.
  Several active adapters on one module are penalised jointly: ΔW = Σ sᵢBᵢAᵢ is
  ``[s₁B₁, s₂B₂] @ [A₁; A₂]``. Adapters whose init rewrote the base weight (PiSSA,
  OLoRA, LoftQ, ...) are measured from their value at construction (the *origin*):
  ΔW = s·B·A - s₀·B₀A₀ = ``[sB, -s₀B₀] @ [A; A₀]``, gradients kept for the first block.
* ``autograd``: DoRA (Linear, GPT-2 Conv1D, conv) and the PEFT tuners of
  :data:`~asft_optim.tuners.DELTA_WEIGHT_TUNERS` (AdaLoRA, LoHa, LoKr, VeRA, ...); the
  effective ΔW is built and differentiated with autograd. Other tuners are refused
  (:func:`~asft_optim.tuners.classify`).
* ``full``: the weight itself is trained (also PEFT ``modules_to_save`` copies); ΔW = W - W_ref.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from .anchors import to_out_in, weight_layout
from .projection import AnchorError, PenaltyTerms, Projection, dense_terms, lora_terms
from .tuners import check_method, classify, is_quantized, origin_adapters, peft_configs, tuner_name

Kind = Literal["lora", "autograd", "full"]

# Wrapper prefixes added by PEFT, DDP and torch.compile in front of the HF name, and
# wrapper components FSDP1 / activation checkpointing insert anywhere inside it.
_PREFIXES = ("base_model.model.", "module.", "_orig_mod.")
_INNER_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def hf_name(module_name: str) -> str:
    """Strip wrapper prefixes: ``base_model.model.model.layers.0.q_proj`` -> ``model.layers.0.q_proj``."""
    for w in _INNER_WRAPPERS:
        module_name = module_name.replace("." + w, ".")
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES + _INNER_WRAPPERS:
            if module_name.startswith(p):
                module_name, changed = module_name[len(p):], True
    return module_name


def is_tuner(module: nn.Module) -> bool:
    return hasattr(module, "get_base_layer") and hasattr(module, "active_adapters")


def is_modules_to_save(module: nn.Module) -> bool:
    """A PEFT ``ModulesToSaveWrapper``: a trainable copy per adapter next to the frozen original."""
    return "modules_to_save" in getattr(module, "_modules", {}) and "original_module" in module._modules


@dataclass
class Target:
    """One anchored weight and how its update is parameterised."""

    name: str
    kind: Kind
    module: nn.Module
    layout: str = "out_in"
    #: ``peft.tuners.<tuner>`` the module comes from (``"lora"``, ``"vera"``, ...); "" if none.
    tuner: str = ""
    #: LoRA adapters whose ΔW is measured from an origin (see :data:`~asft_optim.tuners.ORIGIN_INITS`).
    origin_adapters: frozenset[str] = frozenset()
    #: ``{adapter: (B₀, A₀)}``: detached clones shaped like the parameters, from
    #: :meth:`record_origin` (or restored from a saved optimizer state).
    origin: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)

    # -- tensors, looked up now -------------------------------------------------------
    def base_weight(self) -> Tensor:
        if is_modules_to_save(self.module):
            # The trained copy of the active adapter (the original stays frozen).
            m = self.module
            return m.modules_to_save[m.active_adapters[0]].weight
        m = self.module.get_base_layer() if is_tuner(self.module) else self.module
        return m.weight

    def default_reference(self) -> Tensor | None:
        """The weight ΔW is measured from when none is given: the frozen original of a
        ``modules_to_save`` copy; None otherwise (the weights at construction)."""
        if is_modules_to_save(self.module):
            return self.module.original_module.weight
        return None

    def out_features(self) -> int:
        """Rows of ΔW in (out, in) layout (a quantized base weight is packed: ask the layer)."""
        w = self.base_weight()
        if is_quantized(w) and hasattr(self.module, "out_features"):
            return int(self.module.out_features)
        return to_out_in(w, self.layout).shape[0] if w.dim() >= 2 else -1

    def out_in_shape(self) -> tuple[int, int]:
        """``(out, in)`` of ΔW (a quantized base weight is packed: ask the layer)."""
        w = self.base_weight()
        if is_quantized(w) and hasattr(self.module, "in_features"):
            return self.out_features(), int(self.module.in_features)
        return tuple(to_out_in(w, self.layout).shape) if w.dim() >= 2 else tuple(w.shape)

    def adapters(self) -> list[str]:
        m = self.module
        if getattr(m, "disable_adapters", False):
            return []
        merged = set(getattr(m, "merged_adapters", ()))
        names = [a for a in m.active_adapters if a not in merged]
        if self.kind == "lora":
            pool, emb = getattr(m, "lora_A", {}), getattr(m, "lora_embedding_A", {})
            names = [a for a in names if a in pool or a in emb]
        elif self.kind == "autograd":
            # Active on the model but not injected into this layer: no ΔW here.
            layer_names = getattr(m, "adapter_layer_names", ())
            pools = [getattr(m, n, {}) for n in layer_names]
            names = [a for a in names if not pools or any(a in p for p in pools)]
        return names

    # -- origin of adapters whose init rewrote the base weight ----------------------------
    @property
    def needs_origin(self) -> bool:
        """True if ΔW of some adapter here is measured from its initial B₀A₀ (PiSSA, OLoRA, ...)."""
        return bool(self.origin_adapters)

    def factor_params(self, adapter: str) -> tuple[Tensor, Tensor]:
        """The ``(B, A)`` parameters of one LoRA adapter of this module, as stored."""
        m = self.module
        if adapter in getattr(m, "lora_A", {}):
            return m.lora_B[adapter].weight, m.lora_A[adapter].weight
        return m.lora_embedding_B[adapter], m.lora_embedding_A[adapter]

    def record_origin(self) -> None:
        """Snapshot ``(B₀, A₀)`` of every adapter that needs an origin (at construction)."""
        for a in self.origin_adapters:
            b, aa = self.factor_params(a)
            self.origin[a] = (b.detach().clone(), aa.detach().clone())

    def origin_blocks(self, adapters: list[str]) -> list[tuple[Tensor, Tensor]]:
        """``(-s₀B₀, A₀)`` as 2-D (out, r)/(r, in) for those of ``adapters`` with an origin.

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
                    "load its saved state, or pass origins= to anchor_penalty"
                )
            b0, a0 = self.origin[a]
            r = m.r[a]
            s0 = m.lora_alpha[a] / (r ** 0.5 if m.use_rslora.get(a, False) else r)
            out.append((-s0 * _full(b0).flatten(1), _full(a0).flatten(1)))
        return out

    def lora_factors(self) -> list[tuple[Tensor, Tensor, float, Tensor, Tensor]]:
        """``(B, A, s, B_param, A_param)`` per active adapter, B/A as 2-D (out, r)/(r, in)."""
        m, out = self.module, []
        for a in self.adapters():
            if a in getattr(m, "lora_A", {}):
                bp, ap = m.lora_B[a].weight, m.lora_A[a].weight
                b2, a2 = bp.flatten(1), ap.flatten(1)
            else:  # embedding LoRA: raw parameters, B (dim, r) and A (r, vocab)
                bp, ap = m.lora_embedding_B[a], m.lora_embedding_A[a]
                b2, a2 = bp, ap
            out.append((b2, a2, float(m.scaling[a]), bp, ap))
        return out

    def params(self, factors: list | None = None) -> list[Tensor]:
        """The trainable tensors whose gradient the penalty touches.

        ``factors``: this step's :meth:`lora_factors`, if already looked up.
        """
        if self.kind == "full":
            return [self.base_weight()]
        if self.kind == "lora":
            return [t for f in (self.lora_factors() if factors is None else factors) for t in (f[3], f[4])]
        return [p for p in self._adapter_params() if p.requires_grad]

    def all_params(self) -> list[Tensor]:
        """Every tensor this target can train, active or not (adapters of all names)."""
        if self.kind == "full":
            return [self.base_weight()]
        return [p for n, p in self.module.named_parameters() if "base_layer" not in n]

    def _adapter_params(self) -> list[Tensor]:
        names = set(self.adapters())
        return [
            p for n, p in self.module.named_parameters()
            if "base_layer" not in n and names.intersection(n.split("."))
        ]

    # -- penalty --------------------------------------------------------------------
    def terms(
        self, proj: Projection, reference: Tensor | None, factors: list | None = None
    ) -> tuple[PenaltyTerms, list[Tensor]] | None:
        """Raw penalty terms and the tensors their gradients belong to (None: no update).

        ``factors``: this step's :meth:`lora_factors`, if the caller already looked them up.
        """
        if self.kind == "full":
            w = self.base_weight()
            delta = to_out_in(self._full_delta(w.detach(), reference), self.layout)
            op, gram = self._operator(proj, delta)
            t = dense_terms(op, delta, gram)
            g = t.grads[0]
            g = g.t() if self.layout == "in_out" else g
            return PenaltyTerms(t.penalty, t.delta_sq, (_like(g.reshape(w.shape).contiguous(), w),)), [w]
        if self.kind == "lora":
            factors = self.lora_factors() if factors is None else factors
            if not factors:
                return None
            dtype = math_dtype(factors[0][3])
            op, gram = self._operator(proj, factors[0][3])
            origins = self.origin_blocks(self.adapters()) if self.origin_adapters else []
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
        return self._autograd_terms(proj)

    def effective_delta(self) -> Tensor:
        """ΔW of the adapter(s) in (out, in) layout, differentiable (autograd kind)."""
        m = self.module
        delta = None
        for a in self.adapters():
            if getattr(m, "use_dora", {}).get(a, False):
                d = _dora_delta(m, a, self.layout)
            elif hasattr(m, "get_delta_weight"):
                # Eval-mode ΔW: LoHa/LoKr drop ranks at random in get_delta_weight while training;
                # the penalty is on the weights themselves.
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

    def _autograd_terms(self, proj: Projection):
        params = self.params()
        if not params:
            return None
        if any(_is_dtensor(p) for p in params) or _is_dtensor(self.base_weight()):
            raise AnchorError(
                f"{self.name}: DoRA and other non-LoRA adapters are not supported on sharded (FSDP2 "
                "DTensor) parameters; use plain LoRA or full fine-tuning, or do not shard this module"
            )
        with torch.enable_grad():
            delta = self.effective_delta()
            delta = delta.to(math_dtype(delta))
            r = self._proj(proj, delta).residual(delta)
            penalty = r.pow(2).sum()
            grads = torch.autograd.grad(penalty, params, allow_unused=True)
        grads = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True))
        return PenaltyTerms(penalty.detach(), delta.detach().pow(2).sum(), grads), params

    def _proj(self, proj: Projection, like: Tensor) -> Projection:
        return self._operator(proj, like)[0]

    def _operator(self, proj: Projection, like: Tensor) -> tuple[Projection, Tensor | None]:
        """The anchor on ``like``'s device and math dtype, and its Gram matrix ``FᵀF``.

        Both are computed once and reused across steps: anchors move lazily, once, to the
        device and math dtype of what they anchor, and G (:meth:`Projection.compact_gram`:
        m×m for low rank, the vector ``diag(FᵀF)`` for orthogonal columns) follows them. The cache is rebuilt when the anchor
        object, the device, the dtype or the factor's contents (its in-place version
        counter) change. It holds no parameter: tensors are looked up at every step.
        """
        key = (like.device, math_dtype(like), proj.factor._version)
        cached = self._cache.get("proj")
        if cached is None or cached[0] != key or cached[1] is not proj:
            moved = proj.to(device=key[0], dtype=key[1])
            gram = moved.compact_gram()
            cached = self._cache["proj"] = (key, proj, moved, gram)
        return cached[2], cached[3]

    def _reference_on(self, reference: Tensor, like: Tensor) -> Tensor:
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
        cached = self._cache.get("reference")
        if cached is None or cached[0] is not reference or cached[1] != key:
            moved = _full(reference).to(like.device)
            if sharded:
                from torch.distributed.tensor import distribute_tensor

                moved = distribute_tensor(moved, like.device_mesh, like.placements, src_data_rank=None)
            cached = self._cache["reference"] = (reference, key, moved)
        return cached[2]

    def _full_delta(self, w: Tensor, reference: Tensor) -> Tensor:
        """``W - W_ref`` as a full tensor in the math dtype (``w`` detached).

        FSDP2 (``w`` a DTensor): the shards are subtracted locally and the *difference* is
        gathered, one all-gather per weight instead of one for W and one for W_ref.
        """
        dtype = math_dtype(w)
        return _full(w.to(dtype) - self._reference_on(reference, w).to(dtype))


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


def math_dtype(t: Tensor) -> torch.dtype:
    # bf16/fp16 weights: the penalty math runs in float32; float64 stays float64.
    return torch.promote_types(t.dtype, torch.float32)


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


def find_targets(
    model: nn.Module, anchors: Mapping[str, Projection], *, record_origin: bool = True
) -> tuple[list[Target], list[str]]:
    """Match anchors to the model's modules by HF name and classify each PEFT tuner.

    Raises :class:`AnchorError` for a tuner whose ΔW cannot be penalised exactly (see
    :func:`~asft_optim.tuners.classify`). ``record_origin``: snapshot ``(B₀, A₀)`` of
    adapters that need an origin (PiSSA, OLoRA, LoftQ, ...; default: True, as when an
    optimizer is built; the stateless :func:`anchor_penalty` passes False).

    Returns the targets and the anchor names that matched no module.
    """
    configs = peft_configs(model)
    check_method(configs)
    needs_origin = origin_adapters(configs)
    targets: dict[str, Target] = {}
    for mod_name, module in model.named_modules():
        name = hf_name(mod_name) + ".weight"
        if name not in anchors or name in targets:
            continue
        if is_modules_to_save(module):
            original = module.original_module
            targets[name] = Target(name, "full", module, weight_layout(original), tuner="modules_to_save")
        elif is_tuner(module):
            base = module.get_base_layer()
            kind: Kind = classify(module, name)
            present = set(getattr(module, "lora_A", {})) | set(getattr(module, "lora_embedding_A", {}))
            origin = needs_origin & present
            if kind != "lora" and origin:
                raise AnchorError(
                    f"{name}: DoRA with a PiSSA/OLoRA/LoftQ-style init (adapter {sorted(origin)[0]!r}) is not "
                    "supported: its ΔW would need the original base weight"
                )
            t = Target(name, kind, module, weight_layout(base), tuner=tuner_name(module),
                       origin_adapters=frozenset(origin) if kind == "lora" else frozenset())
            if record_origin:
                t.record_origin()
            targets[name] = t
        elif isinstance(getattr(module, "weight", None), torch.Tensor):
            if ".base_layer" in mod_name or ".original_module" in mod_name or ".modules_to_save." in mod_name:
                continue  # the tuner or modules_to_save wrapper around it is the target
            targets[name] = Target(name, "full", module, weight_layout(module))
    if not configs and any(t.tuner == "lora" for t in targets.values()):
        warnings.warn(
            "LoRA layers found but no peft_config on the model: asft-optim cannot tell whether an "
            "adapter was initialised from the base weight (PiSSA/OLoRA/LoftQ/CorDA/LoRA-GA), which "
            "would need ΔW measured from its initial value; pass the PeftModel itself (assuming a "
            "zero-origin init here)",
            stacklevel=3,
        )
    missing = [n for n in anchors if n not in targets]
    return list(targets.values()), missing


def check_shapes(targets: list[Target], anchors: Mapping[str, Projection]) -> None:
    """Raise :class:`AnchorError` naming every anchor that cannot act on its weight.

    Checks the output dimension, finiteness of the factor, and (for the projector
    modes) that the factor has no more columns than the weight has outputs.
    Runs once at construction (it synchronises with the device).
    """
    problems = []
    for t in targets:
        w = t.base_weight()
        proj = anchors[t.name]
        d_out = t.out_features()
        if d_out != proj.d_out:
            packed = (
                f" (a packed {type(w).__name__} of a quantized layer that does not report out_features)"
                if is_quantized(w) else ""
            )
            problems.append(
                f"{t.name}: anchor acts on {proj.d_out} outputs, weight {tuple(w.shape)}{packed} has {d_out}"
            )
            continue
        if proj.is_projector and proj.rank > d_out:
            problems.append(f"{t.name}: anchor rank {proj.rank} exceeds the {d_out} outputs of the weight")
        if proj.factor.numel() and not bool(torch.isfinite(proj.factor).all()):
            problems.append(f"{t.name}: anchor factor has non-finite values")
    if problems:
        raise AnchorError("anchors do not fit the model:\n  " + "\n  ".join(problems))
