"""PC and Muon on one MoE layer's expert stacks ``(E, F, D)``: FLOPs and time per step against the cost model.

    python -m benchmarks.pc_experts [--shapes qwen3-30b-a3b,deepseek-v3,gpt-oss-20b] [--experts 2] [--repeats 3]
        [--threads 1] [--no-muon] [--smoke]

Per shape (one MoE layer of the model: the ``w1``/``w3`` stacks ``(E, F, D)`` and ``w2`` ``(E, D, F)``), with
``--experts`` of its experts (time and FLOPs are linear in the experts of a stack, the op count is not: the
state is batched, so one kernel chain runs per stack), degree 5 (the Muon recipe):

* **PC once per step**: one pull-back, refresh and write (``pcopt.kernel.pull_back_``, ``PCState.after_step``)
  of the three stacks, unsharded (what each rank runs on its own experts under expert parallelism). FLOPs are
  counted (``pcopt.profiling.StepProfile``) and compared with ``docs/scale.md``'s 2-D formula per expert
  matrix, ``12 m n^2 + 8 (k-2) n^3`` plus the power iteration's ``4 iters m n``; aten ops at ``E`` and ``2E``
  experts show that the op count does not grow with the experts. Also printed: the ratio to the experts' own
  forward and backward, ``6 m n T_e`` with ``T_e = tokens * top_k / E`` routed tokens per expert.
* **Muon**: ``pcopt.optim.Muon(batched_weights=True)`` on the stacks against ``torch.optim.Muon`` on the same
  matrices as ``E`` separate 2-D parameters (torch's defaults both: bf16 Newton-Schulz; relative difference of
  the updates).

Times are medians over ``--repeats`` on the CPU; the whole layer's numbers scale them by ``E_model / E``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import pcopt
from pcopt.hardware import describe
from pcopt.profiling import StepProfile

SHAPES = {  # model -> (routed experts per layer, model dim D, expert hidden F, top_k)
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "deepseek-v3": (256, 7168, 2048, 8),
    "gpt-oss-20b": (32, 2880, 2880, 4),  # fused: mlp1 (E, 2F, D) interleaves gate and up rows
    "smoke": (4, 48, 24, 2),
    "smoke-fused": (4, 48, 24, 2),
}
FUSED = {"gpt-oss-20b", "smoke-fused"}
"""Shapes laid out as gpt_oss's experts: ``mlp1_weight_EGD (E, 2F, D)`` whose rows alternate gate (``0::2``) and up
(``1::2``), PC and Muon per expert and gate/up matrix (``row_interleave=2``), and ``mlp2_weight_EDF (E, D, F)``. The
same ``3 E`` matrices as ``w1``/``w3``/``w2``, so the same formula: the rows show what the interleave costs."""


def stacks_of(name: str) -> dict[str, int]:
    """The layer's stacks -> how many matrices their rows interleave."""
    if name in FUSED:
        return {"mlp1_weight_EGD": 2, "mlp2_weight_EDF": 1}
    return {"w1_EFD": 1, "w2_EDF": 1, "w3_EFD": 1}


class Stacks(nn.Module):
    def __init__(self, experts: int, dim: int, hidden: int, fused: bool = False) -> None:
        super().__init__()
        if fused:
            self.mlp1_weight_EGD = nn.Parameter(torch.randn(experts, 2 * hidden, dim) / dim**0.5)
            self.mlp2_weight_EDF = nn.Parameter(torch.randn(experts, dim, hidden) / hidden**0.5)
            return
        self.w1_EFD = nn.Parameter(torch.randn(experts, hidden, dim) / dim**0.5)
        self.w2_EDF = nn.Parameter(torch.randn(experts, dim, hidden) / hidden**0.5)
        self.w3_EFD = nn.Parameter(torch.randn(experts, hidden, dim) / dim**0.5)


def pc_formula(experts: int, dim: int, hidden: int, degree: int, iters: int) -> float:
    """``docs/scale.md``'s once-per-step FLOPs, per expert matrix (P = 1), for the layer's three stacks."""
    k = len(pcopt.polynomial(degree))
    m, n = max(dim, hidden), min(dim, hidden)
    return 3 * experts * (12 * m * n * n + 8 * (k - 2) * n**3 + 4 * iters * m * n)


