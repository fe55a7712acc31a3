"""Stage 4, the attack: LoRA fine-tuning of the aligned model, one pluggable method at a time.

A method is an entry of :data:`METHODS`: how its optimizer is built (from the library's
public API only), for post-hoc methods what is done to the trained adapter, and what the
rest of the lab reads of it: the :class:`AttackConfig` fields of its cache key, its own
setting (the field a sweep varies, the values per grid, the command-line option), and
whether it reads the defender's harmful data. A post-hoc method (``safe-lora``) reuses
the adapter another method trained (``trains_as``), so it costs an evaluation, not a
training run. A new method is one entry here; the CLI, the sweeps and the cache follow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from asft_optim import (
    AnchoredAdamW,
    GradientSurgery,
    build_anchors,
    harmful_anchors,
    l2_anchors,
    safe_lora_project,
)
from asft_optim.ema import ParameterEMA
from asft_optim.input_anchors import InputAnchors

from .data import Example, LabData
from .models import TrainConfig, fit, load, model_device
from .operators import (
    OPERATOR_FILE,
    build_input_operator,
    build_refusal_examples,
    build_refusal_operator,
    load_refusal_examples,
    load_safety_subspaces,
)
from .tokenizer import Collator, encode_example


@dataclass(frozen=True)
class AttackConfig:
    """The attacker's fine-tuning: the reference setup (r=8, α=32, q/v, AdamW) scaled to the lab.

    ``anchor_lambda`` is in the library's convention (penalty on ``s·B·A``, once per
    step); the reference code's λ=1 at r=8, α=32 is ``1/16`` here
    (:func:`asft_optim.convert_reference_lambda`).
    """

    r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    train: TrainConfig = TrainConfig(epochs=5, lr=1e-3, batch_size=16)
    anchor_lambda: float = 1.0
    orthogonal_rank: int = 8
    l2_lambda: float = 1.0
    alt_rank: int = 8
    alt_lambda: float = 10.0
    safe_lora_threshold: float = 0.5
    #: ``weight-decay``'s AdamW decoupled weight decay on the LoRA factors (the baseline users
    #: try first). Large on purpose: the decay per step is ``lr · weight_decay``, and an attack
    #: of ~20 steps at lr 2e-3 barely feels 0.1 (0.4 % in all).
    adamw_weight_decay: float = 10.0
    #: ``input`` / ``input-contrast``: λ of ``λ‖ΔW U‖²``, the directions kept per weight, and
    #: the contrast's ridge ε (relative to the task covariance's mean eigenvalue). k = 32 and
    #: ε = 0.1: on SmolLM2's q/v inputs, measured on the validation half of the defender's
    #: prompts (benchmarks/results/operator_geometry.md), the contrast's best ratio of
    #: held-out harmful to task energy at k = 8-32 is at ε = 0.1 (2.4-3.4×); each stage
    #: records the criterion per rank on the aligned model it is built on.
    input_lambda: float = 1.0
    input_rank: int = 32
    input_eps: float = 0.1
    #: ``spf``: the safety subspace's rank (the stage keeps 64 directions; a rank is a prefix).
    spf_rank: int = 8
    #: Defender prompts per half (build / validation) of each data-driven operator, and the
    #: longest greedy answer ``spf`` takes the refusal gradients of (a refusal shows in its
    #: first tokens; the pretrained preset judges 32).
    operator_prompts: int = 32
    refusal_tokens: int = 32
    #: ``ema``: β of the EMA of the LoRA factors, ``θ_ema ← β·θ_ema + (1−β)·θ`` per step
    #: (a window of about 1/(1−β) = 10 steps; the sweep is :data:`EMA_DECAYS`).
    ema_decay: float = 0.9
    #: ``safegrad``: μ (also descend the refusal NLL with weight μ; 0: the projection alone),
    #: refresh the safety gradient every this many steps, on this many refusal examples. Every
    #: step, on a batch as large as the pretrained attack's (8): the attack is 16-20 steps, and
    #: SafeGrad refreshes every step; it costs one more forward and backward per step.
    safegrad_weight: float = 0.0
    safegrad_every: int = 1
    safegrad_batch: int = 8

    def __post_init__(self):
        if not 0.0 <= self.ema_decay < 1.0:  # before a grid starts, not at its ema point
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


#: LoRA on every linear layer of a Llama block (the lab's models), beside the paper's q/v.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AttackContext:
    """What a method's builders may read."""

    model: nn.Module  # the PEFT model being attacked
    base_dir: Path
    aligned_dir: Path
    config: AttackConfig
    data: LabData
    tokenizer: Any
    max_length: int
    answer_logits: bool = False  # train with :func:`~asft_optim.lab.models.answer_loss`
    #: the method's operator stage directory (:class:`Operator`; None for the other methods)
    operator_dir: Path | None = None


