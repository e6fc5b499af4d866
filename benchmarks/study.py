"""Seeded, best-vs-best study of the PC layer: named grids of token-efficiency runs, with confidence intervals.

    python -m benchmarks.study --grid NAME [--data PATH.jsonl] [--out outputs/study] [--steps N] [--arms A,B]
        [--seeds 0,1,2] [--threads 1] [--max-runs N] [--no-plots] [--no-progress] [--list]

A grid names a corpus, a step count, seeds and arms. An arm is a :mod:`benchmarks.token_efficiency` arm
(``muon``, ``muon_pc``, ``adamw``, ...) optionally with a variant of :mod:`benchmarks._variants`
(``muon_pc:merge25``). For every arm the study

1. sweeps the peak lr with the first seed on a factor-sqrt(2) grid, extending the grid at an edge until the
   best lr is interior (at most ``max_extend`` extensions per edge), unless the arm borrows another arm's
   best lr (``lr_from``);
2. trains every seed at the arm's best lr.

Runs are trained one at a time by ``token_efficiency.get_run`` and stored in ``--out/<corpus>/runs/`` (the
token-efficiency cache, shared by every grid on that corpus), so an interrupted study resumes where it
stopped; ``--max-runs`` trains at most that many new runs and then writes a partial summary.

``--out/<grid>/summary.json`` holds, per arm, the lr sweep and the final validation loss over seeds (mean,
sample sd, 95% t-interval); per PC arm against its baseline, best lr against best lr and paired by seed, the
difference of final losses, the token ratio (below) and the tokens-to-target curve; the same comparison at
the baseline's best lr for the seeds that exist there; and the run files. Plots (``study_<grid>_*.png``):
validation loss with seed bands, tokens-to-target, lr sensitivity per arm, GMCN over training.

**Token ratio** (per seed): with ``L`` the higher of the two final validation losses (the lowest loss both
runs reach), ``tokens(baseline first reaches L) / tokens(PC arm first reaches L)``, linearly interpolated
between evaluations. When PC ends lower this is the usual ratio at the baseline's final loss; when PC ends
higher it is the baseline's advantage at PC's final loss (< 1). The **tokens-to-target curve** is the same
ratio for a range of targets ``L``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from benchmarks import token_efficiency as te
from benchmarks.corpora import how_to_get, looks_like_a_path

SQRT2 = math.sqrt(2.0)


# ----------------------------------------------------------------------------------------------------
# Grids
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm of a grid: ``spec`` is ``ARM`` or ``ARM:VARIANT``; its lr is swept from ``lrs`` or borrowed."""

    spec: str
    lrs: tuple[float, ...] = ()
    lr_from: str | None = None  # use the best lr of that arm (no sweep)

    @property
    def arm(self) -> str:
        return self.spec.split(":", 1)[0]

    @property
    def variant(self) -> str:
        return self.spec.split(":", 1)[1] if ":" in self.spec else ""

    @property
    def optimizer(self) -> str:
        return self.arm.removesuffix("_pc")

    @property
    def pc(self) -> bool:
        return self.arm.endswith("_pc")


@dataclasses.dataclass(frozen=True)
class Grid:
    name: str
    description: str
    arms: tuple[Arm, ...]
    data: str | None = None  # relative to the repository root; --data overrides
    steps: int = 200
    seeds: tuple[int, ...] = (0, 1, 2)
    max_extend: int = 3
    te_args: tuple[str, ...] = ()  # more benchmarks.token_efficiency arguments (model size, batch, ...)


def lr_step(lr: float, k: int) -> float:
    """``lr * sqrt(2)**k`` rounded to 2 significant digits (so that grids from different centres share runs)."""
    return float(f"{lr * SQRT2**k:.2g}")


def _sqrt2_grid(center: float, below: int, above: int) -> tuple[float, ...]:
    return tuple(lr_step(center, k) for k in range(-below, above + 1))


MUON_LRS = _sqrt2_grid(1.2e-2, 1, 1)  # 8.5e-3, 1.2e-2, 1.7e-2: around the 400-step Muon optimum
MUON_PC_LRS = _sqrt2_grid(1.7e-2, 0, 2)  # 1.7e-2, 2.4e-2, 3.4e-2: the PC arm tied Muon only at 2.4e-2
ADAMW_LRS = _sqrt2_grid(4e-3, 1, 1)

# The size trend's larger model: dim 384, 6 layers (13.8M parameters, 4.1x), 823 steps (the same tokens per parameter
# as the 3.3M grids' 200), KJV, seed 0.
SIZE_384 = dict(
    data="outputs/corpora/kjv.jsonl",
    steps=823,
    seeds=(0,),
    max_extend=0,
    te_args=("--dim", "384", "--n-layers", "6", "--n-heads", "6"),
)

