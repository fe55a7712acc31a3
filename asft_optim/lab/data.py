"""The lab's data: containers, and the real-data mode reading reference-format JSON by path.

Reference format (the files published with the AsFT code, see ``../shared/data/asft``):

* fine-tuning files: a JSON list of ``{"instruction", "input", "output"}``; task rows share
  one instruction, harmful rows have another instruction (the request), an empty
  ``input`` and a compliant ``output``;
* test file: ``{"instruction", "input", "label"}`` with an integer label id;
* harmful evaluation file: ``{"instruction"}`` prompts.

Each file is a JSON list or JSON lines (one object a line, as the reference code's own
``SST2_test.jsonl``). A missing or unreadable file is a :class:`ValueError` naming the file
and the option that gives it.

Files are read where they are and never copied into the repository or the cache.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .judge import REFUSALS


@dataclass(frozen=True)
class Example:
    """One fine-tuning row: the model reads ``instruction``/``input`` and learns ``output``."""

    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class TestItem:
    """One task test row; ``label`` indexes :attr:`LabData.labels`."""

    instruction: str
    input: str
    label: int


@dataclass
class LabData:
    """Everything the stages read.

    ``attack_sets`` maps a poison ratio to a fixed fine-tuning file (real-data mode);
    otherwise :meth:`attack_set` mixes ``attack_task`` with ``round(p·n)`` rows drawn
    from ``attack_harmful``, the reference files' convention (n benign + n·p harmful).
    """

    name: str
    labels: list[str]
    base_train: list[Example]
    align_train: list[Example]
    attack_task: list[Example]
    attack_harmful: list[Example]
    test: list[TestItem]
    harmful_eval: list[str]
    attack_sets: dict[float, list[Example]] = field(default_factory=dict)
    #: Harmful rows a defender holds (the base's compliant pool): AsFT_Alt's data.
    known_harmful: list[Example] = field(default_factory=list)

    def attack_set(self, poison_ratio: float, seed: int) -> list[Example]:
        """The attack's fine-tuning set at ratio ``poison_ratio`` (deterministic in ``seed``)."""
        if self.attack_sets:
            for p, rows in self.attack_sets.items():
                if abs(p - poison_ratio) < 1e-9:
                    return list(rows)
            raise ValueError(f"no fine-tuning file for poison ratio {poison_ratio} (have {sorted(self.attack_sets)})")
        n_harm = round(poison_ratio * len(self.attack_task))
        if n_harm > len(self.attack_harmful):
            raise ValueError(f"poison ratio {poison_ratio} needs {n_harm} harmful rows, the attack pool has {len(self.attack_harmful)}")
        harmful = random.Random(f"poison-{seed}").sample(self.attack_harmful, n_harm)
        return self.attack_task + harmful

    def fingerprint(self, *, attack_sets: bool = True) -> str:
        """A hash of the content; ``attack_sets=False`` leaves the attack files out.

        The tokenizer (and so the base and aligned models) keys on the content without
        the attack files, so that adding a poison ratio in real-data mode retrains only
        attacks, as it does in the world.
        """
        sets = self.attack_sets if attack_sets else {}
        payload = json.dumps(
            {k: v for k, v in asdict(self).items() if k != "attack_sets"}
            | {"attack_sets": {str(p): [asdict(e) for e in r] for p, r in sorted(sets.items())}},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# -- real-data mode ---------------------------------------------------------------------------

DEFAULT_LABELS = ["World", "Sports", "Business", "Sci/Tech"]
DEFAULT_POISONS = (0.0, 0.05, 0.1, 0.15, 0.2)
#: File names of the reference data in a ``--data DIR`` (keys: :func:`load_real`'s arguments).
REAL_FILES = {
    "train": "agnews_1k_p_{p}.json",
    "base_train": "agnews_2.5k_p_0.1.json",
    "test": "agnews_test.json",
    "harmful_eval": "beavertails_eval_250.json",
}


#: The ``asft lab`` option that names each kind of file (for the error messages).
FILE_OPTIONS = {"train": "--train", "base_train": "--base-train", "test": "--test", "harmful_eval": "--harmful-eval"}


def _read(path: str | Path, option: str | None = None) -> list[dict]:
    """The rows of a JSON list or JSON-lines file; a clear :class:`ValueError` for a file that
    is missing or neither (``option``: the flag that names the file, for the message)."""
    path = Path(path)
    give = f"; give it with {option} (or a --data DIR that holds it)" if option else ""
    if not path.is_file():
        raise ValueError(f"{path} does not exist{give}")
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):  # JSON lines: one object a line
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: neither a JSON list nor JSON lines (line {i}: {e.msg}, column {e.colno})"
                                 ) from None
    if isinstance(rows, dict):  # JSON lines of one line
        rows = [rows]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a JSON list of objects or JSON lines of objects")
    return rows


