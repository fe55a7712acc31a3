"""B4: training-step overhead of AnchoredAdamW over AdamW (forward + backward + step).

One model, several optimizers over the same LoRA parameters (same AdamW settings),
stepped in interleaved rounds: ``adamw``, ``adamw_control`` (a second plain AdamW: the
noise floor), ``anchored`` (exact ``safelora``, coupled),
``anchored_decoupled`` and, on the 4096 model, ``anchored_r256`` (rank-256
``orthogonal``); plus ``penalty_only`` (``_apply_penalty(want_total=False)`` alone,
what ``step()`` adds), ``anchor_penalty`` (the loss-level twin on the same model and
anchors, ``anchor_penalty(model, anchors).backward()``, what a loop using it adds) and
``anchor_penalty_uncached`` (the same with its (model, anchors) binding dropped before
every call: target discovery, shape checks and device copies every time, as before the
cache). Overhead = median over rounds of (variant / adamw) − 1, from the
same rounds; the ratio of medians is recorded too.

Models: the lab model (the lab's LlamaForCausalLM: hidden 128, intermediate 256, 4
layers, 4 heads, vocab 1024; the attack's batch 16 at its max length 96) and a one-block model with Llama-2-7B dimensions (hidden 4096,
intermediate 11008, 32 heads, 1 layer, vocab 2000, seq 64, batch 4); PEFT LoRA r=8,
α=32 on q_proj/v_proj; anchors from random V = W_aligned − W_base.

    PYTHONPATH=. python benchmarks/step_overhead.py
    PYTHONPATH=. python benchmarks/step_overhead.py --profile    # + torch.profiler tables
    PYTHONPATH=. python benchmarks/step_overhead.py --tiny
"""

from __future__ import annotations

import statistics
import sys

import torch
from _common import environment, fmt_s, interleaved, markdown_table, parser, setup, summary, write
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from asft_optim import AnchoredAdamW, Anchors, anchor_penalty
from asft_optim.penalty import clear_cache

MODELS = {
    # The lab's own attack model and batch (asft_optim.lab: ModelConfig(), vocab 1024,
    # LoRA attack batch 16, max length 96).
    "lab (h128, 4 layers)": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                 num_attention_heads=4, vocab_size=1024, batch=16, seq=96, reps=40),
    "one block (h4096)": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                              num_attention_heads=32, vocab_size=2000, batch=4, seq=64, reps=5, rank=256),
}
TINY = {
    "tiny lab": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=100, batch=2, seq=8, reps=3, rank=4),
}
LR = 5e-5
PARTS = ("penalty_only", "anchor_penalty", "anchor_penalty_uncached")


def build(cfg: dict, device):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_attention_heads"], max_position_embeddings=max(128, cfg["seq"]),
    )
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    deltas = {
        n: torch.randn(p.shape, generator=g) * 0.01
        for n, p in model.named_parameters() if n.endswith(("q_proj.weight", "v_proj.weight"))
    }
    # LoRA as the reference trains it (r=8, α=32), B random so that ΔW ≠ 0 from step one.
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, init_lora_weights=False,
                                             target_modules=["q_proj", "v_proj"])).to(device)
    exact = Anchors.from_deltas(deltas, "safelora")
    low = Anchors.from_deltas(deltas, "orthogonal", rank=cfg["rank"]) if cfg.get("rank") else None
    return model, exact, low