#: The pretrained preset's grids (``--grid``): which sweep values a :class:`Setting` gives each.
GRIDS = ("reduced", "full", "fine")

#: λ of the reduced grid's sweeps (from "no effect" to "frozen").
LAMBDAS = (0.001, 0.01, 0.1, 1.0)

#: ``--grid fine``: λ where the fronts turn (0.01 to 0.1 in five steps, the ends already known),
#: and 0.3, where L2's FA falls from about 54 to 29 between 0.1 and 1 (the verdict's FA 40 lay
#: on one straight line across that gap).
FINE_LAMBDAS = (0.001, 0.01, 0.02, 0.035, 0.06, 0.1, 0.3, 1.0)


@dataclass(frozen=True)
class Setting:
    """A method's own knob: the :class:`AttackConfig` field its sweep varies.

    Args:
        field: the :class:`AttackConfig` field (it is also in the method's ``uses``).
        full: the values of ``--grid full``.
        fine: the values of ``--grid fine`` (default: ``full``'s).
        reduced: swept in the reduced grid too (default: False: run at its one configured value).
        option: the ``asft lab`` option that sets the one value (None: no option); methods
            sharing a field share its option.
        help: that option's help.
        penalty: a penalty weight λ, which ``--sweep-values`` replaces (default: False).
    """

    field: str
    full: tuple
    fine: tuple | None = None
    reduced: bool = False
    option: str | None = None
    help: str = ""
    penalty: bool = False

    def values(self, grid: str) -> tuple | None:
        """The sweep's values in ``grid`` (one of :data:`GRIDS`); None where it is not swept."""
        if grid not in GRIDS:
            raise ValueError(f"unknown grid {grid!r}; known: {', '.join(GRIDS)}")
        if grid == "reduced":
            return self.full if self.reduced else None
        return self.fine if grid == "fine" and self.fine is not None else self.full


@dataclass(frozen=True)
class Operator:
    """A data-driven operator a method reads: built once per aligned model, in a cached stage
    of its own (:meth:`~asft_optim.lab.runner.Lab.operator`), then shared by every attack of
    the method (each λ or rank of its sweep, each poison ratio and seed) and by any other
    method with the same operator.

    Args:
        kind: the stage's kind (its cache directory's prefix).
        uses: :class:`AttackConfig` fields of the stage's key beyond ``target_modules``
            (the build's design; never a swept λ, which only the attack reads).
        build: ``(ctx, dir) -> info``: writes the operator into ``dir``; ``ctx.model`` is
            the aligned model (no adapter).
    """

    kind: str
    uses: tuple[str, ...]
    build: Callable[[AttackContext, Path], dict]