def _pc_model(name: str, experts: int, degree: int) -> tuple[nn.Module, pcopt.PCState]:
    _, dim, hidden, _ = SHAPES[name]
    torch.manual_seed(0)
    m = Stacks(experts, dim, hidden, fused=name in FUSED)
    for stack, k in stacks_of(name).items():
        pcopt.precondition(m, stack, degree=degree, row_interleave=k)
    pcopt.set_strategy(m, "once_per_step", pull_back="after_backward")
    return m, pcopt.PCState(m)


def _pc_step(m: nn.Module, state: pcopt.PCState) -> None:
    for s in pcopt.strategy.slots(m):  # a dL/dW_eff as the experts' backward leaves it
        s.effective.grad = torch.ones_like(s.effective)
    state.after_backward()
    state.after_step()
    for s in pcopt.strategy.slots(m):
        s.original.grad = None
        s[0].gamma.grad = None


def pc_row(name: str, experts: int, repeats: int, degree: int = 5, tokens: int = 8192) -> dict:
    e_model, dim, hidden, top_k = SHAPES[name]
    m, state = _pc_model(name, experts, degree)
    _pc_step(m, state)  # warm-up (index and stack caches)
    with StepProfile() as prof:
        _pc_step(m, state)
    twice, twice_state = _pc_model(name, 2 * experts, degree)
    _pc_step(twice, twice_state)
    with StepProfile() as prof2:
        _pc_step(twice, twice_state)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _pc_step(m, state)
        times.append(time.perf_counter() - t0)
    iters = pcopt.preconditioner(m, next(iter(stacks_of(name)))).num_power_iterations
    flops = sum(prof.flops_by_dtype.values())
    model_flops = pc_formula(experts, dim, hidden, degree, iters)
    mm, nn_ = max(dim, hidden), min(dim, hidden)
    t_e = tokens * top_k / e_model  # routed tokens per expert per step
    return {
        "shape": name, "fused": name in FUSED, "experts_measured": experts, "experts_per_layer": e_model, "D": dim,
        "F": hidden,
        "flops": flops, "flops_formula": model_flops, "flops_ratio": flops / model_flops,
        "ops": prof.total_ops, "ops_2x_experts": prof2.total_ops, "syncs": prof.total_syncs,
        "seconds": statistics.median(times), "seconds_layer": statistics.median(times) * e_model / experts,
        "pc_over_experts_fwd_bwd": model_flops / experts / (3 * 6 * mm * nn_ * t_e), "tokens_per_step": tokens,
    }  # fmt: skip


