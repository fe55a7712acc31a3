"""The independent ORACLE for the core tests: everything dense, differentiated by autograd.

It deliberately does not import ``asft_optim``: ΔW is formed as a dense (out, in)
matrix following PEFT's conventions (or ``W - W_ref``), C as a dense d_out × d_out
matrix straight from V, and the penalty ``λ‖(I - C) ΔW‖²_F`` (``λ‖C ΔW‖²`` in the
``subspace`` mode) is left to autograd.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

PEFT_PREFIX = "base_model.model."


def dense_c(v: Tensor, mode: str, rank: int | None = None) -> Tensor:
    """Dense C (d_out × d_out) from V (d_out, d_in), built from the definitions."""
    d_out = v.shape[0]
    if mode == "l2":
        return torch.zeros(d_out, d_out, dtype=v.dtype)
    if mode == "safelora":
        if rank is None:
            return v @ v.T / torch.linalg.matrix_norm(v)  # Frobenius norm, not squared
        u, s, _ = torch.linalg.svd(v, full_matrices=False)
        v_k = u[:, :rank] @ torch.diag(s[:rank])  # best rank-k approximation's column space
        return v_k @ v_k.T / torch.linalg.matrix_norm(v)
    # orthogonal / subspace: orthogonal projector onto the top-k left singular vectors
    u, _, _ = torch.linalg.svd(v, full_matrices=False)
    u_k = u[:, :rank]
    return u_k @ u_k.T


def dense_r(v: Tensor, mode: str, rank: int | None = None) -> Tensor:
    """Dense R: ``I - C``, or ``C`` for the subspace mode."""
    c = dense_c(v, mode, rank)
    return c if mode == "subspace" else torch.eye(v.shape[0], dtype=v.dtype) - c


def penalty_of(delta: Tensor, v: Tensor, mode: str, rank: int | None = None) -> Tensor:
    """``‖R ΔW‖²_F`` of a dense (out, in) update."""
    return (dense_r(v, mode, rank).to(delta.dtype) @ delta).pow(2).sum()


def off_anchor_fraction(delta: Tensor, v: Tensor, mode: str, rank: int | None = None) -> Tensor:
    r = dense_r(v, mode, rank).to(delta.dtype) @ delta
    return torch.linalg.matrix_norm(r) / torch.linalg.matrix_norm(delta)


def _active(module: nn.Module) -> list[str]:
    if getattr(module, "disable_adapters", False):
        return []
    active = module.active_adapter
    active = [active] if isinstance(active, str) else list(active)
    return [a for a in active if a not in getattr(module, "merged_adapters", [])]


def lora_delta(module: nn.Module) -> Tensor | None:
    """Dense ΔW (out, in) of a PEFT LoRA/DoRA layer, following PEFT's own conventions.

    * Linear / GPT-2 Conv1D: ``s·B@A`` is (out, in) whatever ``fan_in_fan_out`` says.
    * Embedding: ``s·lora_embedding_B @ lora_embedding_A`` is (dim, vocab) = (out, in).
    * Conv: ``s·B.flatten(1) @ A.flatten(1)`` (B is a 1×1 conv), kernel flattened.
    * DoRA: ``m/‖W + sBA‖_row ⊙ (W + sBA) - W`` (the effective merged update).
    """
    base = module.get_base_layer()
    total = None
    for a in _active(module):
        if a not in module.scaling:  # active on the model, but not injected into this layer
            continue
        s = module.scaling[a]
        if a in module.lora_A:
            b, aa = module.lora_B[a].weight, module.lora_A[a].weight
            d = s * (b.reshape(b.shape[0], -1) @ aa.reshape(aa.shape[0], -1))
        else:
            d = s * (module.lora_embedding_B[a] @ module.lora_embedding_A[a])
        if getattr(module, "use_dora", {}).get(a, False):
            w = base.weight.detach()
            w = w.T if type(base).__name__ == "Conv1D" else w
            w = w.reshape(w.shape[0], -1)
            mag = module.lora_magnitude_vector[a].weight.reshape(-1)
            combined = w + d
            d = mag[:, None] * combined / combined.norm(dim=1, keepdim=True) - w
        total = d if total is None else total + d
    return total


def full_delta(module: nn.Module, reference: Tensor) -> Tensor:
    """Dense ΔW = W - W_ref in (out, in) layout (Conv1D and Embedding stored transposed)."""
    d = module.weight - reference
    if type(module).__name__ == "Conv1D" or isinstance(module, nn.Embedding):
        d = d.T
    return d.reshape(d.shape[0], -1)


def hf_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{HF weight name: module}`` (PEFT prefixes stripped, wrappers' insides skipped)."""
    out = {}
    for n, m in model.named_modules():
        if any(part in n for part in (".base_layer", ".original_module", ".modules_to_save")):
            continue
        out[n.removeprefix(PEFT_PREFIX) + ".weight"] = m
    return out