@dataclass(frozen=True)
class Method:
    """A fine-tuning method of the lab.

    Args:
        name: the ``--methods`` name.
        optimizer: ``ctx -> (optimizer, info)``; None for post-hoc methods.
        uses: :class:`AttackConfig` fields the method reads beyond the shared ones
            (they enter its cache key, so tuning one method never retrains another).
        trains_as: a post-hoc method's training method.
        post: ``ctx -> info``, applied to the trained adapter before evaluation.
        setting: the method's swept setting (None: nothing to sweep).
        reads_known_harmful: the method reads the defender's harmful rows
            (``LabData.known_harmful``), which then enter its attack's cache key.
        operator: the data-driven operator it reads (:class:`Operator`; default: None); its
            stage's key (the aligned model, the defender's prompts, the design) enters the
            attack's key, and its ``uses`` must be in the method's.
        callbacks: ``ctx -> [TrainerCallback, ...]``, built on ``ctx.model`` before training
            and run with it (default: None); one with a ``summary()`` adds it to the
            training info.
    """

    name: str
    optimizer: Callable[[AttackContext], tuple[torch.optim.Optimizer, dict]] | None = None
    uses: tuple[str, ...] = ()
    trains_as: str | None = None
    post: Callable[[AttackContext], dict] | None = None
    setting: Setting | None = None
    reads_known_harmful: bool = False
    operator: Operator | None = None
    callbacks: Callable[[AttackContext], list] | None = None

    def __post_init__(self):
        if self.setting is not None and self.setting.field not in self.uses:
            raise ValueError(f"method {self.name!r}: its setting {self.setting.field!r} must be in "
                             "its uses (the fields of its cache key)")
        if self.operator is not None and not set(self.operator.uses) <= set(self.uses):
            raise ValueError(f"method {self.name!r}: its operator's design {self.operator.uses} must be in "
                             "its uses (the fields of its cache key)")


def _adamw(ctx: AttackContext) -> torch.optim.Optimizer:
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=ctx.config.train.lr, weight_decay=ctx.config.train.weight_decay)


def _anchored(ctx: AttackContext, anchors, lam: float) -> tuple[torch.optim.Optimizer, dict]:
    opt = AnchoredAdamW(ctx.model, anchors, anchor_lambda=lam, lr=ctx.config.train.lr,
                        weight_decay=ctx.config.train.weight_decay)
    return opt, {"anchors": len(anchors), "anchor_lambda": lam}


def _sft(ctx):
    """Plain LoRA fine-tuning (AdamW)."""
    return _adamw(ctx), {}


def _asft(ctx):
    """AnchoredAdamW, safelora anchors C = VVᵀ/‖V‖_F."""
    anchors = build_anchors(ctx.base_dir, ctx.aligned_dir, target_modules=list(ctx.config.target_modules),
                            mode="safelora", progress=False)
    return _anchored(ctx, anchors, ctx.config.anchor_lambda)


def _asft_orthogonal(ctx):
    """AnchoredAdamW, C = the top-k left singular vectors of V."""
    anchors = build_anchors(ctx.base_dir, ctx.aligned_dir, target_modules=list(ctx.config.target_modules),
                            mode="orthogonal", rank=ctx.config.orthogonal_rank, progress=False)
    return _anchored(ctx, anchors, ctx.config.anchor_lambda)


def _weight_decay(ctx):
    """Plain AdamW with decoupled weight decay on the LoRA factors (the baseline users try first)."""
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    decay = ctx.config.adamw_weight_decay
    return torch.optim.AdamW(params, lr=ctx.config.train.lr, weight_decay=decay), {"weight_decay": decay}


def _ema_callbacks(ctx):
    """``ema``: an EMA of the trainable tensors, ``θ_ema ← β·θ_ema + (1−β)·θ`` after every
    AdamW step from their initial values (the aligned model: B = 0), written into the
    adapter when training ends, so the saved and evaluated adapter is the average
    (Kim et al. 2025, arXiv 2508.12531). For LoRA that is the EMA of the factors A and B:
    ``ΔW_ema = s·B_ema·A_ema``, not the EMA of ``ΔW``, because the factors are the PEFT
    model's only trainable tensors, so an EMA of that model (its ``parameters()``,
    ``AveragedModel``, a Trainer callback) averages them (see :class:`ParameterEMA`)."""
    from asft_optim.integrations.hf import EMACallback

    params = [p for p in ctx.model.parameters() if p.requires_grad]
    return [EMACallback(ParameterEMA(params, ctx.config.ema_decay), copy_at_end=True)]


