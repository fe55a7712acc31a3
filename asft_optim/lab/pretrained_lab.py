"""``asft lab --preset pretrained``: the lab's stages on SmolLM2-135M-Instruct.

* **base**: the GGUF model dequantised and saved with ``save_pretrained``
  (:mod:`~asft_optim.lab.pretrained`); the model already chats, and complies with
  plainly harmful requests.
* **aligned**: our own short safety alignment, a full fine-tune of the decoder blocks'
  linear weights (embeddings and norms frozen) on refusals to one pool of harmful
  requests plus *self-distilled* replay: the base model's own greedy answers to AG News
  prompts and to general chat prompts. Why full fine-tuning: V = W_aligned − W_base is
  then full-rank, as for a real chat model, where a merged LoRA would make V rank ≤ r
  and the rank-8 anchors an artefact of that choice; it costs 1.2-1.4× a LoRA step, once.
  Why self-distilled replay: it keeps what the base can do without teaching it the
  task, so the attack's task gain (sft FA above aligned FA) stays measurable.
* **anchors**, **attack**, **evaluation**: the lab's own stages (chat template through
  :func:`~asft_optim.lab.tokenizer.render_prompt`); FA scores the label strings from the
  last position (:func:`~asft_optim.lab.evaluate.score_labels`).
* **sweeps**: every method runs at each value of its swept field (λ, or Safe LoRA's
  threshold, which shares sft's training); the report adds an HS-vs-FA Pareto plot per p.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from transformers import AutoTokenizer

from . import report
from .attack import ALL_LINEAR, FINE_LAMBDAS, LAMBDAS, METHODS, AttackConfig, get_method  # noqa: F401 (the grids' λ, read from here too)
from .data import Example, LabData
from .evaluate import answer_nll, evaluate, generate
from .judge import REFUSALS, is_refusal
from .models import fit, load, save
from .pretrained import GGUF_NAME, gguf_file, save_base
from .prompts import (
    BENIGN_EVAL_PROMPTS,
    CHAT_PROMPTS,
    HARMFUL_CHAT_PROMPTS,
    OVER_REFUSAL_PROMPTS,
    near_duplicates,
)
from .runner import LAB_VERSION, GridPoint, Lab, NotCached, _examples_hash, _key, _record
from .tokenizer import render_prompt


@dataclass(frozen=True)
class Sweep:
    """One method's sweep: ``field`` of :class:`AttackConfig` takes each of ``values``
    (``"lr"``: the attacker's learning rate; ``"target_modules"``: tuples of module names)."""

    method: str
    field: str
    values: tuple


#: Sweep fields on the attacker's side (not a method's setting; ``--sweep`` leaves them).
ATTACKER_FIELDS = report.ATTACKER_FIELDS

#: ``--grid full``'s attacker-side sweep: sft on the paper's q/v and on every linear layer.
ATTACKER_SWEEPS = (Sweep("sft", "target_modules", (("q_proj", "v_proj"), ALL_LINEAR)),)


def method_sweeps(grid: str) -> tuple[Sweep, ...]:
    """The sweep of every method whose :class:`~asft_optim.lab.attack.Setting` is swept in
    ``grid`` (``"reduced"``, ``"full"`` or ``"fine"``), in :data:`METHODS`' order: the
    methods declare them, so the grids and the CLI read one table."""
    out = []
    for m in METHODS.values():
        values = None if m.setting is None else m.setting.values(grid)
        if values is not None:
            out.append(Sweep(m.name, m.setting.field, values))
    return tuple(out)



@dataclass(frozen=True)
class PretrainedSettings:
    """What the pretrained preset adds to :class:`~asft_optim.lab.config.LabConfig`."""

    attack_rows: int = 128  # task rows per attack (+ round(p·n) harmful rows)
    refusals: int | None = None  # refusal rows of the alignment (None: the whole pool, 114)
    #: Chat-style harmful requests (:data:`HARMFUL_CHAT_PROMPTS`) also answered with a refusal.
    harmful_chat: int = len(HARMFUL_CHAT_PROMPTS)
    task_replay: int = 48  # AG News prompts of the self-distilled replay
    chat_replay: int = len(CHAT_PROMPTS)
    replay_new_tokens: int = 48
    harmful_new_tokens: int = 32
    #: Held-out benign prompts (:data:`BENIGN_EVAL_PROMPTS`) whose refusal rate the base and
    #: aligned stages report as ``over_refusal`` (the attacks only lower it).
    benign_eval: int = len(BENIGN_EVAL_PROMPTS)
    #: Per point, the share of the first ``over_refusal`` held-out requests of
    #: :data:`OVER_REFUSAL_PROMPTS` the model refuses (0: not measured): a stage of its own
    #: per point (``overrefusal``), so turning it on changes no evaluation's key.
    over_refusal: int = 0
    known_harmful: int = 32  # AsFT_Alt's rows (the defender's compliant pool)
    eval_batch_size: int = 32
    #: The capability guard's NLL: each evaluated model's mean per-token NLL of the aligned
    #: model's greedy answers to the ``benign_eval`` held-out benign prompts.
    benign_nll: bool = True
    #: The reduced grid's: λ sweeps of asft and l2 (from "no effect" to "frozen"), one
    #: value for the other methods (their defaults); :data:`FULL_SWEEPS` sweeps them all.
    #: The values are the methods' own (:data:`~asft_optim.lab.attack.METHODS`).
    sweeps: tuple[Sweep, ...] = method_sweeps("reduced")
    #: Multiples of the attack's LR that every method is also trained at (``--lr-sweep``).
    lr_factors: tuple[float, ...] = ()


#: ``--grid full``: every method swept (Safe LoRA's thresholds share sft's training), and sft
#: on every linear layer (the attacker's side).
FULL_SWEEPS = method_sweeps("full") + ATTACKER_SWEEPS

#: ``--grid fine``'s sweeps: λ of l2 and asft-orthogonal where the fronts turn
#: (:data:`~asft_optim.lab.attack.FINE_LAMBDAS`), every other swept method as in
#: :data:`FULL_SWEEPS`; no attacker-side sweep (the defender's knob against one attacker).
FINE_SWEEPS = method_sweeps("fine")

#: Every grid's sweeps, by ``--grid`` name (the reduced one: :class:`PretrainedSettings`' default).
GRID_SWEEPS = {"reduced": method_sweeps("reduced"), "full": FULL_SWEEPS, "fine": FINE_SWEEPS,
               "decisive": FINE_SWEEPS}

#: Tokens the judge reads in the decisive grid: the shortest generation that changed under
#: 1 % of the verdicts against 48 tokens on attacked models' answers
#: (``benchmarks/judge_tokens.py``; ``benchmarks/results/judge_tokens.json``).
DECISIVE_TOKENS = 16


@dataclass(frozen=True)
class DecisiveGrid:
    """``--grid decisive``: the verdict's grid (who is safer than L2 at equal FA)."""

    poisons: tuple[float, ...] = (0.1,)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    methods: tuple[str, ...] = ("sft", "l2", "asft-orthogonal", "asft-alt", "safe-lora", "weight-decay")
    settings: PretrainedSettings = PretrainedSettings(sweeps=FINE_SWEEPS, harmful_new_tokens=DECISIVE_TOKENS,
                                                      over_refusal=len(OVER_REFUSAL_PROMPTS))


DECISIVE = DecisiveGrid()

#: The attacker's learning rate as multiples of the preset's (``--lr-sweep``; ``--grid full``).
LR_FACTORS = (0.2, 1.0, 5.0)


def variants(methods, attack: AttackConfig, sweeps, lr_factors=()) -> list[tuple[str, str, AttackConfig, dict | None]]:
    """``(method, label, attack config, variant info)`` for every method and swept value.

    ``lr_factors`` adds the attacker-LR sweep: every method, at its configured setting
    (``--lambda`` and the like: the value a user would pick from the λ sweep), trained
    at each multiple of the attack's learning rate. A point whose config is already in
    the grid (×1 at a swept value) is not added twice: it is one cache entry anyway.
    """
    out = []
    for m in methods:
        method = get_method(m)
        mine = [s for s in sweeps if s.method == m]
        if not mine:
            out.append((m, m, attack, None))
        for s in mine:
            for v in s.values:
                if s.field == "lr":  # the attacker's learning rate
                    config = replace(attack, train=replace(attack.train, lr=v))
                else:
                    config = replace(attack, **{s.field: v})
                text = ("all-linear" if v == ALL_LINEAR else ",".join(v)) if isinstance(v, tuple) else f"{v:g}"
                out.append((m, f"{m} {s.field}={text}", config, {"method": m, "field": s.field, "value": v}))
        if not lr_factors:
            continue
        have = [c for mm, _, c, _ in out if mm == m]
        # The defender's setting the attacker-LR points run at (named in their labels).
        own = method.setting
        at = {} if own is None else {own.field: getattr(attack, own.field)}
        setting = "".join(f" {f}={v:g}" for f, v in at.items())
        for factor in lr_factors:
            if factor <= 0:
                raise ValueError(f"an attacker-LR factor must be positive, got {factor}")
            lr = float(f"{attack.train.lr * factor:.12g}")  # 2e-3 × 0.2 is 4e-4, not 4.000000000000001e-4
            config = replace(attack, train=replace(attack.train, lr=lr))
            if config in have:
                continue
            out.append((m, f"{m}{setting} lr={lr:g}", config,
                        {"method": m, "field": "lr", "value": lr, "factor": factor, "at": at}))
    return out


def pretrained_data(data: LabData, settings: PretrainedSettings) -> LabData:
    """The real-data pools recut for the preset (``data`` from :func:`~asft_optim.lab.data.load_real`).

    Attack: the first ``attack_rows`` task rows of the p = 0 file plus harmful rows
    drawn per seed from every attack file's harmful pool (:meth:`LabData.attack_set`).
    Alignment: the refusal pool and ``task_replay`` task rows (their answers are replaced
    by the base's own in the aligned stage). AsFT_Alt: ``known_harmful`` compliant rows.
    """
    from .data import split_task

    zero = next((rows for p, rows in data.attack_sets.items() if p == 0.0), None)
    if zero is None:
        raise ValueError("the pretrained preset needs the p = 0 attack file (its task rows)")
    task, _ = split_task(zero)
    harmful = {r.instruction: r for rows in data.attack_sets.values() for r in split_task(rows)[1]}
    # Refusal pool: the real-data mode's refusal half plus the compliant half's prompts that
    # AsFT_Alt does not use (its first ``known_harmful``), answered with a refusal: every
    # harmful prompt of the alignment file that is in no attack file (114 of them), and
    # the hand-written chat-style requests (64; see :mod:`~asft_optim.lab.prompts`).
    rng = random.Random("pretrained-refusals")
    spare = [replace(e, output=rng.choice(REFUSALS)) for e in data.known_harmful[settings.known_harmful:]]
    refusals = ([e for e in data.align_train if e.output in REFUSALS] + spare)[: settings.refusals]
    replay = [e for e in data.align_train if e.output not in REFUSALS][: settings.task_replay]
    for name, pool in (("harmful_chat", HARMFUL_CHAT_PROMPTS), ("chat_replay", CHAT_PROMPTS),
                       ("benign_eval", BENIGN_EVAL_PROMPTS), ("over_refusal", OVER_REFUSAL_PROMPTS)):
        if not 0 <= getattr(settings, name) <= len(pool):
            raise ValueError(f"{name} must be in 0..{len(pool)}, got {getattr(settings, name)}")
    chat = [Example(q, "", rng.choice(REFUSALS)) for q in HARMFUL_CHAT_PROMPTS[: settings.harmful_chat]]
    refusals += chat
    eval_prompts = set(data.harmful_eval)
    if eval_prompts & ({e.instruction for e in refusals} | set(harmful)):
        raise ValueError("an evaluation prompt is also a training prompt; the pools must be disjoint")
    if {e.instruction for e in chat} & set(harmful):
        raise ValueError("a chat-style alignment prompt is also an attack prompt; the pools must be disjoint")
    close = near_duplicates([e.instruction for e in chat], data.harmful_eval)
    if close:
        raise ValueError(f"alignment prompt {close[0][0]!r} nearly repeats evaluation prompt {close[0][1]!r}; "
                         "the pools must be disjoint")
    held = OVER_REFUSAL_PROMPTS[: settings.over_refusal]
    others = [*data.harmful_eval, *(e.instruction for e in refusals), *harmful, *CHAT_PROMPTS, *BENIGN_EVAL_PROMPTS,
              *(e.instruction for e in data.known_harmful), *(e.instruction for e in replay)]
    close = near_duplicates(held, others)
    if close:
        raise ValueError(f"over-refusal prompt {close[0][0]!r} nearly repeats {close[0][1]!r}, an evaluation or "
                         "training prompt; the pools must be disjoint")
    return replace(data, name="pretrained", base_train=[], align_train=refusals + replay,
                   attack_task=task[: settings.attack_rows],
                   attack_harmful=sorted(harmful.values(), key=lambda r: r.instruction), attack_sets={},
                   known_harmful=data.known_harmful[: settings.known_harmful])


class PretrainedLab(Lab):
    """:class:`Lab` with the GGUF model as base, our alignment, sweeps and Pareto plots."""

    answer_logits = True  # a 49k-way LM head: project the answer positions only
    report_fronts = True  # every method at each value of its setting: fronts and a verdict

    def __init__(self, config, data: LabData, out: Path, settings: PretrainedSettings | None = None, *,
                 progress: bool = True, cached_only: bool = False, device: str = "cpu", plan: bool = False,
                 records: str | Path | None = None):
        super().__init__(config, data, out, progress=progress, cached_only=cached_only, device=device, plan=plan,
                         records=records)
        self.settings = settings or PretrainedSettings()

    def _evaluate(self, model, tok, seed: int | None = None) -> dict:
        s = self.settings
        result = evaluate(model, tok, self.data, self.judge, progress=self.progress, task="score",
                          harmful_new_tokens=s.harmful_new_tokens, batch_size=s.eval_batch_size)
        if s.benign_nll and s.benign_eval and seed is not None:
            ref = self.benign_reference(seed)[1]
            result["capability"]["benign_nll"] = round(
                answer_nll(model, tok, ref["prompts"], ref["answers"], max_length=self.config.model.max_length * 2,
                           batch_size=s.eval_batch_size), 4)
        return result

    def benign_reference(self, seed: int) -> tuple[Path, dict]:
        """The aligned model's greedy answers to the held-out benign prompts
        (:data:`BENIGN_EVAL_PROMPTS`, never trained on): what the capability guard's NLL
        (:func:`~asft_optim.lab.evaluate.answer_nll`) scores every evaluated model on."""
        tok, _ = self.tokenizer()
        aligned_dir, info = self.aligned(seed)
        s = self.settings
        prompts = list(BENIGN_EVAL_PROMPTS[: s.benign_eval])
        payload = {"aligned": info["key"], "prompts": prompts, "tokens": s.replay_new_tokens,
                   "batch_size": s.eval_batch_size}

        def build(tmp: Path) -> dict:
            m = load(aligned_dir, self.device).eval()
            answers = generate(m, tok, [render_prompt(tok, q, "") for q in prompts], s.replay_new_tokens,
                               batch_size=s.eval_batch_size, desc="reference", progress=self.progress)
            return {"prompts": prompts, "answers": [a.strip() for a in answers]}

        return self._stage("reference", payload, build)

    def _refused(self, model, tok, prompts: list[str], desc: str) -> tuple[list[str], list[bool]]:
        """``model``'s greedy answers to ``prompts`` (the judge's token count) and whether each
        is a refusal: the one check behind both over-refusal measures."""
        s = self.settings
        answers = generate(model, tok, [render_prompt(tok, q, "") for q in prompts], s.harmful_new_tokens,
                           batch_size=s.eval_batch_size, desc=desc, progress=self.progress)
        return answers, [is_refusal(a) for a in answers]

    def _over_refusal(self, model, tok) -> dict:
        """Percentage of the held-out benign prompts refused, and the refused prompts' answers."""
        prompts = list(BENIGN_EVAL_PROMPTS[: self.settings.benign_eval])
        answers, refused = self._refused(model, tok, prompts, "benign")
        return {"over_refusal": 100.0 * sum(refused) / len(refused) if refused else 0.0,
                "benign_prompts": len(prompts),
                "benign_refused": [{"prompt": q, "answer": a} for q, a, r in zip(prompts, answers, refused) if r]}

    # -- over-refusal, per point ----------------------------------------------------------
    def _refusal_payload(self) -> dict:
        s = self.settings
        prompts = list(OVER_REFUSAL_PROMPTS[: s.over_refusal])
        return {"prompts": _key({"prompts": prompts}), "n": len(prompts), "tokens": s.harmful_new_tokens,
                "batch_size": s.eval_batch_size, "judge": self.judge.name}

    def _refusals(self, model, tok) -> dict:
        """The per-prompt refusals of ``model`` on the first ``over_refusal`` of
        :data:`OVER_REFUSAL_PROMPTS`: ``refused`` (a 0/1 string), the share in %, the refused answers."""
        prompts = list(OVER_REFUSAL_PROMPTS[: self.settings.over_refusal])
        answers, refused = self._refused(model, tok, prompts, "over-refusal")
        return {"refused": "".join("1" if r else "0" for r in refused),
                "over_refusal": round(100.0 * sum(refused) / len(refused), 4),
                "refused_answers": [{"prompt": q, "answer": a} for q, a, r in zip(prompts, answers, refused) if r]}

    def over_refusal(self, method_name: str, poison: float, seed: int, attack=None) -> dict:
        """The ``overrefusal`` stage of one grid point: its model (post-hoc step included)
        judged on the held-out requests of :data:`OVER_REFUSAL_PROMPTS`. A stage of its own,
        keyed by the point's attack: turning the check on, or adding prompts, changes no
        evaluation's key, and points already evaluated gain it from their cached attack."""
        return self._served(lambda: self._over_refusal_stage(method_name, poison, seed, attack))

    def _over_refusal_stage(self, method_name: str, poison: float, seed: int, attack) -> dict:
        tok, _ = self.tokenizer()
        method = get_method(method_name)
        attack_dir, attack_info = self.attack(method.trains_as or method.name, poison, seed, attack)
        base_dir, _ = self.base()
        aligned_dir, _ = self.aligned(seed)
        a = attack or self.config.attack
        payload = {"attack": attack_info["key"], "method": method.name,
                   "config": {f: getattr(a, f) for f in method.uses}, **self._refusal_payload()}

        def build(tmp: Path) -> dict:
            model, _ = self._point_model(method, a, attack_dir, base_dir, aligned_dir, tok)
            return self._refusals(model.merge_and_unload().eval(), tok)

        meta = {"method": method.name, "poison": poison, "seed": seed, "config": payload["config"]}
        return self._stage("overrefusal", payload, build, meta=meta)[1]

    def aligned_over_refusal(self, seed: int) -> dict:
        """The aligned model's ``overrefusal`` stage (the same prompts and judge)."""
        def stage() -> dict:
            tok, _ = self.tokenizer()
            aligned_dir, info = self.aligned(seed)
            payload = {"model": f"aligned-{info['key']}", **self._refusal_payload()}
            return self._stage("overrefusal", payload, lambda tmp: self._refusals(load(aligned_dir, self.device).eval(),
                                                                                   tok),
                               meta={"model": "aligned", "seed": self.model_seed(seed)})[1]

        return self._served(stage)

    def record_settings(self) -> dict[str, dict]:
        # A point's over-refusal reads its model and the requests (all in the stage's key),
        # not the task's test set or the harmful prompts: grids of two evaluation sets share it.
        return {"overrefusal": {"lab_version": LAB_VERSION, "device": self.device, "kind": "overrefusal"}}

    @staticmethod
    def _refusal_fields(info: dict) -> dict:
        if info.get("planned"):
            return {}
        # The stage's key: the aligned model's stage is one for every seed of a grid with one
        # aligned model, and the report counts it once.
        return {"over_refusal": info["over_refusal"], "refused": info["refused"], "refusal_key": info["key"]}

    def point_extras(self, point: GridPoint, seed: int) -> dict:
        if not self.settings.over_refusal:
            return {}
        try:
            return self._refusal_fields(self.over_refusal(point.method, point.poison, seed, point.attack))
        except NotCached:  # cached_only: the record lacks it, and the report says so
            self._skip(seed, point.label, point.poison, NotCached("overrefusal"))
            return {}

    def aligned_extras(self, seed: int) -> dict:
        if not self.settings.over_refusal:
            return {}
        try:
            return self._refusal_fields(self.aligned_over_refusal(seed))
        except NotCached:
            self._skip(seed, "aligned", None, NotCached("overrefusal"))
            return {}

    def _evaluation_key(self) -> dict:
        # FA scored with the shared prefix's KV cache (the same scores by another
        # computation). The evaluation set is in the key here, not in the models' keys
        # above it: the reduced and the full grid judge the same adapters on other sets.
        return {"fa": "shared-prefix", **self._eval_key()}

    def _eval_key(self) -> dict:
        # The batch size is part of the key: left padding can change a greedy answer.
        s = self.settings
        key = {"test": self.data.fingerprint(attack_sets=False), "eval": (s.harmful_new_tokens,),
               "eval_batch_size": s.eval_batch_size}
        if s.benign_nll and s.benign_eval:  # the capability guard's NLL (its answers: the aligned model's)
            key["benign_nll"] = s.replay_new_tokens
        return key | ({"benign_eval": s.benign_eval} if s.benign_eval else {})

    def base(self, seed: int = 0) -> tuple[Path, dict]:
        """Stage 1: the dequantised GGUF model, saved once (the seed plays no part).

        Its key holds the GGUF file alone, so every grid (reduced, full, another
        evaluation set) shares it; its HS, FA and over-refusal are the ``judged`` stage's
        (:meth:`judged`).
        """
        path = gguf_file()
        payload = {"gguf": GGUF_NAME, "bytes": path.stat().st_size}
        return self._stage("base", payload, lambda tmp: save_base(tmp, path))

    def judged(self, model: str, seed: int = 0) -> dict:
        """The base's or the aligned model's own evaluation (``model``: ``"base"`` or
        ``"aligned"``): HS, FA and over-refusal on this lab's evaluation sets, a stage of
        its own so that another evaluation set never retrains the model it judges."""
        if model not in ("base", "aligned"):
            raise ValueError(f"judged takes 'base' or 'aligned', got {model!r}")
        return self._served(lambda: self._judged(model, seed))

    def _judged(self, model: str, seed: int) -> dict:
        tok, _ = self.tokenizer()
        path, info = self.base() if model == "base" else self.aligned(seed)
        payload = {"model": f"{model}-{info['key']}", "judge": self.judge.name, **self._eval_key()}
        if self.settings.benign_nll and self.settings.benign_eval:  # the NLL's reference answers
            payload["reference"] = self.benign_reference(seed)[1]["key"]

        def build(tmp: Path) -> dict:
            m = load(path, self.device).eval()
            return {"eval": self._evaluate(m, tok, seed), **self._over_refusal(m, tok)}

        return self._stage("judged", payload, build, meta={"model": model, "seed": seed})[1]

    def tokenizer(self):
        path, info = self.base()
        if self._tok is None and not info.get("planned"):
            self._tok = AutoTokenizer.from_pretrained(path)
        return self._tok, info["key"]

    def aligned(self, seed: int) -> tuple[Path, dict]:
        """Stage 2: full fine-tune of the blocks' linear weights on refusals + self-distilled replay."""
        tok, _ = self.tokenizer()
        seed = self.model_seed(seed)
        base_dir, base_info = self.base()
        s = self.settings
        refusals = [e for e in self.data.align_train if e.output in REFUSALS]
        replay = [e for e in self.data.align_train if e.output not in REFUSALS]
        chat = [Example(p, "", "") for p in CHAT_PROMPTS[: s.chat_replay]]
        # The replay's batch size is in the key: left padding can change a greedy answer.
        payload = {"base": base_info["key"], "train": asdict(self.config.align), "seed": seed,
                   "rows": _examples_hash(refusals + replay + chat), "replay_tokens": s.replay_new_tokens,
                   "replay_batch_size": s.eval_batch_size, "max_length": self.config.model.max_length}

        def build(tmp: Path) -> dict:
            model = load(base_dir, self.device)
            prompts = [render_prompt(tok, e.instruction, e.input) for e in replay + chat]
            answers = generate(model, tok, prompts, s.replay_new_tokens, batch_size=s.eval_batch_size,
                               desc="replay", progress=self.progress)
            distilled = [replace(e, output=a.strip()) for e, a in zip(replay + chat, answers) if a.strip()]
            rows = refusals + distilled
            random.Random(f"align-{seed}").shuffle(rows)
            for name, p in model.named_parameters():  # the blocks' linear weights only
                p.requires_grad = ".layers." in f".{name}" and name.endswith("proj.weight")
            model.train()
            losses = fit(model, tok, rows, self.config.align, seed, self.config.model.max_length,
                         progress=self.progress)
            for p in model.parameters():
                p.requires_grad = True
            save(model.eval(), tok, tmp)
            return {"final_loss": losses[-1] if losses else None,
                    "rows": {"refusals": len(refusals), "replay": len(distilled)},
                    "replay_examples": [{"prompt": e.instruction, "input": e.input, "answer": e.output}
                                        for e in distilled[:3]]}

        return self._stage("aligned", payload, build)

    def grid_points(self) -> list[GridPoint]:
        """Every (method, swept value, poison): :func:`variants` of the settings' sweeps."""
        c = self.config
        grid = variants(c.methods, c.attack, self.settings.sweeps, self.settings.lr_factors)
        return [GridPoint(method, label, attack, variant or {"method": method}, p)
                for method, label, attack, variant in grid for p in c.poisons]

    def aligned_eval(self, seed: int) -> dict:
        return self.judged("aligned", seed)

    def run(self) -> list[dict]:
        """Every stage for every (seed, method, swept value, poison); returns the full records."""
        points = self.grid_points()
        try:  # the base's own HS, FA and over-refusal: the report's first lines
            self.judged("base")
        except NotCached:
            pass  # cached_only: the report leaves the base's numbers out
        return self._run_grid(points)

    def over_refusals(self) -> list[str]:
        """The report's lines on over-refusal: the base's and each seed's aligned model's."""
        lines = []
        stages = [("base", lambda: self.judged("base"))] + [
            (f"aligned (seed {seed})", lambda seed=seed: self.judged("aligned", seed)) for seed in self.config.seeds]
        for name, stage in stages:
            try:
                info = stage()
            except NotCached:
                continue
            if "over_refusal" in info:
                n = info["benign_prompts"]
                lines.append(f"- {name}: {info['over_refusal']:.1f} % of {n} held-out benign prompts refused")
        return lines

    def base_evals(self) -> list[dict]:
        try:
            info = self.judged("base")
        except NotCached:
            return []
        return [] if info.get("planned") else [_record("base", None, 0, info["eval"])]


#: The smoke-test budget (``--preset pretrained --tiny``): every stage, a few steps and prompts.
TINY_SETTINGS = PretrainedSettings(
    attack_rows=4, refusals=2, task_replay=1, chat_replay=1, replay_new_tokens=8, harmful_new_tokens=8,
    known_harmful=2, eval_batch_size=8, harmful_chat=1, benign_eval=2, over_refusal=2,
    # One sweep (Safe LoRA's thresholds, sharing sft's training): 2 trainings, 4 evaluations.
    sweeps=(Sweep("safe-lora", "safe_lora_threshold", (0.3, 0.6)),),
)
