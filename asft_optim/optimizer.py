"""AnchoredOptimizer (wraps any torch optimizer) and AnchoredAdamW."""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import state as anchor_state
from .anchors import anchor_fingerprint, as_anchors, l2_like_warning
from .diagnostics import AnchorDiagnostics
from .discovery import bind_targets, hf_name, match_references, tuned_weights
from .projection import AnchorError, PenaltyTerms, Projection
from .refused import refuse_deepspeed
from .safety_subspace import subspace_fingerprint
from .surgery import GradientSurgery
from .targets import Target, TargetTerms
from .validation import Coupling, check_decoupled, check_inner, lambda_value

__all__ = ["AnchoredAdamW", "AnchoredOptimizer", "Coupling"]

class AnchoredOptimizer(AnchorDiagnostics, Optimizer):
    r"""Adds the AsFT penalty gradient to ``.grad`` inside ``step()`` of any optimizer.

    .. math::
        \mathcal{L} = \mathcal{L}_\text{task} + \lambda \sum_{\text{weights}}
        \lVert R\,\Delta W \rVert_F^2, \qquad R = I - C \;(\text{or } C \text{ for "subspace"})

    **Coupled or decoupled.** With ``coupling="coupled"`` (default) :math:`\lambda\nabla P`
    joins ``.grad`` before the inner step, so a run equals the inner optimizer on
    ``task + anchor_penalty`` (the paper's Eq. 4 and the reference code, see
    :func:`~asft_optim.convert_reference_lambda`). Prefer it to reproduce published
    numbers, with SGD/momentum (where it is the only sensible choice), and with
    closure-driven optimizers (LBFGS). With ``coupling="decoupled"`` the weights first move by
    :math:`-\text{lr}\,\lambda\nabla P` and the inner step then sees only the task
    gradient, like AdamW's decoupled weight decay. Under Adam-type optimizers the coupled
    penalty is divided by :math:`\sqrt{v}` of the *summed* gradient, so its effective
    strength depends on the task gradient's scale (and saturates at about ``lr`` per
    coordinate once it dominates) and it lingers in the momentum; the decoupled pull is
    exactly ``lr·λ·∇P`` (on a dense weight with a projector C: the off-anchor part of ΔW
    shrinks by ``1 - 2·lr·λ`` per step), predictable across tasks, models and LR schedules.
    Prefer it with AdamW when λ is tuned once and reused; keep ``2·lr·λ < 1``. It matches
    no loss-level run.

    The wrapper shares the inner optimizer's ``param_groups``, ``state`` and
    ``defaults`` (live: schedulers, accelerate and ``load_state_dict`` see one object).
    ``anchor_lambda`` is a key of every param group: saved, schedulable and settable
    per group (a target takes the λ of the group holding its first tensor; a group that
    already has the key keeps it). Wrapping an inner optimizer a second time (it already
    carries ``anchor_lambda``) with a *different* explicit λ raises ``ValueError``: set the
    groups' ``anchor_lambda`` to change it.

    **State.** ``state_dict()`` carries everything a resume needs inside the inner
    optimizer's state dict (see :mod:`asft_optim.state`): each fully tuned weight's
    ``W_ref`` in its per-parameter entry, so the Trainer's checkpoint,
    ``torch.distributed.checkpoint`` and a plain ``{"state", "param_groups"}`` copy all
    keep it. ``load_state_dict`` raises :class:`AnchorError` when that reference is
    missing (pass ``reset_reference=True`` to restart ΔW from the current weights on
    purpose) or when the state was saved with another ``coupling`` or other anchors.

    Args:
        optimizer: the inner optimizer, already holding the trainable parameters.
        model: the model (plain ``nn.Module`` or PEFT model) whose weights are anchored.
        anchors: ``{HF weight name: Projection}``, e.g. from :func:`build_anchors`, or the
            path of an anchor file.
        anchor_lambda: penalty strength λ (default: None, i.e. 1.0, or the λ an already
            anchored inner optimizer carries).
        coupling: ``"coupled"`` or ``"decoupled"`` (default: ``"coupled"``).
        reference: ``{name: W_ref}`` for fully tuned weights (default: the weights at
            construction). Keys may carry wrapper prefixes (``module.``, ``base_model.model.``)
            or lack ``.weight``; a key that names no fully tuned anchored weight, or a mapping
            that leaves one out, raises :class:`AnchorError`.
        origins: ``{name: {adapter: (B₀, A₀)}}`` for adapters whose init rewrote the base
            weight (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA), shaped like the parameters
            (default: their values at construction; give them when the adapter was trained
            before, e.g. reloaded with ``PeftModel.from_pretrained``).
        subspaces: ``{name: SafetySubspace}`` (e.g. ``SafetySubspaces.load(path)``, built from
            the aligned model's refusal gradients): after every inner step the update of
            each such weight is projected out of ``span(Q)``, so ``QᵀΔW = 0`` exactly
            (LoRA: ``B ← (I − QQᵀ)B``, which needs ``B₀ = 0``; full weights:
            ``W ← W − QQᵀ(W − W_ref)``; DoRA refused) (default: None).
        surgery: a :class:`~asft_optim.surgery.GradientSurgery`: before the penalty, the task
            gradient of every trained tensor is projected off the safety gradient its closure
            gives (SafeGrad-like; the closure runs every ``surgery.every`` steps) (default: None).
        strict: raise if an anchor matches no module of the model (default: True).

    Example::

        >>> inner = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> opt = AnchoredOptimizer(inner, model, anchors, anchor_lambda=1.0)
        >>> loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module,
        anchors: Mapping[str, Projection],
        anchor_lambda: float | None = None,
        *,
        coupling: Coupling = "coupled",
        reference: Mapping[str, Tensor] | None = None,
        origins: Mapping[str, Mapping[str, tuple[Tensor, Tensor]]] | None = None,
        subspaces: Mapping[str, Any] | None = None,
        surgery: GradientSurgery | None = None,
        strict: bool = True,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, AnchoredOptimizer):
            raise ValueError("optimizer is already anchored")
        refuse_deepspeed(type(self).__name__)  # its engine would drop this optimizer's step
        anchors = as_anchors(anchors)
        anchor_lambda = check_inner(optimizer, anchor_lambda, coupling)
        self.optimizer = optimizer
        self._init_hooks()
        self.defaults.setdefault("anchor_lambda", anchor_lambda)
        for i, group in enumerate(self.param_groups):
            group["anchor_lambda"] = lambda_value(group.setdefault("anchor_lambda", anchor_lambda),
                                                  f"anchor_lambda of param group {i}")
        self.coupling = coupling
        self.anchors = anchors
        self._model = model
        self._fingerprint: str | None = None  # of the anchors, computed on first save/load
        self._subspace_fp: str | None = None  # of the safety subspaces, likewise
        self._setup_targets(model, anchors, reference, origins, strict)
        self._setup_subspaces(model, subspaces, reference)
        self._setup_surgery(surgery)
        # Last step's (name, λ, PenaltyTerms without gradients): diagnostics are derived
        # from them on demand (see anchor_stats), not on the hot path.
        self._last: list[tuple[str, Any, PenaltyTerms]] = []
        self._last_tensors: dict[str, tuple[Tensor, Tensor, Tensor]] | None = None

    # -- construction ---------------------------------------------------------------
    def _init_hooks(self) -> None:
        """What ``Optimizer.__init__`` sets up besides ``param_groups`` (which it would rebuild)."""
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    def _setup_targets(self, model, anchors, reference, origins, strict) -> None:
        targets, _ = bind_targets(model, anchors, strict=strict, start=True)
        references = match_references(reference, targets)
        for t in targets:
            t.use_start(references, origins or {}, stateless=False)
        assumed = [f"{t.name} ({', '.join(t.assumed_start())})" for t in targets if t.assumed_start()]
        if assumed:
            warnings.warn(
                f"{len(assumed)} anchored weight(s) have adapters initialised from the base weight "
                f"(PiSSA/OLoRA/LoftQ/CorDA/LoRA-GA; first: {assumed[:3]}): ΔW is measured from their "
                "factors now. That is right for a fresh adapter; for one trained before (reloaded with "
                "PeftModel.from_pretrained), pass origins= or load this optimizer's saved state",
                stacklevel=3,
            )
        tuned = self._trained(targets)
        if not tuned:
            raise AnchorError(
                "no anchored weight is trained by this optimizer: the anchors match "
                f"{len(targets)} module(s) but none of their trainable tensors is in its param_groups "
                f"(anchors: {list(anchors)[:5]})"
            )
        untrained = [t.name for t in targets if t not in tuned]
        if untrained and strict:
            raise AnchorError(
                f"{len(untrained)} anchor(s) match a module whose tensors this optimizer does not train "
                f"(first: {untrained[:5]}); anchor only the tuned weights or pass strict=False"
            )
        self._warn_unanchored(model, anchors)
        warning = l2_like_warning(anchors)
        if warning:
            warnings.warn(warning, stacklevel=2)
        self._all_targets: list[Target] = targets  # add_param_group adopts from these
        self._targets: list[Target] = tuned

    def _setup_subspaces(self, model, subspaces, reference) -> None:
        """The weights whose update is projected out of a safety subspace after every step."""
        self.subspaces = subspaces
        self._constrained: list[Target] = []
        if subspaces is None:
            return
        if not isinstance(subspaces, Mapping) or not subspaces:
            raise AnchorError("subspaces must be a non-empty {weight name: SafetySubspace} mapping "
                              "(e.g. SafetySubspaces.load(path))")
        targets, _ = bind_targets(model, subspaces, strict=True, start=True)
        references = match_references(reference, targets)
        for t in targets:
            t.use_start(references, {}, stateless=False)
            t.check_subspace(subspaces[t.name])
        self._constrained = targets

    def _setup_surgery(self, surgery: GradientSurgery | None) -> None:
        self.surgery = surgery
        if surgery is None:
            return
        if not isinstance(surgery, GradientSurgery):
            raise TypeError(f"surgery must be a GradientSurgery, got {type(surgery).__name__}")
        if any(g.get("maximize", False) for g in self.param_groups):
            raise ValueError("surgery= with maximize=True: the rule is defined for a gradient that is descended")
        if surgery.bound:
            raise ValueError("this GradientSurgery already belongs to another optimizer (its step count and "
                             "safety gradient are that run's): build a new GradientSurgery for each optimizer")
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in self._surgery_params()):
            raise AnchorError("surgery= under FSDP2 (DTensor parameters) is not supported: the safety "
                              "gradient's inner products would need the full tensors; use DDP or one process")
        surgery.bound = True

    def _surgery_params(self) -> list[Tensor]:
        """The trained tensors (the surgery's ``θ``), in state-dict order, each once."""
        seen: dict[int, Tensor] = {}
        for g in self.param_groups:
            for p in g["params"]:
                if p.requires_grad:
                    seen.setdefault(id(p), p)
        return list(seen.values())

    @torch.compiler.disable
    def _surgery_project(self) -> None:
        if self.surgery is not None:
            self.surgery.project_(self._surgery_params())

    @torch.compiler.disable
    def _project_updates(self) -> None:
        """After the inner step: ``QᵀΔW = 0`` for every weight with a safety subspace, whatever
        the inner optimizer did (Adam's per-coordinate scaling would leave a projected
        gradient's update inside span(Q): the update itself is projected)."""
        for t in self._constrained:
            t.project_update(self.subspaces[t.name])

    def _trained(self, targets: list[Target]) -> list[Target]:
        """Those of ``targets`` with a trainable tensor in this optimizer's param groups."""
        owned = self._param_ids()
        return [t for t in targets if any(id(p) in owned and p.requires_grad for p in t.all_params())]

    def _warn_unanchored(self, model: nn.Module, anchors: Mapping[str, Projection]) -> None:
        owned = self._param_ids()
        trained = {hf_name(n.removesuffix(".weight")) for n, p in model.named_parameters() if id(p) in owned}
        free = [n for n in tuned_weights(model) if n not in anchors and any(
            t == n.removesuffix(".weight") or t.startswith(n.removesuffix(".weight") + ".") for t in trained)]
        if free:
            warnings.warn(
                f"{len(free)} trained 2-D weight(s) carry no anchor and are not penalised "
                f"(first: {free[:5]}); anchor them too (e.g. build the anchors with the same "
                "target_modules as the LoRA) if they should be",
                stacklevel=3,
            )

    def _param_ids(self) -> dict[int, dict]:
        return {id(p): g for g in self.param_groups for p in g["params"]}

    # -- live views of the inner optimizer ---------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    @property
    def targets(self) -> list[Target]:
        """The anchored weights this optimizer trains."""
        return list(self._targets)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer; anchored weights in it are penalised from now.

        The model is searched again, so an adapter added since construction
        (``model.add_adapter``) whose tensors join here is found. A fully tuned anchored
        weight that joins here gets ``W_ref`` = its value now (pass
        ``param_group["anchor_reference"] = {name: W_ref}`` to give another one), an
        adapter measured from an origin its factors now.
        """
        lam = lambda_value(param_group.get("anchor_lambda", self.defaults["anchor_lambda"]),
                           "anchor_lambda of the new param group")
        if self.coupling == "decoupled":
            check_decoupled(param_group.get("lr", self.defaults.get("lr")), lam, "the new param group")
        param_group["anchor_lambda"] = lam
        reference = param_group.pop("anchor_reference", None)
        self.optimizer.add_param_group(param_group)
        known = {(t.name, id(t.module)) for t in self._all_targets}
        found, _ = bind_targets(self._model, self.anchors, strict=False, start=False)
        fresh = [t for t in found if (t.name, id(t.module)) not in known]
        for t in fresh:
            t.start()
        self._all_targets += fresh
        active = {id(t) for t in self._targets}
        new = [t for t in self._trained(self._all_targets) if id(t) not in active]
        references = match_references(reference, new) if reference is not None else {}
        for t in new:
            t.start()
            t.use_start(references, {}, stateless=False)
        self._targets += new

    # -- the step --------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):  # type: ignore[override]
        """Add the penalty gradient once, then run the inner step.

        Returns what the inner step returns: with a closure and ``coupling="coupled"``
        the closure is wrapped so that every evaluation (LBFGS evaluates several) adds
        λ∇P and returns ``loss + λP``; with ``"decoupled"`` the closure's own loss.
        """
        if self.surgery is not None:
            params = self._surgery_params()  # one walk of the groups for the check and the refresh
            if self.surgery.due(params):
                self.surgery.refresh(params)  # before any change: a failing closure changes nothing
        if closure is None:
            self._surgery_project()
            self._apply_penalty(want_total=False)
            out = self.optimizer.step()
        elif self.coupling == "decoupled":
            with torch.enable_grad():
                loss = closure()
            self._surgery_project()
            self._apply_penalty(want_total=False)
            out = self.optimizer.step(lambda: loss)
        else:
            def anchored_closure():
                # Closure-driven optimizers (LBFGS) re-evaluate: every evaluation sees the penalty.
                with torch.enable_grad():
                    loss = closure()
                self._surgery_project()
                penalty = self._apply_penalty()
                return loss if loss is None else loss + penalty

            out = self.optimizer.step(anchored_closure)
        if self._constrained:
            self._project_updates()
        if self.surgery is not None:
            self.surgery.steps += 1
        return out

    # Run eagerly under torch.compile(opt.step): the terms are a few matrix products per
    # weight, and the diagnostics' Python objects must be kept as they are.
    @torch.compiler.disable
    def _apply_penalty(self, want_total: bool = True) -> Tensor | None:
        """Compute every target's terms (nothing changes if that fails), then add λ∇P to
        ``.grad`` (or to the weights). Returns ``λP`` summed when ``want_total``."""
        terms = self._compute()
        coupled = self.coupling == "coupled"
        groups = self._param_ids()
        for _t, lam, t in terms:
            # λ = 0 leaves every gradient and weight untouched (bit-identical to the inner
            # optimizer); the diagnostics are still available.
            if isinstance(lam, float) and lam == 0.0:
                continue
            for p, g in zip(t.params, t.values.grads, strict=True):
                if id(p) in groups and p.requires_grad:
                    add_penalty_gradient(p, g, lam, groups[id(p)], coupled)
        # A tensor λ is copied: the diagnostics use the value of this step.
        self._last = [(t.name, lam if isinstance(lam, float) else lam.detach().clone(), tt.values.with_grads(()))
                      for t, lam, tt in terms]
        self._last_tensors = None
        if not want_total:
            return None
        total: Tensor | None = None
        for _, lam, values in self._last:
            value = values.penalty * lam
            total = value if total is None else total + value
        return total if total is not None else torch.zeros(())

    def _compute(self) -> list[tuple[Target, float | Tensor, TargetTerms]]:
        """``(target, λ, terms)`` of every target with an update now; raises before any
        change when a λ, an lr or the model is not usable (a step never fails halfway)."""
        groups = self._param_ids()
        default_lambda = self.defaults.get("anchor_lambda", 0.0)
        if self.coupling == "decoupled":
            for i, g in enumerate(self.param_groups):
                check_decoupled(g.get("lr"), g.get("anchor_lambda", default_lambda), f"param group {i}")
        out = []
        any_trainable = False
        for t in self._targets:
            if t.paused():
                any_trainable = True  # PEFT froze the adapters for now: ΔW = 0, nothing to add
                continue
            # Tensors are looked up now (accelerate/FSDP2 swap them), once per step.
            owned = [p for p in t.params() if id(p) in groups and p.requires_grad]
            if not owned:
                # Merged or disabled adapters: trained, but no update now. Only then walk
                # all of the module's tensors (inactive adapters too), for the error below.
                any_trainable = any_trainable or any(id(p) in groups and p.requires_grad for p in t.all_params())
                continue
            any_trainable = True
            lam = lambda_value(groups[id(owned[0])].get("anchor_lambda", default_lambda),
                               f"{t.name}: anchor_lambda of its param group")
            terms = t.terms(self.anchors[t.name])
            if terms is not None:
                out.append((t, lam, terms))
        if not any_trainable:
            raise AnchorError(
                "no anchored parameter is trainable: the anchored tensors were frozen or replaced "
                "after the optimizer was built (e.g. PEFT wrapped the model afterwards); build the "
                "optimizer on the final model (with TRL's peft_config=, pass "
                "optimizer_cls_and_kwargs=(AnchoredAdamWFactory, {...}) instead of optimizers=)"
            )
        return out

    # -- the rest of the Optimizer contract ------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def train(self) -> None:
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()

    def eval(self) -> None:
        if callable(getattr(self.optimizer, "eval", None)):
            self.optimizer.eval()

    def subspace_fingerprint(self) -> str | None:
        """The safety subspaces' fingerprint saved with the state (None without subspaces;
        see :func:`asft_optim.safety_subspace.subspace_fingerprint`)."""
        if self.subspaces is None:
            return None
        if getattr(self, "_subspace_fp", None) is None:  # getattr: a pickle from before the field
            self._subspace_fp = subspace_fingerprint(self.subspaces)
        return self._subspace_fp

    def anchor_fingerprint(self) -> str:
        """The anchors' fingerprint saved with the state (see :func:`asft_optim.anchors.anchor_fingerprint`)."""
        if self._fingerprint is None:
            self._fingerprint = anchor_fingerprint(self.anchors)
        return self._fingerprint

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict with the anchor state inside it.

        Every fully tuned weight's ``W_ref`` sits in its per-parameter entry
        (``"anchor_ref"``); every saved param group names the format version, the
        coupling, the anchors' fingerprint and, with ``subspaces=``, the subspaces'
        (``"anchor_subspaces"``). Nothing lives outside ``state`` and
        ``param_groups``, so routes that keep only those keys keep it all.
        """
        sd = self.optimizer.state_dict()
        index = anchor_state.param_index(self.param_groups)
        for t in self._targets:
            for p, values in t.saved_state():
                if id(p) not in index:
                    raise AnchorError(
                        f"{t.name}: its trained tensor is no longer in the optimizer's param groups "
                        "(replaced after the optimizer was built?): its anchor state cannot be saved"
                    )
                anchor_state.add_entry(sd["state"], index[id(p)], **values)
        meta = {"anchor_version": anchor_state.VERSION, "anchor_coupling": self.coupling,
                "anchor_fingerprint": self.anchor_fingerprint()}
        if self.subspaces is not None:  # absent otherwise: states without subspaces keep their keys
            meta["anchor_subspaces"] = self.subspace_fingerprint()
        if self.surgery is not None:
            meta["anchor_surgery"] = self.surgery.settings()
            self._save_surgery(sd["state"], index)
        sd["param_groups"] = [{**g, **meta} for g in sd["param_groups"]]
        return sd

    def load_state_dict(
        self, state_dict: dict[str, Any], *, reset_reference: bool = False, check_anchors: bool = True
    ) -> None:
        """Load a state dict saved by :meth:`state_dict` (or by any route that kept
        ``state`` and ``param_groups``).

        Args:
            state_dict: the saved dict.
            reset_reference: when the dict carries no ``W_ref`` for a fully tuned weight
                (a state dict of a plain optimizer, or one a tool stripped), take the
                weights as they are now as the new reference instead of raising: ΔW
                restarts from zero (default: False).
            check_anchors: raise when the dict was saved with other anchors, safety
                subspaces or gradient-surgery settings (or with ones this optimizer lacks, or
                without those it has); False switches on purpose, dropping a saved surgery
                state this optimizer has no surgery for (default: True).

        Raises:
            AnchorError: a fully tuned weight's reference (or an adapter's initial
                ``B₀A₀``) is missing and ``reset_reference`` is False; the coupling, the
                anchors or the safety subspaces differ; a saved reference belongs to a weight this optimizer
                does not tune fully, or has another shape.
        """
        inner_sd, entries, meta = anchor_state.split(state_dict)
        self._check_meta(meta, check_anchors)
        by_saved = anchor_state.saved_params(inner_sd["param_groups"], self.param_groups)
        surgery = self._saved_surgery(anchor_state.pop_surgery(entries), by_saved, check_anchors)
        restored: dict[int, dict[str, Tensor]] = {}
        for key, values in entries.items():
            if key not in by_saved:
                raise AnchorError(f"the state dict holds anchor state for parameter {key!r}, which it does not list")
            restored[id(by_saved[key])] = values
        # Check everything before changing anything: restore into copies of the targets' state.
        missing = [t.name for t in self._targets if not _restorable(t, restored)]
        if restored:
            raise AnchorError(
                f"the state dict holds anchor state for {len(restored)} parameter(s) that this "
                "optimizer does not anchor that way (was the run full fine-tuning and this one LoRA, or the "
                "other way round?): build the optimizer the way the checkpoint was trained"
            )
        if missing and not reset_reference:
            raise AnchorError(
                f"the state dict carries no anchor reference for {len(missing)} anchored weight(s) "
                f"(first: {missing[:5]}): it was saved by a plain optimizer, by asft-optim through a route "
                "that dropped it, or before these weights were anchored. Resuming now would silently "
                "restart ΔW from the current weights. Load the full state dict this optimizer's "
                "state_dict() wrote, or pass reset_reference=True to restart ΔW from the current "
                "weights on purpose (or build the optimizer with reference={name: W_ref})"
            )
        self.optimizer.load_state_dict(inner_sd)
        if surgery is not None:
            self.surgery.steps, self.surgery.safety = surgery
        saved = {id(by_saved[k]): v for k, v in entries.items()}
        for t in self._targets:
            if not t.restore(saved):
                t.start()  # reset_reference=True (checked above): ΔW restarts from now
        for i, group in enumerate(self.param_groups):
            group["anchor_lambda"] = lambda_value(group.setdefault("anchor_lambda", self.defaults["anchor_lambda"]),
                                                  f"anchor_lambda of param group {i}")

    def _check_meta(self, meta: Mapping[str, Any], check_anchors: bool) -> None:
        """Refuse a state saved under another coupling, other anchors, subspaces or surgery."""
        anchor_state.check_meta(meta, self.coupling, self.anchor_fingerprint() if check_anchors else None)
        if check_anchors:
            anchor_state.check_subspaces(meta, self.subspace_fingerprint())
            anchor_state.check_surgery(meta, None if self.surgery is None else self.surgery.settings())

    def _save_surgery(self, state: dict, index: dict[int, int]) -> None:
        """The surgery's step count in every parameter's entry (frozen ones too: a resume may
        unfreeze them), the last safety gradient in those of the tensors it has one for."""
        steps = torch.tensor(self.surgery.steps, dtype=torch.int64)
        for p in (p for g in self.param_groups for p in g["params"]):
            values = {anchor_state.SURGERY_STEP_KEY: steps}
            if p in self.surgery.safety:
                values[anchor_state.SURGERY_GRAD_KEY] = self.surgery.safety[p].detach().clone()
            anchor_state.add_entry(state, index[id(p)], **values)

    def _saved_surgery(self, saved: dict[Any, dict[str, Tensor]], by_saved: dict[Any, Tensor],
                       check_anchors: bool = True) -> tuple[int, dict[Tensor, Tensor]] | None:
        """``(steps, {param: s})`` from a loaded state (None: it has none to restore);
        raises before anything changes when it is incomplete. A tensor without a saved ``s``
        (it joined or was unfrozen after the last refresh) makes the next step refresh, as
        it would have in the saved run."""
        if self.surgery is None:
            if saved and check_anchors:
                raise AnchorError("the state dict holds gradient-surgery state and this optimizer has no "
                                  "surgery: build it with surgery=GradientSurgery(...) as the run was, or "
                                  "pass check_anchors=False to drop the surgery on purpose")
            return None  # check_anchors=False: the surgery is dropped on purpose, its state with it
        params = self._surgery_params()
        by_id = {id(by_saved[k]): v for k, v in saved.items() if k in by_saved}
        if not by_id:
            return None  # a plain optimizer's state (checked by check_surgery when asked): start afresh
        missing = [i for i, p in enumerate(params) if anchor_state.SURGERY_STEP_KEY not in by_id.get(id(p), {})]
        if missing:
            raise AnchorError(f"the state dict lacks the gradient-surgery state of {len(missing)} trained "
                              f"tensor(s) (first indices: {missing[:5]}): load the full state dict it saved")
        steps = {int(by_id[id(p)][anchor_state.SURGERY_STEP_KEY]) for p in params}
        if len(steps) != 1:
            raise AnchorError(f"the state dict's gradient-surgery step counts disagree: {sorted(steps)}")
        safety = {p: by_id[id(p)][anchor_state.SURGERY_GRAD_KEY].to(p.device, p.dtype)
                  for p in params if anchor_state.SURGERY_GRAD_KEY in by_id[id(p)]}
        return steps.pop(), safety

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # An LR scheduler patches ``step`` on the instance with a closure over a weakref to
        # *this* optimizer: a copy must not keep it (it would step the original).
        state.pop("step", None)
        state.pop("_opt_called", None)
        # The last step's values may still be lazy (closures): evaluate them for a copy/pickle.
        state["_last"] = [(n, lam, PenaltyTerms(t.penalty, t.delta_sq, ())) for n, lam, t in self._last]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_last_tensors", None)
        state.setdefault("_constrained", [])
        state.setdefault("subspaces", None)
        state.setdefault("surgery", None)
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self._targets)} anchored weights, coupling={self.coupling!r}, inner={self.optimizer!r})"


class AnchoredAdamW(AnchoredOptimizer):
    r"""AdamW with the AsFT penalty: a drop-in for :class:`torch.optim.AdamW`.

    .. math::
        g_t = \nabla \mathcal{L}_\text{task} + \lambda \nabla \sum \lVert R\,\Delta W\rVert_F^2,
        \quad \theta_t = \text{AdamW}(\theta_{t-1}, g_t)

    Args:
        model: the model being tuned (plain or PEFT).
        anchors: ``{HF weight name: Projection}``.
        anchor_lambda: λ (default: 1.0).
        lr, betas, eps, weight_decay, amsgrad, foreach, maximize, capturable: as
            :class:`torch.optim.AdamW` (defaults: 1e-3, (0.9, 0.999), 1e-8, 0.01, False,
            None, False, False).
        params: parameters or param groups (default: the model's trainable parameters).
        coupling, reference, origins, subspaces, surgery, strict: see :class:`AnchoredOptimizer`.

    Example::

        >>> opt = AnchoredAdamW(peft_model, anchors, anchor_lambda=1.0, lr=5e-5)
        >>> trainer = Trainer(model=peft_model, args=args, optimizers=(opt, None), ...)
    """

    def __init__(
        self,
        model: nn.Module,
        anchors: Mapping[str, Projection],
        anchor_lambda: float = 1.0,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        params: Iterable[Any] | None = None,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        fused: bool | None = None,
        coupling: Coupling = "coupled",
        reference: Mapping[str, Tensor] | None = None,
        origins: Mapping[str, Mapping[str, tuple[Tensor, Tensor]]] | None = None,
        subspaces: Mapping[str, Any] | None = None,
        surgery: GradientSurgery | None = None,
        strict: bool = True,
    ) -> None:
        if fused:
            raise ValueError("fused=True is not supported (the AMP unscale would skip the penalty)")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        inner = torch.optim.AdamW(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            foreach=foreach, maximize=maximize, capturable=capturable, fused=False,
        )
        super().__init__(inner, model, anchors, anchor_lambda, coupling=coupling, reference=reference,
                         origins=origins, subspaces=subspaces, surgery=surgery, strict=strict)


def _restorable(target: Target, restored: dict[int, dict[str, Tensor]]) -> bool:
    """Whether ``target`` finds its state in ``restored``; its entries are taken out of it
    (nothing is written to the target: the caller restores once every check passed)."""
    trial = dict(restored)
    ok = copy.copy(target).restore(trial)
    if ok:
        for key in set(restored) - set(trial):
            restored.pop(key)
    return ok


def add_penalty_gradient(param: Tensor, grad: Tensor, lam: float | Tensor, group: Mapping[str, Any],
                         coupled: bool) -> None:
    """Apply ``λ·grad`` (the penalty's gradient for ``param``) under ``group``'s rules.

    Coupled: added to ``.grad`` (subtracted under ``maximize=True``, where the inner
    optimizer ascends ``.grad``, so the penalty still restrains). Decoupled: the weight
    moves by ``-lr·λ·grad`` now. A tensor λ or lr cannot be an ``alpha``: multiplied instead.
    """
    if grad.dtype != param.dtype:
        grad = grad.to(param.dtype)
    if coupled:
        alpha = -lam if group.get("maximize", False) else lam
        if param.grad is None:
            param.grad = grad * alpha
        elif isinstance(alpha, float):
            param.grad.add_(grad, alpha=alpha)
        else:
            param.grad.add_(grad * alpha)
    elif isinstance(lam, float) and isinstance(group["lr"], (int, float)):
        param.add_(grad, alpha=-(group["lr"] * lam))  # no temporary
    else:
        param.add_(grad * (-(group["lr"] * lam)))
