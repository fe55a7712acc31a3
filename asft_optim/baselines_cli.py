"""``asft safe-lora``: Safe LoRA post-hoc projection of a saved PEFT adapter."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "safe-lora",
        help="Safe LoRA: project the least aligned LoRA layers of a saved adapter onto the anchors",
        description="Per LoRA layer, cos(K·B·A, B·A) with K the anchor's kept operator; "
        "B is replaced by K·B where the cosine is at or below --threshold (default 0.5), "
        "or for the --num-layers lowest.",
    )
    parser.add_argument("--model", required=True, help="base model directory the adapter was trained on")
    parser.add_argument("--adapter", required=True, help="saved PEFT LoRA adapter directory")
    parser.add_argument("--anchors", required=True, help="anchor file (asft anchors build)")
    select = parser.add_mutually_exclusive_group()
    select.add_argument("--threshold", type=float, help="project layers with cosine <= THRESHOLD (default: 0.5)")
    select.add_argument("--num-layers", type=int, help="project the NUM_LAYERS layers with the lowest cosine")
    parser.add_argument("--dry-run", action="store_true", help="print the report only; write nothing")
    parser.add_argument("-o", "--output", help="directory for the projected adapter (required unless --dry-run)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .anchors import Anchors
    from .baselines import safe_lora_project
    from .projection import AnchorError

    if not args.dry_run and not args.output:
        print("asft safe-lora: error: -o/--output is required unless --dry-run", file=sys.stderr)
        return 2
    try:
        anchors = Anchors.load(args.anchors)
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, args.adapter)
        report = safe_lora_project(
            model, anchors, threshold=args.threshold, num_layers=args.num_layers, dry_run=args.dry_run
        )
    except (AnchorError, ValueError) as exc:
        print(f"asft safe-lora: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([asdict(r) for r in report], indent=2))
    else:
        width = max(len(r.name) for r in report)
        for r in report:
            mark = "projected" if r.projected else "-"
            print(f"{r.name:<{width}}  {r.adapter}  cos={r.cosine:.4f}  {mark}")
    n = sum(r.projected for r in report)
    verb = "would project" if args.dry_run else "projected"
    print(f"{verb} {n} of {len(report)} LoRA layers", file=sys.stderr)
    if not args.dry_run:
        model.save_pretrained(args.output)
        print(f"wrote the projected adapter to {args.output}", file=sys.stderr)
    return 0
