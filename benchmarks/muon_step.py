"""Muon optimizer-step time: pcopt.optim.Muon vs torch.optim.Muon, single process and 2-rank gloo FSDP2.

The parameter set is the hidden matrices of the Llama-271M model of the PC-layer paper (dim 1024, FFN 2816,
16 layers: wq, wk, wv, wo, w1, w2, w3 per layer), scaled down to fit a CPU: a sweep over the width (default
dims 128, 256, 512 with FFN 2.75 x dim, 4 layers). Both optimizers get the same gradients and settings (bf16 Newton-Schulz, 5 Keller steps).

* single process: both optimizers on plain tensors (pcopt batches same-shaped matrices);
* FSDP2, 2 gloo ranks (1 thread each): ``fully_shard`` per matrix, both optimizers on the same DTensor
  shards. torch's Muon runs through implicit DTensor dispatch; pcopt gathers each matrix to one owner rank,
  orthogonalizes it there and scatters the rows back. An explicit-gather baseline (every rank all-gathers
  every matrix and orthogonalizes all of them) is timed too, for context.

* 4 gloo ranks (``--part mesh``): the same matrices as 1-D FSDP (``Shard(0)``), HSDP 2 x 2
  (``Replicate, Shard(0)``) and FSDP 2 x TP 2 (Llama's colwise ``(_StridedShard(0), Shard(0))`` and rowwise
  ``(Shard(0), Shard(1))``), each against the single-rank unsharded step (parallel efficiency) and the
  duplicated-NS baseline (every rank gathers and orthogonalizes every matrix), with the collectives
  (``CommDebugMode``) and the bytes received per step. On a 2-core machine 4 ranks are oversubscribed.

Steps are interleaved (A, B, A, B, ...) so that load from other processes hits both alike; the median step
time is reported, and ratios are computed from numbers measured in this one run.

    python benchmarks/muon_step.py                                  # every part, dims 128 256 512
    python benchmarks/muon_step.py --part fsdp --dims 1024 --steps 3
    python benchmarks/muon_step.py --part mesh --dims 128 256 --steps 3   # 4 ranks: FSDP, HSDP, FSDP x TP
    OMP_NUM_THREADS=1 python benchmarks/muon_step.py --part single --dims 512 --layers 18   # the 126-matrix set

The single-process part times four arms: torch.optim.Muon, pcopt.optim.Muon with torch's arguments,
pcopt with stacked (batched) Newton-Schulz forced (``foreach=True``), and build_optimizer's Muon
(``ns_algorithm="gram"``), with their FLOPs (``FlopCounterMode``).

``--peers`` puts the Muon implementations a user could pick instead side by side, in one process on the same
matrices and gradients: torch.optim.Muon, pcopt.optim.Muon with torch's arguments, pcopt's build_optimizer
with its defaults, and, where they import, KellerJordan's ``muon-optimizer`` package (``pip install
muon-optimizer``; its ``SingleDeviceMuon``), microsoft/dion's Muon and torchtitan 0.3's DistMuon. Each gets
its step time (median of interleaved steps, wall and thread CPU time), FLOPs, and the max abs difference of
its orthogonalized update from an unsharded float64 Muon step (same momentum, Newton-Schulz in float64 with
the same Keller coefficients). A peer that cannot run in one CPU process gets a row saying why. None of them
is a dependency of pcopt.

    OMP_NUM_THREADS=1 python -m benchmarks.muon_step --peers --dims 512 --layers 18   # the 126-matrix set

``--same-work`` asks whether pcopt with torch's arguments does torch's work: torch.optim.Muon twice (an A/A
pair, whose time ratio is this machine's noise) and pcopt, in rotating order, with the aten ops, matmul ops and
FLOPs of one step of each:

    OMP_NUM_THREADS=1 python -m benchmarks.muon_step --same-work --dims 512 --layers 18 --steps 9
    python -m benchmarks.muon_step --peers --smoke                                      # tiny shapes, seconds
    python -m benchmarks.muon_step --peers --ranks 2 --dims 256 --layers 4              # data-parallel, 2 ranks

``--peers --ranks N`` runs them on N gloo ranks in the data-parallel layout that KellerJordan's distributed
``Muon`` supports (every rank holds every full matrix and the averaged gradient): torch.optim.Muon and pcopt on
plain tensors (every rank orthogonalizes every matrix), pcopt on ``Replicate()`` DTensors (each matrix once in
the world, 2 all-to-alls), and KellerJordan's ``Muon`` (a share of the matrices per rank, then all-gathers),
with the collectives per step. The FSDP2 layouts against torch on shards are ``--part fsdp`` / ``--part mesh``.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from benchmarks._ranks import run_on_ranks
from pcopt.hardware import describe, preferred_dtype
from pcopt.optim import Muon


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return "?"


def matrix_shapes(dim: int, hidden: int, layers: int) -> list[tuple[int, int]]:
    per_layer = [(dim, dim)] * 4 + [(hidden, dim), (dim, hidden), (hidden, dim)]  # wq wk wv wo w1 w2 w3
    return per_layer * layers


class Matrices(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.mats = nn.ModuleList(nn.Linear(n, m, bias=False) for m, n in shapes)


def _interleaved(steppers: dict, steps: int, sync=lambda: None) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for fn in steppers.values():  # warm-up (allocations, first-call overheads)
        fn()
    for _ in range(steps):
        for k, fn in steppers.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


SINGLE_ARMS = {
    # name: (optimizer class, extra kwargs)
    "torch": (torch.optim.Muon, {}),
    "pcopt": (Muon, {}),  # torch's arguments: per-matrix on CPUs, bitwise equal to torch
    "pcopt stacked": (Muon, {"foreach": True}),  # one batched matmul chain per shape group
    "build_optimizer": (Muon, {"ns_algorithm": "gram"}),  # what pcopt.build_optimizer passes
}


def _thread_clock(fn):
    """Wrap ``fn`` to also record the CPU time of this thread (robust to other processes on shared cores)."""
    cpu: list[float] = []

    def run():
        t0 = time.thread_time()
        fn()
        cpu.append(time.thread_time() - t0)

    return run, cpu


def single_process(
    shapes, steps: int, kwargs: dict, arms=tuple(SINGLE_ARMS), device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Median wall time, median thread CPU time and FlopCounterMode FLOPs of one step, per arm (interleaved),
    on ``device`` (CUDA: synchronized around each step; the same weights and gradients as on the CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device(device)
    torch.manual_seed(0)
    base = Matrices(shapes).to(device)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen).to(device) for p in base.parameters()]
    steppers, clocks, flops = {}, {}, {}
    for name in arms:
        cls, extra = SINGLE_ARMS[name]
        model = copy.deepcopy(base)
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        opt = cls(model.parameters(), **kwargs, **extra)
        opt.step()  # the first step also runs one-off checks (pcopt.hardware's bf16 probe): not counted
        with FlopCounterMode(display=False) as counter:
            opt.step()
        flops[name] = counter.get_total_flops()
        steppers[name], clocks[name] = _thread_clock(opt.step)
    wall = _interleaved(steppers, steps, torch.cuda.synchronize if device.type == "cuda" else lambda: None)
    out = {}
    for name in arms:
        out[name] = wall[name]
        out[name + " cpu"] = statistics.median(clocks[name][1:])  # [0] is the warm-up step
        out[name + " flops"] = flops[name]
    return out


def _explicit_gather_step(params, bufs, kwargs):
    """Every rank all-gathers every matrix and runs torch's Newton-Schulz on all of them (redundant)."""
    from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

    lr, wd, mu = kwargs["lr"], kwargs["weight_decay"], 0.95
    with torch.no_grad():
        for p, buf in zip(params, bufs):
            g = p.grad.to_local()
            buf.lerp_(g, 1 - mu)
            update = g.lerp(buf, mu)
            full = _gather_rows(update, p)
            ortho = _zeropower_via_newtonschulz(full, (3.4445, -4.775, 2.0315), 5, 1e-7)
            chunk = -(-p.shape[0] // dist.get_world_size())
            start = min(dist.get_rank() * chunk, p.shape[0])
            local = p.to_local()
            local.mul_(1 - lr * wd)
            local.add_(
                ortho[start : start + local.shape[0]],
                alpha=-_adjust_lr(lr, kwargs.get("adjust_lr_fn"), p.shape),
            )


def _gather_rows(local: torch.Tensor, p) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
    ).full_tensor()


