"""FSDP2 (``DTensor``) parameters seen by the penalty math, which runs on whole tensors.

The math gathers a sharded tensor, computes on the global value and cuts each gradient
back to the parameter's own sharding. :func:`gather` is a collective: every rank calls it
for the same tensors in the same order (targets and adapters are visited in module order
on every rank); :func:`shard_like` only slices locally (``src_data_rank=None``: no
communication).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["gather", "is_dtensor", "scale", "shard_like"]


def is_dtensor(t: object) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "full_tensor")


def gather(t: Tensor) -> Tensor:
    """The global value of a DTensor (an all-gather), or ``t`` itself."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_like(g: Tensor, param: Tensor) -> Tensor:
    """``g`` (global shape) distributed like ``param`` when it is a DTensor, else ``g``."""
    if not is_dtensor(param):
        return g
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(g, param.device_mesh, param.placements, src_data_rank=None)


def scale(g: Tensor, factor: Tensor) -> Tensor:
    """``g * factor`` for a 0-d plain ``factor`` (autograd's incoming gradient), also when
    ``g`` is a DTensor (DTensor and Tensor do not mix in one op)."""
    if not is_dtensor(g):
        return g * factor
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = g.device_mesh
    return g * distribute_tensor(factor, mesh, [Replicate()] * mesh.ndim, src_data_rank=None)
