"""PC's per-step cost per rank in each 4-rank layout: 1-D FSDP 4, HSDP 2 x 2, FSDP 2 x TP 2 (gloo, CPU).

    OMP_NUM_THREADS=1 python -m benchmarks.pc_layouts [--dim 256 --hidden 704 --layers 2] [--repeat 5] [--smoke]

A stack of SwiGLU feed-forward blocks (``w1``, ``w3``: hidden x dim, column-parallel; ``w2``: dim x hidden,
row-parallel, Llama's tensor-parallel plan) with the PC layer once per step, sharded by FSDP2 with pcopt's
``shard_placement_fn`` (every PC matrix sharded on its larger dim; under FSDP x TP on the dim TP shards). One PC step
is ``PCState.after_backward`` (the pull-back) plus ``PCState.after_step`` (power iteration, map). Per rank (rank 0
printed; every rank does the same work): its FLOPs (``FlopCounterMode``), the elements it hands to all-reduces (4 B
each, fp32), the bytes a ring all-reduce then moves out of the rank (``2 (g-1)/g`` x that, g = group size) and the
median wall time, each as a ratio to the 1-D layout, next to the formula of ``docs/scale.md``: per matrix
``12 m n^2 / P + 8 (k-2) n^3 + 4 iters m n / P`` FLOPs, P = the ranks that shard it (4, 2 under HSDP: the replicas
repeat the work), and ``(n^2 + 1) + (2n^2 + 1)`` fp32 all-reduced plus the power iteration's vectors, the same in
every layout.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

import pcopt
from benchmarks._ranks import run_on_ranks

LAYOUTS = ("fsdp", "hsdp", "fsdp_tp")
WORLD = 4


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class _Layer(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.feed_forward = _FeedForward(dim, hidden)

    def forward(self, x):
        return x + self.feed_forward(x)


class _Model(nn.Module):
    def __init__(self, dim: int, hidden: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList([_Layer(dim, hidden) for _ in range(layers)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class _AllReduces(TorchDispatchMode):
    """Elements handed to each c10d all-reduce and the size of its process group."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("c10d::") and "wait" not in name:
            if not name.startswith("c10d::allreduce_"):
                raise RuntimeError(f"pc_layouts: the PC step issued {name}; it should issue all-reduces only")
            pg = dist.ProcessGroup.unbox(next(a for a in args if isinstance(a, torch.ScriptObject)))
            numel = sum(t.numel() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
            self.calls.append((numel, pg.size()))
        return func(*args, **(kwargs or {}))


def _build(layout: str, args) -> tuple[nn.Module, pcopt.PCState, int, int]:
    """The model in ``layout``; returns it, its PCState, this rank's data-parallel index and the dp size."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = _Model(args.dim, args.hidden, args.layers)
    pcopt.precondition_model(model, degree=args.degree)
    kwargs, tp_mesh = {}, None
    dp, dp_size = dist.get_rank(), WORLD
    if layout == "hsdp":
        kwargs["mesh"] = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    elif layout == "fsdp_tp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        kwargs["mesh"], tp_mesh = mesh["dp"], mesh["tp"]
        dp, dp_size = mesh["dp"].get_local_rank(), 2

    def shard(m, placement_fn):
        if tp_mesh is not None:
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            plan = {"feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
                    "feed_forward.w2": RowwiseParallel()}  # fmt: skip
            for layer in m.layers:
                parallelize_module(layer, tp_mesh, plan)
        for layer in m.layers:
            fully_shard(layer, shard_placement_fn=placement_fn, **kwargs)
        fully_shard(m, shard_placement_fn=placement_fn, **kwargs)

    pcopt.set_strategy(model, "once_per_step", shard=shard)
    return model, pcopt.PCState(model), dp, dp_size


def _step(model, pc, x, timed: list[float] | None = None) -> None:
    """Forward/backward (not timed), then the PC step: pull-back, a small raw-weight update, map."""
    model(x).pow(2).mean().backward()
    t0 = time.perf_counter()
    pc.after_backward()
    t1 = time.perf_counter()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-1e-4)  # the raw weights change, so after_step maps them again
                p.grad = None
    t2 = time.perf_counter()
    pc.after_step()
    t3 = time.perf_counter()
    if timed is not None:
        timed.append((t1 - t0) + (t3 - t2))


def _measure(layout: str, args) -> dict:
    model, pc, dp, dp_size = _build(layout, args)
    torch.manual_seed(1)
    x = torch.randn(dp_size * args.batch, args.tokens // args.batch, args.dim)[
        dp * args.batch : (dp + 1) * args.batch
    ]
    _step(model, pc, x)  # warm-up: first-call costs (group creation, index caches)
    model(x).pow(2).mean().backward()
    with FlopCounterMode(display=False) as flops, _AllReduces() as comm:
        pc.after_backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-1e-4)
                    p.grad = None
        pc.after_step()
    times: list[float] = []
    for _ in range(args.repeat):
        dist.barrier()
        _step(model, pc, x, times)
    elements = sum(n for n, _ in comm.calls)
    ring = sum(n * 2 * (g - 1) / g for n, g in comm.calls)
    return {
        "flops": flops.get_total_flops(),
        "bytes": 4 * elements,
        "ring_bytes": 4 * ring,
        "all_reduces": len(comm.calls),
        "groups": sorted({g for _, g in comm.calls}),
        "time": statistics.median(times),
    }


def formula(layout: str, args) -> dict:
    """``docs/scale.md``'s per-rank count for one PC step of the model in ``layout``."""
    P = 2 if layout == "hsdp" else WORLD
    k = len(pcopt.polynomial(args.degree))
    iters = pcopt.PCOptions().num_power_iterations
    m, n = max(args.dim, args.hidden), min(args.dim, args.hidden)
    mats = 3 * args.layers
    flops = mats * (12 * m * n * n / P + 8 * (k - 2) * n**3 + 4 * iters * m * n / P)
    elements = mats * ((n * n + 1) + (2 * n * n + 1) + iters * (m + n))  # Grams, sigmas; W^T u and W v
    return {"flops": flops, "bytes": 4 * elements, "ring_bytes": 4 * elements * 2 * (P - 1) / P}


def _worker(rank: int, world: int, args) -> dict:
    return {layout: _measure(layout, args) for layout in LAYOUTS}


def run(args) -> dict:
    """Measure every layout on 4 spawned gloo ranks; returns rank 0's numbers and the formula's."""
    res = run_on_ranks(_worker, args, world_size=WORLD)
    for layout in LAYOUTS:
        res[layout]["formula"] = formula(layout, args)
    return res


def table(res: dict) -> str:
    base = res["fsdp"]
    rows = [
        "| layout | all-reduces | group | MFLOP | x 1-D (formula) | KiB all-reduced | x 1-D (formula) "
        "| KiB ring-sent | x 1-D (formula) | ms | x 1-D |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for layout in LAYOUTS:
        r, f, fb = res[layout], res[layout]["formula"], base["formula"]
        rows.append(
            f"| {layout} | {r['all_reduces']} | {r['groups']} | {r['flops'] / 1e6:.1f} "
            f"| {r['flops'] / base['flops']:.2f} ({f['flops'] / fb['flops']:.2f}) | {r['bytes'] / 1024:.0f} "
            f"| {r['bytes'] / base['bytes']:.2f} ({f['bytes'] / fb['bytes']:.2f}) | {r['ring_bytes'] / 1024:.0f} "
            f"| {r['ring_bytes'] / base['ring_bytes']:.2f} ({f['ring_bytes'] / fb['ring_bytes']:.2f}) "
            f"| {r['time'] * 1e3:.1f} | {r['time'] / base['time']:.2f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=704)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--degree", type=int, default=5)
    p.add_argument("--tokens", type=int, default=512, help="tokens per data-parallel rank")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5, help="timed PC steps per layout (median)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one timed step: checks the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.dim, args.hidden, args.layers, args.tokens, args.repeat = 32, 88, 1, 16, 1
    for name in ("dim", "hidden"):
        if getattr(args, name) % 4:
            raise ValueError(f"--{name} must be divisible by 4 (4 ranks shard it); got {getattr(args, name)}")
    if args.tokens % args.batch:
        raise ValueError(f"--tokens ({args.tokens}) must be divisible by --batch ({args.batch})")
    res = run(args)
    print(table(res))
    return res


if __name__ == "__main__":
    main()
