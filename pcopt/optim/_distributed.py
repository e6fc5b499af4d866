"""Newton-Schulz on FSDP2 ``Shard(0)`` DTensors: every matrix orthogonalized once in the world, exactly.

Who sends what to whom (one process group = the mesh dimension that shards dim 0, ``W`` ranks):

1. Every rank computes the same owner table: matrices are sorted by Newton-Schulz FLOPs (largest first) and
   each goes to the rank with the smallest FLOP total so far (longest-processing-time rule; ties to the
   lower rank). Shards follow ``torch.chunk`` (FSDP2's layout): rank ``r`` holds rows
   ``[r * ceil(M / W), (r + 1) * ceil(M / W))`` clipped to ``M``, possibly none.
2. ``all_to_all_single`` #1: every rank sends, to each owner, its row blocks of the matrices that owner owns,
   already cast to the iteration dtype (bf16 by default, half the bytes of fp32; the cast is elementwise,
   so doing it before or after the gather gives the same bits). Uneven splits need no padding.
3. Each owner concatenates the row blocks into full matrices, groups them by shape and runs one batched
   Newton-Schulz per shape.
4. ``all_to_all_single`` #2: each owner sends every rank the rows of the results that rank holds.

Per step each rank sends and receives about ``(W - 1) / W`` of its share of the matrices twice, in the
iteration dtype; no rank computes a matrix twice. Only ``torch.distributed`` collectives on the mesh's
process group are used, so it runs on gloo (CPU) and NCCL alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["ShardLayout", "assign_owners", "orthogonalize_sharded", "row_range", "shard_layout"]


@dataclass(frozen=True)
class ShardLayout:
    """How a 2-D DTensor is split: over ``group`` (mesh dim ``mesh_dim``), this rank's index ``rank``."""

    group: dist.ProcessGroup
    mesh_dim: int
    rank: int
    world_size: int


