"""Pure tensor math of the safety-gradient subspace (SPF-like; issue 31, item 2).

Symbols, per anchored weight in (out, in) layout:

* ``G_i`` (d_out, d_in): the gradient of the aligned model's refusal loss (the NLL of its
  own greedy refusal to harmful prompt i) with respect to the weight;
* ``Q`` (d_out, k): orthonormal top-k left singular vectors of ``[G_1 … G_n]``, i.e. the
  top eigenvectors of ``S = Σ_i G_i G_iᵀ``: the output directions the refusals move most;
* ``ΔW``: the update (``W − W_ref``; ``s·B·A`` for LoRA).

**What is projected, and what is guaranteed.** The operation is a projection of the
*update* after the inner optimizer's step, not of the gradient before it:

* dense:  ``W ← W − Q Qᵀ (W − W_ref)``, so ``Qᵀ ΔW = 0`` after every step;
* LoRA:   ``B ← (I − Q Qᵀ) B``; then ``Qᵀ ΔW = s (QᵀB) A = 0`` exactly (PEFT starts from
  ``B = 0``). A is left alone: ``col(ΔW) ⊆ col(B)`` already lies in Q's complement, and
  ``∂L/∂A = s Bᵀ ∂L/∂ΔW`` then only sees the projected part of the ΔW gradient.

This holds whatever the inner optimizer does (Adam's per-coordinate scaling, momentum,
weight decay): the constraint is applied to the parameter itself. Projecting the
*gradient* instead (:meth:`SafetySubspace.remove` on ``.grad`` before the step, SPF's
literal form) keeps ``Qᵀ ΔW = 0`` only for optimizers whose update is a linear
combination of past gradients (SGD, with momentum, with decoupled weight decay toward
the reference); Adam divides coordinate-wise by ``√v`` and moves ΔW into span(Q)
(tested). For LoRA, projecting B's gradient equals projecting the output side of the ΔW
gradient (``∂L/∂B = s (∂L/∂ΔW) Aᵀ``). Cost per step: O(d_out·k·r) per LoRA weight,
O(d_out·k·d_in) per dense weight; no d_out×d_out matrix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .projection import AnchorError

__all__ = ["SafetySubspace", "captured_share", "left_gram", "subspace_fingerprint", "subspace_from_gram"]


@dataclass(frozen=True)
class SafetySubspace:
    r"""The output-side safety subspace ``span(Q)`` of one weight and the projections onto its complement.

    .. math::
        \Pi x = x - Q (Q^\top x), \qquad Q^\top \Pi x = 0 .

    Args:
        basis: ``Q`` of shape (d_out, k), orthonormal columns (checked to 1e-4 in float32
            terms, looser for bf16/fp16 storage: the guarantee ``QᵀΔW = 0`` needs a projector).
        d_in: input size of the weight (default: None, any).
        energy: share of ``Σ‖G_i‖²`` the basis keeps (informative; default: 1.0).

    Example::

        >>> sub = SafetySubspace(q)                 # q (d_out, k) from refusal gradients
        >>> opt.step(); sub.project_lora_(lora_b)    # after the inner step: QᵀΔW = 0
    """

    basis: Tensor
    d_in: int | None = None
    energy: float = 1.0

    def __post_init__(self) -> None:
        q = self.basis
        if q.dim() != 2 or q.shape[1] < 1 or q.shape[1] > q.shape[0]:
            raise AnchorError(f"a safety basis must be (d_out, k) with 1 ≤ k ≤ d_out, got shape {tuple(q.shape)}")
        q64 = q.detach().double()
        err = float((q64.T @ q64 - torch.eye(q.shape[1], dtype=q64.dtype, device=q.device)).abs().max())
        # Exact to the storage precision: 1e-4 in float32/64, looser in bf16/fp16.
        tol = max(1e-4, 8 * torch.finfo(q.dtype).eps * q.shape[0] ** 0.5) if q.is_floating_point() else 0.0
        if not err < tol:
            raise AnchorError(
                f"a safety basis must have orthonormal columns (|QᵀQ − I| = {err:.2e}); "
                "orthonormalise it (torch.linalg.qr(q).Q) or build it with subspace_from_gram"
            )

    @property
    def d_out(self) -> int:
        return self.basis.shape[0]

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SafetySubspace:
        return replace(self, basis=self.basis.to(device=device, dtype=dtype))

    def state_tensors(self) -> tuple[Tensor, ...]:
        """The tensors that define the subspace (what its container counts in ``nbytes``)."""
        return (self.basis,)

    def prepare(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SafetySubspace:
        """What a target caches on the weight's device and math dtype (a plain cast)."""
        return self.to(device, dtype)

    @property
    def version(self) -> int:
        return self.basis._version

    def fits(self, out_in_shape: tuple[int, int]) -> str | None:
        d_out, d_in = out_in_shape
        if d_out != self.d_out or (self.d_in is not None and d_in != self.d_in):
            return (f"safety subspace fits a weight ({self.d_out}, {self.d_in}) in (out, in) layout, "
                    f"not ({d_out}, {d_in}); rebuild it on this model")
        return None

    def inside(self, x: Tensor) -> Tensor:
        """``Qᵀ x`` (k, n): the coordinates of ``x``'s columns in the subspace."""
        return self.basis.transpose(0, 1) @ x

    def remove(self, x: Tensor) -> Tensor:
        """``(I − QQᵀ) x`` for ``x`` (d_out, n): a ΔW, a gradient, or a LoRA ``B``."""
        return torch.addmm(x, self.basis, self.inside(x), alpha=-1)

    def project_lora_(self, b: Tensor) -> Tensor:
        """In place ``B ← (I − QQᵀ) B`` (call after the inner step); returns ``b``."""
        return b.sub_(self.basis @ self.inside(b))

    def project_dense_(self, weight: Tensor, reference: Tensor) -> Tensor:
        """In place ``W ← W − QQᵀ (W − W_ref)`` (call after the inner step); returns ``weight``."""
        return weight.sub_(self.basis @ self.inside(weight - reference))

    def fraction_inside(self, x: Tensor) -> Tensor:
        """``‖Qᵀx‖ / ‖x‖`` (0 for x = 0): how much of an update or gradient lies in the subspace."""
        norm = x.norm()
        return self.inside(x).norm() / norm.clamp_min(torch.finfo(norm.dtype).tiny)