def attack_ratios(template: str, needed: Sequence[float] = (0.0,)) -> tuple[float, ...]:
    """The ratios of :data:`DEFAULT_POISONS` whose attack file the template names and that
    exist, with ``needed`` (read even when missing: their absence is an error), ascending.

    The pretrained preset mixes its own attack sets from every file's harmful pool; a
    ``--train`` template with fewer files reads those it has, not a file the run never asked for.
    """
    have = {p for p in DEFAULT_POISONS if train_file(template, p).is_file()}
    return tuple(sorted(have | {float(p) for p in needed}))


def clip_input(text: str, chars: int | None) -> str:
    """``text`` cut to at most ``chars`` characters at a word boundary (None: unchanged).

    Why: a news article of 250+ characters plus the instruction fills a short context,
    and a row whose prompt fills ``max_length`` loses its answer (it teaches nothing).
    The label of a headline-and-lead is readable from its first sentence.
    """
    if chars is None or len(text) <= chars:
        return text
    cut = text[:chars]
    space = cut.rfind(" ")
    return cut[:space] if space > chars // 2 else cut


_TURN_MARKER = re.compile(r"\s*Assistant:\s*$")


def strip_turn_marker(prompt: str) -> str:
    """``prompt`` without a trailing ``Assistant:`` chat-turn marker.

    Why: the reference files' harmful requests end with ``"\\n\\nAssistant:"`` (from
    their source dataset) while the BeaverTails evaluation prompts do not; a small model
    keys refusal on that artefact instead of on the request, so both sides are put in one
    format before any training.
    """
    return _TURN_MARKER.sub("", prompt)


def _examples(path: str | Path, input_chars: int | None = None, option: str | None = None) -> list[Example]:
    rows = _read(path, option)
    for i, r in enumerate(rows):
        if not {"instruction", "output"} <= r.keys():
            raise ValueError(f"{path}: row {i} lacks 'instruction' or 'output'")
    return [Example(r["instruction"] if r.get("input") else strip_turn_marker(r["instruction"]),
                    clip_input(r.get("input", ""), input_chars), r["output"]) for r in rows]


def _harmful(path: str | Path) -> list[dict]:
    rows = _read(path, "--harmful-eval")
    for i, r in enumerate(rows):
        if not isinstance(r.get("instruction"), str):
            raise ValueError(f"{path}: row {i} has no 'instruction' (a harmful prompt is {{\"instruction\"}})")
    return rows


def split_task(rows: Sequence[Example]) -> tuple[list[Example], list[Example]]:
    """``(task rows, harmful rows)``: task rows carry the most frequent instruction."""
    task_instruction = Counter(r.instruction for r in rows if r.input).most_common(1)[0][0]
    task = [r for r in rows if r.instruction == task_instruction]
    return task, [r for r in rows if r.instruction != task_instruction]


def parse_labels(spec: str | None) -> list[str]:
    """``--labels``: output strings in label-id order, comma separated (``negative,positive``)."""
    if not spec:
        return list(DEFAULT_LABELS)
    labels = [s.strip() for s in spec.split(",")]
    if len(labels) < 2 or any(not s for s in labels):
        raise ValueError(f"--labels needs at least two non-empty names, got {spec!r}")
    return labels


def train_file(template: str, p: float) -> Path:
    """The fine-tuning file of ratio ``p`` from a template with ``{p}`` (``0.1`` -> ``0.1``, ``0`` -> ``0``)."""
    return Path(template.format(p=f"{p:g}"))


