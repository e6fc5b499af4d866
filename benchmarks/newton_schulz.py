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
from pcopt.optim._newton_schulz import (
    GRAM_RESTART,
    KELLER_COEFFICIENTS,
    symmetric_product,
    symmetric_product_flops,
)

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


def run(
    device: torch.device,
    dtype_name: str,
    shapes,
    mm_sizes,
    rounds: int,
    algorithm: str = "standard",
    symmetric_blocks: int | None = 1,
) -> list[dict]:
    """Each Newton-Schulz run is bracketed by two runs of the reference matmul; the fraction of matmul
    throughput is taken per round against the mean of its two brackets, and the median over rounds is
    reported (robust to load from other processes, which hits both sides of a bracket alike). The FLOPs are
    those the variant runs (``algorithm``, ``symmetric_blocks``: ``newton_schulz_flops``). Returns one row
    per shape: ``shape``, ``ns_ms``, ``fraction`` of matmul throughput, ``flops``."""
    dtype = DTYPES[dtype_name]
    coefficients = (KELLER_COEFFICIENTS,) * 5
    restart = GRAM_RESTART if dtype.itemsize <= 2 else ()
    variant = dict(algorithm=algorithm, symmetric_blocks=symmetric_blocks)
    mms = {}
    for n in mm_sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        mms[n] = lambda a=a, b=b: torch.mm(a, b)
    calib = {n: min(_time_once(fn, device) for _ in range(3)) for n, fn in mms.items()}
    n_ref = max(calib, key=lambda n: 2 * n**3 / calib[n])
    mm, mm_flops = mms[n_ref], 2 * n_ref**3
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"\n{device.type} {dtype_name}{threads}, {algorithm} Newton-Schulz (symmetric_blocks={symmetric_blocks}): "
          f"reference torch.mm {n_ref}x{n_ref} (best of {list(mms)}); {rounds} bracketed rounds per shape")  # fmt: skip
    rows = []
    print(f"{'batch x rows x cols':>22} {'NS ms':>9} {'NS GFLOP/s':>11} {'mm GFLOP/s':>11} {'of matmul':>10}")
    for b, m, k in shapes:
        G = torch.randn(b, m, k, device=device, dtype=torch.float32)
        flops = b * newton_schulz_flops((m, k), 5, algorithm, restart, symmetric_blocks=symmetric_blocks)
        newton_schulz(G, coefficients, dtype=dtype, **variant)  # warm-up
        fractions, ns_times, mm_times = [], [], []
        for _ in range(rounds):
            t_before = _time_once(mm, device)
            t_ns = _time_once(lambda G=G: newton_schulz(G, coefficients, dtype=dtype, **variant), device)
            t_after = _time_once(mm, device)
            t_mm = 0.5 * (t_before + t_after)
            fractions.append((flops / t_ns) / (mm_flops / t_mm))
            ns_times.append(t_ns)
            mm_times.append(min(t_before, t_after))
        fraction = statistics.median(fractions)
        print(f"{f'{b} x {m} x {k}':>22} {min(ns_times) * 1e3:9.1f} {flops / min(ns_times) / 1e9:11.1f} "
              f"{mm_flops / min(mm_times) / 1e9:11.1f} {fraction:10.1%}")  # fmt: skip
        rows.append({"shape": (b, m, k), "ns_ms": min(ns_times) * 1e3, "fraction": fraction, "flops": flops})
    return rows


def symmetric_products(
    device: torch.device, dtype_name: str, sizes, rounds: int, blocks: int = 2
) -> list[dict]:
    """Time of one symmetric ``n x n`` product ``A A`` (``A`` symmetric, as ``A^2`` in a Newton-Schulz step)
    computed block-triangularly (``blocks`` block rows, the rest mirrored) against the full ``torch.bmm``,
    interleaved; median over rounds of the per-round ratio. FLOP ratio: ``(blocks + 1) / (2 blocks)``.
    Returns one row per size: ``n``, ``full_ms``, ``blocked_ms``, ``time_ratio``, ``flop_ratio``."""
    dtype = DTYPES[dtype_name]
    print(
        f"\n{device.type} {dtype_name}: symmetric n x n product, {blocks} x {blocks} block-triangular vs full"
    )
    print(f"{'n':>6} {'full ms':>9} {'blocked ms':>11} {'time ratio':>11} {'FLOP ratio':>11}")
    rows = []
    for n in sizes:
        X = torch.randn(1, n, 2 * n, device=device, dtype=dtype) / (2 * n) ** 0.5
        A = torch.bmm(X, X.mT)
        full, blocked = (lambda A=A: torch.bmm(A, A)), (lambda A=A: symmetric_product(A, A, blocks))
        full(), blocked()  # warm-up
        ratios, t_full, t_blocked = [], [], []
        for _ in range(rounds):
            a = _time_once(full, device)
            b = _time_once(blocked, device)
            c = _time_once(full, device)
            ratios.append(b / (0.5 * (a + c)))
            t_full.append(min(a, c))
            t_blocked.append(b)
        flop_ratio = symmetric_product_flops(n, n, blocks) / (2 * n**3)
        row = {"n": n, "full_ms": min(t_full) * 1e3, "blocked_ms": min(t_blocked) * 1e3,
               "time_ratio": statistics.median(ratios), "flop_ratio": flop_ratio}  # fmt: skip
        print(
            f"{n:6d} {row['full_ms']:9.2f} {row['blocked_ms']:11.2f} {row['time_ratio']:11.2f} {flop_ratio:11.2f}"
        )
        rows.append(row)
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
    parser.add_argument(
        "--symmetric",
        type=int,
        nargs="*",
        default=None,
        metavar="N",
        help="instead: time 2 x 2 block-triangular symmetric products against full ones at these sizes "
        "(the measurement behind pcopt.optim's SYMMETRIC_MIN_SIZE)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}; 5 Newton-Schulz steps, Keller coefficients; pcopt.hardware: {describe('cpu')}"
    )
    default = "bf16" if preferred_dtype("cpu") == torch.bfloat16 else "fp32"
    if args.symmetric is not None:
        sizes = args.symmetric or [128, 256, 384, 512, 1024, 2048]
        symmetric_products(torch.device("cpu"), args.dtype or default, sizes, max(args.rounds, 5))
        if torch.cuda.is_available():
            symmetric_products(torch.device("cuda"), "bf16", sizes + [4096, 8192], max(args.rounds, 10))
        return
    run(torch.device("cpu"), args.dtype or default, CPU_SHAPES, (1024, 2048), args.rounds)
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
        run(torch.device("cuda"), "bf16", GPU_SHAPES, (4096, 8192), max(args.rounds, 10))


if __name__ == "__main__":
    main()
