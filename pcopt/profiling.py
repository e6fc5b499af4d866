"""What predicts a step's speed on a GPU, measured on any device: host syncs, kernel launches, FLOPs by dtype.

A GPU step is slow for three reasons a CPU can see: the host waits for the device (a sync), the device waits
for the host (one launch per aten op, each a few microseconds), and the matmuls run in a slow dtype (fp32 is
about 1/12 of bf16 on an H200). :class:`StepProfile` counts all three for a block of code, at the aten level:

    with pcopt.profiling.StepProfile() as prof:
        loss(model(x)).backward(); state.after_backward(); optimizer.step()
    prof.syncs, prof.ops, prof.flops_by_dtype

The counts are exact and deterministic (no timing), so tests can assert them.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

__all__ = ["SYNC_OPS", "StepProfile"]

SYNC_OPS = frozenset({"aten::_local_scalar_dense", "aten::is_nonzero", "aten::item", "aten::equal"})
"""aten ops that read a device value on the host: ``.item()``, ``float(t)``, ``bool(t)``, ``if t:`` and
``torch.equal``. (``.tolist()`` and ``.cpu()`` of a CPU tensor dispatch nothing, so a CPU run cannot see them;
on a GPU they are device-to-host copies. pcopt's step code uses neither.)"""

_VIEWS_AND_METADATA = frozenset({"aten::detach", "aten::alias", "aten::lift_fresh"})


class StepProfile(TorchDispatchMode):
    """Count host syncs, aten ops and FLOPs (by the dtype of the first operand) of the code it wraps.

    Attributes:
        syncs: ops in :data:`SYNC_OPS`, by name.
        ops: every aten op dispatched (a proxy for kernel launches; ``detach``/``alias`` excluded), by name.
        flops_by_dtype: FLOPs of the ops torch's :mod:`torch.utils.flop_counter` counts, by the dtype of
            their first tensor operand (the dtype the matmul runs in).
    """

    def __init__(self) -> None:
        super().__init__()
        self.syncs: Counter[str] = Counter()
        self.ops: Counter[str] = Counter()
        self.flops_by_dtype: Counter[torch.dtype] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.name().split(".")[0]
        if name in SYNC_OPS:
            self.syncs[name] += 1
        if name not in _VIEWS_AND_METADATA:
            self.ops[name] += 1
        counter = flop_registry.get(func.overloadpacket)
        if counter is not None:
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if first is not None:
                self.flops_by_dtype[first.dtype] += int(counter(*args, **kwargs, out_val=out))
        return out

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def total_flops(self) -> int:
        return sum(self.flops_by_dtype.values())