def attack_files(template: str) -> list[Path]:
    """Every file the attack template matches (``{p}`` as a wildcard), sorted."""
    pattern = Path(template.format(p="*"))
    return sorted(pattern.parent.glob(pattern.name))


def load_real(
    train: str,
    base_train: str,
    test: str,
    harmful_eval: str,
    poisons: Sequence[float],
    labels: list[str],
    *,
    test_limit: int | None = None,
    seed: int = 0,
    input_chars: int | None = None,
) -> LabData:
    """The real-data mode from reference-format files, read by path.

    Args:
        train: attack file template with ``{p}``, e.g. ``DIR/agnews_1k_p_{p}.json``.
        base_train: the file the base and aligned models learn from (task rows and
            harmful rows), minus every row that appears in an attack file (any file
            the template matches, loaded or not: the models must not depend on which
            ratios a run asks for). Its remaining harmful prompts are split into two
            disjoint halves: compliant answers for the base, refusals for the aligned
            model; its remaining task rows are shared (base: all, aligned: a replay
            quarter). Why disjoint task rows: an attack on rows the base already
            learned cannot raise the fine-tune accuracy, so FA would measure nothing.
        test, harmful_eval: task test file and harmful evaluation prompts.
        poisons: ratios whose attack files are loaded.
        labels: output string of every test label id.
        test_limit: evaluate on the first ``test_limit`` test rows (default: all).
        seed: seeds the pool split (default: 0).
        input_chars: cut every task input (fine-tuning and test rows) to this many
            characters at a word boundary (default: None, whole inputs).
    """
    if input_chars is not None and input_chars < 1:
        raise ValueError(f"input_chars must be positive, got {input_chars}")
    attack_sets = {float(p): _examples(train_file(train, p), input_chars, f"--train (p = {p:g})") for p in poisons}
    every = [r for f in attack_files(train) for r in _examples(f, input_chars, "--train")] or \
        [r for rows in attack_sets.values() for r in rows]
    attack_task, attack_harm = split_task(every)
    attack_prompts = {r.instruction for r in attack_harm}
    attack_inputs = {r.input for r in attack_task}
    task_rows, harmful_rows = split_task(_examples(base_train, input_chars, "--base-train"))
    task_rows = [r for r in task_rows if r.input not in attack_inputs]
    if len(task_rows) < 2:
        raise ValueError(f"{base_train}: needs task rows that are in no attack file (found {len(task_rows)})")
    fresh = sorted({r.instruction: r for r in harmful_rows if r.instruction not in attack_prompts}.values(),
                   key=lambda r: r.instruction)
    if len(fresh) < 2:
        raise ValueError(f"{base_train}: needs harmful prompts that are in no attack file (found {len(fresh)})")
    rng = random.Random(f"real-pools-{seed}")
    rng.shuffle(fresh)
    half = len(fresh) // 2
    compliant, to_refuse = fresh[:half], fresh[half:]
    refusals = [Example(r.instruction, r.input, rng.choice(REFUSALS)) for r in to_refuse]
    replay = rng.sample(task_rows, len(task_rows) // 4)
    base = task_rows + compliant
    align = replay + refusals
    rng.shuffle(base)
    rng.shuffle(align)
    test_rows = _read(test, "--test")[: test_limit or None]
    for i, r in enumerate(test_rows):
        if not isinstance(r.get("instruction"), str):
            raise ValueError(f"{test}: row {i} has no 'instruction' (a test row is "
                             "{\"instruction\", \"input\", \"label\"})")
        if not (isinstance(r.get("label"), int) and 0 <= r["label"] < len(labels)):
            raise ValueError(f"{test}: row {i} has label {r.get('label')!r}; --labels gives {len(labels)} names")
    return LabData(
        name="real",
        labels=labels,
        base_train=base,
        align_train=align,
        attack_task=[],  # the attack rows are the files' (attack_sets)
        attack_harmful=[],
        test=[TestItem(r["instruction"], clip_input(r.get("input", ""), input_chars), r["label"]) for r in test_rows],
        harmful_eval=[strip_turn_marker(r["instruction"]) for r in _harmful(harmful_eval)],
        attack_sets=attack_sets,
        known_harmful=compliant,
    )
