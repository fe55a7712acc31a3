"""The record store: one small JSON file per finished point, a grid that survives a bare machine.

``asft lab --records DIR`` writes each evaluated point (an ``eval`` stage; the models' own
evaluations: the pretrained preset's ``judged``, the embedded lab's ``base`` and
``aligned``) to ``DIR/<kind>-<stage key>.json`` the moment it is finished, atomically
(a temporary file renamed over the name), so a killed run never loses a finished point
and never leaves half a file. A later run, on a machine whose cache is empty, reads a
point from the store instead of building it and its parents; ``--plan`` counts only what
the store and the cache lack; ``--cached-only --records DIR`` reports from both, building
nothing.

A record holds the stage's ``done.json`` content (HS, FA, per-prompt verdicts, per-row
correctness, capability, geometry, training info, sample answers, build seconds), the
stage key, the lab's code version (:data:`~asft_optim.lab.runner.LAB_VERSION`, the one
every cache key holds; the package version beside it, for the reader) and the evaluation
setting (judge, device, evaluation sets) as a fingerprint. The file name is the stage key,
which hashes all of that: a grid only ever asks for its own keys. A file whose content
disagrees (another code version or setting under this name, a copy renamed by hand) is
refused, listed in :attr:`RecordStore.refused`, and never read into a result; files of
other settings in the same folder are counted by :meth:`RecordStore.scan` and kept apart.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..version import __version__

__all__ = ["RecordStore", "setting_fingerprint"]


def setting_fingerprint(setting: dict[str, Any]) -> str:
    """A short hash of an evaluation setting (what makes two points comparable)."""
    return hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RecordStore:
    """The records of one lab setting in ``directory``.

    Args:
        directory: the folder of record files (created on the first write).
        code_version: the lab's :data:`~asft_optim.lab.runner.LAB_VERSION`.
        setting: the lab's evaluation setting (judge, device, evaluation sets).
        kind_settings: the setting of a record kind whose numbers do not depend on all of
            ``setting`` (the over-refusal of a point does not depend on the task's test set):
            its records are stamped and checked with it, so grids of two evaluation sets
            share them (default: none).
    """

    def __init__(self, directory: str | Path, code_version: int, setting: dict[str, Any],
                 kind_settings: dict[str, dict[str, Any]] | None = None):
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"--records {self.directory}: not a folder; give a folder for the point records")
        self.code_version = code_version
        self.setting = setting_fingerprint(setting)
        self.setting_detail = setting
        self._kind = {k: (setting_fingerprint(v), v) for k, v in (kind_settings or {}).items()}
        #: ``(file name, reason)`` of every record found under a key of this grid and refused
        self.refused: list[tuple[str, str]] = []
        #: ``(kind, key)`` of every record written by this process
        self.written: list[tuple[str, str]] = []

    def setting_of(self, kind: str) -> str:
        """The setting fingerprint records of ``kind`` carry."""
        return self._kind[kind][0] if kind in self._kind else self.setting

    def path(self, kind: str, key: str) -> Path:
        return self.directory / f"{kind}-{key}.json"

    def _why_not(self, rec: Any, kind: str, key: str) -> str | None:
        if not isinstance(rec, dict) or not isinstance(rec.get("info"), dict):
            return "not a lab record"
        if (rec.get("kind"), rec.get("key")) != (kind, key):
            return f"it holds {rec.get('kind')}-{rec.get('key')}, not the stage its name says"
        if rec.get("lab_version") != self.code_version:
            return f"another code version (lab {rec.get('lab_version')}, this lab {self.code_version})"
        if rec.get("setting") != self.setting_of(kind):
            return "another evaluation setting"
        return None

    def _load(self, kind: str, key: str) -> tuple[dict | None, str | None]:
        """``(info, None)`` for a usable record, ``(None, why)`` for a refused one, ``(None, None)``
        for none."""
        path = self.path(kind, key)
        if not path.is_file():
            return None, None
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            return None, f"unreadable ({e})"
        why = self._why_not(rec, kind, key)
        return (None, why) if why is not None else (rec["info"], None)

    def get(self, kind: str, key: str) -> dict | None:
        """The stage's info from its record, or ``None`` (no record, or a refused one, which
        :attr:`refused` lists)."""
        info, why = self._load(kind, key)
        if why is not None:
            self.refused.append((self.path(kind, key).name, why))
        return info

    def has(self, kind: str, key: str) -> bool:
        """True when a usable record of the stage is there (a refused one is replaced on write)."""
        return self._load(kind, key)[0] is not None

    def put(self, kind: str, key: str, info: dict, meta: dict | None = None) -> Path:
        """Write the record of a finished stage, atomically: a temporary file renamed."""
        self.directory.mkdir(parents=True, exist_ok=True)
        detail = self._kind[kind][1] if kind in self._kind else self.setting_detail
        rec = {"kind": kind, "key": key, "lab_version": self.code_version, "package_version": __version__,
               "setting": self.setting_of(kind), "setting_detail": detail, "meta": meta or {}, "info": info}
        final = self.path(kind, key)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(rec, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, final)
        self.written.append((kind, key))
        return final

    def scan(self) -> dict[str, int]:
        """Counts of the folder's records: ``usable`` (this code version and setting),
        ``other_version``, ``other_setting`` and ``unreadable``; the others are kept apart."""
        counts = {"usable": 0, "other_version": 0, "other_setting": 0, "unreadable": 0}
        for path in sorted(self.directory.glob("*.json")) if self.directory.is_dir() else []:
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                counts["unreadable"] += 1
                continue
            if not isinstance(rec, dict):
                counts["unreadable"] += 1
            elif rec.get("lab_version") != self.code_version:
                counts["other_version"] += 1
            elif rec.get("setting") != self.setting_of(str(rec.get("kind"))):
                counts["other_setting"] += 1
            else:
                counts["usable"] += 1
        return counts
