"""Schedule λ like a learning rate: ``anchor_lambda`` is a param-group key, so it can be driven."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .validation import lambda_value

__all__ = ["AnchorLambdaScheduler", "LambdaFn"]

LambdaFn = Callable[[int], float]


class AnchorLambdaScheduler:
    r"""Set every param group's ``anchor_lambda`` to its initial value times ``lambda_fn(step)``.

    .. math::
        \lambda_t^{(g)} = \lambda_0^{(g)} \cdot f_g(t)

    The counterpart of :class:`torch.optim.lr_scheduler.LambdaLR` for λ. The initial value
    is kept in each group as ``initial_anchor_lambda`` (as ``initial_lr`` for the LR), so
    it travels with the optimizer's ``state_dict``; this scheduler's own state is the step
    count (:meth:`state_dict`). Call :meth:`step` once after each ``optimizer.step()``;
    with the HF Trainer, :class:`~asft_optim.integrations.hf.AnchorLambdaCallback` does it
    (and resumes from the Trainer's step count).

    A param group added later (``optimizer.add_param_group``) joins the schedule at the next
    :meth:`step` (or :meth:`set_step`): its own ``anchor_lambda`` at that moment becomes its
    initial value, scaled from then on by the factor of the current step. With one callable,
    the new group follows it; with one callable per group, append the new group's function
    to :attr:`lambda_fns` first (else :meth:`step` raises a ``ValueError`` saying so). Until
    that next call the new group trains with the λ it was added with.

    Args:
        optimizer: an :class:`~asft_optim.AnchoredOptimizer`, or anything sharing its
            ``param_groups`` (accelerate's ``AcceleratedOptimizer``).
        lambda_fn: ``f(step) -> factor``, or one function per param group.
        last_step: the index of the last step done (default: -1, a new run).

    Example::

        >>> opt = AnchoredAdamW(model, anchors, anchor_lambda=2.0, lr=1e-4)
        >>> warmup = AnchorLambdaScheduler(opt, lambda t: min(1.0, t / 100))  # λ: 0 -> 2 over 100 steps
        >>> for batch in data:
        ...     loss(batch).backward(); opt.step(); opt.zero_grad(); warmup.step()
    """

    def __init__(self, optimizer: Any, lambda_fn: LambdaFn | Sequence[LambdaFn], last_step: int = -1) -> None:
        groups = optimizer.param_groups
        missing = [i for i, g in enumerate(groups) if "anchor_lambda" not in g]
        if missing:
            raise ValueError(
                f"param group(s) {missing} have no 'anchor_lambda': schedule an AnchoredOptimizer "
                "(or a wrapper around one)"
            )
        per_group = isinstance(lambda_fn, (list, tuple))
        fns = list(lambda_fn) if per_group else [lambda_fn] * len(groups)
        if len(fns) != len(groups) or not all(callable(f) for f in fns):
            raise ValueError(f"expected a callable or {len(groups)} callables, got {lambda_fn!r}")
        #: The one function shared by every group (groups added later follow it), or None
        #: when one function per group was given.
        self._shared: LambdaFn | None = None if per_group else lambda_fn
        if last_step == -1:
            for g in groups:
                g.setdefault("initial_anchor_lambda", g["anchor_lambda"])
        elif any("initial_anchor_lambda" not in g for g in groups):
            raise ValueError("last_step != -1 needs 'initial_anchor_lambda' in every param group (load the optimizer's state first)")
        #: One function per param group; append one when a group is added to a per-group schedule.
        self.lambda_fns: list[LambdaFn] = fns
        self.optimizer, self.last_step = optimizer, last_step
        self.step()

    def step(self) -> None:
        """Advance one step and write the new λ of every group."""
        self.set_step(self.last_step + 1)

    def set_step(self, step: int) -> None:
        """Jump to ``step`` (e.g. a Trainer's ``global_step`` on resume) and write its λ."""
        previous, self.last_step = self.last_step, int(step)
        try:
            self._apply()
        except Exception:
            self.last_step = previous  # a step that raises changes nothing
            raise

    def _functions(self) -> list[LambdaFn]:
        """One function per current param group, taking in groups added since the last call."""
        groups, fns = self.optimizer.param_groups, self.lambda_fns
        new = range(len(fns), len(groups))
        if len(groups) < len(fns) or (new and self._shared is None):
            raise ValueError(
                f"the optimizer has {len(groups)} param group(s) but this AnchorLambdaScheduler has "
                f"{len(fns)} lambda function(s) (one per group): after add_param_group, append the new "
                "group's function to scheduler.lambda_fns, or build the scheduler with one callable "
                "shared by every group"
            )
        missing = [i for i in new if "anchor_lambda" not in groups[i]]
        if missing:
            raise ValueError(
                f"param group(s) {missing} added after the scheduler have no 'anchor_lambda': add them "
                "to the AnchoredOptimizer itself (its add_param_group fills the default)"
            )
        return fns + [self._shared] * len(new)  # type: ignore[list-item]

    def _apply(self) -> None:
        groups, fns = self.optimizer.param_groups, self._functions()
        values = []
        for i, (g, fn) in enumerate(zip(groups, fns, strict=True)):
            initial = g.get("initial_anchor_lambda", g["anchor_lambda"])  # a new group: its own λ₀
            value = float(initial) * float(fn(self.last_step))
            values.append(lambda_value(value, f"scheduled anchor_lambda of param group {i} at step {self.last_step}"))
        # Written only once every group's value is known to be valid: a failure changes nothing.
        for g, value in zip(groups, values, strict=True):
            g.setdefault("initial_anchor_lambda", g["anchor_lambda"])
            g["anchor_lambda"] = value
        self.lambda_fns = fns

    def get_last_lambda(self) -> list[float]:
        """The λ of every group as last set."""
        return [g["anchor_lambda"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.set_step(state_dict["last_step"])
