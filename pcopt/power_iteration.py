"""Streaming power iteration for the top singular value, on plain tensors and on sharded DTensors.

Each iteration is ``v <- normalize(W^T u); u <- normalize(W v)``, warm-started from the stored vectors.
For a DTensor weight sharded over a device mesh, each rank multiplies its local block with the matching
slice of ``u`` / ``v`` and the partial vectors are summed with one all-reduce per half-iteration (the
vectors of all matrices that share a mesh are concatenated into that single all-reduce). Communication per
iteration is therefore O(m + n) per matrix; the weight itself is never gathered.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pcopt._tensor import all_reduce_, shards

__all__ = [
    "normalize",
    "power_iteration_",
    "sigma_estimate",
    "init_singular_vectors",
]

_NORM_EPS = 1e-7


def normalize(x: Tensor) -> Tensor:
    """``x / (||x|| + 1e-7)`` along the last dimension."""
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + _NORM_EPS)


def init_singular_vectors(shape: Sequence[int], seed: int = 0) -> tuple[Tensor, Tensor]:
    """Deterministic random unit vectors ``u (..., m)`` and ``v (..., n)`` for a weight of ``shape``.

    A private generator is used, so the global RNG (and hence model initialisation) is untouched, and every
    rank of a distributed job computes the same vectors.
    """
    *batch, m, n = shape
    g = torch.Generator().manual_seed(seed)
    u = normalize(torch.randn(*batch, m, generator=g, dtype=torch.float32))
    v = normalize(torch.randn(*batch, n, generator=g, dtype=torch.float32))
    return u, v


def sigma_estimate(W: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``u^T W v`` per matrix (shape ``W.shape[:-2]``), differentiable in ``W``."""
    return (u.unsqueeze(-2) @ W @ v.unsqueeze(-1)).squeeze(-1).squeeze(-1)


def _local_view(weight: Tensor) -> tuple[Tensor, tuple, tuple, tuple[int, ...]]:
    """Return (local block, slices into the global tensor, mesh dims that shard it, global shape)."""
    from torch.distributed.tensor import DTensor, Partial

    if not isinstance(weight, DTensor):
        return weight.detach(), tuple(slice(None) for _ in weight.shape), (), tuple(weight.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = weight.placements
    if any(isinstance(p, Partial) for p in placements):
        raise NotImplementedError(
            "pcopt power iteration got a DTensor weight with a Partial placement; expected Shard or Replicate "
            f"placements, got {placements}. Redistribute the weight before refreshing."
        )
    sharded_dims = tuple(i for i, p in enumerate(placements) if shards(p))
    # FSDP over tensor parallel: not one contiguous slice
    if any(shards(p) and not p.is_shard() for p in placements):
        dims = {p.dim for p in placements if shards(p)}
        if len(dims) != 1:
            raise NotImplementedError(
                f"pcopt power iteration got a DTensor weight placed as {placements}: strided shards are supported "
                "when every sharded mesh dim splits the same tensor dim (FSDP on the dim tensor parallelism shards)."
            )
        dim = dims.pop()
        index = [slice(None)] * weight.ndim
        index[dim] = shard_indices(tuple(weight.shape), dim, weight.device_mesh, tuple(placements))
        return weight.to_local().detach(), tuple(index), sharded_dims, tuple(weight.shape)
    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, placements)
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return weight.to_local().detach(), index, sharded_dims, tuple(weight.shape)


@functools.cache
def shard_indices(shape: tuple[int, ...], dim: int, mesh, placements: tuple) -> Tensor:
    """This rank's global indices along ``dim`` of a tensor of ``shape`` placed as ``placements``, every sharded mesh
    dim splitting ``dim`` (``Shard`` or ``_StridedShard``, whose local rows are interleaved, not one slice).

    A CPU tensor, computed once per layout (no communication: ``distribute_tensor`` without a source rank only
    slices).
    """
    from torch.distributed.tensor import distribute_tensor

    view = [1] * len(shape)
    view[dim] = shape[dim]
    ar = torch.arange(shape[dim]).view(view)
    return distribute_tensor(ar, mesh, placements, src_data_rank=None).to_local().reshape(-1).cpu()


def _index_key(index: tuple) -> tuple:
    """A hashable form of a local block's index (slices by bounds, index tensors by identity: they are cached)."""
    return tuple((s.start, s.stop) if isinstance(s, slice) else ("indices", id(s)) for s in index)


def _on(index: tuple, device: torch.device) -> tuple:
    return tuple(s if isinstance(s, slice) else s.to(device) for s in index)


@dataclass
class _Group:
    """Weights of one local shape and placement, stacked: one batched matmul per half-step for all of them."""

    W: Tensor  # (B, ..., m_loc, n_loc) local blocks in the iteration dtype
    U: Tensor  # (B, ..., m)
    V: Tensor  # (B, ..., n)
    index: tuple  # (batch slices..., rows, cols) of the local block in the global tensor: slices or index tensors
    full: bool  # the local block is the whole matrix (no scatter into the full vector)