def left_gram(gradients: Iterable[Tensor], d_out: int | None = None) -> Tensor:
    """``S = Σ_i G_i G_iᵀ`` (d_out, d_out) in float64, streaming over the gradients.

    Its eigenvectors are the left singular vectors of ``[G_1 … G_n]`` and its eigenvalues
    their squared singular values, at the memory of one d_out×d_out matrix.
    """
    total = None
    for g in gradients:
        g64 = g.detach().double()
        total = g64 @ g64.T if total is None else total.addmm_(g64, g64.T)
    if total is None:
        raise AnchorError("no refusal gradient was given")
    if d_out is not None and total.shape[0] != d_out:
        raise AnchorError(f"gradients have {total.shape[0]} rows, the weight has {d_out} outputs")
    return total


def subspace_from_gram(
    gram: Tensor, rank: int | None = None, energy: float | None = None, *, d_in: int | None = None,
    name: str = "weight",
) -> SafetySubspace:
    """The top-k eigenvectors of ``S = Σ G_i G_iᵀ`` as a :class:`SafetySubspace`.

    Args:
        gram: ``S`` from :func:`left_gram`.
        rank / energy: keep ``rank`` directions, or the fewest holding ``energy`` of ``tr S``.
        d_in: the weight's input size, for :meth:`SafetySubspace.fits` (default: None).
    """
    if (rank is None) == (energy is None):
        raise AnchorError(f"{name}: give rank= or energy= (one of them)")
    evals, evecs = torch.linalg.eigh(gram.double())
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    total = float(evals.sum())
    if total == 0.0:
        raise AnchorError(f"{name}: the refusal loss does not move this weight (zero gradients); drop it")
    d = gram.shape[0]
    if rank is not None:
        if not (isinstance(rank, int) and 1 <= rank <= d):
            raise AnchorError(f"{name}: rank {rank!r} must be an int in [1, {d}]")
        k = rank
    else:
        if not (0.0 < energy <= 1.0):
            raise AnchorError(f"{name}: energy must lie in (0, 1], got {energy!r}")
        cum = torch.cumsum(evals, 0) / total
        k = min(int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1, d)
    return SafetySubspace(evecs[:, :k].contiguous(), d_in, float(evals[:k].sum()) / total)


def captured_share(basis: Tensor, second_moment: Tensor) -> float:
    """``tr(Bᵀ M B) / tr(M)``: the share of the energy of the vectors behind ``M`` that lies in
    ``span(B)`` (0 when ``M`` is 0).

    The one geometry criterion of both data-driven operators, on held-out data: with ``B``
    an input-side basis ``U`` and ``M`` a layer's input covariance on held-out prompts, the
    share of those inputs the penalty holds; with ``B`` a safety basis ``Q`` and ``M`` the
    Gram matrix ``Σ_i G_i G_iᵀ`` of held-out gradients
    (:func:`~asft_optim.refusal_gradients.refusal_grams`), the share of their energy the
    projection removes.

    Args:
        basis: ``B`` (d, k) with orthonormal columns.
        second_moment: ``M`` (d, d), symmetric positive semi-definite.
    """
    if basis.dim() != 2 or second_moment.shape != (basis.shape[0], basis.shape[0]):
        raise AnchorError(f"a basis {tuple(basis.shape)} and a second moment {tuple(second_moment.shape)} "
                          "do not fit: the moment must be (d, d) for a (d, k) basis")
    b, m = basis.double(), second_moment.double()
    total = float(torch.trace(m))
    return 0.0 if total == 0.0 else float(torch.trace(b.transpose(0, 1) @ m @ b)) / total


def subspace_fingerprint(subspaces: Mapping[str, SafetySubspace]) -> str:
    """A short stable hash of ``{name: SafetySubspace}``: names, shapes and the bases' bytes.

    What the optimizer's state records to refuse a resume under other subspaces, and what
    ``asft anchors info`` prints for a ``gradient``-side file. One pass on the CPU, once.
    """
    h = hashlib.sha256()
    for name in sorted(subspaces):
        s = subspaces[name]
        q = s.basis.detach()
        q = (q.full_tensor() if hasattr(q, "full_tensor") else q).to("cpu").contiguous()
        h.update(f"{name}|{s.d_out}|{s.d_in}|{s.rank}|{q.dtype};".encode())
        h.update(q.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
