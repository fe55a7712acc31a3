"""Check that anchors fit a model before training starts (see :meth:`Anchors.bind`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from .projection import AnchorError
from .targets import find_targets, hf_name, is_tuner

if TYPE_CHECKING:  # annotation only: anchors.py imports this module
    from .anchors import Anchors

__all__ = ["BindingReport", "bind", "tuned_weights"]


@dataclass
class BindingReport:
    """Result of :meth:`Anchors.bind`: anchored weights found and tuned weights left unanchored."""

    found: list[str]
    unanchored: list[str]


def bind(anchors: Anchors, model: nn.Module, *, warn: bool = True) -> BindingReport:
    """See :meth:`Anchors.bind`."""
    targets, missing = find_targets(model, anchors)
    problems = [f"{n}: no such weight in the model" for n in missing]
    for t in targets:
        w = t.base_weight()
        expected = anchors.weights[t.name].out_in_shape
        got = t.out_in_shape()
        if len(got) != 2 or got[0] != expected[0] or (expected[1] >= 0 and got[1] != expected[1]):
            problems.append(
                f"{t.name}: anchored as (out, in) = {expected}, the model's weight is "
                f"{tuple(w.shape)} ({t.layout}) = {got}"
            )
    if problems:
        raise AnchorError(
            f"anchors do not fit the model ({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
        )
    unanchored = [n for n in tuned_weights(model) if n not in anchors]
    if unanchored and warn:
        warnings.warn(
            f"{len(unanchored)} tuned 2-D weight(s) carry no anchor and will not be penalised: "
            f"{unanchored[:10]}{' ...' if len(unanchored) > 10 else ''}",
            stacklevel=3,
        )
    return BindingReport(found=[t.name for t in targets], unanchored=unanchored)


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
