"""Pure tensor math of the AsFT penalty; no ``nn`` or ``optim`` imports.

Paper symbols, mapped once (AsFT §3.3, Eq. 2-4):

* ``V = W_aligned - W_base``  the alignment direction d_aligned of one weight, in
  (out, in) layout;
* ``C``                       the alignment operator acting on the *output* side of an
  update, ``C = F Fᵀ`` for a stored factor ``F`` of shape (d_out, m);
* ``I - C``                   C⊥_harm, the part of an update that leaves the basin;
* ``ΔW``                      the update: ``s·B·A`` for LoRA, ``W - W_ref`` otherwise.

The penalty of one weight is ``‖R ΔW‖²_F`` with ``R = I - C`` (modes ``safelora``,
``orthogonal``, ``l2``) or ``R = C`` (mode ``subspace``: C spans *harmful*
directions, AsFT_Alt). Its gradient is ``2 RᵀR ΔW``. C is never formed as a
d×d matrix: every product goes through ``F`` as ``F (Fᵀ X)``, costing O(d·m·n)
for an (d, n) operand. ``C`` is symmetric but a projector only in the
``orthogonal``/``subspace`` modes, so ``RᵀR = I - 2C + C²`` in general: we never
assume ``RᵀR = R``.

Every anchor is built with *orthogonal columns*: ``F = U diag(√c)`` with U orthonormal
(d_out, m) and c the eigenvalues of ``C = U diag(c) Uᵀ`` (``safelora``: ``c = s²/‖V‖_F``
from the SVD ``V = U diag(s) W``; ``orthogonal``/``subspace``: ``c = 1``). Then the Gram
matrix ``G = FᵀF = diag(c)`` is a vector, and with ``Y = Fᵀ X``::

    R X    = X - F Y                    RᵀR X = X - F ((2 - c) ⊙ Y)     (I - C modes)
    R X    = F Y                        RᵀR X = F (c ⊙ Y)               (subspace)

so ``R X`` and ``RᵀR X`` take one pass over F for Y and one for ``F [Y, W]``: two passes
in every mode, exact for any V, at the memory of F alone. For low-rank anchors
(``m ≤ d_out/4``) the full m×m ``G = FᵀF`` of the *stored* factor is used instead
(``RᵀR = I - F(2I - G)Fᵀ``, exact for any F, also once a factor stored in bf16 is only
orthogonal to that precision); a factor not known to have orthogonal columns and too
wide for G falls back to applying R twice (four passes). See
:meth:`Projection.compact_gram` and :meth:`Projection.residual_and_metric`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import torch
from torch import Tensor

__all__ = [
    "AnchorError",
    "MODES",
    "Mode",
    "PenaltyTerms",
    "Projection",
    "dense_terms",
    "lora_terms",
    "projection_from_delta",
]

Mode = Literal["safelora", "orthogonal", "subspace", "l2"]
MODES: tuple[str, ...] = get_args(Mode)

#: SVDs of matrices whose smaller side exceeds this use a randomized solver.
_EXACT_SVD_LIMIT = 2048

#: Cache ``G = FᵀF`` only when ``m * _GRAM_MIN_RATIO <= d_out``: G costs m² extra memory
#: (at most 1/4 of F's d_out·m) and one pass over G replaces one over F. For an exact
#: anchor of a square weight (m = d_out) G would double the memory and save nothing.
_GRAM_MIN_RATIO = 4


def _ft_mm(f: Tensor, x: Tensor) -> Tensor:
    """``Fᵀ x``, computed as ``(xᵀ F)ᵀ`` (same values, a view of the result).

    F is row-major (d_out, m) and x has few columns: CPU BLAS (MKL) runs the ``xᵀ F``
    form 1.4-2× faster than ``Fᵀ x`` (d = 4096, n = 8, one thread: about 8 vs 12 ms,
    benchmarks/results/penalty_cost.md); on CUDA both are one cuBLAS call.
    """
    return (x.transpose(0, 1) @ f).transpose(0, 1)


class AnchorError(ValueError):
    """Raised for anchors that cannot be used: bad shapes, non-finite values, no match."""


@dataclass(frozen=True)
class Projection:
    """The alignment operator ``C = F Fᵀ`` of one weight and the penalty it defines.

    Args:
        factor: ``F`` of shape (d_out, m). ``m`` may be 0 (mode ``l2``: C = 0).
        mode: ``"safelora"`` (C = V Vᵀ/‖V‖_F, the reference code's operator),
            ``"orthogonal"`` (C = U_k U_kᵀ, paper Eq. 3 with a rank cut),
            ``"subspace"`` (C spans harmful directions; penalise ``‖C ΔW‖²``) or
            ``"l2"`` (C = 0; penalise all of ΔW).
        energy: fraction of ``‖V‖²_F`` kept by the factor (1.0 when exact).
        orthogonal_columns: whether ``F = U diag(√c)`` has orthogonal columns, so that
            ``FᵀF = diag(c)`` (default: False; every anchor built by this library, or
            loaded from a file, has them; see :meth:`with_orthogonal_columns`).
    """

    factor: Tensor
    mode: Mode
    energy: float = 1.0
    orthogonal_columns: bool = False
    #: :meth:`compact_gram`, set by :meth:`prepare` (None: not prepared, or no G pays).
    prepared_gram: Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise AnchorError(f"unknown anchor mode {self.mode!r}; expected one of {MODES}")
        if self.factor.dim() != 2:
            raise AnchorError(f"anchor factor must be 2-D, got shape {tuple(self.factor.shape)}")

    @property
    def d_out(self) -> int:
        return self.factor.shape[0]

    @property
    def rank(self) -> int:
        return self.factor.shape[1]

    @property
    def d_in(self) -> None:
        """None: an output-side operator fits a weight of any input size."""
        return None

    @property
    def version(self) -> int:
        """The factor's in-place version counter: a cached moved copy is stale once it moves."""
        return self.factor._version

    def state_tensors(self) -> tuple[Tensor, ...]:
        """The tensors that define the operator (for the anchors' fingerprint)."""
        return (self.factor,)

    def fits(self, out_in_shape: tuple[int, ...]) -> str | None:
        """Why this operator cannot act on a weight whose ΔW is ``out_in_shape``, or None."""
        d_out = out_in_shape[0] if len(out_in_shape) == 2 else -1
        if d_out != self.d_out:
            return f"anchor acts on {self.d_out} outputs, the weight has {d_out}"
        if self.is_projector and self.rank > d_out:
            return f"anchor rank {self.rank} exceeds the {d_out} outputs of the weight"
        if self.factor.numel() and not bool(torch.isfinite(self.factor).all()):
            return "anchor factor has non-finite values"
        return None

    @property
    def gram_pays(self) -> bool:
        """Whether caching ``G = FᵀF`` (m×m) is worth its memory (m ≤ d_out / 4)."""
        return 0 < self.rank and self.rank * _GRAM_MIN_RATIO <= self.d_out

    def gram(self) -> Tensor:
        """``G = FᵀF`` (m×m); it costs O(d·m²). See :meth:`compact_gram`."""
        f = self.factor
        return f.transpose(0, 1) @ f

    def compact_gram(self) -> Tensor | None:
        """``G = FᵀF`` in the smallest exact form, for :meth:`residual_and_metric`; cache it.

        The m×m matrix when it is small (:attr:`gram_pays`: low-rank anchors, exact for
        any stored F); else its diagonal ``c`` (a vector of m column norms², one pass
        over F) when the columns are orthogonal; else None (R is then applied twice).
        """
        if self.rank == 0:
            return None
        if self.gram_pays:
            return self.gram()
        if self.orthogonal_columns:
            return torch.linalg.vector_norm(self.factor, dim=0).square()  # no d×m temporary
        return None

    def largest_eigenvalue(self) -> float:
        """The largest eigenvalue of C (1 for a projector, 0 for an empty factor).

        For ``safelora`` anchors it is ``σ_max²/‖V‖_F`` and it says how far the anchor is
        from L2: every direction keeps at least ``(1 − c_max)²`` of the penalty L2 puts on it.
        """
        if self.rank == 0:
            return 0.0
        f = self.factor.double()
        if self.orthogonal_columns:
            return float(torch.linalg.vector_norm(f, dim=0).square().max())
        return float(torch.linalg.matrix_norm(f, ord=2).square())

    @property
    def is_projector(self) -> bool:
        """Whether C is meant to be idempotent (orthonormal or empty factor)."""
        return self.mode != "safelora"

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        return replace(self, factor=self.factor.to(device=device, dtype=dtype), prepared_gram=None)

    def prepare(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Projection:
        """A copy on ``device``/``dtype`` with :meth:`compact_gram` computed once: the form
        the penalty math uses (:meth:`dense_terms`, :meth:`lora_terms`); targets cache it."""
        moved = self.to(device, dtype)
        return replace(moved, prepared_gram=moved.compact_gram())

    def dense_terms(self, delta: Tensor) -> PenaltyTerms:
        """See :func:`dense_terms` (with the Gram matrix :meth:`prepare` cached)."""
        return dense_terms(self, delta, self.prepared_gram)

    def lora_terms(self, lora_b: Tensor, lora_a: Tensor, scaling: float) -> PenaltyTerms:
        """See :func:`lora_terms` (with the Gram matrix :meth:`prepare` cached)."""
        return lora_terms(self, lora_b, lora_a, scaling, self.prepared_gram)

    def with_orthogonal_columns(self) -> Projection:
        """The same operator C with ``F = U diag(√c)`` (orthogonal columns), by an SVD of F.

        ``F = U diag(σ) Wᵀ`` gives ``C = F Fᵀ = U diag(σ²) Uᵀ``: the new factor is
        ``U diag(σ)``, at most ``min(d_out, m)`` columns. Already orthogonal: ``self``.
        """
        if self.orthogonal_columns or self.rank == 0:
            return self if self.orthogonal_columns else replace(self, orthogonal_columns=True, prepared_gram=None)
        f = self.factor
        work = f.detach().to(torch.promote_types(f.dtype, torch.float32))
        try:
            u, sigma, _ = torch.linalg.svd(work, full_matrices=False)
        except RuntimeError as exc:  # LAPACK did not converge
            raise AnchorError(f"the SVD of an anchor factor {tuple(f.shape)} failed: {exc}") from exc
        return replace(self, factor=(u * sigma).to(f.dtype).contiguous(), orthogonal_columns=True, prepared_gram=None)

    # -- operator products, all O(d_out · m · n) ------------------------------------------
    # ``apply_c``, ``residual`` and ``metric`` are the short readable definitions (R
    # applied as written, twice for RᵀR); ``residual_and_metric`` is the fused form the
    # step uses, tested against them and against the dense oracle.
    def apply_c(self, x: Tensor) -> Tensor:
        """``C x`` for ``x`` of shape (d_out, n)."""
        f = self.factor
        if f.shape[1] == 0:
            return torch.zeros_like(x)
        return f @ _ft_mm(f, x)

    def residual(self, x: Tensor) -> Tensor:
        """``R x``: the penalised component (``(I-C) x``, or ``C x`` for ``subspace``)."""
        cx = self.apply_c(x)
        return cx if self.mode == "subspace" else x - cx

    def metric(self, x: Tensor, rx: Tensor | None = None) -> Tensor:
        """``RᵀR x = R (R x)`` (R is symmetric). Pass ``rx = R x`` when already computed.

        R is applied twice in every mode: ``RᵀR = R`` only holds for an exactly
        orthonormal factor, and ``safelora``'s C is not a projector at all.
        """
        rx = self.residual(x) if rx is None else rx
        return self.residual(rx)

    def residual_and_metric(self, x: Tensor, gram: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(R x, RᵀR x)`` for ``x`` of shape (d_out, n), in the fewest passes over F.

        ``gram``: :meth:`compact_gram` (cached by the caller). With it, ``Y = Fᵀ x`` and one
        product ``F [Y, W]`` give both: ``W = 2Y - GY`` (``I - C`` modes:
        ``RᵀR = I - F(2I - G)Fᵀ``) or ``W = GY`` (``subspace``: ``RᵀR = C² = F G Fᵀ``),
        ``GY`` being ``c ⊙ Y`` for the diagonal form. Without it: R applied twice, four
        skinny products (what :meth:`metric` does, the ``I - C`` subtractions fused into
        ``addmm``).
        """
        f = self.factor
        if f.shape[1] == 0:  # l2: R = I
            return x, x
        y = _ft_mm(f, x)
        subspace = self.mode == "subspace"
        if gram is None:
            if subspace:
                rx = f @ y
                return rx, f @ _ft_mm(f, rx)
            rx = torch.addmm(x, f, y, alpha=-1)
            return rx, torch.addmm(rx, f, _ft_mm(f, rx), alpha=-1)
        n = x.shape[1]
        if gram.dim() == 1:  # G = diag(c)
            c = gram.unsqueeze(1)
            w = y * c if subspace else y * (2.0 - c)
        else:
            w = gram @ y if subspace else torch.addmm(y, gram, y, beta=2, alpha=-1)
        # One pass over F for both column blocks: F [Y, W] costs about what F Y does.
        z = f @ torch.cat([y, w], 1)
        if subspace:
            return z[:, :n], z[:, n:]
        return x - z[:, :n], x - z[:, n:]


# -- penalty values and gradients --------------------------------------------------------


class PenaltyTerms:
    """Raw (λ-free) penalty of one weight and its gradients.

    ``penalty = ‖R ΔW‖²`` and ``delta_sq = ‖ΔW‖²`` are 0-d tensors (never ``.item()``-ed
    on the hot path). ``grads`` matches the tensors the update was built from:
    ``(dB, dA)`` for LoRA, ``(dW,)`` for a dense update.

    ``penalty`` and ``delta_sq`` may be given as zero-argument callables, evaluated on
    first access: the optimizer only needs the gradients every step, the values only
    when diagnostics are read. Such callables must close over fresh tensors only (never
    over parameters, which the inner step changes in place).
    """

    __slots__ = ("_penalty", "_delta_sq", "grads")

    def __init__(
        self,
        penalty: Tensor | Callable[[], Tensor],
        delta_sq: Tensor | Callable[[], Tensor],
        grads: tuple[Tensor, ...],
    ) -> None:
        self._penalty, self._delta_sq, self.grads = penalty, delta_sq, grads

    @property
    def penalty(self) -> Tensor:
        if callable(self._penalty):
            self._penalty = self._penalty()
        return self._penalty

    @property
    def delta_sq(self) -> Tensor:
        if callable(self._delta_sq):
            self._delta_sq = self._delta_sq()
        return self._delta_sq

    def with_grads(self, grads: tuple[Tensor, ...]) -> PenaltyTerms:
        """The same (possibly still lazy) values with other gradients; ``()`` to keep the
        values after the step without holding the gradients."""
        return PenaltyTerms(self._penalty, self._delta_sq, grads)

    def off_anchor_fraction(self) -> Tensor:
        """``‖R ΔW‖ / ‖ΔW‖`` (0 where ΔW = 0)."""
        return torch.sqrt(self.penalty / self.delta_sq.clamp_min(torch.finfo(self.delta_sq.dtype).tiny))


def dense_terms(proj: Projection, delta: Tensor, gram: Tensor | None = None) -> PenaltyTerms:
    """Penalty of a dense update ``delta`` (d_out, d_in): grad ``2 RᵀR ΔW``.

    ``gram``: ``proj.compact_gram()`` if cached (see :meth:`Projection.residual_and_metric`).
    """
    r, m = proj.residual_and_metric(delta, gram)
    # The values are O(d_out·d_in) reductions: computed now, so that r and delta
    # (full-size) are not kept alive for the diagnostics.
    return PenaltyTerms(r.pow(2).sum(), delta.pow(2).sum(), (m.mul_(2.0) if m is not delta else 2.0 * m,))


def lora_terms(
    proj: Projection, lora_b: Tensor, lora_a: Tensor, scaling: float, gram: Tensor | None = None
) -> PenaltyTerms:
    """Penalty of ``ΔW = s·B·A`` in closed form, never forming ΔW.

    With ``P = s²‖R B A‖²``:  ``∂P/∂B = 2s² (RᵀR B)(A Aᵀ)``, ``∂P/∂A = 2s² (RB)ᵀ(RB) A``.
    Cost O(d_out·m·r + (d_out + d_in)·r²).

    Args:
        lora_b: ``B`` of shape (d_out, r).
        lora_a: ``A`` of shape (r, d_in).
        scaling: ``s`` (α/r, or α/√r for rsLoRA).
        gram: ``proj.compact_gram()`` if cached (see :meth:`Projection.residual_and_metric`).
    """
    s2 = float(scaling) ** 2
    rb, mb = proj.residual_and_metric(lora_b, gram)
    gram_a = lora_a @ lora_a.transpose(0, 1)  # A Aᵀ (r, r)
    gram_rb = rb.transpose(0, 1) @ rb  # (RB)ᵀ(RB) (r, r)
    gram_b = lora_b.transpose(0, 1) @ lora_b  # now: lora_b may be a parameter's storage
    # addmm with beta=0 ignores its first argument: one kernel for the scaled product.
    grad_b = torch.addmm(mb, mb, gram_a, beta=0, alpha=2.0 * s2)
    grad_a = torch.addmm(lora_a, gram_rb, lora_a, beta=0, alpha=2.0 * s2)
    return PenaltyTerms(
        lambda: s2 * (gram_rb * gram_a).sum(),  # s² tr((RB)ᵀRB · AAᵀ)
        lambda: s2 * (gram_b * gram_a).sum(),
        (grad_b, grad_a),
    )


# -- building operators from weight differences -----------------------------------------


def _top_left_singular(v: Tensor, k: int | None, energy: float | None) -> tuple[Tensor, Tensor, float]:
    """Top left singular vectors/values of ``v`` in float64 or float32, cut by rank or energy."""
    total = v.pow(2).sum()
    small = min(v.shape)
    if energy is not None or small <= _EXACT_SVD_LIMIT:
        u, s, _ = torch.linalg.svd(v, full_matrices=False)
        if energy is not None:
            cum = torch.cumsum(s.pow(2), 0) / total
            k = int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype)).item()) + 1
            k = min(k, small)
    else:
        assert k is not None
        # Randomized SVD: oversampling + power iterations make the top-k subspace accurate.
        u, s, _ = torch.svd_lowrank(v, q=min(k + 16, small), niter=4)
    assert k is not None
    u, s = u[:, :k].contiguous(), s[:k].contiguous()
    kept = float(s.pow(2).sum() / total) if float(total) > 0 else 1.0
    return u, s, kept


def projection_from_delta(
    delta: Tensor,
    mode: Mode = "safelora",
    *,
    rank: int | None = None,
    energy: float | None = None,
    name: str = "weight",
) -> Projection:
    """Build the operator of one weight from ``delta`` (``V``, or harmful directions).

    Args:
        delta: ``V = W_aligned - W_base`` in (out, in) layout (for ``subspace``: a matrix
            whose columns span the harmful directions).
        mode: see :class:`Projection` (default: ``"safelora"``).
        rank: keep the top ``rank`` left singular directions (default: None = exact for
            ``safelora``; required, or ``energy``, for ``orthogonal``/``subspace``).
        energy: keep the fewest directions holding this fraction of ``‖V‖²_F``.
        name: weight name used in error messages.

    The math runs in float32 at least (float64 inputs stay float64).
    """
    v = _checked_delta(delta, mode, rank, energy, name)
    if mode == "l2":
        return Projection(v.new_zeros(v.shape[0], 0), "l2", orthogonal_columns=True)
    norm = float(torch.linalg.matrix_norm(v))
    if norm == 0.0:
        raise AnchorError(f"{name}: the weight difference is zero; C is undefined (use mode='l2')")
    if mode == "safelora" and rank is None and energy is None:
        return Projection(_exact_safelora_factor(v, norm, name), "safelora", orthogonal_columns=True)
    if mode == "safelora":
        u, s, kept = _top_left_singular(v, rank, energy)
        return Projection(u * (s / math.sqrt(norm)), "safelora", kept, orthogonal_columns=True)
    if rank is None and energy is None:
        raise AnchorError(
            f"{name}: mode {mode!r} needs rank= or energy= (a full-rank V spans everything, so C = I)"
        )
    u, _, kept = _top_left_singular(v, rank, energy)
    return Projection(u, mode, kept, orthogonal_columns=True)


def _checked_delta(delta: Tensor, mode: str, rank: int | None, energy: float | None, name: str) -> Tensor:
    """``delta`` detached, in float32 at least, after the checks every mode shares."""
    if mode not in MODES:
        raise AnchorError(f"{name}: unknown anchor mode {mode!r}; expected one of {MODES}")
    if delta.dim() != 2:
        raise AnchorError(f"{name}: anchors need a 2-D weight, got shape {tuple(delta.shape)}")
    if rank is not None and energy is not None:
        raise AnchorError(f"{name}: give rank or energy, not both")
    v = delta.detach().to(torch.promote_types(delta.dtype, torch.float32))
    if not torch.isfinite(v).all():
        raise AnchorError(f"{name}: the weight difference has non-finite values")
    d_out, d_in = v.shape
    if rank is not None and not (isinstance(rank, int) and 0 < rank <= min(d_out, d_in)):
        raise AnchorError(f"{name}: rank {rank!r} must be an int in [1, {min(d_out, d_in)}] for shape {tuple(v.shape)}")
    if energy is not None and not (0.0 < energy <= 1.0):
        raise AnchorError(f"{name}: energy must lie in (0, 1], got {energy!r}")
    return v


def _exact_safelora_factor(v: Tensor, norm: float, name: str) -> Tensor:
    """The factor F of the exact ``C = V Vᵀ/‖V‖_F`` (``norm = ‖V‖_F``), in ``v``'s dtype.

    Frobenius norm, not squared, as in the reference code and Safe LoRA. From the full SVD
    ``V = U diag(s) W``, ``C = U diag(s²/‖V‖_F) Uᵀ``: the factor ``U diag(s/√‖V‖_F)`` has
    min(d_out, d_in) orthogonal columns (a wide weight's factor is (d_out, d_out)).
    In float64, by an eigendecomposition of the smaller Gram matrix (about twice as fast as
    the SVD, which float32 rounding (~cond·eps) would make measurably inexact):
    ``V Vᵀ = U diag(s²) Uᵀ`` gives ``F = U diag(s)/√‖V‖_F``; for a tall V, ``Vᵀ V = W diag(s²)
    Wᵀ`` gives ``F = V W/√‖V‖_F`` (= ``U diag(s)``, no division by s). Squaring V loses
    nothing C needs: C's entries are those of ``V Vᵀ``.
    """
    d_out, d_in = v.shape
    v64 = v.double()
    try:
        if d_out <= d_in:
            evals, u = torch.linalg.eigh(v64 @ v64.T)
            f = u.flip(1) * evals.flip(0).clamp_min(0).sqrt()
        else:
            _, w = torch.linalg.eigh(v64.T @ v64)
            f = v64 @ w.flip(1)
    except RuntimeError as exc:  # LAPACK did not converge
        raise AnchorError(f"{name}: the eigendecomposition of the weight difference failed: {exc}") from exc
    f = f / math.sqrt(norm)
    return f.to(v.dtype).contiguous()
