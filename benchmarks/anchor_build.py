"""Benchmark: streaming anchor build vs loading both checkpoints whole (reference style).

Generates a base and an aligned Llama checkpoint with Llama-2-7B layer dimensions
(hidden 4096, intermediate 11008, 32 heads) but only ``--layers`` layers (default 2)
and a smaller vocabulary (default 4096 instead of 32000, so the embeddings do not
dominate), stored as bf16 safetensors shards (one per layer) with an index. Each
strategy then runs in a fresh subprocess that reports its wall time and peak RSS:

* ``streaming``: ``build_anchors(base_dir, aligned_dir, ...)``, one pair of tensors at a time;
* ``whole``: both checkpoints loaded completely as fp32 state dicts (what the reference
  AsFT code does), then the same anchors built from memory.

Usage::

    python benchmarks/anchor_build.py                 # 7B dims, ~1.8 GB of temporary files
    python benchmarks/anchor_build.py --tiny          # seconds; CI smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(root: Path, *, hidden: int, intermediate: int, heads: int, layers: int, vocab: int, seed: int = 0) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                      num_key_value_heads=heads, num_hidden_layers=layers, vocab_size=vocab,
                      tie_word_embeddings=False, torch_dtype="bfloat16")
    dirs = root / "base", root / "aligned"
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(d)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    groups: list[dict[str, tuple[int, ...]]] = [
        {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    ]
    for i in range(layers):
        p = f"model.layers.{i}."
        groups.append({
            **{f"{p}self_attn.{m}.weight": (hidden, hidden) for m in ("q_proj", "k_proj", "v_proj", "o_proj")},
            f"{p}mlp.gate_proj.weight": (intermediate, hidden), f"{p}mlp.up_proj.weight": (intermediate, hidden),
            f"{p}mlp.down_proj.weight": (hidden, intermediate),
            f"{p}input_layernorm.weight": (hidden,), f"{p}post_attention_layernorm.weight": (hidden,),
        })
    weight_map = {}
    for j, group in enumerate(groups):
        shard = f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors"
        base = {n: rand(*s, scale=0.02) for n, s in group.items()}
        save_file(base, dirs[0] / shard, metadata={"format": "pt"})
        aligned = {n: (t.float() + rand(*t.shape, scale=0.002).float()).to(torch.bfloat16) for n, t in base.items()}
        del base
        save_file(aligned, dirs[1] / shard, metadata={"format": "pt"})
        del aligned
        weight_map.update({n: shard for n in group})
    for d in dirs:
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dirs


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM: reset by execve, unlike ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> None:
    """Runs in a fresh process; prints one JSON line."""
    t0 = time.perf_counter()
    import torch

    from asft_optim import build_anchors

    kw = dict(target_modules=args.targets.split(","), mode=args.mode, rank=args.rank, progress=False)
    t1 = time.perf_counter()
    if args.worker == "streaming":
        anchors = build_anchors(args.base, args.aligned, **kw)
    elif args.worker == "whole":
        from safetensors.torch import load_file

        def load_whole(d: str) -> dict:
            sd = {}
            for f in sorted(Path(d).glob("*.safetensors")):
                sd.update({k: v.float() for k, v in load_file(f).items()})
            return sd

        anchors = build_anchors(load_whole(args.base), load_whole(args.aligned), **kw)
    else:  # "import": the interpreter + torch baseline
        anchors = None
    t2 = time.perf_counter()
    print(json.dumps({
        "strategy": args.worker,
        "seconds": round(t2 - t1, 3),
        "import_seconds": round(t1 - t0, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "anchors": 0 if anchors is None else len(anchors),
        "anchor_mb": 0 if anchors is None else round(anchors.nbytes / 2**20, 1),
        "threads": torch.get_num_threads(),
    }))


def run(strategy: str, base: Path, aligned: Path, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", strategy, "--base", str(base), "--aligned", str(aligned),
           "--targets", a.targets, "--mode", a.mode] + (["--rank", str(a.rank)] if a.rank else [])
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{strategy} worker failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny dimensions (smoke test)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096, help="vocabulary size (Llama-2: 32000)")
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--mode", default="safelora")
    ap.add_argument("--rank", type=int)
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "anchor_build.json"))
    ap.add_argument("--worker", choices=["streaming", "whole", "import"], help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--aligned", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    dims = dict(hidden=64, intermediate=172, heads=4, vocab=128) if a.tiny else dict(
        hidden=4096, intermediate=11008, heads=32, vocab=a.vocab)
    with tempfile.TemporaryDirectory(prefix="asft-anchor-bench-") as tmp:
        t0 = time.perf_counter()
        base, aligned = generate(Path(tmp), layers=a.layers, **dims)
        gen_s = time.perf_counter() - t0
        size_mb = sum(f.stat().st_size for f in base.iterdir()) / 2**20
        rows = [run(s, base, aligned, a) for s in ("import", "streaming", "whole")]
    by = {r["strategy"]: r for r in rows}
    result = {
        "config": {**dims, "layers": a.layers, "file_dtype": "bfloat16", "targets": a.targets,
                   "mode": a.mode, "rank": a.rank, "checkpoint_mb": round(size_mb, 1), "tiny": a.tiny},
        "generate_seconds": round(gen_s, 1),
        "results": rows,
        "rss_ratio_whole_over_streaming": round(by["whole"]["peak_rss_mb"] / by["streaming"]["peak_rss_mb"], 2),
        "rss_ratio_above_import": round(
            (by["whole"]["peak_rss_mb"] - by["import"]["peak_rss_mb"])
            / max(1.0, by["streaming"]["peak_rss_mb"] - by["import"]["peak_rss_mb"]), 2),
        "command": "python benchmarks/anchor_build.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(f"checkpoint: {result['config']}  ({size_mb:.0f} MiB per checkpoint)")
    print(f"{'strategy':<10} {'seconds':>8} {'peak RSS MiB':>13} {'anchors MiB':>12}")
    for r in rows:
        print(f"{r['strategy']:<10} {r['seconds']:>8.2f} {r['peak_rss_mb']:>13.0f} {r['anchor_mb']:>12.1f}")
    print(f"peak RSS whole/streaming: {result['rss_ratio_whole_over_streaming']}x "
          f"({result['rss_ratio_above_import']}x above the import baseline)")
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
