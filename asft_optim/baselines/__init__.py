"""Baselines sharing the anchors: Safe LoRA, AsFT_Alt's harmful subspace, and ``l2``.

One module per method (:mod:`.safe_lora`, :mod:`.harmful`, :mod:`.l2`), as PEFT keeps one
package per tuner; :mod:`.targeted` holds what the anchor builders share.

* :func:`safe_lora_project` is Safe LoRA (Hsu et al. 2024): post hoc, per LoRA adapter,
  compare ``K·B·A`` with ``B·A`` and replace ``B`` by ``K·B`` on the least aligned layers.
  ``K`` is the operator that *keeps* the safe part of an update, ``K x = x - R x``:
  ``K = C`` for the alignment modes (``safelora``: Safe LoRA's own ``V Vᵀ/‖V‖_F``;
  ``orthogonal``: ``U_k U_kᵀ``) and ``K = I - C`` for ``subspace`` anchors (project the
  harmful directions out).
* :func:`harmful_anchors` is AsFT_Alt (paper §5 "Method Adaptability", Table 8): with no
  base model, the harmful directions of each weight come from harmful data, and the
  ``subspace`` penalty ``λ‖C_harm ΔW‖²`` pushes fine-tuning into their orthogonal complement.
* :func:`l2_anchors`: ``C = 0`` for every targeted weight, so the penalty is ``λ‖ΔW‖²``
  (the ablation the reference code's users ask about).
"""

from __future__ import annotations

from .harmful import HarmfulMethod, harmful_anchors
from .l2 import l2_anchors
from .safe_lora import DEFAULT_THRESHOLD, SafeLoRALayer, kept, lora_cosine, safe_lora_project
from .targeted import targeted_weights

__all__ = [
    "DEFAULT_THRESHOLD",
    "HarmfulMethod",
    "SafeLoRALayer",
    "harmful_anchors",
    "kept",
    "l2_anchors",
    "lora_cosine",
    "safe_lora_project",
    "targeted_weights",
]
