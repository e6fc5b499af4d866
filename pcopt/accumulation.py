"""Deprecated: ``once_per_step(model)`` is :meth:`pcopt.PCState.accumulate`; this path works until pcopt 0.4."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from torch import nn

from pcopt.state import PCState

__all__ = ["once_per_step"]


@contextlib.contextmanager
def once_per_step(model: nn.Module) -> Iterator[None]:
    """Deprecated alias of ``pcopt.PCState(model).accumulate()``."""
    warnings.warn(
        "pcopt.accumulation.once_per_step(model) is deprecated and will be removed in pcopt 0.4: use "
        "pcopt.PCState(model).accumulate().",
        DeprecationWarning,
        stacklevel=3,
    )
    with PCState(model).accumulate():
        yield
