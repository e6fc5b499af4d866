"""Run a function on N spawned gloo ranks (CPU) and return rank 0's result: the one launcher of the
benchmarks and the tests.

Each rank initialises the default gloo group, calls ``fn(rank, world_size, *args)``, meets the others at a
barrier (no rank tears gloo down while another still has collectives in flight), destroys the group and
leaves with ``os._exit``. That last step skips C++ static teardown, where gloo's threads occasionally abort a
process that has already finished everything ("terminate called without an active exception", SIGABRT), as
``torchtitan_ext.train`` does after a finished run.

Rank 0's return value and any rank's traceback travel through files, not a pipe: a pipe write blocks once
its buffer (64 KiB) is full while the parent is still joining the ranks, and ``os._exit`` would drop what a
``multiprocessing.Queue`` still holds in its feeder thread.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, threads: int, fn: Callable, args: tuple, tmp: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        value = fn(rank, world_size, *args)
        dist.barrier()
        if rank == 0:
            Path(tmp, "result.pkl").write_bytes(pickle.dumps(value))
    except BaseException:
        # named by the moment of failure (CLOCK_MONOTONIC is one clock for all processes of the machine)
        Path(tmp, f"{time.monotonic_ns():020d}.rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2, threads: int = 1) -> Any:
    """``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks with ``threads`` torch threads
    each; returns what rank 0 returned.

    ``fn`` must be a module-level function (it is pickled). A failure raises ``RuntimeError`` with every failed
    rank's traceback, the first one written (the cause) first.
    """
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.start_processes(
                _worker,
                args=(world_size, _free_port(), threads, fn, args, tmp),
                nprocs=world_size,
                join=True,
                start_method="spawn",
            )
        except Exception as exc:
            # The first traceback written is the cause; the others are ranks that lost their peer.
            errors = sorted(Path(tmp).glob("*.rank*.err"))
            detail = "\n".join(f"{e.stem.split('.')[1]} failed:\n{e.read_text()}" for e in errors) or str(exc)
            raise RuntimeError(
                f"a gloo rank of {world_size} failed ({exc.__class__.__name__}):\n{detail}"
            ) from None
        return pickle.loads(Path(tmp, "result.pkl").read_bytes())
