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

from tests.torchtitan._harness import torchrun

pytestmark = [pytest.mark.torchtitan, pytest.mark.slow]

STEPS = 6
# Bound: inductor fuses and reorders the blocks' fp32 reductions (a few ulps, ~1e-6 relative, per step), which 6
# steps of fp32 Muon carry into losses of ~8 nats: the same computation as test_torch_compile_matches_eager in
# tests/unit/test_default_loop.py (measured there 4.8e-7 over 20 steps, bound 1e-4); the log prints 5 decimals,
# adding up to 1e-5. Measured here: equal to every printed digit at all 6 steps. The losses fall by > 1 over the
# 6 steps, four orders of magnitude above the bound.
LOSS_BOUND = 1e-4


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
    worst = max(abs(compiled.losses[s] - eager.losses[s]) for s in eager.losses)
    assert worst <= LOSS_BOUND, (eager.losses, compiled.losses)
    assert eager.losses[STEPS] < eager.losses[1] - 1.0, eager.losses  # it trains