def _half_step(groups: list[_Group], mesh, mesh_dims, transpose: bool) -> list[Tensor]:
    """``normalize(W^T u)`` (transpose=True) or ``normalize(W v)`` for every group, summing shards."""
    outs = []
    for g in groups:
        rows, cols = g.index[-2], g.index[-1]
        batch = (slice(None), *g.index[:-2])
        if transpose:
            src = g.U if g.full else g.U[(*batch, rows)]
            part = (src.unsqueeze(-2) @ g.W).squeeze(-2)  # (B, ..., n_loc)
            target, at = g.V, cols
        else:
            src = g.V if g.full else g.V[(*batch, cols)]
            part = (g.W @ src.unsqueeze(-1)).squeeze(-1)  # (B, ..., m_loc)
            target, at = g.U, rows
        if g.full:
            outs.append(part)
        else:
            out = torch.zeros_like(target)
            out[(*batch, at)] = part
            outs.append(out)
    if mesh_dims:
        flat = torch.cat([o.reshape(-1) for o in outs])
        all_reduce_(flat, mesh, mesh_dims)
        outs = [chunk.view_as(o) for chunk, o in zip(torch.split(flat, [o.numel() for o in outs]), outs)]
    return [normalize(o) for o in outs]


def invalid(vectors: Tensor) -> Tensor:
    """Per-vector mask (all dims but the last) of vectors that are not finite or have norm <= 0.5."""
    return ~torch.isfinite(vectors).all(dim=-1) | ~(torch.linalg.vector_norm(vectors, dim=-1) > 0.5)


def _heal(g: _Group, U0: Tensor, V0: Tensor) -> Tensor:
    """Restart the vectors of matrices whose u or v is not finite or ~zero; returns the mask. No host sync."""
    bad = invalid(g.U) | invalid(g.V)
    g.U = torch.where(bad.unsqueeze(-1), U0, g.U)
    g.V = torch.where(bad.unsqueeze(-1), V0, g.V)
    return bad


@torch.no_grad()
def power_iteration_(
    weights: Sequence[Tensor],
    us: Sequence[Tensor],
    vs: Sequence[Tensor],
    num_iterations: int,
    *,
    init: tuple[Sequence[Tensor], Sequence[Tensor]] | None = None,
) -> list[Tensor] | None:
    """Run ``num_iterations`` warm-started power iterations in place on ``us`` / ``vs``.

    ``weights`` may be plain tensors or DTensors (any mix of ``Shard`` / ``Replicate`` placements). Weights of
    the same local shape and placement are stacked and iterated with one batched matmul per half-step, so the
    number of kernels grows with the number of distinct shapes, not of weights. Weights on the same mesh with
    the same sharded mesh dims share one all-reduce per half-iteration. All ranks end with identical ``u`` and
    ``v``. The iteration runs in fp32 (fp64 for fp64 weights).

    ``init=(u0s, v0s)``: the health check. Before and after the iteration, the vectors of every matrix whose
    ``u`` or ``v`` is not finite or has norm <= 0.5 restart from ``u0``, ``v0`` (``torch.where``: no host
    synchronisation). Returns then, per weight, how many of its matrices were restarted (a device tensor of
    its batch shape; read it only when a number is wanted: that is a host sync).
    """
    table: dict[tuple, tuple[object, dict[tuple, list[int]]]] = {}
    locals_: list[tuple[Tensor, tuple]] = []
    for i, w in enumerate(weights):
        local, index, mesh_dims, shape = _local_view(w)
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        mesh = w.device_mesh if mesh_dims else None
        key = (mesh, mesh_dims, dtype)  # meshes compare by value: equal meshes share one all-reduce
        full = tuple(local.shape) == tuple(shape)
        # the global shape too: two shards of one local shape may come from matrices of different shapes (an
        # (m, n) sharded on rows and an (n, m) on columns), whose u and v differ in length
        sub = (tuple(local.shape), tuple(shape), _index_key(index), full, local.device)
        table.setdefault(key, (mesh, {}))[1].setdefault(sub, []).append(i)
        locals_.append((local, index))
    counts: list[Tensor | None] = [None] * len(weights)
    for (_, mesh_dims, dtype), (mesh, subs) in table.items():
        groups, members = [], []
        for (_, _, _, full, _), idx in subs.items():
            W = torch.stack([locals_[i][0] for i in idx]).to(dtype)
            U = torch.stack([us[i] for i in idx]).to(dtype)
            V = torch.stack([vs[i] for i in idx]).to(dtype)
            groups.append(_Group(W, U, V, _on(locals_[idx[0]][1], U.device), full))
            members.append(idx)
        starts = None
        if init is not None:
            starts = [
                (
                    torch.stack([init[0][i] for i in idx]).to(dtype),
                    torch.stack([init[1][i] for i in idx]).to(dtype),
                )
                for idx in members
            ]
            bads = [_heal(g, *st) for g, st in zip(groups, starts)]
        for _ in range(num_iterations):
            for g, nv in zip(groups, _half_step(groups, mesh, mesh_dims, transpose=True)):
                g.V = nv
            for g, nu in zip(groups, _half_step(groups, mesh, mesh_dims, transpose=False)):
                g.U = nu
        if init is not None:
            for k, (g, st) in enumerate(zip(groups, starts)):
                bads[k] = bads[k].to(torch.int32) + _heal(g, *st).to(torch.int32)
        for k, (g, idx) in enumerate(zip(groups, members)):
            torch._foreach_copy_([us[i] for i in idx], list(g.U.unbind(0)))
            torch._foreach_copy_([vs[i] for i in idx], list(g.V.unbind(0)))
            if init is not None:
                for i, c in zip(idx, bads[k].unbind(0)):
                    counts[i] = c
    return counts if init is not None else None