def muon_row(name: str, experts: int, repeats: int) -> dict:
    _, dim, hidden, _ = SHAPES[name]
    torch.manual_seed(0)
    stacks = Stacks(experts, dim, hidden, fused=name in FUSED)
    layout = stacks_of(name)
    grads = {n: torch.randn_like(p) for n, p in stacks.named_parameters()}
    # torch's Muon on every matrix as a parameter of its own: expert e, and for interleaved rows each j::k
    views = [(n, e, j, k) for n, k in layout.items() for e in range(experts) for j in range(k)]
    params = dict(stacks.named_parameters())
    loose = [nn.Parameter(params[n].detach()[e, j::k].clone()) for n, e, j, k in views]
    loose_grads = [grads[n][e, j::k].clone() for n, e, j, k in views]
    groups = [{"params": [params[n]], "row_interleave": k} for n, k in layout.items()]
    ours = pcopt.optim.Muon(groups, lr=1e-2, batched_weights=True, adjust_lr_fn="match_rms_adamw",
                            weight_decay=0.0)  # fmt: skip
    theirs = torch.optim.Muon(loose, lr=1e-2, adjust_lr_fn="match_rms_adamw", weight_decay=0.0)

    def step_ours():
        for n, p in stacks.named_parameters():
            p.grad = grads[n]
        ours.step()

    def step_theirs():
        for p, g in zip(loose, loose_grads):
            p.grad = g
        theirs.step()

    step_ours()  # warm-up: the first step also probes the CPU's bf16 matmul speed (pcopt.hardware)
    step_theirs()
    before = {n: p.detach().double().clone() for n, p in params.items()}
    loose_before = [p.detach().double().clone() for p in loose]
    with StepProfile() as prof_ours:
        step_ours()
    with StepProfile() as prof_theirs:
        step_theirs()
    ours_update = torch.cat(
        [(params[n].detach().double() - before[n])[e, j::k].reshape(-1) for n, e, j, k in views]
    )
    theirs_update = torch.cat([(p.detach().double() - b).reshape(-1) for p, b in zip(loose, loose_before)])
    diff = float((ours_update - theirs_update).norm() / theirs_update.norm())
    times = {"pcopt": [], "torch": []}
    for _ in range(repeats):
        for key, fn in (("pcopt", step_ours), ("torch", step_theirs)):
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    t_ours, t_theirs = statistics.median(times["pcopt"]), statistics.median(times["torch"])
    return {
        "shape": name, "experts_measured": experts,
        "flops_pcopt": sum(prof_ours.flops_by_dtype.values()), "flops_torch": sum(prof_theirs.flops_by_dtype.values()),
        "ops_pcopt": prof_ours.total_ops, "ops_torch": prof_theirs.total_ops,
        "seconds_pcopt": t_ours, "seconds_torch": t_theirs, "time_ratio": t_ours / t_theirs,
        "update_rel_diff": diff,
    }  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pc_experts", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shapes", default="qwen3-30b-a3b,deepseek-v3", help=f"comma-separated, of {sorted(SHAPES)}"
    )
    p.add_argument(
        "--experts", type=int, default=2, help="experts per stack to measure (costs are linear in E)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument(
        "--no-muon",
        action="store_true",
        help="PC only (torch's Muon runs Newton-Schulz in bf16, slow on a CPU without native bf16)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat (CI)")
    args = p.parse_args(argv)
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        p.error(f"unknown shapes {unknown}; expected some of {sorted(SHAPES)}")
    if args.experts < 1:
        p.error(f"--experts must be >= 1, got {args.experts}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.smoke:
        args.shapes, args.repeats = "smoke,smoke-fused", 1
    torch.set_num_threads(args.threads)
    print(describe(), f"| threads {torch.get_num_threads()}")
    out = {"pc": [], "muon": []}
    for name in args.shapes.split(","):
        r = pc_row(name, args.experts, args.repeats)
        out["pc"].append(r)
        print(
            f"PC  {name}: {r['experts_measured']} of {r['experts_per_layer']} experts, "
            f"{'(E, 2x' + str(r['F']) + ' interleaved, ' + str(r['D']) + ') + 1' if r['fused'] else '(E, ' + str(r['F']) + ', ' + str(r['D']) + ') x3'}: "
            f"FLOPs {r['flops']:.3g} = {r['flops_ratio']:.3f} x formula, ops {r['ops']} (2E: {r['ops_2x_experts']}), "
            f"syncs {r['syncs']}, {r['seconds'] * 1e3:.1f} ms ({r['seconds_layer']:.1f} s for the layer's "
            f"{r['experts_per_layer']} experts on this CPU); PC / experts' fwd+bwd at {r['tokens_per_step']} "
            f"tokens per step: {r['pc_over_experts_fwd_bwd']:.3f}"
        )
        if args.no_muon:
            continue
        m = muon_row(name, args.experts, args.repeats)
        out["muon"].append(m)
        print(
            f"Muon {name}: pcopt batched {m['seconds_pcopt'] * 1e3:.1f} ms, torch.optim.Muon per expert "
            f"{m['seconds_torch'] * 1e3:.1f} ms (ratio {m['time_ratio']:.2f}); FLOPs {m['flops_pcopt']:.3g} vs "
            f"{m['flops_torch']:.3g}; ops {m['ops_pcopt']} vs {m['ops_torch']}; update rel diff "
            f"{m['update_rel_diff']:.1e}"
        )
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
