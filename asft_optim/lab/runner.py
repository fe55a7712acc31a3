"""The lab's stages, each cached on disk under a hash of its inputs.

``cache/<stage>-<hash>/`` holds a stage's outputs; ``done.json`` is written last, so an
interrupted stage is redone, never half-read. A stage's key contains its parent's key,
so changing the base model's training invalidates everything below it, while adding a
method or a poison ratio reuses the base and aligned models.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from .attack import AttackConfig, AttackContext, get_method, load_attacked, lora_model, train_attack
from .config import LabConfig
from .data import LabData
from .evaluate import evaluate
from .geometry import update_geometry
from .judge import REFUSALS, get_judge
from .models import fit, load, new_model, save, seed_everything
from .operators import defender_prompts
from .records import RecordStore, setting_fingerprint
from .tokenizer import format_prompt, train_tokenizer

#: Bump when a stage's code changes its outputs: part of every cache key.
LAB_VERSION = 1

_SHARED_ATTACK_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "train")


class NotCached(LookupError):
    """A stage a ``cached_only`` lab would have to build (its kind and key in ``args``)."""


class GridPoint(NamedTuple):
    """One attacked point of a grid, for every seed: what :meth:`Lab.run` evaluates."""

    method: str  # the method's name (:data:`~asft_optim.lab.attack.METHODS`)
    label: str  # the record's ``method``: the name, or the name and its swept value
    attack: AttackConfig | None  # None: the config's own
    variant: dict | None  # the record's ``variant`` (None: the record has none)
    poison: float


def _key(payload: dict[str, Any]) -> str:
    text = json.dumps({"lab_version": LAB_VERSION, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _examples_hash(rows) -> str:
    return hashlib.sha256(json.dumps([asdict(r) for r in rows]).encode()).hexdigest()[:16]


class Lab:
    """Runs the stages for one :class:`LabConfig` on one :class:`LabData`.

    Args:
        config: the settings.
        data: the world or the real-data files, loaded.
        out: output directory; the cache lives in ``out/cache`` (default ``./lab-runs/...``).
        progress: show tqdm bars.
        cached_only: build nothing; :meth:`run` reports the grid points whose stages are
            all cached and lists the others in :attr:`not_run` (a grid spanning sessions).
        device: where the models train and are evaluated (``"cpu"`` or ``"cuda"``). Not
            ``"cpu"``: part of every stage's key, so a GPU run never reuses a CPU run's
            stages (other kernels, other numbers) and CPU keys stay what they were.
        plan: build nothing and read no model: walk the grid, listing in :attr:`planned`
            every stage that is not cached (a stage's key needs only its parents' keys, so
            the whole tree is known before anything is built); :meth:`run` returns no
            records. :func:`plan_summary` turns it into counts and a time estimate.
        records: a folder of point records (:mod:`~asft_optim.lab.records`): every finished
            point is written there at once, and a point found there is not built (nor its
            parents); with ``plan``, only what the records and the cache lack is counted.
    """

    #: Attacks train with :func:`~asft_optim.lab.models.answer_loss` (the pretrained preset).
    answer_logits = False
    #: The grid sweeps the methods' settings: the report adds the matched-FA table, the
    #: verdict and the Pareto plots (:func:`~asft_optim.lab.report.write_lab_report`).
    report_fronts = False

    def __init__(self, config: LabConfig, data: LabData, out: Path, *, progress: bool = True,
                 cached_only: bool = False, device: str = "cpu", plan: bool = False,
                 records: str | Path | None = None):
        if plan and cached_only:
            raise ValueError("plan and cached_only are two different dry runs: pick one")
        self.config, self.data, self.out, self.progress = config, data, Path(out), progress
        self.cached_only = cached_only
        self.plan = plan
        #: ``plan``: the stages this grid would build, ``(kind, key)`` in the order met
        self.planned: dict[tuple[str, str], None] = {}
        self.device = device
        #: grid points skipped by ``cached_only``: seed, method, poison and the missing stage
        self.not_run: list[dict[str, Any]] = []
        self.cache = self.out / "cache"
        self.judge = get_judge(config.judge)
        self.timings: dict[str, float] = {}  # stages built in this run, per kind
        #: every stage this run used, built or cached: (kind, key) -> the seconds its build took
        #: (None for a stage cached before builds recorded it); sums to the grid's compute.
        self.stage_seconds: dict[tuple[str, str], float | None] = {}
        self._tok: PreTrainedTokenizerFast | None = None
        self._records_dir = None if records is None else Path(records)
        self._store: RecordStore | None = None
        self._plan_run = plan
        self._serve = False  # inside :meth:`_served`'s probe: stages may come from the records
        #: stages read from the record store instead of the cache: (kind, key) -> build seconds
        self.recorded: dict[tuple[str, str], float | None] = {}

    # -- records -----------------------------------------------------------------------
    def setting(self) -> dict[str, Any]:
        """What makes two points' numbers comparable beyond their stage keys: the judge, the
        device and the evaluation sets (the verdict never averages two settings)."""
        return {"lab_version": LAB_VERSION, "judge": self.judge.name, "device": self.device,
                **self._evaluation_key()}

    @property
    def records(self) -> RecordStore | None:
        """The record store of ``records=`` (None without one)."""
        if self._store is None and self._records_dir is not None:
            self._store = RecordStore(self._records_dir, LAB_VERSION, self.setting(), self.record_settings())
        return self._store

    def record_settings(self) -> dict[str, dict[str, Any]]:
        """Record kinds whose numbers depend on less than :meth:`setting`, and what they
        depend on (:class:`~asft_optim.lab.records.RecordStore`'s ``kind_settings``; none here)."""
        return {}

    def _served(self, fn):
        """``fn()`` (a stage's info), read from the record store when the cache lacks it,
        without building or planning its parents; else ``fn()`` as usual.

        A probe first walks ``fn`` as a plan that may read records: a leaf stage found in the
        cache or the store ends it; otherwise ``fn`` runs for real (builds, plans, or raises
        :class:`NotCached`), its parents with it.
        """
        if self.records is None:
            return fn()
        saved = (self.plan, self.cached_only, dict(self.planned))
        self.plan, self.cached_only, self._serve = True, False, True
        try:
            info = fn()
        finally:
            self.plan, self.cached_only, self._serve = saved[0], saved[1], False
            self.planned = saved[2]
        return fn() if info.get("planned") else info

    def _keep(self, kind: str, key: str, info: dict, meta: dict | None) -> None:
        """Write a point's record (once) when a store is attached; ``--plan`` writes nothing."""
        if meta is not None and self.records is not None and not self._plan_run and not self.records.has(kind, key):
            self.records.put(kind, key, info, meta)

    # -- cache -------------------------------------------------------------------------
    def _stage(self, kind: str, payload: dict[str, Any], build, meta: dict | None = None) -> tuple[Path, dict]:
        """Return ``(dir, done.json content)``, running ``build(tmp_dir) -> dict`` if not cached.

        ``meta`` (what the point is: method, ratio, seed) marks a stage whose outputs the
        report reads, not its directory: it is written to the record store, and within
        :meth:`_served` read from it."""
        if self.device != "cpu":
            payload = {**payload, "device": self.device}
        key = _key({"stage": kind, **payload})
        final = self.cache / f"{kind}-{key}"
        if (final / "done.json").exists():
            info = json.loads((final / "done.json").read_text())
            self.stage_seconds[(kind, key)] = info.get("seconds")
            self._keep(kind, key, info, meta)
            return final, info
        if self._serve and meta is not None and self.records is not None:
            info = self.records.get(kind, key)
            if info is not None:
                self.recorded[(kind, key)] = info.get("seconds")
                return final, info
        if self.cached_only:
            raise NotCached(kind, key)
        if self.plan:  # its children need only its key
            self.planned[(kind, key)] = None
            return final, {"key": key, "planned": True}
        # A temporary directory per process: lab processes sharing one cache (a grid run
        # in parallel, benchmarks/lab_parallel.sh) never write into each other's stage.
        tmp = self.cache / f".{kind}-{key}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        start = time.perf_counter()
        info = build(tmp)
        elapsed = time.perf_counter() - start
        info = {"key": key, **info, "seconds": round(elapsed, 1)}
        self.timings[kind] = self.timings.get(kind, 0.0) + elapsed
        self.stage_seconds[(kind, key)] = info["seconds"]
        (tmp / "done.json").write_text(json.dumps(info, indent=1, sort_keys=True))
        self._keep(kind, key, info, meta)  # at once: a killed run never loses a finished point
        if not (final / "done.json").exists():
            shutil.rmtree(final, ignore_errors=True)  # an older, unfinished copy
            try:
                tmp.rename(final)
                return final, info
            except OSError:  # another process finished the same stage a moment ago
                if not (final / "done.json").exists():
                    raise
        # Another process built this stage first: keep its copy, the one every reader sees.
        shutil.rmtree(tmp, ignore_errors=True)
        return final, json.loads((final / "done.json").read_text())

    # -- stages ------------------------------------------------------------------------
    def tokenizer(self) -> tuple[PreTrainedTokenizerFast, str]:
        d = self.data
        # Without the attack files: a new poison ratio must not retrain the models above it.
        payload = {"data": d.fingerprint(attack_sets=False), "vocab": self.config.vocab_size}

        def build(tmp: Path) -> dict:
            texts = [format_prompt(e.instruction, e.input) + e.output
                     for e in d.base_train + d.align_train + d.attack_task + d.attack_harmful]
            texts += [format_prompt(t.instruction, t.input) for t in d.test] + list(d.harmful_eval)
            texts += REFUSALS + d.labels
            train_tokenizer(texts, self.config.vocab_size).save_pretrained(tmp)
            return {}

        path, info = self._stage("tokenizer", payload, build)
        if self._tok is None and not info.get("planned"):
            self._tok = PreTrainedTokenizerFast.from_pretrained(path)
        return self._tok, info["key"]

    def model_seed(self, seed: int) -> int:
        """The seed of the base/aligned pair that grid seed ``seed`` attacks."""
        return seed if self.config.model_seed is None else self.config.model_seed

    def base(self, seed: int) -> tuple[Path, dict]:
        """Stage 1: from scratch on the task and compliant answers."""
        tok, tok_key = self.tokenizer()
        c = self.config
        seed = self.model_seed(seed)
        payload = {"tokenizer": tok_key, "model": asdict(c.model), "train": asdict(c.base), "seed": seed,
                   "rows": _examples_hash(self.data.base_train)}

        def build(tmp: Path) -> dict:
            model = new_model(c.model, tok, seed).to(self.device)
            losses = fit(model, tok, self.data.base_train, c.base, seed, c.model.max_length, progress=self.progress)
            save(model, tok, tmp)
            return {"eval": self._evaluate(model, tok), "final_loss": losses[-1] if losses else None,
                    "parameters": sum(p.numel() for p in model.parameters())}

        return self._stage("base", payload, build, meta={"model": "base", "seed": seed})

    def aligned(self, seed: int) -> tuple[Path, dict]:
        """Stage 2: the base fully fine-tuned on refusals (a disjoint pool) and task replay."""
        tok, _ = self.tokenizer()
        seed = self.model_seed(seed)
        base_dir, base_info = self.base(seed)
        payload = {"base": base_info["key"], "train": asdict(self.config.align),
                   "rows": _examples_hash(self.data.align_train)}

        def build(tmp: Path) -> dict:
            model = load(base_dir, self.device).train()
            losses = fit(model, tok, self.data.align_train, self.config.align, seed,
                         self.config.model.max_length, progress=self.progress)
            save(model, tok, tmp)
            return {"eval": self._evaluate(model, tok), "final_loss": losses[-1] if losses else None}

        return self._stage("aligned", payload, build, meta={"model": "aligned", "seed": seed})

    def attack(self, method_name: str, poison: float, seed: int,
               attack: AttackConfig | None = None) -> tuple[Path, dict]:
        """Stages 3-4: anchors from the two checkpoints, LoRA attack; the adapter is saved.

        ``attack`` replaces the config's :class:`AttackConfig` (a point of a λ sweep).
        """
        tok, _ = self.tokenizer()
        method = get_method(method_name)
        base_dir, _ = self.base(seed)
        aligned_dir, aligned_info = self.aligned(seed)
        examples = self.data.attack_set(poison, seed)
        a = attack or self.config.attack
        payload = {"aligned": aligned_info["key"], "method": method.name, "poison": poison, "seed": seed,
                   "rows": _examples_hash(examples),
                   "config": {f: getattr(a, f) for f in _SHARED_ATTACK_FIELDS + method.uses}}
        if method.reads_known_harmful:  # AsFT_Alt's harmful directions come from these rows
            payload["known_harmful"] = _examples_hash(self.data.known_harmful)
        if self.answer_logits:  # the same loss by another computation: a stage of its own
            payload["loss"] = "answer-logits"
        operator_dir = None
        if method.operator is not None:  # only these methods' keys carry it
            operator_dir, operator_info = self.operator(method_name, seed, attack)
            payload["operator"] = operator_info["key"]

        def build(tmp: Path) -> dict:
            seed_everything(seed)
            model = lora_model(aligned_dir, a, self.device)
            ctx = AttackContext(model, base_dir, aligned_dir, a, self.data, tok, self.config.model.max_length,
                                answer_logits=self.answer_logits, operator_dir=operator_dir)
            info = train_attack(ctx, method, examples, seed)
            model.save_pretrained(tmp / "adapter")
            return {"train": info, "rows": len(examples)}

        return self._stage("attack", payload, build)

    def operator(self, method_name: str, seed: int, attack: AttackConfig | None = None) -> tuple[Path, dict]:
        """Stage 3b: a method's data-driven operator (:class:`~asft_optim.lab.attack.Operator`),
        built from the aligned model and the defender's prompts
        (:func:`~asft_optim.lab.operators.defender_prompts`, checked disjoint from the
        evaluation sets and the attack's rows), once for every attack that reads it."""
        tok, _ = self.tokenizer()
        op = get_method(method_name).operator
        if op is None:
            raise ValueError(f"method {method_name!r} reads no data-driven operator")
        base_dir, _ = self.base(seed)
        aligned_dir, aligned_info = self.aligned(seed)
        a = attack or self.config.attack
        prompts = defender_prompts(self.data)
        payload = {"aligned": aligned_info["key"], "operator": op.kind, "prompts": prompts.fingerprint(),
                   "max_length": self.config.model.max_length,
                   "config": {f: getattr(a, f) for f in ("target_modules",) + op.uses}}

        def build(tmp: Path) -> dict:  # deterministic: eval mode, greedy answers
            seed_everything(self.model_seed(seed))
            model = load(aligned_dir, self.device)
            ctx = AttackContext(model, base_dir, aligned_dir, a, self.data, tok, self.config.model.max_length,
                                answer_logits=self.answer_logits)
            return op.build(ctx, tmp)

        return self._stage(op.kind, payload, build)

    def evaluation(self, method_name: str, poison: float, seed: int,
                   attack: AttackConfig | None = None) -> dict:
        """Stage 5 for one grid point (post-hoc methods apply their projection first); from
        the record store, when one is attached and holds it, without building its parents."""
        return self._served(lambda: self._evaluation(method_name, poison, seed, attack))

    def _evaluation(self, method_name: str, poison: float, seed: int, attack: AttackConfig | None) -> dict:
        tok, _ = self.tokenizer()
        method = get_method(method_name)
        trained = method.trains_as or method.name
        attack_dir, attack_info = self.attack(trained, poison, seed, attack)
        base_dir, _ = self.base(seed)
        aligned_dir, _ = self.aligned(seed)
        a = attack or self.config.attack
        payload = {"attack": attack_info["key"], "method": method.name, "judge": self.judge.name,
                   "config": {f: getattr(a, f) for f in method.uses}, **self._evaluation_key()}

        def build(tmp: Path) -> dict:
            model, post = self._point_model(method, a, attack_dir, base_dir, aligned_dir, tok)
            geometry = update_geometry(model, base_dir, aligned_dir, rank=a.r)
            result = self._evaluate(model.merge_and_unload(), tok, seed)
            return {"eval": result, "geometry": geometry, "post": post, "train": attack_info["train"]}

        meta = {"method": method.name, "poison": poison, "seed": seed, "config": payload["config"]}
        return self._stage("eval", payload, build, meta=meta)[1]

    def _point_model(self, method, a: AttackConfig, attack_dir: Path, base_dir: Path, aligned_dir: Path, tok):
        """``(model, post)``: the aligned model with the point's adapter (PEFT, unmerged),
        after the method's post-hoc step (``post``: its info, ``{}`` for none)."""
        model = load_attacked(aligned_dir, attack_dir / "adapter", self.device)
        post = {}
        if method.post is not None:
            ctx = AttackContext(model, base_dir, aligned_dir, a, self.data, tok, self.config.model.max_length,
                                answer_logits=self.answer_logits)
            post = method.post(ctx)
        return model, post

    def point_extras(self, point: GridPoint, seed: int) -> dict:
        """What a preset adds to a point's record beyond its evaluation (none here): stages
        of its own, walked in a ``plan`` too (where they return nothing to add)."""
        return {}

    def aligned_extras(self, seed: int) -> dict:
        """What a preset adds to the aligned model's record (none here)."""
        return {}

    def _evaluate(self, model, tok, seed: int | None = None) -> dict:
        """HS, FA and the capability guard of ``model`` (``seed``: the point's, for presets
        whose guard reads the seed's aligned model)."""
        return evaluate(model, tok, self.data, self.judge, progress=self.progress)

    def _evaluation_key(self) -> dict:
        """What an evaluation stage's key adds for this lab's way of evaluating."""
        return {}

    # -- the whole grid ------------------------------------------------------------------
    def grid_points(self) -> list[GridPoint]:
        """Every (method, poison) of the config, methods first; a typo fails before any training."""
        c = self.config
        for m in c.methods:
            get_method(m)
        return [GridPoint(m, m, None, None, p) for m in c.methods for p in c.poisons]

    def aligned_eval(self, seed: int) -> dict:
        """The aligned model's stage info with its ``eval`` (before any attack)."""
        return self._served(lambda: self.aligned(seed)[1])

    def run(self) -> list[dict]:
        """Every stage for every (seed, method, poison); returns the full records."""
        return self._run_grid(self.grid_points())

    def _run_grid(self, points: list[GridPoint]) -> list[dict]:
        """Per seed: the aligned model's record, then one record per point of ``points``.

        A seed whose aligned model is not cached (``cached_only``) is skipped whole; a point
        not cached is listed in :attr:`not_run`; a planned stage makes no record.
        """
        seeds = self.config.seeds
        records = []
        bar = tqdm(total=len(seeds) * (1 + len(points)), desc="lab", unit="run",
                   disable=not self.progress)
        for seed in seeds:
            bar.set_postfix_str(f"seed {seed}: base, aligned")
            try:
                info = self.aligned_eval(seed)
            except NotCached as e:
                self._skip(seed, "aligned", None, e)
                bar.update(1 + len(points))
                continue
            extras = self.aligned_extras(seed)  # walked in a plan too: its stages count
            if not info.get("planned"):
                records.append(self._with_setting(_record("aligned", None, seed, info["eval"])) | extras)
            bar.update()
            for point in points:
                bar.set_postfix_str(f"seed {seed}: {point.label} p={point.poison:g}")
                try:
                    info = self.evaluation(point.method, point.poison, seed, point.attack)
                except NotCached as e:
                    self._skip(seed, point.label, point.poison, e)
                else:
                    extras = self.point_extras(point, seed)  # walked in a plan too: its stages count
                    if not info.get("planned"):
                        rec = _record(point.label, point.poison, seed, info["eval"], info)
                        rec = self._with_setting(rec)
                        if point.variant is not None:
                            rec["variant"] = point.variant
                        # The settings the method reads (its swept one and the fixed ones): the
                        # report names the fixed ones and joins curves by them (CURVE_ENDS).
                        attack = point.attack or self.config.attack
                        rec["config"] = {f: getattr(attack, f) for f in get_method(point.method).uses}
                        records.append(rec | extras)
                bar.update()
        bar.close()
        return records

    def _with_setting(self, rec: dict) -> dict:
        """``rec`` tagged with the fingerprint of this lab's evaluation setting (the verdict
        refuses to average records of two settings)."""
        if not hasattr(self, "_setting_print"):  # the data's fingerprint hashes every row: once
            self._setting_print = setting_fingerprint(self.setting())
        return {**rec, "setting": self._setting_print}

    def _skip(self, seed: int, method: str, poison: float | None, e: NotCached) -> None:
        self.not_run.append({"seed": seed, "method": method, "poison_ratio": poison, "missing_stage": e.args[0]})

    def over_refusals(self) -> list[str]:
        """The report's over-refusal lines (none here: the world's models have no benign chat)."""
        return []

    def base_evals(self) -> list[dict]:
        """The base models' HS/FA (cached with stage 1), one per distinct model seed."""
        seeds = sorted({self.model_seed(s) for s in self.config.seeds})
        out = []
        for s in seeds:
            try:
                info = self._served(lambda s=s: self.base(s)[1])
            except NotCached:
                continue  # cached_only: the seed's aligned model is missing too, listed in not_run
            if not info.get("planned"):
                out.append(_record("base", None, s, info["eval"]))
        return out


def _record(method: str, poison: float | None, seed: int, ev: dict, info: dict | None = None) -> dict:
    rec = {"method": method, "poison_ratio": poison, "seed": seed,
           "harmful_score": ev["harmful_score"], "finetune_accuracy": ev["finetune_accuracy"]}
    # The per-prompt verdicts and per-row correctness (the verdict's bootstrap) and the
    # capability guard; stages cached before they were stored have none.
    for k in ("harmful_verdicts", "task_correct", "capability"):
        if k in ev:
            rec[k] = ev[k]
    if info is not None:
        rec["_detail"] = {"geometry": info["geometry"], "post": info["post"], "train": info["train"],
                          "examples": ev["examples"]}
    return rec



def _per_kind(stages) -> dict[str, int]:
    out: dict[str, int] = {}
    for kind, _ in stages:
        out[kind] = out.get(kind, 0) + 1
    return out


def plan_summary(lab: Lab) -> dict[str, Any]:
    """What a :class:`Lab` run with ``plan=True`` found: per stage kind, the stages cached
    and to build, and an estimate of the build time left.

    The estimate per kind is the median recorded build time of the grid's own cached
    stages of that kind (the best guess: same sizes, same machine if the cache is local);
    where the grid has none cached, the median over every stage of that kind in the cache
    (other grids': evaluations of another size, attacks on other layers); else unknown.
    The median, not the mean: a stage that shared the cores or was paused records a time
    many times its own, and one such stage would move a mean by minutes. It is an
    estimate, not a measurement: stages built on other hardware take other times.
    """
    kinds = list(dict.fromkeys([k for k, _ in lab.stage_seconds] + [k for k, _ in lab.planned]))
    everywhere: dict[str, list[float]] = {}
    for done in sorted(lab.cache.glob("*/done.json")) if lab.cache.is_dir() else []:
        sec = json.loads(done.read_text()).get("seconds")
        if sec is not None:
            everywhere.setdefault(done.parent.name.rsplit("-", 1)[0], []).append(sec)
    rows, left, unknown = [], 0.0, []
    for kind in kinds:
        mine = [s for (k, _), s in lab.stage_seconds.items() if k == kind and s is not None]
        todo = sum(k == kind for k, _ in lab.planned)
        if mine:
            typical, source = statistics.median(mine), "this grid"
        elif everywhere.get(kind):
            typical, source = statistics.median(everywhere[kind]), "other stages in the cache"
        else:
            typical, source = None, None
        if todo and typical is None:
            unknown.append(kind)
        estimate = None if typical is None else round(typical * todo, 1)
        left += estimate or 0.0
        rows.append({"kind": kind, "cached": sum(k == kind for k, _ in lab.stage_seconds),
                     "cached_seconds": round(sum(mine), 1), "to_build": todo,
                     "median_seconds": None if typical is None else round(typical, 1), "median_from": source,
                     "estimate_seconds": estimate})
    return {"stages": rows, "cached": len(lab.stage_seconds), "to_build": len(lab.planned),
            "recorded": len(lab.recorded), "recorded_per_kind": _per_kind(lab.recorded),
            "estimate_seconds": round(left, 1), "unknown_kinds": unknown,
            "to_build_stages": [f"{k}-{key}" for k, key in lab.planned]}
