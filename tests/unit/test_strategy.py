"""The two execution strategies of one PC declaration, on one process (no fully_shard).

The per-forward strategy (parametrize) is the reference; the once-per-step strategy must give the same
W_eff, gradients and steps, the same checkpoint keys, and every public function must work on it.

Tolerances. The two strategies evaluate the same polynomial in a different op order: per forward
``X q(X^T X)`` on ``X = W / sigma`` under autograd; once per step ``W q(G / sigma^2)`` with the pull-back
differentiated through the n x n Gram and chained through ``A^T A``, ``A^T Y``. In float64 (unit roundoff
1.1e-16) a few hundred flops per element accumulate to far below 1e-12 relative; in fp32 (6e-8) the same
chain with reductions of length <= 80 and Horner over up to 4 matrix products stays below 1e-5 relative,
which is the issue's bound (observed ~1e-6 on AVX2/AVX-512 both).
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import pcopt
from pcopt import kernel as K
from pcopt.kernel import write_
from pcopt.names import pc_keys
from pcopt.strategy import slots


def _ffn(seed=0, dim=32, hidden=80, device=None, dtype=torch.float32):
    torch.manual_seed(seed)
    m = nn.Module()
    m.feed_forward = nn.Module()
    m.feed_forward.w1 = nn.Linear(dim, hidden, bias=False, device=device, dtype=dtype)
    m.feed_forward.w2 = nn.Linear(hidden, dim, bias=False, device=device, dtype=dtype)
    m.norm = nn.LayerNorm(dim, device=device, dtype=dtype)
    return m


def _run(m, x):
    return m.feed_forward.w2(nn.functional.silu(m.feed_forward.w1(m.norm(x))))


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def _pair(degree=5, dtype=torch.float32, seed=0):
    """The same declaration twice: per forward (reference) and once per step."""
    ref = _ffn(seed, dtype=dtype)
    pcopt.precondition_model(ref, degree=degree, strategy="per_forward")
    once = copy.deepcopy(ref)
    pcopt.set_strategy(once, "once_per_step")
    return ref, once


def _raw(m, name):
    return getattr(m.feed_forward, name).parametrizations.weight.original


def _gamma(m, name):
    return getattr(m.feed_forward, name).parametrizations.weight[0].gamma


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("degree", [3, 5, 9])
@pytest.mark.parametrize("micro_batches", [1, 4])
def test_gradients_and_steps_equal_per_forward(degree, micro_batches, dtype, tol):
    ref, once = _pair(degree, dtype)
    assert pcopt.strategy_of(ref) == "per_forward" and pcopt.strategy_of(once) == "once_per_step"
    x = torch.randn(micro_batches, 6, 32, dtype=dtype)
    for m in (ref, once):
        state = pcopt.PCState(m)
        opt = pcopt.build_optimizer(m, lr=3e-3, ns_dtype=dtype)
        for _ in range(3):
            for chunk in x:
                _run(m, chunk).pow(2).sum().backward()
            state.after_backward()
            m.grads = {n: (_raw(m, n).grad.clone(), _gamma(m, n).grad.clone()) for n in ("w1", "w2")}
            opt.step()
            opt.zero_grad()
    for name in ("w1", "w2"):
        assert _rel(once.grads[name][0], ref.grads[name][0]) < tol
        assert _rel(once.grads[name][1], ref.grads[name][1]) < tol
        assert _rel(_raw(once, name), _raw(ref, name)) < tol
        assert getattr(once.feed_forward, name).weight.grad is None  # pulled back, cleared
    assert _rel(_run(once, x[0]), _run(ref, x[0])) < tol


def test_raw_gradients_are_laid_out_like_their_parameters_and_fused_adamw_steps():
    ref, once = _pair()
    x = torch.randn(4, 32)
    _run(once, x).pow(2).sum().backward()
    pcopt.PCState(once).after_backward()
    for name in ("w1", "w2"):  # w2 is wide: its oriented matrix is the transpose
        p = _raw(once, name)
        assert p.grad.is_contiguous() and p.grad.stride() == p.stride()
        assert (p.grad.dtype, p.grad.device, p.grad.layout) == (p.dtype, p.device, p.layout)
    for kwargs in ({"fused": True}, {"foreach": True}, {"foreach": False}):
        m = copy.deepcopy(once)
        m_ref = copy.deepcopy(ref)
        results = []
        for model in (m, m_ref):
            opt = torch.optim.AdamW(
                [p for p in model.parameters() if all(p is not e for e in pcopt.effective_parameters(model))],
                lr=1e-2,
                **kwargs,
            )
            state = pcopt.PCState(model)
            state.attach(opt)
            _run(model, x).pow(2).sum().backward()
            state.after_backward()
            opt.step()
            results.append(_raw(model, "w2").detach().clone())
        assert _rel(results[0], results[1]) < 1e-5, kwargs


def test_every_public_function_works_in_both_strategies():
    ref, once = _pair(seed=1)
    x = torch.randn(5, 32)
    for m in (ref, once):
        assert [f for f, _ in pcopt.preconditioners(m)] == [
            "feed_forward.w1.weight",
            "feed_forward.w2.weight",
        ]
        assert len(pcopt.PCState(m)) == 2
        assert pcopt.is_preconditioned(m.feed_forward.w1)
    # introspection, effective weights, diagnostics
    for name in ("w1", "w2"):
        a = pcopt.effective_weight(getattr(ref.feed_forward, name))
        b = pcopt.effective_weight(getattr(once.feed_forward, name))
        assert _rel(b, a) < 1e-6
        assert _rel(getattr(once.feed_forward, name).weight, a) < 1e-6  # what the forward uses
    assert abs(pcopt.gmcn(once) - pcopt.gmcn(ref)) < 1e-4 * pcopt.gmcn(ref)
    # state_dict: the same keys, W_eff left out, and loads across strategies both ways
    assert sorted(once.state_dict()) == sorted(ref.state_dict())
    assert "feed_forward.w1.weight" not in once.state_dict()
    other = _ffn(seed=7)
    pcopt.precondition_model(other, degree=5, strategy="per_forward")
    pcopt.set_strategy(other, "once_per_step")
    other.load_state_dict(ref.state_dict())  # W_eff recomputed from the loaded state
    assert _rel(_run(other, x), _run(ref, x)) < 1e-6
    back = _ffn(seed=8)
    pcopt.precondition_model(back, degree=5, strategy="per_forward")
    back.load_state_dict(once.state_dict())
    assert _rel(_run(back, x), _run(ref, x)) < 1e-6
    # merged state dicts: dense W_eff, no PC keys, load into the plain architecture
    for m in (ref, once):
        sd = pcopt.merged_state_dict(m)
        assert sorted(sd) == ["feed_forward.w1.weight", "feed_forward.w2.weight", "norm.bias", "norm.weight"]
        plain = _ffn(seed=9)
        plain.load_state_dict(sd)
        assert _rel(_run(plain, x), _run(ref, x)) < 1e-6
    # optimizer groups: raw weights to Muon, gamma and norms to AdamW, W_eff nowhere
    names = {}
    for m in (ref, once):
        groups = pcopt.param_groups(m)
        ids = {id(p): n for n, p in m.named_parameters()}
        names[id(m)] = sorted((g["algorithm"], ids[id(p)]) for g in groups for p in g["params"])
    assert names[id(ref)] == names[id(once)]
    assert not any("feed_forward.w1.weight" == n for _, n in names[id(once)])
    # merge: a plain model computing the same function
    expected = _run(ref, x)
    for m in (ref, once):
        assert pcopt.merge(m) == ["feed_forward.w1.weight", "feed_forward.w2.weight"]
        assert type(m.feed_forward.w1) is nn.Linear and not pcopt.preconditioners(m)
        assert _rel(_run(m, x), expected) < 1e-6
        assert "feed_forward.w1.weight" in m.state_dict()  # the hooks of the strategy are inert after merge


@pytest.mark.parametrize("preserve_function", [False, True])
def test_load_dense_state_dict_in_both_strategies(preserve_function):
    dense = _ffn(seed=3, dtype=torch.float64)
    x = torch.randn(4, 32, dtype=torch.float64)
    outs = []
    for strategy in ("per_forward", "once_per_step"):
        m = _ffn(seed=4, dtype=torch.float64)
        pcopt.precondition_model(m, degree=5, strategy="per_forward")
        if strategy == "once_per_step":
            pcopt.set_strategy(m, strategy)
        pcopt.load_dense_state_dict(m, dense.state_dict(), preserve_function=preserve_function)
        assert torch.equal(_raw(m, "w1"), dense.feed_forward.w1.weight) != preserve_function
        outs.append(_run(m, x))
    assert _rel(outs[1], outs[0]) < 1e-10
    if preserve_function:  # the dense model's function, as closely as the per-forward inverse gets it
        # (pcopt.inverse: bisection on p and the power-iteration sigma; test_parametrization holds it to 1e-5)
        assert _rel(outs[1], _run(dense, x)) < 1e-5


def test_legacy_sharded_checkpoint_keys_load():
    """pcopt 0.2's sharded mode saved <module>.pc.{raw,gamma,u,v,pc_meta}; both strategies still load it."""
    ref, _ = _pair(seed=2)
    legacy = {}
    for key, value in ref.state_dict().items():
        for name in ("w1", "w2"):
            keys = pc_keys(f"feed_forward.{name}")
            table = {keys.raw: "raw", keys.gamma: "gamma", keys.u: "u", keys.v: "v", keys.meta: "pc_meta"}
            if key in table:
                key = f"feed_forward.{name}.pc.{table[key]}"
        legacy[key] = value
    x = torch.randn(3, 32)
    for strategy in ("per_forward", "once_per_step"):
        m = _ffn(seed=5)
        pcopt.precondition_model(m, degree=5, strategy="per_forward")
        if strategy == "once_per_step":
            pcopt.set_strategy(m, strategy)
        m.load_state_dict(dict(legacy))
        assert _rel(_run(m, x), _run(ref, x)) < 1e-6, strategy


