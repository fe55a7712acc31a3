"""How the real-data lab's alignment budget was chosen: aligned HS/FA per budget and model seed.

Trains the real-data preset's base model for each model seed, then the aligned model under
each (epochs, LR) budget, and prints HS/FA of both (refusal judge on the 250 BeaverTails
prompts, exact label on the 1000 AG News test rows). Stages are cached in ``--out`` like
``asft lab``'s, so a rerun only prints.

Usage::

    python benchmarks/lab_align_budget.py [--data ../shared/data/asft] [--out lab-runs/align-budget]
        [--model-seeds 0,1] [--budgets 8:2e-3,12:2e-3,8:3e-3,16:1e-3]

About 8 minutes on 2 cores for the defaults (two base models, eight aligned ones).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    from asft_optim.lab.config import real_config
    from asft_optim.lab.data import REAL_FILES, load_real, parse_labels
    from asft_optim.lab.runner import Lab

    hf_logging.disable_progress_bar()

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/asft"))
    ap.add_argument("--out", type=Path, default=Path("lab-runs/align-budget"))
    ap.add_argument("--model-seeds", default="0,1")
    ap.add_argument("--budgets", default="8:2e-3,12:2e-3,8:3e-3,16:1e-3", help="epochs:lr, comma separated")
    ap.add_argument("--test-limit", type=int, help="evaluate on the first N test rows (smoke tests)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (smoke test; numbers mean nothing)")
    args = ap.parse_args(argv)

    cfg = real_config()
    if args.tiny:
        from asft_optim.lab.config import tiny_config

        cfg = tiny_config(cfg)
    budgets = [(float(e), float(lr)) for e, lr in (b.split(":") for b in args.budgets.split(","))]
    d = args.data
    data = load_real(**{key: str(d / name) for key, name in REAL_FILES.items()}, poisons=cfg.poisons,
                     labels=parse_labels(None), input_chars=cfg.input_chars, test_limit=args.test_limit)
    rows = []
    print("| model seed | align epochs | align LR | base HS | base FA | aligned HS | aligned FA |")
    print("|---|---|---|---|---|---|---|")
    for ms in (int(s) for s in args.model_seeds.split(",")):
        for epochs, lr in budgets:
            c = replace(cfg, model_seed=ms, align=replace(cfg.align, epochs=epochs, lr=lr))
            lab = Lab(c, data, args.out, progress=False)
            base = lab.base(ms)[1]["eval"]
            aligned = lab.aligned(ms)[1]["eval"]
            row = {"model_seed": ms, "align_epochs": epochs, "align_lr": lr,
                   "base_hs": base["harmful_score"], "base_fa": base["finetune_accuracy"],
                   "aligned_hs": aligned["harmful_score"], "aligned_fa": aligned["finetune_accuracy"]}
            rows.append(row)
            print(f"| {ms} | {epochs:g} | {lr:g} | {row['base_hs']:.1f} | {row['base_fa']:.1f} "
                  f"| {row['aligned_hs']:.1f} | {row['aligned_fa']:.1f} |", flush=True)
    (args.out / "align_budget.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
