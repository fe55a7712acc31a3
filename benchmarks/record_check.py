"""Do two record stores agree? A check that a point rebuilt elsewhere gives the committed record.

``rebuild_check.py`` compares a rebuilt attack with one in the same cache, so both stand on the
same aligned model. A fresh machine rebuilds the aligned model too, and then the question is
the record's, not the adapter's: does the point, built from scratch, give the same harmful
verdicts, task answers and refusals as the committed record? This script compares every record
present in both stores, leaf by leaf:

* *discrete* leaves (strings, ints, bools: every per-prompt verdict, every task row's
  correctness, every generated answer) must be equal;
* *float* leaves (losses, norms, cosines, HS, FA) may differ by ``--atol + --rtol·|value|`` at
  most, as ``numpy.isclose`` (an absolute part, because a cosine near 0 has no useful relative
  difference; HS and FA are means of the discrete verdicts, so they only move where a verdict does);
* build times (keys holding ``seconds``) are skipped.

Usage (the first store holds the rebuilt points, for example an ``asft lab --records`` run into an
empty folder on a fresh machine)::

    python benchmarks/record_check.py runs/verify/points benchmarks/results/lab-pretrained/decisive/points \\
        --json benchmarks/results/lab-pretrained/decisive/record_check.json

Exit status 1 when a discrete leaf differs or a float leaf by more than its tolerance.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _leaves(x, path=""):
    """(path, value) for every leaf of a JSON value; containers' shapes are leaves too, so a
    list that grew or a key that vanished is a discrete difference."""
    if isinstance(x, dict):
        yield path + "{}", tuple(sorted(k for k in x if "seconds" not in k))
        for k, v in x.items():
            if "seconds" not in k:
                yield from _leaves(v, f"{path}/{k}")
    elif isinstance(x, list):
        yield path + "[]", len(x)
        for i, v in enumerate(x):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, x


def compare(a, b, rtol: float, atol: float) -> dict:
    """One record against another: the discrete leaves that differ, the float leaves beyond
    ``atol + rtol·max(|u|, |v|)``, and the largest absolute and relative float differences."""
    la, lb = dict(_leaves(a)), dict(_leaves(b))
    discrete, beyond, floats = [], [], 0
    worst_abs, worst_rel = (0.0, None), (0.0, None)
    for path in sorted(set(la) & set(lb)):  # a missing key shows in its container's key list
        u, v = la[path], lb[path]
        if isinstance(u, float) and isinstance(v, float):
            floats += 1
            if u == v or (math.isnan(u) and math.isnan(v)):
                continue
            diff = abs(u - v)
            rel = diff / max(abs(u), abs(v))
            worst_abs = max(worst_abs, (diff, path), key=lambda t: t[0])
            worst_rel = max(worst_rel, (rel, path), key=lambda t: t[0])
            if not diff <= atol + rtol * max(abs(u), abs(v)):
                beyond.append(path)
        elif u != v:
            discrete.append(path)
    return {"discrete_differences": discrete, "floats_beyond_tolerance": beyond, "floats": floats,
            "max_abs_diff": worst_abs[0], "max_abs_diff_at": worst_abs[1],
            "max_rel_diff": worst_rel[0], "max_rel_diff_at": worst_rel[1],
            "ok": not discrete and not beyond}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store", type=Path, help="the record store to check (e.g. points rebuilt on a fresh machine)")
    p.add_argument("against", type=Path, help="the reference store (e.g. the committed points/)")
    p.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance of a float leaf (default: 1e-3)")
    p.add_argument("--atol", type=float, default=1e-3, help="absolute tolerance of a float leaf (default: 1e-3)")
    p.add_argument("--json", type=Path, default=None, help="write the result here too")
    args = p.parse_args(argv)
    for d in (args.store, args.against):
        if not d.is_dir():
            raise SystemExit(f"{d}: not a folder of records")
    if not (args.rtol >= 0 and args.atol >= 0):
        raise SystemExit(f"--rtol and --atol must be >= 0, got {args.rtol} and {args.atol}")
    mine = {f.name for f in args.store.glob("*.json")}
    ref = {f.name for f in args.against.glob("*.json")}
    common = sorted(mine & ref)
    if not common:
        raise SystemExit(f"no record of {args.store} is in {args.against}: nothing to compare")
    rows = []
    for name in common:
        a = json.loads((args.store / name).read_text())
        b = json.loads((args.against / name).read_text())
        row = {"record": name, **compare(a, b, args.rtol, args.atol)}
        rows.append(row)
        state = "ok" if row["ok"] else "DIFFERS"
        print(f"{name}: {state}; {len(row['discrete_differences'])} discrete differences, "
              f"{len(row['floats_beyond_tolerance'])} of {row['floats']} floats beyond tolerance, largest "
              f"difference {row['max_abs_diff']:.2g} absolute, {row['max_rel_diff']:.2g} relative", file=sys.stderr)
    out = {"command": " ".join(["python", "benchmarks/record_check.py", *(argv if argv is not None else sys.argv[1:])]),
           "rtol": args.rtol, "atol": args.atol, "only_in_store": sorted(mine - ref), "rows": rows}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
