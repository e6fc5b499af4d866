"""Newton-Schulz throughput as a fraction of the same device's measured matmul throughput.

FLOPs counted per step on an ``(m, n)`` matrix with ``s = min(m, n)``, ``l = max(m, n)``: Gram ``2 s^2 l``,
``A^2`` ``2 s^3``, apply ``2 s^2 l`` (``pcopt.optim.newton_schulz_flops``). The reference is the best
``torch.mm`` throughput over large square matrices in the same dtype on the same device, measured in the
same run. Matmul and Newton-Schulz runs are interleaved round by round and the best time of each is kept, so
that load from other processes on a shared machine does not favour either side.

    python benchmarks/newton_schulz.py                  # CPU fp32 (and GPU bf16 when CUDA is available)
    python benchmarks/newton_schulz.py --dtype bf16     # CPU bf16
"""

from __future__ import annotations

import argparse
import time

import torch

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


def run(device: torch.device, dtype_name: str, shapes, mm_sizes, repeats: int) -> None:
    """Interleave matmul and Newton-Schulz timings round by round; keep the best time of each."""
    dtype = DTYPES[dtype_name]
    coefficients = (KELLER_COEFFICIENTS,) * 5
    jobs = {}
    for n in mm_sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        jobs[("mm", n)] = (lambda a=a, b=b: torch.mm(a, b), 2 * n**3)
    for bmk in shapes:
        G = torch.randn(*bmk, device=device, dtype=torch.float32)
        jobs[("ns", bmk)] = (
            lambda G=G: newton_schulz(G, coefficients, dtype=dtype),
            bmk[0] * newton_schulz_flops(bmk[1:], 5),
        )
    best = {key: float("inf") for key in jobs}
    for fn, _ in jobs.values():  # warm-up
        fn()
    for _ in range(repeats):
        for key, (fn, _) in jobs.items():
            best[key] = min(best[key], _time_once(fn, device))
    rate = {key: jobs[key][1] / best[key] for key in jobs}
    peak_key = max((k for k in jobs if k[0] == "mm"), key=lambda k: rate[k])
    peak = rate[peak_key]
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"\n{device.type} {dtype_name}{threads}: matmul {peak / 1e9:.1f} GFLOP/s (best torch.mm, "
          f"{peak_key[1]}x{peak_key[1]}); best of {repeats} interleaved rounds")  # fmt: skip
    print(f"{'batch x rows x cols':>22} {'ms':>9} {'GFLOP/s':>9} {'of matmul':>10}")
    for key in jobs:
        if key[0] == "ns":
            b, m, k = key[1]
            print(
                f"{f'{b} x {m} x {k}':>22} {best[key] * 1e3:9.1f} {rate[key] / 1e9:9.1f} {rate[key] / peak:10.1%}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="CPU dtype (default fp32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}; 5 Newton-Schulz steps, Keller coefficients")
    run(torch.device("cpu"), args.dtype or "fp32", CPU_SHAPES, (1024, 2048, 4096), args.repeats)
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
        run(torch.device("cuda"), "bf16", GPU_SHAPES, (4096, 8192), max(args.repeats, 10))


if __name__ == "__main__":
    main()
