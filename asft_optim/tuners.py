"""Which PEFT tuner wraps an anchored weight, and whether its update can be penalised exactly.

Every PEFT tuner layer is classified by the ``peft.tuners.<tuner>`` package it comes from:

* ``lora``: PEFT LoRA (and rsLoRA, PiSSA/OLoRA/LoftQ/CorDA/LoRA-GA inits, MiCA, QLoRA on a
  4-bit or 8-bit ``bitsandbytes`` base): ΔW = s·B·A in closed form, measured from the
  adapter's value at construction where PEFT rewrites the base weight (:data:`ORIGIN_INITS`).
  DoRA: its effective update by autograd.
* ``autograd``: tuners whose ``get_delta_weight(adapter)`` is the exact, differentiable
  merged update in the base weight's layout (:data:`DELTA_WEIGHT_TUNERS`; each one is
  checked against a forward-pass oracle in ``tests/test_tuners.py``).
* everything else is refused with :class:`AnchorError` naming the tuner and the way out
  (:data:`REFUSED`): a penalty on the wrong ΔW would be silently wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from torch import nn

from .projection import AnchorError

__all__ = [
    "DELTA_WEIGHT_TUNERS",
    "ORIGIN_INITS",
    "REFUSED",
    "TunerKind",
    "check_method",
    "classify",
    "is_quantized",
    "origin_adapters",
    "peft_configs",
    "tuner_name",
]

TunerKind = Literal["lora", "autograd"]

# get_delta_weight(adapter) == merged weight - base weight (value and gradient, Linear layers),
# and the base weight is left as it was.
DELTA_WEIGHT_TUNERS = frozenset({
    "adalora", "c3a", "delora", "fourierft", "frod", "gralora", "loha", "lokr", "osf", "peanut",
    "pvera", "randlora", "supertuning", "tinylora", "unilora", "vblora", "vera", "waveft",
})

_NOT_A_DELTA = "its get_delta_weight is not the additive update ΔW = W' - W"
REFUSED: Mapping[str, str] = {
    "oft": "OFT rotates the weight (W' = W·R); " + _NOT_A_DELTA,
    "boft": "BOFT rotates the weight (W' = W·R); " + _NOT_A_DELTA,
    "hra": "HRA applies Householder reflections (W' = W·H); " + _NOT_A_DELTA,
    "hira": "HiRA multiplies the weight elementwise (W' = W ⊙ (1 + BA)); " + _NOT_A_DELTA,
    "miss": "MiSS's get_delta_weight needs the base weight and is not ΔW",
    "ia3": "IA3 rescales rows/columns of W and exposes no ΔW",
    "ln_tuning": "LN tuning trains a copy of a norm layer, not a weight matrix",
    "lily": "Lily exposes no ΔW (get_delta_weight is not implemented)",
    "shira": "SHiRA's sparse ΔW is not differentiable on CPU",
    "deft": "DeFT's get_delta_weight does not carry the gradient of its parameters",
    "glora": "GLoRA exposes no ΔW",
    "beft": "BEFT exposes no ΔW",
    "shadow": "Shadow exposes no ΔW",
    "road": "RoAd rotates output pairs and exposes no ΔW",
    "psoft": "PSOFT rotates the weight's principal subspace and exposes no ΔW",
    "adamss": "AdaMSS is not checked against the oracle",
    "poly": "Poly mixes LoRA modules per task id; there is no single ΔW",
    "xlora": "X-LoRA mixes LoRA experts per token; there is no single ΔW",
    "trainable_tokens": "trainable tokens replace embedding rows through a side table",
    "mixed": "mixed-adapter models are not checked against the oracle",
}
_HOW_TO = (
    "use LoRA (or a tuner listed in the README's tuner table), fully fine-tune the weight, "
    "or remove this weight from the anchors"
)

# LoRA variants (``module.lora_variant[adapter]``) whose ΔW is still s·B·A (MiCA only
# freezes B) or is handled by autograd (DoRA); any other variant is refused.
_PLAIN_VARIANTS = frozenset({"MiCALinearVariant", "MiCAEmbeddingVariant"})
_DORA_VARIANTS = frozenset({
    "DoraLinearVariant", "DoraConv1dVariant", "DoraConv2dVariant", "DoraConv3dVariant",
})

# init_lora_weights values for which PEFT rewrites the base weight so that W_base + s·B₀A₀
# is the original weight: ΔW must be s·B·A - s₀·B₀A₀, with B₀A₀ recorded at construction.
ORIGIN_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

# PEFT methods that train no weight matrix at all (virtual tokens, prefix states, gates).
_NO_WEIGHT_METHODS = frozenset({
    "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT",
    "CPT", "CARTRIDGE",
})


def tuner_name(module: nn.Module) -> str:
    """``"lora"`` for ``peft.tuners.lora.bnb.Linear4bit``; the class name outside PEFT."""
    parts = type(module).__module__.split(".")
    if len(parts) >= 3 and parts[0] == "peft" and parts[1] == "tuners":
        return parts[2]
    return type(module).__name__


def is_quantized(weight) -> bool:
    """A packed/quantized base weight (bitsandbytes 4/8-bit, GPTQ, ...)."""
    return not weight.dtype.is_floating_point or type(weight).__name__ in ("Params4bit", "Int8Params")


def classify(module: nn.Module, name: str) -> TunerKind:
    """The target kind of a PEFT tuner layer, or :class:`AnchorError` naming the tuner."""
    tuner = tuner_name(module)
    if tuner == "lora":
        return _classify_lora(module, name)
    if tuner in DELTA_WEIGHT_TUNERS:
        return "autograd"
    why = REFUSED.get(tuner, "this tuner is not checked against the oracle")
    raise AnchorError(f"{name}: PEFT tuner {tuner!r} ({type(module).__name__}) is not supported: {why}; {_HOW_TO}")


def _classify_lora(module: nn.Module, name: str) -> TunerKind:
    variants = getattr(module, "lora_variant", {})
    kind: TunerKind = "lora"
    for adapter, variant in variants.items():
        vname = type(variant).__name__
        if vname in _DORA_VARIANTS:
            kind = "autograd"
            if is_quantized(module.get_base_layer().weight):
                raise AnchorError(
                    f"{name}: DoRA on a quantized base weight (QDoRA, adapter {adapter!r}) is not supported: "
                    "its ΔW needs the dense base weight; use plain LoRA on the quantized model"
                )
        elif vname not in _PLAIN_VARIANTS:
            raise AnchorError(
                f"{name}: LoRA variant {vname} (adapter {adapter!r}) is not supported: its update is not "
                f"s·B·A; {_HOW_TO}"
            )
    if any(getattr(module, "use_dora", {}).values()):
        kind = "autograd"
    return kind


def peft_configs(model: nn.Module) -> Mapping[str, object]:
    """``{adapter: PeftConfig}`` of the first (outermost) module holding one, else ``{}``."""
    for m in model.modules():
        cfg = getattr(m, "peft_config", None)
        if isinstance(cfg, Mapping) and cfg:
            return cfg
    return {}


def check_method(configs: Mapping[str, object]) -> None:
    """Refuse PEFT methods that tune no weight matrix (prompt/prefix tuning, ...)."""
    for adapter, cfg in configs.items():
        ptype = str(getattr(getattr(cfg, "peft_type", None), "value", getattr(cfg, "peft_type", "")))
        if ptype in _NO_WEIGHT_METHODS:
            raise AnchorError(
                f"PEFT method {ptype} (adapter {adapter!r}) trains virtual tokens or prefix states, not the "
                "anchored weights: there is no ΔW to anchor; use LoRA or full fine-tuning with anchors"
            )


def origin_adapters(configs: Mapping[str, object]) -> frozenset[str]:
    """Adapters whose ``init_lora_weights`` rewrote the base weight (see :data:`ORIGIN_INITS`)."""
    out = set()
    for adapter, cfg in configs.items():
        init = getattr(cfg, "init_lora_weights", None)
        if isinstance(init, str) and init.lower().startswith(ORIGIN_INITS):
            out.add(adapter)
    return frozenset(out)