def _fsdp_worker(rank: int, world_size: int, shapes, steps: int, kwargs: dict) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    base = Matrices(shapes)
    reference = copy.deepcopy(base)
    models = {k: copy.deepcopy(base) for k in ("pcopt", "torch", "gather")}
    for m in models.values():
        for lin in m.mats:
            fully_shard(lin)
        fully_shard(m)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(s, generator=gen) for s in shapes]
    for m in models.values():
        for p, g in zip(m.parameters(), grads):
            chunk = -(-g.shape[0] // world_size)
            start = min(rank * chunk, g.shape[0])
            p.grad = DTensor.from_local(g[start : start + chunk].clone(), p.device_mesh, p.placements,
                                        shape=g.shape, stride=g.stride())  # fmt: skip
    for p, g in zip(reference.parameters(), grads):
        p.grad = g.clone()
    ours = Muon(models["pcopt"].parameters(), **kwargs)
    theirs = torch.optim.Muon(models["torch"].parameters(), **kwargs)
    gather_params = list(models["gather"].parameters())
    gather_bufs = [torch.zeros_like(p.to_local()) for p in gather_params]

    # exactness after one step, against pcopt Muon on the unsharded matrices
    Muon(reference.parameters(), **kwargs).step()
    ours.step()
    theirs.step()
    diffs = {}
    for k in ("pcopt", "torch"):
        diffs[k] = max((p.full_tensor() - r).abs().max().item()
                       for p, r in zip(models[k].parameters(), reference.parameters()))  # fmt: skip

    def gather():
        _explicit_gather_step(gather_params, gather_bufs, kwargs)

    single = _single_rank_stepper(reference, kwargs)
    t = _interleaved(
        {"pcopt": ours.step, "torch": theirs.step, "gather": gather, "single": single},
        steps,
        sync=dist.barrier,
    )
    t_all = torch.tensor([t["pcopt"], t["torch"], t["gather"], t["single"]], dtype=torch.float64)
    dist.all_reduce(t_all, op=dist.ReduceOp.MAX)  # a step is as slow as its slowest rank
    return {
        "pcopt": t_all[0].item(),
        "torch": t_all[1].item(),
        "gather": t_all[2].item(),
        "single": t_all[3].item(),
        "diffs": diffs,
    }


def _single_rank_stepper(module: nn.Module, kwargs: dict):
    """pcopt Muon on unsharded copies of the matrices, stepped by rank 0 alone (the others wait)."""
    if dist.get_rank() != 0:
        return lambda: None
    params = [nn.Parameter(p.detach().clone()) for p in module.parameters()]
    for p, q in zip(params, module.parameters()):
        p.grad = q.grad.clone()
    return Muon(params, **kwargs).step


# ----------------------------------------------------------------------------------------------------
# 4 ranks: 1-D FSDP, HSDP 2 x 2, FSDP 2 x TP 2
# ----------------------------------------------------------------------------------------------------
def matrix_kinds(layers: int) -> list[str]:
    """Llama's TP plan per matrix: colwise (Shard(0)) wq wk wv w1 w3, rowwise (Shard(1)) wo w2."""
    return ["col", "col", "col", "row", "col", "row", "col"] * layers


def _layout_placements(layout: str, kind: str) -> tuple:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if layout == "fsdp":
        return (Shard(0),)
    if layout == "hsdp":
        return (Replicate(), Shard(0))
    # FSDP2 on 'dp' over TP on 'tp', as fully_shard(parallelize_module(...)) lays it out
    return (_StridedShard(0, split_factor=2), Shard(0)) if kind == "col" else (Shard(0), Shard(1))


LAYOUTS = {"fsdp": "1-D FSDP (4)", "hsdp": "HSDP 2x2", "fsdp_tp": "FSDP 2 x TP 2"}


class _CommMeter:
    """Counts every c10d collective (CommDebugMode) and the bytes this rank receives from other ranks in
    pcopt's all_to_all_single calls (their split sizes, minus the part a rank sends itself)."""

    def __enter__(self):
        from torch.distributed.tensor.debug import CommDebugMode

        self.bytes, self._orig = 0, dist.all_to_all_single

        def metered(
            output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False
        ):
            me = dist.get_rank(group)
            splits = output_split_sizes or [
                output.numel() // dist.get_world_size(group)
            ] * dist.get_world_size(group)
            self.bytes += (sum(splits) - splits[me]) * output.element_size()
            return self._orig(
                output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op
            )

        dist.all_to_all_single = metered
        self._mode = CommDebugMode().__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        dist.all_to_all_single = self._orig
        self.counts = {str(k).removeprefix("c10d."): v for k, v in self._mode.get_comm_counts().items()}


def _duplicated_ns_step(params, bufs, kwargs, ns):
    """Every rank gathers every matrix (bf16, torch's DTensor gather) and runs Newton-Schulz on all of them."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from pcopt.optim._muon_step import adjust_lr as _adjust_lr

    lr, wd, mu = kwargs["lr"], kwargs["weight_decay"], 0.95
    with torch.no_grad():
        fulls = []
        for p, buf in zip(params, bufs):
            g = p.grad.to_local()
            buf.lerp_(g, 1 - mu)
            update = g.lerp(buf, mu).to(torch.bfloat16)
            fulls.append(DTensor.from_local(update, p.device_mesh, p.placements, shape=p.shape,
                                            stride=p.stride()).full_tensor())  # fmt: skip
        by_shape: dict[tuple, list[int]] = {}
        for i, f in enumerate(fulls):
            by_shape.setdefault(tuple(f.shape), []).append(i)
        for idx in by_shape.values():
            result = ns(torch.stack([fulls[i] for i in idx]))
            for j, i in enumerate(idx):
                p = params[i]
                mine = distribute_tensor(
                    result[j], p.device_mesh, p.placements, src_data_rank=None
                ).to_local()
                local = p.to_local()
                local.mul_(1 - lr * wd)
                local.add_(mine, alpha=-_adjust_lr(lr, kwargs.get("adjust_lr_fn"), p.shape))


def _mesh_worker(rank: int, world_size: int, shapes, kinds, steps: int, kwargs: dict) -> dict:
    from functools import partial

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    from pcopt.optim import newton_schulz

    meshes = {
        "fsdp": init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",)),
        "hsdp": init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard")),
        "fsdp_tp": init_device_mesh("cpu", (world_size // 2, 2), mesh_dim_names=("dp", "tp")),
    }
    ns = partial(
        newton_schulz, coefficients=[(3.4445, -4.775, 2.0315)] * 5, dtype=torch.bfloat16
    )  # Muon's default
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    reference = Matrices(shapes)
    with torch.no_grad():
        for p, w, g in zip(reference.parameters(), weights, grads):
            p.copy_(w)
            p.grad = g.clone()
    ref_after = [nn.Parameter(w.clone()) for w in weights]
    for p, g in zip(ref_after, grads):
        p.grad = g.clone()
    Muon(ref_after, **kwargs).step()
    results = {}
    for layout, mesh in meshes.items():

        def sharded(layout=layout, mesh=mesh):
            ps = []
            for w, g, kind in zip(weights, grads, kinds):
                pl = _layout_placements(layout, kind)
                p = nn.Parameter(distribute_tensor(w.clone(), mesh, pl, src_data_rank=None))
                p.grad = distribute_tensor(g.clone(), mesh, pl, src_data_rank=None)
                ps.append(p)
            return ps

        ours_params, dup_params = sharded(), sharded()
        ours = Muon(ours_params, **kwargs)
        dup_bufs = [torch.zeros_like(p.to_local()) for p in dup_params]

        def dup(dup_params=dup_params, dup_bufs=dup_bufs):
            _duplicated_ns_step(dup_params, dup_bufs, kwargs, ns)

        with _CommMeter() as ours_comm:  # first step: exactness and communication
            ours.step()
        with _CommMeter() as dup_comm:
            dup()
        diffs = {
            k: max((p.full_tensor() - r).abs().max().item() for p, r in zip(ps, ref_after))
            for k, ps in (("pcopt", ours_params), ("duplicated", dup_params))
        }
        dup_bytes = sum(  # what every rank receives in the all-gathers: the matrix minus its own block
            (p.numel() - p.to_local().numel()) * 2 for p in dup_params
        )
        single = _single_rank_stepper(reference, kwargs)
        t = _interleaved({"pcopt": ours.step, "duplicated": dup, "single": single}, steps, sync=dist.barrier)
        t_all = torch.tensor([t["pcopt"], t["duplicated"], t["single"]], dtype=torch.float64)
        dist.all_reduce(t_all, op=dist.ReduceOp.MAX)
        b = torch.tensor([ours_comm.bytes, dup_bytes], dtype=torch.float64)
        dist.all_reduce(b, op=dist.ReduceOp.MAX)  # the busiest rank
        results[layout] = {
            "pcopt": t_all[0].item(), "duplicated": t_all[1].item(), "single": t_all[2].item(),
            "diffs": diffs, "comm": ours_comm.counts, "dup_comm": dup_comm.counts,
            "bytes": b[0].item(), "dup_bytes": b[1].item(),
        }  # fmt: skip
    return results


def meshes(shapes, kinds, steps: int, kwargs: dict, world_size: int = 4) -> dict:
    return run_on_ranks(_mesh_worker, shapes, kinds, steps, kwargs, world_size=world_size)


def fsdp(shapes, steps: int, kwargs: dict, world_size: int = 2) -> dict:
    return run_on_ranks(_fsdp_worker, shapes, steps, kwargs, world_size=world_size)


# ----------------------------------------------------------------------------------------------------
# --peers: other Muon implementations, one process, same matrices
# ----------------------------------------------------------------------------------------------------
KELLER = (3.4445, -4.775, 2.0315)


def reference_update(
    grad: torch.Tensor, momentum: float = 0.95, steps: int = 5, eps: float = 1e-7
) -> torch.Tensor:
    """The orthogonalized first-step update of Muon in float64: Nesterov momentum from a zero buffer, Frobenius
    normalization, ``steps`` Keller Newton-Schulz steps on the wide orientation (no bf16 anywhere)."""
    g = grad.double()
    buf = torch.zeros_like(g).lerp_(g, 1 - momentum)
    x = g.lerp(buf, momentum)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / x.norm().clamp_min(eps)
    a, b, c = KELLER
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return x.mT if tall else x


def _update_diff(before, after, refs, lr: float, wd: float, scale) -> float:
    """Max |update - float64 update| of one step from ``before`` to ``after``, the update recovered as
    ``(W0 (1 - lr wd) - W1) / scale(lr, shape)`` with the arm's own lr scale."""
    diff = 0.0
    for w0, w1, ref in zip(before, after, refs):
        update = (w0 * (1 - lr * wd) - w1) / scale(lr, w0.shape)
        diff = max(diff, (update.double() - ref).abs().max().item())
    return diff


def _scale_match_rms_adamw(lr: float, shape) -> float:
    return 0.2 * lr * math.sqrt(max(shape[-2], shape[-1]))


def _scale_original(lr: float, shape) -> float:
    return lr * math.sqrt(max(1.0, shape[-2] / shape[-1]))


class PeerUnavailable(Exception):
    """A peer that cannot run here; the message says why."""


def _keller_jordan_module():
    """KellerJordan's muon-optimizer package (its module is named "muon"), or why it cannot be used."""
    try:
        import muon as kj
    except ImportError as e:
        raise PeerUnavailable(f"not installed ({e.msg}); pip install muon-optimizer") from None
    if not hasattr(kj, "SingleDeviceMuon"):
        raise PeerUnavailable(
            f"the installed 'muon' module ({getattr(kj, '__file__', '?')}) is not muon-optimizer"
        )
    return kj


def _peer_keller_jordan(params, kwargs):
    kj = _keller_jordan_module()
    # its own lr rule (lr * sqrt(max(1, A/B))), bf16 Newton-Schulz with the Keller coefficients, Nesterov
    opt = kj.SingleDeviceMuon(params, lr=kwargs["lr"], weight_decay=kwargs["weight_decay"], momentum=0.95)
    return opt, _scale_original


def _peer_dion(params, kwargs):
    try:
        import dion  # microsoft/dion
    except ImportError:
        raise PeerUnavailable(
            "no 'dion' distribution on PyPI (pip: no matching distribution); microsoft/dion "
            "installs from its git repository only"
        ) from None
    muon_cls = getattr(dion, "Muon", None)
    if muon_cls is None:
        raise PeerUnavailable(f"the installed 'dion' module ({getattr(dion, '__file__', '?')}) has no Muon")
    if not dist.is_available() or not dist.is_initialized():
        raise PeerUnavailable(
            "dion.Muon expects an initialized process group / device mesh (distributed only)"
        )
    raise PeerUnavailable("dion.Muon found but not wired into this benchmark")  # pragma: no cover


def _peer_torchtitan(params, kwargs):
    try:
        from torchtitan.distributed.flex_shard import dist_muon  # noqa: F401
    except ImportError as e:
        raise PeerUnavailable(f"not importable ({e}); install pcopt's torchtitan extra") from None
    if not torch.cuda.is_available():
        raise PeerUnavailable(
            "importable, but DistMuon refuses CPU tensors: it requires one CUDA device per process and "
            "DTensor (flex_shard) parameters; compare on the GPU script"
        )
    raise PeerUnavailable("CUDA present: run the GPU script, this CPU benchmark does not set up flex_shard")


def _own_torch(params, kwargs):
    return torch.optim.Muon(params, **kwargs), _scale_match_rms_adamw


def _own_pcopt(params, kwargs):
    return Muon(params, **kwargs), _scale_match_rms_adamw


PEERS = {
    # name: factory(params, kwargs) -> (optimizer, lr scale of the update)
    "torch.optim.Muon": _own_torch,
    "pcopt Muon (torch args)": _own_pcopt,
    "pcopt build_optimizer": None,  # built from a module, see peers()
    "muon-optimizer (KellerJordan)": _peer_keller_jordan,
    "microsoft/dion Muon": _peer_dion,
    "torchtitan 0.3 DistMuon": _peer_torchtitan,
}


def _build_optimizer_arm(model: nn.Module, kwargs: dict):
    import warnings

    from pcopt import build_optimizer

    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # "adamw_pattern matches nothing": the benchmark module has matrices only
        opt = build_optimizer(model, lr=kwargs["lr"], weight_decay=kwargs["weight_decay"])
    muon = opt.optimizers["muon"] if hasattr(opt, "optimizers") else opt
    dtype = muon.param_groups[0]["ns_dtype"]
    algo = muon.param_groups[0]["ns_algorithm"]
    return opt, _scale_match_rms_adamw, f"ns_dtype {str(dtype).removeprefix('torch.')}, ns_algorithm {algo!r}"


def peers(shapes, steps: int, kwargs: dict, names=tuple(PEERS)) -> dict[str, dict]:
    """Per peer: wall / thread CPU median step time, FLOPs and max |update - float64 update|, or why it cannot run.

    Every arm starts from the same weights and gradients. The accuracy step is each arm's first step on a fresh
    copy: its update is recovered as ``(W0 (1 - lr wd) - W1) / scale`` with the arm's own lr scale, and compared
    with :func:`reference_update` (float64). Timed steps follow on the same optimizer (some peers overwrite the
    gradient in place; a step's cost does not depend on the values).
    """
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    base = Matrices(shapes)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen) for p in base.parameters()]
    refs = [reference_update(g) for g in grads]
    lr, wd = kwargs["lr"], kwargs["weight_decay"]
    results: dict[str, dict] = {}
    steppers, clocks = {}, {}
    for name in names:
        model = copy.deepcopy(base)
        params = list(model.parameters())
        for p, g in zip(params, grads):
            p.grad = g.clone()
        note = ""
        try:
            if name == "pcopt build_optimizer":
                opt, scale, note = _build_optimizer_arm(model, kwargs)
            else:
                opt, scale = PEERS[name](params, kwargs)
        except PeerUnavailable as e:
            results[name] = {"why": str(e)}
            continue
        before = [p.detach().clone() for p in params]
        opt.step()
        diff = _update_diff(before, [p.detach() for p in params], refs, lr, wd, scale)
        with FlopCounterMode(display=False) as counter:
            opt.step()
        results[name] = {"diff": diff, "flops": counter.get_total_flops(), "note": note}
        steppers[name], clocks[name] = _thread_clock(opt.step)
    wall = _interleaved(steppers, steps)
    for name in steppers:
        results[name]["wall"] = wall[name]
        results[name]["cpu"] = statistics.median(clocks[name][1:])  # [0] is the warm-up step
    return results


