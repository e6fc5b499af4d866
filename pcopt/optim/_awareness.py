"""Keep the PC layer's power-iteration state in step with the raw weights an optimizer updates."""

from __future__ import annotations

import logging

import torch.distributed as dist
from torch.optim import Optimizer

from pcopt.parametrizations import refresh

logger = logging.getLogger(__name__)


def _is_dtensor(t) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def owned_params(optimizer: Optimizer) -> list:
    """Every parameter of ``optimizer``, in param-group order (the same order on every rank)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def refresh_owned(optimizer: Optimizer, num_iterations: int | None) -> int:
    """Refresh ``u``, ``v`` of every PC weight whose raw parameter ``optimizer`` owns; returns how many.

    Under FSDP2 this issues vector all-reduces, so every rank must reach it (it runs inside ``step()``), and
    every rank must refresh the weights in the same order. ``pcopt.refresh(params)`` orders the weights it
    finds by an id-keyed registry, which differs between processes, so sharded parameters are refreshed one
    call per parameter, in param-group order (the same on every rank).
    """
    params = owned_params(optimizer)
    if any(_is_dtensor(p) for p in params):
        count = sum(refresh([p], num_iterations=num_iterations) for p in params)
    else:
        count = refresh(params, num_iterations=num_iterations)
    logger.debug("%s: refreshed %d preconditioned weights", type(optimizer).__name__, count)
    return count


def refresh_after_step(optimizer: Optimizer, args, kwargs) -> None:
    """Step post-hook: refresh the PC weights the optimizer owns, if enabled on it."""
    if getattr(optimizer, "refresh_preconditioners", False):
        refresh_owned(optimizer, getattr(optimizer, "num_power_iterations", None))
