"""Run a function on N gloo ranks (CPU) and re-raise the first failure in the parent."""

from __future__ import annotations

import os
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, errors) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # no rank tears gloo down while the other still has collectives in flight
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()
    # A clean finish: leave without C++ static teardown, where gloo's threads occasionally abort the process
    # ("terminate called without an active exception", SIGABRT) after everything has completed. The same
    # as torchtitan_ext.train does after a finished run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable[..., Any], *args: Any, world_size: int = 2) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks.

    ``fn`` must be a module-level function (it is pickled). Assertion errors raised on any rank
    fail the calling test with that rank's traceback.
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    try:
        mp.start_processes(
            _worker,
            args=(world_size, port, fn, args, errors),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
    except Exception as exc:  # ProcessRaisedException carries only the text; prefer the queued traceback
        if not errors.empty():
            rank, tb = errors.get()
            raise AssertionError(f"rank {rank} failed:\n{tb}") from None
        raise AssertionError(str(exc)) from None
