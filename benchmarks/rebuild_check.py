"""Does today's code rebuild a cached attack bit for bit? A check on the record store's premise.

The decisive grid spans sessions and code versions: a point's record stays valid while its stage
key (which holds the lab's ``LAB_VERSION``) does, on the premise that no commit changes what an
existing stage computes without changing its key. This script tests the premise on attacks the
cache already holds: for each ``--methods`` point (at one setting) and seed it rebuilds the
attack with the code it runs, in a scratch cache that shares every other stage of ``--cache``
(base, aligned model, operators) by symlink, and compares every adapter tensor with the cached
one. It builds only the attacks (a few minutes each on one core: a benchmark, not a test).

Usage (from the repository root; the options after ``--`` are ``asft lab``'s and pick the points)::

    OMP_NUM_THREADS=1 python benchmarks/rebuild_check.py --cache runs/decisive/cache --seeds 0 \\
        --json benchmarks/results/lab-pretrained/decisive/rebuild_check.json -- --methods l2 --l2-lambda 0.001

Exit status 1 when a rebuilt adapter differs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/asft", help="the reference data folder")
    p.add_argument("--cache", type=Path, required=True, help="the lab cache holding the attacks to rebuild")
    p.add_argument("--seeds", default="0", help="attack seeds, comma separated")
    p.add_argument("--poison", type=float, default=0.1)
    p.add_argument("--json", type=Path, default=None, help="write the result here too")
    args, lab_argv = p.parse_known_args(argv)
    lab_argv = [a for a in lab_argv if a != "--"]
    torch.set_num_threads(1)
    from dataclasses import replace

    from safetensors.torch import load_file

    from asft_optim.lab import cli
    from asft_optim.lab.pretrained_lab import PretrainedLab
    from asft_optim.lab.runner import LAB_VERSION

    if not args.cache.is_dir():
        raise SystemExit(f"--cache {args.cache}: not a folder; give the lab cache that holds the attacks")
    rows, failed = [], False
    with tempfile.TemporaryDirectory(prefix="rebuild-") as tmp:
        out = Path(tmp)
        (out / "cache").mkdir()
        for stage in args.cache.iterdir():  # every stage but the attacks and what reads them
            if (stage / "done.json").exists() and not stage.name.startswith(("attack-", "eval-", "overrefusal-")):
                (out / "cache" / stage.name).symlink_to(stage.resolve(), target_is_directory=True)
        parsed = cli.add_parser(argparse.ArgumentParser().add_subparsers()).parse_args(
            ["--preset", "pretrained", "--data", args.data, "--grid", "decisive", "--no-progress", "--out", str(out),
             *lab_argv])
        cfg, settings = cli._config(parsed), cli._settings(parsed)
        lab = PretrainedLab(cfg, cli._data(parsed, cfg, settings), out, replace(settings, sweeps=()), progress=False)
        for method in cfg.methods:
            for seed in (int(s) for s in args.seeds.split(",")):
                lab.cached_only = True  # the key first: the cached attack must exist to compare with
                lab.cache = args.cache
                try:
                    path, _ = lab.attack(method, args.poison, seed)
                except LookupError as e:
                    raise SystemExit(f"{method} seed {seed}: no cached attack in {args.cache} to compare with "
                                     f"(stage {e.args}); this script rebuilds only what the cache holds") from None
                finally:
                    lab.cached_only, lab.cache = False, out / "cache"
                start = time.perf_counter()
                new, _ = lab.attack(method, args.poison, seed)
                seconds = time.perf_counter() - start
                a = load_file(str(path / "adapter" / "adapter_model.safetensors"))
                b = load_file(str(new / "adapter" / "adapter_model.safetensors"))
                same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                diff = max((float((a[k] - b[k]).abs().max()) for k in a if k in b), default=float("nan"))
                failed |= not same
                rows.append({"method": method, "seed": seed, "attack": path.name, "bit_identical": same,
                             "max_abs_diff": diff, "rebuild_seconds": round(seconds, 1)})
                print(f"{method} seed {seed} ({path.name}): {'bit-identical' if same else f'DIFFERS (max {diff:g})'}, "
                      f"rebuilt in {seconds:.0f} s", file=sys.stderr)
    record = {"command": " ".join(["python", "benchmarks/rebuild_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "torch": torch.__version__, "python": platform.python_version(), "lab_version": LAB_VERSION,
              "rows": rows}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
