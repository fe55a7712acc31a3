"""Over-refusal of attacked models: does a defence buy its low harmful score by refusing everything?

The refusal judge counts a refusal as safe, and the pretrained lab measures over-refusal (the
share of held-out everyday requests refused, :data:`~asft_optim.lab.prompts.BENIGN_EVAL_PROMPTS`)
for the base and aligned models only, because an attack on task data only lowers it. A method
that trains on refusals (``safegrad`` with ``safegrad_weight > 0``) can raise it, so its points
need the check. This script runs it on attacks already in a lab cache (it builds nothing):
the same prompts, generation length and judge as the aligned model's check.

Usage (from the repository root; the options after ``--`` are ``asft lab``'s and pick the
points, e.g. one method at one setting)::

    OMP_NUM_THREADS=1 python benchmarks/over_refusal.py --out runs/decisive --seeds 0,1 \\
        --json benchmarks/results/over_refusal.json -- --methods safegrad,l2 --sweep l2 \\
        --safegrad-weight 1 --l2-lambda 0.02

Writes ``--json`` and ``--md``: per method and seed, the over-refusal (%) and the refused
answers, beside the aligned model's.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch


def _lab(out: Path, data: str, lab_argv: list[str], records: Path | None = None):
    """The decisive grid's pretrained lab over ``out``'s cache, ``cached_only`` (it builds
    nothing), with ``asft lab``'s options ``lab_argv`` and the record store ``records``."""
    from asft_optim.lab import cli
    from asft_optim.lab.pretrained_lab import PretrainedLab

    args = cli.add_parser(argparse.ArgumentParser().add_subparsers()).parse_args(
        ["--preset", "pretrained", "--data", data, "--grid", "decisive", "--no-progress", "--out", str(out), *lab_argv])
    cfg, settings = cli._config(args), cli._settings(args)
    return PretrainedLab(cfg, cli._data(args, cfg, settings), out, settings, progress=False, cached_only=True,
                         records=records)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/asft", help="the reference data folder")
    p.add_argument("--out", type=Path, required=True, help="the lab folder whose cache holds the attacks")
    p.add_argument("--seeds", default="0", help="attack seeds, comma separated")
    p.add_argument("--poison", type=float, default=0.1)
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/over_refusal.json"))
    p.add_argument("--md", type=Path, default=None, help="default: --json with .md")
    args, lab_argv = p.parse_known_args(argv)
    lab_argv = [a for a in lab_argv if a != "--"]
    torch.set_num_threads(1)
    from asft_optim.lab.attack import get_method, load_attacked
    from asft_optim.lab.models import load
    from asft_optim.lab.runner import NotCached

    lab = _lab(args.out, args.data, lab_argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    try:
        return _run(lab, args, argv, seeds, get_method, load_attacked, load)
    except NotCached as e:  # it builds nothing: every model must be in --out's cache
        raise SystemExit(f"not in {args.out}'s cache: the lab stage {e.args}; this script builds nothing") from None


def _run(lab, args, argv, seeds, get_method, load_attacked, load) -> int:
    tok, _ = lab.tokenizer()
    rows = []
    aligned_dir, aligned_info = lab.aligned(seeds[0])
    check = lab._over_refusal(load(aligned_dir).eval(), tok)
    rows.append({"method": "aligned", "seed": None, "setting": None, **check})
    for method in lab.config.methods:
        for seed in seeds:
            attack_dir, info = lab.attack(method, args.poison, seed)
            model = load_attacked(aligned_dir, attack_dir / "adapter").eval()
            field = get_method(method).setting.field if get_method(method).setting else None
            setting = None if field is None else {field: getattr(lab.config.attack, field)}
            rows.append({"method": method, "seed": seed, "setting": setting, "attack": info["key"],
                         **lab._over_refusal(model, tok)})
            print(f"{method} seed {seed}: {rows[-1]['over_refusal']:.1f} % refused", file=sys.stderr)
    record = {"command": " ".join(["python", "benchmarks/over_refusal.py", *(argv if argv is not None else sys.argv[1:])]),
              "torch": torch.__version__, "python": platform.python_version(), "aligned": aligned_info["key"],
              "poison": args.poison, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    md = args.md or args.json.with_suffix(".md")
    lines = [f"# Over-refusal of attacked models (aligned {aligned_info['key']}, p = {args.poison})", "",
             f"Command: `{record['command']}`", "",
             "| method | setting | seed | held-out everyday requests refused (%) | of |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['setting'] or ''} | {'' if r['seed'] is None else r['seed']} | "
              f"{r['over_refusal']:.1f} | {r['benign_prompts']} |" for r in rows]
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