GRIDS: dict[str, Grid] = {
    g.name: g
    for g in (
        Grid(
            "kjv-muon",
            "Muon vs Muon + PC (degree 5), best lr vs best lr, KJV, 3.3M model",
            (Arm("muon", MUON_LRS), Arm("muon_pc", MUON_PC_LRS)),
            data="outputs/corpora/kjv.jsonl",
        ),
        Grid(
            "kjv-muon-candidates",
            "Muon + PC candidates at the Muon baseline's best lr (KJV): PC as an initialisation only "
            "(merge0, the first-order equivalent of a W_eff-space Muon), PC for the first 10% then merged",
            (
                Arm("muon", MUON_LRS),
                Arm("muon_pc", MUON_PC_LRS),
                Arm("muon_pc:merge0", lr_from="muon"),
                Arm("muon_pc:merge10", lr_from="muon"),
            ),
            data="outputs/corpora/kjv.jsonl",
        ),
        Grid(
            "kjv-muon-merge10",
            "Muon + PC for the first 10% of the steps (where PC leads), then merged and trained as plain Muon "
            "at the Muon baseline's best lr (KJV)",
            (Arm("muon", MUON_LRS), Arm("muon_pc", MUON_PC_LRS), Arm("muon_pc:merge10", lr_from="muon")),
            data="outputs/corpora/kjv.jsonl",
        ),
        Grid(
            "kjv-muon-deg3",
            "Muon + PC degree 3 (KJV), lr swept",
            (Arm("muon", MUON_LRS), Arm("muon_pc:deg3", MUON_PC_LRS)),
            data="outputs/corpora/kjv.jsonl",
        ),
        Grid(
            "python-docs-muon",
            "Muon vs Muon + PC (degree 5), best lr vs best lr, python-docs, 3.3M model",
            (Arm("muon", MUON_LRS), Arm("muon_pc", MUON_PC_LRS)),
            data="outputs/corpora/python-docs.jsonl",
        ),
        Grid(
            "python-docs-muon-pilot",
            "Muon vs Muon + PC on python-docs at the KJV best lrs (1.2e-2, 2.4e-2), seed 0 only: no sweep",
            (Arm("muon", (1.2e-2,)), Arm("muon_pc", (2.4e-2,))),
            data="outputs/corpora/python-docs.jsonl",
            seeds=(0,),
            max_extend=0,
        ),
        Grid(
            "kjv-muon-merge0",
            "PC as an initialisation only: merged before the first step, then plain Muon at the Muon "
            "baseline's best lr (the first-order equivalent of a W_eff-space Muon, docs/study.md), KJV",
            (Arm("muon", MUON_LRS), Arm("muon_pc", MUON_PC_LRS), Arm("muon_pc:merge0", lr_from="muon")),
            data="outputs/corpora/kjv.jsonl",
        ),
        Grid(
            "kjv-muon-base",
            "Muon alone, lr swept and 3 seeds at its best lr (KJV): the baseline of the issue-32 variant grids, "
            "so that it can be (re)run first on a new machine",
            (Arm("muon", MUON_LRS),),
            data="outputs/corpora/kjv.jsonl",
        ),
        # -- issue 32: control of the raw PC weight's scale (benchmarks/_variants.py) -----------------------
        Grid(
            "kjv-muon-retract-sigma",
            "Muon + PC with the raw PC weights retracted to their initial sigma after every step (gamma absorbs "
            "the scale, W_eff unchanged), lr swept, vs Muon (KJV)",
            (Arm("muon", MUON_LRS), Arm("muon_pc:retract_sigma", MUON_LRS)),
            data="outputs/corpora/kjv.jsonl",
        ),
        Grid(
            "kjv-muon-retract-fro",
            "Muon + PC with the raw PC weights retracted to their initial Frobenius norm, lr swept, vs Muon (KJV)",
            (Arm("muon", MUON_LRS), Arm("muon_pc:retract_fro", MUON_LRS)),
            data="outputs/corpora/kjv.jsonl",
        ),
        Grid(
            "kjv-muon-retract-sigma-drop",
            "Muon + PC with the raw PC weights retracted to their initial sigma after every step and the growth "
            "dropped (gamma untouched, W_eff = gamma sigma0 p(W / sigma)), lr swept, vs Muon (KJV)",
            (Arm("muon", MUON_LRS), Arm("muon_pc:retract_sigma_drop", MUON_LRS)),
            data="outputs/corpora/kjv.jsonl",
        ),
        Grid(
            "kjv-muon-retract-fro-drop",
            "Muon + PC with the raw PC weights retracted to their initial Frobenius norm after every step and the "
            "growth dropped (gamma untouched), lr swept around retract_sigma_drop's KJV optimum 3.4e-2, vs Muon (KJV)",
            (Arm("muon", MUON_LRS), Arm("muon_pc:retract_fro_drop", _sqrt2_grid(3.4e-2, 1, 1))),
            data="outputs/corpora/kjv.jsonl",
        ),
        Grid(
            "kjv-muon-retract-sigma-drop-pilot",
            "the sigma retraction with the growth dropped at Muon's best lr 1.2e-2 only, seed 0, no sweep (its "
            "run is the 1.2e-2 run of kjv-muon-retract-sigma-drop: run this first to get Muon's lr before the sweep)",
            (Arm("muon", (1.2e-2,)), Arm("muon_pc:retract_sigma_drop", (1.2e-2,))),
            data="outputs/corpora/kjv.jsonl",
            seeds=(0,),
            max_extend=0,
        ),
        Grid(
            "kjv-muon-relstep",
            "Muon + PC with the raw PC weights' update scaled by sigma / sigma0 (fixed relative step), lr swept, "
            "vs Muon (KJV)",
            (Arm("muon", MUON_LRS), Arm("muon_pc:rel_step", MUON_LRS)),
            data="outputs/corpora/kjv.jsonl",
        ),
        Grid(
            "kjv-muon-pcwd",
            "Muon + PC, weight decay of the raw PC weights only swept (0, 0.3, 1; the rest 0.1), at Muon + PC's "
            "KJV best lr 2.4e-2, vs Muon (KJV)",
            (
                Arm("muon", MUON_LRS),
                Arm("muon_pc:pcwd0", (2.4e-2,)),
                Arm("muon_pc:pcwd0.3", (2.4e-2,)),
                Arm("muon_pc:pcwd1", (2.4e-2,)),
            ),
            data="outputs/corpora/kjv.jsonl",
            max_extend=0,
        ),
        Grid(
            "kjv-muon-pcwd-high",
            "Muon + PC, weight decay of the raw PC weights only at 3 and 10 (kjv-muon-pcwd's best, 1, was its top "
            "edge), at 2.4e-2, vs Muon (KJV)",
            (Arm("muon", MUON_LRS), Arm("muon_pc:pcwd3", (2.4e-2,)), Arm("muon_pc:pcwd10", (2.4e-2,))),
            data="outputs/corpora/kjv.jsonl",
            max_extend=0,
        ),
        Grid(
            "kjv-muon-pcwd1",
            "Muon + PC with weight decay 1 on the raw PC weights (kjv-muon-pcwd's best), its lr swept around "
            "2.4e-2 until interior, 3 seeds at its best, vs Muon (KJV)",
            (Arm("muon", MUON_LRS), Arm("muon_pc:pcwd1", MUON_PC_LRS)),
            data="outputs/corpora/kjv.jsonl",
        ),
        Grid(
            "python-docs-muon-pcwd1",
            "the second corpus: Muon, Muon + PC (the paper's recipe) and Muon + PC with weight decay 1 on the raw "
            "PC weights, each lr swept until interior, 3 seeds at its best, python-docs",
            (Arm("muon", MUON_LRS), Arm("muon_pc", MUON_PC_LRS), Arm("muon_pc:pcwd1", MUON_PC_LRS)),
            data="outputs/corpora/python-docs.jsonl",
        ),
        Grid(
            "kjv-muon-deg3-pcwd1",
            "Muon + PC with the two changes that each beat the paper's recipe on KJV combined: degree 3 and weight "
            "decay 1 on the raw PC weights, lr swept around degree 3's optimum 1.7e-2, vs Muon (KJV)",
            (Arm("muon", MUON_LRS), Arm("muon_pc:deg3+pcwd1", _sqrt2_grid(1.7e-2, 1, 1))),
            data="outputs/corpora/kjv.jsonl",
        ),
        Grid(
            "python-docs-muon-deg3",
            "the second corpus for degree 3 and degree 3 with raw-PC decay 1: each lr swept until interior, 3 seeds "
            "at its best, vs Muon (python-docs)",
            (
                Arm("muon", MUON_LRS),
                Arm("muon_pc:deg3", _sqrt2_grid(1.7e-2, 1, 1)),
                Arm("muon_pc:deg3+pcwd1", _sqrt2_grid(1.7e-2, 1, 1)),
            ),
            data="outputs/corpora/python-docs.jsonl",
        ),
        Grid(
            "kjv-muon-raw-scale",
            "every issue-32 variant against Muon on KJV (no runs of its own: the tables of the grids above)",
            (
                Arm("muon", MUON_LRS),
                Arm("muon_pc", MUON_PC_LRS),
                Arm("muon_pc:retract_sigma", MUON_LRS),
                Arm("muon_pc:retract_fro", MUON_LRS),
                Arm("muon_pc:rel_step", MUON_LRS),
            ),
            data="outputs/corpora/kjv.jsonl",
        ),
        Grid(
            "python-docs-muon-retract",
            "Muon vs Muon + PC with either retraction, lr swept, python-docs",
            (
                Arm("muon", MUON_LRS),
                Arm("muon_pc:retract_sigma", MUON_LRS),
                Arm("muon_pc:retract_fro", MUON_LRS),
            ),
            data="outputs/corpora/python-docs.jsonl",
        ),
        Grid(
            "kjv-adamw-retract",
            "AdamW vs AdamW + PC (degree 9) and AdamW + PC with the sigma retraction, lr swept, KJV",
            (Arm("adamw", ADAMW_LRS), Arm("adamw_pc", ADAMW_LRS), Arm("adamw_pc:retract_sigma", ADAMW_LRS)),
            data="outputs/corpora/kjv.jsonl",
        ),
        Grid(
            "kjv-size-384",
            "the size trend: dim 384, 6 layers (13.8M parameters, 4.1x), the same tokens per parameter as the "
            "3.3M grids (823 steps); Muon vs Muon + PC (the recipe and deg3+pcwd1) and AdamW vs AdamW + PC at the "
            "3.3M best lrs, seed 0",
            (
                Arm("muon", (1.2e-2,)),
                Arm("muon_pc", (2.4e-2,)),
                Arm("adamw", (5.7e-3,)),  # its 3.3M best (kjv-adamw)
                Arm("adamw_pc", (4e-3,)),
                Arm("muon_pc:deg3+pcwd1", (1.7e-2,)),  # its 3.3M KJV best (kjv-muon-deg3-pcwd1)
            ),
            **SIZE_384,
        ),
        Grid(
            "kjv-size-384-lr",
            "the lr check of the size trend: each arm of kjv-size-384 also one sqrt(2) step below its 3.3M best lr "
            "(a larger model trained longer usually wants a lower lr), seed 0; deg3+pcwd1 at its 3.3M best only",
            (
                Arm("muon", (8.5e-3, 1.2e-2)),
                Arm("muon_pc", (1.7e-2, 2.4e-2)),
                Arm("muon_pc:deg3+pcwd1", (1.7e-2,)),  # against Muon's best of two
                Arm("adamw", (4e-3, 5.7e-3)),
                Arm("adamw_pc", (2.8e-3, 4e-3)),
            ),
            **SIZE_384,
        ),
        Grid(
            "kjv-adamw",
            "AdamW vs AdamW + PC (degree 9), best lr vs best lr, KJV, 3.3M model",
            (Arm("adamw", ADAMW_LRS), Arm("adamw_pc", ADAMW_LRS)),
            data="outputs/corpora/kjv.jsonl",
        ),
        Grid(
            "smoke",
            "a few-second grid for tests: tiny model, 4 steps",
            (
                Arm("muon", (1e-2, 2e-2)),
                Arm("muon_pc", (1e-2, 2e-2)),
                Arm("muon_pc:merge50", lr_from="muon"),
            ),
            steps=4,
            max_extend=1,
            te_args=(
                "--batch-size",
                "2",
                "--vocab-size",
                "300",
                "--val-windows",
                "4",
                "--val-every-doc",
                "5",
                "--eval-every",
                "1",
                "--dim",
                "32",
                "--n-layers",
                "1",
                "--n-heads",
                "2",
                "--ffn-multiple-of",
                "32",
                "--seq-len",
                "16",
            ),  # fmt: skip
        ),
    )
}


