"""The container the three kinds of anchors share: ``{weight name: operator}``, string
metadata and each weight's stored shape and layout.

:class:`~asft_optim.Anchors` (output side), :class:`~asft_optim.input_anchors.InputAnchors`
and :class:`~asft_optim.refusal_gradients.SafetySubspaces` are this read-only mapping;
each says only what differs: how a weight's :class:`~asft_optim.layout.WeightInfo` is
checked or inferred from its operator, its file, its summary. The bases' two kinds share
their file as well (:class:`~asft_optim.basis_io.BasisOperators`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

import torch

from .layout import WeightInfo
from .projection import AnchorError

__all__ = ["OperatorMapping"]

Op = TypeVar("Op")
Self = TypeVar("Self", bound="OperatorMapping")


class OperatorMapping(Mapping[str, Op], Generic[Op]):
    """Read-only mapping ``weight name -> operator`` plus string metadata.

    Args:
        projections: ``{HF weight name: operator}`` (non-empty).
        metadata: build metadata, stored as strings (default: None).
        weights: ``{name: WeightInfo}`` stored shape and layout of each weight (default:
            None: what each kind infers from the operator, :meth:`_weight_info`).

    Raises :class:`~asft_optim.AnchorError` when empty or when an operator does not fit
    its weight.
    """

    #: What the error of an empty mapping calls it.
    _what = "operators"

    def __init__(
        self,
        projections: Mapping[str, Op],
        metadata: Mapping[str, str] | None = None,
        weights: Mapping[str, WeightInfo] | None = None,
    ) -> None:
        if not projections:
            raise AnchorError(f"{self._what} are empty: no weight matched")
        self._operators = dict(projections)
        self.metadata: dict[str, str] = {k: str(v) for k, v in (metadata or {}).items()}
        given = dict(weights or {})
        #: ``{weight name: WeightInfo}``: stored shape and layout of every weight, in the
        #: operators' order.
        self.weights: dict[str, WeightInfo] = {
            n: self._weight_info(n, op, given.get(n)) for n, op in self._operators.items()
        }

    def _weight_info(self, name: str, op: Op, info: WeightInfo | None) -> WeightInfo:
        """``name``'s WeightInfo: ``info`` checked against ``op``, or (None: not given)
        inferred from it; :class:`~asft_optim.AnchorError` when they disagree."""
        raise NotImplementedError

    def __getitem__(self, name: str) -> Op:
        return self._operators[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._operators)

    def __len__(self) -> int:
        return len(self._operators)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} weights, {self.nbytes / 2**20:.1f} MiB)"

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor that defines the operators, in their storage dtype."""
        return sum(t.numel() * t.element_size() for op in self.values() for t in op.state_tensors())

    def to(self: Self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Self:
        """A copy with every operator moved/cast (the optimizer does this lazily by itself)."""
        return type(self)({n: op.to(device, dtype) for n, op in self.items()}, self.metadata, self.weights)