def _l2(ctx):
    """AnchoredAdamW, C = 0: λ‖ΔW‖²."""
    return _anchored(ctx, l2_anchors(ctx.model, list(ctx.config.target_modules)), ctx.config.l2_lambda)


def _asft_alt(ctx):
    """AnchoredAdamW, harmful-gradient subspace (AsFT_Alt)."""
    # AsFT_Alt: harmful directions from harmful data the defender holds (the base
    # model's compliant pool, disjoint from the attack's and the evaluation's prompts).
    rows = [encode_example(ctx.tokenizer, e, ctx.max_length) for e in ctx.data.known_harmful]
    collate = Collator(ctx.tokenizer.pad_token_id)
    device = model_device(ctx.model)
    batches = [{k: v.to(device) for k, v in collate(rows[i : i + 16]).items()} for i in range(0, len(rows), 16)]
    anchors = harmful_anchors(ctx.model, batches, target_modules=list(ctx.config.target_modules),
                              rank=ctx.config.alt_rank)
    return _anchored(ctx, anchors, ctx.config.alt_lambda)


def _input(ctx):
    """AnchoredAdamW with input-side anchors, ``λ‖ΔW U‖²``: U the top ``input_rank``
    eigenvectors of each LoRA layer's input covariance on the defender's harmful prompts, in
    the aligned model (``input``), or the top generalised eigenvectors of
    ``Σ_h u = μ (Σ_t + εI) u`` against the alignment's task prompts (``input-contrast``);
    see :mod:`~asft_optim.lab.operators`."""
    anchors = InputAnchors.load(ctx.operator_dir / OPERATOR_FILE)
    return _anchored(ctx, anchors, ctx.config.input_lambda)


def _spf(ctx):
    """AnchoredAdamW with ``subspaces=``: the top ``spf_rank`` output directions Q of the
    aligned model's refusal-loss gradients (its own greedy answers to the defender's
    harmful prompts). For LoRA, after every inner AdamW step each adapter's ``B`` is
    projected, ``B ← (I − QQᵀ)B``, and ``A`` is left alone, so ``QᵀΔW = s·(QᵀB)·A = 0``
    exactly (PEFT starts from B = 0): neither gradient is projected (under Adam a
    projected gradient's update would still leave span(Q)^⊥). No penalty: l2 anchors at
    λ = 0 (the optimizer needs anchors; they add nothing)."""
    subspaces = load_safety_subspaces(ctx.operator_dir, ctx.config.spf_rank)
    anchors = l2_anchors(ctx.model, list(ctx.config.target_modules))
    opt = AnchoredAdamW(ctx.model, anchors, anchor_lambda=0.0, lr=ctx.config.train.lr,
                        weight_decay=ctx.config.train.weight_decay, subspaces=subspaces)
    return opt, {"subspaces": len(subspaces), "spf_rank": ctx.config.spf_rank, "anchor_lambda": 0.0}


