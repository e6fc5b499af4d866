"""PC cost at paper-sized layer shapes: per-micro-batch (parametrize) vs once-per-step sharded, 2 gloo ranks.

    python -m benchmarks.pc_scale [--shapes 271m,1b,8b] [--tokens 1024] [--micro-batches 4] [--degree 5]
        [--repeat 2] [--world-size 2]
    python -m benchmarks.pc_scale --bf16-accuracy

For each shape, one FFN ``w1`` matrix (``hidden x dim``: 2816x1024 for the 271M model, 5632x2048 for 1B,
14336x4096 for Llama-3 8B) is wrapped in FSDP2 over ``--world-size`` CPU ranks and run for one optimizer
step's worth of micro-batches (``--micro-batches`` of ``--tokens`` tokens per rank each) in three modes:

* ``linear``: the plain ``nn.Linear`` (the cost PC adds to);
* ``per-micro-batch``: ``pcopt.precondition`` (parametrize path): every micro-batch forward/backward runs the
  PC map on the unsharded weight, then the power-iteration refresh;
* ``sharded``: ``pcopt.set_strategy(model, "once_per_step", shard=...)``: the micro-batches run a plain Linear on ``W_eff``, then
  ``after_backward`` (pull-back) and ``after_step`` (refresh and ``W_eff`` write) run once on the shards.

Per rank it counts matmul FLOPs (``torch.utils.flop_counter``), bytes sent to collectives (a dispatch mode that
sees every c10d op) and bytes saved for backward in the forward (``saved_tensors_hooks``); the PC cost of a
mode is its count minus ``linear``'s. Time (median of ``--repeat``) is that of the PC map alone (see
``_step``) over the plain Linear's whole step (forward/backward with FSDP2's collectives). The FLOP ratio to
``linear`` is printed beside the closed-form ratio (``docs/scale.md``), with ``n``/``m`` the small/large side,
``T`` tokens per micro-batch per rank, ``M`` micro-batches, ``W`` ranks and ``k`` polynomial coefficients:

    per-micro-batch: 2n/T + (k-2) n^2/(mT)            sharded: 2n/(W T M) + 4(k-2) n^2/(3 m T M)
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

SHAPES = {"271m": (2816, 1024), "1b": (5632, 2048), "8b": (14336, 4096)}  # (hidden, dim) of feed_forward.w1
MODES = ("linear", "per-micro-batch", "sharded")


class _Bytes(TorchDispatchMode):
    """Bytes of the tensors handed to c10d collectives (input side; an all-gather's output is not counted)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("c10d::") and "barrier" not in name:
            tensors = [t for t in tree_leaves(args) if isinstance(t, torch.Tensor)]
            if name.startswith("c10d::allgather"):
                tensors = tensors[-1:]  # (outputs, input): count what this rank sends
            elif name.startswith("c10d::reduce_scatter"):
                tensors = tensors[-1:]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _build(mode: str, shape: tuple[int, int], degree: int, seed: int = 0):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Module()
    model.feed_forward = nn.Module()
    model.feed_forward.w1 = nn.Linear(shape[1], shape[0], bias=False)
    model.forward = lambda x: model.feed_forward.w1(x)  # type: ignore[method-assign]
    if mode == "linear":
        fully_shard(model.feed_forward.w1)
        fully_shard(model)
        return model, None
    pcopt.precondition_model(model, degree=degree, strategy="per_forward")
    if mode == "per-micro-batch":
        fully_shard(model.feed_forward.w1)
        fully_shard(model)
        return model, None

    def shard(m, placement_fn):
        fully_shard(m.feed_forward.w1, shard_placement_fn=placement_fn)
        fully_shard(m, shard_placement_fn=placement_fn)

    pcopt.set_strategy(model, "once_per_step", shard=shard)
    return model, pcopt.PCState(model)


def _step(mode, model, pc, xs, saved) -> float:
    """One optimizer step's forward/backward passes; returns the seconds spent in the PC map alone.

    ``linear``: the whole step. ``sharded``: ``after_backward`` + ``after_step``. ``per-micro-batch``: the
    map is inside every forward/backward, so :func:`_map_time` times it on its own.
    """

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    t0 = time.perf_counter()
    for i, x in enumerate(xs):
        if i == 0:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(x)
        else:
            out = model(x)
        out.pow(2).mean().backward()
    pc_time = time.perf_counter() - t0
    if mode == "sharded":
        t0 = time.perf_counter()
        pc.after_backward()
        pc.after_step()
        pc_time = time.perf_counter() - t0
    elif mode == "per-micro-batch":
        pcopt.refresh(model)
    for p in model.parameters():
        p.grad = None
    return pc_time


def _map_time(model, micro_batches: int) -> float:
    """Seconds of the per-micro-batch PC work: the map's forward and backward on the full fp32 weight (what
    FSDP2 hands the parametrization), once per micro-batch, plus one refresh."""
    from pcopt.power_iteration import sigma_estimate

    (_, layer), *_ = pcopt.preconditioners(model)
    full = layer.raw_weight.full_tensor().detach().requires_grad_(True)
    upstream = torch.randn(full.shape)
    t0 = time.perf_counter()
    for _ in range(micro_batches):
        sigma = sigma_estimate(full, layer.u, layer.v) + layer.eps
        eff = pcopt.apply_polynomial(full / sigma, layer.coefficients) * sigma.detach()
        eff.backward(upstream)
    pcopt.refresh(model)
    return time.perf_counter() - t0


def _measure(mode, shape, args, rank):
    model, pc = _build(mode, shape, args.degree)
    torch.manual_seed(100 + rank)
    # inputs that require grad, as inside a network: the Linear's backward computes dX too (6 m n T FLOPs)
    xs = [torch.randn(args.tokens, shape[1], requires_grad=True) for _ in range(args.micro_batches)]
    times, flops, comm, saved = [], 0, 0, 0
    for rep in range(args.repeat):
        saved_list: list[int] = []
        counter, sent = FlopCounterMode(display=False), _Bytes()
        dist.barrier()
        if rep == 0:
            with counter, sent:
                times.append(_step(mode, model, pc, xs, saved_list))
            flops, comm, saved = counter.get_total_flops(), sent.bytes, sum(saved_list)
        else:
            times.append(_step(mode, model, pc, xs, saved_list))
        if mode == "per-micro-batch":
            dist.barrier()
            times[-1] = _map_time(model, args.micro_batches)
        dist.barrier()
    del model, pc
    return {"time": statistics.median(times), "flops": flops, "comm": comm, "saved": saved}


def _formula(mode, shape, args, world):
    m, n = max(shape), min(shape)
    k = len(pcopt.polynomial(args.degree))
    T, M = args.tokens, args.micro_batches
    if mode == "per-micro-batch":
        return 2 * n / T + (k - 2) * n * n / (m * T)
    return 2 * n / (world * T * M) + 4 * (k - 2) * n * n / (3 * m * T * M)


def _worker(rank: int, world: int, args) -> None:
    rows = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        res = {mode: _measure(mode, shape, args, rank) for mode in MODES}
        base = res["linear"]
        for mode in MODES[1:]:
            r = res[mode]
            rows.append(
                (
                    name,
                    f"{shape[0]}x{shape[1]}",
                    mode,
                    (r["flops"] - base["flops"]) / 1e9,
                    (r["flops"] - base["flops"]) / base["flops"],
                    _formula(mode, shape, args, world),
                    (r["comm"] - base["comm"]) / 2**20,
                    base["comm"] / 2**20,
                    (r["saved"] - base["saved"]) / 2**20,
                    base["saved"] / 2**20,
                    r["time"],
                    r["time"] / base["time"],
                )
            )
        if rank == 0:
            print(f"# done {name}", flush=True)
    if rank == 0:
        print(
            f"\nPC cost per rank and optimizer step: {world} gloo ranks, T={args.tokens} tokens per "
            f"micro-batch per rank, M={args.micro_batches} micro-batches, degree {args.degree}, fp32, "
            f"{args.threads} thread(s) per rank. 'x linear' = PC cost / the plain Linear's fwd+bwd.\n"
        )
        print(
            "| shape | W (m x n) | mode | PC GFLOP | x linear (FLOPs) | formula | PC MiB sent | linear MiB "
            "sent | PC MiB saved fwd | linear MiB saved | PC map time s | x linear step (time) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.1f} | "
                f"{r[7]:.1f} | {r[8]:.1f} | {r[9]:.1f} | {r[10]:.2f} | {r[11]:.2f} |"
            )


def bf16_accuracy() -> None:
    """bf16 against fp32 compute dtype of the sharded map (one process): W_eff, dL/dW and dL/dgamma."""

    def run(dense, dtype, degree):
        lin = nn.Linear(dense.shape[1], dense.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(dense)
        model = nn.Module()
        model.feed_forward = nn.Module()
        model.feed_forward.w1 = lin
        pcopt.precondition_model(model, degree=degree)
        pcopt.set_strategy(model, compute_dtype=dtype)
        pc = pcopt.PCState(model)
        eff = lin.weight.detach().clone()
        lin.weight.grad = torch.randn(dense.shape, generator=torch.Generator().manual_seed(1))
        pc.after_backward()
        slot = lin.parametrizations.weight
        return eff, slot.original.grad.clone(), slot[0].gamma.grad.clone()

    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(96, 40, generator=g))
    V, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    cases = {
        "condition number 1e4, 96x40": U @ torch.diag(torch.logspace(0, -4, 40)) @ V.T,
        "N(0, 0.02) init, 2816x1024": torch.randn(2816, 1024, generator=g) * 0.02,
    }
    print("\nbf16 vs fp32 compute dtype, relative Frobenius error (random upstream gradient)\n")
    print("| matrix | degree | W_eff | dL/dW | dL/dgamma |\n|---|---|---|---|---|")
    for name, dense in cases.items():
        for degree in (5, 7, 9):
            ref = run(dense, torch.float32, degree)
            low = run(dense, torch.bfloat16, degree)
            errs = [float((a - b).norm() / b.norm()) for a, b in zip(low, ref)]
            print(f"| {name} | {degree} | {errs[0]:.1e} | {errs[1]:.1e} | {errs[2]:.1e} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pc_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="271m,1b,8b", help=f"comma-separated, from {sorted(SHAPES)}")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per micro-batch per rank (T)")
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per optimizer step (M)")
    p.add_argument("--degree", type=int, default=5, choices=(3, 5, 7, 9))
    p.add_argument("--repeat", type=int, default=2, help="timed steps per mode (the first also counts)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--bf16-accuracy", action="store_true", help="only print the bf16-vs-fp32 accuracy table")
    args = p.parse_args(argv)
    if args.bf16_accuracy:
        bf16_accuracy()
        return
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        p.error(f"unknown shapes {unknown}; expected a comma-separated subset of {sorted(SHAPES)}")
    run_on_ranks(_worker, args, world_size=args.world_size, threads=args.threads)


if __name__ == "__main__":
    main()