# --peers --ranks N: the data-parallel (DDP) layout, where every rank holds every full matrix and gradient
def _preferred_name() -> str:
    """The Newton-Schulz dtype build_optimizer picks on this CPU (bf16 only where it is native)."""
    return str(preferred_dtype("cpu")).removeprefix("torch.")


class _Chain:
    """Several optimizers stepped as one."""

    def __init__(self, optimizers):
        self.optimizers = optimizers

    def step(self):
        for opt in self.optimizers:
            opt.step()


def _ddp_arms(mesh, kwargs):
    """name -> (optimizer factory(params), parameter kind, lr scale). "replicated": each matrix a DTensor with
    ``Replicate()`` on the data-parallel mesh, which pcopt orthogonalizes once in the world (owner per matrix)."""

    def keller_jordan(params):
        kj = _keller_jordan_module()
        # its all-gathers need the world_size matrices of one round to share a shape: one optimizer per shape
        by_shape: dict[tuple, list] = {}
        for p in params:
            by_shape.setdefault(tuple(p.shape), []).append(p)
        opts = [kj.Muon(ps, lr=kwargs["lr"], weight_decay=kwargs["weight_decay"], momentum=0.95)
                for ps in by_shape.values()]  # fmt: skip
        return _Chain(opts)

    def titan(params):
        return _peer_torchtitan(params, kwargs)

    return {
        "torch.optim.Muon (every rank, every matrix)": (lambda ps: torch.optim.Muon(ps, **kwargs), "plain", _scale_match_rms_adamw),
        "pcopt Muon, torch's args, plain tensors": (lambda ps: Muon(ps, **kwargs), "plain", _scale_match_rms_adamw),
        "pcopt Muon, torch's args, Replicate DTensors": (lambda ps: Muon(ps, **kwargs), "replicated", _scale_match_rms_adamw),
        "pcopt Muon, ns_algorithm='gram', Replicate DTensors": (lambda ps: Muon(ps, **kwargs, ns_algorithm="gram"), "replicated", _scale_match_rms_adamw),
        f"pcopt Muon, build_optimizer's settings (gram, {_preferred_name()}), Replicate DTensors": (
            lambda ps: Muon(ps, **kwargs, ns_algorithm="gram", ns_dtype=preferred_dtype("cpu")), "replicated", _scale_match_rms_adamw),
        "muon-optimizer Muon (KellerJordan, DDP)": (keller_jordan, "plain", _scale_original),
        "torchtitan 0.3 DistMuon": (titan, "plain", _scale_match_rms_adamw),
        "microsoft/dion Muon": (lambda ps: _peer_dion(ps, kwargs), "plain", _scale_match_rms_adamw),
    }  # fmt: skip


