"""The data-driven operators of the methods ``input``, ``input-contrast``, ``spf`` and
``safegrad`` (its refusal examples): built
once per aligned model from the defender's own prompts, a cached stage of their own.

**The defender's data** (:func:`defender_prompts`). Harmful prompts: the lab's
known-harmful pool (``LabData.known_harmful``, AsFT_Alt's rows: prompts only are read, never
their compliant answers) and the refusal prompts of the alignment (``align_train`` rows
answered with a refusal). Task prompts: the alignment's other rows (``align_train``'s task
replay and, in the world, its benign requests): what the defender trained the aligned
model on. Never read: the attack's rows (the attacker's) and the evaluation sets
(``harmful_eval``, ``test``); an overlap raises :class:`ValueError`.

**The split** (:func:`split_prompts`). Each pool is shuffled once with a fixed seed, then
even positions *build* the operator and odd positions *validate* it, at most
``AttackConfig.operator_prompts`` each. The validation half chooses the design (rank,
form, ε) and is never used to build; the evaluation prompts only judge.

**The criterion**, recorded in every operator stage's ``done.json`` (``validation``), is
:func:`~asft_optim.safety_subspace.captured_share` on the validation half:

* input-side anchors: the share of held-out harmful-prompt input energy inside span(U)
  (what the penalty holds) against the share of held-out task-prompt input energy (what it
  costs the task), mean over the anchored weights, for every rank of :data:`DESIGN_RANKS`;
* safety subspace: the share of the held-out refusal gradients' energy inside span(Q) (what
  the projection removes of the refusal's direction) against the share of the held-out
  task gradients' energy (what it removes of the task's), for every rank.

A design is good when the first share is high and the second low; equal shares (ratio
≈ 1) mean the operator does not tell harmful from task inputs and should trace L2.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from asft_optim.activation_anchors import (
    anchors_from_covariances,
    contrast_directions,
    input_covariances,
    top_directions,
)
from asft_optim.input_anchors import InputAnchors
from asft_optim.prompt_tokens import right_padded_batches, shared_prefix_length
from asft_optim.refusal_gradients import SafetySubspaces, greedy_refusals, refusal_grams
from asft_optim.safety_subspace import SafetySubspace, captured_share, subspace_from_gram

from .data import Example, LabData
from .judge import REFUSALS, is_refusal
from .models import model_device
from .tokenizer import encode_example, prompt_ids, render_prompt

#: The operator file inside an operator stage's directory.
OPERATOR_FILE = "operator.safetensors"
#: ``spf``: the stage keeps this many directions per weight (fewer where d_out is smaller);
#: every swept rank is a prefix of them (the top-k eigenvectors of one Gram matrix are
#: nested), so the rank sweep shares one build.
SPF_MAX_RANK = 64
#: Ranks at which each stage measures the validation criterion (those ≤ the weight's size).
DESIGN_RANKS = (4, 8, 16, 32, 64)
_ENERGY_FILE = "energy.json"  # spf: per weight, the energy share kept by each prefix rank


@dataclass(frozen=True)
class DefenderPrompts:
    """The defender's prompts: ``(instruction, input)`` pairs, harmful and task, and the task
    rows with their answers (for the task gradients of the ``spf`` criterion)."""

    harmful: list[tuple[str, str]]
    task: list[Example]

    def fingerprint(self) -> str:
        import hashlib

        text = json.dumps({"harmful": self.harmful, "task": [asdict(e) for e in self.task]})
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _unique(pairs):
    return list(dict.fromkeys(pairs))


def defender_prompts(data: LabData) -> DefenderPrompts:
    """The defender's harmful and task prompts of ``data`` (see the module docstring).

    Raises:
        ValueError: no harmful prompt, or a defender prompt that is also an evaluation
            prompt (``harmful_eval``, ``test``) or an attack row.
    """
    harmful = _unique([(e.instruction, e.input) for e in data.known_harmful]
                      + [(e.instruction, e.input) for e in data.align_train if e.output in REFUSALS])
    task_rows = list({(e.instruction, e.input): e for e in data.align_train if e.output not in REFUSALS}.values())
    if not harmful:
        raise ValueError(f"{data.name}: the defender holds no harmful prompt (known_harmful and the "
                         "alignment's refusals are empty); the data-driven operators need some")
    evaluation = set(data.harmful_eval)
    if bad := [i for i, _ in harmful if i in evaluation]:
        raise ValueError(f"defender's harmful prompt {bad[0]!r} is a harmful evaluation prompt: the operators "
                         "must never be built from data.harmful_eval (the evaluation prompts only judge)")
    attack_rows = list(data.attack_task) + list(data.attack_harmful)
    attack_rows += [e for rows in data.attack_sets.values() for e in rows]
    attack = {(e.instruction, e.input) for e in attack_rows}
    tests = {(t.instruction, t.input) for t in data.test}
    for kind, pairs in (("harmful", harmful), ("task", [(e.instruction, e.input) for e in task_rows])):
        if bad := [p for p in pairs if p in attack]:
            raise ValueError(f"defender's {kind} prompt {bad[0][0][:60]!r} is an attack row: the attack's rows "
                             "are the attacker's, not the defender's")
        if bad := [p for p in pairs if p in tests or p[0] in evaluation]:
            raise ValueError(f"defender's {kind} prompt {bad[0][0][:60]!r} is an evaluation row")
    return DefenderPrompts(harmful, task_rows)


def split_prompts(rows: list, cap: int) -> tuple[list, list]:
    """``(build, validation)``: ``rows`` shuffled with a fixed seed, even positions and odd
    positions, at most ``cap`` each."""
    if not (isinstance(cap, int) and cap >= 1):
        raise ValueError(f"operator_prompts must be a positive int, got {cap!r}")
    rows = list(rows)
    random.Random("defender-split").shuffle(rows)
    return rows[0::2][:cap], rows[1::2][:cap]


# -- tokens -----------------------------------------------------------------------------
def _ids(tokenizer, pairs, max_length: int) -> list[torch.Tensor]:
    """Token ids of each prompt as the lab renders it for training and evaluation."""
    return [torch.tensor(prompt_ids(tokenizer, render_prompt(tokenizer, i, x))[:max_length]) for i, x in pairs]


def _batches(tokenizer, ids: list[torch.Tensor], skip: int, device) -> list[dict[str, torch.Tensor]]:
    skip = min(skip, min(len(t) for t in ids) - 1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [{k: v.to(device) for k, v in b.items()}
            for b in right_padded_batches(ids, 16, pad, skip_prefix=skip)]


# -- input-side anchors ------------------------------------------------------------------
def build_input_operator(ctx, out: Path, contrast: bool) -> dict[str, Any]:
    """The ``input`` / ``input-contrast`` stage: covariances of the aligned model's layer inputs
    on the four prompt sets (one forward pass per batch, no backward), the anchors from the
    build half (saved to ``out / OPERATOR_FILE``), the criterion on the validation half."""
    a, tok, model = ctx.config, ctx.tokenizer, ctx.model
    prompts = defender_prompts(ctx.data)
    harm_b, harm_v = split_prompts(prompts.harmful, a.operator_prompts)
    task_b, task_v = split_prompts([(e.instruction, e.input) for e in prompts.task], a.operator_prompts)
    sets = {"harmful_build": harm_b, "harmful_validation": harm_v, "task_validation": task_v}
    if contrast:
        sets["task_build"] = task_b
    ids = {k: _ids(tok, v, ctx.max_length) for k, v in sets.items() if v}
    if contrast and "task_build" not in ids:
        raise ValueError("input-contrast needs task prompts: the alignment has no task row")
    skip = shared_prefix_length([t for v in ids.values() for t in v])  # the template's shared prefix
    targets = list(a.target_modules)
    start = time.perf_counter()
    covs = {k: input_covariances(model, _batches(tok, v, skip, model_device(model)), targets) for k, v in ids.items()}
    forward = time.perf_counter() - start
    anchors = anchors_from_covariances(model, covs["harmful_build"], covs.get("task_build"), target_modules=targets,
                                       rank=a.input_rank, eps=a.input_eps)
    anchors.metadata.update(aligned_dir=str(ctx.aligned_dir), harmful_prompts=str(len(harm_b)),
                            task_prompts=str(len(task_b) if contrast else 0), source="asft lab defender prompts")
    anchors.save(out / OPERATOR_FILE)
    start = time.perf_counter()
    table = input_design_table(covs, contrast, a.input_eps)
    return {"form": "contrast" if contrast else "plain", "rank": a.input_rank,
            "eps": a.input_eps if contrast else None, "weights": len(anchors),
            "prompts": {k: len(v) for k, v in sets.items()}, "skipped_prefix_tokens": skip,
            "tokens": {k: next(iter(c.values())).tokens for k, c in covs.items()},
            "forward_seconds": round(forward, 2), "validation": table.get(str(a.input_rank)) or _measure(anchors, covs),
            "design_table": table, "design_seconds": round(time.perf_counter() - start, 2)}


def _measure(anchors: InputAnchors, covs) -> dict[str, float | None]:
    """The criterion for ``anchors`` (a rank outside :data:`DESIGN_RANKS`)."""
    out = {}
    for split in ("harmful_validation", "task_validation"):
        c = covs.get(split)
        out[split] = None if c is None else _mean(captured_share(p.basis, c[n].mean) for n, p in anchors.items())
    return _with_ratio(out)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _with_ratio(row: dict[str, float | None]) -> dict[str, float | None]:
    h, t = row.get("harmful_validation"), row.get("task_validation")
    return {**row, "ratio": None if h is None or not t else h / t}


def input_design_table(covs: dict, contrast: bool, eps: float) -> dict[str, dict[str, float | None]]:
    """The criterion at every rank of :data:`DESIGN_RANKS` (those ≤ d_in): ``{"k": {"harmful_validation",
    "task_validation", "ratio"}}``, mean over the weights, from the build half's covariances.

    One decomposition per distinct layer input (q/k/v of a layer read the same input), every
    rank a prefix of it: the plain form's eigenvectors are nested, and the contrast form's
    QR of a prefix of its generalised eigenvectors is the prefix of their QR.
    """
    rows: dict[int, dict[str, list[float]]] = {}
    done: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, cov in covs["harmful_build"].items():
        layer = name.rsplit(".", 2)[0]
        if layer in done and torch.equal(done[layer][0], cov.total):
            full = done[layer][1]
        else:
            h = cov.mean
            full = (torch.linalg.qr(contrast_directions(h, covs["task_build"][name].mean, rank=h.shape[0], eps=eps)[2]).Q
                    if contrast else top_directions(h, rank=h.shape[0])[0])
            done[layer] = (cov.total, full)
        for k in (k for k in DESIGN_RANKS if k <= full.shape[1]):
            for split in ("harmful_validation", "task_validation"):
                if split in covs:
                    rows.setdefault(k, {}).setdefault(split, []).append(captured_share(full[:, :k], covs[split][name].mean))
    return {str(k): _with_ratio({s: _mean(v) for s, v in r.items()}) for k, r in rows.items()}


# -- safety subspace (spf) ---------------------------------------------------------------
def _task_examples(tokenizer, rows: list[Example], max_length: int, device) -> list[dict[str, torch.Tensor]]:
    """The task rows with their own answers, one teacher-forced example each."""
    out = []
    for e in rows:
        enc = encode_example(tokenizer, e, max_length)
        if any(t != -100 for t in enc["labels"]):
            out.append({k: torch.tensor(v, device=device)[None] for k, v in enc.items()})
    return out


def _answers(ctx, pairs) -> tuple[list[dict[str, torch.Tensor]], list[bool]]:
    """The aligned model's greedy answers to ``pairs`` and, per answer, whether it is a refusal."""
    device = model_device(ctx.model)
    ids = [t.to(device) for t in _ids(ctx.tokenizer, pairs, ctx.max_length)]
    examples = greedy_refusals(ctx.model, ids, max_new_tokens=ctx.config.refusal_tokens,
                               eos_token_id=ctx.tokenizer.eos_token_id)
    answers = [ctx.tokenizer.decode(e["input_ids"][0, len(t):], skip_special_tokens=True) for e, t in zip(examples, ids)]
    return examples, [is_refusal(a) for a in answers]


