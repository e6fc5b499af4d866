"""Throughput of PC + Muon vs stock AdamW on the same machine, measured back to back in one invocation.

Usage (2 CPU ranks; any torchtitan flags after ``--`` go to both runs)::

    python -m torchtitan_ext.benchmark --nproc 2 --steps 20
    python -m torchtitan_ext.benchmark --candidates debug_muon_pc debug_muon debug_adamw_pc -- --training.seq_len 512

Prints the median per-rank tokens/s torchtitan logs for each run (steps after the warm-up ones) and
the ratio of each candidate to the baseline.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_STEP = re.compile(r"step:\s*(\d+)\s+loss:\s*(\S+).*?tps:\s*([\d,]+)")


def run(
    config: str, nproc: int, steps: int, extra: list[str], dump: Path
) -> tuple[dict[int, float], dict[int, float]]:
    """Run ``config`` with torchrun; return (tokens/s per step, loss per step) as logged by rank 0."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "--local-ranks-filter", "0", "-m", "torchtitan_ext.train", "--module", "torchtitan_ext",
        "--config", config, "--dump_folder", str(dump), "--training.steps", str(steps),
        "--metrics.disable_color_printing", "--debug.seed", "42", *extra,
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"{config} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
    tps, loss = {}, {}
    for m in _STEP.finditer(proc.stdout):
        tps[int(m.group(1))] = float(m.group(3).replace(",", ""))
        loss[int(m.group(1))] = float(m.group(2))
    return tps, loss


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default="debug_adamw")
    p.add_argument("--candidates", nargs="+", default=["debug_muon_pc"])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="leading steps left out of the median")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}).")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in (args.baseline, *args.candidates):
            tps, loss = run(config, args.nproc, args.steps, extra, Path(tmp) / config)
            steady = [v for s, v in tps.items() if s > args.warmup]
            results[config] = statistics.median(steady)
            print(
                f"{config:>16}: {results[config]:8.1f} tokens/s/rank (median of steps {args.warmup + 1}-{args.steps}), "
                f"loss {loss[1]:.3f} -> {loss[args.steps]:.3f}"
            )
    for config in args.candidates:
        print(f"ratio {config} / {args.baseline}: {results[config] / results[args.baseline]:.3f}")


if __name__ == "__main__":
    main()
