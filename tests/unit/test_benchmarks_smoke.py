"""Tiny end-to-end runs of the benchmark scripts' code paths on a generated corpus (a few seconds each)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

import pcopt

pytest.importorskip("torchtitan", reason="the benchmarks build torchtitan's Llama3 model")
pytest.importorskip("tokenizers", reason="the token-efficiency benchmark trains a BPE with tokenizers")

from benchmarks import _common as C  # noqa: E402
from benchmarks import pc_overhead, token_efficiency  # noqa: E402

_WORDS = "the a lord said unto him and it was light dark water earth land went came saw good night".split()

TINY_MODEL = "--dim 32 --n-layers 1 --n-heads 2 --ffn-multiple-of 32 --seq-len 16".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "tiny.jsonl"
    with open(path, "w") as f:
        for i in range(50):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(20, 60))]
            f.write(json.dumps({"id": i, "text": " ".join(words).capitalize() + "."}) + "\n")
    return path


def _first_tokens_at(tokens, losses, target):
    """Independent re-derivation: the first crossing of ``target``, linear between evaluations; None if none."""
    for i in range(len(losses)):
        if losses[i] <= target:
            if i == 0:
                return tokens[0]
            frac = (losses[i - 1] - target) / (losses[i - 1] - losses[i])
            return tokens[i - 1] + frac * (tokens[i] - tokens[i - 1])
    return None


def _token_ratio(curves, pc_arm):
    """tokens(baseline reaches its final loss) / tokens(PC arm reaches it), or / all PC tokens if it never does."""
    base, pc = curves[pc_arm.removesuffix("_pc")], curves[pc_arm]
    target = base["val_loss"][-1]
    t_base = _first_tokens_at(base["tokens"], base["val_loss"], target)
    t_pc = _first_tokens_at(pc["tokens"], pc["val_loss"], target)
    return t_base / (t_pc if t_pc is not None else pc["tokens"][-1])


def test_token_efficiency_all_arms(corpus, tmp_path, capsys):
    out = tmp_path / "te"
    argv = [
        "--data", str(corpus), "--out", str(out), "--steps", "3", "--batch-size", "2", "--vocab-size", "300",
        "--val-windows", "4", "--val-every-doc", "5", "--eval-every", "1", "--no-progress", *TINY_MODEL,
    ]  # fmt: skip
    summary = token_efficiency.main(argv)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["arms"].keys() == summary["arms"].keys() == set(C.ARMS)
    for arm, entry in on_disk["arms"].items():
        assert math.isfinite(entry["final_val_loss"]), arm
        assert entry["tokens_seen"] == 3 * 2 * 16
        # GMCN = sigma_1 / mean(bottom 10%) >= 1, and training moves it (a value never updated stays put).
        assert (
            entry["gmcn_start"] >= 1 and entry["gmcn_end"] >= 1 and entry["gmcn_end"] != entry["gmcn_start"]
        )
        assert len(on_disk["curves"][arm]["val_loss"]) == 4  # step 0 + 3 evaluations
    for arm in ("adamw_pc", "muon_pc"):
        entry = on_disk["arms"][arm]
        assert entry["pc_degree"] == C.PC_DEGREE[arm.removesuffix("_pc")]
        ratio = entry["token_ratio"]
        assert ratio["target_val_loss"] == on_disk["arms"][arm.removesuffix("_pc")]["final_val_loss"]
        assert ratio["ratio"] == pytest.approx(_token_ratio(on_disk["curves"], arm), rel=1e-12)
    # PC lowers the conditioning of the effective weights at initialisation (same raw init); without PC both
    # optimizers start from the same weights, so the same GMCN; degree 9 (AdamW) and 5 (Muon) differ.
    arms = on_disk["arms"]
    assert arms["adamw_pc"]["gmcn_start"] < arms["adamw"]["gmcn_start"]
    assert arms["muon_pc"]["gmcn_start"] < arms["muon"]["gmcn_start"]
    assert arms["adamw"]["gmcn_start"] == arms["muon"]["gmcn_start"]
    assert arms["adamw_pc"]["gmcn_start"] != arms["muon_pc"]["gmcn_start"]
    for png in ("val_loss.png", "gmcn.png", "spectra.png"):
        assert (out / png).stat().st_size > 1000, png

    # A second invocation reuses the stored runs instead of training again.
    capsys.readouterr()
    again = token_efficiency.main([*argv, "--arms", "adamw,muon_pc", "--no-plots"])
    assert capsys.readouterr().out.count("reusing") == 2
    assert again["arms"]["adamw"]["final_val_loss"] == summary["arms"]["adamw"]["final_val_loss"]


def test_token_efficiency_lr_sweep_picks_best_baseline(corpus, tmp_path):
    argv = [
        "--data", str(corpus), "--out", str(tmp_path), "--steps", "2", "--batch-size", "2", "--vocab-size", "300",
        "--val-windows", "2", "--val-every-doc", "5", "--no-progress", "--no-plots", "--arms", "adamw,adamw_pc",
        "--sweep-adamw", "1e-4,3e-3", *TINY_MODEL,
    ]  # fmt: skip
    summary = token_efficiency.main(argv)
    sweep = summary["lr_sweep"]["adamw"]
    assert [s["lr"] for s in sweep] == [1e-4, 3e-3]
    best = min(sweep, key=lambda s: s["final_val_loss"])
    assert summary["lr"]["adamw"] == best["lr"]
    assert summary["arms"]["adamw"]["lr"] == summary["arms"]["adamw_pc"]["lr"] == best["lr"]
    assert summary["arms"]["adamw"]["final_val_loss"] == best["final_val_loss"]


def test_token_efficiency_rejects_unknown_arm(corpus):
    with pytest.raises(SystemExit):
        token_efficiency.parse_args(["--data", str(corpus), "--arms", "adamw,sgd"])


def test_tokens_to_reach_and_ratio():
    tokens = [0, 10, 20, 30]
    base = {"final_val_loss": 2.5, "curve": {"tokens": tokens, "val_loss": [5.0, 4.0, 3.0, 2.5]}}
    faster = {"final_val_loss": 2.0, "curve": {"tokens": tokens, "val_loss": [5.0, 3.0, 2.0, 2.0]}}
    slower = {"final_val_loss": 2.8, "curve": {"tokens": tokens, "val_loss": [5.0, 4.5, 3.5, 2.8]}}
    r = token_efficiency.token_ratio(base, faster)
    assert r["tokens_baseline"] == 30 and r["tokens_pc"] == pytest.approx(15.0)  # midway between 3.0 and 2.0
    assert r["ratio"] == pytest.approx(2.0) and r["bound"] is None
    r = token_efficiency.token_ratio(base, slower)
    assert r["bound"] == "upper" and r["ratio"] == pytest.approx(1.0) and r["tokens_pc"] is None
    assert r["ratio_at_pc_final_loss"] == pytest.approx(24 / 30)  # baseline hits 2.8 at 20 + 10 * 0.2 / 0.5
    assert token_efficiency.tokens_to_reach(tokens, [3.0, 2.0, 1.0, 0.5], 3.0) == 0.0


def test_lr_schedule_matches_the_recipe():
    total = 200  # warmup = 2 steps
    assert C.lr_factor(0, total) == pytest.approx(1 / 3)
    assert C.lr_factor(1, total) == pytest.approx(2 / 3)
    assert C.lr_factor(2, total) == pytest.approx(1.0)
    assert C.lr_factor(101, total) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 99 / 198)))
    assert C.lr_factor(total, total) == pytest.approx(0.1)


def test_pc_overhead_paths(tmp_path):
    argv = [
        "--accum", "1,2", "--steps", "1", "--warmup", "0", "--micro-batch", "2", "--vocab-size", "64",
        "--poly", "--poly-reps", "1", "--component-reps", "1", "--poly-extra-shapes", "", "--dtype", "fp32", "--out", str(tmp_path), *TINY_MODEL,
    ]  # fmt: skip
    res = pc_overhead.main(argv)
    assert [r["accum"] for r in res["accum"]] == [1, 2]
    for r in res["accum"]:
        assert r["ratio_pc"] > 0 and r["ratio_pc_once"] > 0
        assert r["components"]["pc_weights"] == 4  # wo, w1, w2, w3 of the single layer
    assert json.loads((tmp_path / "results_adamw_fp32.json").read_text())["accum"][1]["accum"] == 2
    # Both variants compute the same polynomial.
    fp32 = [row for row in res["polynomial"] if row["dtype"] == "float32"]
    assert fp32 and all(row["max_rel_diff_fwd"] < 1e-5 and row["max_rel_diff_grad"] < 1e-5 for row in fp32)


def test_inplace_polynomial_matches_reference_float64():
    g = torch.Generator().manual_seed(0)
    for shape in ((24, 10), (10, 24), (3, 8, 12)):
        X = torch.randn(*shape, generator=g, dtype=torch.float64) / 4
        for degree in (3, 5, 9):
            c = pcopt.polynomial(degree)
            torch.testing.assert_close(
                pc_overhead.apply_polynomial_inplace(X, c), _svd_polynomial(X, c), rtol=1e-10, atol=1e-12
            )


def _svd_polynomial(X, coefficients):
    """Independent reference: apply the odd polynomial to the singular values."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    p = sum(a * S ** (2 * j + 1) for j, a in enumerate(coefficients))
    return (U * p.unsqueeze(-2)) @ Vh