def _refusals(ctx, pairs) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The aligned model's greedy answers to ``pairs`` and how many of them are refusals."""
    examples, refused = _answers(ctx, pairs)
    return examples, sum(refused)


def build_refusal_operator(ctx, out: Path) -> dict[str, Any]:
    """The ``spf`` stage: the aligned model's greedy answers to the build half, the per-example
    refusal-loss gradients' Gram matrix per weight, its top :data:`SPF_MAX_RANK` eigenvectors
    (saved to ``out / OPERATOR_FILE``, each prefix's energy share to ``energy.json``), and the
    criterion on the validation half (held-out refusal gradients, task gradients)."""
    a, model = ctx.config, ctx.model
    prompts = defender_prompts(ctx.data)
    harm_b, harm_v = split_prompts(prompts.harmful, a.operator_prompts)
    _, task_v = split_prompts(prompts.task, a.operator_prompts)
    targets = list(a.target_modules)
    start = time.perf_counter()
    examples, refused = _refusals(ctx, harm_b)
    generate = time.perf_counter() - start
    grams, infos, n = refusal_grams(model, examples, target_modules=targets)
    backward = time.perf_counter() - start - generate
    subs, energy = {}, {}
    for name, gram in grams.items():
        k = min(SPF_MAX_RANK, gram.shape[0])
        subs[name] = subspace_from_gram(gram, rank=k, d_in=infos[name].out_in_shape[1], name=name).to("cpu", torch.float32)
        evals = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
        energy[name] = (torch.cumsum(evals, 0)[:k] / evals.sum()).tolist()
    metadata = {"side": "gradient", "source": "refusal-gradients", "examples": str(n), "rank": str(SPF_MAX_RANK),
                "target_modules": ",".join(targets), "aligned_dir": str(ctx.aligned_dir),
                "harmful_prompts": str(len(harm_b)), "refusal_tokens": str(a.refusal_tokens)}
    SafetySubspaces(subs, metadata, infos).save(out / OPERATOR_FILE)
    (out / _ENERGY_FILE).write_text(json.dumps(energy))
    start = time.perf_counter()
    held = {}
    if harm_v:
        held["harmful_validation"], refused_v = _refusals(ctx, harm_v)
    task = _task_examples(ctx.tokenizer, task_v, ctx.max_length, model_device(model))
    if task:
        held["task_validation"] = task
    table = gradient_design_table(model, subs, held, targets)
    return {"weights": len(subs), "max_rank": min(s.rank for s in subs.values()), "prompts": {"harmful_build": len(harm_b),
            "harmful_validation": len(harm_v), "task_validation": len(task)},
            "refused": {"build": refused, "validation": refused_v if harm_v else None},
            "generate_seconds": round(generate, 2), "backward_seconds": round(backward, 2),
            "design_table": table, "validation_seconds": round(time.perf_counter() - start, 2)}


