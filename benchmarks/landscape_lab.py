"""Table 1, Figure 1 and Table 7 of AsFT, repeated on the miniature safety lab.

Uses the lab's seed-0 base and aligned models (cached stages of ``asft lab``, trained if
absent) and LoRA updates of the aligned model (r=8, α=32, q_proj/v_proj, the lab's
attack settings):

* ``harm-N``: N purely harmful (compliant) rows from the lab's attack pool;
* ``benign-N``: N rows of the benign task;
* ``sft-p0.1``: the lab's own attack set (task + 10% harmful), as in ``asft lab``.

Then, through ``asft landscape`` (the command each step prints):

1. ``table1/``: cosines of d_aligned with every update and with random directions,
   plus the off-anchor fraction under rank-8 orthogonal anchors;
2. ``landscape/``: 1-D landscapes and EPL along d_aligned, harm, benign and random
   directions (layer-normalised), and the 2-D landscape d_aligned × harm;
3. ``zoom/``: the same 1-D landscapes on [-0.2, 0.2] (step 0.02), to resolve the EPLs
   that are below the first step of the main grid;
4. ``interpolation/``: the raw d_aligned over every tensor (no normalisation), where
   α = -1 is the base model: a check of the harness (HS there must be the base model's).

Usage: ``python benchmarks/landscape_lab.py [--out benchmarks/results/landscape]``.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path


def _train_adapter(lab, label: str, examples, base_dir: Path, aligned_dir: Path, root: Path) -> Path:
    """A LoRA adapter of the aligned model trained with plain AdamW (the lab's ``sft``), cached."""
    from asft_optim.lab.attack import AttackContext, get_method, lora_model, train_attack
    from asft_optim.lab.models import seed_everything

    out = root / label
    if (out / "done.json").exists():
        return out / "adapter"
    tok, _ = lab.tokenizer()
    seed_everything(0)
    model = lora_model(aligned_dir, lab.config.attack)
    ctx = AttackContext(model, base_dir, aligned_dir, lab.config.attack, lab.data, tok, lab.config.model.max_length)
    info = train_attack(ctx, get_method("sft"), list(examples), 0)
    model.save_pretrained(out / "adapter")
    (out / "done.json").write_text(json.dumps({"rows": len(examples), **info}, default=str, indent=1))
    return out / "adapter"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/landscape"))
    parser.add_argument("--lab-out", type=Path, default=Path("lab-runs/default"),
                        help="the lab's output/cache directory (default: lab-runs/default, as asft lab)")
    parser.add_argument("--sizes", default="10,50,90", help="harmful/benign sample counts (default: 10,50,90)")
    parser.add_argument("--grid", default="-1:1:21")
    parser.add_argument("--grid-2d", default="-1:1:11")
    parser.add_argument("--random", type=int, default=5, help="random directions for the cosine table (default: 5)")
    args = parser.parse_args(argv)

    from asft_optim import build_anchors
    from asft_optim.cli import main as asft
    from asft_optim.lab import Lab, default_config
    from asft_optim.lab.world import World

    start = time.perf_counter()
    cfg = replace(default_config(), seeds=(0,))
    lab = Lab(cfg, World(cfg.world).data(), args.lab_out, progress=False)
    base_dir, _ = lab.base(0)
    aligned_dir, _ = lab.aligned(0)
    attack_dir, _ = lab.attack("sft", 0.1, 0)
    sizes = [int(n) for n in args.sizes.split(",")]
    harmful, task = lab.data.attack_harmful, lab.data.attack_task
    if max(sizes) > len(harmful):
        raise SystemExit(f"--sizes: the lab's attack pool has {len(harmful)} harmful rows")
    root = args.lab_out / "landscape-adapters"
    adapters = {}
    for n in sizes:
        adapters[f"harm-{n}"] = _train_adapter(lab, f"harm-{n}", random.Random(n).sample(harmful, n), base_dir, aligned_dir, root)
        adapters[f"benign-{n}"] = _train_adapter(lab, f"benign-{n}", task[:n], base_dir, aligned_dir, root)
    adapters["sft-p0.1"] = attack_dir / "adapter"
    anchors_file = args.lab_out / "landscape-adapters" / "qv-orthogonal-r8.anchors.safetensors"
    build_anchors(base_dir, aligned_dir, ["q_proj", "v_proj"], mode="orthogonal", rank=8).save(anchors_file)

    common = ["landscape", "--base", str(base_dir), "--aligned", str(aligned_dir), "--no-progress"]
    big = max(sizes)
    runs = {
        "table1": common + [a for k, v in adapters.items() for a in ("--adapter", f"{k}={v}")]
        + ["--random", str(args.random), "--anchors", str(anchors_file), "--skip-landscapes",
           "-o", str(args.out / "table1")],
        "landscape": common + ["--adapter", f"harm-{big}={adapters[f'harm-{big}']}",
                               "--adapter", f"benign-{big}={adapters[f'benign-{big}']}",
                               "--adapter", f"sft-p0.1={adapters['sft-p0.1']}",
                               "--random", "2", f"--grid={args.grid}", "--2d", f"--grid-2d={args.grid_2d}",
                               "-o", str(args.out / "landscape")],
        "zoom": common + ["--adapter", f"harm-{big}={adapters[f'harm-{big}']}",
                          "--adapter", f"benign-{big}={adapters[f'benign-{big}']}",
                          "--adapter", f"sft-p0.1={adapters['sft-p0.1']}",
                          "--random", "2", "--grid=-0.2:0.2:21", "-o", str(args.out / "zoom")],
        "interpolation": common + ["--targets", "all", "--include-1d", "--random", "0", "--normalize", "none",
                                   "--grid=-1:1:11", "-o", str(args.out / "interpolation")],
    }
    commands = {}
    for name, argv_ in runs.items():
        t0 = time.perf_counter()
        print(f"\n## {name}\nasft {shlex.join(argv_)}", flush=True)
        rc = asft(argv_)
        if rc:
            return rc
        commands[name] = {"argv": ["asft", *argv_], "seconds": round(time.perf_counter() - t0, 1)}
    (args.out / "commands.json").write_text(json.dumps(
        {"benchmark": shlex.join(["python", "benchmarks/landscape_lab.py", *(argv if argv is not None else sys.argv[1:])]),
         "runs": commands, "total_seconds": round(time.perf_counter() - start, 1)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
