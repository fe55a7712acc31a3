"""asft-optim: safety-anchored fine-tuning (AsFT) as a drop-in PyTorch optimizer.

The public API comes in layers: the core (anchors, the optimizer, the loss-level penalty,
the operator, the λ schedule) is imported here; the rest lives in its own package,
``asft_optim.baselines``, ``asft_optim.integrations`` and ``asft_optim.lab``, whose
best-known names are also reachable from here, resolved on first use.
"""

from .anchors import Anchors, build_anchors
from .conversion import convert_reference_lambda, lora_scaling
from .ema import ParameterEMA
from .input_anchors import InputAnchors
from .input_projection import InputProjection, SumOperator
from .optimizer import AnchoredAdamW, AnchoredOptimizer
from .penalty import AnchorPenalty, anchor_penalty
from .projection import AnchorError, Projection, projection_from_delta
from .safety_subspace import SafetySubspace
from .schedule import AnchorLambdaScheduler
from .surgery import GradientSurgery
from .version import __version__ as __version__

# Resolved on first use: the integrations import transformers, and the baselines are
# their own layer (``asft_optim.baselines``), so `import asft_optim` loads the core only.
_LAZY = {
    "SafeLoRALayer": "asft_optim.baselines",
    "SafetySubspaces": "asft_optim.refusal_gradients",
    "build_input_anchors": "asft_optim.activation_anchors",
    "greedy_refusals": "asft_optim.refusal_gradients",
    "refusal_subspaces": "asft_optim.refusal_gradients",
    "harmful_anchors": "asft_optim.baselines",
    "l2_anchors": "asft_optim.baselines",
    "safe_lora_project": "asft_optim.baselines",
    "AnchorLambdaCallback": "asft_optim.integrations.hf",
    "AnchorLoggingCallback": "asft_optim.integrations.hf",
    "AnchoredAdamWFactory": "asft_optim.integrations.hf",
    "EMACallback": "asft_optim.integrations.hf",
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
    "AnchorPenalty",
    "AnchoredAdamWFactory",
    "AnchoredAdamW",
    "AnchoredOptimizer",
    "Anchors",
    "EMACallback",
    "GradientSurgery",
    "InputAnchors",
    "InputProjection",
    "ParameterEMA",
    "Projection",
    "SafeLoRALayer",
    "SafetySubspace",
    "SafetySubspaces",
    "SumOperator",
    "add_anchor_logging",
    "anchor_penalty",
    "anchor_summary",
    "build_anchors",
    "build_input_anchors",
    "convert_reference_lambda",
    "greedy_refusals",
    "harmful_anchors",
    "l2_anchors",
    "lora_scaling",
    "projection_from_delta",
    "refusal_subspaces",
    "safe_lora_project",
    "unwrap_optimizer",
]
