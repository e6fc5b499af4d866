"""pcopt Muon on FSDP2 shards (2 gloo ranks) equals unsharded Muon bitwise; PC state is refreshed after steps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests._distributed import run_distributed

pytestmark = pytest.mark.distributed

# Uneven and degenerate shards on 2 ranks: 7 rows -> 4 + 3, 5 -> 3 + 2, 1 -> 1 + 0 (an empty shard),
# tall and wide matrices, two same-shaped matrices (batched together on their owner).
SHAPES = [(7, 12), (12, 7), (5, 12), (12, 12), (12, 12), (1, 12), (16, 6)]


class _Matrices(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.mats = nn.ModuleList(nn.Linear(n, m, bias=False) for m, n in shapes)


def _fsdp_exactness(rank: int, world_size: int, muon_kwargs: dict, steps: int) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from pcopt.optim import Muon

    torch.manual_seed(0)
    ref_model = _Matrices(SHAPES)
    torch_model = copy.deepcopy(ref_model)
    model = copy.deepcopy(ref_model)
    for lin in model.mats:
        fully_shard(lin)
    fully_shard(model)
    params = list(model.parameters())
    assert all(isinstance(p, DTensor) for p in params)

    opt = Muon(params, **muon_kwargs)
    ref_opt = Muon(ref_model.parameters(), **muon_kwargs)
    torch_opt = None
    if set(muon_kwargs) <= {"lr", "weight_decay", "momentum", "nesterov", "adjust_lr_fn"}:
        torch_opt = torch.optim.Muon(torch_model.parameters(), **muon_kwargs)

    gen = torch.Generator().manual_seed(1234)  # same full gradients on every rank
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        for p, g in zip(params, grads):
            p.grad = DTensor.from_local(
                g[slice(*_rows(g.shape[0], world_size, rank))].clone(), p.device_mesh, p.placements,
                shape=g.shape, stride=g.stride(),
            )  # fmt: skip
        for p, g in zip(ref_model.parameters(), grads):
            p.grad = g.clone()
        for p, g in zip(torch_model.parameters(), grads):
            p.grad = g.clone()
        opt.step()
        ref_opt.step()
        if torch_opt is not None:
            torch_opt.step()

    for i, (p, ref) in enumerate(zip(params, ref_model.parameters())):
        full = p.full_tensor()
        assert torch.equal(full, ref), f"matrix {i} {SHAPES[i]}: max diff {(full - ref).abs().max().item()}"
        buf = opt.state[p]["momentum_buffer"]
        assert isinstance(buf, DTensor)
        assert torch.equal(buf.full_tensor(), ref_opt.state[ref]["momentum_buffer"])
    if torch_opt is not None:
        for p, ref in zip(params, torch_model.parameters()):
            assert torch.equal(p.full_tensor(), ref)


def _rows(n: int, world_size: int, rank: int) -> tuple[int, int]:
    chunk = -(-n // world_size)
    start = min(rank * chunk, n)
    return start, min(start + chunk, n)


# One spawn for all settings (spawning ranks dominates the run time).
EXACTNESS_SETTINGS = [
    {"lr": 0.05, "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw"},
    {"lr": 0.02, "weight_decay": 0.0, "nesterov": False, "adjust_lr_fn": "original"},
    {"lr": 0.02, "ns_dtype": torch.float32, "ns_coefficient_set": "polar_express", "foreach": False},
    {
        "lr": 0.02,
        "ns_dtype": "fp32",
        "ns_coefficient_set": [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)],
        "ns_steps": 3,
    },
]


def _each_matrix_once(rank: int, world_size: int) -> None:
    """Every matrix is orthogonalized by exactly one rank, and the work is split (not all on one rank)."""
    import torch.distributed as dist

    import pcopt.optim._muon_step as muon_module

    counted = torch.zeros(1, dtype=torch.int64)
    original = muon_module.newton_schulz

    def counting(G, *args, **kwargs):
        counted.add_(G.shape[0] if G.ndim == 3 else 1)
        return original(G, *args, **kwargs)

    muon_module.newton_schulz = counting
    try:
        _fsdp_exactness(rank, world_size, EXACTNESS_SETTINGS[0], 1)
    finally:
        muon_module.newton_schulz = original
    mine = counted.clone()
    dist.all_reduce(counted)
    # the sharded optimizer and the unsharded reference (len(SHAPES) on every rank) both ran one step
    assert counted.item() == len(SHAPES) + world_size * len(SHAPES), counted.item()
    assert 0 < mine.item() - len(SHAPES) < len(SHAPES), mine.item()


def _all_settings(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    _each_matrix_once(rank, world_size)
    for kwargs in EXACTNESS_SETTINGS:
        try:
            _fsdp_exactness(rank, world_size, kwargs, 3)
        except AssertionError as exc:
            raise AssertionError(f"{kwargs}: {exc}") from exc
    dist.barrier()  # leave together: no rank tears gloo down while the other is still sending


def test_fsdp2_muon_equals_unsharded_bitwise():
    """bf16 (torch's path: also equal to torch.optim.Muon unsharded) and fp32, batched and per-matrix."""
    run_distributed(_all_settings)


def _pc_refresh_after_fully_shard(rank: int, world_size: int) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import pcopt
    from pcopt import build_optimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24, bias=False), nn.GELU(), nn.Linear(24, 10, bias=False))
    model.add_module("out", nn.Linear(10, 3))
    pcopt.precondition(model[0], degree=5)
    pcopt.precondition(model[2], degree=5)
    pcs = [model[0].parametrizations.weight[0], model[2].parametrizations.weight[0]]
    with torch.no_grad():  # stale state: deterministic start vectors, not power-iterated
        for pc in pcs:
            pc.reset_state()
    u_start = [pc.u.clone() for pc in pcs]
    for m in (model[0], model[2], model.out):
        fully_shard(m)
    fully_shard(model)
    opt = build_optimizer(model, lr=0.02)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(3):
        x = torch.randn(8, 16, generator=gen)
        model.out(model[2](model[1](model[0](x)))).square().mean().backward()
        opt.step()
        opt.zero_grad()
    for pc, u0 in zip(pcs, u_start):
        W = pc.raw_weight.full_tensor().double()
        sigma = pc.u.double() @ W @ pc.v.double()
        exact = torch.linalg.matrix_norm(W, 2)
        assert not torch.equal(pc.u, u0)
        assert abs(sigma - exact) / exact < 1e-4, (sigma.item(), exact.item())
        gathered = [torch.empty_like(pc.u) for _ in range(world_size)]
        dist.all_gather(gathered, pc.u)
        assert all(torch.equal(g, gathered[0]) for g in gathered), "ranks disagree on u"
    dist.barrier()  # leave together: no rank tears gloo down while the other is still sending


