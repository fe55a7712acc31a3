"""Find what is being tuned for each anchored weight (discovery; the math is in :mod:`~asft_optim.terms`).

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

The penalty terms of each kind are computed by :func:`asft_optim.terms.target_terms`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from .layout import to_out_in, weight_layout
from .projection import AnchorError, Projection
from .tuners import check_method, classify, is_quantized, origin_adapters, peft_configs, tuner_name

__all__ = ["Kind", "Target", "check_shapes", "find_targets", "hf_name", "is_modules_to_save", "is_tuner"]

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
    #: The anchor moved to this weight's device and dtype, its Gram matrix and a moved
    #: reference: kept by :func:`~asft_optim.terms.operator` / :func:`~asft_optim.terms.reference_on`.
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
