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
        fns = list(lambda_fn) if isinstance(lambda_fn, (list, tuple)) else [lambda_fn] * len(groups)
        if len(fns) != len(groups) or not all(callable(f) for f in fns):
            raise ValueError(f"expected a callable or {len(groups)} callables, got {lambda_fn!r}")
        if last_step == -1:
            for g in groups:
                g.setdefault("initial_anchor_lambda", g["anchor_lambda"])
        elif any("initial_anchor_lambda" not in g for g in groups):
            raise ValueError("last_step != -1 needs 'initial_anchor_lambda' in every param group (load the optimizer's state first)")
        self.optimizer, self.lambda_fns, self.last_step = optimizer, fns, last_step
        self.step()

    def step(self) -> None:
        """Advance one step and write the new λ of every group."""
        self.last_step += 1
        self._apply()

    def set_step(self, step: int) -> None:
        """Jump to ``step`` (e.g. a Trainer's ``global_step`` on resume) and write its λ."""
        self.last_step = int(step)
        self._apply()

    def _apply(self) -> None:
        for i, (g, fn) in enumerate(zip(self.optimizer.param_groups, self.lambda_fns, strict=True)):
            value = float(g["initial_anchor_lambda"]) * float(fn(self.last_step))
            where = f"scheduled anchor_lambda of param group {i} at step {self.last_step}"
            g["anchor_lambda"] = lambda_value(value, where)

    def get_last_lambda(self) -> list[float]:
        """The λ of every group as last set."""
        return [g["anchor_lambda"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.set_step(state_dict["last_step"])
