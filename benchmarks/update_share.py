"""Where the trained attack's update lies under each operator (issue 31's geometry, after training).

``harmful_gradient_share.py`` measures the attack's *first step* (the gradient at the aligned
model). This script measures where the *trained* update ended up: for every point of a lab
grid already run (its attack adapter in the lab's cache, its evaluation in the record store),
``ΔW = s·B·A`` of each targeted weight (``q_proj``, ``v_proj`` of SmolLM2's 30 blocks), read
from the saved adapter, and the share of ``‖ΔW‖²`` each operator acts on, with the same share
definitions as ``harmful_gradient_share.py``:

* ``asft-orthogonal`` (k = 8): ``‖(I − C)ΔW‖²``, the part its penalty sees (the rest lies in
  the span of V's top-8 left singular vectors, where no penalty on ``(I − C)ΔW`` reaches);
* ``input`` / ``input-contrast`` (k = 32): ``‖ΔW U‖²``, the part on the defender's harmful
  input directions (plain; contrast: harmful against task);
* ``spf`` (k = 8, 64): ``‖QᵀΔW‖²``, the part in the refusal-gradient subspace.

Each share is energy weighted over the 60 weights: ``Σ_w ‖op(ΔW_w)‖² / Σ_w ‖ΔW_w‖²`` (the
share *of the whole update*), beside ``‖ΔW‖`` (root of ``Σ_w ‖ΔW_w‖²``) and the point's HS and
FA from its record. Per method and setting, the mean over the seeds found.

Beside them, ``cos(ΔW, V)`` of the whole update (``V = W_aligned − W_base`` over the 60
weights): below 0 the update undoes the alignment, above 0 it goes further along it.

A check that the adapter read is the evaluated one: every point's evaluation record carries
``‖ΔW_w‖`` and ``cos(ΔW_w, V_w)`` per weight (the lab's
:func:`~asft_optim.lab.geometry.update_geometry`, from PEFT's ``get_delta_weight`` at
evaluation); this script's float64 values must match each (relative 1e-4, absolute 1e-4), or
it stops.

It builds nothing: the lab runs ``cached_only``, over the records of ``--records``.

Usage (from the repository root; the options after ``--`` are ``asft lab``'s and pick the
points, as the decisive report's command does)::

    OMP_NUM_THREADS=1 python benchmarks/update_share.py --out runs/decisive \\
        --records benchmarks/results/lab-pretrained/decisive/points -- \\
        --methods sft,l2,asft-orthogonal,safegrad,safegrad-l2 \\
        --sweep l2,asft-orthogonal,safegrad,safegrad-l2 --safegrad-weight 0.3

Writes ``--json`` and ``--md`` (default ``benchmarks/results/update_share.*``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

#: The operators of the table (names as :func:`harmful_gradient_share.lab_operators` gives them).
COLUMNS = ("asft-orthogonal (k=8)", "input (k=32)", "input-contrast (k=32)", "spf (k=8)", "spf (k=64)")
#: Relative tolerance of the adapter read against the record's own ``‖ΔW_w‖`` (float32 there).
NORM_RTOL = 1e-4
#: Absolute tolerance of each weight's ``cos(ΔW, V)`` against the record's.
COS_ATOL = 1e-4


def adapter_deltas(adapter_dir: Path) -> dict[str, Tensor]:
    """``{weight name: s·B·A}`` (float64) of a saved PEFT LoRA adapter, ``s = α/r`` (or
    ``α/√r`` for rsLoRA). Anything else a LoRA config can set that changes ``ΔW`` is refused."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA":
        raise SystemExit(f"{adapter_dir}: peft_type {cfg.get('peft_type')!r}, not LORA")
    for key in ("use_dora", "rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise SystemExit(f"{adapter_dir}: {key} is set; this script reads plain LoRA only")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
        out[name] = s * (b.double() @ a.double())
    if not out:
        raise SystemExit(f"{adapter_dir}: no LoRA factors in adapter_model.safetensors")
    return out


def shares(deltas: dict[str, Tensor], ops: dict[str, dict[str, object]]) -> dict[str, float]:
    """Per operator, the energy-weighted share of ``Σ_w ‖ΔW_w‖²`` it acts on."""
    energy = {n: float(d.square().sum()) for n, d in deltas.items()}
    total = sum(energy.values())
    out = {}
    for op, per_weight in ops.items():
        if sorted(per_weight) != sorted(deltas):
            raise SystemExit(f"{op} covers {len(per_weight)} weights, the adapter {len(deltas)}")
        out[op] = sum(per_weight[n](d) * energy[n] for n, d in deltas.items()) / total if total else 0.0
    return out


def cosine(deltas: dict[str, Tensor], v: dict[str, Tensor]) -> float:
    """``cos(ΔW, V)`` of the whole update: ``Σ_w ⟨ΔW_w, V_w⟩ / (‖ΔW‖ ‖V‖)`` over the weights
    (below 0: the update undoes the alignment; above 0: it goes further along it)."""
    dot = sum(float((d * v[n]).sum()) for n, d in deltas.items())
    dn = math.sqrt(sum(float(d.square().sum()) for d in deltas.values()))
    vn = math.sqrt(sum(float(v[n].square().sum()) for n in deltas))
    return dot / (dn * vn) if dn and vn else 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/asft", help="the reference data folder")
    p.add_argument("--out", type=Path, required=True, help="the lab folder whose cache holds the attacks (read only)")
    p.add_argument("--records", type=Path, required=True, help="the record store of the grid's evaluations")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/update_share.json"))
    p.add_argument("--md", type=Path, default=Path("benchmarks/results/update_share.md"))
    args, lab_argv = p.parse_known_args(argv)
    lab_argv = [a for a in lab_argv if a != "--"]
    torch.set_num_threads(1)
    from harmful_gradient_share import lab_operators  # beside this script (sys.path[0])
    from over_refusal import _lab

    from asft_optim.lab.attack import get_method
    from asft_optim.lab.geometry import _weights
    from asft_optim.lab.models import load
    from asft_optim.lab.runner import NotCached

    start = time.perf_counter()
    lab = _lab(args.out, args.data, lab_argv, records=args.records)
    points, missing, ops_by_aligned, v_by_aligned = [], [], {}, {}
    for seed in lab.config.seeds:
        try:
            aligned_dir, aligned_info = lab.aligned(seed)
        except NotCached as e:
            raise SystemExit(f"the aligned model {e.args} is not in {args.out}/cache: this script builds nothing") from None
        if aligned_info["key"] not in ops_by_aligned:  # the operators of one aligned model, once
            ops = lab_operators(lab, seed, lab.config.attack, load(aligned_dir).eval(), safegrad=False)
            ops_by_aligned[aligned_info["key"]] = {c: ops[c] for c in COLUMNS}
            base_dir, _ = lab.base(seed)
            base, aligned = _weights(base_dir), _weights(aligned_dir)
            v_by_aligned[aligned_info["key"]] = {n: aligned[n].double() - base[n].double()
                                                 for n in next(iter(ops_by_aligned[aligned_info["key"]].values()))}
        ops, v = ops_by_aligned[aligned_info["key"]], v_by_aligned[aligned_info["key"]]
        for point in lab.grid_points():
            method = get_method(point.method)
            if method.post is not None:  # a post-hoc projection: the adapter is not what was evaluated
                continue
            try:
                info = lab.evaluation(point.method, point.poison, seed, point.attack)
                attack_dir, _ = lab.attack(method.trains_as or method.name, point.poison, seed, point.attack)
            except NotCached as e:
                missing.append({"seed": seed, "method": point.label, "stage": list(e.args)})
                continue
            deltas = adapter_deltas(attack_dir / "adapter")
            recorded = {g["weight"]: g for g in info["geometry"]}
            if sorted(recorded) != sorted(deltas):
                raise SystemExit(f"{point.label} seed {seed}: the adapter's weights are not the evaluated ones")
            for n, d in deltas.items():
                norm, cos = float(d.norm()), cosine({n: d}, v)
                if abs(norm - recorded[n]["delta_norm"]) > NORM_RTOL * max(recorded[n]["delta_norm"], 1e-12) \
                        or abs(cos - recorded[n]["cos_delta_v"]) > COS_ATOL:
                    raise SystemExit(f"{point.label} seed {seed}, {n}: ‖ΔW‖ {norm:.6g}, cos(ΔW, V) {cos:.6g} here; "
                                     f"{recorded[n]['delta_norm']:.6g}, {recorded[n]['cos_delta_v']:.6g} "
                                     "in the evaluation record")
            ev = info["eval"]
            points.append({"method": point.label, "seed": seed, "poison": point.poison,
                           "hs": ev["harmful_score"], "fa": ev["finetune_accuracy"],
                           "delta_norm": math.sqrt(sum(float(d.square().sum()) for d in deltas.values())),
                           "cos_v": cosine(deltas, v), "shares": shares(deltas, ops)})
    if not points:
        raise SystemExit("no point found: run the grid first (or check --out / --records / the lab options)")
    chance = {c: sum(s.chance for s in ops[c].values()) / len(ops[c]) for c in COLUMNS}
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "torch": torch.__version__,
              "python": platform.python_version(), "aligned": sorted(ops_by_aligned), "columns": list(COLUMNS),
              "chance": chance, "seconds": round(time.perf_counter() - start, 1), "points": points,
              "not_found": missing}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    args.md.write_text(markdown(record) + "\n")
    print(markdown(record))
    return 0


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def markdown(record: dict) -> str:
    """Per method and setting (grid order), the means over seeds: HS, FA, ‖ΔW‖ and the shares (%)."""
    rows: dict[str, list[dict]] = {}
    for pt in record["points"]:
        rows.setdefault(pt["method"], []).append(pt)
    cols = record["columns"]
    lines = [f"# Where the trained update lies under each operator (aligned {', '.join(record['aligned'])})", "",
             f"Command: `{record['command']}` (torch {record['torch']})", "",
             "Per point: `ΔW = s·B·A` of the 60 targeted weights from the attack's saved adapter (checked "
             "against the evaluation record's ‖ΔW‖ per weight), and the share of `Σ‖ΔW‖²` each operator acts "
             "on (%, energy weighted over the weights): `asft-orthogonal`, the part off V's top-8 span (its "
             "penalty's); `input*`, the part on the 32 input directions; `spf`, the part in the refusal-gradient "
             "subspace; `cos(ΔW, V)`, the whole update's cosine with V = W_aligned − W_base over the 60 weights "
             "(below 0: it undoes the alignment). Mean over the seeds found (n).", "",
             "| method | n | HS | FA | ‖ΔW‖ | cos(ΔW, V) | " + " | ".join(cols) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(cols),
             "| chance (k/d) | | | | | | " + " | ".join(f"{100 * record['chance'][c]:.1f}" for c in cols) + " |"]
    for label, pts in rows.items():
        cells = " | ".join(f"{100 * _mean([p['shares'][c] for p in pts]):.1f}" for c in cols)
        lines.append(f"| {label} | {len(pts)} | {_mean([p['hs'] for p in pts]):.1f} | "
                     f"{_mean([p['fa'] for p in pts]):.1f} | {_mean([p['delta_norm'] for p in pts]):.2f} | "
                     f"{_mean([p['cos_v'] for p in pts]):+.3f} | {cells} |")
    if record["not_found"]:
        lines += ["", f"Points of the grid not found (not run yet): {len(record['not_found'])}."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
