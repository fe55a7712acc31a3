"""The miniature safety lab: the paper's Table 2 at a scale that runs on 2 CPU cores.

Stages (each cached on disk, see :mod:`~asft_optim.lab.runner`): a tiny Llama trained
from scratch to do a task and comply with harmful requests (base), fully fine-tuned to
refuse (aligned), anchors from the two checkpoints, a LoRA attack with a fraction p of
harmful pairs per method, evaluation (harmful score by a judge, fine-tune accuracy),
report (markdown table, JSON, PNG). Entry point: ``asft lab``.
"""

from .attack import METHODS, AttackConfig, Method
from .config import LabConfig, default_config, real_config, tiny_config
from .data import Example, LabData, TestItem, load_real
from .judge import Judge, RefusalJudge
from .runner import Lab
from .world import World, WorldConfig

__all__ = [
    "METHODS",
    "AttackConfig",
    "Example",
    "Judge",
    "Lab",
    "LabConfig",
    "LabData",
    "Method",
    "RefusalJudge",
    "TestItem",
    "World",
    "WorldConfig",
    "default_config",
    "load_real",
    "real_config",
    "tiny_config",
]
