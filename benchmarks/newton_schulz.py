"""Newton-Schulz throughput as a fraction of the same device's measured matmul throughput.

FLOPs counted per step on an ``(m, n)`` matrix with ``s = min(m, n)``, ``l = max(m, n)``: Gram ``2 s^2 l``,
``A^2`` ``2 s^3``, apply ``2 s^2 l`` (``pcopt.optim.newton_schulz_flops``). The reference is the best
``torch.mm`` throughput over large square matrices in the same dtype on the same device, measured in the
same run. Every Newton-Schulz run is bracketed by two runs of the reference matmul and compared with their mean;
the median over rounds is reported, so that load from other processes on a shared machine does not
favour either side.

    python benchmarks/newton_schulz.py                  # CPU in pcopt.hardware.preferred_dtype (and GPU bf16)
    python benchmarks/newton_schulz.py --dtype bf16     # CPU bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pcopt.hardware import describe, preferred_dtype
from pcopt.optim import newton_schulz, newton_schulz_flops
from pcopt.optim._newton_schulz import KELLER_COEFFICIENTS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (batch, rows, cols): Llama-271M (dim 1024, FFN 2816) and Llama-1B (dim 2048, FFN 5632) matrices.
CPU_SHAPES = [
    (1, 1024, 1024),
    (4, 1024, 1024),
    (1, 2816, 1024),
    (1, 1024, 2816),
    (1, 2048, 2048),
    (1, 5632, 2048),
]
GPU_SHAPES = CPU_SHAPES + [(16, 1024, 1024), (1, 4096, 4096), (1, 14336, 4096), (8, 4096, 4096)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_once(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def run(device: torch.device, dtype_name: str, shapes, mm_sizes, rounds: int) -> list[dict]:
    """Each Newton-Schulz run is bracketed by two runs of the reference matmul; the fraction of matmul
    throughput is taken per round against the mean of its two brackets, and the median over rounds is
    reported (robust to load from other processes, which hits both sides of a bracket alike). Returns one row
    per shape: ``shape``, ``ns_ms``, ``fraction`` of matmul throughput."""
    dtype = DTYPES[dtype_name]
    coefficients = (KELLER_COEFFICIENTS,) * 5
    mms = {}
    for n in mm_sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        mms[n] = lambda a=a, b=b: torch.mm(a, b)
    calib = {n: min(_time_once(fn, device) for _ in range(3)) for n, fn in mms.items()}
    n_ref = max(calib, key=lambda n: 2 * n**3 / calib[n])
    mm, mm_flops = mms[n_ref], 2 * n_ref**3
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"\n{device.type} {dtype_name}{threads}: reference torch.mm {n_ref}x{n_ref} (best of {list(mms)}); "
          f"{rounds} bracketed rounds per shape")  # fmt: skip
    rows = []
    print(f"{'batch x rows x cols':>22} {'NS ms':>9} {'NS GFLOP/s':>11} {'mm GFLOP/s':>11} {'of matmul':>10}")
    for b, m, k in shapes:
        G = torch.randn(b, m, k, device=device, dtype=torch.float32)
        flops = b * newton_schulz_flops((m, k), 5)
        newton_schulz(G, coefficients, dtype=dtype)  # warm-up
        fractions, ns_times, mm_times = [], [], []
        for _ in range(rounds):
            t_before = _time_once(mm, device)
            t_ns = _time_once(lambda G=G: newton_schulz(G, coefficients, dtype=dtype), device)
            t_after = _time_once(mm, device)
            t_mm = 0.5 * (t_before + t_after)
            fractions.append((flops / t_ns) / (mm_flops / t_mm))
            ns_times.append(t_ns)
            mm_times.append(min(t_before, t_after))
        fraction = statistics.median(fractions)
        print(f"{f'{b} x {m} x {k}':>22} {min(ns_times) * 1e3:9.1f} {flops / min(ns_times) / 1e9:11.1f} "
              f"{mm_flops / min(mm_times) / 1e9:11.1f} {fraction:10.1%}")  # fmt: skip
        rows.append({"shape": (b, m, k), "ns_ms": min(ns_times) * 1e3, "fraction": fraction})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="CPU dtype (default: pcopt.hardware.preferred_dtype, bf16 only where native)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="bracketed rounds per shape (median)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}; 5 Newton-Schulz steps, Keller coefficients; pcopt.hardware: {describe('cpu')}"
    )
    default = "bf16" if preferred_dtype("cpu") == torch.bfloat16 else "fp32"
    run(torch.device("cpu"), args.dtype or default, CPU_SHAPES, (1024, 2048), args.rounds)
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
        run(torch.device("cuda"), "bf16", GPU_SHAPES, (4096, 8192), max(args.rounds, 10))


if __name__ == "__main__":
    main()