def row_range(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of a ``Shard(0)`` chunk on ``rank`` (``torch.chunk`` layout, as FSDP2)."""
    chunk = -(-num_rows // world_size)
    start = min(rank * chunk, num_rows)
    return start, min(start + chunk, num_rows)


def shard_layout(param: Tensor) -> ShardLayout | None:
    """Layout of a DTensor parameter: ``None`` when replicated (the local tensor is the full matrix).

    Supported: placements made of ``Replicate`` and at most one ``Shard(0)`` (FSDP2, HSDP). Anything else
    raises ``NotImplementedError`` naming the placements.
    """
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = param.device_mesh, param.placements
    shard_dims = [i for i, pl in enumerate(placements) if not isinstance(pl, Replicate)]
    ok = len(shard_dims) <= 1 and all(
        type(placements[i]) is Shard and placements[i].dim == 0 for i in shard_dims
    )
    if not ok:
        raise NotImplementedError(
            "pcopt Muon supports DTensor parameters sharded on dim 0 over one mesh dimension (FSDP2 / HSDP), "
            f"got placements {placements} for a parameter of shape {tuple(param.shape)}. Use fully_shard "
            "without tensor parallelism on Muon-managed matrices, or pass plain tensors."
        )
    if not shard_dims:
        return None
    d = shard_dims[0]
    layout = ShardLayout(mesh.get_group(d), d, mesh.get_local_rank(d), mesh.size(d))
    assert dist.get_rank(layout.group) == layout.rank, "mesh coordinate and group rank disagree"
    start, end = row_range(param.shape[0], layout.world_size, layout.rank)
    expected = (end - start, param.shape[1])
    local_shape = tuple(param.to_local().shape)
    if local_shape != expected:
        raise NotImplementedError(
            f"pcopt Muon expects torch.chunk-style Shard(0) shards: rank {layout.rank} of {layout.world_size} "
            f"should hold a {expected} block of the {tuple(param.shape)} matrix but holds {local_shape}."
        )
    return layout


def assign_owners(
    shapes: Sequence[tuple[int, int]], world_size: int, cost: Callable[[tuple[int, int]], int]
) -> list[int]:
    """Owner rank of every matrix, balancing ``cost`` (largest first to the least-loaded rank).

    Deterministic: every rank computes the same table from the same ordered list of shapes.
    """
    load = [0] * world_size
    owners = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-cost(shapes[i]), i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += cost(shapes[i])
    return owners


def _cat(chunks: list[Tensor], like: Tensor) -> Tensor:
    return torch.cat(chunks) if chunks else like.new_empty(0)


@torch.no_grad()
def orthogonalize_sharded(
    local_blocks: Sequence[Tensor],
    shapes: Sequence[tuple[int, int]],
    layout: ShardLayout,
    orthogonalize: Callable[[Tensor], Tensor],
    cost: Callable[[tuple[int, int]], int],
) -> list[Tensor]:
    """Orthogonalize full matrices held as ``Shard(0)`` row blocks; return this rank's blocks of the result.

    ``local_blocks[i]`` is this rank's row block of matrix ``i`` (global shape ``shapes[i]``), all in the same
    dtype and on the same device; results come back in that dtype. ``orthogonalize`` maps a ``(b, M, N)``
    batch to its ``(b, M, N)`` orthogonalization. All ranks of ``layout.group`` must call this with the same ``shapes``.
    """
    if not local_blocks:
        return []
    W, me, group = layout.world_size, layout.rank, layout.group
    owners = assign_owners(shapes, W, cost)
    ranges = [[row_range(M, W, r) for r in range(W)] for M, _ in shapes]
    mine = [i for i in range(len(shapes)) if owners[i] == me]
    like = local_blocks[0]

    # 1. row blocks -> owners
    send_chunks: list[list[Tensor]] = [[] for _ in range(W)]
    for i, block in enumerate(local_blocks):
        send_chunks[owners[i]].append(block.reshape(-1))
    in_splits = [sum(c.numel() for c in chunks) for chunks in send_chunks]
    out_splits = [sum((ranges[i][s][1] - ranges[i][s][0]) * shapes[i][1] for i in mine) for s in range(W)]
    send = _cat([c for chunks in send_chunks for c in chunks], like)
    recv = like.new_empty(sum(out_splits))
    dist.all_to_all_single(recv, send, out_splits, in_splits, group=group)

    # 2. assemble full matrices on the owner, batched by shape
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i in mine:
        by_shape.setdefault(tuple(shapes[i]), []).append(i)
    slot = {i: (shape, j) for shape, idx in by_shape.items() for j, i in enumerate(idx)}
    full = {shape: like.new_empty(len(idx), *shape) for shape, idx in by_shape.items()}
    offset = 0
    for s in range(W):
        for i in mine:
            lo, hi = ranges[i][s]
            n = (hi - lo) * shapes[i][1]
            shape, j = slot[i]
            full[shape][j, lo:hi].copy_(recv[offset : offset + n].view(hi - lo, shapes[i][1]))
            offset += n
    del recv, send

    # 3. one batched Newton-Schulz per shape (results come back in the dtype of the blocks)
    result = {shape: orthogonalize(batch).to(like.dtype) for shape, batch in full.items()}
    del full

    # 4. result rows -> the ranks that hold them
    back_chunks: list[list[Tensor]] = [[] for _ in range(W)]
    for d in range(W):
        for i in mine:
            lo, hi = ranges[i][d]
            shape, j = slot[i]
            back_chunks[d].append(result[shape][j, lo:hi].reshape(-1))
    back_in = [sum(c.numel() for c in chunks) for chunks in back_chunks]
    back_out = [sum(b.numel() for i, b in enumerate(local_blocks) if owners[i] == s) for s in range(W)]
    back_send = _cat([c for chunks in back_chunks for c in chunks], like)
    back_recv = like.new_empty(sum(back_out))
    dist.all_to_all_single(back_recv, back_send, back_out, back_in, group=group)

    out: list[Tensor] = [None] * len(local_blocks)  # type: ignore[list-item]
    offset = 0
    for s in range(W):
        for i, block in enumerate(local_blocks):
            if owners[i] == s:
                out[i] = back_recv[offset : offset + block.numel()].view(block.shape)
                offset += block.numel()
    return out
