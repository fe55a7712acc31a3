"""``asft anchors build|build-input|build-refusal|info``: build anchor files from two
checkpoints, or data-driven operators from an aligned checkpoint and the defender's prompts,
and inspect any of them."""

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

    _add_data_driven(sub)

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


def _add_data_driven(sub) -> None:
    """``build-input`` and ``build-refusal``: one aligned checkpoint and a prompt file."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--aligned", required=True, help="aligned (chat) model checkpoint directory or Hub repo id")
    common.add_argument("--tokenizer", help="tokenizer directory or Hub repo id (default: --aligned)")
    common.add_argument("--prompts", required=True,
                        help="the defender's harmful prompts: a text file, one prompt a line, or .json/.jsonl rows "
                        "with an 'instruction' or 'prompt' field; never evaluation prompts")
    common.add_argument("--target-modules", "--targets", dest="targets", default="q_proj,v_proj",
                        help="comma-separated module-name suffixes (default: q_proj,v_proj)")
    common.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="storage dtype of the bases (default: float32)")
    common.add_argument("--device", default="cpu", help="where the model runs (default: cpu)")
    common.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default: 8)")
    common.add_argument("-o", "--output", required=True, help="file to write (.safetensors)")

    build = sub.add_parser("build-input", parents=[common],
                           help="input-side anchors: each layer's inputs on the harmful prompts (forward passes)")
    build.add_argument("--task-prompts", help="task prompts, same formats: the contrast form's other side")
    build.add_argument("--form", choices=["plain", "contrast"],
                       help="plain: top inputs of the harmful prompts; contrast: large harmful relative to "
                       "task energy (default: contrast with --task-prompts, else plain)")
    build.add_argument("--rank", type=int, default=32, help="directions kept per weight (default: 32)")
    build.add_argument("--eps", type=float, default=0.1,
                       help="the contrast's ridge, relative to the task inputs' mean eigenvalue (default: 0.1)")
    build.add_argument("--keep-prefix", action="store_true",
                       help="count the tokens every prompt shares (a chat template's system turn) in the statistics")
    build.set_defaults(func=_build_input)

    refusal = sub.add_parser("build-refusal", parents=[common],
                             help="safety subspaces: the model's own greedy refusals' gradients (SPF-like)")
    refusal.add_argument("--rank", type=int, default=8, help="directions kept per weight (default: 8)")
    refusal.add_argument("--max-new-tokens", type=int, default=32,
                         help="longest greedy answer per prompt (default: 32)")
    refusal.set_defaults(func=_build_refusal)


def _aligned_inputs(args: argparse.Namespace):
    """``(model, tokenizer, prompts, task prompts or None)``, every input checked before any
    pass over the model; the output path checked writable first."""
    import torch

    from .anchor_io import check_output_path
    from .prompt_tokens import read_prompts

    check_output_path(args.output)  # before the build, which can take long
    if args.rank < 1 or args.batch_size < 1:
        raise AnchorError(f"--rank and --batch-size must be positive, got {args.rank} and {args.batch_size}")
    prompts = read_prompts(args.prompts)
    task = read_prompts(args.task_prompts) if getattr(args, "task_prompts", None) else None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(args.aligned, dtype=torch.float32).to(args.device).eval()
    except (OSError, ValueError) as exc:
        raise AnchorError(f"cannot load the aligned model {args.aligned!r}: {exc}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.aligned)
    except (OSError, ValueError, TypeError) as exc:
        raise AnchorError(f"no tokenizer at {args.tokenizer or args.aligned!r} ({exc}); give --tokenizer") from None
    return model, tokenizer, prompts, task


def _build_input(args: argparse.Namespace) -> int:
    import time

    import torch

    from .activation_anchors import build_input_anchors
    from .prompt_tokens import (
        prompt_ids,
        prompts_fingerprint,
        right_padded_batches,
        shared_prefix_length,
    )

    form = args.form or ("contrast" if args.task_prompts else "plain")
    try:
        if (form == "contrast") != bool(args.task_prompts):
            raise AnchorError("--form contrast needs --task-prompts, and --task-prompts is the contrast form's: "
                              "give both or neither")
        model, tok, prompts, task = _aligned_inputs(args)
        ids = prompt_ids(tok, prompts)
        task_ids = prompt_ids(tok, task) if task else []
        every = ids + task_ids
        skip = 0 if args.keep_prefix else min(shared_prefix_length(every), min(len(t) for t in every) - 1)
        pad = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)

        def batches(x):
            return [{k: v.to(args.device) for k, v in b.items()}
                    for b in right_padded_batches(x, args.batch_size, pad, skip_prefix=skip)]

        start = time.perf_counter()
        anchors = build_input_anchors(model, batches(ids), target_modules=_targets(args), rank=args.rank,
                                      task_batches=batches(task_ids) if task else None, eps=args.eps,
                                      dtype=getattr(torch, args.dtype))
        seconds = time.perf_counter() - start
        anchors.metadata.update(_source(args, prompts, prompts_fingerprint, skip))
        if task:
            anchors.metadata.update(task_prompts=str(len(task)), task_prompts_fingerprint=prompts_fingerprint(task))
        anchors.save(args.output)
        passes = -(-len(ids) // args.batch_size) + -(-len(task_ids) // args.batch_size)
    except (AnchorError, OSError) as exc:
        print(f"asft anchors build-input: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(anchors)} input-side anchors ({form}, rank {args.rank}, {_size(anchors.nbytes)}) to "
          f"{args.output}: {len(prompts)} prompts" + (f" + {len(task)} task prompts" if task else "")
          + f", {passes} forward passes (batches of {args.batch_size}) and the decompositions in {seconds:.1f} s")
    return 0


def _build_refusal(args: argparse.Namespace) -> int:
    import time

    import torch

    from .prompt_tokens import prompt_ids, prompts_fingerprint
    from .refusal_gradients import greedy_refusals, refusal_subspaces

    try:
        if args.max_new_tokens < 1:
            raise AnchorError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
        model, tok, prompts, _ = _aligned_inputs(args)
        ids = [t.to(args.device) for t in prompt_ids(tok, prompts)]
        start = time.perf_counter()
        examples = greedy_refusals(model, ids, max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id)
        generated = time.perf_counter() - start
        subs = refusal_subspaces(model, examples, target_modules=_targets(args), rank=args.rank,
                                 dtype=getattr(torch, args.dtype))
        backward = time.perf_counter() - start - generated
        subs.metadata.update(_source(args, prompts, prompts_fingerprint, None),
                             max_new_tokens=str(args.max_new_tokens))
        subs.save(args.output)
    except (AnchorError, OSError) as exc:
        print(f"asft anchors build-refusal: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(subs)} safety subspaces (rank {args.rank}) to {args.output}: {len(prompts)} prompts, "
          f"greedy answers {generated:.1f} s, {len(examples)} forward+backward passes {backward:.1f} s")
    return 0


def _targets(args: argparse.Namespace) -> list[str]:
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets:
        raise AnchorError("--target-modules names no module")
    return targets


def _source(args: argparse.Namespace, prompts, fingerprint, skip) -> dict[str, str]:
    """What the file records of its inputs (``asft anchors info`` prints it)."""
    out = {"aligned_source": str(args.aligned), "prompts": str(len(prompts)),
           "prompts_fingerprint": fingerprint(prompts), "prompts_file": str(args.prompts)}
    if skip is not None:
        out["skipped_prefix_tokens"] = str(skip)
    return out


def _info(args: argparse.Namespace) -> int:
    from .anchors import Anchors, l2_like_warning
    from .checkpoints import read_safetensors_header

    try:
        header, _ = read_safetensors_header(args.file)
        side = (header.get("__metadata__") or {}).get("side", "output")
    except (AnchorError, OSError, AttributeError) as exc:
        print(f"asft anchors info: error: {exc}", file=sys.stderr)
        return 1
    if side != "output":
        return _info_bases(args, side)
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


def _info_bases(args: argparse.Namespace, side: str) -> int:
    """``info`` of a data-driven operator file (side ``input`` or ``gradient``); reads it with
    :mod:`~asft_optim.basis_io` only (no model library is imported)."""
    from .basis_io import read_bases

    try:
        bases, energies, weights, meta = read_bases(args.file, side)
        fingerprint = _bases_fingerprint(side, bases, energies, weights)
    except AnchorError as exc:
        print(f"asft anchors info: error: {exc}", file=sys.stderr)
        return 1
    rows = [{"weight": n, "shape": list(weights[n].shape), "side": side, "rank": b.shape[1],
             "energy": energies[n], "dtype": str(b.dtype).removeprefix("torch."),
             "bytes": b.numel() * b.element_size()} for n, b in bases.items()]
    total = sum(r["bytes"] for r in rows)
    if args.json:
        print(json.dumps({"metadata": meta, "side": side, "fingerprint": fingerprint, "weights": rows}, indent=2))
        return 0
    what = {"input": "input-side anchors (penalty λ‖ΔW U‖², U spans each layer's inputs)",
            "gradient": "safety subspaces (each update kept out of span(Q) after every step)"}[side]
    print(f"{'side:':<26}{side}: {what}")
    ranks = sorted({r["rank"] for r in rows})
    print(f"{'ranks:':<26}{', '.join(map(str, ranks))}")
    print(f"{'fingerprint:':<26}{fingerprint}")
    for key in ("form", "eps", "prompts", "prompts_fingerprint", "harmful_prompts", "task_prompts",
                "task_prompts_fingerprint", "examples", "harmful_tokens", "task_tokens", "max_new_tokens",
                "refusal_tokens", "storage_dtype", "target_modules", "aligned_source", "aligned_dir", "source",
                "library"):
        if meta.get(key):
            print(f"{key + ':':<26}{meta[key]}")
    header = ("weight", "shape", "rank", "energy kept", "bytes")
    table = [header] + [(r["weight"], "x".join(map(str, r["shape"])), str(r["rank"]), f"{r['energy']:.4f}",
                         _size(r["bytes"])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print()
    for row in table:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    print(f"\n{len(rows)} weights, {_size(total)}")
    return 0


def _bases_fingerprint(side: str, bases, energies, weights) -> str:
    """The fingerprint the optimizer records for these operators in its state."""
    if side == "input":
        from .anchors import anchor_fingerprint
        from .input_projection import InputProjection

        return anchor_fingerprint({n: InputProjection(b, weights[n].out_in_shape[0], energies[n])
                                   for n, b in bases.items()})
    from .safety_subspace import SafetySubspace, subspace_fingerprint

    return subspace_fingerprint({n: SafetySubspace(b, weights[n].out_in_shape[1], energies[n]) for n, b in bases.items()})


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