def test_muon_step_peers_smoke(capsys):
    """``benchmarks/muon_step.py --peers --smoke``: every arm either runs (time, FLOPs, float64 difference) or
    says why it cannot; pcopt with torch's arguments makes torch's exact update."""
    from benchmarks import muon_step

    muon_step.main(["--peers", "--smoke"])
    table = capsys.readouterr().out
    for name in muon_step.PEERS:
        assert f"| {name} |" in table, name

    shapes = muon_step.matrix_shapes(16, 44, 1)
    kwargs = {"lr": 0.02, "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw"}
    res = muon_step.peers(shapes, 1, kwargs)
    ran = {k: r for k, r in res.items() if "why" not in r}
    assert {"torch.optim.Muon", "pcopt Muon (torch args)", "pcopt build_optimizer"} <= set(ran)
    assert all(r["why"] for k, r in res.items() if k not in ran)  # a reason, not an empty row
    # Bitwise-equal steps recover bitwise-equal updates.
    assert ran["pcopt Muon (torch args)"]["diff"] == ran["torch.optim.Muon"]["diff"]
    # Bound on the bf16 arms' distance from the float64 update, as the Newton-Schulz quality guard derives it
    # (tests/unit/test_newton_schulz.py) with n = 16 rows: one bf16 rounding of the 16 x 44 result moves it by
    # ||E||_2 <= 2^-8 * 1.3 * sqrt(16) = 0.020, and the last step's rounded inputs reach it through |p'| <= 1.7,
    # so every entry moves by at most 0.020 * 2.7 = 0.055. A wrong lr scale (sqrt(44) * 0.2 = 1.33 vs
    # sqrt(44/16) = 1.66) or orientation would move entries of size ~0.3 by >= 20%, far above it.
    for name, r in ran.items():
        assert 0 < r["diff"] <= 0.055, (name, r["diff"])
        assert r["wall"] > 0 and r["flops"] > 0


