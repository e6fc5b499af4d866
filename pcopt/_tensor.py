"""Internal tensor helpers shared by pcopt's modules, one per concept: DTensor and FSDP2 detection, local and full
views, a DTensor laid out like another, the matrices of an interleaved weight, and sums over the dims of a DeviceMesh."""

from __future__ import annotations

import functools

import torch.distributed as dist
from torch import Tensor, nn


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 / TP shards)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: Tensor) -> Tensor:
    """The full tensor behind ``t``: all-gathers a DTensor (every rank must call it), else ``t`` itself."""
    return t.full_tensor() if is_dtensor(t) else t


def like(p: Tensor, local: Tensor) -> Tensor:
    """The tensor laid out as ``p`` whose block on this rank is ``local``: a DTensor on ``p``'s mesh and placements
    (no communication), or ``local`` itself when ``p`` is plain."""
    if not is_dtensor(p):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


def local_tensor(t: Tensor) -> Tensor:
    """This rank's local shard of a DTensor (an alias: in-place ops update the DTensor), else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def split_rows(t: Tensor, k: int) -> Tensor:
    """The matrices whose rows ``t`` ``(..., rows, cols)`` interleaves, as the view ``(..., k, rows / k, cols)``:
    index ``j`` of dim -3 is the matrix of rows ``j::k`` (gpt_oss's fused gate/up expert stack: ``k = 2``). ``t``
    itself for ``k = 1``. A view (no copy) of a plain tensor and of a DTensor sharded on its stack dims only."""
    if k == 1:
        return t
    return t.unflatten(-2, (t.shape[-2] // k, k)).movedim(-2, -3)


def join_rows(m: Tensor, k: int) -> Tensor:
    """The inverse of :func:`split_rows`: ``(..., k, rows, cols)`` back to ``(..., k * rows, cols)`` (one copy)."""
    if k == 1:
        return m
    return m.movedim(-3, -2).flatten(-3, -2)


def is_fsdp_module(module: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was applied to ``module``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(module, FSDPModule)


def shards(placement) -> bool:
    """Whether a DTensor placement splits a tensor dim: ``Shard``, or the ``_StridedShard`` FSDP2 uses on a dim that
    tensor parallelism already shards (which is not a ``Shard`` subclass and answers ``is_shard()`` with False)."""
    return placement.is_shard() or type(placement).__name__ == "_StridedShard"


def _ranks_over(mesh, mesh_dims: tuple[int, ...]) -> list[int]:
    """The global ranks of this rank's group over ``mesh_dims`` of ``mesh`` (the other dims at this rank's coordinate)."""
    coord = mesh.get_coordinate()
    if coord is None:
        raise RuntimeError(
            f"pcopt: this rank ({dist.get_rank()}) is not in the DeviceMesh {mesh}; cannot sum over it."
        )
    index = tuple(slice(None) if d in mesh_dims else c for d, c in enumerate(coord))
    return sorted(mesh.mesh[index].reshape(-1).tolist())


@functools.cache
def mesh_group(mesh, mesh_dims: tuple[int, ...]):
    """One process group over ``mesh_dims`` of ``mesh`` (this rank's slice), created once per (mesh, dims).

    One dim: the mesh's own group. Several: the group torch's ``DeviceMesh._flatten`` gives those dims (reused when
    the mesh's root already holds a flattened dim over the same ranks, as torchtitan's ``dp_shard_cp`` and the like
    are), else, for a mesh without dim names, ``dist.new_group`` over the same ranks. Creating a group is a
    collective of its ranks: every rank reaches this in the same order, since every rank holds the same slots.
    """
    if len(mesh_dims) == 1:
        return mesh.get_group(mesh_dims[0])
    if len(set(mesh_dims)) != len(mesh_dims) or not all(0 <= d < mesh.ndim for d in mesh_dims):
        raise ValueError(f"pcopt: mesh dims {mesh_dims} are not distinct dims of a {mesh.ndim}-D DeviceMesh")
    ranks = _ranks_over(mesh, mesh_dims)
    if ranks == list(range(dist.get_world_size())):
        return dist.group.WORLD
    root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh
    for flat in dict(getattr(root, "_flatten_mapping", None) or {}).values():
        if sorted(flat.mesh.reshape(-1).tolist()) == ranks:
            return flat.get_group()
    names = mesh.mesh_dim_names
    if names:
        sub = tuple(names[d] for d in mesh_dims)
        sub_mesh = mesh[sub] if sub != tuple(names) else mesh
        return sub_mesh._flatten("pcopt_" + "_".join(sub)).get_group()
    # no dim names (DeviceMesh can slice and flatten only named meshes): a group of the same ranks, created by them
    return dist.new_group(ranks, use_local_synchronization=True)


def all_reduce_(flat: Tensor, mesh, mesh_dims: tuple[int, ...]) -> None:
    """Sum ``flat`` in place over the given dims of ``mesh`` (nothing when ``mesh_dims`` is empty).

    One all-reduce over the group of all those dims (:func:`mesh_group`), whatever their number: on FSDP x TP a
    matrix sharded by both mesh dims is summed over all four ranks at once, not dim by dim. gloo cannot reduce
    accelerator tensors, so there the sum goes through a host copy.
    """
    if not mesh_dims:
        return
    group = mesh_group(mesh, tuple(mesh_dims))
    if flat.device.type == "cpu" or dist.get_backend(group) != "gloo":
        dist.all_reduce(flat, group=group)
    else:  # gloo on an accelerator tensor: reduce on the host
        host = flat.cpu()
        dist.all_reduce(host, group=group)
        flat.copy_(host)