def test_bf16_compute_dtype_close_to_fp32_and_autocast_ignored():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(96, 40))
    V, _ = torch.linalg.qr(torch.randn(40, 40))
    dense = U @ torch.diag(torch.logspace(0, -4, 40)) @ V.T  # condition number 1e4
    models = {}
    for dtype in (torch.float32, torch.bfloat16):
        lin = nn.Linear(40, 96, bias=False)
        with torch.no_grad():
            lin.weight.copy_(dense)
        m = nn.Module()
        m.feed_forward = nn.Module()
        m.feed_forward.w1 = lin
        pcopt.precondition_model(m, degree=5, strategy="per_forward")
        pcopt.set_strategy(m, compute_dtype=dtype)
        models[dtype] = m
    w32 = models[torch.float32].feed_forward.w1.weight.detach().clone()
    w16 = models[torch.bfloat16].feed_forward.w1.weight.detach().clone()
    assert w16.dtype == torch.float32  # W_eff keeps the parameter's dtype
    # bf16 (unit roundoff 3.9e-3) does change the result; Horner of degree 5 keeps it within ~8 roundoffs
    assert 1e-5 < _rel(w16, w32) < 3e-2
    grads = {}
    y = torch.randn(96, 40)
    for dtype, m in models.items():
        state = pcopt.PCState(m)
        before = m.feed_forward.w1.weight.detach().clone()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the option decides, not autocast
            write_(slots(m))  # W_eff rewritten from the same state
            m.feed_forward.w1.weight.grad = y.clone()
            state.after_backward()
        assert torch.equal(m.feed_forward.w1.weight, before), dtype
        grads[dtype] = _raw(m, "w1").grad
    assert _rel(grads[torch.bfloat16], grads[torch.float32]) < 5e-2


