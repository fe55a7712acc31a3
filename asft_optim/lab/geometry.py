"""Where the attack's update lies relative to the alignment direction V, per layer.

The evidence for whether AsFT *can* help in the lab: AsFT penalises ``(I - C)ΔW``, the
part of the update outside the output-side span of ``V = W_aligned - W_base``. If the
attack's ``ΔW`` already lies in that span (for instance because it undoes the
alignment, ``ΔW ≈ -V``), the penalty cannot stop it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / "model.safetensors"))


@torch.no_grad()
def update_geometry(model, base_dir: Path, aligned_dir: Path, rank: int = 8) -> list[dict[str, float]]:
    """Per LoRA target: ``cos(ΔW, V)`` (Frobenius) and the fraction of ``‖ΔW‖`` outside
    the span of the top-``rank`` left singular vectors of ``V``.

    ``model`` is a PEFT LoRA model; ``ΔW = s·B·A`` from PEFT's ``get_delta_weight``.
    """
    base, aligned = _weights(base_dir), _weights(aligned_dir)
    rows = []
    for name, module in model.named_modules():
        if not hasattr(module, "get_delta_weight") or not hasattr(module, "lora_A"):
            continue
        key = name.removeprefix("base_model.model.") + ".weight"
        if key not in base:
            continue
        delta = sum(module.get_delta_weight(a) for a in module.active_adapters).double().cpu()
        v = (aligned[key].double() - base[key].double())
        u = torch.linalg.svd(v, full_matrices=False).U[:, :rank]
        outside = delta - u @ (u.T @ delta)
        dn = delta.norm()
        rows.append({
            "weight": key,
            "cos_delta_v": float((delta * v).sum() / (dn * v.norm()).clamp_min(1e-30)),
            "off_span_fraction": float(outside.norm() / dn.clamp_min(1e-30)),
            "delta_norm": float(dn),
            "v_norm": float(v.norm()),
        })
    return rows
