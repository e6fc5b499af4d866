"""torchtitan's ``--compile.enable`` on a ``_pc`` config (``debug_muon_pc``: PC once per step, FSDP2, 2 gloo ranks).

torchtitan compiles each TransformerBlock (and the loss) after PC is attached and before ``fully_shard``, so dynamo
sees the once-per-step model's plain Linears; the pull-back and refresh stay outside the compiled blocks. The
compiled run is checked against the eager run of the same config, seed and data: same losses within a bound, no
graph break and no recompilation in the log.

Both runs use ``--training.mixed_precision_param float32``. With the config's bf16 parameters FSDP2 hands the
blocks bf16 weights; eager then rounds every op's output to bf16, while inductor computes each fused chain in fp32
and rounds once, so the two differ by bf16 roundings that have nothing to do with PC (measured on the AMD EPYC
here: 7e-5 at step 1, before any update, and 9.8e-4 at step 2 of 4). In fp32 the only difference is the order of
inductor's fp32 reductions.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.torchtitan._harness import torchrun

pytestmark = [pytest.mark.torchtitan, pytest.mark.slow]

STEPS = 6
# Bound, two parts.
# * fp32: inductor fuses and reorders the blocks' fp32 reductions (a few ulps, ~1e-6 relative, per step), which 6
#   steps carry into losses of ~8 nats: the same computation as test_torch_compile_matches_eager in
#   tests/unit/test_default_loop.py (measured there 4.8e-7 over 20 steps, bound 1e-4); the log prints 5 decimals,
#   adding up to 1e-5. Measured on an AVX2 AMD EPYC (fp32 Newton-Schulz): equal to every printed digit.
# * Newton-Schulz in bf16 (pcopt.hardware.preferred_dtype: CPUs with native bf16, e.g. AVX-512 BF16 / AMX): a
#   reordered fp32 gradient flips bf16 roundings inside Newton-Schulz, so an update may differ by up to bf16's unit
#   roundoff u = 2**-8 relative. An update that lowers the loss by d then lowers it by d (1 +- u): after k updates
#   the losses differ by at most u * (sum of the k per-step drops), i.e. u * (loss[1] - loss[k+1]) when every step
#   descends (coherent worst case; the flips have random signs, so the typical gap is far smaller). Measured on an
#   AVX-512 BF16 AMD EPYC: 1.6e-4 at step 6, against u * 1.2 = 4.7e-3 there.
# A real difference (W_eff not refreshed after a compiled step, PC missing in the compiled blocks) moves step 2's
# loss by the size of a whole update's effect (~0.16 here), 30x the bf16 bound.
FP32_BOUND = 1e-4


def _bound(losses: dict[int, float]) -> float:
    from pcopt.hardware import preferred_dtype

    u = {torch.bfloat16: 2.0**-8, torch.float32: 0.0}[preferred_dtype("cpu")]
    return FP32_BOUND + u * sum(abs(losses[s] - losses[s + 1]) for s in range(1, STEPS))


def test_compile_enable_on_a_pc_config_matches_eager(tmp_path, monkeypatch):
    # dynamo's own log: "graph_breaks" and "recompiles" report what they name; "dynamo" (INFO) reports every
    # traced frame, which shows the log is captured at all
    monkeypatch.setenv("TORCH_LOGS", "dynamo,graph_breaks,recompiles")
    common = ("--training.steps", str(STEPS), "--training.mixed_precision_param", "float32")
    eager = torchrun("debug_muon_pc", tmp_path / "eager", *common).check()
    compiled = torchrun(
        "debug_muon_pc", tmp_path / "compiled", *common, "--compile.enable", timeout=600
    ).check()
    assert "Compiling each TransformerBlock with torch.compile" in compiled.log
    assert "Compiling each TransformerBlock" not in eager.log
    assert "PC layer on 24 matrices, once_per_step (FSDP2 shards)" in compiled.log
    assert re.search(r"torchdynamo done tracing", compiled.log), compiled.log[-4000:]
    breaks = re.findall(r"[Gg]raph break.*", compiled.log)
    recompiles = re.findall(r"Recompiling function.*", compiled.log)
    assert not breaks and not recompiles, (breaks[:3], recompiles[:3])
    assert sorted(compiled.losses) == sorted(eager.losses) == list(range(1, STEPS + 1))
    assert abs(compiled.losses[1] - eager.losses[1]) <= FP32_BOUND, (
        eager.losses,
        compiled.losses,
    )  # no update yet
    worst = max(abs(compiled.losses[s] - eager.losses[s]) for s in eager.losses)
    assert worst <= _bound(eager.losses), (worst, _bound(eager.losses), eager.losses, compiled.losses)
    assert eager.losses[STEPS] < eager.losses[1] - 1.0, eager.losses  # it trains
