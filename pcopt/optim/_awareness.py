"""Keep the PC layer's power-iteration state in step with the raw weights an optimizer updates."""

from __future__ import annotations

import logging

from torch.optim import Optimizer

from pcopt.parametrizations import refresh

logger = logging.getLogger(__name__)


def check_num_power_iterations(value: int | None) -> None:
    """Validate an optimizer's ``num_power_iterations`` option (None: each PC weight's own setting)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(
            f"Invalid num_power_iterations: {value!r}. Expected None (each PC weight's own "
            "setting, 10 by default) or an integer >= 1."
        )


def owned_params(optimizer: Optimizer) -> list:
    """Every parameter of ``optimizer``, in param-group order (the same order on every rank)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def refresh_owned(optimizer: Optimizer, num_iterations: int | None) -> int:
    """Refresh ``u``, ``v`` of every PC weight whose raw parameter ``optimizer`` owns; returns how many.

    Under FSDP2 this issues vector all-reduces, so every rank must reach it (it runs inside ``step()``).
    ``pcopt.refresh`` batches the weights in the order of the given parameters, here param-group order,
    which is the same on every rank.
    """
    count = refresh(owned_params(optimizer), num_iterations=num_iterations)
    logger.debug("%s: refreshed %d preconditioned weights", type(optimizer).__name__, count)
    return count


def refresh_after_step(optimizer: Optimizer, args, kwargs) -> None:
    """Step post-hook: refresh the PC weights the optimizer owns, if enabled on it."""
    if getattr(optimizer, "refresh_preconditioners", False):
        refresh_owned(optimizer, getattr(optimizer, "num_power_iterations", None))