def forward_weight(layer: nn.Module, d_in: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The layer's effective weight (out, in) read off its forward pass (Linear, no bias)."""
    return layer(torch.eye(d_in, dtype=dtype)).T


def origin_of(original: nn.Module, names, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Effective weights of ``original`` (a model, before or after PEFT), detached."""
    mods = hf_modules(original)
    with torch.no_grad():
        return {
            n: forward_weight(mods[n], mods[n].in_features, dtype).detach().clone() for n in names
        }


def _forward_deltas(model: nn.Module, origin: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{name: W_eff - W_eff at the origin}``, the effective weights read off the forward pass."""
    mods, out = hf_modules(model), {}
    for name, w0 in origin.items():
        delta = forward_weight(mods[name], w0.shape[1]) - w0
        if any(getattr(mods[name], "use_dora", {}).values()):
            # PEFT's DoRA forward detaches the row norm (DoRA §4.3), so its autograd is not the
            # gradient of the effective ΔW: take the dense formula (lora_delta), after checking
            # it has the forward pass's value.
            dense = lora_delta(mods[name])
            torch.testing.assert_close(dense.detach(), delta.detach(), atol=1e-10, rtol=1e-9)
            delta = dense
        out[name] = delta
    return out


def _dense_deltas(model: nn.Module, anchors: Mapping[str, tuple], reference) -> dict[str, Tensor]:
    """``{name: ΔW}`` of the anchored weights: LoRA/DoRA by PEFT's formulas, else ``W - W_ref``."""
    out = {}
    for mod_name, module in model.named_modules():
        name = mod_name[len(PEFT_PREFIX):] if mod_name.startswith(PEFT_PREFIX) else mod_name
        name += ".weight"
        if name not in anchors or ".base_layer" in mod_name:
            continue
        if hasattr(module, "lora_A"):
            delta = lora_delta(module)
            if delta is None:
                continue
        else:
            if not module.weight.requires_grad:
                continue
            delta = full_delta(module, reference[name])
        out[name] = delta
    return out


def oracle_penalty(
    model: nn.Module,
    anchors: Mapping[str, tuple],
    anchor_lambda: float | Mapping[str, float] = 1.0,
    reference: Mapping[str, Tensor] | None = None,
    *,
    origin: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """``Σ λ_name ‖R ΔW‖²`` over ``anchors = {hf weight name: (V, mode, rank)}``.

    By default ΔW is formed densely: LoRA/DoRA layers are recognised by ``lora_A``; other
    modules whose name is anchored are fully tuned and need ``reference[name]``.

    With ``origin = {name: effective weight (out, in) at the origin}`` (see :func:`origin_of`),
    ΔW of each of those weights is instead read off the forward pass, ``layer(I)ᵀ - origin``:
    an oracle that knows nothing of a PEFT tuner's own ΔW formula (``tests/test_tuners.py``).
    """
    if origin is not None:
        deltas = _forward_deltas(model, origin)
    else:
        deltas = _dense_deltas(model, anchors, reference)
    total = None
    for name, delta in deltas.items():
        v, mode, rank = anchors[name]
        lam = anchor_lambda[name] if isinstance(anchor_lambda, Mapping) else anchor_lambda
        p = lam * penalty_of(delta, v, mode, rank)
        total = p if total is None else total + p
    assert total is not None, "oracle: no anchored weight"
    return total


def oracle_stats(model, anchors, reference=None) -> dict[str, tuple[Tensor, Tensor]]:
    """``{name: (‖RΔW‖², ‖RΔW‖/‖ΔW‖)}`` for the anchored weights, dense."""
    out = {}
    with torch.no_grad():
        for mod_name, module in model.named_modules():
            name = (mod_name[len(PEFT_PREFIX):] if mod_name.startswith(PEFT_PREFIX) else mod_name) + ".weight"
            if name not in anchors or ".base_layer" in mod_name:
                continue
            v, mode, rank = anchors[name]
            delta = lora_delta(module) if hasattr(module, "lora_A") else full_delta(module, reference[name])
            out[name] = (penalty_of(delta, v, mode, rank), off_anchor_fraction(delta, v, mode, rank))
    return out
