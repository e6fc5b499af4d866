"""Muon optimizer-step time: pcopt.optim.Muon vs torch.optim.Muon, single process and 2-rank gloo FSDP2.

The parameter set is the hidden matrices of the Llama-271M model of the PC-layer paper (dim 1024, FFN 2816,
16 layers: wq, wk, wv, wo, w1, w2, w3 per layer), scaled down to fit a CPU: a sweep over the width (default
dims 128, 256, 512 with FFN 2.75 x dim, 4 layers). Both optimizers get the same gradients and settings (bf16 Newton-Schulz, 5 Keller steps).

* single process: both optimizers on plain tensors (pcopt batches same-shaped matrices);
* FSDP2, 2 gloo ranks (1 thread each): ``fully_shard`` per matrix, both optimizers on the same DTensor
  shards. torch's Muon runs through implicit DTensor dispatch; pcopt gathers each matrix to one owner rank,
  orthogonalizes it there and scatters the rows back. An explicit-gather baseline (every rank all-gathers
  every matrix and orthogonalizes all of them) is timed too, for context.

Steps are interleaved (A, B, A, B, ...) so that load from other processes hits both alike; the median step
time is reported, and ratios are computed from numbers measured in this one run.

    python benchmarks/muon_step.py                                  # both parts, dims 128 256 512
    python benchmarks/muon_step.py --part fsdp --dims 1024 --steps 3
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pcopt.hardware import describe
from pcopt.optim import Muon


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


def single_process(shapes, steps: int, kwargs: dict) -> dict[str, float]:
    torch.manual_seed(0)
    a = Matrices(shapes)
    b = copy.deepcopy(a)
    gen = torch.Generator().manual_seed(1)
    for pa, pb in zip(a.parameters(), b.parameters()):
        g = torch.randn(pa.shape, generator=gen)
        pa.grad, pb.grad = g, g.clone()
    ours, theirs = Muon(a.parameters(), **kwargs), torch.optim.Muon(b.parameters(), **kwargs)
    return _interleaved({"pcopt": ours.step, "torch": theirs.step}, steps)


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


def _fsdp_worker(rank: int, world_size: int, port: int, shapes, steps: int, kwargs: dict, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
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

        t = _interleaved(
            {"pcopt": ours.step, "torch": theirs.step, "gather": gather}, steps, sync=dist.barrier
        )
        t_all = torch.tensor([t["pcopt"], t["torch"], t["gather"]], dtype=torch.float64)
        dist.all_reduce(t_all, op=dist.ReduceOp.MAX)  # a step is as slow as its slowest rank
        if rank == 0:
            out.put(
                {
                    "pcopt": t_all[0].item(),
                    "torch": t_all[1].item(),
                    "gather": t_all[2].item(),
                    "diffs": diffs,
                }
            )
    finally:
        dist.destroy_process_group()


def fsdp(shapes, steps: int, kwargs: dict, world_size: int = 2) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_fsdp_worker, args=(world_size, port, shapes, steps, kwargs, out), nprocs=world_size,
                       start_method="spawn")  # fmt: skip
    return out.get()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 256, 512],
                        help="model widths to sweep; FFN = 2.75 x dim as in Llama-271M (1024 -> 2816)")  # fmt: skip
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per optimizer (median reported)")
    parser.add_argument("--part", choices=["all", "single", "fsdp"], default="all")
    args = parser.parse_args()
    kwargs = {"lr": 0.02, "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw"}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (single process), 1 thread per rank "
          f"(FSDP2); {args.layers} layers x (wq, wk, wv, wo, w1, w2, w3); median of {args.steps} interleaved steps")  # fmt: skip
    print(f"Newton-Schulz in bf16 for both (torch.optim.Muon's default); pcopt.hardware: {describe('cpu')}")
    rows = []
    for dim in args.dims:
        hidden = dim * 11 // 4
        shapes = matrix_shapes(dim, hidden, args.layers)
        n = sum(m * k for m, k in shapes) / 1e6
        row = {"dim": dim, "hidden": hidden, "params": n}
        if args.part in ("all", "single"):
            t = single_process(shapes, args.steps, kwargs)
            row.update(single_pcopt=t["pcopt"], single_torch=t["torch"])
        if args.part in ("all", "fsdp"):
            t = fsdp(shapes, args.steps, kwargs)
            row.update(
                fsdp_pcopt=t["pcopt"], fsdp_torch=t["torch"], fsdp_gather=t["gather"], diffs=t["diffs"]
            )
        rows.append(row)
        _print_row(row)
    print()
    print("| dim / FFN | params | single: pcopt | torch | speed-up | FSDP2 2 ranks: pcopt | torch on shards | "
          "speed-up | all-gather baseline | max diff pcopt / torch |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
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
                      f"{r['diffs']['pcopt']:.2g} / {r['diffs']['torch']:.2g}"]  # fmt: skip
        else:
            cells += ["-"] * 5
        print("| " + " | ".join(cells) + " |")


def _print_row(r: dict) -> None:
    head = f"dim {r['dim']:5d} FFN {r['hidden']:5d} ({r['params']:.1f}M)"
    if "single_pcopt" in r:
        print(f"{head} single : pcopt {r['single_pcopt'] * 1e3:8.1f} ms  torch.optim.Muon "
              f"{r['single_torch'] * 1e3:8.1f} ms  speed-up x{r['single_torch'] / r['single_pcopt']:.2f}")  # fmt: skip
    if "fsdp_pcopt" in r:
        print(f"{head} FSDP2  : pcopt {r['fsdp_pcopt'] * 1e3:8.1f} ms  torch.optim.Muon on shards "
              f"{r['fsdp_torch'] * 1e3:8.1f} ms  speed-up x{r['fsdp_torch'] / r['fsdp_pcopt']:.2f}; all-gather "
              f"baseline {r['fsdp_gather'] * 1e3:.1f} ms; max |W - W_unsharded| after one step: pcopt "
              f"{r['diffs']['pcopt']:.3g}, torch on shards {r['diffs']['torch']:.3g}")  # fmt: skip


if __name__ == "__main__":
    main()
