"""``asft anchors build|info``: build anchor files from two checkpoints, and inspect them."""

from __future__ import annotations

import argparse
import json
import sys

from .projection import MODES, AnchorError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("anchors", help="build or inspect anchor files")
    sub = parser.add_subparsers(dest="anchors_command", required=True)

    build = sub.add_parser("build", help="build anchors from a base and an aligned checkpoint")
    build.add_argument("--base", required=True, help="base model checkpoint directory or Hub repo id (org/name)")
    build.add_argument("--aligned", required=True,
                       help="aligned (chat) model checkpoint directory or Hub repo id (org/name)")
    build.add_argument("--base-revision", help="branch, tag or commit of a Hub --base (default: main)")
    build.add_argument("--aligned-revision", help="branch, tag or commit of a Hub --aligned (default: main)")
    targets = build.add_mutually_exclusive_group()
    targets.add_argument("--targets", default="q_proj,v_proj",
                         help="comma-separated module-name suffixes (default: q_proj,v_proj)")
    targets.add_argument("--targets-regex", help="regex matched in full against module names (as PEFT)")
    build.add_argument("--mode", choices=[m for m in MODES if m != "subspace"], default="safelora",
                       help="operator C (default: safelora)")
    cut = build.add_mutually_exclusive_group()
    cut.add_argument("--rank", type=int, help="keep the top RANK directions per weight")
    cut.add_argument("--energy", type=float, help="keep the fewest directions holding this fraction of ||V||^2")
    build.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                       help="storage dtype of the factors (default: float32)")
    build.add_argument("-o", "--output", required=True, help="anchor file to write (.safetensors)")
    build.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    build.set_defaults(func=_build)

    info = sub.add_parser("info", help="print what an anchor file holds")
    info.add_argument("file")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=_info)


def _build(args: argparse.Namespace) -> int:
    import torch

    from .anchor_io import check_output_path
    from .anchors import build_anchors

    targets = args.targets_regex or [t.strip() for t in args.targets.split(",") if t.strip()]
    try:
        check_output_path(args.output)  # before the build, which can take long
        anchors = build_anchors(
            args.base, args.aligned, target_modules=targets, mode=args.mode, rank=args.rank,
            energy=args.energy, dtype=getattr(torch, args.dtype),
            progress=False if args.no_progress else None,
            base_revision=args.base_revision, aligned_revision=args.aligned_revision,
        )
        anchors.save(args.output)
    except (AnchorError, OSError) as exc:
        print(f"asft anchors build: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(anchors)} anchors ({_size(anchors.nbytes)}) to {args.output}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .anchors import Anchors, l2_like_warning

    try:
        anchors = Anchors.load(args.file)
    except AnchorError as exc:
        print(f"asft anchors info: error: {exc}", file=sys.stderr)
        return 1
    rows = anchors.summary()
    if args.json:
        print(json.dumps({"metadata": anchors.metadata, "weights": rows}, indent=2, default=list))
        return 0
    for key in ("mode", "rank", "energy", "storage_dtype", "target_modules", "base_source",
                "aligned_source", "base_fingerprint", "aligned_fingerprint", "library"):
        if anchors.metadata.get(key):
            print(f"{key + ':':<21}{anchors.metadata[key]}")
    header = ("weight", "shape", "mode", "rank kept", "energy kept", "max eig C", "bytes")
    table = [header] + [
        (r["weight"], "x".join(map(str, r["shape"])), r["mode"], str(r["rank"]),
         f"{r['energy']:.4f}", f"{r['c_max']:.4f}", _size(r["bytes"]))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print()
    for row in table:
        print("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    print(f"\n{len(rows)} weights, {_size(anchors.nbytes)}")
    if rows and all(r["mode"] == "safelora" for r in rows):
        worst = max(r["c_max"] for r in rows)
        # Why this line: C = V Vᵀ/‖V‖_F has eigenvalues summing to ‖V‖_F, so a small
        # alignment update gives a C near 0, and the penalty then barely differs from L2's.
        print(f"largest eigenvalue of C over all weights: {worst:.4f} (every direction keeps at least "
              f"{(1 - min(worst, 1.0)) ** 2:.1%} of L2's penalty)")
    warning = l2_like_warning(anchors)
    if warning:
        print(f"warning: {warning}")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
