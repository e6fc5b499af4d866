"""Compatibility shims that let torchtitan 0.3.0 train on CPU (gloo) and on torch 2.13.

Nothing here is applied on a CUDA machine with a torch that has what torchtitan needs: the
launcher (``python -m torchtitan_ext.train``) calls :func:`install_cpu_shims` only when no GPU is
present, and the other pieces are no-ops unless their condition holds:

* :func:`install_cpu_shims` - torchtitan picks ``"cuda"`` when no accelerator is found
  (``torchtitan/tools/utils.py``); point its ``device_type``/``device_module`` at the CPU
  instead. Must run before any other torchtitan module is imported.
* :func:`install_set_timeout_shim` - ``torch.distributed.set_timeout`` is public only from torch
  2.14; torchtitan calls it after the first step.
* :class:`DenseMaskAttention` / :func:`dense_attention` - FlexAttention has no CPU backward; this
  subclass evaluates the same BlockMask densely with SDPA.
* :func:`force_sum_reduction_on_gloo` - gloo has no ``PREMUL_SUM``, which FSDP2 uses for torchtitan's
  gradient divide factor of 1.0; a plain SUM is the same reduction.
* :func:`check_spmd_backend` - the ``full_dtensor`` backend silently doubles the loss on torch < 2.14
  and ``spmd_types`` needs torch 2.14's FSDP2; refuse both there.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = [
    "TORCH_HAS_SPMD_FSDP",
    "check_spmd_backend",
    "force_sum_reduction_on_gloo",
    "install_cpu_shims",
    "install_set_timeout_shim",
]

TORCH_HAS_SPMD_FSDP = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)
"""torch >= 2.14: FSDP2 understands spmd_types and full_dtensor trains correctly."""


def check_spmd_backend(spmd_backend: str) -> None:
    """Raise ``ValueError`` for a backend that is wrong or unsupported on this torch version."""
    if TORCH_HAS_SPMD_FSDP or spmd_backend == "partial_dtensor":
        return
    why = {
        "full_dtensor": "it trains with a silently doubled loss on this torch version",
        "spmd_types": "torch's FSDP2 supports spmd_types only from torch 2.14",
    }.get(spmd_backend, "it is not a known backend")
    raise ValueError(
        f"parallelism.spmd_backend={spmd_backend!r} is refused on torch {torch.__version__}: {why}. "
        "Use --parallelism.spmd_backend partial_dtensor (the default of the torchtitan_ext configs "
        "on torch < 2.14), or upgrade to torch >= 2.14."
    )


def install_set_timeout_shim() -> bool:
    """Provide ``torch.distributed.set_timeout`` on torch versions that only have the private one."""
    if hasattr(dist, "set_timeout"):
        return False

    def set_timeout(timeout: timedelta, group: dist.ProcessGroup | None = None) -> None:
        dist.distributed_c10d._set_pg_timeout(timeout, group)

    dist.set_timeout = set_timeout
    return True


class _CPUDeviceModule:
    """The few ``torch.cuda``-style calls torchtitan makes on its ``device_module``, for the CPU."""

    def __getattr__(self, name: str):
        return getattr(torch.cpu, name)

    @staticmethod
    def current_device() -> int:
        # torchtitan passes this to ``barrier(device_ids=[...])``, which needs an int.
        return 0

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def set_device(device) -> None:
        pass

    @staticmethod
    def synchronize(device=None) -> None:
        pass

    @staticmethod
    def get_device_name(device=None) -> str:
        return "CPU"

    @staticmethod
    def get_device_properties(device=None):
        @dataclass
        class _Props:
            name: str
            total_memory: int

        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 1 << 30
        return _Props(name="CPU", total_memory=total)

    @staticmethod
    def memory_stats(device=None) -> dict:
        return {}

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass


def install_cpu_shims() -> None:
    """Make torchtitan use the CPU. Call before importing anything from torchtitan but its utils."""
    already = [
        m
        for m in (
            "torchtitan.trainer",
            "torchtitan.components.metrics",
            "torchtitan.distributed.utils",
            "torchtitan.distributed.parallel_dims",
        )
        if m in sys.modules
    ]
    import torchtitan.tools.utils as tt_utils

    if tt_utils.device_type != "cpu":
        if already:
            raise RuntimeError(
                f"install_cpu_shims() must run before torchtitan modules read the device type, but "
                f"{already} are already imported. Call it first (python -m torchtitan_ext.train does)."
            )
        tt_utils.device_type = "cpu"
        tt_utils.device_module = _CPUDeviceModule()
    install_set_timeout_shim()
    logger.info("torchtitan_ext: no GPU found, running torchtitan on the CPU with gloo")


def force_sum_reduction_on_gloo(model: torch.nn.Module) -> int:
    """Use SUM for FSDP2 gradient reductions on gloo (which lacks PREMUL_SUM). Returns modules changed."""
    from torch.distributed.fsdp import FSDPModule

    if not dist.is_initialized() or dist.get_backend() != "gloo":
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
            n += 1
    return n
