"""Run torchtitan_ext through torchrun (2 gloo ranks on the CPU) and parse its log."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from torchtitan_ext.processes import run_captured

REPO = Path(__file__).resolve().parents[2]
STEP_RE = re.compile(r"step:\s*(\d+)\s+loss:\s*([-\d.naif]+)\s+grad_norm:\s*([-\d.naif]+)")

# Small, fast and deterministic: the CPU debug model, seq 256, local batch 2, fixed seed.
COMMON = (
    "--metrics.disable_color_printing",
    "--debug.seed",
    "42",
    "--debug.deterministic",
)


@dataclass
class Run:
    args: list[str]
    returncode: int
    log: str
    dump: Path
    steps: dict[int, tuple[float, float]] = field(default_factory=dict)
    nproc: int = 2

    @property
    def losses(self) -> dict[int, float]:
        return {s: v[0] for s, v in self.steps.items()}

    def check(self) -> Run:
        assert self.returncode == 0, (
            f"torchrun exited {self.returncode}: {' '.join(self.args)}\n{self.log[-6000:]}"
        )
        assert self.log.count("Training completed") == self.nproc, self.log[-4000:]  # every rank logs
        return self


def parse_steps(log: str) -> dict[int, tuple[float, float]]:
    steps: dict[int, tuple[float, float]] = {}
    for m in STEP_RE.finditer(log):
        step, loss, gnorm = int(m.group(1)), float(m.group(2)), float(m.group(3))
        if step in steps:  # both ranks print the same global numbers
            assert steps[step] == (loss, gnorm), (
                f"ranks disagree at step {step}: {steps[step]} vs {(loss, gnorm)}"
            )
        steps[step] = (loss, gnorm)
    return steps


def torchrun(
    config: str, dump: Path, *extra: str, module: str = "torchtitan_ext", timeout: float = 240, nproc: int = 2
) -> Run:
    """``torchrun --standalone --nproc_per_node=<nproc> -m torchtitan_ext.train`` with a hard timeout."""
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "torchtitan_ext.train",
        "--module",
        module,
        "--config",
        config,
        "--dump_folder",
        str(dump),
        *COMMON,
        *extra,
    ]
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    returncode, out = run_captured(args, cwd=dump.parent, env=env, timeout=timeout)
    if returncode is None:
        raise AssertionError(f"torchrun timed out after {timeout}s: {' '.join(args)}\n{out[-6000:]}")
    return Run(args=args, returncode=returncode, log=out, dump=dump, steps=parse_steps(out), nproc=nproc)
