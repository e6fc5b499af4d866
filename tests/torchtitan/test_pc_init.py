"""The PC model as torchtitan builds it (meta build -> PC attach -> FSDP2 -> to_empty -> init), on 2 gloo ranks.

Checks that the raw weights get the baseline's initialisation (torchtitan's Llama init: std 0.02,
depth-scaled 0.02 / sqrt(2 (layer + 1)) for wo, w2, w3), that gamma and u, v are valid after ``to_empty``,
and that a dense DCP checkpoint loads into the PC raw weights through ``PCCheckpointManager``; in both
strategies (``debug_adamw_pc``: once per step, ``debug_adamw_pc_per_forward``).

The raw weights equal the baseline's bit for bit wherever they are sharded as the baseline's weights are
(``Shard(0)``). On a CPU mesh torchtitan draws each rank's shard from that rank's generator, so a matrix
sharded otherwise gets another draw of the same distribution: the once-per-step strategy shards w2 and wo
on their larger dim 1 (its Gram is then local on the small side), so for those only the std is checked.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests._distributed import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.torchtitan]


def _build(config_name: str, parallel_dims, dump: str):
    from torchtitan_ext import config_registry
    from torchtitan_ext.pc import parallelize_llama_pc

    cfg = getattr(config_registry, config_name)()
    with torch.device("meta"):
        model = cfg.model_spec.model.build()
    model = parallelize_llama_pc(
        model,
        parallel_dims=parallel_dims,
        training=cfg.training,
        parallelism=cfg.parallelism,
        compile_config=cfg.compile,
        ac_config=None,
        dump_folder=dump,
    )
    model.to_empty(device="cpu")
    torch.manual_seed(42)
    with torch.no_grad():
        model.init_weights()
    return model


def _refreshed_uv(W: torch.Tensor, iterations: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference: ``iterations`` power iterations on the full W from pcopt's deterministic start."""
    from pcopt.power_iteration import init_singular_vectors

    u, v = (x.double() for x in init_singular_vectors(W.shape))
    W = W.detach().double()
    for _ in range(iterations):
        v = W.T @ u
        v = v / v.norm()
        u = W @ v
        u = u / u.norm()
    return u, v


def _assert_refreshed(pcm, W: torch.Tensor, what: str) -> None:
    u, v = _refreshed_uv(W)
    assert torch.allclose(pcm.u.double(), u, atol=1e-4), what
    assert torch.allclose(pcm.v.double(), v, atol=1e-4), what
    # ... and the estimate is a lower bound on sigma_1 (10 iterations from a random start).
    sigma = float(u @ W.double() @ v)
    assert 0.8 < sigma / float(torch.linalg.svdvals(W.double())[0]) <= 1 + 1e-9, what


def _pc_init_worker(rank: int, world_size: int, dump: str, pc_config: str) -> None:
    from torchtitan_ext.compat import install_cpu_shims

    install_cpu_shims()
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as dist_utils

    import pcopt
    from torchtitan_ext.checkpoint import PCCheckpointManager

    dist_utils.set_spmd_backend("partial_dtensor")
    pd = ParallelDims(
        dp_replicate=1,
        dp_shard=2,
        cp=1,
        tp=1,
        pp=1,
        ep=1,
        world_size=world_size,
        spmd_backend="partial_dtensor",
    )
    pd.build_mesh()
    base = _build("debug_adamw", pd, dump)
    pc = _build(pc_config, pd, dump)

    # --- init: raw weights == baseline weights, per-layer std as torchtitan's Llama init --------------
    pcs = dict(pcopt.preconditioners(pc))
    assert len(pcs) == 24, sorted(pcs)
    base_params = dict(base.named_parameters())
    for fqn, mod in pc.named_modules():
        if not pcopt.is_preconditioned(mod):
            continue
        clean = fqn.replace("_checkpoint_wrapped_module.", "")
        raw = mod.parametrizations.weight.original
        base_weight = base_params[f"{fqn}.weight"]
        assert isinstance(raw, DTensor) and raw.placements[0].is_shard(), "raw weight must be FSDP2-sharded"
        W = raw.full_tensor()
        if raw.placements == base_weight.placements:
            assert torch.equal(W, base_weight.full_tensor()), fqn
        else:  # once per step, w2 / wo: Shard(1), another draw (module docstring)
            assert pc_config == "debug_adamw_pc" and raw.placements[0].dim == 1, (fqn, raw.placements)
        layer = int(clean.split(".")[1])
        expected = 0.02 if clean.endswith("w1") else 0.02 / math.sqrt(2 * (layer + 1))
        assert abs(W.std().item() / expected - 1) < 0.03, (clean, W.std().item(), expected)
        pcm = mod.parametrizations.weight[0]
        assert torch.equal(pcm.gamma.full_tensor(), torch.ones(1)), fqn
        _assert_refreshed(pcm, W, fqn)
    effective = {id(p) for p in pcopt.effective_parameters(pc)}  # once per step: W_eff, computed from raw W
    for name, p in pc.named_parameters():  # everything that is not PC is identical too
        if "parametrizations" not in name and id(p) not in effective:
            assert torch.equal(p.full_tensor(), base_params[name].full_tensor()), name

    # --- a dense checkpoint starts the PC model: dense W -> raw W, gamma -> 1, u, v refreshed ----------
    with torch.no_grad():
        for p in base.parameters():
            p.mul_(1.5)
        for _, pcm in pcs.items():
            pcm.gamma.fill_(3.0)
            pcm.u.fill_(1.0)
    dense_dir = f"{dump}/dense/step-1"
    dcp.save(base.state_dict(), checkpoint_id=dense_dir)
    manager = PCCheckpointManager.Config(enable=True, folder="pc_ckpt", initial_load_path=dense_dir).build(
        dataloader=None,
        model_parts=[pc],
        optimizers=None,
        lr_schedulers=None,
        states={},
        sd_adapter=None,
        base_folder=dump,
    )
    try:
        assert manager.load() is True
    finally:
        manager.close()
    for fqn, mod in pc.named_modules():
        if not pcopt.is_preconditioned(mod):
            continue
        W = mod.parametrizations.weight.original.full_tensor()
        assert torch.equal(W, base_params[f"{fqn}.weight"].full_tensor()), fqn
        pcm = mod.parametrizations.weight[0]
        assert torch.equal(pcm.gamma.full_tensor(), torch.ones(1)), fqn
        _assert_refreshed(pcm, W, fqn)
    for name, p in pc.named_parameters():
        if "parametrizations" not in name and id(p) not in effective:
            assert torch.equal(p.full_tensor(), base_params[name].full_tensor()), name


@pytest.mark.parametrize("pc_config", ["debug_adamw_pc", "debug_adamw_pc_per_forward"])
def test_pc_init_and_dense_checkpoint_start(tmp_path, pc_config):
    run_distributed(_pc_init_worker, str(tmp_path), pc_config, world_size=2)
