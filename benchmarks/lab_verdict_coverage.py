"""How often the lab's verdict interval excludes a true difference of 0 (a simulation).

Two methods drawn from one process: per seed, each method's four settings lie on one
HS-vs-FA line, shifted by a per-seed, per-method attack effect (sd 8 HS points, 3 FA
points); each point is judged on 100 prompts and 100 rows. The true difference at any FA
is 0, so a 95 % interval should exclude 0 in at most 5 % of grids. Reported for the
bootstrap alone and for the union with the t interval that the verdict reports.

    python benchmarks/lab_verdict_coverage.py [--seeds 2,3,5] [--sims 200] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from asft_optim.lab import verdict
from asft_optim.lab.verdict import Point, paired_differences


def grid(rng: np.random.Generator, seeds: int) -> list[Point]:
    pts = []
    for s in range(seeds):
        for m in ("l2", "x"):
            u, v = rng.normal(0, 0.08), rng.normal(0, 0.03)  # this seed's attack randomness
            for k in range(4):
                fa = float(np.clip(0.25 + 0.12 * k + v, 0, 1))
                hs = float(np.clip(0.15 + 0.15 * k + u, 0, 1))
                pts.append(Point(m, s, rng.random(100) < hs, rng.random(100) < fa))
    return pts


def coverage(seeds: int, sims: int, replicates: int = 500) -> dict:
    rng = np.random.default_rng(1)
    union = boot = reached = 0
    real_t = verdict.t_quantile
    for sim in range(sims):
        pts = grid(rng, seeds)
        (d,) = paired_differences(pts, levels=(50.0,), replicates=replicates, seed=sim)
        verdict.t_quantile = lambda q, df: 0.0  # the bootstrap interval alone
        try:
            (b,) = paired_differences(pts, levels=(50.0,), replicates=replicates, seed=sim)
        finally:
            verdict.t_quantile = real_t
        if d.low is None:
            continue
        reached += 1
        union += not (d.low <= 0 <= d.high)
        boot += not (b.low <= 0 <= b.high)
    return {"seeds": seeds, "grids": reached, "bootstrap_excludes_0": round(boot / reached, 3),
            "reported_excludes_0": round(union / reached, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="2,3,5", help="seed counts, comma separated (default: 2,3,5)")
    p.add_argument("--sims", type=int, default=200, help="grids per seed count (default: 200)")
    p.add_argument("--out", type=Path, help="also write the rows here as JSON")
    args = p.parse_args()
    rows = [coverage(int(n), args.sims) for n in args.seeds.split(",")]
    for r in rows:
        boot, reported = 100 * r["bootstrap_excludes_0"], 100 * r["reported_excludes_0"]
        print(f"{r['seeds']} seeds, {r['grids']} grids: 0 excluded by the bootstrap alone in {boot:.1f} %, "
              f"by the reported interval in {reported:.1f} %")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