def test_muon_step_same_work_smoke(capsys):
    """``--same-work``: the A/A pair does identical work, and pcopt with torch's arguments runs torch's matmuls
    and FLOPs on matrices too large to stack on a CPU (140000 elements > 131072; small side 2, so it is fast)."""
    from benchmarks import muon_step

    muon_step.main(["--same-work", "--smoke"])
    assert "| pcopt Muon (torch args) |" in capsys.readouterr().out
    kwargs = {"lr": 0.02, "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw"}
    res = muon_step.same_work([(2, 70000), (70000, 2)], 3, kwargs)
    a, b, ours = res["torch.optim.Muon (A)"], res["torch.optim.Muon (B)"], res["pcopt Muon (torch args)"]
    assert (a["ops"], a["matmuls"], a["flops"]) == (b["ops"], b["matmuls"], b["flops"])
    # 2 matrices x 5 steps: per step one X X^T (mm) and two addmm
    assert ours["matmuls"] == a["matmuls"] == {"aten::mm": 10, "aten::addmm": 20}
    assert ours["flops"] == a["flops"] > 0
    assert all(r["cpu"] > 0 for r in res.values())


def test_muon_step_ddp_peers_smoke():
    """``--peers --ranks 2``: the data-parallel layout on 2 gloo ranks. pcopt on Replicate DTensors makes the
    exact update of pcopt on plain tensors (each matrix once in the world) with 2 all-to-alls per step, the
    per-rank arms make none, and a peer that cannot run says why."""
    from benchmarks import muon_step

    shapes = muon_step.matrix_shapes(16, 44, 1)
    kwargs = {"lr": 0.02, "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw"}
    res = muon_step.ddp_peers(shapes, 1, kwargs, world_size=2)
    plain, replicated = (
        res[f"pcopt Muon, torch's args, {k}"] for k in ("plain tensors", "Replicate DTensors")
    )
    assert replicated["diff"] == plain["diff"] == res["torch.optim.Muon (every rank, every matrix)"]["diff"]
    assert replicated["comm"] == {"alltoall_base_": 2} and plain["comm"] == {}
    assert res["torchtitan 0.3 DistMuon"]["why"] and res["microsoft/dion Muon"]["why"]
    for name, r in res.items():
        if "why" not in r:  # the bound of test_muon_step_peers_smoke (same shapes, bf16 Newton-Schulz)
            assert 0 < r["diff"] <= 0.055 and r["wall"] > 0, (name, r)