def _ddp_peers_worker(rank: int, world_size: int, shapes, steps: int, kwargs: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
    gen = torch.Generator().manual_seed(1)  # the same weights and (already averaged) gradients on every rank
    weights = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    refs = [reference_update(g) for g in grads]
    lr, wd = kwargs["lr"], kwargs["weight_decay"]
    results: dict[str, dict] = {}
    steppers = {}
    for name, (factory, kind, scale) in _ddp_arms(mesh, kwargs).items():
        if kind == "plain":
            params = [nn.Parameter(w.clone()) for w in weights]
            for p, g in zip(params, grads):
                p.grad = g.clone()
        else:
            params = [nn.Parameter(distribute_tensor(w.clone(), mesh, [Replicate()])) for w in weights]
            for p, g in zip(params, grads):
                p.grad = distribute_tensor(g.clone(), mesh, [Replicate()])
        try:
            opt = factory(params)
        except PeerUnavailable as e:
            results[name] = {"why": str(e)}
            continue
        with _CommMeter() as comm:
            opt.step()
        after = [p.detach().full_tensor() if kind == "replicated" else p.detach() for p in params]
        results[name] = {"diff": _update_diff(weights, after, refs, lr, wd, scale), "comm": comm.counts}
        steppers[name] = opt.step
    t = _interleaved(steppers, steps, sync=dist.barrier)
    t_all = torch.tensor([t[k] for k in steppers], dtype=torch.float64)
    dist.all_reduce(t_all, op=dist.ReduceOp.MAX)  # a step is as slow as its slowest rank
    for k, v in zip(steppers, t_all.tolist()):
        results[k]["wall"] = v
    return results


def ddp_peers(shapes, steps: int, kwargs: dict, world_size: int = 2) -> dict[str, dict]:
    """The peers on ``world_size`` gloo ranks in the data-parallel layout: step time of the slowest rank,
    collectives per step (CommDebugMode) and max |update - float64 update|, or why a peer cannot run."""
    return run_on_ranks(_ddp_peers_worker, shapes, steps, kwargs, world_size=world_size)


def same_work(shapes, steps: int, kwargs: dict) -> dict[str, dict]:
    """torch.optim.Muon twice (an A/A pair: how far two identical optimizers' times differ on this machine) and
    pcopt.optim.Muon with torch's arguments: thread CPU time per step, medians over ``steps`` rounds in rotating
    order (no arm always runs first), and the aten ops and FLOPs of one step (``pcopt.profiling.StepProfile``)."""
    from pcopt.profiling import StepProfile

    torch.manual_seed(0)
    base = Matrices(shapes)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen) for p in base.parameters()]
    arms = {"torch.optim.Muon (A)": torch.optim.Muon, "torch.optim.Muon (B)": torch.optim.Muon,
            "pcopt Muon (torch args)": Muon}  # fmt: skip
    opts, res = {}, {}
    for name, cls in arms.items():
        params = list(copy.deepcopy(base).parameters())
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opts[name] = cls(params, **kwargs)
        opts[name].step()  # warm-up: momentum buffers, first-call overheads
        with StepProfile() as prof:
            opts[name].step()
        matmuls = {k: v for k, v in prof.ops.items() if k.endswith("mm")}
        res[name] = {"ops": prof.total_ops, "matmuls": matmuls, "flops": prof.total_flops, "cpu": []}
    names = list(opts)
    for i in range(steps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.thread_time()
            opts[name].step()
            res[name]["cpu"].append(time.thread_time() - t0)
    for r in res.values():
        r["cpu"] = statistics.median(r["cpu"])
    return res


def _print_same_work_table(dim: int, hidden: int, n_matrices: int, steps: int, res: dict) -> None:
    t0 = res["torch.optim.Muon (A)"]["cpu"]
    print(f"dim {dim} / FFN {hidden}, {n_matrices} matrices, one process; thread CPU time, median of {steps} "
          "rounds in rotating order; ratio = arm / torch.optim.Muon (A); ops and FLOPs of one step")  # fmt: skip
    _print_rows(
        ["arm", "CPU time", "ratio", "aten ops", "matmul ops", "GFLOP"],
        res,
        lambda r: [f"{r['cpu'] * 1e3:.1f} ms", f"{r['cpu'] / t0:.3f}", str(r["ops"]),
                   ", ".join(f"{v} {k}" for k, v in sorted(r["matmuls"].items())), f"{r['flops'] / 1e9:.2f}"],
    )  # fmt: skip


def _print_rows(header: list[str], res: dict, cells) -> None:
    """A markdown table: one row per arm, ``cells(result)`` after its name; a peer that cannot run says why."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, r in res.items():
        rest = ["-"] * (len(header) - 2) + [f"cannot run here: {r['why']}"] if "why" in r else cells(r)
        print("| " + " | ".join([name, *rest]) + " |")
    print()


def _print_ddp_peers_table(dim: int, hidden: int, n_matrices: int, world_size: int, res: dict) -> None:
    t0 = res["torch.optim.Muon (every rank, every matrix)"]["wall"]
    print(f"dim {dim} / FFN {hidden}, {n_matrices} matrices, {world_size} gloo ranks (1 thread each), data-parallel "
          "layout (every rank holds every matrix); time of the slowest rank; ratio = arm / torch.optim.Muon")  # fmt: skip
    _print_rows(
        ["implementation", "step", "ratio", "collectives per step", "max diff vs float64"],
        res,
        lambda r: [f"{r['wall'] * 1e3:.1f} ms", f"{r['wall'] / t0:.2f}",
                   ", ".join(f"{v} {k}" for k, v in sorted(r["comm"].items())) or "none", f"{r['diff']:.2e}"],
    )  # fmt: skip


def _print_peers_table(dim: int, hidden: int, n_matrices: int, res: dict) -> None:
    t0 = res["torch.optim.Muon"]
    print(f"dim {dim} / FFN {hidden}, {n_matrices} matrices, one process; ratio = arm / torch.optim.Muon (this run); "
          "diff = max |update - float64 Muon update| over all matrices (update = orthogonalized momentum, before lr)")  # fmt: skip
    _print_rows(
        ["implementation", "wall", "ratio", "CPU time", "ratio", "GFLOP", "ratio", "max diff vs float64", "note"],
        res,
        lambda r: [f"{r['wall'] * 1e3:.1f} ms", f"{r['wall'] / t0['wall']:.2f}", f"{r['cpu'] * 1e3:.1f} ms",
                   f"{r['cpu'] / t0['cpu']:.2f}", f"{r['flops'] / 1e9:.2f}", f"{r['flops'] / t0['flops']:.3f}",
                   f"{r['diff']:.2e}", r["note"]],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 256, 512],
                        help="model widths to sweep; FFN = 2.75 x dim as in Llama-271M (1024 -> 2816)")  # fmt: skip
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per optimizer (median reported)")
    parser.add_argument("--part", choices=["all", "single", "fsdp", "mesh"], default="all",
                        help="single process, 2-rank FSDP2, or 4-rank 1-D FSDP / HSDP / FSDP x TP ('all': every part)")  # fmt: skip
    parser.add_argument("--peers", action="store_true",
                        help="one process: torch.optim.Muon, pcopt (torch args), build_optimizer and the peer "
                        "packages that import here, with time, FLOPs and difference from a float64 step")  # fmt: skip
    parser.add_argument("--same-work", action="store_true",
                        help="one process: torch.optim.Muon twice (the timing noise) and pcopt with torch's "
                        "arguments, rotating order, with the aten ops and FLOPs of a step")  # fmt: skip
    parser.add_argument("--ranks", type=int, default=1,
                        help="with --peers: 1 (one process) or N gloo ranks in the data-parallel layout")  # fmt: skip
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes (dim 16, 1 layer, 2 steps) to exercise the code paths in seconds",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.dims, args.layers, args.steps = [16], 1, 2
        if args.part == "all":
            args.part = "single"
    kwargs = {"lr": 0.02, "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw"}
    if args.same_work:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); CPU {_cpu_model()}; ATen CPU "
              f"capability {torch.backends.cpu.get_cpu_capability()}; bf16 Newton-Schulz (torch's default)")  # fmt: skip
        for dim in args.dims:
            hidden = dim * 11 // 4
            shapes = matrix_shapes(dim, hidden, args.layers)
            _print_same_work_table(
                dim, hidden, len(shapes), args.steps, same_work(shapes, args.steps, kwargs)
            )
        return
    if args.peers:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); CPU {_cpu_model()}; ATen CPU "
              f"capability {torch.backends.cpu.get_cpu_capability()}; pcopt.hardware: {describe('cpu')}; "
              f"{args.layers} layers x (wq, wk, wv, wo, w1, w2, w3); median of {args.steps} interleaved steps")  # fmt: skip
        for dim in args.dims:
            hidden = dim * 11 // 4
            shapes = matrix_shapes(dim, hidden, args.layers)
            if args.ranks > 1:
                res = ddp_peers(shapes, args.steps, kwargs, args.ranks)
                _print_ddp_peers_table(dim, hidden, len(shapes), args.ranks, res)
            else:
                _print_peers_table(dim, hidden, len(shapes), peers(shapes, args.steps, kwargs))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (single process), 1 thread per rank "
          f"(FSDP2); {args.layers} layers x (wq, wk, wv, wo, w1, w2, w3); median of {args.steps} interleaved steps")  # fmt: skip
    print(f"Newton-Schulz in bf16 for both (torch.optim.Muon's default); pcopt.hardware: {describe('cpu')}; "
          f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}; CPU {_cpu_model()}")  # fmt: skip
    rows = []
    for dim in args.dims:
        hidden = dim * 11 // 4
        shapes = matrix_shapes(dim, hidden, args.layers)
        n = sum(m * k for m, k in shapes) / 1e6
        row = {"dim": dim, "hidden": hidden, "params": n, "matrices": len(shapes)}
        if args.part in ("all", "single"):
            t = single_process(shapes, args.steps, kwargs)
            row.update(single_pcopt=t["pcopt"], single_torch=t["torch"], single=t)
        if args.part in ("all", "fsdp"):
            t = fsdp(shapes, args.steps, kwargs)
            row.update(fsdp_pcopt=t["pcopt"], fsdp_torch=t["torch"], fsdp_gather=t["gather"],
                       fsdp_single=t["single"], diffs=t["diffs"])  # fmt: skip
        if args.part in ("all", "mesh"):
            row["mesh"] = meshes(shapes, matrix_kinds(args.layers), args.steps, kwargs)
        rows.append(row)
        _print_row(row)
    print()
    if args.part in ("all", "mesh"):
        _print_mesh_table(rows)
    if args.part == "mesh":
        return
    if args.part in ("all", "single"):
        _print_single_table(rows)
    print("| dim / FFN | params | single: pcopt | torch | speed-up | FSDP2 2 ranks: pcopt | torch on shards | "
          "speed-up | all-gather baseline | parallel efficiency | max diff pcopt / torch |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r['dim']} / {r['hidden']}", f"{r['params']:.1f}M"]
        if "single_pcopt" in r:
            cells += [f"{r['single_pcopt'] * 1e3:.0f} ms", f"{r['single_torch'] * 1e3:.0f} ms",
                      f"x{r['single_torch'] / r['single_pcopt']:.2f}"]  # fmt: skip
        else:
            cells += ["-"] * 3
        if "fsdp_pcopt" in r:
            cells += [f"{r['fsdp_pcopt'] * 1e3:.0f} ms", f"{r['fsdp_torch'] * 1e3:.0f} ms",
                      f"x{r['fsdp_torch'] / r['fsdp_pcopt']:.2f}", f"{r['fsdp_gather'] * 1e3:.0f} ms",
                      f"{r['fsdp_single'] / (2 * r['fsdp_pcopt']):.2f}",
                      f"{r['diffs']['pcopt']:.2g} / {r['diffs']['torch']:.2g}"]  # fmt: skip
        else:
            cells += ["-"] * 6
        print("| " + " | ".join(cells) + " |")


def _print_single_table(rows) -> None:
    print("single process, one thread: ratio = arm / torch.optim.Muon, from the medians of this run (wall; thread "
          "CPU time, which other processes on shared cores do not inflate); FLOPs by FlopCounterMode, one step")  # fmt: skip
    print("| dim / FFN | matrices | arm | wall | ratio | CPU time | ratio | GFLOP | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["single"]
        for arm in SINGLE_ARMS:
            if arm not in t:
                continue
            print("| " + " | ".join([
                f"{r['dim']} / {r['hidden']}", str(r["matrices"]), arm,
                f"{t[arm] * 1e3:.0f} ms", f"{t[arm] / t['torch']:.2f}",
                f"{t[arm + ' cpu'] * 1e3:.0f} ms", f"{t[arm + ' cpu'] / t['torch cpu']:.2f}",
                f"{t[arm + ' flops'] / 1e9:.1f}", f"{t[arm + ' flops'] / t['torch flops']:.3f}",
            ]) + " |")  # fmt: skip
    print()


def _print_mesh_table(rows) -> None:
    print("4 gloo ranks, 1 thread each (oversubscribed on a 2-core machine: efficiency <= ~0.5 by construction). "
          "single = pcopt Muon on the unsharded matrices, one rank; efficiency = single / (4 x sharded); "
          "duplicated = every rank gathers every matrix and runs Newton-Schulz on all of them; "
          "bytes = received from other ranks per step by the busiest rank.")  # fmt: skip
    print("| dim / FFN | layout | single rank | pcopt 4 ranks | efficiency | duplicated NS | pcopt speed-up | "
          "collectives pcopt / duplicated | MB received pcopt / duplicated | max diff pcopt / duplicated |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for layout, m in r.get("mesh", {}).items():
            print("| " + " | ".join([
                f"{r['dim']} / {r['hidden']}", LAYOUTS[layout], f"{m['single'] * 1e3:.0f} ms",
                f"{m['pcopt'] * 1e3:.0f} ms", f"{m['single'] / (4 * m['pcopt']):.2f}",
                f"{m['duplicated'] * 1e3:.0f} ms", f"x{m['duplicated'] / m['pcopt']:.2f}",
                f"{_fmt_counts(m['comm'])} / {_fmt_counts(m['dup_comm'])}",
                f"{m['bytes'] / 1e6:.2f} / {m['dup_bytes'] / 1e6:.2f}",
                f"{m['diffs']['pcopt']:.2g} / {m['diffs']['duplicated']:.2g}",
            ]) + " |")  # fmt: skip


def _fmt_counts(counts: dict) -> str:
    return " + ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "0"


def _print_row(r: dict) -> None:
    head = f"dim {r['dim']:5d} FFN {r['hidden']:5d} ({r['params']:.1f}M)"
    if "single_pcopt" in r:
        print(f"{head} single : pcopt {r['single_pcopt'] * 1e3:8.1f} ms  torch.optim.Muon "
              f"{r['single_torch'] * 1e3:8.1f} ms  speed-up x{r['single_torch'] / r['single_pcopt']:.2f}")  # fmt: skip
    if "fsdp_pcopt" in r:
        print(f"{head} FSDP2  : pcopt {r['fsdp_pcopt'] * 1e3:8.1f} ms  torch.optim.Muon on shards "
              f"{r['fsdp_torch'] * 1e3:8.1f} ms  speed-up x{r['fsdp_torch'] / r['fsdp_pcopt']:.2f}; all-gather "
              f"baseline {r['fsdp_gather'] * 1e3:.1f} ms; parallel efficiency single-rank / (2 x pcopt) "
              f"{r['fsdp_single'] / (2 * r['fsdp_pcopt']):.2f}; max |W - W_unsharded| after one step: pcopt "
              f"{r['diffs']['pcopt']:.3g}, torch on shards {r['diffs']['torch']:.3g}")  # fmt: skip
    for layout, m in r.get("mesh", {}).items():
        print(f"{head} {LAYOUTS[layout]:14s}: pcopt {m['pcopt'] * 1e3:8.1f} ms, single rank {m['single'] * 1e3:8.1f} ms "
              f"(efficiency {m['single'] / (4 * m['pcopt']):.2f}), duplicated NS {m['duplicated'] * 1e3:8.1f} ms; "
              f"{_fmt_counts(m['comm'])}, {m['bytes'] / 1e6:.2f} MB in; max diff {m['diffs']['pcopt']:.3g}")  # fmt: skip


if __name__ == "__main__":
    main()