def test_meta_device_build_then_initialize():
    ref = _ffn(seed=3)
    pcopt.precondition_model(ref, strategy="per_forward")
    with torch.device("meta"):
        model = _ffn(seed=3)
    pcopt.precondition_model(model, strategy="per_forward")
    pcopt.set_strategy(model, "once_per_step")
    model.to_empty(device="cpu")
    with torch.no_grad():  # the model's own init writes <module>.weight
        for name in ("w1", "w2"):
            getattr(model.feed_forward, name).weight.copy_(_raw(ref, name))
        model.norm.load_state_dict(ref.norm.state_dict())
    assert pcopt.PCState(model).initialize() == 2
    x = torch.randn(2, 32)
    assert _rel(_run(model, x), _run(ref, x)) < 1e-6


def test_switch_back_to_per_forward():
    ref, once = _pair(seed=6)
    x = torch.randn(3, 32)
    assert pcopt.set_strategy(once, "per_forward") == ["feed_forward.w1.weight", "feed_forward.w2.weight"]
    assert pcopt.strategy_of(once) == "per_forward"
    assert type(once.feed_forward.w1).__name__ == "ParametrizedLinear"
    assert _rel(_run(once, x), _run(ref, x)) < 1e-6
    assert sorted(once.state_dict()) == sorted(ref.state_dict())


