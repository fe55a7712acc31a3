"""Find what is being tuned for each anchored weight: one :mod:`~asft_optim.targets` class per module.

Also the checks both penalty routes run once, when they are built: the anchors fit their
weights (:func:`check_shapes`), the references given by the user name real fully tuned
weights (:func:`match_references`), and which tuned weights carry no anchor
(:func:`tuned_weights`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .layout import weight_layout
from .projection import AnchorError, Projection
from .refused import refuse_zero3_partitions
from .targets import (
    DeltaWeightTarget,
    FullTarget,
    LoraTarget,
    Target,
    is_modules_to_save,
    is_tuner,
)
from .tuners import check_method, classify, is_quantized, origin_adapters, peft_configs, tuner_name

__all__ = ["bind_targets", "check_shapes", "find_targets", "hf_name", "match_references", "tuned_weights"]

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


def find_targets(
    model: nn.Module, anchors: Mapping[str, Projection], *, start: bool = True
) -> tuple[list[Target], list[str]]:
    """Match anchors to the model's modules by HF name and classify each PEFT tuner.

    Raises :class:`AnchorError` for a tuner whose ΔW cannot be penalised exactly (see
    :func:`~asft_optim.tuners.classify`). ``start``: take the model as it is now as the
    start of ΔW (record LoRA origins, W_ref = the weights now; default: True, as when an
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
            t: Target = FullTarget(name, module, weight_layout(module.original_module), tuner="modules_to_save")
        elif is_tuner(module):
            layout = weight_layout(module.get_base_layer())
            present = set(getattr(module, "lora_A", {})) | set(getattr(module, "lora_embedding_A", {}))
            origin = needs_origin & present
            if classify(module, name) == "lora":
                t = LoraTarget(name, module, layout, tuner_name(module), frozenset(origin))
            elif origin:
                raise AnchorError(
                    f"{name}: DoRA with a PiSSA/OLoRA/LoftQ-style init (adapter {sorted(origin)[0]!r}) is not "
                    "supported: its ΔW would need the original base weight"
                )
            else:
                t = DeltaWeightTarget(name, module, layout, tuner_name(module))
        elif isinstance(getattr(module, "weight", None), torch.Tensor):
            if ".base_layer" in mod_name or ".original_module" in mod_name or ".modules_to_save." in mod_name:
                continue  # the tuner or modules_to_save wrapper around it is the target
            t = FullTarget(name, module, weight_layout(module))
        else:
            continue
        if start:
            t.start()
        targets[name] = t
    if not configs and any(t.tuner == "lora" for t in targets.values()):
        warnings.warn(
            "LoRA layers found but no peft_config on the model: asft-optim cannot tell whether an "
            "adapter was initialised from the base weight (PiSSA/OLoRA/LoftQ/CorDA/LoRA-GA), which "
            "would need ΔW measured from its initial value; pass the PeftModel itself (assuming a "
            "zero-origin init here)",
            stacklevel=3,
        )
    _refuse_tied(list(targets.values()))
    missing = [n for n in anchors if n not in targets]
    return list(targets.values()), missing


def _refuse_tied(targets: list[Target]) -> None:
    """Two anchors on one tied tensor (``embed_tokens``/``lm_head``) would penalise it twice,
    with two operators: refused, since neither one is the right choice."""
    seen: dict[int, str] = {}
    for t in targets:
        if isinstance(t, FullTarget):
            other = seen.setdefault(id(t.base_weight()), t.name)
            if other != t.name:
                raise AnchorError(
                    f"anchors {other!r} and {t.name!r} act on one tied tensor: it would be penalised "
                    "twice with two operators; keep one of the two names in the anchors"
                )


def bind_targets(
    model: nn.Module, anchors: Mapping[str, Projection], *, strict: bool, start: bool
) -> tuple[list[Target], list[str]]:
    """:func:`find_targets` and :func:`check_shapes`, as both penalty routes run them once.

    ``strict``: raise when an anchor matches no module. Returns the targets and the
    anchors that matched no module. DeepSpeed ZeRO-3's empty partitions are refused by name
    (they would read as weights of shape (0,)).
    """
    refuse_zero3_partitions(model, "anchored weights")
    targets, missing = find_targets(model, anchors, start=start)
    if missing and strict:
        raise AnchorError(
            f"{len(missing)} anchor(s) match no module of the model (first: {missing[:5]}); "
            "check the model is the one being tuned (e.g. wrapped with PEFT before the optimizer) "
            "or pass strict=False"
        )
    check_shapes(targets, anchors)
    return targets, missing


def check_shapes(targets: list[Target], anchors: Mapping[str, Projection]) -> None:
    """Raise :class:`AnchorError` naming every anchor that cannot act on its weight
    (each operator's ``fits``: its dimension, rank and finite values). Runs once at
    construction (it synchronises with the device)."""
    problems = []
    for t in targets:
        problem = anchors[t.name].fits(t.out_in_shape())
        if problem is None:
            continue
        w = t.base_weight()
        packed = (f" (the weight is a packed {type(w).__name__} {tuple(w.shape)} of a quantized layer that "
                  "does not report its features)" if is_quantized(w) else "")
        problems.append(f"{t.name}: {problem}{packed}")
    if problems:
        raise AnchorError("anchors do not fit the model:\n  " + "\n  ".join(problems))


def _canonical(key: str) -> str:
    """``module.model.layers.0.q_proj.weight`` / ``model.layers.0.q_proj`` -> the HF weight name."""
    return hf_name(key.removesuffix(".weight")) + ".weight"


def match_references(
    reference: Mapping[str, Tensor] | None, targets: list[Target]
) -> dict[str, Tensor]:
    """``{target name: W_ref}`` from the user's ``reference=`` mapping, checked.

    Keys may carry the wrapper prefixes of :func:`hf_name` or lack ``.weight``, as long as
    no two keys name the same weight. Every key must name an anchored weight (one tuned
    through an adapter is ignored: its ΔW lives in the adapter), and when a mapping is given, every fully tuned anchored weight that has no default
    reference (a ``modules_to_save`` copy's frozen original) must be in it: a partial
    mapping would silently measure the others from the start instead.
    """
    if reference is None:
        return {}
    if not isinstance(reference, Mapping):
        raise TypeError(f"reference must be a mapping {{weight name: W_ref}}, got {type(reference).__name__}")
    full = {t.name: t for t in targets if isinstance(t, FullTarget)}
    anchored = {t.name for t in targets}
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in reference.items():
        name = _canonical(str(key))
        if name in out:
            raise AnchorError(f"reference: two keys name {name!r} (one is {key!r}): give each weight once")
        if name not in full:
            if name not in anchored:  # an adapter's ΔW lives in the adapter: its W_ref is unused
                unknown.append(key)
            continue
        if not isinstance(value, Tensor):
            raise AnchorError(f"reference[{key!r}] is a {type(value).__name__}, not a tensor")
        out[name] = value
    if unknown:
        raise AnchorError(
            f"reference: {len(unknown)} key(s) name no anchored weight of the model (first: {unknown[:5]}; "
            f"anchored fully tuned weights: {sorted(full)[:5]}): use the model's weight names"
        )
    missing = [n for n, t in full.items()
               if n not in out and t.default_reference() is None and t.base_weight().requires_grad]
    if missing:
        raise AnchorError(
            f"reference: no W_ref for {len(missing)} fully tuned anchored weight(s) (first: {missing[:5]}); "
            "give every one, or pass reference=None to measure ΔW from the weights at construction"
        )
    return out


def tuned_weights(model: nn.Module) -> list[str]:
    """HF names of the 2-D weights being tuned: trainable LoRA/tuner modules or weights."""
    tuners = [n for n, m in model.named_modules() if is_tuner(m)]
    out: list[str] = []
    for name, module in model.named_modules():
        if name in tuners:
            if any(p.requires_grad for n, p in module.named_parameters() if "base_layer" not in n):
                out.append(hf_name(name) + ".weight")
            continue
        if any(name.startswith(t + ".") for t in tuners):
            continue  # adapter internals (lora_A, lora_B, base_layer)
        w = getattr(module, "weight", None)
        if isinstance(w, nn.Parameter) and w.requires_grad and w.dim() >= 2:
            out.append(hf_name(name) + ".weight")
    return list(dict.fromkeys(out))
