"""The anchored optimizer's own state, carried inside the inner optimizer's state dict.

What must survive a resume, and where it travels (format version 2):

* ``W_ref`` of every fully tuned weight: in that parameter's per-parameter entry,
  ``state[i]["anchor_ref"]``. Per-parameter entries are the one part of an optimizer
  state dict that every route keeps: ``torch.save`` / the HF Trainer's ``optimizer.pt``,
  ``torch.distributed.checkpoint`` through ``get_optimizer_state_dict`` /
  ``set_optimizer_state_dict`` (entries keyed by FQN, FSDP2's DTensors kept), accelerate's
  round trip, and a plain ``{"state": ..., "param_groups": ...}`` copy. Losing it would
  silently restart ΔW from zero, the worst bug this library can have, so a dict without
  it raises :class:`AnchorError` unless the caller resets the reference on purpose.
* The initial adapter product ``B₀A₀`` of tuners that start with ``B·A ≠ 0`` (PiSSA,
  OLoRA, LoftQ): ``state[i]["anchor_origin"]`` on the B and on the A parameter.
* What the state is valid for: ``anchor_version``, ``anchor_coupling`` and
  ``anchor_fingerprint`` (of the anchors) in every saved param group, and
  ``anchor_subspaces`` (the fingerprint of the safety subspaces) when the optimizer has
  some, ``anchor_surgery`` (the settings of its :class:`~asft_optim.surgery.GradientSurgery`)
  when it has one. They are added to the *saved* groups only and removed again on load, so the live
  groups hold nothing but hyper-parameters.

* The gradient surgery's state: the last safety gradient of every trained tensor
  (``state[i]["surgery_grad"]``) and the step count (``state[i]["surgery_step"]``), so a
  resumed run refreshes and projects at the same steps as an uninterrupted one.

What each kind of target saves and restores is its own business
(:meth:`~asft_optim.targets.Target.saved_state`, :meth:`~asft_optim.targets.Target.restore`);
this module holds only the format.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .projection import AnchorError
from .targets import ORIGIN_KEY, REF_KEY

__all__ = [
    "GROUP_KEYS",
    "ORIGIN_KEY",
    "REF_KEY",
    "SURGERY_GRAD_KEY",
    "SURGERY_STEP_KEY",
    "VERSION",
    "add_entry",
    "check_meta",
    "check_subspaces",
    "check_surgery",
    "param_index",
    "pop_surgery",
    "saved_params",
    "split",
]

VERSION = 2
GROUP_KEYS = ("anchor_version", "anchor_coupling", "anchor_fingerprint", "anchor_subspaces", "anchor_surgery")
SURGERY_STEP_KEY = "surgery_step"
SURGERY_GRAD_KEY = "surgery_grad"
_OURS = (REF_KEY, ORIGIN_KEY, SURGERY_STEP_KEY, SURGERY_GRAD_KEY)

def param_index(param_groups: list[dict[str, Any]]) -> dict[int, int]:
    """``id(param) -> index`` in the order ``Optimizer.state_dict`` numbers parameters."""
    out: dict[int, int] = {}
    for g in param_groups:
        for p in g["params"]:
            out.setdefault(id(p), len(out))
    return out


def saved_params(saved_groups: list[dict[str, Any]], live_groups: list[dict[str, Any]]) -> dict[int, Any]:
    """``saved key -> live param``, pairing groups and their params in order (as torch does)."""
    if len(saved_groups) != len(live_groups):
        raise ValueError(
            f"loaded state dict has {len(saved_groups)} parameter group(s), the optimizer {len(live_groups)}"
        )
    out = {}
    for i, (sg, lg) in enumerate(zip(saved_groups, live_groups, strict=True)):
        if len(sg["params"]) != len(lg["params"]):
            raise ValueError(
                f"param group {i}: the loaded state dict has {len(sg['params'])} parameters, "
                f"the optimizer {len(lg['params'])}"
            )
        out.update(zip(sg["params"], lg["params"], strict=True))
    return out


def add_entry(state: dict, key: Any, **values: Tensor) -> None:
    """Put ``values`` into ``state[key]`` without touching the inner optimizer's live dict
    (``Optimizer.state_dict`` returns its per-parameter dicts themselves, not copies)."""
    state[key] = {**state.get(key, {}), **values}


def split(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[Any, dict[str, Tensor]], dict[str, Any]]:
    """Separate a loaded state dict into what the inner optimizer gets and what is ours.

    Returns ``(inner_dict, anchor_entries {saved key: {REF_KEY/ORIGIN_KEY/SURGERY_*: tensor}},
    group_meta {key: value})``. Entries left empty are dropped, so the inner optimizer
    initialises them lazily as usual.
    """
    if "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("an optimizer state dict has 'state' and 'param_groups'")
    sd = dict(state_dict)
    meta: dict[str, Any] = {}
    groups = []
    for g in sd["param_groups"]:
        g = dict(g)
        for k in GROUP_KEYS:
            if k in g:
                v = g.pop(k)
                if k in meta and meta[k] != v:
                    raise AnchorError(f"param groups disagree on {k}: {meta[k]!r} vs {v!r}")
                meta[k] = v
        groups.append(g)
    state: dict[Any, Any] = {}
    ours: dict[Any, dict[str, Tensor]] = {}
    for key, entry in sd["state"].items():
        entry = dict(entry)
        mine = {k: entry.pop(k) for k in _OURS if k in entry}
        if mine:
            ours[key] = mine
        if entry:
            state[key] = entry
    sd["state"], sd["param_groups"] = state, groups
    return sd, ours, meta


def check_meta(meta: Mapping[str, Any], coupling: str, fingerprint: str | None) -> None:
    """Raise :class:`AnchorError` when the saved state belongs to another setting
    (``fingerprint=None``: do not compare the anchors)."""
    version = meta.get("anchor_version")
    if version is not None and version != VERSION:
        raise AnchorError(
            f"anchored optimizer state of format version {version!r}; this asft-optim reads version "
            f"{VERSION}: save it again with the asft-optim that wrote it, or upgrade"
        )
    saved = meta.get("anchor_coupling")
    if saved is not None and saved != coupling:
        raise AnchorError(
            f"the state was saved with coupling={saved!r}, this optimizer has coupling={coupling!r}: "
            f"build it with coupling={saved!r} to resume that run"
        )
    saved_fp = meta.get("anchor_fingerprint")
    if saved_fp is not None and fingerprint is not None and saved_fp != fingerprint:
        raise AnchorError(
            f"the state was saved with other anchors (fingerprint {saved_fp}, these are {fingerprint}): "
            "resume with the anchors that run used (the same anchor file), or pass "
            "check_anchors=False to switch anchors on purpose"
        )


def check_subspaces(meta: Mapping[str, Any], fingerprint: str | None) -> None:
    """Raise :class:`AnchorError` when the saved state was trained under other safety subspaces
    than ``fingerprint`` (None: this optimizer has none).

    Why refuse: the projection keeps ``QᵀΔW = 0`` for the Q it was trained under; resuming
    under another Q (or none) leaves the update already made inside the new span, or frees
    it to enter the old one, and the run is no longer the one that was saved. A state of
    another anchored optimizer without subspaces (``anchor_version`` and no
    ``anchor_subspaces``) counts as "none"; a plain optimizer's state says nothing.
    """
    _check_same(meta, "anchor_subspaces", fingerprint, "safety subspaces {}", "subspaces {}",
                "the subspaces that run used (subspaces=SafetySubspaces.load(the same file))")


def check_surgery(meta: Mapping[str, Any], settings: str | None) -> None:
    """Raise :class:`AnchorError` when the saved state was trained under other gradient-surgery
    settings than ``settings`` (None: this optimizer has no surgery), as :func:`check_subspaces`."""
    _check_same(meta, "anchor_surgery", settings, "gradient surgery ({})", "gradient surgery ({})",
                "the surgery that run used (surgery=GradientSurgery(..., the same settings))")


def _check_same(meta: Mapping[str, Any], key: str, now: str | None, saved_as: str, now_as: str, fix: str) -> None:
    """The saved ``meta[key]`` must equal ``now``; a state of another anchored optimizer without
    the key counts as "none", a plain optimizer's state says nothing."""
    saved = meta.get(key)
    if (saved is None and "anchor_version" not in meta) or saved == now:
        return
    what = saved_as.split(" (")[0].split(" {")[0]
    was = f"no {what}" if saved is None else saved_as.format(saved)
    has = "none" if now is None else now_as.format(now)
    raise AnchorError(f"the state was saved with {was}, this optimizer has {has}: resume with {fix}, "
                      "or pass check_anchors=False to switch on purpose")


def pop_surgery(entries: dict[Any, dict[str, Tensor]]) -> dict[Any, dict[str, Tensor]]:
    """Take the gradient surgery's per-parameter values out of ``entries`` (saved key ->
    ``{SURGERY_STEP_KEY, SURGERY_GRAD_KEY}``); entries left empty are dropped."""
    out = {}
    for key in list(entries):
        mine = {k: entries[key].pop(k) for k in (SURGERY_STEP_KEY, SURGERY_GRAD_KEY) if k in entries[key]}
        if mine:
            out[key] = mine
        if not entries[key]:
            del entries[key]
    return out
