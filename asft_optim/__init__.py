"""asft-optim: safety-anchored fine-tuning (AsFT) as a drop-in PyTorch optimizer."""

from .anchors import Anchors, build_anchors
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
    "anchor_penalty",
    "build_anchors",
    "convert_reference_lambda",
    "lora_scaling",
    "projection_from_delta",
]
