"""Newton-Schulz on DTensor matrices: every matrix orthogonalized once in the world, exactly.

:func:`map_full_matrices` (what :class:`pcopt.optim.Muon` and ``Spectra`` use): any placement combination of
a 1-D or 2-D (or larger) ``DeviceMesh`` -- ``Shard(0)``, ``Shard(1)``, ``_StridedShard`` (FSDP2 on top of TP
when both shard dim 0), ``Replicate`` -- so FSDP2, HSDP, TP and FSDP x TP. One process group spans all ranks
of the mesh (the default group when the mesh is the whole world, else the mesh flattened: one helper,
``pcopt._tensor.mesh_group``, for the optimizers and the PC layer).

Who sends what to whom in :func:`map_full_matrices` (``P`` ranks in the mesh):

1. Every rank computes the same tables, with no communication. Owners: matrices are sorted by
   Newton-Schulz FLOPs (largest first) and each goes to the rank with the smallest FLOP total so far
   (longest-processing-time rule; ties to the lower rank), over all ``P`` ranks. Blocks: for every rank,
   which global rows and columns its local tensor holds, from the placements' own split rule applied to
   index ranges (``torch.chunk`` for ``Shard``; the chunk-of-chunks of ``_StridedShard``), as row and column
   runs. Sources: the ranks that agree with the owner on every ``Replicate`` mesh dimension; their blocks
   tile the matrix exactly once (for HSDP: the owner's own replica group, so the gather stays inside it).
2. ``all_to_all_single`` #1 over the ``P`` ranks: every source sends each owner its local blocks of the
   matrices that owner owns, already cast to the iteration dtype (the cast is elementwise: same bits as a
   cast after gathering, and bf16 halves the bytes). Uneven and empty blocks need no padding.
3. Each owner writes the blocks into full matrices, groups them by shape and runs one Newton-Schulz call per
   shape on the stacked batch (Muon's ``fn`` then runs it as one batched matmul chain, or matrix by matrix
   on CPUs, where that is faster: same bits).
4. ``all_to_all_single`` #2: each owner sends every rank of the mesh (replicas included) that rank's block
   of each result.

So a step costs two collectives per mesh, whatever the placements. Bytes: #1 moves each matrix about once
(minus what owners already hold); #2 moves it ``R`` times, ``R`` = product of the ``Replicate`` mesh
dimensions (every replica needs the result). No rank computes a matrix twice. Only ``torch.distributed``
collectives are used, so it runs on gloo (CPU) and NCCL alike.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pcopt._tensor import is_dtensor as _is_dtensor
from pcopt._tensor import mesh_group

logger = logging.getLogger(__name__)

__all__ = [
    "assign_owners",
    "map_full_matrices",
    "row_range",
]


def row_range(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of a ``Shard(0)`` chunk on ``rank`` (``torch.chunk`` layout, as FSDP2)."""
    chunk = -(-num_rows // world_size)
    start = min(rank * chunk, num_rows)
    return start, min(start + chunk, num_rows)


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


# --------------------------------------------------------------------------------------------------------------
# Any placement combination: one all_to_all over all ranks of the mesh to the owners, one back.

Runs = tuple[tuple[int, int], ...]
"""Global index runs ``((start, stop), ...)`` of one tensor dim; the local tensor holds them in this order."""


@dataclass(frozen=True)
class _Block:
    """What one rank holds of a matrix: row runs, column runs, and its coordinates on the Replicate dims."""

    rows: Runs
    cols: Runs
    replica: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return sum(b - a for a, b in self.rows), sum(b - a for a, b in self.cols)

    @property
    def numel(self) -> int:
        m, n = self.shape
        return m * n


def _to_runs(indices: list[int]) -> Runs:
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return tuple(runs)


def _check_placements(param: Tensor) -> None:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    for pl in param.placements:
        if not isinstance(pl, (Replicate, Shard, _StridedShard)):
            raise RuntimeError(
                f"Muon's Newton-Schulz needs each rank's block of the matrix, got placements {param.placements} "
                f"for a parameter of shape {tuple(param.shape)}: {pl!r} holds no block (a pending sum?). Expected "
                "Shard(0), Shard(1), _StridedShard or Replicate on every mesh dimension; redistribute the "
                "parameter (and its gradient) to one of those first."
            )


@functools.lru_cache(maxsize=4096)
def _block_table(
    shape: tuple[int, int],
    placements: tuple[Any, ...],
    mesh_shape: tuple[int, ...],
    mesh_ranks: tuple[int, ...],
    group_ranks: tuple[int, ...],
) -> tuple[_Block, ...]:
    """The block of every group rank (index = group rank), from the placements' own split rule.

    DTensor applies placements left to right over the mesh dims, each splitting the current local tensor with
    its ``_split_tensor`` (``torch.chunk`` for ``Shard``; chunks of chunks for ``_StridedShard``). The same
    rule applied to ``arange`` gives the global indices that each rank holds, as torch does itself in
    ``_StridedShard.local_shard_size_and_offset``.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    table = []
    for g in group_ranks:
        pos = mesh_ranks.index(g)
        coord = []
        for size in reversed(mesh_shape):
            coord.append(pos % size)
            pos //= size
        coord.reverse()
        idx = [torch.arange(n) for n in shape]
        replica = []
        for d, pl in enumerate(placements):
            if isinstance(pl, Replicate):
                replica.append(coord[d])
                continue
            dim = pl.dim % 2
            split = (
                _StridedShard(0, split_factor=pl.split_factor) if isinstance(pl, _StridedShard) else Shard(0)
            )
            pieces, _ = split._split_tensor(idx[dim], mesh_shape[d], with_padding=False, contiguous=False)
            idx[dim] = pieces[coord[d]]
        table.append(_Block(_to_runs(idx[0].tolist()), _to_runs(idx[1].tolist()), tuple(replica)))
    return tuple(table)


def local_row_runs(param: Tensor) -> Runs:
    """The global row ranges ``((start, stop), ...)`` that this rank's local tensor of the 2-D ``param`` holds,
    in local order (a plain tensor: all rows)."""
    if not _is_dtensor(param) or param.device_mesh.size() == 1:
        return ((0, param.shape[0]),)
    mesh = param.device_mesh
    ranks = tuple(mesh.mesh.flatten().tolist())
    me = dist.get_rank()
    if me not in ranks:
        return ()
    table = _block_table(tuple(param.shape), tuple(param.placements), tuple(mesh.mesh.shape), ranks, (me,))
    return table[0].rows


def _copy_runs(full: Tensor, local: Tensor, block: _Block, into_full: bool) -> None:
    """``full[rows, cols] <- local`` (``into_full``) or ``local <- full[rows, cols]``, run by run (exact copies)."""
    lr = 0
    for r0, r1 in block.rows:
        lc = 0
        for c0, c1 in block.cols:
            f = full[r0:r1, c0:c1]
            loc = local[lr : lr + r1 - r0, lc : lc + c1 - c0]
            (f if into_full else loc).copy_(loc if into_full else f)
            lc += c1 - c0
        lr += r1 - r0


def _apply_batched(fn: Callable[[Tensor], Tensor], mats: dict[tuple[int, ...], Tensor], like: Tensor):
    return {shape: fn(batch).to(like.dtype) for shape, batch in mats.items()}


@torch.no_grad()
def map_full_matrices(
    params: Sequence[Tensor],
    local_tensors: Sequence[Tensor],
    fn: Callable[[Tensor], Tensor],
    cost: Callable[[tuple[int, int]], int],
) -> list[Tensor]:
    """Apply ``fn`` to every full matrix, once in the world; return this rank's local block of each result.

    Args:
        params: 2-D tensors that give each matrix's global shape and layout: DTensors on any ``DeviceMesh``
            with ``Shard(0)``, ``Shard(1)``, ``_StridedShard`` or ``Replicate`` on each mesh dim (FSDP2, HSDP,
            TP, FSDP x TP), or plain tensors (computed locally).
        local_tensors: this rank's local block of each matrix, laid out as ``params[i].to_local()`` (for a
            plain tensor, the full matrix). The blocks of DTensors that share a set of ranks must share a dtype
            and device: that dtype is what travels (cast before calling, e.g. to bf16, to halve the bytes).
        fn: maps a ``(b, M, N)`` batch to its ``(b, M, N)`` image, independently per matrix (Newton-Schulz).
        cost: the work of one ``(M, N)`` matrix, for balancing owners (e.g. ``newton_schulz_flops``).

    Returns:
        ``fn``'s result blocks, each of ``local_tensors[i]``'s shape and dtype.

    Every rank of a mesh must call this with the same parameters in the same order (a collective). Per set of
    mesh ranks: two ``all_to_all_single`` calls, whatever the placements (see the module docstring); a mesh of
    one rank makes none. Exact: blocks are moved by copies, and each matrix is computed in a ``(b, M, N)``
    batch of same-shaped matrices, so the result equals ``fn`` on the unsharded matrix bit for bit whenever
    ``fn``'s result per matrix does not depend on the batch (true for batched matmuls).
    """
    if len(params) != len(local_tensors):
        raise ValueError(
            f"map_full_matrices expects one local tensor per parameter, got {len(params)} parameters and "
            f"{len(local_tensors)} local tensors."
        )
    out: list[Tensor | None] = [None] * len(params)
    plain: list[int] = []
    buckets: dict[tuple[int, ...], tuple[Any, list[int]]] = {}
    for i, p in enumerate(params):
        if p.ndim != 2:
            raise ValueError(
                f"map_full_matrices expects 2-D matrices, got shape {tuple(p.shape)} for parameter {i}."
            )
        if not _is_dtensor(p) or p.device_mesh.size() == 1:  # the local tensor is the full matrix
            plain.append(i)
            continue
        _check_placements(p)
        mesh = p.device_mesh
        if mesh.get_coordinate() is None:  # this rank holds nothing of it and takes no part
            out[i] = local_tensors[i]
            continue
        buckets.setdefault(tuple(sorted(mesh.mesh.flatten().tolist())), (mesh, []))[1].append(i)

    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i in plain:
        by_shape.setdefault(tuple(local_tensors[i].shape), []).append(i)
    for idx in by_shape.values():
        result = fn(torch.stack([local_tensors[i] for i in idx])).to(local_tensors[idx[0]].dtype)
        for j, i in enumerate(idx):
            out[i] = result[j]

    for mesh, idx in buckets.values():
        results = _exchange(
            [params[i] for i in idx],
            [local_tensors[i] for i in idx],
            mesh_group(mesh, tuple(range(mesh.ndim))),
            fn,
            cost,
        )
        for i, r in zip(idx, results):
            out[i] = r
    return out  # type: ignore[return-value]


def _exchange(
    params: Sequence[Tensor],
    blocks: Sequence[Tensor],
    group: dist.ProcessGroup,
    fn: Callable[[Tensor], Tensor],
    cost: Callable[[tuple[int, int]], int],
) -> list[Tensor]:
    like = blocks[0]
    for b in blocks:
        if b.dtype != like.dtype or b.device != like.device:
            raise ValueError(
                f"map_full_matrices sends the blocks of one mesh in one buffer, so they must share a dtype and "
                f"device: got {like.dtype} on {like.device} and {b.dtype} on {b.device}. Cast them first."
            )
    P, me = dist.get_world_size(group), dist.get_rank(group)
    group_ranks = tuple(dist.get_global_rank(group, k) for k in range(P))
    shapes = [(int(p.shape[0]), int(p.shape[1])) for p in params]
    tables = []
    for p, shape, b in zip(params, shapes, blocks):
        mesh = p.device_mesh
        table = _block_table(shape, tuple(p.placements), tuple(mesh.shape), tuple(mesh.mesh.flatten().tolist()),
                             group_ranks)  # fmt: skip
        if tuple(b.shape) != table[me].shape:
            raise RuntimeError(
                f"map_full_matrices: the {shape} matrix with placements {p.placements} on a {tuple(mesh.shape)} "
                f"mesh should have a local block of shape {table[me].shape} on this rank (as DTensor lays it "
                f"out), got {tuple(b.shape)}. Pass p.to_local() (or a tensor of that layout) for each parameter."
            )
        tables.append(table)

    owners = assign_owners(shapes, P, cost)
    # the ranks whose blocks tile matrix i: those on the owner's coordinates along every Replicate mesh dim
    sources = [{q for q in range(P) if t[q].replica == t[owners[i]].replica} for i, t in enumerate(tables)]
    mine = [i for i in range(len(params)) if owners[i] == me]

    # 1. blocks -> owners
    to_send = [[i for i in range(len(params)) if owners[i] == o and me in sources[i]] for o in range(P)]
    in_splits = [sum(blocks[i].numel() for i in idx) for idx in to_send]
    out_splits = [sum(tables[i][q].numel for i in mine if q in sources[i]) for q in range(P)]
    send = like.new_empty(sum(in_splits))
    offset = 0
    for idx in to_send:
        for i in idx:
            n = blocks[i].numel()
            send[offset : offset + n].view(blocks[i].shape).copy_(blocks[i])
            offset += n
    recv = like.new_empty(sum(out_splits))
    dist.all_to_all_single(recv, send, out_splits, in_splits, group=group)
    del send

    # 2. full matrices on the owner, batched by shape
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i in mine:
        by_shape.setdefault(shapes[i], []).append(i)
    slot = {i: (shape, j) for shape, idx in by_shape.items() for j, i in enumerate(idx)}
    full = {shape: like.new_empty(len(idx), *shape) for shape, idx in by_shape.items()}
    offset = 0
    for q in range(P):
        for i in mine:
            if q in sources[i]:
                block = tables[i][q]
                shape, j = slot[i]
                _copy_runs(full[shape][j], recv[offset : offset + block.numel].view(block.shape), block, True)
                offset += block.numel
    del recv

    # 3. one batched fn per shape
    result = _apply_batched(fn, full, like)
    del full

    # 4. result blocks -> every rank that holds a block (replicas included)
    back_in = [sum(tables[i][q].numel for i in mine) for q in range(P)]
    back_out = [sum(blocks[i].numel() for i in range(len(params)) if owners[i] == o) for o in range(P)]
    back_send = like.new_empty(sum(back_in))
    offset = 0
    for q in range(P):
        for i in mine:
            block = tables[i][q]
            shape, j = slot[i]
            _copy_runs(
                result[shape][j], back_send[offset : offset + block.numel].view(block.shape), block, False
            )
            offset += block.numel
    del result
    back_recv = like.new_empty(sum(back_out))
    dist.all_to_all_single(back_recv, back_send, back_out, back_in, group=group)

    out: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
    offset = 0
    for o in range(P):
        for i in range(len(params)):
            if owners[i] == o:
                n = blocks[i].numel()
                out[i] = back_recv[offset : offset + n].view(blocks[i].shape)
                offset += n
    return out
