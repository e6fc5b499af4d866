"""pcopt Muon on 4 gloo ranks, 1-D and 2-D meshes: equal to unsharded Muon bitwise, NS once per matrix, 2 collectives.

Layouts: 1-D FSDP2 (``fully_shard``), HSDP 2 x 2 (``Replicate``, ``Shard(0)``), FSDP 2 x TP 2 built by
``parallelize_module`` + ``fully_shard`` on a tiny Llama-style block (colwise ``wq``/``w1``/``w3`` become
``(_StridedShard(0), Shard(0))``, rowwise ``wo``/``w2`` become ``(Shard(0), Shard(1))``), and every other
combination of ``Shard(0)``, ``Shard(1)``, ``_StridedShard`` and ``Replicate`` on a 2 x 2 and a 1-D mesh via
``distribute_tensor``. Shapes are uneven (and some blocks empty) on purpose.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests._distributed import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD = 4
# 7 rows on 4 ranks -> 2 2 2 1; 3 rows -> 1 1 1 0 (an empty block); two same-shaped matrices batch together.
SHAPES = [(7, 12), (12, 7), (3, 12), (12, 12), (12, 12), (16, 6), (5, 9)]
KWARGS = {"lr": 0.05, "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw"}  # bf16 NS: torch's path too


class _Matrices(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.mats = nn.ModuleList(nn.Linear(n, m, bias=False) for m, n in shapes)


class _Block(nn.Module):
    """Attention-output and SwiGLU projections with torchtitan's names; even TP splits (as the TP styles need), uneven FSDP splits."""

    def __init__(self, dim: int = 9, heads_dim: int = 6, hidden: int = 14):
        super().__init__()
        self.wq = nn.Linear(dim, heads_dim, bias=False)
        self.wo = nn.Linear(heads_dim, dim, bias=False)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        h = x + self.wo(self.wq(x))
        return h + self.w2(nn.functional.silu(self.w1(h)) * self.w3(h))


class _Counter:
    """Counts the matrices this rank runs Newton-Schulz on (patched into pcopt's Muon module)."""

    def __init__(self):
        import pcopt.optim._muon_step as muon_module

        self.module, self.original, self.count = muon_module, muon_module.newton_schulz, 0

    def __enter__(self):
        def counting(G, *args, **kwargs):
            self.count += G.shape[0] if G.ndim == 3 else 1
            return self.original(G, *args, **kwargs)

        self.module.newton_schulz = counting
        return self

    def __exit__(self, *exc):
        self.module.newton_schulz = self.original


