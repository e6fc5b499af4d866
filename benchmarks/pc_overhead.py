"""Training-step overhead of the PC layer on the CPU, with gradient accumulation 1 and 4.

    python -m benchmarks.pc_overhead [--optimizer adamw|muon] [--accum 1,4] [--steps 12] [--dtype fp32|bf16]
        [--poly] [--out DIR]

One process builds three copies of the same torchtitan Llama (``benchmarks/_common.py``; the
token-efficiency model by default): without PC, with PC recomputing ``W_eff`` in every micro-batch, and
with PC under :meth:`pcopt.PCState.accumulate` (one ``W_eff`` and one backward through the PC map
per optimizer step). A step is forward + backward of every micro-batch + gradient clipping + optimizer
step + power-iteration refresh. The variants are timed round-robin, step by step (the start rotates), so
load from other processes hits them alike; the medians and their ratios to the no-PC step are reported.

``--poly`` adds a micro-benchmark of the polynomial itself (forward + backward) on the model's matrix
shapes: ``pcopt.apply_polynomial`` (Horner on the smaller Gram matrix, each step one fused ``addmm`` /
``baddbmm``) against the same Horner with a plain matmul and an in-place diagonal shift, in fp32 and bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import pcopt
from benchmarks import _common as C
from pcopt.hardware import describe

VARIANTS = ("no_pc", "pc", "pc_once")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pc_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--optimizer", default="adamw", choices=("adamw", "muon"), help="PC degree 9 (adamw) / 5 (muon)"
    )
    p.add_argument("--accum", default="1,4", help="comma-separated gradient-accumulation factors")
    p.add_argument("--steps", type=int, default=12, help="timed steps per variant and accumulation factor")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=6)
    p.add_argument("--ffn-multiple-of", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument(
        "--dtype",
        default=C.default_dtype(),
        choices=("bf16", "fp32"),
        help="autocast dtype of the matmuls (default: bf16 where the CPU has native bf16, else fp32)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--poly", action="store_true", help="also time polynomial evaluation variants")
    p.add_argument("--poly-reps", type=int, default=30)
    p.add_argument(
        "--poly-extra-shapes",
        default="512x1536",
        help="matrix shapes timed besides the model's (comma-separated MxN, may be empty)",
    )
    p.add_argument(
        "--component-reps", type=int, default=10, help="repetitions of the refresh / PC-map timing"
    )
    p.add_argument("--out", default="outputs/pc_overhead", help="directory for results.json")
    args = p.parse_args(argv)
    try:
        args.accum = [int(a) for a in args.accum.split(",") if a.strip()]
    except ValueError:
        p.error(f"--accum expects comma-separated integers, got {args.accum!r}")
    if not args.accum or min(args.accum) < 1:
        p.error(f"--accum factors must be >= 1, got {args.accum}")
    try:
        args.poly_extra_shapes = [
            tuple(int(d) for d in item.lower().split("x"))
            for item in args.poly_extra_shapes.split(",")
            if item
        ]
    except ValueError:
        p.error(f"--poly-extra-shapes expects comma-separated MxN shapes, got {args.poly_extra_shapes!r}")
    if any(len(s) != 2 for s in args.poly_extra_shapes):
        p.error(f"--poly-extra-shapes expects 2-D shapes MxN, got {args.poly_extra_shapes}")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    return args


class _Arm:
    def __init__(self, variant: str, args, size: C.ModelSize) -> None:
        self.variant = variant
        self.model = C.build_llama(args.vocab_size, size, seed=0)
        self.pc = variant != "no_pc"
        if self.pc:
            C.precondition(self.model, args.optimizer)
        self.opts, self.self_refresh = C.build_optimizers(self.model, args.optimizer, lr=1e-3)
        self.dtype = args.dtype
        self.times: list[float] = []

    def step(self, micro_batches: list[torch.Tensor]) -> float:
        t0 = time.perf_counter()
        with C.autocast(self.dtype):
            ctx = (
                pcopt.PCState(self.model).accumulate()
                if self.variant == "pc_once"
                else contextlib.nullcontext()
            )
            with ctx:
                for mb in micro_batches:
                    (C.lm_loss(self.model, mb) / len(micro_batches)).backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        for o in self.opts:
            o.step()
        if self.pc and not self.self_refresh:
            pcopt.refresh(self.model)
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def time_steps(args, size: C.ModelSize, accum: int) -> dict:
    arms = [_Arm(v, args, size) for v in VARIANTS]
    gen = torch.Generator().manual_seed(0)

    def batches():
        return [
            torch.randint(0, args.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen)
            for _ in range(accum)
        ]

    for _ in range(args.warmup):
        mbs = batches()
        for arm in arms:
            arm.step(mbs)
    for i in C.progress(range(args.steps), args.steps, f"accum {accum}"):
        mbs = batches()
        order = arms[i % len(arms) :] + arms[: i % len(arms)]
        for arm in order:
            arm.times.append(arm.step(mbs))
    med = {a.variant: _median(a.times) for a in arms}
    res = {
        "accum": accum,
        "tokens_per_step": accum * args.micro_batch * args.seq_len,
        "median_s": med,
        "min_s": {a.variant: min(a.times) for a in arms},
        "ratio_pc": med["pc"] / med["no_pc"],
        "ratio_pc_once": med["pc_once"] / med["no_pc"],
        # Paired per-step ratios (same micro-batches, adjacent in time): robust to slow drifts in load.
        "ratio_pc_paired_median": _median([p / b for p, b in zip(arms[1].times, arms[0].times)]),
        "ratio_pc_once_paired_median": _median([p / b for p, b in zip(arms[2].times, arms[0].times)]),
    }
    res["components"] = pc_components(arms[1].model, args.dtype, args.component_reps)
    return res


def pc_components(model: nn.Module, dtype: str, reps: int = 10) -> dict:
    """Median time of one refresh and of one PC-map forward + backward for all PC weights."""
    pcs = [pc for _, pc in pcopt.preconditioners(model)]
    t_refresh, t_map = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        pcopt.refresh(model)
        t_refresh.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with C.autocast(dtype):
            effs = [pc(pc.raw_weight) for pc in pcs]
            torch.autograd.backward(effs, [torch.ones_like(e) for e in effs])
        t_map.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return {"refresh_s": _median(t_refresh), "pc_map_fwd_bwd_s": _median(t_map), "pc_weights": len(pcs)}


# ----------------------------------------------------------------------------------------------------
# Polynomial evaluation variants
# ----------------------------------------------------------------------------------------------------
def apply_polynomial_inplace(X: torch.Tensor, coefficients) -> torch.Tensor:
    """Horner with a plain matmul per step and an in-place diagonal shift (no identity matrix).

    The alternative to ``pcopt.apply_polynomial``, which fuses each step into one ``addmm`` / ``baddbmm``
    ``a I + G Q``. Same polynomial, same Gram matrix of the smaller side.
    """
    coefficients = tuple(coefficients)
    if len(coefficients) == 1:
        return X * coefficients[0]
    tall = X.shape[-2] >= X.shape[-1]
    gram = X.mT @ X if tall else X @ X.mT
    q = gram * coefficients[-1]
    q.diagonal(dim1=-2, dim2=-1).add_(coefficients[-2])
    for a in reversed(coefficients[:-2]):
        q = gram @ q
        q.diagonal(dim1=-2, dim2=-1).add_(a)
    return X @ q if tall else q @ X


def time_polynomials(shapes, degree: int, reps: int) -> list[dict]:
    coeffs = pcopt.polynomial(degree)
    rows = []
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            X0 = (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(dtype)
            upstream = torch.randn(*shape, generator=g).to(dtype)
            res = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "degree": degree}
            variants = {"inplace_diag": apply_polynomial_inplace, "addmm": pcopt.apply_polynomial}
            outs, times = {}, {name: [] for name in variants}
            for i in range(reps + 2):  # variants alternate, so load changes hit both alike
                for name, fn in variants.items():
                    X = X0.clone().requires_grad_(True)
                    t0 = time.perf_counter()
                    Y = fn(X, coeffs)
                    Y.backward(upstream)
                    if i >= 2:
                        times[name].append(time.perf_counter() - t0)
                    outs[name] = (Y.detach().double(), X.grad.double())
            for name, ts in times.items():
                res[f"{name}_ms"] = 1e3 * _median(ts)
            ref_y, ref_g = outs["inplace_diag"]
            res["max_rel_diff_fwd"] = float((outs["addmm"][0] - ref_y).abs().max() / ref_y.abs().max())
            res["max_rel_diff_grad"] = float((outs["addmm"][1] - ref_g).abs().max() / ref_g.abs().max())
            res["addmm_speedup"] = res["inplace_diag_ms"] / res["addmm_ms"]
            rows.append(res)
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = C.ModelSize(args.dim, args.n_layers, args.n_heads, args.ffn_multiple_of, args.seq_len)
    probe = C.build_llama(args.vocab_size, size, seed=0)
    n_params = C.count_params(probe)
    matrix_shapes = sorted(
        {
            tuple(m.weight.shape)
            for fqn, m in probe.named_modules()
            if fqn.endswith(("attention.wo", "w1", "w2"))
        }
    )
    del probe
    print(
        f"[pc_overhead] model {n_params / 1e6:.2f}M params, micro-batch {args.micro_batch}x{args.seq_len}, "
        f"{args.optimizer} (PC degree {C.PC_DEGREE[args.optimizer]}), {args.dtype}, "
        f"{torch.get_num_threads()} threads; pcopt.hardware: {describe('cpu')}",
        flush=True,
    )
    results = {
        "command": "python -m benchmarks.pc_overhead " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": C.machine_info(),
        "model": {**vars(size), "vocab_size": args.vocab_size, "params": n_params},
        "optimizer": args.optimizer,
        "pc_degree": C.PC_DEGREE[args.optimizer],
        "dtype": args.dtype,
        "dtype_choice": describe("cpu"),
        "micro_batch": args.micro_batch,
        "steps": args.steps,
        "accum": [],
    }
    for accum in args.accum:
        r = time_steps(args, size, accum)
        results["accum"].append(r)
        m = r["median_s"]
        print(
            f"[pc_overhead] accum {accum}: step no PC {m['no_pc'] * 1e3:.0f} ms | PC {m['pc'] * 1e3:.0f} ms "
            f"(x{r['ratio_pc']:.3f}, paired x{r['ratio_pc_paired_median']:.3f}) | PC once/step "
            f"{m['pc_once'] * 1e3:.0f} ms (x{r['ratio_pc_once']:.3f}, paired x{r['ratio_pc_once_paired_median']:.3f}) "
            f"| refresh {r['components']['refresh_s'] * 1e3:.1f} ms, PC map fwd+bwd "
            f"{r['components']['pc_map_fwd_bwd_s'] * 1e3:.1f} ms",
            flush=True,
        )
    if args.poly:
        shapes = matrix_shapes + [s for s in args.poly_extra_shapes if s not in matrix_shapes]
        results["polynomial"] = time_polynomials(shapes, C.PC_DEGREE[args.optimizer], args.poly_reps)
        for row in results["polynomial"]:
            print(
                f"[pc_overhead] poly {tuple(row['shape'])} {row['dtype']}: in-place diag {row['inplace_diag_ms']:.2f} ms, "
                f"addmm {row['addmm_ms']:.2f} ms (x{row['addmm_speedup']:.2f} faster), "
                f"rel diff fwd {row['max_rel_diff_fwd']:.1e} grad {row['max_rel_diff_grad']:.1e}",
                flush=True,
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"results_{args.optimizer}_{args.dtype}.json"
    (out / name).write_text(json.dumps(results, indent=1))
    print(f"[pc_overhead] wrote {out / name}", flush=True)
    return results


if __name__ == "__main__":
    main()
