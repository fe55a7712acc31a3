"""asft-optim: safety-anchored fine-tuning (AsFT) as a drop-in PyTorch optimizer."""

from .anchors import Anchors, build_anchors
from .baselines import SafeLoRALayer, harmful_anchors, l2_anchors, safe_lora_project
from .conversion import convert_reference_lambda, lora_scaling
from .optimizer import AnchoredAdamW, AnchoredOptimizer
from .penalty import anchor_penalty
from .projection import AnchorError, Projection, projection_from_delta
from .schedule import AnchorLambdaScheduler
from .version import __version__ as __version__

# Integrations import transformers: resolved on first use, so `import asft_optim` stays light.
_LAZY = {
    "AnchorLambdaCallback": "asft_optim.integrations.hf",
    "AnchorLoggingCallback": "asft_optim.integrations.hf",
    "AnchoredAdamWFactory": "asft_optim.integrations.hf",
    "add_anchor_logging": "asft_optim.integrations.hf",
    "anchor_summary": "asft_optim.integrations",
    "unwrap_optimizer": "asft_optim.integrations",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AnchorError",
    "AnchorLambdaCallback",
    "AnchorLambdaScheduler",
    "AnchorLoggingCallback",
    "AnchoredAdamWFactory",
    "AnchoredAdamW",
    "AnchoredOptimizer",
    "Anchors",
    "Projection",
    "SafeLoRALayer",
    "add_anchor_logging",
    "anchor_penalty",
    "anchor_summary",
    "build_anchors",
    "convert_reference_lambda",
    "harmful_anchors",
    "l2_anchors",
    "lora_scaling",
    "projection_from_delta",
    "safe_lora_project",
    "unwrap_optimizer",
]
