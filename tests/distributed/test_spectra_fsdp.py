"""Spectra on FSDP2 shards (2 gloo ranks): each matrix clipped once in the world, equal to unsharded bitwise."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests._distributed import run_distributed

pytestmark = pytest.mark.distributed

# uneven (7 -> 4 + 3, 5 -> 3 + 2) and empty (1 -> 1 + 0) shards, tall and wide, two same-shaped matrices
SHAPES = [(7, 12), (12, 7), (5, 12), (12, 12), (12, 12), (1, 12), (16, 6)]

CONFIGS = [
    ("adamw", {"c": 1.0, "apply_to": "2d"}, 3),
    ("muon", {"c": 0.5, "apply_to": "2d"}, 2),
    (
        "adamw",
        {"c": 2.0, "apply_to": "all", "pre_clip": 0.5},
        2,
    ),  # + biases: the vector rule on sharded vectors
]


class _Matrices(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.mats = nn.ModuleList(nn.Linear(n, m, bias=bias) for m, n in SHAPES)


def _rows(n: int, world_size: int, rank: int) -> slice:
    chunk = -(-n // world_size)
    start = min(rank * chunk, n)
    return slice(start, min(start + chunk, n))


def _base(kind: str, params):
    from torch.optim import AdamW

    from pcopt.optim import Muon

    if kind == "muon":
        return Muon(params, lr=0.02, weight_decay=0.1, ns_dtype=torch.float32)
    return AdamW(params, lr=1e-2, weight_decay=0.1)


def _run(rank: int, world_size: int) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import pcopt.optim._spectra_clip as spectra_module
    from pcopt.optim import Spectra

    calls: list[int] = []
    original = spectra_module.spectral_clip

    def counting(X, c, **kw):
        if X.ndim >= 2:
            calls.append(X.shape[0] if X.ndim == 3 else 1)
        return original(X, c, **kw)

    spectra_module.spectral_clip = counting
    try:
        for kind, kwargs, steps in CONFIGS:
            bias = kwargs.get("apply_to") == "all"
            torch.manual_seed(0)
            ref_model = _Matrices(bias)
            model = copy.deepcopy(ref_model)
            for lin in model.mats:
                fully_shard(lin)
            fully_shard(model)
            params = list(model.parameters())
            assert all(isinstance(p, DTensor) for p in params)
            opt = Spectra(_base(kind, params), **kwargs, dtype=torch.float32)
            ref_opt = Spectra(_base(kind, list(ref_model.parameters())), **kwargs, dtype=torch.float32)
            gen = torch.Generator().manual_seed(1234)  # the same full gradients on every rank
            for _ in range(steps):
                grads = [torch.randn(p.shape, generator=gen) for p in ref_model.parameters()]
                for p, g in zip(params, grads):
                    p.grad = DTensor.from_local(g[_rows(g.shape[0], world_size, rank)].clone(), p.device_mesh,
                                                p.placements, shape=g.shape, stride=g.stride())  # fmt: skip
                for p, g in zip(ref_model.parameters(), grads):
                    p.grad = g.clone()
                calls.clear()
                opt.step()
                mine = torch.tensor([sum(calls)])
                dist.all_reduce(mine)
                clips_per_step = (1 + ("pre_clip" in kwargs)) * len(
                    SHAPES
                )  # post-clip (+ pre-clip) per matrix
                assert mine.item() == clips_per_step, (kind, kwargs, mine.item())
                calls.clear()
                ref_opt.step()
                assert sum(calls) == clips_per_step
                opt.zero_grad()
                ref_opt.zero_grad()
            for i, (p, ref) in enumerate(zip(params, ref_model.parameters())):
                full = p.full_tensor()
                assert torch.equal(full, ref), (
                    kind,
                    kwargs,
                    i,
                    tuple(ref.shape),
                    (full - ref).abs().max().item(),
                )
            moved = [
                not torch.equal(p, q) for p, q in zip(ref_model.parameters(), _Matrices(bias).parameters())
            ]
            assert all(moved)
    finally:
        spectra_module.spectral_clip = original


def test_spectra_fsdp2_equals_unsharded_and_clips_once():
    run_distributed(_run, world_size=2)


def _run_2d(rank: int, world_size: int) -> None:
    """Spectra (auto steps) over Muon on a 2 x 2 mesh, on the placements FSDP x TP produces and more."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    import pcopt.optim._spectra_clip as spectra_module
    from pcopt.optim import Spectra

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    S0, S1, SS = Shard(0), Shard(1), _StridedShard(0, split_factor=2)
    # No Replicate: a replicated dim counts its block twice in the ||X||_F bound (documented), which may choose
    # more steps than the unsharded run. Uneven and empty blocks (SHAPES) on purpose.
    placements = [(S0, S1), (SS, S0), (S1, S0), (S0, S0), (S1, S1), (S0, S1), (SS, S0)]
    gen = torch.Generator().manual_seed(7)
    fulls = [torch.randn(SHAPES[i], generator=gen) for i in range(len(placements))]
    params = [
        nn.Parameter(distribute_tensor(w, mesh, pl, src_data_rank=None)) for w, pl in zip(fulls, placements)
    ]
    refs = [nn.Parameter(w.clone()) for w in fulls]
    opt, ref_opt = (
        Spectra(_base("muon", ps), c=0.5, apply_to="2d", dtype=torch.float32) for ps in (params, refs)
    )
    reduces: list[int] = []
    original = spectra_module.all_reduce_

    def counting(flat, mesh_, dims):
        reduces.append(len(dims))
        return original(flat, mesh_, dims)

    spectra_module.all_reduce_ = counting
    try:
        for _ in range(2):
            grads = [torch.randn(w.shape, generator=gen) for w in fulls]
            for p, g, pl in zip(params, grads, placements):
                p.grad = distribute_tensor(g, mesh, pl, src_data_rank=None)
            for p, g in zip(refs, grads):
                p.grad = g.clone()
            reduces.clear()
            opt.step()
            assert reduces == [2], reduces  # the step count: one all-reduce for the whole 2-D mesh
            ref_opt.step()
    finally:
        spectra_module.all_reduce_ = original
    for i, (p, ref) in enumerate(zip(params, refs)):
        full = p.full_tensor()
        assert torch.equal(full, ref), (i, placements[i], (full - ref).abs().max().item())
    dist.barrier()


@pytest.mark.slow
def test_spectra_on_2d_meshes_equals_unsharded_with_one_all_reduce_for_the_steps():
    run_distributed(_run_2d, world_size=4)
