"""Run one ``asft lab`` grid as parallel processes that share one cache.

One process per (seed, poison ratio), all reading and writing ``OUT/cache``; then the
report of the whole grid from that cache (``asft lab ... --cached-only``), which is
the report one process running the same command would write (every stage is a cache
entry keyed by its inputs, so who built it does not matter). Why: a small model on a
GPU, or on a many-core CPU, leaves the machine mostly idle with one process.

The first (seed, ratio) runs alone until it has built the aligned model, so the base
and aligned stages that every process reads are built once (a grid whose seeds have
models of their own, ``--model-seed each``, builds each later seed's pair in each of
its processes: correct, since a stage's directory is written under a per-process name
and renamed, but repeated work). ``--deadline`` stops the parallel phase after that
many seconds; the report then lists the grid points not reached as not run, and a
rerun of the same command picks up from the cache.

Usage::

    python benchmarks/lab_parallel.py --out runs/full --seeds 0,1 --poison 0,0.05,0.1,0.2 -- \\
        --preset pretrained --data ../shared/data/asft --grid full --device cuda --no-progress

Writes ``OUT/table.md`` and the other report files, ``OUT/parallel.json`` (wall times,
each process's exit code) and each process's log in ``OUT/parts/<seed>-<ratio>/log.txt``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

LAB = [sys.executable, "-m", "asft_optim.cli", "lab"]


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _aligned_built(cache: Path) -> bool:
    return any(cache.glob("aligned-*/done.json"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    lab_args = argv[argv.index("--") + 1:] if "--" in argv else []
    mine = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the grid's output directory (its cache: OUT/cache)")
    p.add_argument("--seeds", required=True, help="the grid's seeds, e.g. 0,1")
    p.add_argument("--poison", required=True, help="the grid's poison ratios, e.g. 0,0.1")
    p.add_argument("--deadline", type=float, help="stop the parallel phase after this many seconds")
    p.add_argument("--poll", type=float, default=2.0, help=argparse.SUPPRESS)
    args = p.parse_args(mine)
    for flag in ("--out", "--seeds", "--poison", "--cached-only"):
        if flag in lab_args:
            p.error(f"{flag} is this script's (or the report's) to set; leave it out of the lab arguments")
    seeds, poisons = _split(args.seeds), _split(args.poison)
    if not seeds or not poisons:
        p.error("give at least one seed and one poison ratio")
    out = args.out
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    deadline = None if args.deadline is None else start + args.deadline
    procs: dict[str, tuple[subprocess.Popen, float]] = {}

    def launch(seed: str, poison: str) -> None:
        name = f"{seed}-{poison}"
        part = out / "parts" / name
        part.mkdir(parents=True, exist_ok=True)
        if not (part / "cache").exists():
            (part / "cache").symlink_to(cache.resolve(), target_is_directory=True)
        log = open(part / "log.txt", "w")  # noqa: SIM115 (closed with the process below)
        cmd = LAB + lab_args + ["--out", str(part), "--seeds", seed, "--poison", poison]
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.perf_counter())
        log.close()  # the child holds its own descriptor

    grid = [(s, q) for s in seeds for q in poisons]
    launch(*grid[0])
    first, _ = procs[f"{grid[0][0]}-{grid[0][1]}"]
    while not _aligned_built(cache) and first.poll() is None:
        if deadline is not None and time.perf_counter() > deadline:
            break
        time.sleep(args.poll)
    for s, q in grid[1:]:
        launch(s, q)

    killed = []
    walls = {}
    for name, (proc, t0) in procs.items():
        timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # a stage cut short leaves its temporary directory, never a cache entry
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            killed.append(name)
        walls[name] = round(time.perf_counter() - t0, 1)
    parallel_wall = time.perf_counter() - start

    report = subprocess.run(LAB + lab_args + ["--out", str(out), "--seeds", args.seeds, "--poison", args.poison,
                                              "--cached-only"])
    wall = time.perf_counter() - start
    summary = {
        "wall_seconds": round(wall, 1), "parallel_phase_seconds": round(parallel_wall, 1),
        "deadline_seconds": args.deadline, "stopped_at_deadline": killed,
        "processes": {n: {"returncode": procs[n][0].returncode, "wall_seconds": walls[n]} for n in procs},
        "lab_args": lab_args, "seeds": args.seeds, "poison": args.poison,
    }
    (out / "parallel.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"lab_parallel: {len(procs)} processes, wall time {wall:.0f} s "
          f"(parallel phase {parallel_wall:.0f} s{', stopped at the deadline: ' + ', '.join(killed) if killed else ''})")
    failed = [n for n in procs if procs[n][0].returncode not in (0, None) and n not in killed]
    if failed:
        print(f"lab_parallel: failed: {', '.join(failed)} (logs in {out / 'parts'})", file=sys.stderr)
    return 1 if failed or report.returncode else 0


if __name__ == "__main__":
    raise SystemExit(main())
