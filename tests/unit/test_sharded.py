"""pcopt.sharded on one process (no fully_shard): the map against the parametrize path, dtypes, errors, keys."""

import warnings

import pytest
import torch
from torch import nn

import pcopt
import pcopt.sharded as ps


def _ffn(seed=0, dim=32, hidden=80, device=None):
    torch.manual_seed(seed)
    m = nn.Module()
    m.feed_forward = nn.Module()
    m.feed_forward.w1 = nn.Linear(dim, hidden, bias=False, device=device)
    m.feed_forward.w2 = nn.Linear(hidden, dim, bias=False, device=device)
    return m


def _run(m, x):
    return m.feed_forward.w2(nn.functional.silu(m.feed_forward.w1(x)))


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("degree", [3, 5, 9])
def test_effective_weight_and_gradients_match_parametrize(degree):
    ref = _ffn()
    pcopt.precondition_model(ref, degree=degree)
    model = _ffn()
    pcopt.precondition_model(model, degree=degree)
    pc = ps.distribute(model)
    assert [n for n, _ in pc.optimizer_parameters(model)] == [
        "feed_forward.w1.pc.raw",
        "feed_forward.w1.pc.gamma",
        "feed_forward.w2.pc.raw",
        "feed_forward.w2.pc.gamma",
    ]
    with torch.no_grad():
        for name in ("w1", "w2"):
            expected = getattr(ref.feed_forward, name).weight
            assert _rel(getattr(model.feed_forward, name).weight, expected) < 1e-6
    x = torch.randn(3, 7, 32)
    for chunk in x.chunk(3):
        _run(ref, chunk).pow(2).sum().backward()
        _run(model, chunk).pow(2).sum().backward()
    pc.after_backward()
    for name in ("w1", "w2"):
        r = getattr(ref.feed_forward, name).parametrizations.weight
        s = getattr(model.feed_forward, name).pc
        assert _rel(s.raw.grad, r.original.grad) < 1e-5
        assert _rel(s.gamma.grad, r[0].gamma.grad) < 1e-5
        assert getattr(model.feed_forward, name).weight.grad is None


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
        pcopt.precondition_model(m, degree=5)
        models[dtype] = (m, ps.distribute(m, compute_dtype=dtype))
    w32 = models[torch.float32][0].feed_forward.w1.weight.detach().clone()
    w16 = models[torch.bfloat16][0].feed_forward.w1.weight.detach().clone()
    assert w16.dtype == torch.float32  # W_eff keeps the parameter's dtype
    err = _rel(w16, w32)
    assert 1e-5 < err < 3e-2, err  # bf16 does change the result, within 3e-2
    # autocast does not change what the option says
    for dtype, (m, pc) in models.items():
        before = m.feed_forward.w1.weight.detach().clone()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pc.write_effective_weights()
        assert torch.equal(m.feed_forward.w1.weight, before), dtype
    grads = {}
    y = torch.randn(96, 40)
    for dtype, (m, pc) in models.items():
        m.feed_forward.w1.weight.grad = y.clone()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pc.after_backward()
        grads[dtype] = m.feed_forward.w1.pc.raw.grad
    assert _rel(grads[torch.bfloat16], grads[torch.float32]) < 5e-2


def test_meta_device_build_then_initialize():
    ref = _ffn(seed=3)
    pcopt.precondition_model(ref)
    with torch.device("meta"):
        model = _ffn(seed=3)
    pcopt.precondition_model(model)
    pc = ps.distribute(model)
    model.to_empty(device="cpu")
    with torch.no_grad():  # the model's own init writes <module>.weight
        for name in ("w1", "w2"):
            getattr(model.feed_forward, name).weight.copy_(
                getattr(ref.feed_forward, name).parametrizations.weight.original
            )
    pc.initialize()
    x = torch.randn(2, 32)
    assert _rel(_run(model, x), _run(ref, x)) < 1e-6


