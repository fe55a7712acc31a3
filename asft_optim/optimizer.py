"""AnchoredOptimizer (wraps any torch optimizer) and AnchoredAdamW."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .projection import AnchorError, Projection
from .targets import Target, check_shapes, find_targets

Coupling = Literal["coupled", "decoupled"]
_STATE_KEY = "anchor"
_FORMAT_VERSION = 1


def _check_lambda(value: Any, where: str = "anchor_lambda") -> None:
    v = float(value)
    if not v >= 0.0 or v == float("inf"):
        raise ValueError(f"Invalid {where}: {value!r} (must be finite and >= 0)")


class AnchoredOptimizer(Optimizer):
    r"""Adds the AsFT penalty gradient to ``.grad`` inside ``step()`` of any optimizer.

    .. math::
        \mathcal{L} = \mathcal{L}_\text{task} + \lambda \sum_{\text{weights}}
        \lVert R\,\Delta W \rVert_F^2, \qquad R = I - C \;(\text{or } C \text{ for "subspace"})

    With ``coupling="coupled"`` (default) :math:`\lambda\nabla P` joins ``.grad`` before
    the inner step, so a run equals the inner optimizer on ``task + anchor_penalty``.
    With ``coupling="decoupled"`` the weights move by :math:`-\text{lr}\,\lambda\nabla P`
    directly, like AdamW's decoupled weight decay: the anchor's pull then does not go
    through Adam's per-coordinate normalisation, so its strength is ``lr·λ`` whatever
    the scale of the task gradients.

    The wrapper shares the inner optimizer's ``param_groups``, ``state`` and
    ``defaults`` (live: schedulers, accelerate and ``load_state_dict`` see one object).
    ``anchor_lambda`` is a key of every param group: saved, schedulable and settable
    per group (a target takes the λ of the group holding its first tensor).

    Args:
        optimizer: the inner optimizer, already holding the trainable parameters.
        model: the model (plain ``nn.Module`` or PEFT model) whose weights are anchored.
        anchors: ``{HF weight name: Projection}``, e.g. from :func:`build_anchors`.
        anchor_lambda: penalty strength λ (default: 1.0).
        coupling: ``"coupled"`` or ``"decoupled"`` (default: ``"coupled"``).
        reference: ``{name: W_ref}`` for fully tuned weights (default: the weights at
            construction).
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
        anchor_lambda: float = 1.0,
        *,
        coupling: Coupling = "coupled",
        reference: Mapping[str, Tensor] | None = None,
        strict: bool = True,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, AnchoredOptimizer):
            raise ValueError("optimizer is already anchored")
        _check_lambda(anchor_lambda)
        if coupling not in ("coupled", "decoupled"):
            raise ValueError(f"Invalid coupling: {coupling!r} (expected 'coupled' or 'decoupled')")
        if any(g.get("fused") for g in optimizer.param_groups) or getattr(
            optimizer, "_step_supports_amp_scaling", False
        ):
            # A fused step unscales AMP gradients itself, after ours would have been added to
            # still-scaled gradients: the penalty would be off by the loss scale.
            raise ValueError("fused inner optimizers are not supported; build it with fused=False")
        # Optimizer.__init__ would rebuild param_groups; set up only its hook machinery.
        self.optimizer = optimizer
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self.defaults.setdefault("anchor_lambda", anchor_lambda)
        for group in self.param_groups:
            group.setdefault("anchor_lambda", anchor_lambda)
            _check_lambda(group["anchor_lambda"])
        self.coupling = coupling
        self.anchors = anchors
        self._setup_targets(model, anchors, reference, strict)
        self._last: list[tuple[str, Tensor, Tensor]] = []

    # -- construction ---------------------------------------------------------------
    def _setup_targets(self, model, anchors, reference, strict) -> None:
        targets, missing = find_targets(model, anchors)
        if missing and strict:
            raise AnchorError(
                f"{len(missing)} anchor(s) match no module of the model (first: {missing[:5]}); "
                "check the model is the one being tuned (e.g. wrapped with PEFT before the optimizer) "
                "or pass strict=False"
            )
        check_shapes(targets, anchors)
        owned = self._param_ids()
        tuned = [t for t in targets if any(id(p) in owned for p in t.params())]
        if not tuned:
            raise AnchorError(
                "no anchored weight is trained by this optimizer: the anchors match "
                f"{len(targets)} module(s) but none of their trainable tensors is in its param_groups"
            )
        self._targets: list[Target] = tuned
        self._reference: dict[str, Tensor] = {}
        for t in tuned:
            if t.kind == "full":
                ref = (reference or {}).get(t.name)
                w = t.base_weight()
                if ref is not None and tuple(ref.shape) != tuple(w.shape):
                    raise AnchorError(f"{t.name}: reference shape {tuple(ref.shape)} != weight {tuple(w.shape)}")
                self._reference[t.name] = (w if ref is None else ref).detach().clone()

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
        param_group.setdefault("anchor_lambda", self.defaults["anchor_lambda"])
        _check_lambda(param_group["anchor_lambda"])
        self.optimizer.add_param_group(param_group)

    # -- the step --------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):  # type: ignore[override]
        """Add the penalty gradient, then run the inner step; returns the closure's loss."""
        if closure is None:
            self._apply_penalty()
            return self.optimizer.step()
        if self.coupling == "decoupled":
            with torch.enable_grad():
                loss = closure()
            self._apply_penalty()
            return self.optimizer.step(lambda: loss)

        def anchored_closure():
            # Closure-driven optimizers (LBFGS) re-evaluate: every evaluation sees the penalty.
            with torch.enable_grad():
                loss = closure()
            penalty = self._apply_penalty()
            return loss if loss is None else loss + penalty

        return self.optimizer.step(anchored_closure)

    def _apply_penalty(self) -> Tensor:
        """Compute every target's terms once and add λ∇P to ``.grad`` (or to the weights)."""
        groups = self._param_ids()
        total: Tensor | None = None
        stats: list[tuple[str, Tensor, Tensor]] = []
        any_trainable = False
        for t in self._targets:
            params = t.params()
            owned = [p for p in params if id(p) in groups and p.requires_grad]
            if not owned:
                continue
            any_trainable = True
            group = groups[id(owned[0])]
            lam = group["anchor_lambda"]
            res = t.terms(self.anchors[t.name], self._reference.get(t.name))
            if res is None:
                continue
            terms, tensors = res
            for p, g in zip(tensors, terms.grads):
                if id(p) not in groups or not p.requires_grad:
                    continue
                g = g.to(p.dtype)
                if self.coupling == "coupled":
                    if p.grad is None:
                        p.grad = g * lam
                    else:
                        p.grad.add_(g, alpha=lam)
                else:
                    lr = groups[id(p)]["lr"]
                    p.add_(g * (-lr * lam))
            value = terms.penalty * lam
            total = value if total is None else total + value
            stats.append((t.name, value, terms.off_anchor_fraction()))
        if not any_trainable:
            raise AnchorError(
                "no anchored parameter is trainable: the anchored tensors were frozen or replaced "
                "after the optimizer was built (e.g. PEFT wrapped the model afterwards); build the "
                "optimizer on the final model"
            )
        self._last = stats
        return total if total is not None else torch.zeros(())

    # -- diagnostics -----------------------------------------------------------------
    def anchor_stats(self) -> dict[str, dict[str, float]]:
        """Per weight, from the last step: ``{"penalty": λ‖RΔW‖², "off_anchor_fraction": ‖RΔW‖/‖ΔW‖}``."""
        if not self._last:
            return {}
        values = torch.stack([torch.stack([v.float().cpu(), f.float().cpu()]) for _, v, f in self._last]).tolist()
        return {n: {"penalty": v[0], "off_anchor_fraction": v[1]} for (n, _, _), v in zip(self._last, values)}

    def anchor_summary(self) -> dict[str, float]:
        """``anchor/penalty`` (sum), ``anchor/off_anchor_mean`` and ``anchor/off_anchor_max``."""
        stats = self.anchor_stats()
        if not stats:
            return {}
        fr = [s["off_anchor_fraction"] for s in stats.values()]
        return {
            "anchor/penalty": sum(s["penalty"] for s in stats.values()),
            "anchor/off_anchor_mean": sum(fr) / len(fr),
            "anchor/off_anchor_max": max(fr),
        }

    # -- the rest of the Optimizer contract ------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def train(self) -> None:
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()

    def eval(self) -> None:
        if callable(getattr(self.optimizer, "eval", None)):
            self.optimizer.eval()

    def state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        sd[_STATE_KEY] = {
            "version": _FORMAT_VERSION,
            "coupling": self.coupling,
            "reference": {k: v.clone() for k, v in self._reference.items()},
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        extra = sd.pop(_STATE_KEY, None)
        if extra is not None:
            if extra.get("version") != _FORMAT_VERSION:
                raise ValueError(f"unsupported anchored optimizer state version {extra.get('version')!r}")
            ref = extra.get("reference", {})
            if set(ref) != set(self._reference):
                raise ValueError(
                    f"saved reference weights {sorted(ref)} do not match this optimizer's {sorted(self._reference)}"
                )
            for k, v in ref.items():
                self._reference[k] = v.to(device=self._reference[k].device, dtype=self._reference[k].dtype)
        self.optimizer.load_state_dict(sd)
        for group in self.param_groups:
            group.setdefault("anchor_lambda", self.defaults["anchor_lambda"])

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
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
        coupling, reference, strict: see :class:`AnchoredOptimizer`.

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
        super().__init__(inner, model, anchors, anchor_lambda, coupling=coupling, reference=reference, strict=strict)