# ----------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------
def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom, from torch's density (trapezoid CDF, bisection)."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"t_quantile expects 0.5 <= p < 1 and df >= 1, got p={p}, df={df}.")
    dist = torch.distributions.StudentT(torch.tensor(float(df), dtype=torch.float64))
    # CDF(x) - 1/2 on [0, hi]: the density on a fine grid, integrated; hi covers p up to 1 - 1e-4 for df=1.
    hi = 4000.0 if df == 1 else 200.0
    x = torch.cat([torch.linspace(0, 20, 200_001, dtype=torch.float64), torch.linspace(20, hi, 200_001)[1:]])
    cdf = torch.cat(
        [torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(dist.log_prob(x).exp(), x)]
    )
    i = int(torch.searchsorted(cdf, torch.tensor(p - 0.5, dtype=torch.float64)))
    if i >= len(x):
        raise ValueError(f"t_quantile: p={p} is too close to 1 for df={df}.")
    if i == 0:
        return 0.0
    f = (p - 0.5 - cdf[i - 1]) / (cdf[i] - cdf[i - 1])
    return float(x[i - 1] + f * (x[i] - x[i - 1]))


def interval(values: list[float], confidence: float = 0.95) -> dict:
    """Mean, sample sd, n and the two-sided t-interval of the mean (None for fewer than 2 finite values)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(vals)
    out: dict = {"values": [None if v is None else float(v) for v in values], "n": n}
    if n == 0:
        return {**out, "mean": None, "sd": None, "ci95": None}
    mean = sum(vals) / n
    if n < 2:
        return {**out, "mean": mean, "sd": None, "ci95": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return {**out, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def common_target_ratio(base: dict, pc: dict) -> dict:
    """Token ratio at the lowest loss both runs reach (the higher final loss); see the module docstring."""
    fb, fp = base["final_val_loss"], pc["final_val_loss"]
    if not (math.isfinite(fb) and math.isfinite(fp)):
        return {"ratio": None, "target_val_loss": None, "pc_reaches_baseline_final": None}
    target = max(fb, fp)
    t_base = te.tokens_to_reach(base["curve"]["tokens"], base["curve"]["val_loss"], target)
    t_pc = te.tokens_to_reach(pc["curve"]["tokens"], pc["curve"]["val_loss"], target)
    ratio = t_base / t_pc if t_base is not None and t_pc else None
    return {"ratio": ratio, "target_val_loss": target, "pc_reaches_baseline_final": fp <= fb}


def tokens_to_target(pairs: list[tuple[dict, dict]], n_targets: int = 40) -> dict:
    """Token ratio as a function of the target loss, per seed pair, with its interval over the pairs.

    Targets run from the lowest loss every run has reached by its second evaluation down to the highest
    final loss of all runs, so that every run reaches every target.
    """
    runs = [r for pair in pairs for r in pair]
    if not runs or not all(math.isfinite(r["final_val_loss"]) for r in runs):
        return {"target": [], "per_seed": [], "mean": [], "ci95": [], "n": []}
    upper = min(r["curve"]["val_loss"][min(2, len(r["curve"]["val_loss"]) - 1)] for r in runs)
    lower = max(r["final_val_loss"] for r in runs)
    if upper <= lower:
        targets = [lower]
    else:
        targets = [upper + (lower - upper) * i / (n_targets - 1) for i in range(n_targets)]
    per_seed = []
    for base, pc in pairs:
        row = []
        for L in targets:
            tb = te.tokens_to_reach(base["curve"]["tokens"], base["curve"]["val_loss"], L)
            tp = te.tokens_to_reach(pc["curve"]["tokens"], pc["curve"]["val_loss"], L)
            row.append(tb / tp if tb is not None and tp else None)
        per_seed.append(row)
    stats = [interval([row[j] for row in per_seed]) for j in range(len(targets))]
    return {
        "target": targets,
        "per_seed": per_seed,
        "mean": [s["mean"] for s in stats],
        "ci95": [s["ci95"] for s in stats],
        "n": [s["n"] for s in stats],
    }


# ----------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------
class Budget(Exception):
    """Raised when ``--max-runs`` new runs have been trained."""


RECORDS = Path(__file__).resolve().parent / "records" / "study"
"""Run records kept in the repository (``<RECORDS>/<corpus>/runs/*.json``, the same files as the run cache): a
fresh checkout reuses them instead of training the runs again. ``--save-records`` copies a grid's runs there."""


def save_records(runs: dict, dest: Path) -> int:
    """Copy the records behind ``runs`` (``runs[arm][lr][seed]``) into ``dest``; returns how many were new."""
    dest.mkdir(parents=True, exist_ok=True)
    new = 0
    for by_lr in runs.values():
        for by_seed in by_lr.values():
            for rec in by_seed.values():
                src = Path(rec["file"])
                if not (dest / src.name).exists():
                    (dest / src.name).write_text(json.dumps(_portable(json.loads(src.read_text()))))
                    new += 1
    print(f"[study] {new} new run records in {dest}")
    return new


def _portable(rec: dict) -> dict:
    """``rec`` with its corpus path relative to the repository (where the corpus lies inside it): the kept records
    name no folder of the machine that made them. The lookup does not read the path (:func:`_same_run`)."""
    root, data = RECORDS.parents[2], Path(rec["config"]["data"])
    if data.is_absolute() and data.is_relative_to(root):
        rec["config"] = {**rec["config"], "data": str(data.relative_to(root))}
    return rec


def _same_run(stored: dict, wanted: dict) -> bool:
    """Is the stored run's config the wanted one? The corpus is compared by content (its split statistics and the
    validation set's hash), not by the path it was read from, so a record made from another checkout counts."""
    strip = lambda c: {k: v for k, v in c.items() if k != "data"}  # noqa: E731
    return strip(stored) == strip(wanted)


def _stored(runner, pattern: str) -> list[Path]:
    """The cached records matching ``pattern``: this run cache first, then the repository's records."""
    own = sorted((runner.corpus_dir / "runs").glob(pattern))
    kept = sorted((RECORDS / runner.corpus_dir.name / "runs").glob(pattern))
    names = {p.name for p in own}
    return own + [p for p in kept if p.name not in names]


class Runner:
    """Trains or reuses single runs through ``token_efficiency.get_run``; one at a time."""

    def __init__(self, base_args: argparse.Namespace, corpus_dir: Path, max_runs: int | None, progress: bool):
        self.base_args, self.corpus_dir, self.max_runs = base_args, corpus_dir, max_runs
        self.trained = 0
        self.data = te.prepare_data(base_args, corpus_dir)
        self.bar = None
        if progress:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=0, desc="study runs", unit="run", position=1, dynamic_ncols=True)
            except ImportError:
                pass

    def args_for(self, arm: Arm, seed: int) -> argparse.Namespace:
        args = argparse.Namespace(**vars(self.base_args))
        args.seed, args.variant, args.arms = seed, arm.variant, [arm.arm]
        return args

    def config(self, arm: Arm, lr: float, seed: int) -> dict:
        return te.run_config(self.args_for(arm, seed), arm.arm, lr, self.data)

    def lookup(self, arm: Arm, lr: float, seed: int) -> dict | None:
        """The stored run, or None (a file in the cache whose recorded config matches)."""
        cfg = self.config(arm, lr, seed)
        for path in _stored(self, f"{arm.arm}_lr{lr:g}_*.json"):
            rec = json.loads(path.read_text())
            if _same_run(rec.get("config", {}), cfg):
                rec["file"] = str(path)
                return rec
        return None

    def expect(self, n: int) -> None:
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()

    def get(self, arm: Arm, lr: float, seed: int) -> dict:
        rec = self.lookup(arm, lr, seed)
        if rec is None:
            if self.max_runs is not None and self.trained >= self.max_runs:
                raise Budget()
            if self.bar is not None:
                self.bar.set_postfix_str(f"{arm.spec} lr={lr:g} seed={seed}")
            te.get_run(self.args_for(arm, seed), arm.arm, lr, self.data, self.corpus_dir)
            self.trained += 1
            rec = self.lookup(arm, lr, seed)
            assert rec is not None, "token_efficiency.get_run did not store the run"
        if self.bar is not None:
            self.bar.update(1)
        return rec


def sweep(runner: Runner, arm: Arm, seed: int, max_extend: int) -> tuple[float, bool, list[dict]]:
    """lr sweep of ``arm`` at ``seed``, extended by factor-sqrt(2) steps until the best lr is interior."""
    lrs = sorted(set(arm.lrs))
    runner.expect(len(lrs))
    results = {lr: runner.get(arm, lr, seed) for lr in lrs}
    extended = {"low": 0, "high": 0}
    while True:
        finite = {lr: r for lr, r in results.items() if math.isfinite(r["final_val_loss"])}
        if not finite:
            raise RuntimeError(
                f"every lr of the {arm.spec} sweep {lrs} diverged; give smaller learning rates."
            )
        best = min(finite, key=lambda lr: finite[lr]["final_val_loss"])
        ordered = sorted(results)
        interior = len(ordered) >= 3 and ordered[0] < best < ordered[-1]
        # An edge optimum moves the grid outwards; a diverged top edge counts as a bracket.
        if best == ordered[-1] and extended["high"] < max_extend:
            new, extended["high"] = lr_step(best, 1), extended["high"] + 1
        elif best == ordered[0] and extended["low"] < max_extend:
            new, extended["low"] = lr_step(best, -1), extended["low"] + 1
        else:
            break
        runner.expect(1)
        results[new] = runner.get(arm, new, seed)
    table = [
        {"lr": lr, "seed": seed, "final_val_loss": results[lr]["final_val_loss"], "file": results[lr]["file"]}
        for lr in sorted(results)
    ]
    return best, interior, table


def run_grid(grid: Grid, runner: Runner) -> tuple[dict, dict, bool]:
    """Best lr per arm (sweeps first) and the runs of every seed there; returns (best, runs, complete)."""
    best: dict[str, dict] = {}
    runs: dict[str, dict[float, dict[int, dict]]] = {a.spec: {} for a in grid.arms}
    complete = True
    try:
        for arm in sorted(grid.arms, key=lambda a: a.lr_from is not None):  # sweeps before borrowers
            if arm.lr_from is None:
                lr, interior, table = sweep(runner, arm, grid.seeds[0], grid.max_extend)
                best[arm.spec] = {"lr": lr, "interior": interior, "sweep": table, "swept": True}
                for row in table:
                    runs[arm.spec].setdefault(row["lr"], {})[grid.seeds[0]] = runner.lookup(
                        arm, row["lr"], grid.seeds[0]
                    )
            else:
                if arm.lr_from not in best:
                    raise ValueError(
                        f"arm {arm.spec}: lr_from={arm.lr_from!r} is not a swept arm of the grid."
                    )
                best[arm.spec] = {"lr": best[arm.lr_from]["lr"], "lr_from": arm.lr_from, "swept": False}
        for arm in grid.arms:
            lr = best[arm.spec]["lr"]
            todo = [s for s in grid.seeds if s not in runs[arm.spec].get(lr, {})]
            runner.expect(len(todo))
            for s in todo:
                runs[arm.spec].setdefault(lr, {})[s] = runner.get(arm, lr, s)
    except Budget:
        complete = False
    # Whatever else is stored for these arms (e.g. same-lr runs of other seeds) is used by the tables.
    for arm in grid.arms:
        for path in _stored(runner, f"{arm.arm}_lr*_*.json"):
            rec = json.loads(path.read_text())
            lr, seed = rec["lr"], rec["config"]["seed"]
            if seed in grid.seeds and _same_run(rec["config"], runner.config(arm, lr, seed)):
                rec["file"] = str(path)
                runs[arm.spec].setdefault(lr, {}).setdefault(seed, rec)
    return best, runs, complete


# ----------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------
def _baseline_of(grid: Grid, arm: Arm) -> Arm | None:
    return next((a for a in grid.arms if a.spec == arm.optimizer), None) if arm.pc else None


def compare(base_runs: dict[int, dict], pc_runs: dict[int, dict]) -> dict:
    seeds = sorted(set(base_runs) & set(pc_runs))
    pairs = [(base_runs[s], pc_runs[s]) for s in seeds]
    ratios = [common_target_ratio(b, p) for b, p in pairs]
    return {
        "seeds": seeds,
        "final_val_loss": interval([p["final_val_loss"] for _, p in pairs]),
        "baseline_final_val_loss": interval([b["final_val_loss"] for b, _ in pairs]),
        "delta_final_val_loss": interval([p["final_val_loss"] - b["final_val_loss"] for b, p in pairs]),
        "token_ratio": {
            **interval([r["ratio"] for r in ratios]),
            "target_val_loss": [r["target_val_loss"] for r in ratios],
            "pc_reaches_baseline_final": [r["pc_reaches_baseline_final"] for r in ratios],
        },
        "tokens_to_target": tokens_to_target(pairs),
    }


def summarize(grid: Grid, args, runner: Runner, best: dict, runs: dict, complete: bool) -> dict:
    arms = {}
    for arm in grid.arms:
        b = best.get(arm.spec)
        at_best = runs[arm.spec].get(b["lr"], {}) if b else {}
        seeds = sorted(at_best)
        arms[arm.spec] = {
            "arm": arm.arm,
            "variant": arm.variant or None,
            "optimizer": arm.optimizer,
            "pc": arm.pc,
            "best_lr": b["lr"] if b else None,
            "best_lr_interior": b.get("interior") if b else None,
            "lr_from": b.get("lr_from") if b else None,
            "lr_sweep": b.get("sweep", []) if b else [],
            "seeds": seeds,
            "final_val_loss": interval([at_best[s]["final_val_loss"] for s in seeds]),
            "gmcn_end": interval([at_best[s]["gmcn_end"] for s in seeds]),
            "s_per_step": interval([at_best[s]["s_per_step"] for s in seeds]),
            "runs": {
                f"{lr:g}": {str(s): r["file"] for s, r in sorted(d.items())}
                for lr, d in sorted(runs[arm.spec].items())
            },
        }
    best_vs_best, same_lr = {}, {}
    for arm in grid.arms:
        base = _baseline_of(grid, arm)
        if base is None or arm.spec not in best or base.spec not in best:
            continue
        lr_b, lr_p = best[base.spec]["lr"], best[arm.spec]["lr"]
        best_vs_best[arm.spec] = {
            "baseline": base.spec,
            "lr": lr_p,
            "baseline_lr": lr_b,
            **compare(runs[base.spec].get(lr_b, {}), runs[arm.spec].get(lr_p, {})),
        }
        same_lr[arm.spec] = {
            "baseline": base.spec,
            "lr": lr_b,
            **compare(runs[base.spec].get(lr_b, {}), runs[arm.spec].get(lr_b, {})),
        }
    data = runner.data["stats"]
    return {
        "grid": grid.name,
        "description": grid.description,
        "complete": complete,
        "command": "python -m benchmarks.study " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
        "data": {"path": args.data, **data, "tokenizer": runner.data["tokenizer_source"]},
        "steps": args.steps,
        "tokens_per_run": args.steps * runner.base_args.batch_size * runner.base_args.seq_len,
        "seeds": list(grid.seeds),
        "model": dataclasses.asdict(te.model_size(runner.base_args)),
        "token_efficiency_args": runner.argv,
        "confidence": "95% two-sided Student-t interval of the mean over seeds (sample sd); None for n < 2",
        "token_ratio_definition": "per seed: tokens(baseline first reaches L) / tokens(PC arm first reaches L), "
        "L = the higher of the two final validation losses",
        "arms": arms,
        "best_vs_best": best_vs_best,
        "same_lr": same_lr,
        "new_runs_trained": runner.trained,
    }


# ----------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------
_COLORS = ("tab:green", "tab:red", "tab:purple", "tab:orange", "tab:blue", "tab:brown", "tab:olive")


def plot(summary: dict, runs: dict, best: dict, out: Path, prefix: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[study] matplotlib is not installed: no plots (pip install matplotlib)", flush=True)
        return []
    color = {spec: _COLORS[i % len(_COLORS)] for i, spec in enumerate(summary["arms"])}
    title = f"{Path(summary['data']['path']).name}, {summary['steps']} steps"
    files = []

    def band(ax, spec, key, log=False):
        lr = best[spec]["lr"]
        recs = list(runs[spec].get(lr, {}).values())
        if not recs:
            return
        x = [t / 1e6 for t in recs[0]["curve"]["tokens"]]
        n = min(len(r["curve"][key]) for r in recs)
        cols = list(zip(*[r["curve"][key][:n] for r in recs]))
        mean = [sum(c) / len(c) for c in cols]
        ax.plot(x[:n], mean, "-", color=color[spec], label=f"{spec} (lr {lr:g}, {len(recs)} seeds)")
        if len(recs) > 1:
            ax.fill_between(
                x[:n], [min(c) for c in cols], [max(c) for c in cols], color=color[spec], alpha=0.2
            )

    # 1. validation loss with seed bands (min..max over seeds at each arm's best lr)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for spec in summary["arms"]:
        if spec in best:
            band(ax, spec, "val_loss")
    finals = [a["final_val_loss"]["mean"] for a in summary["arms"].values() if a["final_val_loss"]["mean"]]
    early = [  # the loss at the third evaluation: the view starts after the initial drop
        r["curve"]["val_loss"][min(2, len(r["curve"]["val_loss"]) - 1)]
        for spec in summary["arms"]
        if spec in best
        for r in runs[spec].get(best[spec]["lr"], {}).values()
    ]
    if finals and early and all(map(math.isfinite, early)):
        ax.set_ylim(min(finals) - 0.1, max(early) + 0.1)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{title}: mean over seeds, band = min..max", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(str(out / f"{prefix}_loss.png"))
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    # 2. tokens-to-target (best vs best), mean and 95% interval over seeds
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for spec, cmp in summary["best_vs_best"].items():
        ttt = cmp["tokens_to_target"]
        if not ttt["target"]:
            continue
        pts = [(t, m, c) for t, m, c in zip(ttt["target"], ttt["mean"], ttt["ci95"]) if m is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=color[spec],
                label=f"{spec} (lr {cmp['lr']:g}) vs {cmp['baseline']} (lr {cmp['baseline_lr']:g})")  # fmt: skip
        ci = [(p[0], *p[2]) for p in pts if p[2] is not None]
        if ci:
            ax.fill_between(
                [c[0] for c in ci], [c[1] for c in ci], [c[2] for c in ci], color=color[spec], alpha=0.2
            )
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.invert_xaxis()
    ax.set_xlabel("target validation loss (lower = later in training)")
    ax.set_ylabel("token ratio: baseline tokens / PC tokens")
    ax.set_title(f"{title}: tokens to reach a target, best lr vs best lr (band: 95% t-interval)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(str(out / f"{prefix}_tokens_to_target.png"))
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    # 3. lr sensitivity per arm: the sweep (first seed) and the mean / interval at the best lr
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for spec, a in summary["arms"].items():
        pts = [(r["lr"], r["final_val_loss"]) for r in a["lr_sweep"] if math.isfinite(r["final_val_loss"])]
        if pts:
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                "-o",
                ms=3,
                color=color[spec],
                label=f"{spec} (seed {summary['seeds'][0]})",
            )
        st = a["final_val_loss"]
        if st["mean"] is not None and st["ci95"] is not None:
            ax.errorbar([a["best_lr"]], [st["mean"]], yerr=[[st["mean"] - st["ci95"][0]], [st["ci95"][1] - st["mean"]]],
                        fmt="s", ms=5, capsize=4, color=color[spec], label=f"{spec}: mean, 95% CI ({st['n']} seeds)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("peak lr")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"{title}: lr sensitivity", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(str(out / f"{prefix}_lr.png"))
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    # 4. GMCN over training
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for spec in summary["arms"]:
        if spec in best:
            band(ax, spec, "gmcn")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("GMCN (attention + FFN, W_eff where preconditioned)")
    ax.set_title(f"{title}: GMCN, mean over seeds, band = min..max", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(str(out / f"{prefix}_gmcn.png"))
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    return files


# ----------------------------------------------------------------------------------------------------
def _select_arms(p: argparse.ArgumentParser, grid: Grid, spec: str) -> tuple[Arm, ...]:
    """The grid's arms named in ``spec`` (in the grid's order), plus the swept arms they borrow an lr from."""
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    known = {a.spec: a for a in grid.arms}
    unknown = [s for s in wanted if s not in known]
    if not wanted or unknown:
        p.error(
            f"--arms: expected comma-separated arms of grid {grid.name!r} ({', '.join(known)}), got {spec!r}"
            + (f" (not in the grid: {', '.join(unknown)})" if unknown else "")
        )
    keep = set(wanted) | {known[s].lr_from for s in wanted if known[s].lr_from is not None}
    return tuple(a for a in grid.arms if a.spec in keep)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", help=f"one of: {', '.join(GRIDS)}")
    p.add_argument("--list", action="store_true", help="list the grids and exit")
    p.add_argument(
        "--data",
        default=None,
        help="corpus: a .jsonl/.txt file or a Hugging Face dataset name (default: the grid's, built by "
        "python -m benchmarks.corpora)",
    )
    p.add_argument(
        "--out", default="outputs/study", help="run cache in OUT/<corpus>/, summaries in OUT/<grid>/"
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the grid's)")
    p.add_argument(
        "--seeds", default=None, help="comma-separated seeds (default: the grid's); the first sweeps lr"
    )
    p.add_argument(
        "--arms", default=None,
        help="comma-separated arm specs: train only these arms of the grid (e.g. two processes on two cores, "
        "each on its own arms; a later run without --arms summarizes the whole grid from the cache)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--max-runs", type=int, default=None, help="train at most N new runs, then summarize")
    p.add_argument(
        "--save-records", action="store_true",
        help=f"copy the grid's run records into {RECORDS.relative_to(RECORDS.parents[2])}/<corpus>/runs (kept in the "
        "repository, so that a fresh checkout reuses them)",
    )  # fmt: skip
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.argv = argv
    if args.list:
        return args
    if args.grid not in GRIDS:
        p.error(f"--grid: expected one of {', '.join(GRIDS)}, got {args.grid!r} (--list describes them)")
    grid = GRIDS[args.grid]
    if args.seeds is not None:
        try:
            seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        except ValueError:
            p.error(f"--seeds expects comma-separated integers, got {args.seeds!r}")
        if not seeds:
            p.error("--seeds: give at least one seed")
        grid = dataclasses.replace(grid, seeds=seeds)
    if args.arms is not None:
        grid = dataclasses.replace(grid, arms=_select_arms(p, grid, args.arms))
    if args.steps is not None:
        if args.steps < 2:
            p.error(f"--steps must be >= 2, got {args.steps}")
        grid = dataclasses.replace(grid, steps=args.steps)
    args.data = args.data or grid.data
    if not args.data:
        p.error(f"grid {grid.name!r} names no corpus: pass --data PATH.jsonl")
    if not Path(args.data).is_file() and looks_like_a_path(args.data):
        p.error(f"--data: no file at {args.data!r}; {how_to_get(args.data)}")
    if args.max_runs is not None and args.max_runs < 0:
        p.error(f"--max-runs must be >= 0, got {args.max_runs}")
    args.grid_spec, args.steps = grid, grid.steps
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.list:
        for g in GRIDS.values():
            print(f"{g.name:22s} {g.description}\n{'':22s} arms: {', '.join(a.spec for a in g.arms)}; "
                  f"{g.steps} steps; seeds {list(g.seeds)}; data {g.data or '(--data)'}")  # fmt: skip
        return None
    grid: Grid = args.grid_spec
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    corpus_dir = out / Path(args.data).stem
    corpus_dir.mkdir(parents=True, exist_ok=True)
    te_argv = ["--data", args.data, "--out", str(corpus_dir), "--steps", str(grid.steps), "--no-plots",
               *(["--no-progress"] if args.no_progress else []), *grid.te_args]  # fmt: skip
    base = te.parse_args(te_argv)
    t0 = time.perf_counter()
    runner = Runner(base, corpus_dir, args.max_runs, not args.no_progress)
    runner.argv = te_argv
    best, runs, complete = run_grid(grid, runner)
    if runner.bar is not None:
        runner.bar.close()
    summary = summarize(grid, args, runner, best, runs, complete)
    summary["wall_s"] = time.perf_counter() - t0
    grid_dir = out / grid.name
    grid_dir.mkdir(parents=True, exist_ok=True)
    if not args.no_plots:
        summary["plots"] = plot(summary, runs, best, grid_dir, f"study_{grid.name}")
    (grid_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (grid_dir / "tables.md").write_text(markdown(summary))
    report(summary)
    print(f"[study] wrote {grid_dir / 'summary.json'}{'' if complete else ' (partial: --max-runs reached)'}")
    if args.save_records:
        save_records(runs, RECORDS / corpus_dir.name / "runs")
    return summary


def _fmt(st: dict, digits: int = 4) -> str:
    if st["mean"] is None:
        return "-"
    if st["ci95"] is None:
        return f"{st['mean']:.{digits}f} (n={st['n']})"
    return f"{st['mean']:.{digits}f} [{st['ci95'][0]:.{digits}f}, {st['ci95'][1]:.{digits}f}] (n={st['n']})"


def markdown(summary: dict) -> str:
    """The summary's tables in Markdown (written next to summary.json as tables.md)."""

    def ci(st: dict, digits: int = 4) -> str:
        if st["mean"] is None:
            return "-"
        if st["ci95"] is None:
            return f"{st['mean']:.{digits}f}"
        return f"{st['mean']:.{digits}f} [{st['ci95'][0]:.{digits}f}, {st['ci95'][1]:.{digits}f}]"

    lines = [
        f"Grid `{summary['grid']}`: {summary['description']}. {summary['steps']} steps, "
        f"{summary['tokens_per_run']:,} tokens per run, seeds {summary['seeds']}"
        + ("" if summary["complete"] else " (**incomplete**)")
        + ". Intervals: 95% t-interval over seeds.",
        "",
        f"| arm | lr sweep (seed {summary['seeds'][0]}): lr -> final val loss | best lr | seeds | "
        "final val loss | GMCN end |",
        "|---|---|---|---|---|---|",
    ]
    for spec, a in summary["arms"].items():
        sweep = ", ".join(f"{r['lr']:g}: {r['final_val_loss']:.4f}" for r in a["lr_sweep"]) or (
            f"lr of {a['lr_from']}" if a["lr_from"] else "-"
        )
        if a["best_lr"] is None:
            lines.append(f"| {spec} | {sweep} | not reached | 0 | - | - |")
            continue
        where = "" if a["lr_from"] else (" (interior)" if a["best_lr_interior"] else " (**edge**)")
        lines.append(
            f"| {spec} | {sweep} | {a['best_lr']:g}{where} | {a['final_val_loss']['n']} | "
            f"{ci(a['final_val_loss'])} | {ci(a['gmcn_end'], 2)} |"
        )
    for title, key in (("best lr vs best lr", "best_vs_best"), ("same lr (the baseline's best)", "same_lr")):
        if not summary[key]:
            continue
        lines += [
            "",
            f"{title}, paired by seed:",
            "",
            "| arm vs baseline | lrs | seeds | PC - baseline final val loss | token ratio | PC reaches the baseline's final loss |",
            "|---|---|---|---|---|---|",
        ]
        for spec, c in summary[key].items():
            lrs = f"{c['lr']:g} vs {c.get('baseline_lr', c['lr']):g}"
            if not c["seeds"]:
                lines.append(f"| {spec} vs {c['baseline']} | {lrs} | 0 | not run | - | - |")
                continue
            reach = c["token_ratio"]["pc_reaches_baseline_final"]
            lines.append(
                f"| {spec} vs {c['baseline']} | {lrs} | {len(c['seeds'])} | {ci(c['delta_final_val_loss'])} | "
                f"{ci(c['token_ratio'], 3)} | {sum(bool(x) for x in reach)}/{len(reach)} |"
            )
    return "\n".join(lines) + "\n"


def report(summary: dict) -> None:
    for spec, a in summary["arms"].items():
        if a["best_lr"] is None:
            print(f"[study] {spec:22s} not run yet")
            continue
        where = "interior" if a["best_lr_interior"] else ("from " + a["lr_from"] if a["lr_from"] else "EDGE")
        print(
            f"[study] {spec:22s} best lr {a['best_lr']} ({where}): final val loss {_fmt(a['final_val_loss'])}"
        )
    for name, table in (("best vs best", summary["best_vs_best"]), ("same lr", summary["same_lr"])):
        for spec, c in table.items():
            print(f"[study] {name:12s} {spec} vs {c['baseline']}: delta loss {_fmt(c['delta_final_val_loss'])}, "
                  f"token ratio {_fmt(c['token_ratio'], 3)}")  # fmt: skip


if __name__ == "__main__":
    main()
