"""asft-optim: safety-anchored fine-tuning (AsFT) as a drop-in PyTorch optimizer."""

from .anchors import Anchors, build_anchors
from .baselines import SafeLoRALayer, harmful_anchors, l2_anchors, safe_lora_project
from .conversion import convert_reference_lambda, lora_scaling
from .optimizer import AnchoredAdamW, AnchoredOptimizer
from .penalty import anchor_penalty
from .projection import AnchorError, Projection, projection_from_delta

__version__ = "0.1.0"

__all__ = [
    "AnchorError",
    "AnchoredAdamW",
    "AnchoredOptimizer",
    "Anchors",
    "Projection",
    "SafeLoRALayer",
    "anchor_penalty",
    "build_anchors",
    "convert_reference_lambda",
    "harmful_anchors",
    "l2_anchors",
    "lora_scaling",
    "projection_from_delta",
    "safe_lora_project",
]
