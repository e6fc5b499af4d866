"""PC layer under FSDP2 on 2 gloo ranks, compared with the same model unsharded."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import pcopt
from tests._distributed import run_distributed
from tests.conftest import FeedForward

pytestmark = pytest.mark.distributed


class _Layer(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.feed_forward = FeedForward(dim, hidden)
        self.norm = nn.RMSNorm(dim)

    def forward(self, x):
        return x + self.feed_forward(self.norm(x))


def _model(seed: int = 0, dim: int = 24, hidden: int = 40) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Module()
    model.layers = nn.ModuleList([_Layer(dim, hidden) for _ in range(2)])
    model.forward = lambda x: model.layers[1](model.layers[0](x))  # type: ignore[method-assign]
    return model


def _shard(model: nn.Module, **kwargs) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _parity(rank: int, world: int) -> None:
    from torch.distributed.tensor import DTensor

    ref = _model()
    pcopt.precondition_model(ref, strategy="per_forward")
    sharded = _model()
    pcopt.precondition_model(sharded, strategy="per_forward")
    _shard(sharded)
    raw = sharded.layers[0].feed_forward.w1.parametrizations.weight.original
    assert isinstance(raw, DTensor) and raw.placements[0].is_shard(0)

    torch.manual_seed(100)
    x = torch.randn(2 * world, 5, 24)
    mine = x[rank * 2 : (rank + 1) * 2]
    out = sharded.forward(mine)
    out_ref = ref.forward(x)
    assert torch.allclose(out, out_ref[rank * 2 : (rank + 1) * 2], rtol=1e-5, atol=1e-6)

    out.pow(2).mean().backward()
    out_ref.pow(2).mean().backward()  # mean over the full batch == average of the per-rank means
    ref_params = dict(ref.named_parameters())
    for name, p in sharded.named_parameters():
        assert torch.allclose(p.grad.full_tensor(), ref_params[name].grad, rtol=1e-5, atol=1e-7), name

    for model in (ref, sharded):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        opt.step()
        pcopt.refresh(model)
    for name, p in sharded.named_parameters():
        assert torch.allclose(p.full_tensor(), ref_params[name], rtol=1e-5, atol=1e-7), name
    ref_buffers = dict(ref.named_buffers())
    for name, b in sharded.named_buffers():
        assert torch.allclose(b, ref_buffers[name], rtol=1e-4, atol=1e-6), name
        gathered = [torch.empty_like(b) for _ in range(world)]
        dist.all_gather(gathered, b)
        assert torch.equal(gathered[0], gathered[1]), f"{name} differs across ranks"
    # After a step the parameters differ by a few fp32 ulps (sharded vs whole-matrix reductions, and the
    # power iteration's order of sums), so each output entry carries an error of order
    # (reduction length ~ 40) * eps32 (6e-8) * (largest output entry ~ 2): bounded by 1e-5 of the largest entry.
    after, after_ref = sharded.forward(mine), ref.forward(x)[rank * 2 : (rank + 1) * 2]
    assert torch.allclose(after, after_ref, rtol=0, atol=1e-5 * float(after_ref.abs().max()))

    late = _shard(_model())
    with pytest.raises(ValueError, match=r"already sharded \(fully_shard was applied\).*before fully_shard"):
        pcopt.precondition(late.layers[0].feed_forward.w1)


def test_fsdp2_matches_unsharded_forward_backward_step_refresh():
    run_distributed(_parity)


def _mixed_precision(rank: int, world: int) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    ref = _model()
    pcopt.precondition_model(ref, strategy="per_forward")
    bf = _model()
    pcopt.precondition_model(bf, strategy="per_forward")
    _shard(bf, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    torch.manual_seed(1)
    x = torch.randn(2, 5, 24)
    out = bf.forward(x.bfloat16()).float()
    expected = ref.forward(x)
    assert torch.isfinite(out).all()
    assert float((out - expected).norm() / expected.norm()) < 3e-2
    out.pow(2).mean().backward()
    grad = bf.layers[0].feed_forward.w1.parametrizations.weight.original.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad.full_tensor()).all()


def test_fsdp2_bf16_mixed_precision_forward():
    run_distributed(_mixed_precision)


def _dcp_round_trip(rank: int, world: int, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model = _model()
    pcopt.precondition_model(model, strategy="per_forward")
    _shard(model)
    with torch.no_grad():
        model.layers[0].feed_forward.w1.parametrizations.weight[0].gamma.fill_(0.9)
    before = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
        for k, v in get_model_state_dict(model).items()
    }
    assert any(k.endswith("parametrizations.weight.0.u") for k in before)
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=path)

    other = _model(seed=7)
    pcopt.precondition_model(other, strategy="per_forward")
    _shard(other)
    state = {"model": get_model_state_dict(other)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(other, state["model"])
    after = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v)
        for k, v in get_model_state_dict(other).items()
    }
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_fsdp2_dcp_round_trip_is_exact(tmp_path):
    run_distributed(_dcp_round_trip, str(tmp_path / "ckpt"))


def _sharded_refresh(rank: int, world: int) -> None:
    from torch.distributed.fsdp import fully_shard

    shapes = [(64, 48), (48, 64), (66, 50)]  # the last one shards unevenly
    g = torch.Generator().manual_seed(0)
    holder = nn.ModuleList()
    refs = []
    for i, (m, n) in enumerate(shapes):
        U, _ = torch.linalg.qr(torch.randn(m, 4, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(n, 4, generator=g, dtype=torch.float64))
        W = (U * torch.tensor([2.0 + i, 1.0, 0.5, 0.1], dtype=torch.float64)) @ V.T
        lin = nn.Linear(n, m, bias=False)
        with torch.no_grad():
            lin.weight.copy_(W)
        pcopt.precondition(lin)
        holder.append(lin)
        refs.append(torch.linalg.matrix_norm(W, 2).item())
    for lin in holder:
        fully_shard(lin)

    sizes = []
    patched = {}
    for fn_name in (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "broadcast",
        "reduce_scatter_tensor",
        "all_to_all",
    ):
        original = getattr(dist, fn_name)
        patched[fn_name] = original

        def record(*args, _orig=original, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
            sizes.append(max((t.numel() for t in tensors), default=0))
            return _orig(*args, **kwargs)

        setattr(dist, fn_name, record)
    try:
        # the PC state owner batches all of the model's PC weights, in named_modules order on every rank
        assert pcopt.PCState(holder, num_power_iterations=40).after_step() == 3
    finally:
        for fn_name, original in patched.items():
            setattr(dist, fn_name, original)
    # one all-reduce per half-iteration, carrying the concatenated vectors of all three matrices
    assert len(sizes) == 80
    assert max(sizes) <= sum(max(s) for s in shapes) < min(m * n for m, n in shapes)
    for lin, sigma in zip(holder, refs):
        pc = lin.parametrizations.weight[0]
        full = lin.parametrizations.weight.original.full_tensor().double()
        assert abs(float(pc.u.double() @ full @ pc.v.double()) - sigma) / sigma < 1e-6
        gathered = [torch.empty_like(pc.u) for _ in range(world)]
        dist.all_gather(gathered, pc.u)
        assert torch.equal(gathered[0], gathered[1])


def test_sharded_refresh_uses_vector_collectives_and_matches_svd():
    run_distributed(_sharded_refresh)
