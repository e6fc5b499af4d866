"""Run a function on N gloo ranks (CPU); a failure on any rank fails the calling test with its traceback.

The launcher is the benchmarks' (``benchmarks._ranks``): one copy of the spawn, barrier and teardown code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks._ranks import run_on_ranks


def run_distributed(fn: Callable[..., Any], *args: Any, world_size: int = 2) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks (one torch thread each).

    ``fn`` must be a module-level function (it is pickled).
    """
    run_on_ranks(fn, *args, world_size=world_size)
