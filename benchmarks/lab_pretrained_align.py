"""How the pretrained preset's alignment was chosen: aligned HS, FA and over-refusal per setting.

Builds the aligned stage of ``asft lab --preset pretrained`` with some of its settings
changed and prints one JSON line: HS on the first 100 BeaverTails prompts, FA on 100 AG
News rows, over-refusal on the held-out benign prompts, the rows and the build time. The
stage goes into ``OUT/cache`` under its own key like any lab stage; give the lab's cache
(``--out`` of the grid) and the preset's defaults are the grid's own aligned stage.

Usage::

    python benchmarks/lab_pretrained_align.py --out runs/v2 [--epochs 3] [--lr 1e-4]
        [--harmful-chat 64] [--chat-replay 88] [--data ../shared/data/asft]

About 10 minutes on 2 cores per aligned stage (plus 75 s for the base the first time).
The table in ``benchmarks/results/lab-pretrained/COMMAND.md`` ran it with the v1 settings
(``--harmful-chat 0 --chat-replay 32``), with ``--epochs 5`` and ``--lr 2e-4`` on them, with
``--chat-replay 32`` and with the defaults.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the lab directory (its cache/ is shared)")
    ap.add_argument("--data", default="../shared/data/asft")
    ap.add_argument("--epochs", type=float, help="alignment epochs (default: the preset's)")
    ap.add_argument("--lr", type=float, help="alignment learning rate (default: the preset's)")
    ap.add_argument("--harmful-chat", type=int, help="chat-style harmful prompts refused (default: all)")
    ap.add_argument("--chat-replay", type=int, help="benign chat prompts replayed (default: all)")
    ap.add_argument("--tiny", action="store_true", help="the smoke-test budget")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    from asft_optim.lab import cli
    from asft_optim.lab.pretrained_lab import PretrainedLab

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    args = parse(argv)
    p = argparse.ArgumentParser()
    cli.add_parser(p.add_subparsers())
    lab_args = p.parse_args(["lab", "--preset", "pretrained", "--data", args.data, "--no-progress"]
                            + (["--tiny"] if args.tiny else []))
    cfg = cli._config(lab_args)
    align = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr)) if v is not None}
    cfg = replace(cfg, align=replace(cfg.align, **align))
    pools = {k: v for k, v in (("harmful_chat", args.harmful_chat), ("chat_replay", args.chat_replay)) if v is not None}
    settings = replace(cli._settings(lab_args), **pools)
    data = cli._data(lab_args, cfg, settings)
    lab = PretrainedLab(cfg, data, args.out, settings, progress=False)
    start = time.perf_counter()
    _, info = lab.aligned(0)
    judged = lab.judged("aligned", 0)
    print(json.dumps({"epochs": cfg.align.epochs, "lr": cfg.align.lr, **pools,
                      "hs": judged["eval"]["harmful_score"], "fa": judged["eval"]["finetune_accuracy"],
                      "over_refusal": judged.get("over_refusal"), "rows": info.get("rows"),
                      "build_seconds": round(info.get("seconds", 0) + judged.get("seconds", 0), 1),
                      "wall_seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
