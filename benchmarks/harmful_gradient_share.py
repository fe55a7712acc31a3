"""Where the attack's first step lies under each operator (issue 31's geometry).

At the pretrained lab's aligned SmolLM2 model, the gradient ``G`` of the lab's own training
loss (:func:`~asft_optim.lab.models.answer_loss`) with respect to each targeted full weight
``W`` (``q_proj``, ``v_proj`` of the 30 blocks), taken over

* the **harmful rows** the p = 0.1 attack adds (``LabData.attack_set(0.1, seed)`` less the
  task rows: what the attacker brings), and
* a sample of the attack's **task rows** (the control),

is the direction the attack's first full-weight step takes on those rows. For each operator
of the lab, the share of ``‖G‖²`` it acts on:

* ``l2`` penalises all of ``ΔW``: 1 by definition;
* ``asft-orthogonal`` penalises ``(I − C)ΔW``, ``C`` the projector onto the top-8 left
  singular vectors of ``V = W_aligned − W_base``: ``‖(I − C)G‖² / ‖G‖²``;
* ``input`` / ``input-contrast`` penalise ``ΔW U`` (U: 32 orthonormal input directions):
  ``‖G U‖² / ‖G‖²``;
* ``spf`` keeps ``QᵀΔW = 0`` (Q: the top-k output directions of the refusal gradients):
  ``‖QᵀG‖² / ‖G‖²``, at k = 8, 16, 32, 64;
* ``safegrad`` (conflict mode) removes ``G``'s component along the safety gradient ``S`` (the
  gradient of the NLL of the aligned model's own greedy answers to the defender's harmful
  build half, the lab's ``safegrad`` stage) when ``⟨G, S⟩ < 0``: ``cos²(G, S)`` then, else 0.
  Per weight here (the library's ``granularity="tensor"``, on full weights at the aligned
  model); the lab's method acts on the LoRA factors, over all of them at once, at every
  step's weights: this is where its first step stands, not what it does later.

Per operator the table gives the harmful share, the task share and their ratio (harmful /
task: about 1 means the operator cannot tell the attack's harmful gradient from its task
gradient, as L2 cannot), mean over the 60 weights, and ``chance``: the share a random
subspace of the same size would take (k / d).

Two aggregates of the rows: ``summed``, the gradient of the loss over all the rows at once
(the lab's token-mean loss: the first step's direction), and ``per_row``, the mean over rows
of each row's own share (a summed gradient can hide rows that point elsewhere).

The operators are the lab's own: ``asft-orthogonal`` from :func:`asft_optim.build_anchors`
exactly as the lab's method builds it, the others from :meth:`Lab.operator` (cached stages
of their own, built from the defender's prompts). The aligned model is read from an existing
lab cache and never rebuilt: ``--from-cache`` is linked (read only) into ``--out``'s cache,
and the script stops if the lab's stage keys do not find it there.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/harmful_gradient_share.py \\
        --data ../shared/data/asft --from-cache runs/decisive/cache --out runs/geom-lab

Writes ``--json`` and ``--md`` (default ``benchmarks/results/harmful_gradient_share.*``).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

#: The spf ranks the lab sweeps (each a prefix of the one stage's 64 directions).
SPF_RANKS = (8, 16, 32, 64)
#: The lab methods whose operator comes from a stage of :meth:`Lab.operator`.
STAGE_METHODS = ("input", "input-contrast", "spf", "safegrad")


# -- the shares (float64, scale-free) ---------------------------------------------------------
def _energy(x: Tensor) -> float:
    return float(x.double().square().sum())


class WholeShare:
    """``l2``: the penalty sees all of ``ΔW``, so all of ``G``."""

    chance = 1.0

    def __call__(self, g: Tensor) -> float:
        return 1.0 if _energy(g) > 0 else 0.0


class OrthogonalShare:
    """``asft``-style anchors ``C = F Fᵀ``: the penalty on ``(I − C)ΔW`` sees ``‖(I − C)G‖²``."""

    def __init__(self, factor: Tensor):
        self.factor = factor.double()
        self.chance = 1.0 - factor.shape[1] / factor.shape[0]

    def __call__(self, g: Tensor) -> float:
        g = g.double()
        total = _energy(g)
        return 0.0 if total == 0 else _energy(g - self.factor @ (self.factor.T @ g)) / total


class _BasisShare:
    """The share of ``‖G‖²`` an orthonormal basis sees (``part``: which side it reads)."""

    def __init__(self, basis: Tensor):
        self.basis = basis.double()
        self.chance = basis.shape[1] / basis.shape[0]

    def __call__(self, g: Tensor) -> float:
        g = g.double()
        total = _energy(g)
        return 0.0 if total == 0 else _energy(self.part(g)) / total


class InputShare(_BasisShare):
    """Input-side anchors: the penalty on ``ΔW U`` sees ``‖G U‖²`` (U orthonormal, (d_in, k))."""

    def part(self, g: Tensor) -> Tensor:
        return g @ self.basis


class OutputShare(_BasisShare):
    """``spf``: the projection removes ``QᵀG`` (Q orthonormal, (d_out, k)): ``‖QᵀG‖²``."""

    def part(self, g: Tensor) -> Tensor:
        return self.basis.T @ g


class ConflictShare:
    """``safegrad`` (conflict mode, per weight): the share of ``‖G‖²`` removed when ``G`` and
    the safety gradient ``S`` conflict, ``cos²(G, S)`` if ``⟨G, S⟩ < 0`` else 0 (a random
    direction: about ``1/(2·d_out·d_in)``)."""

    def __init__(self, safety: Tensor):
        self.safety = safety.double()
        self.norm = _energy(self.safety)
        self.chance = 0.5 / safety.numel()

    def __call__(self, g: Tensor) -> float:
        g = g.double()
        dot, total = float((g * self.safety).sum()), _energy(g)
        return 0.0 if dot >= 0 or total == 0 or self.norm == 0 else dot * dot / (total * self.norm)


# -- the gradients ---------------------------------------------------------------------------
def row_gradients(model, rows: list[dict[str, list[int]]], names: list[str], answer_loss):
    """Yield ``(answer tokens, {name: ∂loss/∂W})`` per encoded row, the loss summed over the
    row's answer tokens (``answer_loss`` with ``num_items=1``); only ``names`` get gradients.

    ``Σ grads / Σ tokens`` is the gradient of ``answer_loss`` over all the rows at once (the
    lab's token-mean loss of one batch holding them)."""
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    device = params[names[0]].device
    for row in rows:
        batch = {k: torch.tensor(v, device=device)[None] for k, v in row.items()}
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        if tokens == 0:
            continue
        loss = answer_loss(model, batch, 1)
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        yield tokens, {n: g.detach() for n, g in zip(names, grads)}


def measure(model, rows, operators: dict[str, dict[str, object]], answer_loss) -> dict[str, dict]:
    """``{operator: {"summed": {weight: share}, "per_row": {weight: mean share}}}`` of ``rows``.

    ``operators``: ``{operator: {parameter name: share}}``, every operator on the same names."""
    names = sorted(next(iter(operators.values())))
    total, tokens, per_row = {n: None for n in names}, 0, {op: {n: 0.0 for n in names} for op in operators}
    count = 0
    for n_tok, grads in row_gradients(model, rows, names, answer_loss):
        tokens, count = tokens + n_tok, count + 1
        for n, g in grads.items():
            total[n] = g.double() if total[n] is None else total[n] + g.double()
            for op, shares in operators.items():
                per_row[op][n] += shares[n](g)
    if count == 0:
        raise ValueError("no row with an answer token: nothing to measure")
    summed = {n: g / tokens for n, g in total.items()}
    return {op: {"summed": {n: shares[n](summed[n]) for n in names},
                 "per_row": {n: per_row[op][n] / count for n in names}} for op, shares in operators.items()}


# -- the lab's operators ---------------------------------------------------------------------
def _module(name: str) -> str:
    return name.removesuffix(".weight")


def lab_operators(lab, seed: int, attack, model, *, safegrad: bool = True) -> dict[str, dict[str, object]]:
    """``{operator: {parameter name: share}}`` of every lab method, built as the lab builds it
    (``safegrad=False``: all but safegrad's, whose safety gradient needs passes over ``model``)."""
    from asft_optim import build_anchors
    from asft_optim.input_anchors import InputAnchors
    from asft_optim.lab.models import answer_loss
    from asft_optim.lab.operators import OPERATOR_FILE, load_refusal_examples, load_safety_subspaces

    targets = list(attack.target_modules)
    weights = [n for n, _ in model.named_parameters()
               if n.endswith(".weight") and _module(n).rsplit(".", 1)[-1] in targets]
    by_module = {_module(n): n for n in weights}
    base_dir, _ = lab.base(seed)
    aligned_dir, _ = lab.aligned(seed)

    def keyed(mapping, share):
        out = {by_module[_module(k)]: share(v) for k, v in mapping.items()}
        if sorted(out) != sorted(weights):
            raise SystemExit(f"an operator covers {len(out)} weights, the model has {len(weights)} targeted")
        return out

    ortho = build_anchors(base_dir, aligned_dir, target_modules=targets, mode="orthogonal",
                          rank=attack.orthogonal_rank, progress=False)
    ops = {"l2": {n: WholeShare() for n in weights},
           f"asft-orthogonal (k={attack.orthogonal_rank})": keyed(ortho, lambda p: OrthogonalShare(p.factor))}
    dirs = {m: lab.operator(m, seed, attack)[0] for m in STAGE_METHODS if safegrad or m != "safegrad"}
    for m in ("input", "input-contrast"):
        anchors = InputAnchors.load(dirs[m] / OPERATOR_FILE)
        ops[f"{m} (k={attack.input_rank})"] = keyed(anchors, lambda p: InputShare(p.basis))
    for k in SPF_RANKS:
        subs = load_safety_subspaces(dirs["spf"], k)
        ops[f"spf (k={k})"] = keyed(subs, lambda s: OutputShare(s.basis))
    if not safegrad:
        return ops
    total, tokens = {}, 0  # S: the token-mean gradient over the safegrad stage's examples
    for n_tok, grads in row_gradients(model, load_refusal_examples(dirs["safegrad"]), weights, answer_loss):
        tokens += n_tok
        for n, g in grads.items():
            total[n] = g.double() + total.get(n, 0.0)
    ops["safegrad (conflict, per weight)"] = {n: ConflictShare(total[n] / tokens) for n in weights}
    return ops


# -- the run ---------------------------------------------------------------------------------
def _lab(args):
    """The decisive grid's pretrained lab writing into ``args.out`` (the two read-only stage
    directories of ``--from-cache`` linked into its cache)."""
    from asft_optim.lab import cli
    from asft_optim.lab.pretrained_lab import PretrainedLab

    cache = args.out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for src in sorted(args.from_cache.iterdir()):
        if src.name.split("-")[0] in ("base", "aligned") and not (cache / src.name).exists():
            (cache / src.name).symlink_to(src.resolve(), target_is_directory=True)
    lab_args = cli.add_parser(argparse.ArgumentParser().add_subparsers()).parse_args(
        ["--preset", "pretrained", "--data", args.data, "--grid", "decisive", "--poison", str(args.poison),
         "--no-progress", "--out", str(args.out)])
    cfg, settings = cli._config(lab_args), cli._settings(lab_args)
    data = cli._data(lab_args, cfg, settings)
    return PretrainedLab(cfg, data, args.out, settings, progress=False), PretrainedLab(
        cfg, data, args.out, settings, progress=False, cached_only=True)


def _attack_rows(data, poison: float, seed: int, task_rows: int):
    """The harmful rows the attack adds at ``poison`` and a fixed sample of its task rows."""
    rows = data.attack_set(poison, seed)  # the task rows, then the harmful rows it adds
    task, harmful = rows[: len(data.attack_task)], rows[len(data.attack_task):]
    task = random.Random(f"geometry-{seed}").sample(task, min(task_rows, len(task)))
    return harmful, task


def _summary(result: dict, ops: dict) -> dict:
    """Per operator: mean over the weights (all, q, v) of each share, the ratio, the chance."""
    out = {}
    for op, shares in ops.items():
        row = {"chance": sum(s.chance for s in shares.values()) / len(shares)}
        for agg in ("summed", "per_row"):
            for kind in ("harmful", "task"):
                for part, keep in (("", ""), ("_q", "q_proj"), ("_v", "v_proj")):
                    vals = [v for n, v in result[kind][op][agg].items() if keep in n]
                    row[f"{kind}_{agg}{part}"] = sum(vals) / len(vals)
            h, t = row[f"harmful_{agg}"], row[f"task_{agg}"]
            row[f"ratio_{agg}"] = h / t if t else None
        out[op] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the reference data folder (../shared/data/asft)")
    p.add_argument("--from-cache", type=Path, required=True,
                   help="a lab cache holding the base and aligned stages (read only; linked, never written)")
    p.add_argument("--out", type=Path, required=True, help="this run's lab folder (the operators' stages land here)")
    p.add_argument("--seed", type=int, default=0, help="the attack seed whose harmful rows are measured")
    p.add_argument("--poison", type=float, default=0.1)
    p.add_argument("--task-rows", type=int, default=32, help="task rows sampled for the control")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/harmful_gradient_share.json"))
    p.add_argument("--md", type=Path, default=Path("benchmarks/results/harmful_gradient_share.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from asft_optim.lab.models import answer_loss, load
    from asft_optim.lab.runner import NotCached
    from asft_optim.lab.tokenizer import encode_example

    lab, cached = _lab(args)
    try:  # never rebuild the aligned model (40+ minutes): its stage must be found as it is
        aligned_dir, aligned_info = cached.aligned(args.seed)
    except NotCached as e:
        raise SystemExit(f"the lab's stage {e.args} is not in {args.from_cache}: this script never rebuilds it") from None
    start = time.perf_counter()
    model = load(aligned_dir).eval()
    ops = lab_operators(lab, args.seed, lab.config.attack, model)
    built = time.perf_counter() - start
    tok, _ = lab.tokenizer()
    harmful, task = _attack_rows(lab.data, args.poison, args.seed, args.task_rows)
    max_length = lab.config.model.max_length
    result = {}
    for kind, rows in (("harmful", harmful), ("task", task)):
        encoded = [encode_example(tok, e, max_length) for e in rows]
        result[kind] = measure(model, encoded, ops, answer_loss)
    summary = _summary(result, ops)
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "torch": torch.__version__,
              "python": platform.python_version(), "aligned": aligned_info["key"], "seed": args.seed,
              "poison": args.poison, "rows": {"harmful": len(harmful), "task": len(task)},
              "max_length": max_length, "operators_seconds": round(built, 1),
              "measure_seconds": round(time.perf_counter() - start - built, 1),
              "summary": summary, "per_weight": result}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    args.md.write_text(markdown(record) + "\n")
    print(markdown(record))
    return 0


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def markdown(record: dict) -> str:
    """The table: per operator, the shares (%) of the summed gradient and the per-row mean."""
    r = record["rows"]
    lines = [f"# Share of the attack's gradient each operator acts on (aligned {record['aligned']}, "
             f"p = {record['poison']}, seed {record['seed']}: {r['harmful']} harmful rows, {r['task']} task rows)",
             "", f"Command: `{record['command']}` (torch {record['torch']})", "",
             "Mean over the q/v weights of the 30 layers; % of ‖G‖². `summed`: the gradient over all the rows "
             "(the first step's direction); `per row`: mean of each row's own share; chance: k/d.", "",
             "| operator | harmful summed | task summed | ratio summed | harmful per row | task per row "
             "| ratio per row | harmful q / v (summed) | chance |",
             "|---|---|---|---|---|---|---|---|---|"]
    for op, s in record["summary"].items():
        ratio = {a: "–" if s[f"ratio_{a}"] is None else f"{s[f'ratio_{a}']:.2f}" for a in ("summed", "per_row")}
        lines.append(f"| {op} | {_pct(s['harmful_summed'])} | {_pct(s['task_summed'])} | {ratio['summed']} "
                     f"| {_pct(s['harmful_per_row'])} | {_pct(s['task_per_row'])} | {ratio['per_row']} "
                     f"| {_pct(s['harmful_summed_q'])} / {_pct(s['harmful_summed_v'])} | {_pct(s['chance'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