def test_misuse_errors():
    with pytest.raises(TypeError, match=r"distribute expects an nn.Module, got int"):
        ps.distribute(3)
    with pytest.raises(ValueError, match=r"no preconditioned weights.*precondition_model"):
        ps.distribute(_ffn())
    m = _ffn()
    pcopt.precondition_model(m)
    with pytest.raises(TypeError, match=r"shard must be a callable.*got str"):
        ps.distribute(m, "fsdp")
    with pytest.raises(TypeError, match=r"compute_dtype must be a torch.dtype, got str"):
        ps.distribute(m, compute_dtype="bf16")
    with pytest.raises(ValueError, match=r"compute_dtype must be one of .*got torch.float16"):
        ps.distribute(m, compute_dtype=torch.float16)
    pc = ps.distribute(m)
    with pytest.raises(ValueError, match=r"already in the sharded PC mode"):
        ps.distribute(m)

    batched = nn.Module()
    batched.w = nn.Module()
    batched.w.weight = nn.Parameter(torch.randn(2, 8, 4))
    pcopt.precondition(batched.w)
    with pytest.raises(ValueError, match=r"supports PC matrices \(2-D weights\).*\(2, 8, 4\)"):
        ps.distribute(batched)

    # the step protocol
    _run(m, torch.randn(4, 32)).sum().backward()
    with pytest.raises(RuntimeError, match=r"were not pulled back.*Call pc.after_backward\(\)"):
        pc.after_step()
    pc.after_backward()
    opt = torch.optim.SGD([p for _, p in pc.optimizer_parameters(m)], lr=0.1)
    opt.step()  # ... and no pc.after_step()
    _run(m, torch.randn(4, 32)).sum().backward()
    with pytest.raises(RuntimeError, match=r"changed since their effective weights were written.*after_step"):
        pc.after_backward()


def test_state_dict_round_trip_and_key_conversion():
    ref = _ffn(seed=1)
    pcopt.precondition_model(ref)
    model = _ffn(seed=1)
    pcopt.precondition_model(model)
    pc = ps.distribute(model)
    opt = torch.optim.AdamW([p for _, p in pc.optimizer_parameters(model)], lr=1e-2)
    _run(model, torch.randn(4, 32)).pow(2).sum().backward()
    pc.after_backward()
    opt.step()
    pc.after_step()
    sd = model.state_dict()
    assert "feed_forward.w1.weight" not in sd and "feed_forward.w1.pc.raw" in sd
    x = torch.randn(5, 32)

    other = _ffn(seed=2)
    pcopt.precondition_model(other)
    ps.distribute(other)
    other.load_state_dict(sd)  # W_eff is recomputed from the loaded state
    assert torch.equal(_run(other, x), _run(model, x))

    ref.load_state_dict(ps.to_parametrize_keys(sd))  # strict: into the parametrize path
    assert _rel(_run(ref, x), _run(model, x)) < 1e-6
    back = _ffn(seed=4)
    pcopt.precondition_model(back)
    ps.distribute(back)
    back.load_state_dict(ps.from_parametrize_keys(ref.state_dict()))
    assert _rel(_run(back, x), _run(model, x)) < 1e-6

    wrong = _ffn(seed=2)
    pcopt.precondition_model(wrong, degree=3)
    ps.distribute(wrong)
    with pytest.raises(RuntimeError, match=r"pc_meta.*Precondition the model with the checkpoint's settings"):
        wrong.load_state_dict(sd)
    with pytest.raises(ValueError, match=r"preconditions parameters named 'weight' only"):
        ps.from_parametrize_keys({"a.parametrizations.bias.original": torch.zeros(1)})


def test_shard_placement_fn_larger_dim_before_and_after_distribute():
    m = _ffn()
    pcopt.precondition_model(m)
    before = ps.shard_placement_fn(m)
    w1 = m.feed_forward.w1.parametrizations.weight.original
    w2 = m.feed_forward.w2.parametrizations.weight.original
    assert before(w1).dim == 0 and before(w2).dim == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ps.distribute(m)
    after = ps.shard_placement_fn(m)
    assert after(m.feed_forward.w1.weight).dim == 0 and after(m.feed_forward.w2.weight).dim == 1
    assert after(m.feed_forward.w1.pc.raw) is None
