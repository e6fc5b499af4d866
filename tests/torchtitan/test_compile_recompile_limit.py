"""Per forward under torchtitan's per-block compile past 8 PC blocks, in one process (no torchrun).

``parametrize`` gives every PC module its own class; dynamo guards on it, so compiling each block with
``fullgraph=True`` (as torchtitan's ``apply_compile`` does) compiles the same code once per block and fails with
``FailOnRecompileLimitHit`` past ``torch._dynamo.config.recompile_limit`` (8). ``parallelize_with_pc`` raises the
limit for a per-forward run with compile on (``allow_per_block_recompiles``).

The compile test uses pcopt's TinyLlama (SDPA) and dynamo's ``"eager"`` backend: the limit is dynamo's, checked
before any backend runs (15 s here for 10 blocks), and torchtitan's debug Llama uses flex_attention, which refuses a
backward on the CPU under that backend ("FlexAttention does not support backward on CPU"). The wiring test builds torchtitan's debug Llama and records the limit that its
``parallelize_fn`` sees.
"""

from __future__ import annotations

import types

import pytest
import torch

pytestmark = pytest.mark.torchtitan

pytest.importorskip("torchtitan")

import pcopt  # noqa: E402
from pcopt.demo import TinyLlama  # noqa: E402
from torchtitan_ext.pc import _STOCK_RECOMPILE_LIMIT, allow_per_block_recompiles  # noqa: E402

N_BLOCKS = 10  # past the stock limit of 8 recompilations
COMPILE_ON = types.SimpleNamespace(enable=True, components=["model", "loss"])
COMPILE_OFF = types.SimpleNamespace(enable=False, components=["model", "loss"])


def _compile_blocks_and_step(raise_limit: bool) -> str:
    """Forward + backward of a per-forward PC TinyLlama whose blocks are compiled one by one as torchtitan does;
    ``"ok"`` or the exception's type name."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyLlama(vocab=64, dim=32, n_layers=N_BLOCKS, n_heads=2, hidden=64)
    pcopt.precondition_model(model, degree=5, strategy="per_forward")
    for block in model.layers:
        block.compile(backend="eager", fullgraph=True)
    if raise_limit:
        assert allow_per_block_recompiles(model, COMPILE_ON) == N_BLOCKS + _STOCK_RECOMPILE_LIMIT
    try:
        model(torch.randint(0, 64, (2, 9))).sum().backward()
    except torch._dynamo.exc.FailOnRecompileLimitHit as e:
        return type(e).__name__
    return "ok"


def test_per_forward_block_compile_past_the_limit_fails_without_the_raise_and_runs_with_it():
    stock = dict(recompile_limit=_STOCK_RECOMPILE_LIMIT, accumulated_recompile_limit=256)
    with torch._dynamo.config.patch(**stock):  # restored afterwards: the raise is process-wide
        assert _compile_blocks_and_step(raise_limit=False) == "FailOnRecompileLimitHit"
        assert _compile_blocks_and_step(raise_limit=True) == "ok"
        assert torch._dynamo.config.recompile_limit == N_BLOCKS + _STOCK_RECOMPILE_LIMIT
    torch._dynamo.reset()


def test_allow_per_block_recompiles_only_with_model_compile_and_never_lowers():
    model = TinyLlama(vocab=64, dim=32, n_layers=N_BLOCKS, n_heads=2, hidden=64)
    with torch._dynamo.config.patch(recompile_limit=_STOCK_RECOMPILE_LIMIT):
        assert allow_per_block_recompiles(model, None) is None
        assert allow_per_block_recompiles(model, COMPILE_OFF) is None
        loss_only = types.SimpleNamespace(enable=True, components=["loss"])  # blocks not compiled
        assert allow_per_block_recompiles(model, loss_only) is None
        assert torch._dynamo.config.recompile_limit == _STOCK_RECOMPILE_LIMIT
    with torch._dynamo.config.patch(recompile_limit=64):  # a user's higher limit stays
        assert allow_per_block_recompiles(model, COMPILE_ON) is None
        assert torch._dynamo.config.recompile_limit == 64


@pytest.mark.parametrize("compile_config", [COMPILE_ON, COMPILE_OFF], ids=["compile", "eager"])
def test_parallelize_with_pc_raises_the_limit_for_per_forward_compile(compile_config, caplog):
    from torchtitan.config import ParallelismConfig

    from torchtitan_ext.config_registry import llama2_model
    from torchtitan_ext.pc import PCConverter, attach_pc, parallelize_with_pc

    spec = llama2_model("debug", pc=PCConverter.Config(degree=5, mode="per_forward"))
    spec.model.layers = [spec.model.layers[0]] * N_BLOCKS
    with torch.device("meta"):
        model = spec.model.build()
    attach_pc(model)
    seen = {}

    def parallelize_fn(m, **kwargs):  # records what torchtitan's apply_compile would run under
        seen["limit"] = torch._dynamo.config.recompile_limit
        seen["compile_config"] = kwargs["compile_config"]
        return m

    dims = types.SimpleNamespace(cp_enabled=False, tp_enabled=False, ep_enabled=False, pp_enabled=False)
    with torch._dynamo.config.patch(recompile_limit=_STOCK_RECOMPILE_LIMIT), caplog.at_level("INFO"):
        model = parallelize_with_pc(
            model,
            parallelize_fn=parallelize_fn,
            parallel_dims=dims,
            parallelism=ParallelismConfig(spmd_backend="partial_dtensor"),
            compile_config=compile_config,
        )
    assert pcopt.strategy_of(model) == "per_forward"
    assert seen["compile_config"] is compile_config
    if compile_config.enable:
        assert seen["limit"] == N_BLOCKS + _STOCK_RECOMPILE_LIMIT
        assert f"recompile_limit raised to {N_BLOCKS + _STOCK_RECOMPILE_LIMIT}" in caplog.text
    else:
        assert seen["limit"] == _STOCK_RECOMPILE_LIMIT and "recompile_limit" not in caplog.text
