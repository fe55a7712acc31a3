"""Shared helpers of the performance benchmarks: timing, environment record, output.

Every comparison is a *ratio measured within one run*: the variants are interleaved
(A, B, A, B, ...) so that load from other processes hits both alike, and the ratio
of medians is reported. Absolute times are printed for context only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="tiny sizes, few repetitions (CI smoke test)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown results")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds taken by ``fn()``; CUDA events on a GPU, ``perf_counter`` on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(
    fns: Mapping[str, Callable[[], Any]],
    device: torch.device,
    reps: int,
    warmup: int = 1,
    inner: Mapping[str, int] | None = None,
) -> dict[str, list[float]]:
    """Time every ``fn`` ``reps`` times, interleaved round-robin (rotating order) after ``warmup`` rounds.

    ``inner[name] = k`` times that variant k times per round (for fast variants
    compared with slow ones): every sample is still one call.
    """
    inner = dict(inner or {})
    samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for rnd in range(warmup + reps):
        # The order rotates every round: no variant always runs first (or right after
        # the same neighbour), so order effects (caches, frequency) hit all alike.
        k = rnd % len(names)
        for name in names[k:] + names[:k]:
            fn = fns[name]
            for _ in range(inner.get(name, 1)):
                t = time_once(fn, device)
                if rnd >= warmup:
                    samples[name].append(t)
    return samples


def summary(samples: Sequence[float]) -> dict[str, float]:
    s = sorted(samples)
    q = lambda f: s[min(len(s) - 1, int(f * len(s)))]  # noqa: E731
    return {"median_s": statistics.median(s), "p10_s": q(0.1), "p90_s": q(0.9), "n": len(s)}


def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write(out: Path, name: str, payload: dict[str, Any], table: str, command: str) -> Path:
    """Write ``name.json`` (payload + command) and ``name.md`` (the printed table)."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "command": command, **payload}
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    env = payload.get("environment", {})
    header = f"# {name}\n\n`{command}`\n\n{env.get('cpu', '')}, {env.get('torch_threads', '?')} threads, torch {env.get('torch', '')}, device {env.get('device', '')}\n\n"
    (out / f"{name}.md").write_text(header + table + "\n")
    print(table)
    print(f"\nwrote {path}")
    return path
