"""Pure tensor math of input-side (activation) anchors, and of sums of operators.

Symbols (issue 31, item 1; SaLoRA / GuardSpace's null-space idea as a penalty):

* ``U``   (d_in, k): a basis of the inputs a layer receives on the defender's harmful
  prompts (top-k eigenvectors of their covariance ``Σ_h = XᵀX``, or of the contrast
  ``Σ_h u = μ (Σ_t + εI) u``); orthonormal columns when built by this library;
* ``P = U Uᵀ``: the projector onto that input subspace;
* ``ΔW``  (d_out, d_in): the update, ``s·B·A`` for LoRA.

The penalty of one weight is ``‖ΔW U‖²_F`` (``= ‖ΔW P‖²_F`` when U is orthonormal):
the change of the layer's output ``ΔW x`` on every input ``x`` in span(U). It is exact
for *any* U: it is ``tr(ΔW M ΔWᵀ)`` with ``M = U Uᵀ`` positive semi-definite, whose
gradient is ``2 ΔW M``; orthonormality only makes M a projector. No d_in×d_in matrix is
formed: every product goes through U, O(d_out·d_in·k) dense, O((d_out + d_in)·r·k +
d_out·r²) for LoRA.

Operators share one duck-typed interface (the optimizer's update classes call it):
``d_out``, ``d_in``, ``to``, ``dense_terms``, ``lora_terms``, ``residual``, ``fits``.
:class:`SumOperator` composes any of them: ``a list of anchors sums their penalties``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .projection import AnchorError, PenaltyTerms

__all__ = ["InputProjection", "SumOperator"]


@dataclass(frozen=True)
class InputProjection:
    r"""The input-side penalty ``‖ΔW U‖²_F`` of one weight.

    .. math::
        P(ΔW) = \|ΔW U\|_F^2 = \operatorname{tr}(ΔW\, U U^\top ΔW^\top), \qquad
        \frac{∂P}{∂ΔW} = 2\, ΔW U U^\top .

    For LoRA, ``ΔW = s B A`` and with ``Z = A U`` (r, k):

    .. math::
        P = s^2 \|B Z\|_F^2 = s^2 \operatorname{tr}(B^\top B\, Z Z^\top), \quad
        \frac{∂P}{∂B} = 2 s^2 B (Z Z^\top), \quad
        \frac{∂P}{∂A} = 2 s^2 (B^\top B) Z U^\top .

    Args:
        basis: ``U`` of shape (d_in, k), ``k ≥ 1``. Orthonormal columns make ``U Uᵀ`` the
            projector onto the anchored inputs; the math is exact for any U.
        d_out: output size of the weight it anchors (its shape in (out, in) layout).
        energy: what the basis keeps (fraction of the harmful inputs' energy, or of the
            contrast's eigenvalues); informative only (default: 1.0).

    Example::

        >>> u = torch.linalg.qr(torch.randn(64, 4)).Q         # 4 input directions
        >>> op = InputProjection(u, d_out=32)
        >>> terms = op.lora_terms(b, a, scaling=2.0)         # never forms ΔW
        >>> terms.penalty, terms.grads                        # (dP/dB, dP/dA)
    """

    basis: Tensor
    d_out: int
    energy: float = 1.0
    #: The operator's kind, as ``Projection.mode`` names the output-side ones.
    mode = "input"

    def __post_init__(self) -> None:
        if self.basis.dim() != 2 or self.basis.shape[1] < 1:
            raise AnchorError(
                f"an input-side basis must be 2-D (d_in, k) with k ≥ 1, got shape {tuple(self.basis.shape)}"
            )
        if not (isinstance(self.d_out, int) and self.d_out > 0):
            raise AnchorError(f"d_out must be a positive int, got {self.d_out!r}")

    @property
    def d_in(self) -> int:
        return self.basis.shape[0]

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> InputProjection:
        """A copy with the basis moved/cast (nothing to precompute: U is used as stored)."""
        return replace(self, basis=self.basis.to(device=device, dtype=dtype))

    def prepare(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> InputProjection:
        """What a target caches on the weight's device and math dtype (a plain cast here)."""
        return self.to(device, dtype)

    @property
    def version(self) -> int:
        """The basis's in-place version counter (a cached moved copy is stale once it moves)."""
        return self.basis._version

    def state_tensors(self) -> tuple[Tensor, ...]:
        """The tensors that define the operator (for the anchors' fingerprint)."""
        return (self.basis,)

    def fits(self, out_in_shape: tuple[int, int]) -> str | None:
        """None if this operator fits a weight of ``out_in_shape``, else the problem."""
        d_out, d_in = out_in_shape
        if d_out != self.d_out or d_in != self.d_in:
            return (
                f"input-side anchor fits a weight ({self.d_out}, {self.d_in}) in (out, in) layout, "
                f"not ({d_out}, {d_in}); rebuild the anchors on this model"
            )
        return None

    def orthonormality_error(self) -> float:
        """``max |UᵀU − I|`` in float64: 0 for a projector (informative; the math needs none)."""
        u = self.basis.double()
        return float((u.T @ u - torch.eye(self.rank, dtype=u.dtype, device=u.device)).abs().max())

    def residual(self, delta: Tensor) -> Tensor:
        """``ΔW U`` (d_out, k), differentiable: ``P = residual(ΔW).pow(2).sum()``."""
        return delta @ self.basis

    def dense_terms(self, delta: Tensor) -> PenaltyTerms:
        """Penalty of a dense update ``delta`` (d_out, d_in): grad ``2 (ΔW U) Uᵀ``."""
        y = delta @ self.basis  # (d_out, k)
        grad = torch.mm(y, self.basis.transpose(0, 1)).mul_(2.0)
        return PenaltyTerms(y.pow(2).sum(), delta.pow(2).sum(), (grad,))

    def lora_terms(self, b: Tensor, a: Tensor, scaling: float) -> PenaltyTerms:
        """Penalty of ``ΔW = s·B·A`` in closed form, never forming ΔW (see the class doc).

        Args:
            b: ``B`` of shape (d_out, r).
            a: ``A`` of shape (r, d_in).
            scaling: ``s`` (α/r, or α/√r for rsLoRA).
        """
        s2 = float(scaling) ** 2
        z = a @ self.basis  # A U (r, k)
        gram_z = z @ z.transpose(0, 1)  # (AU)(AU)ᵀ (r, r)
        gram_b = b.transpose(0, 1) @ b  # BᵀB (r, r): b may be a parameter's storage
        gram_a = a @ a.transpose(0, 1)  # A Aᵀ, for ‖ΔW‖²
        grad_b = torch.mm(b, gram_z).mul_(2.0 * s2)
        grad_a = torch.mm(gram_b, z @ self.basis.transpose(0, 1)).mul_(2.0 * s2)
        return PenaltyTerms(
            lambda: s2 * (gram_b * gram_z).sum(),  # s² tr(BᵀB · ZZᵀ)
            lambda: s2 * (gram_b * gram_a).sum(),
            (grad_b, grad_a),
        )


class SumOperator:
    r"""The sum of several operators' penalties on the same weight.

    .. math::
        P(ΔW) = \sum_i w_i P_i(ΔW), \qquad ∇P = \sum_i w_i ∇P_i .

    ``residual`` concatenates ``√w_i · residual_i`` flattened, so that
    ``residual(ΔW).pow(2).sum()`` is the weighted sum. ``delta_sq`` is ``‖ΔW‖²`` (the
    first part's; every part computes the same).

    Args:
        operators: one or more operators with the shared interface (an output-side
            ``Projection`` once it has the methods, :class:`InputProjection`, another sum).
        weights: non-negative weight of each part (default: None, all 1): e.g. to balance
            an input-side anchor against an output-side one under one λ.

    Example::

        >>> op = SumOperator([output_side, InputProjection(u, d_out=32)])
        >>> op.dense_terms(delta).grads[0]    # the sum of both gradients
    """

    def __init__(self, operators: Sequence[Any], weights: Sequence[float] | None = None) -> None:
        ops = list(operators)
        if not ops:
            raise AnchorError("SumOperator needs at least one operator")
        ws = [1.0] * len(ops) if weights is None else [float(w) for w in weights]
        if len(ws) != len(ops) or not all(math.isfinite(w) and w >= 0 for w in ws):
            raise AnchorError(
                f"SumOperator weights must be {len(ops)} finite non-negative numbers, got {weights!r}"
            )
        d_outs = {op.d_out for op in ops}
        d_ins = {op.d_in for op in ops} - {None}
        if len(d_outs) != 1 or len(d_ins) > 1:
            raise AnchorError(
                f"SumOperator parts disagree on the weight's shape: d_out {sorted(d_outs)}, "
                f"d_in {sorted(d_ins)}; every part must anchor the same weight"
            )
        self.operators: tuple[Any, ...] = tuple(ops)
        self.weights: tuple[float, ...] = tuple(ws)
        self.d_out: int = d_outs.pop()
        self.d_in: int | None = d_ins.pop() if d_ins else None

    def __repr__(self) -> str:
        parts = ", ".join(f"{w:g}·{type(op).__name__}" for op, w in zip(self.operators, self.weights, strict=True))
        return f"SumOperator({parts})"

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SumOperator:
        return SumOperator([op.to(device, dtype) for op in self.operators], self.weights)

    def prepare(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SumOperator:
        """Every part prepared (an output-side part caches its Gram matrix)."""
        return SumOperator([op.prepare(device, dtype) for op in self.operators], self.weights)

    @property
    def version(self) -> tuple:
        return tuple(op.version for op in self.operators)

    @property
    def mode(self) -> str:
        return "sum"

    def state_tensors(self) -> tuple[Tensor, ...]:
        return tuple(t for op in self.operators for t in op.state_tensors())

    def fits(self, out_in_shape: tuple[int, int]) -> str | None:
        problems = [p for op in self.operators if (p := op.fits(out_in_shape)) is not None]
        return "; ".join(problems) if problems else None

    def residual(self, delta: Tensor) -> Tensor:
        return torch.cat([
            op.residual(delta).reshape(-1) * math.sqrt(w) for op, w in zip(self.operators, self.weights, strict=True)
        ])

    def _combine(self, parts: list[PenaltyTerms]) -> PenaltyTerms:
        ws = self.weights
        grads = tuple(
            sum((g * w for g, w in zip(gs[1:], ws[1:], strict=True)), gs[0] * ws[0])
            for gs in zip(*(t.grads for t in parts), strict=True)
        )
        return PenaltyTerms(
            lambda: sum((t.penalty * w for t, w in zip(parts[1:], ws[1:], strict=True)), parts[0].penalty * ws[0]),
            lambda: parts[0].delta_sq,
            grads,
        )

    def dense_terms(self, delta: Tensor) -> PenaltyTerms:
        return self._combine([op.dense_terms(delta) for op in self.operators])

    def lora_terms(self, b: Tensor, a: Tensor, scaling: float) -> PenaltyTerms:
        return self._combine([op.lora_terms(b, a, scaling) for op in self.operators])
