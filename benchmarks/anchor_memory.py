"""B2: memory held by the anchors of Llama-2 q/v weights, reference vs asft-optim.

The reference AsFT code keeps one dense d_out×d_out fp32 ``C`` per LoRA target.
asft-optim keeps a factor ``F`` (C = F Fᵀ): exact ``safelora`` stores F = V/√‖V‖_F
(d_out×d_in), compacted to d_out×d_out by a QR when the weight is wide (d_in > d_out);
a rank-k anchor stores d_out×k (fp32 or bf16).

Totals are computed from the weight shapes, then checked by building real ``Anchors``
for one sample weight of every distinct shape and measuring the bytes of the storages
they hold (``untyped_storage().nbytes()``, so a factor that is a view of a larger
buffer would be caught).

    PYTHONPATH=. python benchmarks/anchor_memory.py
    PYTHONPATH=. python benchmarks/anchor_memory.py --tiny
"""

from __future__ import annotations

import gc
import sys

import torch
from _common import environment, fmt_bytes, markdown_table, parser, setup, write

from asft_optim import Anchors

# name: (layers, [(module, d_out, d_in), ...]); Llama-2-70B uses GQA: 8 KV heads × 128.
MODELS = {
    "Llama-2-7B q/v": (32, [("q_proj", 4096, 4096), ("v_proj", 4096, 4096)]),
    "Llama-2-70B q/v": (80, [("q_proj", 8192, 8192), ("v_proj", 1024, 8192)]),
}
TINY_MODELS = {
    "tiny-7B-like q/v": (4, [("q_proj", 64, 64), ("v_proj", 64, 64)]),
    "tiny-70B-like q/v": (4, [("q_proj", 128, 128), ("v_proj", 16, 128)]),
}


def variants(rank: int) -> dict[str, tuple[str, int | None, torch.dtype]]:
    return {
        "reference dense C fp32": ("dense", None, torch.float32),
        "ours safelora exact fp32": ("safelora", None, torch.float32),
        f"ours rank-{rank} fp32": ("orthogonal", rank, torch.float32),
        f"ours rank-{rank} bf16": ("orthogonal", rank, torch.bfloat16),
    }


def computed_bytes(kind: str, rank: int | None, dtype: torch.dtype, d_out: int, d_in: int) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    if kind == "dense":
        return d_out * d_out * size
    if rank is None:
        return d_out * min(d_in, d_out) * size  # F = V/√‖V‖_F, QR-compacted when wide
    return d_out * min(rank, d_out, d_in) * size


def held_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def measure_sample(kind: str, rank: int | None, dtype: torch.dtype, d_out: int, d_in: int) -> int:
    """Build the anchor of one random weight difference and measure what it keeps."""
    g = torch.Generator().manual_seed(d_out * 7 + d_in)
    v = torch.randn(d_out, d_in, generator=g) * 0.01
    if kind == "dense":
        f = v / v.norm().sqrt()
        held = [f @ f.T]  # the reference's C = V Vᵀ/‖V‖_F
    else:
        anchors = Anchors.from_deltas({"w": v}, kind, rank=rank, dtype=dtype)
        held = [p.factor for p in anchors.values()]
    del v
    out = held_bytes(held)
    del held
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.split("\n", 1)[0])
    p.add_argument("--rank", type=int, default=256)
    args = p.parse_args(argv)
    device = setup(args)
    models = TINY_MODELS if args.tiny else MODELS
    rank = 8 if args.tiny else args.rank
    vs = variants(rank)
    samples = {}
    for _, mods in models.values():
        for _, d_out, d_in in mods:
            for vname, (kind, r, dtype) in vs.items():
                key = (vname, d_out, d_in)
                if key in samples:
                    continue
                print(f"measuring {vname} for a {d_out}×{d_in} weight", file=sys.stderr)
                measured = measure_sample(kind, r, dtype, d_out, d_in)
                computed = computed_bytes(kind, r, dtype, d_out, d_in)
                samples[key] = {"variant": vname, "d_out": d_out, "d_in": d_in,
                                "computed_bytes": computed, "measured_bytes": measured,
                                "match": measured == computed}
    results = []
    rows = []
    for model, (layers, mods) in models.items():
        ref_total = None
        for vname, (kind, r, dtype) in vs.items():
            total = layers * sum(computed_bytes(kind, r, dtype, o, i) for _, o, i in mods)
            if ref_total is None:
                ref_total = total
            results.append({"model": model, "weights": layers * len(mods), "variant": vname,
                            "bytes": total, "fraction_of_reference": total / ref_total})
            rows.append([model, layers * len(mods), vname, fmt_bytes(total), f"1/{ref_total / total:.3g}"
                         if total < ref_total else f"{total / ref_total:.3g}×"])
    table = markdown_table(["model", "weights", "anchors", "memory", "vs reference"], rows)
    check_rows = [[f"{s['d_out']}×{s['d_in']}", s["variant"], s["computed_bytes"], s["measured_bytes"],
                   "yes" if s["match"] else "NO"] for s in samples.values()]
    table += "\n\nMeasured on one sample weight per shape (bytes of the storages the anchors hold):\n\n"
    table += markdown_table(["weight", "anchors", "computed bytes", "measured bytes", "match"], check_rows)
    cmd = "PYTHONPATH=. python benchmarks/anchor_memory.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    payload = {"environment": environment(device), "rank": rank, "results": results,
               "samples": list(samples.values())}
    write(args.out, "anchor_memory", payload, table, cmd)
    return payload


if __name__ == "__main__":
    main()