def _step_and_compare(name, params, grads_fn, ref_params, muon_kwargs, steps=2):
    """Step sharded pcopt Muon, unsharded pcopt Muon and torch.optim.Muon on the same full gradients."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    from pcopt.optim import Muon

    torch_params = [nn.Parameter(r.detach().clone()) for r in ref_params]
    opt = Muon(params, **muon_kwargs)
    ref_opt = Muon(ref_params, **muon_kwargs)
    stock = set(muon_kwargs) <= {"lr", "weight_decay", "momentum", "nesterov", "adjust_lr_fn"}
    torch_opt = torch.optim.Muon(torch_params, **muon_kwargs) if stock else None
    per_matrix = muon_kwargs.get("foreach") is False  # the reference loop: one exchange per matrix
    expected = {"c10d.alltoall_base_": 2 * len(params) if per_matrix else 2}
    for step in range(steps):
        full_grads = grads_fn(step)
        for p, g in zip(ref_params + torch_params, full_grads + full_grads):
            p.grad = g.clone()
        with _Counter() as counter, CommDebugMode() as comm:
            opt.step()
        ref_opt.step()
        if torch_opt is not None:
            torch_opt.step()
        counts = {str(op): n for op, n in comm.get_comm_counts().items()}
        assert counts == expected, f"{name}: collectives per step {counts}, expected {expected}"
        total = torch.tensor([counter.count])
        dist.all_reduce(total)
        assert total.item() == len(params), (
            f"{name}: {total.item()} NS runs in the world for {len(params)} matrices"
        )
        if not per_matrix:  # (one matrix per exchange has its owner at rank 0)
            assert counter.count < len(params), f"{name}: one rank orthogonalized every matrix"
    for i, (p, ref, tp) in enumerate(zip(params, ref_params, torch_params)):
        assert isinstance(p, DTensor)
        full = p.full_tensor()
        assert torch.equal(full, ref), (
            f"{name} matrix {i} {p.placements}: max diff {(full - ref).abs().max()}"
        )
        if torch_opt is not None:
            assert torch.equal(full, tp), f"{name} matrix {i}: differs from torch.optim.Muon unsharded"
        buf = opt.state[p]["momentum_buffer"]
        assert buf.placements == p.placements
        assert torch.equal(buf.full_tensor(), ref_opt.state[ref]["momentum_buffer"])


def _random_grads(shapes, seed):
    def grads(step):
        gen = torch.Generator().manual_seed(seed + step)  # same full gradients on every rank
        return [torch.randn(s, generator=gen) for s in shapes]

    return grads


def _distributed_grads(params, full_grads_fn):
    from torch.distributed.tensor import distribute_tensor

    def grads(step):
        full = full_grads_fn(step)
        for p, g in zip(params, full):  # local slicing by the placements' rule, no communication
            p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        return full

    return grads


def _fully_shard_layout(name, mesh):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = _Matrices(SHAPES)
    ref = copy.deepcopy(model)
    for lin in model.mats:
        fully_shard(lin, mesh=mesh)
    params = list(model.parameters())
    _step_and_compare(name, params, _distributed_grads(params, _random_grads(SHAPES, 1)), list(ref.parameters()),
                      KWARGS)  # fmt: skip
    return params


def _placements_layout(name, mesh, placements_list, muon_kwargs=KWARGS):
    from torch.distributed.tensor import distribute_tensor

    gen = torch.Generator().manual_seed(2)
    shapes = [SHAPES[i % len(SHAPES)] for i in range(len(placements_list))]
    fulls = [torch.randn(s, generator=gen) for s in shapes]
    params = [
        nn.Parameter(distribute_tensor(w, mesh, pl, src_data_rank=None))
        for w, pl in zip(fulls, placements_list)
    ]
    ref_params = [nn.Parameter(w.clone()) for w in fulls]
    _step_and_compare(
        name, params, _distributed_grads(params, _random_grads(shapes, 3)), ref_params, muon_kwargs
    )


def _fsdp_tp_model(mesh):
    """Llama's TP plan on the 'tp' mesh dim, then FSDP2 on 'dp'; one real forward/backward for the gradients."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from torch.distributed.tensor.placement_types import _StridedShard

    torch.manual_seed(0)
    model = _Block()
    ref = copy.deepcopy(model)
    plan = {"wq": ColwiseParallel(), "wo": RowwiseParallel(), "w1": ColwiseParallel(), "w3": ColwiseParallel(),
            "w2": RowwiseParallel()}  # fmt: skip
    parallelize_module(model, mesh["tp"], plan)
    fully_shard(model, mesh=mesh["dp"])
    names = ["wq", "wo", "w1", "w3", "w2"]
    params = [getattr(model, n).weight for n in names]
    colwise, rowwise = (_StridedShard(0, split_factor=2), Shard(0)), (Shard(0), Shard(1))
    for n, p in zip(names, params):
        assert tuple(p.placements) == (rowwise if n in ("wo", "w2") else colwise), (n, p.placements)
    for p, r in zip(params, (getattr(ref, n).weight for n in names)):
        assert torch.equal(p.full_tensor(), r)  # the layout is what torch's own gather reassembles

    gen = torch.Generator().manual_seed(4)

    def grads(step):
        model.zero_grad()
        model(torch.randn(3, 9, generator=gen)).square().mean().backward()  # same input on every rank
        return [p.grad.full_tensor() for p in params]

    _step_and_compare("FSDP 2 x TP 2 (parallelize_module + fully_shard)", params, grads,
                      [getattr(ref, n).weight for n in names], KWARGS)  # fmt: skip


def _errors(mesh):
    from torch.distributed.tensor import DTensor, Partial, Shard

    from pcopt.optim import Muon
    from pcopt.optim._distributed import map_full_matrices

    p = nn.Parameter(DTensor.from_local(torch.randn(4, 6), mesh, [Partial(), Shard(0)], run_check=False))
    p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match=r"Partial\(sum\) holds no block.*redistribute"):
        Muon([p]).step()
    q = DTensor.from_local(torch.randn(4, 6), mesh, [Shard(0), Shard(1)], run_check=False)  # global (8, 12)
    with pytest.raises(RuntimeError, match=r"should have a local block of shape \(4, 6\).*got \(3, 6\)"):
        map_full_matrices([q], [torch.randn(3, 6)], lambda x: x, lambda s: 1)
    with pytest.raises(ValueError, match="one local tensor per parameter, got 1 parameters and 0"):
        map_full_matrices([q], [], lambda x: x, lambda s: 1)


def _all_layouts(rank: int, world_size: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh_1d = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
    mesh_2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))

    _fully_shard_layout("1-D FSDP2, 4 ranks", mesh_1d)
    hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    params = _fully_shard_layout("HSDP 2 x 2", hsdp)
    assert all(tuple(p.placements) == (Replicate(), Shard(0)) for p in params)
    _fsdp_tp_model(mesh_2d)

    S0, S1, R, SS = Shard(0), Shard(1), Replicate(), _StridedShard(0, split_factor=2)
    _placements_layout("2 x 2 mesh, every combination", mesh_2d,
                       [(S0, S1), (SS, S0), (S1, S0), (S0, S0), (S1, S1), (R, S1), (S1, R), (R, R), (S0, R)])  # fmt: skip
    _placements_layout("1-D mesh: TP Shard(1), Replicate", mesh_1d, [(S1,), (S1,), (R,), (S0,)])
    _placements_layout("2 x 2 mesh, fp32 per-matrix", mesh_2d, [(SS, S0), (S0, S1), (R, S1)],
                       {"lr": 0.02, "ns_dtype": torch.float32, "ns_coefficient_set": "polar_express", "foreach": False})  # fmt: skip
    _errors(mesh_2d)
    dist.barrier()  # leave together: no rank tears gloo down while another is still sending


def test_muon_equals_unsharded_on_1d_and_2d_meshes():
    run_distributed(_all_layouts, world_size=WORLD)
