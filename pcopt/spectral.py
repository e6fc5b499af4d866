"""Streaming power iteration for the top singular value, on plain tensors and on sharded DTensors.

Each iteration is ``v <- normalize(W^T u); u <- normalize(W v)``, warm-started from the stored vectors.
For a DTensor weight sharded over a device mesh, each rank multiplies its local block with the matching
slice of ``u`` / ``v`` and the partial vectors are summed with one all-reduce per half-iteration (the
vectors of all matrices that share a mesh are concatenated into that single all-reduce). Communication per
iteration is therefore O(m + n) per matrix; the weight itself is never gathered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_", "normalize", "power_iteration_", "sigma_estimate", "init_singular_vectors"]

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


@dataclass
class _Item:
    """One weight in a power-iteration batch: its local block and where it sits in the global matrix."""

    local: Tensor  # local block in the iteration dtype, (..., m_loc, n_loc)
    u: Tensor  # working copy of u (..., m)
    v: Tensor  # working copy of v (..., n)
    index: tuple  # (batch slices..., row slice, col slice) of the local block in the global tensor


def _local_view(weight: Tensor) -> tuple[Tensor, tuple, tuple, tuple[int, ...]]:
    """Return (local block, slices into the global tensor, mesh dims that shard it, global shape)."""
    from torch.distributed.tensor import DTensor, Partial, Shard

    if not isinstance(weight, DTensor):
        return weight.detach(), tuple(slice(None) for _ in weight.shape), (), tuple(weight.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = weight.placements
    if any(isinstance(p, Partial) for p in placements):
        raise NotImplementedError(
            "pcopt power iteration got a DTensor weight with a Partial placement; expected Shard or Replicate "
            f"placements, got {placements}. Redistribute the weight before refreshing."
        )
    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, placements)
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    sharded_dims = tuple(i for i, p in enumerate(placements) if isinstance(p, Shard))
    return weight.to_local().detach(), index, sharded_dims, tuple(weight.shape)


def all_reduce_(flat: Tensor, mesh, mesh_dims: tuple[int, ...]) -> None:
    """Sum ``flat`` in place over the given dims of ``mesh`` (nothing when ``mesh_dims`` is empty).

    gloo cannot reduce accelerator tensors, so there the sum goes through a host copy.
    """
    for d in mesh_dims:
        group = mesh.get_group(d)
        if flat.device.type == "cpu" or dist.get_backend(group) != "gloo":
            dist.all_reduce(flat, group=group)
        else:  # gloo on an accelerator tensor: reduce on the host
            host = flat.cpu()
            dist.all_reduce(host, group=group)
            flat.copy_(host)


def _half_step(items: list[_Item], mesh, mesh_dims, transpose: bool) -> list[Tensor]:
    """Compute normalize(W^T u) (transpose=True) or normalize(W v) for every item, summing shards."""
    outs = []
    for it in items:
        rows, cols = it.index[-2], it.index[-1]
        batch = it.index[:-2]
        if transpose:
            src = it.u[(*batch, rows)]
            part = (src.unsqueeze(-2) @ it.local).squeeze(-2)  # (..., n_loc)
            full = torch.zeros_like(it.v)
            full[(*batch, cols)] = part
        else:
            src = it.v[(*batch, cols)]
            part = (it.local @ src.unsqueeze(-1)).squeeze(-1)  # (..., m_loc)
            full = torch.zeros_like(it.u)
            full[(*batch, rows)] = part
        outs.append(full)
    if mesh_dims:
        flat = torch.cat([o.reshape(-1) for o in outs])
        all_reduce_(flat, mesh, mesh_dims)
        outs = [chunk.view_as(o) for chunk, o in zip(torch.split(flat, [o.numel() for o in outs]), outs)]
    return [normalize(o) for o in outs]


@torch.no_grad()
def power_iteration_(
    weights: Sequence[Tensor], us: Sequence[Tensor], vs: Sequence[Tensor], num_iterations: int
) -> None:
    """Run ``num_iterations`` warm-started power iterations in place on ``us`` / ``vs``.

    ``weights`` may be plain tensors or DTensors (any mix of ``Shard`` / ``Replicate`` placements). Weights
    on the same mesh with the same sharded mesh dims share one all-reduce per half-iteration. All ranks end
    with identical ``u`` and ``v``. The iteration runs in fp32 (fp64 for fp64 weights).
    """
    groups: dict[tuple, tuple[object, list[_Item], list[tuple[Tensor, Tensor]]]] = {}
    for w, u, v in zip(weights, us, vs):
        local, index, mesh_dims, _ = _local_view(w)
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        mesh = w.device_mesh if mesh_dims else None
        key = (mesh, mesh_dims, dtype)  # meshes compare by value: equal meshes share one all-reduce
        entry = groups.setdefault(key, (mesh, [], []))
        entry[1].append(_Item(local.to(dtype), u.to(dtype), v.to(dtype), index))
        entry[2].append((u, v))
    for (_, mesh_dims, _), (mesh, items, buffers) in groups.items():
        for _ in range(num_iterations):
            for it, nv in zip(items, _half_step(items, mesh, mesh_dims, transpose=True)):
                it.v = nv
            for it, nu in zip(items, _half_step(items, mesh, mesh_dims, transpose=False)):
                it.u = nu
        for it, (u, v) in zip(items, buffers):
            u.copy_(it.u)
            v.copy_(it.v)
