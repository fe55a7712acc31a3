"""What the anchor builders without a base model share: the targeted weights."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from ..anchors import module_name_matcher
from ..discovery import hf_name
from ..layout import weight_layout
from ..projection import AnchorError
from ..targets import is_tuner

__all__ = ["targeted_weights"]


def targeted_weights(model: nn.Module, target_modules: str | Iterable[str]) -> dict[str, tuple[Tensor, str]]:
    """``{HF weight name: (weight, layout)}`` of the modules matching ``target_modules``.

    PEFT tuners count as the module they wrap (their live base weight); modules inside
    a tuner (``base_layer``, ``lora_A``...) are never matched themselves.
    """
    matches = module_name_matcher(target_modules)
    inside: list[str] = []
    out: dict[str, tuple[Tensor, str]] = {}
    for mod_name, module in model.named_modules():
        if any(mod_name.startswith(p) for p in inside):
            continue
        base = module
        if is_tuner(module):
            inside.append(mod_name + ".")
            base = module.get_base_layer()
        w = getattr(base, "weight", None)
        name = hf_name(mod_name)
        if isinstance(w, Tensor) and w.dim() >= 2 and name and matches(name):
            out.setdefault(name + ".weight", (w, weight_layout(base)))
    if not out:
        raise AnchorError(f"no 2-D weight of the model matches target_modules={target_modules!r}")
    return out