def bench_model(name: str, cfg: dict, device, reps: int | None, profile_dir=None) -> dict:
    model, exact, low = build(cfg, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=LR, weight_decay=0.0)
    opts = {
        "adamw": torch.optim.AdamW(trainable, **kw),
        # A/A control: a second plain AdamW. Its "overhead" is the noise floor of the
        # full-iteration comparison on this (shared) machine.
        "adamw_control": torch.optim.AdamW(trainable, **kw),
        "anchored": AnchoredAdamW(model, exact, anchor_lambda=1.0, **kw),
        "anchored_decoupled": AnchoredAdamW(model, exact, anchor_lambda=1.0, coupling="decoupled", **kw),
    }
    if low is not None:
        opts[f"anchored_r{cfg['rank']}"] = AnchoredAdamW(model, low, anchor_lambda=1.0, **kw)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg["vocab_size"], (cfg["batch"], cfg["seq"]), generator=g).to(device)

    def iteration(opt):
        def run():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    probe = opts["anchored"]

    @torch.no_grad()
    def penalty_only():
        probe._apply_penalty(want_total=False)
        probe.zero_grad(set_to_none=True)

    def twin(cached: bool):
        def run():
            if not cached:
                clear_cache()
            anchor_penalty(model, exact, 1.0).backward()
            probe.zero_grad(set_to_none=True)
        return run

    fns = {k: iteration(o) for k, o in opts.items()}
    fns["penalty_only"] = penalty_only
    fns["anchor_penalty"] = twin(True)
    fns["anchor_penalty_uncached"] = twin(False)
    reps = reps or cfg["reps"]
    samples = interleaved(fns, device, reps=reps, warmup=2)
    stats = {k: summary(v) for k, v in samples.items()}
    base = samples["adamw"]
    for k, s in stats.items():
        share = k in PARTS  # a part of a step: its share of an AdamW step, not an overhead
        per_round = [a / b for a, b in zip(samples[k], base)]
        s["overhead_median_of_ratios"] = statistics.median(per_round) - (0 if share else 1)
        s["overhead_ratio_of_medians"] = s["median_s"] / stats["adamw"]["median_s"] - (0 if share else 1)
    # The loss-level twin per call against the optimizer's _apply_penalty (same rounds).
    twin_vs = {}
    for k in ("anchor_penalty", "anchor_penalty_uncached"):
        per_round = [a / b for a, b in zip(samples[k], samples["penalty_only"])]
        twin_vs[k] = {"median_of_ratios": statistics.median(per_round),
                      "ratio_of_medians": stats[k]["median_s"] / stats["penalty_only"]["median_s"]}
    out = {"model": name, "config": cfg, "targets": len(exact), "stats": stats,
           "anchor_penalty_over_penalty_only": twin_vs,
           "lora_params": sum(p.numel() for p in trainable)}
    if profile_dir is not None:
        out["profile"] = profile(model, fns, name, profile_dir)
    return out


def profile(model, fns, name: str, folder) -> dict:
    """torch.profiler of ``anchored`` and ``adamw`` iterations; top ops by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    tables = {}
    for key in ("adamw", "anchored", "penalty_only", "anchor_penalty"):
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                fns[key]()
        tables[key] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    folder.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    path = folder / f"step_overhead_profile_{slug}.txt"
    path.write_text("\n\n".join(f"== {k} (5 iterations) ==\n{t}" for k, t in tables.items()))
    print(f"profile written to {path}", file=sys.stderr)
    return {"file": path.name}


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.split("\n", 1)[0])
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--only", default=None, help="run only the models whose name contains this")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    device = setup(args)
    hf_logging.set_verbosity_error()
    models = TINY if args.tiny else MODELS
    results = []
    for name, cfg in models.items():
        if args.only and args.only not in name:
            continue
        print(f"{name}: {args.reps or cfg['reps']} interleaved rounds", file=sys.stderr)
        results.append(bench_model(name, cfg, device, args.reps, args.out if args.profile else None))
    rows = []
    for r in results:
        for k, s in r["stats"].items():
            ov = s["overhead_median_of_ratios"]
            rows.append([r["model"], k, fmt_s(s["median_s"]), f"{fmt_s(s['p10_s'])} – {fmt_s(s['p90_s'])}", s["n"],
                         "—" if k == "adamw" else f"{100 * ov:+.2f} %",
                         "—" if k == "adamw" else f"{100 * s['overhead_ratio_of_medians']:+.2f} %"])
    table = markdown_table(["model", "variant", "median", "p10 – p90", "n",
                            "overhead (median of per-round ratios)", "overhead (ratio of medians)"], rows)
    table += ("\n\n`penalty_only`: `_apply_penalty(want_total=False)` alone, as a fraction of an AdamW "
              "iteration (`anchor_penalty*`: the loss-level twin with its backward, likewise). "
              "`adamw_control`: a second plain AdamW, i.e. the noise floor of the full-iteration overheads.")
    twin_rows = [[r["model"], k, f"{v['median_of_ratios']:.2f}", f"{v['ratio_of_medians']:.2f}"]
                 for r in results for k, v in r["anchor_penalty_over_penalty_only"].items()]
    table += "\n\nLoss-level twin per call / `_apply_penalty` per call (same rounds):\n\n" + markdown_table(
        ["model", "variant", "median of per-round ratios", "ratio of medians"], twin_rows)
    cmd = "PYTHONPATH=. python benchmarks/step_overhead.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    payload = {"environment": environment(device), "lr": LR, "results": results}
    write(args.out, "step_overhead", payload, table, cmd)
    return payload


if __name__ == "__main__":
    main()
