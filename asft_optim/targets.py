"""Find what is being tuned for each anchored weight, and compute its penalty terms.

A :class:`Target` keeps a reference to the *module*, never to tensors: accelerate,
FSDP2 and PEFT swap parameters after the optimizer is built, so every tensor is
looked up when the penalty is computed.

Kinds:

* ``lora``: PEFT LoRA (Linear, GPT-2 Conv1D, Embedding, Conv); closed-form gradients.
  Several active adapters on one module are penalised jointly: ΔW = Σ sᵢBᵢAᵢ is
  ``[s₁B₁, s₂B₂] @ [A₁; A₂]``.
* ``autograd``: DoRA (Linear, GPT-2 Conv1D, conv) and other PEFT tuners exposing
  ``get_delta_weight``; the effective ΔW is built and differentiated with autograd.
* ``full``: the weight itself is trained; ΔW = W - W_ref.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from .anchors import to_out_in, weight_layout
from .projection import AnchorError, PenaltyTerms, Projection, dense_terms, lora_terms

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


@dataclass
class Target:
    """One anchored weight and how its update is parameterised."""

    name: str
    kind: Kind
    module: nn.Module
    layout: str = "out_in"
    _cache: dict = field(default_factory=dict, repr=False)

    # -- tensors, looked up now -------------------------------------------------------
    def base_weight(self) -> Tensor:
        m = self.module.get_base_layer() if is_tuner(self.module) else self.module
        return m.weight

    def adapters(self) -> list[str]:
        m = self.module
        if getattr(m, "disable_adapters", False):
            return []
        merged = set(getattr(m, "merged_adapters", ()))
        pool = getattr(m, "lora_A", {}) if self.kind == "lora" else None
        names = [a for a in m.active_adapters if a not in merged]
        if self.kind == "lora":
            emb = getattr(m, "lora_embedding_A", {})
            names = [a for a in names if a in pool or a in emb]
        return names

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
            if len(factors) == 1:
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
            bs = [_full(f[0].detach()).to(dtype) * f[2] for f in factors]
            as_ = [_full(f[1].detach()).to(dtype) for f in factors]
            # Joint update of all active adapters, folded into one (B, A) pair with s = 1.
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
                d = to_out_in(m.get_delta_weight(a), self.layout)
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


def find_targets(model: nn.Module, anchors: Mapping[str, Projection]) -> tuple[list[Target], list[str]]:
    """Match anchors to the model's modules by HF name.

    Returns the targets and the anchor names that matched no module.
    """
    targets: dict[str, Target] = {}
    for mod_name, module in model.named_modules():
        name = hf_name(mod_name) + ".weight"
        if name not in anchors or name in targets:
            continue
        if is_tuner(module):
            base = module.get_base_layer()
            uses_dora = any(getattr(module, "use_dora", {}).values())
            plain_lora = hasattr(module, "lora_A") and not uses_dora
            kind: Kind = "lora" if plain_lora else "autograd"
            targets[name] = Target(name, kind, module, weight_layout(base))
        elif isinstance(getattr(module, "weight", None), torch.Tensor):
            if ".base_layer" in mod_name:
                continue  # the tuner wrapping it is the target
            targets[name] = Target(name, "full", module, weight_layout(module))
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
        d_out = to_out_in(w, t.layout).shape[0] if w.dim() >= 2 else -1
        if d_out != proj.d_out:
            problems.append(
                f"{t.name}: anchor acts on {proj.d_out} outputs, weight {tuple(w.shape)} has {d_out}"
            )
            continue
        if proj.is_projector and proj.rank > d_out:
            problems.append(f"{t.name}: anchor rank {proj.rank} exceeds the {d_out} outputs of the weight")
        if proj.factor.numel() and not bool(torch.isfinite(proj.factor).all()):
            problems.append(f"{t.name}: anchor factor has non-finite values")
    if problems:
        raise AnchorError("anchors do not fit the model:\n  " + "\n  ".join(problems))