def gradient_design_table(model, subs, held: dict, targets) -> dict[str, dict[str, float | None]]:
    """The ``spf`` criterion at every rank of :data:`DESIGN_RANKS` within the built rank:
    ``{"k": {"harmful_validation", "task_validation", "ratio"}}``, the share of each held-out
    set's gradient energy inside span(Q_k), mean over the weights (one backward per example)."""
    grams = {split: refusal_grams(model, ex, target_modules=targets)[0] for split, ex in held.items()}
    rows: dict[str, dict[str, float | None]] = {}
    for k in DESIGN_RANKS:
        row = {}
        for split in ("harmful_validation", "task_validation"):
            g = grams.get(split)
            row[split] = None if g is None else _mean(
                captured_share(s.basis[:, : min(k, s.rank)], g[n]) for n, s in subs.items())
        rows[str(k)] = _with_ratio(row)
        if all(k >= s.rank for s in subs.values()):
            break
    return rows


def load_safety_subspaces(directory: Path, rank: int) -> SafetySubspaces:
    """The ``spf`` stage's subspaces cut to their top ``rank`` directions (exactly what
    :func:`~asft_optim.refusal_subspaces` with ``rank=`` gives on the same examples)."""
    subs = SafetySubspaces.load(Path(directory) / OPERATOR_FILE)
    energy = json.loads((Path(directory) / _ENERGY_FILE).read_text())
    if not (isinstance(rank, int) and 1 <= rank <= min(s.rank for s in subs.values())):
        raise ValueError(f"spf_rank {rank!r} must be an int in [1, {min(s.rank for s in subs.values())}] "
                         f"(the stage keeps {SPF_MAX_RANK} directions, fewer where a weight has fewer outputs)")
    cut = {n: SafetySubspace(s.basis[:, :rank].contiguous(), s.d_in, energy[n][rank - 1]) for n, s in subs.items()}
    return SafetySubspaces(cut, {**subs.metadata, "rank": str(rank)}, subs.weights)


