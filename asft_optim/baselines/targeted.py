"""What the anchor builders without a base model share: the targeted weights."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import Tensor, nn

from ..anchors import module_name_matcher
from ..discovery import hf_name
from ..layout import weight_layout
from ..projection import AnchorError
from ..targets import is_tuner

__all__ = ["targeted_modules", "targeted_weights"]


def targeted_modules(model: nn.Module, target_modules: str | Iterable[str]) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """``(HF weight name, module, layer holding the weight)`` of every module matching
    ``target_modules`` whose weight is at least 2-D, each name once.

    PEFT tuners count as the module they wrap (their live base weight is the layer's);
    modules inside a tuner (``base_layer``, ``lora_A``...) are never matched themselves.
    """
    matches = module_name_matcher(target_modules)
    inside: list[str] = []
    seen: set[str] = set()
    for mod_name, module in model.named_modules():
        if any(mod_name.startswith(p) for p in inside):
            continue
        base = module
        if is_tuner(module):
            inside.append(mod_name + ".")
            base = module.get_base_layer()
        w = getattr(base, "weight", None)
        name = hf_name(mod_name)
        if isinstance(w, Tensor) and w.dim() >= 2 and name and matches(name) and name not in seen:
            seen.add(name)
            yield name + ".weight", module, base


def targeted_weights(model: nn.Module, target_modules: str | Iterable[str]) -> dict[str, tuple[Tensor, str]]:
    """``{HF weight name: (weight, layout)}`` of the modules matching ``target_modules``
    (see :func:`targeted_modules`)."""
    out = {name: (base.weight, weight_layout(base)) for name, _, base in targeted_modules(model, target_modules)}
    if not out:
        raise AnchorError(f"no 2-D weight of the model matches target_modules={target_modules!r}")
    return out