def test_pc_layouts_smoke(capsys):
    """``benchmarks/pc_layouts.py --smoke`` on 4 gloo ranks: per layout the PC step's FLOPs and all-reduced bytes
    per rank follow docs/scale.md's formula (bytes exactly: every element of the Grams, sigmas and power-iteration
    vectors), the Grams are summed over the whole
    sharding group (4 ranks; the 2 shards of a replica under HSDP) in one all-reduce per shape group."""
    from benchmarks import pc_layouts

    res = pc_layouts.main(["--smoke"])
    table = capsys.readouterr().out
    for layout in pc_layouts.LAYOUTS:
        r, f = res[layout], res[layout]["formula"]
        assert f"| {layout} |" in table, layout
        # the formula leaves out sigma = u^T A v (2 m n / P per matrix, in the pull-back and the map) and the
        # elementwise scalings: 0.5% of these sizes, less at larger n
        assert f["flops"] <= r["flops"] <= 1.01 * f["flops"], (layout, r["flops"], f["flops"])
        assert r["bytes"] == f["bytes"] and r["ring_bytes"] == f["ring_bytes"], (layout, r, f)
        assert r["groups"] == ([2] if layout == "hsdp" else [4]), (layout, r["groups"])
        # 1 layer: w1/w3 stacked and w2, one Gram all-reduce each in the pull-back and the map, and 2 vector
        # all-reduces per power iteration (10) for all three matrices
        assert r["all_reduces"] == 2 + 2 + 2 * 10, (layout, r["all_reduces"])
        assert r["time"] > 0


def test_pc_experts_smoke(capsys):
    """``benchmarks/pc_experts.py --smoke``: PC on a MoE layer's stacks costs docs/scale.md's 2-D formula per expert,
    its op count is the same at E and 2E experts, it reads nothing on the host, and pcopt's batched Muon equals
    torch.optim.Muon looped over the experts (same defaults: bitwise) with the same FLOPs."""
    from benchmarks import pc_experts

    res = pc_experts.main(["--smoke"])
    assert "PC  smoke" in capsys.readouterr().out
    # the plain w1/w2/w3 stacks, and gpt_oss's layout (mlp1's rows interleaving gate and up: the same 3 E matrices)
    assert [r["fused"] for r in res["pc"]] == [False, True]
    for pc, muon in zip(res["pc"], res["muon"]):
        # uncounted by the formula: sigma = u^T A v in the map and the pull-back (4 m n of 12 m n^2 per matrix) and
        # the elementwise scalings, so the ratio exceeds 1 by about 1 / (3 n): 1.4% at n = 24
        n = min(pc["D"], pc["F"])
        assert 1 <= pc["flops_ratio"] <= 1 + 1 / n, pc
        assert pc["ops"] == pc["ops_2x_experts"] and pc["syncs"] == 0, pc
        assert muon["update_rel_diff"] == 0 and muon["flops_pcopt"] == muon["flops_torch"] > 0, muon