def test_misuse_errors():
    with pytest.raises(TypeError, match=r"set_strategy expects an nn.Module, got int"):
        pcopt.set_strategy(3)
    with pytest.raises(ValueError, match=r"no preconditioned weights.*precondition_model"):
        pcopt.set_strategy(_ffn())
    m = _ffn()
    pcopt.precondition_model(m, strategy="per_forward")
    with pytest.raises(ValueError, match=r"Unknown PC strategy 'sharded'; expected one of"):
        pcopt.set_strategy(m, "sharded")
    with pytest.raises(TypeError, match=r"shard must be a callable.*got str"):
        pcopt.set_strategy(m, shard="fsdp")
    with pytest.raises(ValueError, match=r"compute_dtype must be one of .*got torch.float16"):
        pcopt.set_strategy(m, compute_dtype=torch.float16)
    with pytest.raises(
        ValueError, match=r"pull_back must be one of \['auto', 'after_backward'\] or None, got 'x'"
    ):
        pcopt.set_strategy(m, pull_back="x")
    with pytest.raises(ValueError, match=r"pull_back='auto' is for unsharded models"):
        pcopt.set_strategy(m, shard=lambda model, fn: None, pull_back="auto")
    pcopt.set_strategy(m)  # once per step, pull-back after every backward (what precondition_model sets)
    raw = _raw(m, "w1")
    # again on an unsharded once-per-step model: bound anew with the new arguments, the raw weights kept
    pcopt.set_strategy(m, pull_back="after_backward")  # the loop calls after_backward (checked below)
    assert _raw(m, "w1") is raw and pcopt.strategy_of(m) == "once_per_step"
    # one model, one strategy
    m.extra = nn.Linear(4, 4)
    pcopt.precondition(m.extra)
    with pytest.raises(RuntimeError, match=r"mixes PC strategies.*\['extra.weight'\].*set_strategy"):
        pcopt.PCState(m)
    with pytest.raises(ValueError, match=r"already runs PC once per step.*one model, one strategy"):
        pcopt.precondition(m.feed_forward.w1)
    del m.extra

    batched = nn.Module()
    batched.w = nn.Module()
    batched.w.weight = nn.Parameter(torch.randn(2, 8, 4))
    pcopt.precondition(batched.w)
    pcopt.set_strategy(batched)  # batched weights run once per step (tests/unit/test_experts.py; sharded:
    # tests/distributed/test_experts_pc.py)

    # the moments in the wrong order
    state = pcopt.PCState(m)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    state.attach(opt)
    _run(m, torch.randn(4, 32)).sum().backward()
    with pytest.raises(RuntimeError, match=r"were not pulled back.*Call PCState.after_backward\(\)"):
        opt.step()  # the attached pre-hook refuses
    with pytest.raises(RuntimeError, match=r"were not pulled back"):
        state.after_step()
    state.after_backward()
    with torch.no_grad():
        _raw(m, "w1").add_(1.0)  # a step nobody refreshed after
    _run(m, torch.randn(4, 32)).sum().backward()
    with pytest.raises(RuntimeError, match=r"changed since their effective weights were written.*after_step"):
        state.after_backward()


def test_shard_placement_fn_larger_dim_in_both_strategies():
    m = _ffn()
    pcopt.precondition_model(m, strategy="per_forward")
    before = pcopt.shard_placement_fn(m)
    assert before(_raw(m, "w1")).dim == 0 and before(_raw(m, "w2")).dim == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pcopt.set_strategy(m)
    after = pcopt.shard_placement_fn(m)
    assert after(m.feed_forward.w1.weight).dim == 0 and after(m.feed_forward.w2.weight).dim == 1
    assert after(_raw(m, "w1")) is None  # the raw weight is never FSDP2's


@pytest.mark.parametrize("chain", ["fp32", "bf16"])
def test_bf16_map_keeps_the_degree_9_horner_chain_in_fp32(monkeypatch, chain):
    """With a bf16 compute dtype the Gram and the apply round to bf16 (unit roundoff u = 2^-8; a product of
    bf16-rounded factors is off by ~u = 3.9e-3 relative, here measured 3.3e-3 to 3.5e-3 at 2816x1024 and below).
    At degree 9 a bf16 Horner chain adds its cancellation on top (coefficients up to ~14 with alternating signs):
    about 3x the error. So the chain runs in fp32 (``horner_dtype``): W_eff stays within 2u of the float64 map,
    and forcing the chain into bf16 would exceed it."""
    if chain == "bf16":
        monkeypatch.setattr(K, "horner_dtype", lambda slot, compute_dtype: compute_dtype)
    torch.manual_seed(0)
    dense = torch.randn(384, 128, dtype=torch.float64) * 0.02
    eff = {}
    for dtype in (torch.float64, torch.bfloat16):
        m = nn.Module()
        m.feed_forward = nn.Module()
        m.feed_forward.w1 = nn.Linear(128, 384, bias=False).double()
        with torch.no_grad():
            m.feed_forward.w1.weight.copy_(dense)
        pcopt.precondition_model(m, degree=9, strategy="per_forward")
        pcopt.set_strategy(m, compute_dtype=dtype)
        eff[dtype] = m.feed_forward.w1.weight.detach().clone()
    err = _rel(eff[torch.bfloat16], eff[torch.float64])
    u = 2.0**-8
    assert (err < 2 * u) if chain == "fp32" else (err > 2 * u), err
