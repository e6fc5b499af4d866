"""PC's advantage against model size: the best-vs-best comparisons of several study grids, one group per size.

    python -m benchmarks.size_trend [--out outputs/study] [--plot docs/img/study_kjv_size.png]

Every grid of a size is summarized by :mod:`benchmarks.study` from the run cache and the kept records with
``--max-runs 0``: nothing is trained, and a comparison whose runs are missing is reported as missing. For each
comparison (``muon_pc`` against ``muon``, ...) and size it prints the paired difference of final validation
losses and the token ratio over every seed the grid has (mean and 95% interval), and seed 0 alone, which is the
like-for-like number where the larger size has one seed only. The plot has the token ratio and the difference
against the number of parameters.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import study

# KJV at 3.3M parameters (200 steps) and at 13.8M (dim 384, 6 layers, 823 steps: the same tokens per parameter).
# A comparison comes from the first grid of its size that has all its runs: at 13.8M the two-lr check where it is
# complete, else the 3.3M best lrs.
SIZES: tuple[tuple[str, ...], ...] = (
    ("kjv-muon", "kjv-muon-deg3-pcwd1", "kjv-adamw"),
    ("kjv-size-384-lr", "kjv-size-384"),
)
COMPARISONS = ("muon_pc", "muon_pc:deg3+pcwd1", "adamw_pc")


def _params(summary: dict, spec: str) -> int | None:
    files = [f for seeds in summary["arms"][spec]["runs"].values() for f in seeds.values()]
    return json.loads(Path(files[0]).read_text())["params"] if files else None


def _seed0(cmp: dict, key: str) -> float | None:
    values = cmp[key]["values"]
    return values[cmp["seeds"].index(0)] if 0 in cmp["seeds"] else None


def trend(
    sizes=SIZES, comparisons=COMPARISONS, out: str = "outputs/study", extra_argv: tuple[str, ...] = ()
) -> list[dict]:
    """One row per (comparison, size): the grid it came from, parameters, seeds, difference and token ratio."""
    rows = []
    for grids in sizes:
        summaries = {
            g: study.main(
                ["--grid", g, "--out", out, "--max-runs", "0", "--no-plots", "--no-progress", *extra_argv]
            )
            for g in grids
        }
        for spec in comparisons:
            grid = next((g for g, s in summaries.items() if spec in s["best_vs_best"]), None)
            if grid is None:
                grid = next((g for g, s in summaries.items() if spec in s["arms"]), None)
                if grid is not None:  # an arm of this size whose runs (or its baseline's) are not all there
                    rows.append({"comparison": spec, "spec": spec, "grid": grid, "missing": True})
                continue
            cmp = summaries[grid]["best_vs_best"][spec]
            rows.append(
                {
                    "comparison": f"{spec} vs {cmp['baseline']}",
                    "spec": spec,
                    "grid": grid,
                    "params": _params(summaries[grid], cmp["baseline"]),
                    "seeds": cmp["seeds"],
                    "lr": cmp["lr"],
                    "baseline_lr": cmp["baseline_lr"],
                    "delta_final_val_loss": cmp["delta_final_val_loss"],
                    "token_ratio": cmp["token_ratio"],
                    "seed0_delta": _seed0(cmp, "delta_final_val_loss"),
                    "seed0_token_ratio": _seed0(cmp, "token_ratio"),
                }
            )
    return rows


def _fmt(st: dict, seed0: float | None, spec: str) -> str:
    if st["mean"] is None:
        return "not run"
    ci = f" [{st['ci95'][0]:{spec}}, {st['ci95'][1]:{spec}}]" if st["ci95"] else ""
    s0 = "" if seed0 is None or st["n"] == 1 else f"; seed 0: {seed0:{spec}}"
    return f"{st['mean']:{spec}}{ci} (n={st['n']}{s0})"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| comparison | params | grid | lr (PC, baseline) | final loss: PC - baseline | token ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("missing"):
            lines.append(f"| {r['comparison']} | | `{r['grid']}` | | not run | not run |")
            continue
        lines.append(
            f"| {r['comparison']} | {r['params'] / 1e6:.1f}M | `{r['grid']}` | {r['lr']:g}, {r['baseline_lr']:g} "
            f"| {_fmt(r['delta_final_val_loss'], r['seed0_delta'], '+.3f')} "
            f"| {_fmt(r['token_ratio'], r['seed0_token_ratio'], '.2f')} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, spec in enumerate(dict.fromkeys(r["spec"] for r in rows)):
        pts = [
            r
            for r in rows
            if r["spec"] == spec and not r.get("missing") and r["token_ratio"]["mean"] is not None
        ]
        color = f"C{i}"
        x = [r["params"] * (1 + 0.03 * i) for r in pts]  # the comparisons side by side at one size
        for ax, key, seed0 in (
            (axes[0], "token_ratio", "seed0_token_ratio"),
            (axes[1], "delta_final_val_loss", "seed0_delta"),
        ):
            ax.plot(
                x,
                [r[key]["mean"] for r in pts],
                "-o",
                color=color,
                label=pts[0]["comparison"] if pts else spec,
            )
            for xi, r in zip(x, pts):
                if r[key]["ci95"]:
                    ax.vlines(xi, *r[key]["ci95"], color=color, alpha=0.6)
            s0 = [(xi, r[seed0]) for xi, r in zip(x, pts) if r[seed0] is not None]
            if s0:
                ax.plot(*zip(*s0), "x", color=color, ms=8)
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[1].axhline(0.0, color="gray", lw=0.8)
    axes[0].set_ylabel("token ratio (> 1: PC needs fewer tokens)")
    axes[1].set_ylabel("final val loss: PC - baseline (< 0: PC better)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("parameters (same tokens per parameter)")
    axes[0].legend(fontsize=8)
    fig.suptitle("KJV: mean over seeds with 95% interval (o, bars), seed 0 alone (x)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.size_trend", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/study", help="the study's run cache and summaries")
    p.add_argument("--plot", default=None, help="write the plot to this PNG")
    args = p.parse_args(argv)
    rows = trend(out=args.out)
    print(markdown(rows))
    if any(r.get("missing") for r in rows):
        print(
            "[size_trend] runs are missing: train them with python -m benchmarks.study --grid GRID (the kept records "
            "are fp32 runs: on a CPU with bfloat16 matrix units, run both with ATEN_CPU_CAPABILITY=avx2)"
        )
    if args.plot:
        plot(rows, Path(args.plot))
        print(f"[size_trend] wrote {args.plot}")
    return rows


if __name__ == "__main__":
    main()
