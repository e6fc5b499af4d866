"""Long-run stability check of the debug PC + Muon config (a benchmark, not a CI test).

    python -m benchmarks.long_run [--steps 2000] [--check-every 100] [--time-limit-min 60] [--out DIR]
    python -m benchmarks.long_run --summarize DIR/long_run.log     # re-read a finished (or cut) run

Trains ``debug_muon_pc`` (torchtitan_ext; PC degree 5 + Muon, 2 gloo ranks on the CPU, FSDP2) for
``--steps`` steps with warmup 1% of the steps, and every ``--check-every`` steps, inside the run, on the
live FSDP2 model:

* NaN/Inf check of every parameter (local shards), gamma and the power-iteration buffers u, v;
* for every PC matrix: the sigma estimate the next forward uses, ``u^T W v + eps`` (fp32, as
  ``pcopt`` computes it), against ``sigma_1`` of the same raw W from a float64 SVD
  (``torch.linalg.matrix_norm(W.double(), 2)``); the relative error, and which layer is worst.

torchtitan itself stops a run whose loss is not finite, so a run that reaches its last step had a finite
loss at every step; the script also checks every logged loss. With ``--time-limit-min`` the run is
stopped after that many minutes and the summary says how many steps it completed.

The config function :func:`debug_muon_pc_long_run` (``--module benchmarks.long_run``) is
``torchtitan_ext``'s ``debug_muon_pc`` with the metrics processor below; nothing else changes.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcopt.hardware import describe
from torchtitan_ext.processes import kill_tree

REPO = Path(__file__).resolve().parents[1]
_STEP = re.compile(r"step:\s*(\d+)\s+loss:\s*(\S+)\s+grad_norm:\s*(\S+)")
_CHECK = re.compile(r"long-run check step (\d+): (\{.*\})")

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# In the training processes: the config and the periodic check
# ---------------------------------------------------------------------------------------------------
def spectral_check(model_parts) -> dict[str, Any]:
    """Finiteness of all state and sigma-estimate error per PC matrix. Collective: call on every rank."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    import pcopt
    from pcopt.power_iteration import sigma_estimate

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    nonfinite_local = []
    for model in model_parts:
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            local = t.to_local() if isinstance(t, DTensor) else t
            if local.is_floating_point() and not bool(torch.isfinite(local).all()):
                nonfinite_local.append(name)
    count = torch.tensor([len(nonfinite_local)], dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(count)

    layers = {}
    with torch.no_grad():
        for model in model_parts:
            for fqn, pc in pcopt.preconditioners(model):
                W = full(pc.raw_weight.detach())
                est = float(sigma_estimate(W.float(), pc.u.float(), pc.v.float())) + pc.eps
                s = torch.linalg.svdvals(W.double())
                s1 = float(s[0])
                layers[fqn.replace("_checkpoint_wrapped_module.", "")] = {
                    "sigma_est": est,
                    "sigma_svd": s1,
                    "rel_err": abs(est - s1) / s1,
                    "gap": s1 / float(s[1]) if float(s[1]) > 0 else math.inf,
                    "gamma": float(full(pc.gamma.detach()).flatten()[0]),
                }
    worst = max(layers, key=lambda k: layers[k]["rel_err"])
    return {
        "nonfinite_tensors": int(count.item()),
        "nonfinite_names": nonfinite_local[:8],
        "worst_layer": worst,
        "worst_rel_err": layers[worst]["rel_err"],
        "layers": layers,
    }


@functools.cache
def _metrics_processor():
    from torchtitan_ext.metrics import PCMetricsProcessor

    class LongRunMetricsProcessor(PCMetricsProcessor):
        """``PCMetricsProcessor`` plus :func:`spectral_check` every ``sigma_check_freq`` steps."""

        @dataclass(kw_only=True, slots=True)
        class Config(PCMetricsProcessor.Config):
            sigma_check_freq: int = 100
            """Run the NaN and sigma-vs-SVD check every this many steps (0: never)."""

        def log(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
            freq = self.config.sigma_check_freq
            if freq and step % freq == 0 and self.model_parts is not None:
                import torch.distributed as dist

                report = spectral_check(self.model_parts)
                if not dist.is_initialized() or dist.get_rank() == 0:
                    logger.info("long-run check step %d: %s", step, json.dumps(report))
            super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra_metrics)

    return LongRunMetricsProcessor


def debug_muon_pc_long_run():
    """``torchtitan_ext``'s ``debug_muon_pc`` with the long-run check in its metrics processor."""
    from torchtitan_ext.config_registry import debug_muon_pc

    config = debug_muon_pc()
    old = config.metrics
    config.metrics = _metrics_processor().Config(log_freq=old.log_freq, pc_log_freq=old.pc_log_freq)
    return config


# ---------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------
def summarize(log: str) -> dict[str, Any]:
    losses: dict[int, float] = {}
    for m in _STEP.finditer(log):
        losses[int(m.group(1))] = float(m.group(2))
    checks = {int(m.group(1)): json.loads(m.group(2)) for m in _CHECK.finditer(log)}
    per_layer_worst: dict[str, tuple[float, int]] = {}
    for step, c in checks.items():
        for fqn, r in c["layers"].items():
            if fqn not in per_layer_worst or r["rel_err"] > per_layer_worst[fqn][0]:
                per_layer_worst[fqn] = (r["rel_err"], step)
    worst_layer = max(per_layer_worst, key=lambda k: per_layer_worst[k][0]) if per_layer_worst else None
    return {
        "steps_completed": max(losses) if losses else 0,
        "nonfinite_losses": sorted(s for s, v in losses.items() if not math.isfinite(v)),
        "loss_first": losses.get(1),
        "loss_last": losses[max(losses)] if losses else None,
        "loss_mean_last_100": (
            sum(losses[s] for s in sorted(losses)[-100:]) / min(100, len(losses)) if losses else None
        ),
        "checks": len(checks),
        "checks_with_nonfinite_state": sorted(s for s, c in checks.items() if c["nonfinite_tensors"]),
        "worst_rel_err": per_layer_worst[worst_layer][0] if worst_layer else None,
        "worst_layer": worst_layer,
        "worst_at_step": per_layer_worst[worst_layer][1] if worst_layer else None,
        "worst_layer_gap": (
            checks[per_layer_worst[worst_layer][1]]["layers"][worst_layer]["gap"] if worst_layer else None
        ),
        "per_check_worst": {s: (c["worst_layer"], c["worst_rel_err"]) for s, c in sorted(checks.items())},
        "rel_err_median_all": _median([r["rel_err"] for c in checks.values() for r in c["layers"].values()]),
    }


def _median(xs: list[float]) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def print_summary(s: dict[str, Any], tolerance: float) -> None:
    print(f"steps completed: {s['steps_completed']}")
    print(f"non-finite losses: {s['nonfinite_losses'] or 'none'}")
    print(
        f"loss: step 1 {s['loss_first']}, last {s['loss_last']}, mean of the last 100 {s['loss_mean_last_100']}"
    )
    print(
        f"checks: {s['checks']}; with non-finite parameters or buffers: {s['checks_with_nonfinite_state'] or 'none'}"
    )
    for step, (layer, err) in s["per_check_worst"].items():
        print(f"  step {step:>5}: worst |sigma_est - sigma_1| / sigma_1 = {err:.3e} ({layer})")
    if s["worst_layer"] is not None:
        verdict = "within" if s["worst_rel_err"] <= tolerance else "OUTSIDE"
        print(
            f"worst over all checks: {s['worst_rel_err']:.3e} at {s['worst_layer']} (step {s['worst_at_step']}, "
            f"sigma_1/sigma_2 = {s['worst_layer_gap']:.4f}); median over all layers and checks "
            f"{s['rel_err_median_all']:.3e}; {verdict} the {tolerance:.0%} tolerance"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.long_run", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--check-every", type=int, default=100)
    p.add_argument("--time-limit-min", type=float, default=0, help="stop the run after this long (0: never)")
    p.add_argument("--out", type=Path, default=Path("outputs/long_run"), help="dump folder and log")
    p.add_argument("--tolerance", type=float, default=0.01, help="sigma relative error reported as a pass")
    p.add_argument("--summarize", type=Path, default=None, help="only summarize an existing log file")
    args, extra = p.parse_known_args(argv)
    if args.summarize is not None:
        s = summarize(args.summarize.read_text())
        print_summary(s, args.tolerance)
        return 0 if s["worst_rel_err"] is not None and s["worst_rel_err"] <= args.tolerance else 1

    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "long_run.log"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "torchtitan_ext.train", "--module", "benchmarks.long_run", "--config", "debug_muon_pc_long_run",
        "--dump_folder", str(args.out.resolve()), "--metrics.disable_color_printing", "--debug.seed", "42",
        "--training.steps", str(args.steps), "--lr_scheduler.warmup_steps", str(max(1, args.steps // 100)),
        "--metrics.sigma_check_freq", str(args.check_every), *extra,
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    print("command:", " ".join(cmd), flush=True)
    print(f"pcopt.hardware: {describe('cpu')}", flush=True)  # the dtype pcopt would pick on this CPU
    begin = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        stopped = False
        while proc.poll() is None:
            time.sleep(5)
            if args.time_limit_min and time.monotonic() - begin > 60 * args.time_limit_min:
                kill_tree(proc.pid)
                proc.wait()
                stopped = True
    minutes = (time.monotonic() - begin) / 60
    s = summarize(log_path.read_text())
    why = (
        f"stopped at the {args.time_limit_min:g}-minute limit" if stopped else f"exit code {proc.returncode}"
    )
    print(f"run: {minutes:.1f} min, {why}; log: {log_path}")
    print_summary(s, args.tolerance)
    ok = (
        not s["nonfinite_losses"]
        and not s["checks_with_nonfinite_state"]
        and s["worst_rel_err"] is not None
        and s["worst_rel_err"] <= args.tolerance
    )
    return 0 if ok and (stopped or proc.returncode == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
