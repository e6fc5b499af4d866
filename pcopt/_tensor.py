"""Internal tensor helpers shared by pcopt's modules (DTensor and FSDP2 detection, gathering)."""

from __future__ import annotations

from torch import Tensor, nn


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 / TP shards)."""
    import torch.distributed as dist

    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: Tensor) -> Tensor:
    """The full tensor behind ``t``: all-gathers a DTensor (every rank must call it), else ``t`` itself."""
    return t.full_tensor() if is_dtensor(t) else t


def local_tensor(t: Tensor) -> Tensor:
    """This rank's local shard of a DTensor (an alias: in-place ops update the DTensor), else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def is_fsdp_module(module: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was applied to ``module``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(module, FSDPModule)


def shards(placement) -> bool:
    """Whether a DTensor placement splits a tensor dim: ``Shard``, or the ``_StridedShard`` FSDP2 uses on a dim that
    tensor parallelism already shards (which is not a ``Shard`` subclass and answers ``is_shard()`` with False)."""
    return placement.is_shard() or type(placement).__name__ == "_StridedShard"
