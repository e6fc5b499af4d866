"""What predicts PC's speed on a GPU, asserted on the CPU: host syncs, op (launch) counts, FLOPs by dtype, and
whether ``torch.compile`` sees the once-per-step map and pull-back whole.

Counts are exact (no timing), so these hold on any CPU. ``benchmarks/pc_cost.py`` prints the same numbers for
larger models.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._inductor.utils import fresh_cache

import pcopt
from benchmarks.pc_cost import main as pc_cost
from benchmarks.pc_cost import profile_step
from pcopt import kernel as K
from pcopt import strategy as S
from pcopt.profiling import StepProfile


def test_step_profile_counts_syncs_ops_and_flops():
    a, b = torch.randn(6, 4), torch.randn(4, 5)
    with StepProfile() as prof:
        t = a @ b
        t.sum().item()
        bool(t[0, 0] > 0)
        torch.equal(t, t)
        (a.bfloat16() @ b.bfloat16()).float()
    assert dict(prof.syncs) == {"aten::_local_scalar_dense": 2, "aten::equal": 1}
    assert prof.flops_by_dtype == {torch.float32: 2 * 6 * 4 * 5, torch.bfloat16: 2 * 6 * 4 * 5}
    assert prof.ops["aten::mm"] == 2


def _profile(pc: bool, strategy: str, n_layers: int, optimizer: str):
    """One training step (forward, backward, after_backward, clip, fused-AdamW or Muon step, refresh)."""
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    return profile_step(pc, strategy, n_layers, optimizer, tokens)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("strategy", ["per_forward", "once_per_step"])
def test_pc_adds_no_host_syncs_to_a_training_step(strategy, optimizer):
    """Forward, backward, pull-back, clip, step and refresh: no value of PC's is read on the host."""
    plain = _profile(False, strategy, 2, optimizer)
    pc = _profile(True, strategy, 2, optimizer)
    assert plain.total_syncs == 0, plain.syncs  # the reference itself is sync-free, so any sync is PC's
    assert pc.total_syncs == 0, pc.syncs


def test_once_per_step_ops_grow_with_shapes_not_layers():
    """Same-shape matrices share one kernel chain: PC's ops per step at 16 layers are within 1.3x of 4."""
    pc_ops = {}
    for n_layers in (4, 16):
        plain = _profile(False, "once_per_step", n_layers, "adamw").total_ops
        pc_ops[n_layers] = _profile(True, "once_per_step", n_layers, "adamw").total_ops - plain
    assert pc_ops[4] > 0
    assert pc_ops[16] <= 1.3 * pc_ops[4], pc_ops


def _linears(compute_dtype):
    torch.manual_seed(0)
    shapes = [(96, 40), (96, 40), (40, 64), (64, 64)]  # (out, in): tall, tall, wide, square
    model = nn.Sequential(*[nn.Linear(i, o, bias=False) for o, i in shapes])
    for lin in model:
        pcopt.precondition(lin, degree=9)
    pcopt.set_strategy(model, "once_per_step", compute_dtype=compute_dtype)
    for lin in model:
        lin.weight.grad = torch.randn_like(lin.weight)
    return model, shapes


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_once_per_step_flops_match_the_cost_model(compute_dtype):
    """``docs/scale.md``: per matrix (m >= n, k coefficients) the write costs 4mn^2 + 2(k-2)n^3, the pull-back
    8mn^2 + 6(k-2)n^3, and the refresh 4 iters mn (matrix-vector products). The matmuls run in the compute
    dtype, except the power iteration and (degree >= 7) the Horner chain, which stay fp32."""
    model, shapes = _linears(compute_dtype)
    state = pcopt.PCState(model)
    with StepProfile() as back:
        state.after_backward()
    with StepProfile() as step:
        state.after_step()
    k = len(pcopt.polynomial(9))
    iters = pcopt.preconditioners(model)[0][1].num_power_iterations
    mn = [(max(s), min(s)) for s in shapes]
    write = sum(4 * m * n * n + 2 * (k - 2) * n**3 for m, n in mn)
    pull = sum(8 * m * n * n + 6 * (k - 2) * n**3 for m, n in mn)
    power = sum(4 * iters * m * n for m, n in mn)
    # the formula leaves out sigma = u^T W v (2mn + 2n per map) and the rank-1 term of the pull-back
    assert abs(back.total_flops / pull - 1) < 0.05, (back.total_flops, pull)
    assert abs(step.total_flops / (write + power) - 1) < 0.05, (step.total_flops, write + power)
    assert step.flops_by_dtype[torch.float32] >= power
    if compute_dtype == torch.bfloat16:
        # degree 9: the Horner chain on the n x n Gram stays fp32 (pcopt.kernel.horner_dtype), in the map
        # (2(k-2) n^3) and in the pull-back (the chain and its reverse, 6(k-2) n^3); the Grams and the applies
        # (the m n^2 terms) run in bf16, and the refresh's matrix-vector products are the only other fp32
        horner = sum(2 * (k - 2) * n**3 for _, n in mn)
        assert back.flops_by_dtype[torch.float32] == 3 * horner
        assert step.flops_by_dtype[torch.float32] == power + horner
        assert back.flops_by_dtype[torch.bfloat16] > 0 and step.flops_by_dtype[torch.bfloat16] > 0
    else:
        assert back.flops_by_dtype.keys() == {torch.float32}


