"""PC once per step on MoE expert stacks ``(E, out, in)`` (2 gloo ranks) against the unsharded per-forward model.

Three layouts of the stacks: FSDP2 on the expert dim (``Shard(0)``, FSDP2's default: each rank holds whole
experts), expert parallelism (the stack a ``Shard(0)`` DTensor on an EP mesh, each rank running its own experts
and summing their outputs, as an EP dispatcher's combine does), and FSDP2 on a matrix dim (``Shard(1)``: the
2-D case per expert, a small-side Gram summed over the ranks).

Each also with gpt_oss's fused first stack ``(E, 2F, D)``, whose rows alternate gate and up (``row_interleave=2``:
state per expert and per gate/up matrix); on a matrix dim it is sharded on its columns (``Shard(2)``), as
sharding its interleaved rows is refused.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import pcopt
from tests._distributed import run_distributed

pytestmark = pytest.mark.distributed

DIM, HIDDEN, EXPERTS = 32, 48, 4


class _Experts(nn.Module):
    """A dense mixture ``y = sum_e g_e(x) W2[e] silu(W1[e] x)``, the stacks named as torchtitan's; ``fused``:
    ``W1[e]`` holds gate and up rows alternately and ``y = sum_e g_e(x) W2[e] (silu(gate x) * up x)`` (gpt_oss)."""

    def __init__(self, fused: bool = False) -> None:
        super().__init__()
        self.fused = fused
        self.w1_EFD = nn.Parameter(torch.randn(EXPERTS, (1 + fused) * HIDDEN, DIM) / DIM**0.5)
        self.w2_EDF = nn.Parameter(torch.randn(EXPERTS, DIM, HIDDEN) / HIDDEN**0.5)
        self.ep = False  # expert parallel: the stacks are Shard(0) DTensors, each rank runs its own experts

    def forward(self, x, gates):
        w1, w2 = self.w1_EFD, self.w2_EDF
        if self.ep:
            w1, w2 = w1.to_local(), w2.to_local()
            local = _local_experts(dist.get_rank(), dist.get_world_size())
            gates = gates[..., local]
        h = torch.einsum("btd,efd->btef", x, w1)
        a = nn.functional.silu(h[..., ::2]) * h[..., 1::2] if self.fused else nn.functional.silu(h)
        y = torch.einsum("btef,edf,bte->btd", a, w2, gates)
        return _SumOverRanks.apply(y) if self.ep else y


class _SumOverRanks(torch.autograd.Function):
    """The combine of expert parallelism reduced to its sum: forward and backward all-reduce (SUM)."""

    @staticmethod
    def forward(ctx, y):
        y = y.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g


def _local_experts(rank, world):
    per = EXPERTS // world
    return list(range(rank * per, (rank + 1) * per))


class _Model(nn.Module):
    def __init__(self, fused: bool = False) -> None:
        super().__init__()
        self.router = nn.Linear(DIM, EXPERTS, bias=False)
        self.experts = _Experts(fused)
        self.wo = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x):
        gates = torch.softmax(self.router(x), dim=-1)
        return self.wo(torch.tanh(x + self.experts(x, gates)))


def _model(degree, with_wo=True, fused=False):
    torch.manual_seed(0)
    model = _Model(fused).double()
    pcopt.precondition(model.experts, "w1_EFD", degree=degree, row_interleave=1 + fused)
    pcopt.precondition(model.experts, "w2_EDF", degree=degree)
    if with_wo:
        pcopt.precondition(model.wo, degree=degree)
    return model


def _trainable(model):
    skip = {id(p) for p in pcopt.effective_parameters(model)}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in skip]


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _shard(layout, mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    def shard(model, placement_fn):
        if layout == "ep":
            for name in ("w1_EFD", "w2_EDF"):
                p = model.experts._parameters[name]
                model.experts._parameters[name] = nn.Parameter(
                    distribute_tensor(p.detach(), mesh, [Shard(0)])
                )
            model.experts.ep = True
            return
        matrix = layout == "fsdp_matrix"

        def placement(p):
            if matrix and p.ndim == 3:  # the rows of a stack, or the columns of one whose rows interleave
                fused = p.shape[-2] == 2 * HIDDEN
                return Shard(2 if fused else 1)
            return placement_fn(p)

        fully_shard(model.experts, mesh=mesh, shard_placement_fn=placement)
        fully_shard(model, mesh=mesh, shard_placement_fn=placement)

    return shard


# float64 throughout: the sharded and unsharded runs differ by summation order only (local Grams summed over
# ranks, einsum over a rank's experts then an all-reduce), a few units of 2^-53 per reduction of <= 10^3 terms,
# amplified by AdamW's 1/sqrt(v) over 2 steps; 1e-12 leaves 3 orders of magnitude over what a wrong gamma, u or
# expert index would give (O(1)).
TOL = 1e-12


def _equality(rank, world, layout, kind, fused=False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep" if layout == "ep" else "dp",))
    ep = layout == "ep"
    for accum in (1, 4):
        ref = _model(degree=5, with_wo=not ep, fused=fused)
        model = _model(degree=5, with_wo=not ep, fused=fused)
        pcopt.set_strategy(model, "once_per_step", shard=_shard(layout, mesh))
        state = pcopt.PCState(model)
        w1 = model.experts.parametrizations.w1_EFD.original
        assert isinstance(w1, DTensor) and w1.placements[0].dim == (
            1 + fused if layout == "fsdp_matrix" else 0
        )
        gamma = model.experts.parametrizations.w1_EFD[0].gamma
        assert gamma.shape == ((EXPERTS, 2) if fused else (EXPERTS,))
        if layout != "fsdp_matrix":  # sharded like the experts, so the pull-back is local
            assert gamma.placements[0].is_shard(0), gamma.placements

        def optimizers(named, m):
            named = list(named)
            if kind == "adamw":
                return [torch.optim.AdamW([p for _, p in named], lr=1e-2, weight_decay=0.1, eps=1e-4)]
            stacks = [p for n, p in named if n.endswith("original") and p.ndim == 3]
            rest = [p for n, p in named if not (n.endswith("original") and p.ndim == 3)]
            groups = [
                {"params": [p], "row_interleave": 2 if p.shape[-2] == 2 * HIDDEN else 1} for p in stacks
            ]
            return [
                pcopt.optim.Muon(groups, lr=2e-2, batched_weights=True, ns_dtype=torch.float64,
                                 adjust_lr_fn="match_rms_adamw"),
                torch.optim.AdamW(rest, lr=1e-2, weight_decay=0.1, eps=1e-4),
            ]  # fmt: skip

        ref_opts, opts = optimizers(ref.named_parameters(), ref), optimizers(_trainable(model), model)
        ref_params = dict(ref.named_parameters())
        torch.manual_seed(10 + accum)
        for step in range(2):
            for _ in range(accum):
                x = torch.randn(2 * world, 5, DIM, dtype=torch.float64)
                ref(x).pow(2).mean().div(accum).backward()
                if ep:  # every rank sees the whole batch; the summed output is the same on each
                    model(x).pow(2).mean().div(accum * world).backward()
                else:
                    model(x[2 * rank : 2 * rank + 2]).pow(2).mean().div(accum).backward()
            if ep:  # the replicated parameters (router, wo): summed over ranks, as DDP would
                for p in model.parameters():
                    if p.grad is not None and not isinstance(p.grad, DTensor):
                        dist.all_reduce(p.grad)
            state.after_backward()
            for name, p in _trainable(model):
                err = _rel(_full(p.grad), ref_params[name].grad)
                assert err <= TOL, (layout, kind, accum, step, name, "grad", err)
            for o in ref_opts + opts:
                o.step()
            pcopt.refresh(ref)
            state.after_step()
            for o in ref_opts + opts:
                o.zero_grad()
            for name, p in _trainable(model):
                assert _rel(_full(p), ref_params[name]) <= TOL, (layout, kind, accum, step, name)
            for fqn, pc in pcopt.preconditioners(model):
                mod_fqn, _, name = fqn.rpartition(".")
                pcr = ref.get_submodule(mod_fqn).parametrizations[name][0]
                assert _rel(pc.u, pcr.u) <= 1e-10 and _rel(pc.v, pcr.v) <= 1e-10, fqn
                with torch.no_grad():
                    w_ref = getattr(ref.get_submodule(mod_fqn), name)
                assert _rel(_full(model.get_parameter(fqn)), w_ref) <= TOL, (layout, kind, step, fqn)


@pytest.mark.parametrize("fused", [False, True], ids=["stacks", "interleaved"])
@pytest.mark.parametrize("layout", ["fsdp_experts", "ep", "fsdp_matrix"])
def test_expert_stacks_once_per_step_match_unsharded_per_forward(layout, fused):
    run_distributed(_equality, layout, "adamw", fused)


@pytest.mark.parametrize("fused", [False, True], ids=["stacks", "interleaved"])
@pytest.mark.parametrize("layout", ["fsdp_experts", "ep"])
def test_muon_on_expert_stacks_with_pc_matches_unsharded(layout, fused):
    run_distributed(_equality, layout, "muon", fused)


def _interleaved_rows_sharded(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (world,))
    model = _model(degree=5, fused=True)

    def shard(m, placement_fn):
        rows = lambda p: Shard(1) if p.ndim == 3 else placement_fn(p)  # noqa: E731
        fully_shard(m.experts, mesh=mesh, shard_placement_fn=rows)
        fully_shard(m, mesh=mesh, shard_placement_fn=rows)

    with pytest.raises(ValueError, match=r"interleaves the rows of 2 matrices.*shards its rows.*expert dim"):
        pcopt.set_strategy(model, "once_per_step", shard=shard)


def test_sharding_the_rows_of_an_interleaved_stack_is_refused():
    run_distributed(_interleaved_rows_sharded)
