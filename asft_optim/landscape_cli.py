"""``asft landscape``: cosines, 1-D/2-D safety landscapes and EPL around an aligned model.

θ is the aligned model. Directions (all restricted to ``--targets``):

* ``aligned``: d_aligned = aligned − base;
* one per ``--finetuned [LABEL=]DIR``: finetuned − aligned (a full fine-tune of the aligned model);
* one per ``--adapter [LABEL=]DIR``: the merged update of a PEFT adapter trained on the aligned model;
* ``random-0 … random-(N-1)``: Gaussian, scaled per layer to the layer's norm.

Cosines with d_aligned use the raw directions (Table 1). Landscapes use the directions
normalised by ``--normalize`` (default ``layer``: α = 1 moves every targeted weight by
its own norm). The score is ``--score MODULE:FACTORY``: ``FACTORY(aligned_dir)`` returns
``score(model) -> float``, lower is safer (a harmful score). Default: the lab's harmful
score (refusal judge, greedy answers to the lab world's held-out harmful prompts;
``asft_optim.lab.landscape_score:lab_harmful_score``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

#: used when --score is not given: the lab's refusal judge on held-out harmful prompts. A
#: string resolved by importlib when the landscape runs, so the library never imports the lab.
DEFAULT_SCORE = "asft_optim.lab.landscape_score:lab_harmful_score"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "landscape",
        help="cosines with d_aligned, 1-D/2-D safety landscapes and EPL (AsFT §3.2, §4.3)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", required=True, help="unaligned (base) model directory")
    p.add_argument("--aligned", required=True, help="aligned model directory (the centre θ)")
    p.add_argument("--finetuned", action="append", default=[], metavar="[LABEL=]DIR",
                   help="fully fine-tuned model (from the aligned one); repeatable")
    p.add_argument("--adapter", action="append", default=[], metavar="[LABEL=]DIR",
                   help="PEFT adapter trained on the aligned model; repeatable")
    p.add_argument("--targets", default="q_proj,v_proj",
                   help="comma-separated module suffixes, a regex if it starts with '^', or 'all' (default: q_proj,v_proj)")
    p.add_argument("--include-1d", action="store_true",
                   help="d_aligned and fine-tuned updates also over 1-D tensors (norms, biases); "
                        "with --targets all and --normalize none, α = -1 is the base model")
    p.add_argument("--anchors", help="anchor file: also report the off-anchor fraction ‖(I−C)d‖/‖d‖ of each direction")
    p.add_argument("--random", type=int, default=2, help="number of random directions (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first random direction (default: 0)")
    p.add_argument("--grid", default="-1:1:21", help="1-D grid LO:HI:N, must contain 0; write --grid=-1:1:21 (default: -1:1:21)")
    p.add_argument("--2d", dest="two_d", action="store_true",
                   help="also a 2-D landscape: d_aligned × the first other direction, orthogonalised")
    p.add_argument("--grid-2d", default="-1:1:9", help="2-D grid per axis (default: -1:1:9)")
    p.add_argument("--normalize", choices=["layer", "global", "none"], default="layer",
                   help="direction normalisation for landscapes (default: layer)")
    p.add_argument("--threshold", type=float,
                   help="harmful-score threshold τ for EPL (default: the aligned model's score + --margin)")
    p.add_argument("--margin", type=float, default=20.0, help="see --threshold (default: 20)")
    p.add_argument("--interpolate", action="store_true", help="EPL: interpolate the threshold crossing")
    p.add_argument("--score", help="MODULE:FACTORY; FACTORY(aligned_dir) -> score(model) (default: the lab judge)")
    p.add_argument("--skip-landscapes", action="store_true", help="cosines only")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)


def _labelled(spec: str) -> tuple[str, str]:
    label, sep, path = spec.partition("=")
    return (label, path) if sep else (Path(spec).name, spec)


def _load_score(spec: str | None, aligned_dir: str):
    spec = spec or DEFAULT_SCORE
    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"--score {spec!r} is not MODULE:FACTORY")
    return getattr(importlib.import_module(module), attr)(aligned_dir)


def _targets(text: str):
    if text == "all":
        return None
    return text if text.startswith("^") else [t for t in text.split(",") if t]


def _run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from . import landscape as L
    from . import landscape_report as R
    from .projection import AnchorError

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = False if args.no_progress else None
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)  # noqa: E731
    try:
        targets = _targets(args.targets)
        alphas = L.grid(args.grid)
        if 0.0 not in alphas:
            raise ValueError(f"--grid {args.grid} must contain 0 (the model itself)")
        model = load(args.aligned)
        # every weight of θ, to check after the landscapes that the run restored them bit for bit
        before = {n: w.detach().clone() for n, w in L.model_weights(model).items()}
        raw = {"aligned": L.direction_from_models(args.base, model, targets, include_1d=args.include_1d)}
        for spec in args.finetuned:
            label, path = _labelled(spec)
            raw[label] = L.direction_from_models(model, path, targets, include_1d=args.include_1d)
        for spec in args.adapter:
            from peft import PeftModel

            label, path = _labelled(spec)
            with_adapter = PeftModel.from_pretrained(load(args.aligned), path)
            d = L.direction_from_adapter(with_adapter)
            raw[label] = {n: t for n, t in d.items() if n in raw["aligned"]}
            if not raw[label]:
                raise AnchorError(f"adapter {path} touches none of the targeted weights")
            del with_adapter
        for k in range(args.random):
            raw[f"random-{k}"] = L.random_direction(model, args.seed + k, targets)
        anchors = None
        if args.anchors:
            from .anchors import Anchors

            anchors = Anchors.load(args.anchors)
        score = None if args.skip_landscapes else _load_score(args.score, args.aligned)
    except (AnchorError, ValueError, OSError, ImportError) as exc:
        print(f"asft landscape: error: {exc}", file=sys.stderr)
        return 1

    cos = {label: L.cosine(raw["aligned"], d) for label, d in raw.items() if label != "aligned"}
    print(R.write_cosines(out, raw, cos, anchors))
    if score is None:
        return 0

    def restored() -> bool:
        after = L.model_weights(model)
        return after.keys() == before.keys() and all(torch.equal(before[n], w.detach()) for n, w in after.items())

    dirs = {k: L.normalize(d, args.normalize, model) for k, d in raw.items()}
    # where the update itself sits on its normalised axis: θ + α_self·d̂ has ‖α_self·d̂‖ = ‖d‖
    alpha_self = {k: L.direction_norm(raw[k]) / L.direction_norm(d) for k, d in dirs.items()}
    curves = [L.landscape_1d(model, d, alphas, score, label=k, progress=progress) for k, d in dirs.items()]
    own = curves[0].at_origin()
    tau = args.threshold if args.threshold is not None else own + args.margin
    epls = {c.label: L.epl(c.alphas, c.values, tau, interpolate=args.interpolate) for c in curves}
    print(R.write_landscape_1d(out, curves, epls, normalize=args.normalize, threshold=tau,
                               alpha_of_update=alpha_self, restored=restored()))
    if args.two_d:
        other = next(k for k in dirs if k != "aligned")
        d2 = L.normalize(L.orthogonalize(raw[other], raw["aligned"]), args.normalize, model)
        grid2 = L.grid(args.grid_2d)
        land = L.landscape_2d(model, dirs["aligned"], d2, grid2, grid2, score,
                              labels=("d_aligned", f"{other} (orthogonalised to d_aligned)"), progress=progress)
        R.write_landscape_2d(out, land, threshold=tau, restored=restored())
    if not restored():
        print("asft landscape: error: the model's weights differ from before the run", file=sys.stderr)
        return 2
    print(f"wrote results to {out}", file=sys.stderr)
    return 0