def test_pc_state_refreshed_after_fully_shard():
    run_distributed(_pc_refresh_after_fully_shard)


# A fused QKV weight with GQA-sized K/V blocks interleaved per KV group (torchtitan's FusedQKVLinear layout):
# 2 groups of (q 8 rows, k 4, v 4) = 32 rows, and a row count (32) that 2 ranks split at a block boundary
# (16 | 16) as well as a Shard(1) layout that keeps every row on each rank, and a 3-way uneven split (Shard(0)
# over 2 ranks cuts the 20-row block at row 10) to check that rows keep their block's lr across a shard edge.
FUSED = [((32, 12), (8, 4, 4, 8, 4, 4)), ((30, 12), (20, 6, 4))]


def _split_sizes_sharded(rank: int, world_size: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from pcopt.optim import Muon

    mesh = init_device_mesh("cpu", (world_size,))
    for placement in (Shard(0), Shard(1)):
        for (shape, split), adjust in zip(FUSED, ("match_rms_adamw", "original")):
            kwargs = {"lr": 0.05, "weight_decay": 0.1, "adjust_lr_fn": adjust, "ns_dtype": torch.float32}
            torch.manual_seed(0)
            ref = nn.Parameter(torch.randn(shape))
            sharded = nn.Parameter(distribute_tensor(ref.detach().clone(), mesh, [placement]))
            opt = Muon([{"params": [sharded], "split_sizes": split}], **kwargs)
            ref_opt = Muon([{"params": [ref], "split_sizes": split}], **kwargs)
            gen = torch.Generator().manual_seed(7)
            for _ in range(3):
                g = torch.randn(shape, generator=gen)
                ref.grad = g.clone()
                sharded.grad = distribute_tensor(g.clone(), mesh, [placement])
                opt.step()
                ref_opt.step()
            assert isinstance(sharded, DTensor)
            # Same ops per element on both sides: the owner's Newton-Schulz of each block (fp32, same-shaped
            # blocks stacked as unsharded) and one row-view add_ per block with the block's lr.
            full = sharded.full_tensor()
            diff = (full - ref).abs().max().item()
            assert torch.equal(full, ref), f"{placement} {shape} split {split}: max diff {diff}"
    dist.barrier()


def test_split_sizes_on_dtensors_equals_unsharded():
    """Muon(split_sizes) on Shard(0) and Shard(1) DTensors equals the unsharded split step bit for bit."""
    run_distributed(_split_sizes_sharded)


def _expert_stacks_sharded(rank: int, world_size: int) -> None:
    """MoE expert stacks (E, m, n) on Shard(0) over the expert dim: each rank's experts are whole matrices, so it
    orthogonalizes them locally (no collective) and the step equals the unsharded per-expert step."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from pcopt.optim import Muon

    mesh = init_device_mesh("cpu", (world_size,))
    for placement in (Shard(0), Replicate()):
        torch.manual_seed(0)
        shapes = [(4, 12, 8), (4, 8, 12), (6, 5, 7)]  # 6 experts -> 3 + 3; tall, wide, odd shapes
        refs = [nn.Parameter(torch.randn(s)) for s in shapes]
        sharded = [nn.Parameter(distribute_tensor(r.detach().clone(), mesh, [placement])) for r in refs]
        kwargs = {
            "lr": 0.05,
            "weight_decay": 0.1,
            "adjust_lr_fn": "match_rms_adamw",
            "ns_dtype": torch.float32,
        }
        opt = Muon([{"params": sharded, "batched_weights": True}], **kwargs)
        ref_opt = Muon([{"params": refs, "batched_weights": True}], **kwargs)
        gen = torch.Generator().manual_seed(3)
        sent = []
        original = dist.all_to_all_single

        def counting(*a, _sent=sent, _original=original, **k):
            _sent.append(1)
            return _original(*a, **k)

        dist.all_to_all_single = counting
        try:
            for _ in range(3):
                for r, p in zip(refs, sharded):
                    g = torch.randn(r.shape, generator=gen)
                    r.grad = g.clone()
                    p.grad = distribute_tensor(g.clone(), mesh, [placement])
                opt.step()
                ref_opt.step()
        finally:
            dist.all_to_all_single = original
        assert not sent, f"{placement}: expert stacks whole on each rank need no all-to-all"
        for r, p in zip(refs, sharded):
            # fp32 Newton-Schulz per expert, stacked by local shape: the same per-matrix ops as unsharded
            assert torch.equal(p.full_tensor(), r), (
                placement,
                tuple(r.shape),
                (p.full_tensor() - r).abs().max(),
            )
    # a stack split inside its matrices is refused with what to do
    bad = nn.Parameter(distribute_tensor(torch.randn(4, 12, 8), mesh, [Shard(1)]))
    try:
        Muon([{"params": [bad], "batched_weights": True}])
    except ValueError as e:
        assert "which splits its matrices. Shard such weights on dim 0" in str(e), e
    else:
        raise AssertionError("Shard(1) expert stack was accepted")
    dist.barrier()


def test_expert_stacks_sharded_on_the_expert_dim_equal_unsharded():
    run_distributed(_expert_stacks_sharded)