def _safegrad(ctx, penalty: bool = False):
    """AnchoredAdamW with :class:`~asft_optim.GradientSurgery` (SafeGrad-like): every
    ``safegrad_every`` steps the gradient of the NLL of the aligned model's own greedy
    answers to the defender's harmful prompts (the next ``safegrad_batch`` of the stage's, in
    a fixed order, cycled; see :func:`~asft_optim.lab.operators.build_refusal_examples`); the task gradient of the LoRA factors is projected off it when
    they conflict (``⟨g, s⟩ < 0``, over all factors at once), and ``μ·s`` is added
    (``safegrad_weight``). No penalty: l2 anchors at λ = 0 (``penalty``: at ``l2_lambda``,
    :func:`_safegrad_l2`). With μ > 0 this also trains on
    the aligned model's answers to harmful prompts (a safety-data replay, as SafeGrad's
    alignment loss does), which can raise over-refusal (``benchmarks/over_refusal.py``); the
    Trainer clips the task gradient before ``step()``, so ``μ·s`` is added unclipped."""
    import itertools

    c = ctx.config
    rows = load_refusal_examples(ctx.operator_dir)
    collate = Collator(ctx.tokenizer.pad_token_id)
    device = model_device(ctx.model)
    batches = itertools.cycle([collate(rows[i : i + c.safegrad_batch]) for i in range(0, len(rows), c.safegrad_batch)])
    model = ctx.model

    def safety_loss():
        return model(**{k: v.to(device) for k, v in next(batches).items()}).loss

    surgery = GradientSurgery(safety_loss, every=c.safegrad_every, safety_weight=c.safegrad_weight)
    anchors = l2_anchors(ctx.model, list(c.target_modules))
    lam = c.l2_lambda if penalty else 0.0
    opt = AnchoredAdamW(ctx.model, anchors, anchor_lambda=lam, lr=c.train.lr, weight_decay=c.train.weight_decay,
                        surgery=surgery)
    return opt, {"refusal_examples": len(rows), "safegrad_weight": c.safegrad_weight, "anchors": len(anchors),
                 "anchor_lambda": lam}


def _safegrad_l2(ctx):
    """``safegrad``'s surgery (μ: ``safegrad_weight``) composed with l2's penalty
    λ‖ΔW‖² (``l2_lambda``), in one optimizer: ``surgery=`` and the anchors of the same
    :class:`~asft_optim.AnchoredAdamW`. Why: the surgery alone keeps the attack's FA (it
    removes only the task gradient's conflicting component), so it reaches none of the
    verdict's FA levels below the undefended FA; λ gives it a front across them, read at
    equal FA against l2 alone."""
    return _safegrad(ctx, penalty=True)


def _safe_lora(ctx):
    """Safe LoRA projection of the sft adapter."""
    anchors = build_anchors(ctx.base_dir, ctx.aligned_dir, target_modules=list(ctx.config.target_modules),
                            mode="safelora", progress=False)
    report = safe_lora_project(ctx.model, anchors, threshold=ctx.config.safe_lora_threshold)
    return {"projected": sum(r.projected for r in report), "layers": len(report)}


#: The data-driven operators (one stage per aligned model and design; see :mod:`.operators`).
INPUT = Operator("input-anchors", ("input_rank", "operator_prompts"),
                 lambda ctx, out: build_input_operator(ctx, out, contrast=False))
INPUT_CONTRAST = Operator("input-contrast-anchors", ("input_rank", "input_eps", "operator_prompts"),
                          lambda ctx, out: build_input_operator(ctx, out, contrast=True))
SPF = Operator("refusal-subspace", ("operator_prompts", "refusal_tokens"), build_refusal_operator)
REFUSAL_EXAMPLES = Operator("refusal-examples", ("operator_prompts", "refusal_tokens"), build_refusal_examples)

#: ``safegrad``'s μ: 0 is the projection alone (SafeGrad's surgery without its alignment
#: loss), then the refusal NLL's weight against the task loss's, from a tenth to three times.
SAFEGRAD_WEIGHTS = (0.0, 0.1, 0.3, 1.0, 3.0)

#: ``safegrad-l2``'s λ in ``--grid fine`` / ``decisive``: l2's knee (FA 60 to 50) and its
#: strong end (FA about 30), where the verdict's levels lie; λ → 0 is ``safegrad`` itself.
SAFEGRAD_L2_LAMBDAS = (0.02, 0.06, 0.1, 0.3, 1.0)