def test_map_dtype_follows_the_device_unless_given():
    model, _ = _linears(None)
    assert {K.map_dtype(s) for s in S.slots(model)} == {torch.float32}  # CPU: fp32 (bf16 only on CUDA)
    model, _ = _linears(torch.bfloat16)
    assert {K.map_dtype(s) for s in S.slots(model)} == {torch.bfloat16}


def test_once_per_step_map_and_pull_back_compile_whole():
    """``torch._dynamo.explain`` finds no graph break in the map or the pull-back of a chunk, and inductor's
    fused kernels agree with eager. Tolerance: fp32, fused kernels reorder sums of length <= 96, so each entry
    moves by a few ulps of the largest term, ~1e-6 relative to the result's norm; 1e-5 leaves 10x."""
    model, _ = _linears(torch.float32)
    chunk = K.chunks(S.slots(model))[0]
    assert len(chunk) == 2  # the two 96x40 matrices: a real stack
    for fn in (K._effective, K._raw_gradients):
        explained = torch._dynamo.explain(fn)(chunk)
        assert explained.graph_break_count == 0, (fn.__name__, explained.break_reasons)
        assert explained.graph_count == 1
    torch._dynamo.reset()
    eager_eff, (eager_dA, eager_dg) = K._effective(chunk), K._raw_gradients(chunk)
    # A private inductor cache: its on-disk key leaves out ATEN_CPU_CAPABILITY, so kernels cached by a run at the
    # CPU's own level were reused under ATEN_CPU_CAPABILITY=avx2 and returned NaN (seen in CI, torch 2.13).
    with fresh_cache():
        eff = torch.compile(K._effective, fullgraph=True)(chunk)
        dA, dg = torch.compile(K._raw_gradients, fullgraph=True)(chunk)
    for got, want in ((eff, eager_eff), (dA, eager_dA), (dg, eager_dg)):
        assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_pc_cost_benchmark_smoke(tmp_path):
    """``benchmarks/pc_cost.py --smoke``: every row sync-free, once-per-step ops flat in depth, the FLOP ratio
    within 5% of the cost model (which leaves out sigma = u^T W v and the pull-back's rank-1 term)."""
    result = pc_cost(["--smoke", "--curve", "2", "--out", str(tmp_path)])
    assert (tmp_path / "pc_cost.json").exists()
    assert len(result["rows"]) == 4
    for row in result["rows"]:
        assert all(v == (0, 0) for k, v in row.items() if k.startswith("syncs@")), row
        assert abs(row["pc_flops_x_linear"] / row["formula"] - 1) < 0.05, row
        if row["strategy"] == "once_per_step":
            assert row["ops_ratio"] == 1.0, row
    assert len(result["curve"]["curves"]["bf16"]) == 2


def test_gpu_script_smoke(tmp_path):
    """``benchmarks/gpu.py --smoke`` runs every section's code path on the CPU (the GPU run is the same code
    with the Llama-1B/8B shapes): every optimizer x strategy x accumulation row of the model step, both
    strategies on one Linear, Newton-Schulz (single shapes, shape groups in both variants, symmetric products),
    the Muon step, the README loop in its three arms, and all four probe arms, with no row reporting an error."""
    import math

    from benchmarks.gpu import ARMS_PROBED, README_ARMS
    from benchmarks.gpu import main as gpu

    result = gpu(["--smoke", "--out", str(tmp_path)])
    combos = {(r["optimizer"], r["strategy"], r["accumulation"]) for r in result["step"]}
    assert len(combos) == 12 and not any("error" in r for r in result["step"]), result["step"]
    for r in result["step"]:
        assert r["ms"] > 0 and (r["strategy"] != "none" or r["ratio"] == 1.0), r
    for r in result["linear"]:
        assert "error" not in r and min(v for k, v in r.items() if k.endswith("_ms")) > 0, r
    assert [r["arm"] for r in result["probe"]] == list(ARMS_PROBED)
    assert all(torch.isfinite(torch.tensor(r["val_loss"])) for r in result["probe"])
    # build_optimizer's variant: no fewer FLOPs on the square group (too small for symmetric blocks), fewer
    # (Gram) on the rectangular one
    (square, rect), (square_lean, rect_lean) = (
        result["ns"]["groups_standard"],
        result["ns"]["groups_build_optimizer"],
    )
    assert square_lean["flops"] == square["flops"] and rect_lean["flops"] < rect["flops"]
    assert [r["flop_ratio"] for r in result["ns"]["symmetric"]] == [0.75, 0.75]  # (k + 1) / (2k), k = 2
    assert [r["arm"] for r in result["muon"]] == ["torch", "pcopt", "build_optimizer"]
    assert all(r["ms"] > 0 for r in result["muon"]) and result["muon"][1]["flop_ratio"] == 1.0
    # the README loop: one row per arm, timed in this run; the ratio is this run's ms over its no-PC ms
    readme = result["readme"]
    assert [r["strategy"] for r in readme] == list(README_ARMS), readme
    assert not any("error" in r for r in readme), readme
    base = readme[0]["ms"]
    for r in readme:
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["ratio"] == r["ms"] / base, r
    report = (tmp_path / "gpu.md").read_text()
    assert report.startswith("# pcopt GPU benchmarks on cpu")
    assert "## The README loop as printed" in report
    assert report.count("## ") == 6 and (tmp_path / "gpu.json").exists()
