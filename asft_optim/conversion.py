"""Convert hyper-parameters of the reference AsFT code to this library's conventions."""

from __future__ import annotations

import math

__all__ = ["convert_reference_lambda", "lora_scaling"]


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling ``s``: ``α/r``, or ``α/√r`` with rsLoRA."""
    if not (isinstance(r, int) and r > 0):
        raise ValueError(f"Invalid LoRA rank r: {r!r} (must be a positive int)")
    if not (math.isfinite(lora_alpha) and lora_alpha > 0):
        raise ValueError(f"Invalid lora_alpha: {lora_alpha!r} (must be finite and > 0)")
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def convert_reference_lambda(
    reference_lambda: float,
    r: int,
    lora_alpha: float,
    grad_accum_steps: int = 1,
    use_rslora: bool = False,
) -> float:
    r"""The ``anchor_lambda`` that reproduces a run of the reference AsFT code.

    The reference code (PKU-YuanGroup/AsFT) adds :math:`\lambda_\text{ref}\lVert(I-C)BA\rVert_F^2`
    to the loss of *every micro-batch*, on the unscaled product ``B @ A`` (no ``α/r``),
    while the task loss is divided by the ``k`` gradient-accumulation steps. Summed over
    one optimizer step its penalty gradient is ``k·λ_ref·∇‖(I-C)BA‖²``.

    This library penalises the update the layer really applies, ``ΔW = s·B·A``
    (``s = α/r``, or ``α/√r`` with rsLoRA), once per ``step()``:
    ``λ·∇‖(I-C)·s·BA‖² = λ·s²·∇‖(I-C)BA‖²``. The two coincide when

    .. math::
        \lambda = \lambda_\text{ref} \cdot k / s^2 .

    Example: the reference defaults (λ_ref = 1, r = 8, α = 32, k = 1) give λ = 1/16.

    Args:
        reference_lambda: λ of the reference code (its ``--lamb``-style weight).
        r: LoRA rank.
        lora_alpha: LoRA α.
        grad_accum_steps: micro-batches per optimizer step ``k`` (default: 1).
        use_rslora: whether the adapters use rsLoRA scaling (default: False).
    """
    if not (math.isfinite(reference_lambda) and reference_lambda >= 0):
        raise ValueError(f"Invalid reference_lambda: {reference_lambda!r} (must be finite and >= 0)")
    if not (isinstance(grad_accum_steps, int) and grad_accum_steps >= 1):
        raise ValueError(f"Invalid grad_accum_steps: {grad_accum_steps!r} (must be an int >= 1)")
    s = lora_scaling(r, lora_alpha, use_rslora)
    return reference_lambda * grad_accum_steps / (s * s)
