"""PCState.accumulate: one W_eff per optimizer step, gradients equal to per-micro-batch backward."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import pcopt
import pcopt.kernel as pc_kernel
import pcopt.layer as pc_layer
from tests._distributed import run_distributed


def once_per_step(model):
    return pcopt.PCState(model).accumulate()


def test_the_old_name_warns_and_does_the_same():
    net = _Net()
    pcopt.precondition_model(net, targets=r"^(inp|mid|out)$", strategy="per_forward")
    with pytest.warns(DeprecationWarning, match=r"pcopt\.PCState\(model\)\.accumulate\(\)"):
        with pcopt.accumulation.once_per_step(net):
            assert pcopt.strategy_of(net) == "once_per_step"  # inside the block, W_eff is written once
            _loss(net, (torch.randn(5, 12), torch.randn(5, 3))).backward()
    assert pcopt.strategy_of(net) == "per_forward"
    assert net.inp.parametrizations.weight.original.grad is not None  # pulled back on exit


class _Net(nn.Module):
    def __init__(self, dtype=torch.float32) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 24, bias=False, dtype=dtype)  # wide weight (out > in is tall: 24x12)
        self.mid = nn.Linear(24, 40, bias=False, dtype=dtype)
        self.out = nn.Linear(40, 7, bias=True, dtype=dtype)  # wide 7x40
        self.head = nn.Linear(7, 3, bias=False, dtype=dtype)  # not preconditioned

    def forward(self, x):
        return self.head(torch.tanh(self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))))


def _make(dtype=torch.float32, degree=9):
    torch.manual_seed(0)
    net = _Net(dtype)
    for name in ("inp", "mid", "out"):
        pcopt.precondition(getattr(net, name), degree=degree)
    with torch.no_grad():  # gamma away from 1, so its gradient path is exercised non-trivially
        for i, (_, pc) in enumerate(pcopt.preconditioners(net)):
            pc.gamma.fill_(0.7 + 0.2 * i)
    return net


def _micro_batches(dtype, n=4):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(5, 12, generator=g, dtype=dtype), torch.randn(5, 3, generator=g, dtype=dtype))
        for _ in range(n)
    ]


def _loss(net, batch):
    x, y = batch
    return ((net(x) - y) ** 2).mean()


def _grads(net):
    return {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


# Tolerance: both paths evaluate the same sums in a different order (the 4 micro-batch terms are added before
# vs after the polynomial's backward), so they differ by rounding only. Per element, each path's error is at most
# about sqrt(n) * u * (largest term) (Higham's probabilistic bound), with n the additions along the longest chain:
# the degree-d polynomial's backward chains about d matmuls of reduction length <= 40 (the widest side), so
# n <= 9 * 40 = 360 and sqrt(n) < 19; two paths: < 38 u. Cancellation makes the error of a small element scale
# with the tensor's largest terms, so the bound is relative to max|g|, not to |g| per element (an element-wise
# rtol is what failed on an Intel AMX CPU: 1.18e-7 on a small element). 64 u * max|g| rounds 38 u up; measured:
# at most 8.7 u * max|g| on AMD AVX-512 (fp32, degree 9). A dropped or doubled micro-batch moves g by ~25%.
_U = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}  # unit roundoff


@pytest.mark.parametrize(("dtype", "rtol", "atol"), [(torch.float32, 0.0, 64), (torch.float64, 0.0, 64)])
@pytest.mark.parametrize("degree", [5, 9])
def test_gradients_equal_per_micro_batch_backward(dtype, rtol, atol, degree):
    ref = _make(dtype, degree)
    net = copy.deepcopy(ref)
    batches = _micro_batches(dtype)
    for b in batches:
        _loss(ref, b).backward()
    with once_per_step(net):
        for b in batches:
            _loss(net, b).backward()
    g_ref, g = _grads(ref), _grads(net)
    assert set(g) == set(g_ref)
    pc_keys = [k for k in g if "original" in k or "gamma" in k]
    assert len(pc_keys) == 6  # raw W and gamma of 3 weights
    for k in g_ref:
        tol = atol * _U[dtype] * g_ref[k].abs().max().item()  # atol in units of u * max|g| (see above)
        torch.testing.assert_close(g[k], g_ref[k], rtol=rtol, atol=tol, msg=lambda m, k=k: f"{k}: {m}")
        assert g[k].abs().max() > 0, k


def test_pc_map_evaluated_once_per_step(monkeypatch):
    net = _make()
    calls = {"n": 0}
    real = pc_layer.apply_polynomial

    def counting(X, coefficients):
        calls["n"] += 1
        return real(X, coefficients)

    monkeypatch.setattr(pc_layer, "apply_polynomial", counting)  # the per-forward map
    monkeypatch.setattr(pc_kernel, "gram_polynomial", counting)  # the once-per-step map
    real_chain = pc_kernel.horner_chain

    def counting_chain(G, coefficients):
        calls["n"] += 1
        return real_chain(G, coefficients)

    monkeypatch.setattr(pc_kernel, "horner_chain", counting_chain)  # the once-per-step pull-back
    batches = _micro_batches(torch.float32)
    for b in batches:
        _loss(net, b).backward()
    assert calls["n"] == 3 * len(batches)
    calls["n"] = 0
    with once_per_step(net):
        assert calls["n"] == 3  # W_eff written once per shape group (three distinct shapes) on entry
        w_first = net.mid.weight
        for b in batches:
            _loss(net, b).backward()
        assert net.mid.weight is w_first  # the same W_eff in every micro-batch
    assert calls["n"] == 6  # and one pull-back per shape group on exit


def test_exit_without_backward_leaves_grads_and_restores_forward():
    net = _make()
    with once_per_step(net):
        with torch.no_grad():
            net(torch.randn(2, 12))
    assert all(p.grad is None for p in net.parameters())
    assert pcopt.strategy_of(net) == "per_forward"
    # Afterwards the ordinary per-forward path works and reaches the raw weights.
    _loss(net, _micro_batches(torch.float32, 1)[0]).backward()
    assert net.mid.parametrizations.weight.original.grad is not None
    assert net.mid.weight.grad_fn is not None


def test_exception_clears_cache_and_skips_pc_backward():
    net = _make()
    batches = _micro_batches(torch.float32)
    with pytest.raises(KeyError, match="boom"):
        with once_per_step(net):
            _loss(net, batches[0]).backward()
            raise KeyError("boom")
    assert pcopt.strategy_of(net) == "per_forward"
    for _, pc in pcopt.preconditioners(net):
        assert pc.raw_weight.grad is None and pc.gamma.grad is None
    assert net.head.weight.grad is not None  # the non-PC part of the micro-batch did run
    # The next step is unaffected: it matches a fresh per-micro-batch reference.
    net.zero_grad(set_to_none=True)
    ref = _make()
    with once_per_step(net):
        for b in batches:
            _loss(net, b).backward()
    for b in batches:
        _loss(ref, b).backward()
    for k, v in _grads(ref).items():
        # fp32, degree 9: the bound of test_gradients_equal_per_micro_batch_backward, 64 u * max|g|
        torch.testing.assert_close(
            _grads(net)[k], v, rtol=0.0, atol=64 * _U[torch.float32] * v.abs().max().item()
        )


def test_unused_weight_gets_no_gradient():
    net = _make()
    with once_per_step(net):
        # Only the first preconditioned layer is used.
        net.inp(torch.randn(3, 12)).sum().backward()
    assert net.inp.parametrizations.weight.original.grad is not None
    assert net.mid.parametrizations.weight.original.grad is None
    assert net.mid.parametrizations.weight[0].gamma.grad is None


def test_step_inside_block_raises():
    net = _make()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    batch = _micro_batches(torch.float32, 1)[0]
    _loss(net, batch).backward()  # raw weights hold gradients, so a step inside the block moves them
    with pytest.raises(RuntimeError, match=r"modified inside once_per_step.*after the with block"):
        with once_per_step(net):
            _loss(net, batch).backward()
            opt.step()
    assert pcopt.strategy_of(net) == "per_forward"


def test_nested_use_raises():
    net = _make()
    with once_per_step(net):
        with pytest.raises(RuntimeError, match="already active"):
            with once_per_step(net):
                pass
    assert pcopt.strategy_of(net) == "per_forward"


def test_model_without_pc_warns_and_runs():
    net = nn.Linear(4, 3)
    with pytest.warns(UserWarning, match="no preconditioned weights"):
        with once_per_step(net):
            net(torch.randn(2, 4)).sum().backward()
    assert net.weight.grad is not None


def test_rejects_non_module():
    with pytest.raises(TypeError, match="expects an nn.Module"):
        with once_per_step([torch.zeros(2, 2)]):
            pass


class _Batched(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 6, 4, dtype=torch.float64) * 0.3)

    def forward(self, x):  # x: (3, B, 4) -> (3, B, 6)
        return x @ self.weight.mT


def test_batched_3d_weight():
    torch.manual_seed(0)
    ref = pcopt.precondition(_Batched(), degree=7)
    net = copy.deepcopy(ref)
    xs = [torch.randn(3, 5, 4, dtype=torch.float64) for _ in range(4)]
    for x in xs:
        ref(x).square().sum().backward()
    with once_per_step(net):
        for x in xs:
            net(x).square().sum().backward()
    for k, v in _grads(ref).items():
        torch.testing.assert_close(_grads(net)[k], v, rtol=1e-12, atol=1e-13)


def _fsdp2_refused(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = _Net()
    pcopt.precondition(net.mid)
    fully_shard(net, mesh=init_device_mesh("cpu", (world_size,)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with once_per_step(net):
                raise AssertionError("once_per_step should have refused an FSDP2 model")
        except RuntimeError as exc:
            assert "does not support FSDP2" in str(exc) and "reduce-scatter" in str(exc), str(exc)
    assert pcopt.strategy_of(net) == "per_forward"


@pytest.mark.distributed
def test_fsdp2_model_is_refused():
    run_distributed(_fsdp2_refused, world_size=2)