#: λ of the input-side sweeps. Why not l2's (0.001-1): the penalty sees only ΔW's part on
#: span(U) (‖ΔW U‖² ≤ ‖ΔW‖²; for an update spread over the inputs about k/d_in of it, 32/576
#: on SmolLM2's q/v), so the same λ bites 1-20× less, and it never freezes the adapter as
#: l2 does: its strong end is where that part is gone. Measured on the embedded lab (seed 0,
#: p = 0.1, k = 32): the share ‖ΔW U‖²/‖ΔW‖² of the trained update is 3.0 % at λ = 1 and
#: 0.4 % at λ = 10-100 (plain), 1.4 %, 0.3 %, 0.1 % at λ = 1, 10, 100 (contrast). So 0.01
#: (no effect, as l2's 0.001) to 10; the contrast form keeps directions of little task
#: energy, which the task's update barely enters, so its sweep goes ten times higher.
INPUT_LAMBDAS = (0.01, 0.1, 1.0, 10.0)
FINE_INPUT_LAMBDAS = (0.01, 0.1, 0.3, 1.0, 3.0, 10.0)
CONTRAST_LAMBDAS = (0.1, 1.0, 10.0, 100.0)
FINE_CONTRAST_LAMBDAS = (0.1, 1.0, 3.0, 10.0, 30.0, 100.0)
#: ``spf``'s ranks (each a prefix of the one stage's 64 directions).
SPF_RANKS = (4, 8, 16, 32, 64)
#: ``ema``'s β. The pretrained preset's attack is 1 epoch of 128 task rows (+ round(p·128)
#: harmful) at batch 8: 16-20 optimizer steps (18 at p = 0.1). β's window, about 1/(1−β)
#: steps, goes from 2 (0.5: the EMA is the trained adapter, sft) to 50 (0.98: longer than
#: the attack); the start (the aligned model) still weighs β^T after T steps: at T = 18,
#: 0.5^18 ≈ 0, 0.8^18 = 0.02, 0.9^18 = 0.15, 0.95^18 = 0.40, 0.98^18 = 0.69, so the sweep
#: goes from "no effect" to "mostly the aligned model", as the λ sweeps do.
EMA_DECAYS = (0.5, 0.8, 0.9, 0.95, 0.98)

_INPUT_LAMBDA = {"field": "input_lambda", "option": "--input-lambda", "penalty": True,
                 "help": "λ of input / input-contrast (library convention)"}

_LAMBDA = {"field": "anchor_lambda", "option": "--lambda", "penalty": True,
           "help": "anchor_lambda of asft / asft-orthogonal (library convention)"}

#: The lab's methods. Why the sweeps: sft's ΔW has ‖ΔW‖_F ≈ 0.9 per layer on 60 layers, so
#: the penalty is about 50·λ against a task loss of 0.3 (at λ = 1 asft already kept FA at 28,
#: aligned 21); the reduced grid sweeps asft and l2 only, ``--grid fine`` refines λ of l2
#: and asft-orthogonal where their fronts turn.
METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("sft", _sft),
        Method("asft", _asft, ("anchor_lambda",),
               setting=Setting(full=LAMBDAS, reduced=True, **_LAMBDA)),
        Method("asft-orthogonal", _asft_orthogonal, ("anchor_lambda", "orthogonal_rank"),
               setting=Setting(full=LAMBDAS, fine=FINE_LAMBDAS, **_LAMBDA)),
        Method("l2", _l2, ("l2_lambda",),
               setting=Setting("l2_lambda", LAMBDAS, fine=FINE_LAMBDAS, reduced=True,
                               option="--l2-lambda", help="λ of the l2 ablation", penalty=True)),
        Method("asft-alt", _asft_alt, ("alt_rank", "alt_lambda"), reads_known_harmful=True,
               setting=Setting("alt_lambda", (1.0, 10.0, 100.0, 1000.0), option="--alt-lambda",
                               help="λ of asft-alt", penalty=True)),
        Method("safe-lora", None, ("safe_lora_threshold",), trains_as="sft", post=_safe_lora,
               setting=Setting("safe_lora_threshold", (0.2, 0.35, 0.5, 0.65))),
        Method("weight-decay", _weight_decay, ("adamw_weight_decay",),
               setting=Setting("adamw_weight_decay", (1.0, 10.0, 30.0, 100.0, 300.0))),
        Method("input", _input, ("input_lambda",) + INPUT.uses, operator=INPUT,
               setting=Setting(full=INPUT_LAMBDAS, fine=FINE_INPUT_LAMBDAS, **_INPUT_LAMBDA)),
        Method("input-contrast", _input, ("input_lambda",) + INPUT_CONTRAST.uses, operator=INPUT_CONTRAST,
               setting=Setting(full=CONTRAST_LAMBDAS, fine=FINE_CONTRAST_LAMBDAS, **_INPUT_LAMBDA)),
        Method("spf", _spf, ("spf_rank",) + SPF.uses, operator=SPF,
               setting=Setting("spf_rank", SPF_RANKS)),
        Method("ema", _sft, ("ema_decay",), callbacks=_ema_callbacks,
               setting=Setting("ema_decay", EMA_DECAYS, option="--ema-decay",
                               help="β of ema: the EMA of the LoRA factors (θ_ema ← β·θ_ema + (1−β)·θ per step)")),
        Method("safegrad", _safegrad, ("safegrad_weight", "safegrad_every", "safegrad_batch") + REFUSAL_EXAMPLES.uses,
               operator=REFUSAL_EXAMPLES,
               setting=Setting("safegrad_weight", SAFEGRAD_WEIGHTS, option="--safegrad-weight",
                               help="μ of safegrad: the refusal NLL's weight beside the surgery (0: projection only)")),
        Method("safegrad-l2", _safegrad_l2,
               ("l2_lambda", "safegrad_weight", "safegrad_every", "safegrad_batch") + REFUSAL_EXAMPLES.uses,
               operator=REFUSAL_EXAMPLES,
               setting=Setting("l2_lambda", LAMBDAS, fine=SAFEGRAD_L2_LAMBDAS, option="--l2-lambda",
                               help="λ of the l2 ablation", penalty=True)),
    ]
}


