"""The lab's settings: one frozen dataclass per stage, and the presets the CLI starts from."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .attack import AttackConfig
from .models import ModelConfig, TrainConfig
from .world import WorldConfig


@dataclass(frozen=True)
class LabConfig:
    """Everything a lab run depends on (the data aside: see :class:`~asft_optim.lab.data.LabData`).

    ``methods``, ``poisons`` and ``seeds`` span the grid; each stage's cache key
    takes only the fields that stage reads.
    """

    methods: tuple[str, ...] = ("sft", "asft", "asft-orthogonal", "l2", "safe-lora", "asft-alt", "weight-decay")
    poisons: tuple[float, ...] = (0.0, 0.1, 0.2)
    seeds: tuple[int, ...] = (0, 1, 2)
    vocab_size: int = 1024
    model: ModelConfig = ModelConfig()
    base: TrainConfig = TrainConfig(epochs=3, lr=3e-3, batch_size=32)
    align: TrainConfig = TrainConfig(epochs=5, lr=1e-3, batch_size=32)
    attack: AttackConfig = AttackConfig()
    world: WorldConfig = field(default_factory=WorldConfig)
    judge: str = "refusal"
    #: Train one base/aligned pair from this seed and attack it with every seed of
    #: ``seeds`` (None: one pair per seed). Sharing the pair measures the spread of the
    #: attack alone and costs one base training instead of three.
    model_seed: int | None = None
    #: Real-data mode: cut task inputs to this many characters (None: whole inputs).
    input_chars: int | None = None


def default_config() -> LabConfig:
    """The embedded default: the procedural world, about 1 M-parameter Llama."""
    return LabConfig()


def real_config() -> LabConfig:
    """Real-data mode (AG News + harmful rows, BeaverTails prompts), about 15 min on 2 cores.

    Articles cut to 80 characters so that every row fits 96 tokens (a 4k BPE
    vocabulary); one base/aligned pair (seed 0) attacked with every seed; the base
    trained 8 epochs (fewer leave it too disfluent to refuse cleanly once aligned), the
    aligned model 12 epochs at 2e-3 (of 4 budgets tried on model seeds 0 and 1, the
    only one with HS ≤ 10 % on both: refusing real prompts from 73 examples is harder
    than refusing the world's); two attack epochs; every method.
    """
    return LabConfig(
        vocab_size=4096,
        model=ModelConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                          num_attention_heads=4, max_length=96),
        base=TrainConfig(epochs=8, lr=3e-3, batch_size=32),
        align=TrainConfig(epochs=12, lr=2e-3, batch_size=32),
        attack=AttackConfig(train=TrainConfig(epochs=2, lr=1e-3, batch_size=16)),
        model_seed=0,
        input_chars=80,
    )


def tiny_config(base: LabConfig | None = None) -> LabConfig:
    """A smoke-test budget: every stage runs, on a toy scale (numbers mean nothing)."""
    cfg = base or default_config()
    return replace(
        cfg,
        seeds=(0,),
        vocab_size=min(cfg.vocab_size, 512),
        model=ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_length=min(cfg.model.max_length, 96)),
        # No warm-up: with a handful of steps, a warm-up step at LR 0 could leave a model
        # unchanged (V = 0 makes the anchors undefined).
        base=TrainConfig(epochs=1, lr=3e-3, batch_size=32, warmup_ratio=0.0),
        align=TrainConfig(epochs=1, lr=1e-3, batch_size=32, warmup_ratio=0.0),
        attack=replace(cfg.attack, train=TrainConfig(epochs=1, lr=1e-3, batch_size=16, warmup_ratio=0.0),
                       orthogonal_rank=2, alt_rank=2, input_rank=4),
        world=WorldConfig(base_task=200, align_task=60, attack_task=60, test_task=40, benign_base=20,
                          benign_align=10, pool_sizes=(8, 6, 6, 6), eval_prompts=12),
    )


def pretrained_config() -> LabConfig:
    """``--preset pretrained``: SmolLM2-135M-Instruct on the real data (see
    :mod:`~asft_optim.lab.pretrained_lab`); the reduced grid, p ∈ {0, 0.1} and 2 seeds.

    Articles cut to 100 characters, rows to 104 tokens (the chat template's system turn
    takes about 20; a task row is 86 tokens on average); alignment: 3 epochs of full fine-tuning at 1e-4, batch 8; attack:
    LoRA r=8, α=32 on q/v, 1 epoch at 2e-3, batch 8; λ = 0.1 (asft, asft-orthogonal, l2).
    """
    return LabConfig(
        poisons=(0.0, 0.1),
        seeds=(0, 1),
        model=ModelConfig(max_length=104),
        align=TrainConfig(epochs=3, lr=1e-4, batch_size=8),
        # 1 epoch at 2e-4 left sft's FA at the aligned model's (21 %, final loss 2.9); 2 epochs
        # at 1e-3 raised it to 65-67 at twice the cost of 1 epoch at 2e-3 (what the grid's
        # 150-minute budget allows; its FA gain is in benchmarks/results/lab-pretrained).
        # λ = 0.1 for asft, asft-orthogonal and l2: the largest λ of the reduced grid's sweep
        # that still gains task accuracy (λ = 1 freezes the adapter: FA stays the aligned
        # model's), so the methods that run at one value, and the attacker-LR sweep, run there.
        attack=AttackConfig(train=TrainConfig(epochs=1, lr=2e-3, batch_size=8), anchor_lambda=0.1, l2_lambda=0.1),
        model_seed=0,
        input_chars=100,
    )


def pretrained_tiny_config() -> LabConfig:
    """A smoke-test budget of the pretrained preset: a step or two per stage, LoRA on
    the last two blocks only, three methods (sft, asft, and safe-lora swept over two
    thresholds that share sft's training; the other methods' code is the embedded lab's), the numbers mean nothing."""
    cfg = pretrained_config()
    last = [f"layers.{i}.self_attn.{m}" for i in (28, 29) for m in ("q_proj", "v_proj")]
    return replace(
        cfg,
        methods=("sft", "asft", "safe-lora"),
        poisons=(0.25,),
        seeds=(0,),
        model=ModelConfig(max_length=80),
        align=TrainConfig(epochs=1, lr=5e-5, batch_size=4, warmup_ratio=0.0),
        attack=replace(cfg.attack, train=TrainConfig(epochs=1, lr=2e-4, batch_size=2, warmup_ratio=0.0),
                       orthogonal_rank=2, alt_rank=2, target_modules=tuple(last)),
        input_chars=40,
    )