# -- refusal examples (safegrad) ---------------------------------------------------------
#: The ``safegrad`` stage's file: the refusal examples' token ids, concatenated.
REFUSALS_FILE = "refusals.safetensors"


def build_refusal_examples(ctx, out: Path) -> dict[str, Any]:
    """The ``safegrad`` stage: the aligned model's greedy answers to the build half of the
    defender's harmful prompts (the ``spf`` stage's prompts and answers), saved as token ids
    (``input_ids``, ``labels`` with the prompt at -100, ``lengths``) to ``out / REFUSALS_FILE``.

    Every answer is kept, refusal or not: the safety loss is their NLL, the hard-label form
    of SafeGrad's KL to the aligned model on harmful prompts, i.e. "answer these as the
    aligned model did". An answer that complied asks for no more compliance than the aligned
    model already had there (and a lab whose aligned model refuses nothing, as the tiny one,
    still runs). How many were refusals is recorded."""
    from safetensors.torch import save_file

    prompts = defender_prompts(ctx.data)
    harm_b, _ = split_prompts(prompts.harmful, ctx.config.operator_prompts)
    start = time.perf_counter()
    examples, refused = _answers(ctx, harm_b)
    save_file({"input_ids": torch.cat([e["input_ids"][0].cpu() for e in examples]),
               "labels": torch.cat([e["labels"][0].cpu() for e in examples]),
               "lengths": torch.tensor([e["input_ids"].shape[1] for e in examples])}, str(out / REFUSALS_FILE))
    return {"prompts": len(harm_b), "examples": len(examples), "refused": sum(refused),
            "generate_seconds": round(time.perf_counter() - start, 2)}


def load_refusal_examples(directory: Path) -> list[dict[str, list[int]]]:
    """The ``safegrad`` stage's examples as encoded rows (``input_ids``, ``labels``) for the
    lab's :class:`~asft_optim.lab.tokenizer.Collator`."""
    from safetensors.torch import load_file

    t = load_file(str(Path(directory) / REFUSALS_FILE))
    ids, labels = torch.split(t["input_ids"], t["lengths"].tolist()), torch.split(t["labels"], t["lengths"].tolist())
    return [{"input_ids": i.tolist(), "labels": la.tolist()} for i, la in zip(ids, labels, strict=True)]