def swept_methods() -> list[Method]:
    """The methods with a setting to sweep, in :data:`METHODS`' order."""
    return [m for m in METHODS.values() if m.setting is not None]


def setting_options() -> dict[str, Setting]:
    """The ``asft lab`` option of each setting that has one (``"--lambda"``: asft's λ), in
    :data:`METHODS`' order; methods sharing a field share one option."""
    out: dict[str, Setting] = {}
    for m in swept_methods():
        s = m.setting
        if s.option is not None and s.option not in out:
            out[s.option] = s
    return out


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}") from None


def lora_model(aligned_dir: Path, config: AttackConfig, device: str | torch.device = "cpu") -> nn.Module:
    """The aligned model on ``device`` with fresh LoRA adapters on the target modules."""
    lora = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(load(aligned_dir, device), lora)


def train_attack(ctx: AttackContext, method: Method, examples: list[Example], seed: int,
                 progress: bool = False) -> dict[str, Any]:
    """Fine-tune ``ctx.model`` in place with ``method``'s optimizer; returns training info."""
    optimizer, info = method.optimizer(ctx)
    stats: dict[str, Any] = {}
    own = method.callbacks(ctx) if method.callbacks is not None else []
    callbacks = list(own)
    if hasattr(optimizer, "anchor_summary"):
        from transformers import TrainerCallback

        class _Summary(TrainerCallback):  # keeps the last step's diagnostics
            def on_step_end(self, args, state, control, **kw):
                stats.update(optimizer.anchor_summary())

        callbacks.append(_Summary())
    losses = fit(ctx.model, ctx.tokenizer, examples, ctx.config.train, seed, ctx.max_length,
                 optimizers=(optimizer, None), progress=progress, callbacks=callbacks,
                 answer_logits=ctx.answer_logits)
    for cb in own:
        if hasattr(cb, "summary"):
            stats.update(cb.summary())
    return {**info, **stats, "final_loss": losses[-1] if losses else None}


def load_attacked(aligned_dir: Path, adapter_dir: Path, device: str | torch.device = "cpu") -> PeftModel:
    """The aligned model with a trained adapter from disk (for post-hoc methods and evaluation)."""
    return PeftModel.from_pretrained(load(aligned_dir, device), adapter_dir, is_trainable=False)
