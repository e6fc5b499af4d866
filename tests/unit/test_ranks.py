"""The gloo launcher of the tests and benchmarks (``benchmarks._ranks``)."""

from __future__ import annotations

import pytest

from benchmarks._ranks import run_on_ranks


def _large_result(rank: int, world_size: int, n: int) -> dict:
    import torch.distributed as dist

    return {"rank": rank, "world": dist.get_world_size(), "values": list(range(n))}


def _rank1_fails(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("rank 1 saw a bad shard")
    dist.barrier()  # rank 0 waits for a peer that is gone: its error is a consequence, not the cause


def test_returns_rank0_result_larger_than_a_pipe_buffer():
    # 200k ints pickle to ~1 MB, far over a 64 KiB pipe buffer: a pipe-based return would deadlock here.
    res = run_on_ranks(_large_result, 200_000, world_size=2)
    assert res["rank"] == 0 and res["world"] == 2 and res["values"][-1] == 199_999


def test_failure_names_the_failing_rank_first():
    with pytest.raises(
        RuntimeError,
        match=r"a gloo rank of 2 failed \(\w+\):\nrank1 failed:\n(?s:.*)ValueError: rank 1 saw a bad shard",
    ):
        run_on_ranks(_rank1_fails, world_size=2)
