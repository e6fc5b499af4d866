"""Throughput of candidate configs relative to a baseline: the median of interleaved, paired repeats.

Usage (torchtitan flags after ``--`` go to every run)::

    python -m torchtitan_ext.benchmark --baseline debug_muon --candidates debug_muon_pc \
        --repeats 5 --steps 12 --warmup 3 --accumulation 4 --nproc 2
    python -m torchtitan_ext.benchmark --baseline debug_adamw --candidates debug_muon_pc debug_adamw_pc \
        --repeats 3 -- --training.seq_len 512

Config names are opaque: any ``--config`` of ``--module`` (default ``torchtitan_ext``) works.

What is run. ``--repeats`` rounds; round ``r`` launches every arm (the baseline and each candidate) once, as a
2-rank (``--nproc``) ``torchrun`` of ``torchtitan_ext.train`` for ``--steps`` steps, seed 42, in an order that
rotates by one arm per round (baseline, C1, C2; then C1, C2, baseline; then C2, baseline, C1; ...).
``--accumulation N`` sets torchtitan's gradient accumulation through ``--training.global_batch_size``
(``local_batch_size x data-parallel degree x N``, the local batch size read from the resolved config of each
arm); every run's log is checked to report N accumulation steps.

What the numbers mean.

* A run's throughput is the median over its steps after ``--warmup`` of the tokens/s per rank that torchtitan
  logs on rank 0 (tokens of all micro-batches of a step / the step's wall time).
* ``tokens/s/rank`` in the table is the median over the rounds of an arm's run throughputs.
* A candidate's ratio in round ``r`` is ``tps(candidate, r) / tps(baseline, r)``: the two runs are paired
  within the round. The table gives the median of these ratios over the rounds, their min-max, their
  interquartile range (quartiles with linear interpolation, ``statistics.quantiles(method="inclusive")``,
  from 4 repeats on) and every round's ratio. A ratio below 1 means the candidate is slower.
* ``loss step 1`` is the median over the rounds of the step-1 loss (the same seeded draw every round); the
  benchmark stops if any run's step-1 loss is not finite.

Why interleaved medians. On a shared machine the load of other jobs drifts over minutes, and one run of each
arm lets that drift decide the ratio (the same command gave 0.74 and 0.93 for the Llama-2 debug model).
Interleaving puts the arms of one round next to each other in time, so a slow phase of the machine slows
both sides of a ratio; rotating the order stops any arm from always going first (cold caches, page cache) or
last; the median of the paired ratios ignores a round that one burst of load spoiled; and the min-max / IQR
say how far to trust the median. :func:`summarize` and :func:`schedule` are pure and tested on synthetic
numbers (``tests/torchtitan/test_benchmark_smoke.py``); :func:`run` launches one run and can be reused.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_STEP = re.compile(r"step:\s*(\d+)\s+loss:\s*(\S+).*?tps:\s*([\d,]+)")
_ACCUMULATION = re.compile(r"gradient accumulation steps (\d+)")
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]

__all__ = [
    "Row",
    "accumulation_flags",
    "format_table",
    "main",
    "rotation",
    "run",
    "schedule",
    "steady_tps",
    "summarize",
]


def _has_flag(args: Sequence[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in args)


def run(
    config: str,
    nproc: int,
    steps: int,
    extra: Sequence[str],
    dump: Path,
    *,
    module: str = "torchtitan_ext",
    expect_accumulation: int | None = None,
    timeout: float | None = None,
) -> tuple[dict[int, float], dict[int, float]]:
    """Run ``config`` with torchrun; return (tokens/s per step, loss per step) as logged by rank 0.

    ``extra`` are torchtitan flags. Step lines are logged every step (``--metrics.log_freq 1``) unless
    ``extra`` sets the frequency. With ``expect_accumulation`` the log must report that many gradient
    accumulation steps. Raises RuntimeError on a non-zero exit, a timeout or a mismatch.
    """
    log_freq = [] if _has_flag(extra, "--metrics.log_freq") else ["--metrics.log_freq", "1"]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "--local-ranks-filter", "0", "-m", "torchtitan_ext.train", "--module", module,
        "--config", config, "--dump_folder", str(dump), "--training.steps", str(steps),
        "--metrics.disable_color_printing", "--debug.seed", "42", *log_freq, *extra,
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    dump.parent.mkdir(parents=True, exist_ok=True)
    from torchtitan_ext.processes import run_captured

    returncode, out = run_captured(cmd, cwd=dump.parent, env=env, timeout=timeout)
    if returncode is None:
        raise RuntimeError(f"{config} timed out after {timeout}s:\n{out[-4000:]}")
    if returncode != 0:
        raise RuntimeError(f"{config} failed (exit {returncode}):\n{out[-4000:]}")
    if expect_accumulation is not None:
        found = sorted({int(m) for m in _ACCUMULATION.findall(out)})
        if found != [expect_accumulation]:
            raise RuntimeError(
                f"{config}: expected {expect_accumulation} gradient accumulation steps, the log says {found}"
            )
    tps, loss = {}, {}
    for m in _STEP.finditer(out):
        tps[int(m.group(1))] = float(m.group(3).replace(",", ""))
        loss[int(m.group(1))] = float(m.group(2))
    return tps, loss


def steady_tps(tps: Mapping[int, float], warmup: int) -> float:
    """Median tokens/s over the logged steps after the first ``warmup`` ones."""
    steady = [v for s, v in tps.items() if s > warmup]
    if not steady:
        raise ValueError(f"no step after the {warmup} warm-up steps was logged (steps logged: {sorted(tps)})")
    return statistics.median(steady)


def rotation(arms: Sequence[str], r: int) -> list[str]:
    """The order of round ``r``: ``arms`` rotated left by ``r`` (r=0: B, C1, C2; r=1: C1, C2, B; ...)."""
    k = r % len(arms)
    return [*arms[k:], *arms[:k]]


def schedule(arms: Sequence[str], repeats: int) -> list[list[str]]:
    """The launch order of every round."""
    return [rotation(arms, r) for r in range(repeats)]


@dataclass(frozen=True)
class Row:
    """One arm of the table. ``ratios[r]`` = tps(arm, r) / tps(baseline, r); all 1 for the baseline."""

    arm: str
    baseline: bool
    tps: tuple[float, ...]  # per round
    tps_median: float
    ratios: tuple[float, ...]
    ratio_median: float
    ratio_min: float
    ratio_max: float
    ratio_iqr: tuple[float, float] | None  # (Q1, Q3), from 4 rounds on
    loss1: float | None = None  # median step-1 loss over the rounds


def summarize(
    tps_by_arm_by_repeat: Mapping[str, Sequence[float]],
    baseline: str,
    loss1_by_arm_by_repeat: Mapping[str, Sequence[float]] | None = None,
) -> list[Row]:
    """Rows (baseline first, then the other arms in their order) from every arm's throughput per round.

    Every arm needs one positive throughput per round. Quartiles use linear interpolation between order
    statistics (``statistics.quantiles(..., n=4, method="inclusive")``, numpy's default).
    """
    if baseline not in tps_by_arm_by_repeat:
        raise ValueError(f"baseline {baseline!r} has no throughputs")
    base = list(tps_by_arm_by_repeat[baseline])
    n = len(base)
    if n == 0:
        raise ValueError("no rounds")
    arms = [baseline, *(a for a in tps_by_arm_by_repeat if a != baseline)]
    rows = []
    for arm in arms:
        tps = tuple(float(v) for v in tps_by_arm_by_repeat[arm])
        if len(tps) != n:
            raise ValueError(f"{arm} has {len(tps)} rounds, the baseline {n}")
        if not all(math.isfinite(v) and v > 0 for v in (*tps, *base)):
            raise ValueError(f"throughputs must be positive and finite: {arm} {tps}, baseline {base}")
        ratios = tuple(t / b for t, b in zip(tps, base))
        iqr = None
        if n >= 4:
            q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
            iqr = (q1, q3)
        loss1 = None
        if loss1_by_arm_by_repeat is not None and loss1_by_arm_by_repeat.get(arm):
            loss1 = statistics.median(loss1_by_arm_by_repeat[arm])
        rows.append(
            Row(
                arm=arm,
                baseline=arm == baseline,
                tps=tps,
                tps_median=statistics.median(tps),
                ratios=ratios,
                ratio_median=statistics.median(ratios),
                ratio_min=min(ratios),
                ratio_max=max(ratios),
                ratio_iqr=iqr,
                loss1=loss1,
            )
        )
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table."""
    base = next(r.arm for r in rows if r.baseline)
    lines = [
        f"| run | tokens/s/rank (median) | ratio to `{base}` (median) | min-max | IQR | per-round ratios "
        "| loss step 1 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        loss = "-" if r.loss1 is None else f"{r.loss1:.4f}"
        if r.baseline:
            lines.append(f"| `{r.arm}` (baseline) | {r.tps_median:.1f} | 1 | - | - | - | {loss} |")
            continue
        iqr = "-" if r.ratio_iqr is None else f"{r.ratio_iqr[0]:.3f}-{r.ratio_iqr[1]:.3f}"
        per_round = ", ".join(f"{x:.3f}" for x in r.ratios)
        lines.append(
            f"| `{r.arm}` | {r.tps_median:.1f} | **{r.ratio_median:.3f}** | {r.ratio_min:.3f}-{r.ratio_max:.3f} "
            f"| {iqr} | {per_round} | {loss} |"
        )
    return "\n".join(lines)


def _batch_degree(parallelism, nproc: int) -> int:
    """torchtitan's data-parallel (batch) degree: dp_replicate x dp_shard, dp_shard=-1 taking what is left."""
    dp_replicate = parallelism.data_parallel_replicate_degree
    dp_shard = parallelism.data_parallel_shard_degree
    if dp_shard < 0:
        others = (
            dp_replicate
            * parallelism.context_parallel_degree
            * parallelism.tensor_parallel_degree
            * parallelism.pipeline_parallel_degree
        )
        dp_shard = nproc // others
    return dp_replicate * dp_shard


def accumulation_flags(
    module: str, configs: Sequence[str], nproc: int, extra: Sequence[str], accumulation: int | None
) -> dict[str, tuple[list[str], int]]:
    """Per config: (flags that set its gradient accumulation, the accumulation torchtitan will report).

    Resolves each config with torchtitan's ``ConfigManager`` (``extra`` applied) for its local batch size
    and parallel degrees. With ``--training.global_batch_size`` in ``extra`` that flag is kept and
    ``accumulation`` must be None; otherwise ``accumulation`` (None: 1) sets the global batch size.
    """
    from torchtitan.config.manager import ConfigManager

    user_global = _has_flag(extra, "--training.global_batch_size")
    if user_global and accumulation is not None:
        raise ValueError("give --accumulation or --training.global_batch_size, not both")
    out = {}
    for config in dict.fromkeys(configs):
        resolved = ConfigManager().parse_args(["--module", module, "--config", config, *extra])
        local = resolved.training.local_batch_size
        micro = local * _batch_degree(resolved.parallelism, nproc)
        if user_global:
            if resolved.training.global_batch_size % micro:
                raise ValueError(
                    f"{config}: global batch {resolved.training.global_batch_size} % {micro} != 0"
                )
            out[config] = ([], resolved.training.global_batch_size // micro)
        else:
            n = 1 if accumulation is None else accumulation
            out[config] = (["--training.global_batch_size", str(micro * n)], n)
    return out


def _machine() -> str:
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{model}, {os.cpu_count()} CPUs, ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{cuda}, torch {torch.__version__}"
    )


def main(argv: list[str] | None = None) -> list[Row]:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--baseline", default="debug_adamw")
    p.add_argument("--candidates", nargs="+", default=["debug_muon_pc"])
    p.add_argument("--module", default="torchtitan_ext", help="torchtitan --module of every config")
    p.add_argument("--repeats", type=int, default=5, help="rounds of interleaved runs (every arm once each)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="leading steps left out of a run's median")
    p.add_argument(
        "--accumulation",
        type=int,
        default=None,
        help="gradient accumulation steps (default 1); sets --training.global_batch_size",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}).")
    if args.repeats < 1 or (args.accumulation is not None and args.accumulation < 1):
        p.error("--repeats and --accumulation must be at least 1")
    arms = list(dict.fromkeys([args.baseline, *args.candidates]))
    if len(arms) < 2:
        p.error("give at least one candidate other than the baseline")

    try:
        flags = accumulation_flags(args.module, arms, args.nproc, extra, args.accumulation)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    order = schedule(arms, args.repeats)
    print(f"machine: {_machine()}", flush=True)
    print(
        f"{args.repeats} rounds x {len(arms)} arms, {args.nproc} ranks, {args.steps} steps (median of steps "
        f"{args.warmup + 1}-{args.steps}), gradient accumulation "
        + ", ".join(f"{a} {flags[a][1]}" for a in arms)
        + (f", torchtitan flags {' '.join(extra)}" if extra else ""),
        flush=True,
    )
    tps = {a: [0.0] * args.repeats for a in arms}
    loss1 = {a: [0.0] * args.repeats for a in arms}
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for r, arms_r in enumerate(order):
            for config in arms_r:
                t0 = time.monotonic()
                dump = Path(tmp) / f"r{r}_{config}"
                try:
                    step_tps, loss = run(
                        config, args.nproc, args.steps, [*extra, *flags[config][0]], dump,
                        module=args.module, expect_accumulation=flags[config][1], timeout=args.timeout,
                    )  # fmt: skip
                    tps[config][r] = steady_tps(step_tps, args.warmup)
                except (RuntimeError, ValueError) as e:
                    raise SystemExit(f"round {r}, {config}: {e}") from None
                if 1 not in loss or not math.isfinite(loss[1]):
                    raise SystemExit(f"round {r}, {config}: step-1 loss is {loss.get(1, 'missing')}")
                loss1[config][r] = loss[1]
                print(
                    f"round {r} {config:>24}: {tps[config][r]:8.1f} tokens/s/rank, loss {loss[1]:.4f} -> "
                    f"{loss[max(loss)]:.4f} ({time.monotonic() - t0:.0f} s)",
                    flush=True,
                )
    rows = summarize(tps, args.baseline, loss1)
    print(f"\nload average (1 min): {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")
    print(format_table(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
