"""pcopt.optim.Muon against torch.optim.Muon, float64 SVD references, and its error contract."""

from __future__ import annotations

import copy
import pickle
import warnings
from functools import partial

import pytest
import torch
from torch import nn

import pcopt
import pcopt.optim._muon
import pcopt.optim._muon_step as muon_mod
from pcopt.optim import Muon, muon, newton_schulz, newton_schulz_flops
from pcopt.optim._distributed import assign_owners, row_range
from pcopt.optim._newton_schulz import NS_COEFFICIENT_SETS, resolve_coefficients

SHAPES = [(24, 16), (16, 24), (20, 20), (24, 16), (1, 9), (33, 7)]  # tall, wide, square, repeated, 1-row


def _params(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def _run(opt_cls, params, steps: int, seed: int = 1, **kwargs):
    opt = opt_cls(params, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt


@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("foreach", [None, False])
def test_matches_torch_muon(adjust_lr_fn, nesterov, foreach):
    kwargs = dict(lr=0.03, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    ref_params, params = _params(), _params()
    ref = _run(torch.optim.Muon, ref_params, steps=4, **kwargs)
    opt = _run(Muon, params, steps=4, foreach=foreach, **kwargs)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            opt.state[p]["momentum_buffer"], ref.state[r]["momentum_buffer"], rtol=0, atol=1e-6
        )
    assert set(opt.state[params[0]]) == {"momentum_buffer"}
    # the update is not trivially zero: parameters moved by more than the tolerance
    assert max((p - q).abs().max().item() for p, q in zip(params, _params())) > 1e-2


@pytest.mark.parametrize("foreach", [None, True])
def test_large_tall_matrix_is_bitwise_torchs(foreach):
    """A tall matrix goes through Newton-Schulz as torch's does, as the transposed view of the bf16 copy: on CPUs
    without native bf16 a contiguous transpose rounds some products otherwise from 2000 x 300 on (measured on an
    AVX2-only AMD EPYC; at 1408 x 512 by up to 1.5e-3). Alone (foreach=None: too large to stack on a CPU) it runs
    torch's 2-D mm/addmm: on an AMD EPYC with avx512_bf16 a one-matrix bmm of that view rounded otherwise. Stacked
    (foreach=True) with a copy of itself, too."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2000, 300, generator=gen)
    grads = [torch.randn(2000, 300, generator=gen)]
    ref, ours, twin = (nn.Parameter(w.clone()) for _ in range(3))
    theirs = torch.optim.Muon([ref], lr=0.02)
    mine = Muon([ours, twin], lr=0.02, foreach=foreach)
    for g in grads:
        ref.grad, ours.grad, twin.grad = g.clone(), g.clone(), g.clone()
        theirs.step()
        mine.step()
    assert torch.equal(ours, ref) and torch.equal(twin, ref)


def test_batched_and_per_matrix_paths_are_bitwise_equal():
    a, b = _params(), _params()
    _run(Muon, a, steps=3, foreach=True, ns_coefficient_set="polar_express", ns_dtype=torch.float32)
    _run(Muon, b, steps=3, foreach=False, ns_coefficient_set="polar_express", ns_dtype=torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_functional_matches_optimizer():
    params, ref = _params(), _params()
    _run(Muon, ref, steps=1, lr=0.02)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    with torch.no_grad():
        muon(params, grads, bufs, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
             ns_coefficients=(3.4445, -4.775, 2.0315), ns_steps=5, eps=1e-7, adjust_lr_fn=None)  # fmt: skip
    assert all(torch.equal(x, y) for x, y in zip(params, ref))


def _svd_reference(G: torch.Tensor, triples, norm_factor: float = 1.0) -> torch.Tensor:
    """Odd quintics composed on the singular values, in float64: U diag(p_k(...p_1(s / (f ||G||_F)))) V^T."""
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    s = S / (norm_factor * torch.linalg.matrix_norm(G.double()))
    for a, b, c in triples:
        s = a * s + b * s**3 + c * s**5
    return U @ torch.diag(s) @ Vh


@pytest.mark.parametrize("shape", [(12, 30), (30, 12)])
@pytest.mark.parametrize("name", ["keller", "polar_express", "custom"])
def test_newton_schulz_equals_singular_value_polynomial_in_fp64(shape, name):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    coefficient_set = (
        [(2.0, -1.5, 0.5), (1.9, -1.3, 0.4), (1.875, -1.25, 0.375)] if name == "custom" else name
    )
    triples, factor = resolve_coefficients((3.4445, -4.775, 2.0315), coefficient_set, 6)
    assert len(triples) == 6
    out = newton_schulz(G, triples, dtype=torch.float64, norm_factor=factor)
    torch.testing.assert_close(out, _svd_reference(G, triples, factor), rtol=0, atol=1e-10)


def test_polar_express_set_orthogonalizes_and_uses_safety_factor():
    raw_first = (8.28721201814563, -23.595886519098837, 17.300387312530933)
    triples, factor = NS_COEFFICIENT_SETS["polar_express"]
    assert factor == 1.01 and len(triples) == 8
    torch.testing.assert_close(
        torch.tensor(triples[0]), torch.tensor(raw_first) / torch.tensor([1.01, 1.01**3, 1.01**5])
    )
    assert triples[-1] == (1.875, -1.25, 0.375)
    G = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    out = newton_schulz(G, triples, dtype=torch.float32, norm_factor=factor)
    sv = torch.linalg.svdvals(out.double())
    assert sv.min() > 0.9 and sv.max() < 1.1, sv  # 8 steps: close to U V^T (Keller's 5 steps are not)
    kel = torch.linalg.svdvals(
        newton_schulz(G, NS_COEFFICIENT_SETS["keller"][0] * 5, dtype=torch.float32).double()
    )
    assert (kel.max() - kel.min()) > (sv.max() - sv.min())


def test_polar_express_in_optimizer_uses_per_step_coefficients():
    """The optimizer applies the set step by step: compare one update with the fp64 SVD composition."""
    p = nn.Parameter(torch.zeros(10, 14, dtype=torch.float64))
    g = torch.randn(10, 14, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    p.grad = g.clone()
    Muon([p], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False, ns_steps=7,
         ns_coefficient_set="polar_express", ns_dtype=torch.float64).step()  # fmt: skip
    triples, factor = resolve_coefficients((0.0, 0.0, 0.0), "polar_express", 7)
    torch.testing.assert_close(-p.detach(), _svd_reference(g, triples, factor), rtol=0, atol=1e-10)


def test_default_is_bf16_and_fp32_option_is_more_accurate():
    G = torch.randn(48, 40, generator=torch.Generator().manual_seed(0))
    triples, _ = resolve_coefficients((3.4445, -4.775, 2.0315), None, 5)
    ref = _svd_reference(G, triples)
    p16, p32 = nn.Parameter(torch.zeros_like(G)), nn.Parameter(torch.zeros_like(G))
    for p, dt in ((p16, torch.bfloat16), (p32, "fp32")):
        p.grad = G.clone()
        Muon(
            [p], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False, adjust_lr_fn=None, ns_dtype=dt
        ).step()
    scale = (48 / 40) ** 0.5  # "original" lr adjustment sqrt(max(1, A/B)) for a (48, 40) matrix
    err16 = (-p16.detach().double() / scale - ref).abs().max()
    err32 = (-p32.detach().double() / scale - ref).abs().max()
    assert err32 < 1e-4 < err16 < 0.1, (err16, err32)


def test_closure_zero_grad_none_grads_and_tensor_lr():
    torch.manual_seed(0)
    lin = nn.Linear(8, 6, bias=False)
    frozen = nn.Parameter(torch.randn(4, 4))  # never gets a gradient: must stay untouched
    frozen_before = frozen.detach().clone()
    opt = Muon([lin.weight, frozen], lr=torch.tensor(0.02))
    x, y = torch.randn(16, 8), torch.randn(16, 6)

    def closure():
        opt.zero_grad()
        loss = (lin(x) - y).square().mean()
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(20)]
    assert losses[-1] < 0.7 * losses[0], losses
    assert torch.equal(frozen, frozen_before) and frozen not in opt.state
    opt.zero_grad()
    assert lin.weight.grad is None


def test_state_dict_round_trip_and_torch_checkpoint_compatibility():
    params_a, params_b, params_t = _params(), _params(), _params()
    kwargs = dict(lr=0.02, adjust_lr_fn="match_rms_adamw")
    a = _run(Muon, params_a, steps=2, **kwargs)
    t = _run(torch.optim.Muon, params_t, steps=2, **kwargs)
    with torch.no_grad():
        for pb, pa in zip(params_b, params_a):
            pb.copy_(pa)
    b = Muon(params_b, **kwargs)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    c = Muon(_params(), **kwargs)
    c.load_state_dict(t.state_dict())  # a torch.optim.Muon checkpoint loads into pcopt's Muon
    assert c.param_groups[0]["ns_dtype"] == torch.bfloat16 and c.param_groups[0]["ns_coefficient_set"] is None
    gen = torch.Generator().manual_seed(9)
    for _ in range(2):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        for ps, opt in ((params_a, a), (params_b, b)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    assert all(torch.equal(x, y) for x, y in zip(params_a, params_b))


def test_lr_scheduler_drives_lr():
    params = _params()
    opt = Muon(params, lr=0.1, weight_decay=0.0, momentum=0.0, nesterov=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    sizes = []
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) for p in params]  # same gradient: same orthogonalized O
    for _ in range(3):
        before = params[2].detach().clone()
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        sched.step()
        sizes.append((params[2] - before).norm().item())
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert sizes[1] / sizes[0] == pytest.approx(0.5, rel=1e-4) and sizes[2] / sizes[1] == pytest.approx(
        0.5, rel=1e-4
    )


def test_extra_group_keys_are_tolerated_and_groups_are_independent():
    a, b = _params(), _params()
    opt = Muon([{"params": a[:3], "lr": 0.05, "fused": None, "foreach": True},
                {"params": a[3:], "weight_decay": 0.0, "custom_key": "kept"}], lr=0.01)  # fmt: skip
    assert opt.param_groups[1]["custom_key"] == "kept"
    ref1 = Muon(b[:3], lr=0.05)
    ref2 = Muon(b[3:], lr=0.01, weight_decay=0.0)
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    for ps in (a, b):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
    opt.step()
    ref1.step()
    ref2.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_deepcopy_and_pickle_keep_options():
    opt = Muon(_params(), ns_coefficient_set="polar_express", ns_algorithm="gram", batched_weights=True)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        group = clone.param_groups[0]
        assert group["ns_coefficient_set"] == "polar_express"
        assert (group["ns_algorithm"], group["batched_weights"]) == ("gram", True)


def _stale_pc_linear(seed: int = 0) -> tuple[nn.Linear, object]:
    torch.manual_seed(seed)
    lin = pcopt.precondition(nn.Linear(20, 12, bias=False), degree=5)
    pc = lin.parametrizations.weight[0]
    with torch.no_grad():
        pc.reset_state()  # deterministic start vectors, not yet iterated
    return lin, pc


@pytest.mark.parametrize("refresh", [True, False])
def test_step_refreshes_the_attached_pc_state(refresh):
    lin, pc = _stale_pc_linear()
    u0 = pc.u.clone()
    opt = Muon([lin.parametrizations.weight.original], lr=0.05)
    if refresh:
        pcopt.PCState(lin).attach(opt)
    x = torch.randn(32, 20, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            lin(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    stale = [w for w in caught if "changed since u, v were last refreshed" in str(w.message)]
    assert len(stale) == (0 if refresh else 1)  # without a PC state the forward warns, once
    W = lin.parametrizations.weight.original.detach().double()
    sigma = pc.u.double() @ W @ pc.v.double()
    exact = torch.linalg.matrix_norm(W, 2)
    if refresh:
        assert abs(sigma - exact) / exact < 1e-4, (sigma.item(), exact.item())
    else:
        assert torch.equal(pc.u, u0)
        assert abs(sigma - exact) / exact > 1e-2


def test_refresh_only_touches_the_pc_states_model():
    lin_a, pc_a = _stale_pc_linear(0)
    lin_b, pc_b = _stale_pc_linear(1)
    u_b = pc_b.u.clone()
    opt = Muon([lin_a.parametrizations.weight.original], lr=0.01)
    pcopt.PCState(lin_a).attach(opt)
    lin_a.parametrizations.weight.original.grad = torch.randn(12, 20)
    opt.step()
    assert not torch.equal(pc_a.u, pcopt.power_iteration.init_singular_vectors((12, 20))[0].to(pc_a.u))
    assert torch.equal(pc_b.u, u_b)


# -- errors -------------------------------------------------------------------------------------------
CONSTRUCTION_ERRORS = [
    ({"lr": -1.0}, r"Invalid learning rate: -1\.0"),
    ({"lr": torch.tensor([0.1, 0.2])}, r"Tensor lr must be 1-element"),
    ({"momentum": 1.0}, r"Invalid momentum value: 1\.0\. Expected 0 <= momentum < 1"),
    ({"momentum": -0.1}, r"Invalid momentum value"),
    ({"weight_decay": -0.1}, r"Invalid weight_decay value: -0\.1"),
    ({"eps": 0.0}, r"Invalid epsilon value: 0\.0\. Expected a float > 0"),
    ({"eps": -1e-7}, r"Invalid epsilon value"),
    ({"adjust_lr_fn": "moonlight"}, r"Adjust learning rate function moonlight is not supported"),
    ({"ns_steps": 0}, r"Invalid ns_steps: 0\. Expected an integer in \[1, 99\]"),
    ({"ns_steps": 100}, r"Invalid ns_steps: 100"),
    ({"ns_coefficients": (1.0, 2.0)}, r"Invalid ns_coefficients: \(1\.0, 2\.0\)\. Expected a tuple of three"),
    (
        {"ns_coefficient_set": "quintic"},
        r"Unknown ns_coefficient_set: 'quintic'\. Expected one of \['keller', 'polar_express'\]",
    ),
    ({"ns_coefficient_set": [(1.0, 2.0)]}, r"Invalid ns_coefficient_set: .*list of \(a, b, c\) triples"),
    ({"ns_coefficient_set": []}, r"Invalid ns_coefficient_set"),
    ({"ns_dtype": torch.int32}, r"Invalid ns_dtype: torch\.int32\. Expected torch\.bfloat16"),
    ({"ns_dtype": "half-ish"}, r"Invalid ns_dtype: 'half-ish'"),
]


@pytest.mark.parametrize("kwargs,match", CONSTRUCTION_ERRORS, ids=[m[:30] for _, m in CONSTRUCTION_ERRORS])
def test_construction_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Muon(_params(), **kwargs)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_non_matrix_parameters_rejected_at_construction(shape):
    with pytest.raises(ValueError, match=r"Muon only supports 2D parameters .* size: torch\.Size.*AdamW"):
        Muon([nn.Parameter(torch.randn(shape))])
    opt = Muon(_params())
    with pytest.raises(ValueError, match=r"Muon only supports 2D parameters"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(shape))]})
    with pytest.raises(ValueError, match=r"Invalid learning rate"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3, 3))], "lr": -1.0})
    assert len(opt.param_groups) == 1  # rejected groups are not kept


def test_sparse_and_complex_gradients_rejected_at_step():
    p = nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match=r"Muon does not support sparse gradients"):
        Muon([p]).step()
    c = nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    c.grad = torch.randn(4, 3, dtype=torch.complex64)
    with pytest.raises(
        RuntimeError, match=r"Muon does not support complex parameters or gradients.*complex64"
    ):
        Muon([c]).step()


def test_custom_list_longer_than_steps_uses_prefix_and_warns_shorter_repeats_last():
    triples = [(2.0, -1.5, 0.5), (1.9, -1.3, 0.4)]
    assert resolve_coefficients((0, 0, 0), triples, 1)[0] == ((2.0, -1.5, 0.5),)
    with pytest.warns(UserWarning, match=r"ns_coefficient_set has 2 triples but ns_steps=1"):
        Muon(_params(), ns_coefficient_set=triples, ns_steps=1)
    assert resolve_coefficients((0, 0, 0), triples, 4)[0][2:] == ((1.9, -1.3, 0.4),) * 2


@pytest.mark.parametrize("rows,world", [(7, 2), (5, 4), (3, 4), (1, 2), (16, 3)])
def test_row_range_is_torch_chunk_layout(rows, world):
    chunks = torch.arange(rows).chunk(world)
    for r in range(world):
        start, end = row_range(rows, world, r)
        expected = chunks[r].tolist() if r < len(chunks) else []
        assert list(range(start, end)) == expected


def test_owner_table_balances_flops_and_is_deterministic():
    shapes = [(512, 512)] * 4 + [(1408, 512), (512, 1408), (1408, 512)] * 2 + [(8, 8)]
    cost = partial(newton_schulz_flops, ns_steps=5)
    owners = assign_owners(shapes, 2, cost)
    assert owners == assign_owners(list(shapes), 2, cost)
    loads = [sum(cost(s) for s, o in zip(shapes, owners) if o == r) for r in range(2)]
    assert max(loads) / min(loads) < 1.15 and set(owners) == {0, 1}
    assert assign_owners(shapes, 1, cost) == [0] * len(shapes)


# ----------------------------------------------------------------------------------------------------
# Tests that kill the surviving mutants of pcopt/optim/_muon.py (tools/mutation.py, docs/reliability.md).
#
# References: the stacking rule of ``_matrices_per_call`` as its docstring states it, evaluated by hand with
# the element budgets 2^19 (CPU chunks) and 2^27 (one call), and a recording stand-in for the hardware check.


CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object only: nothing runs on it


@pytest.mark.parametrize(
    ("shape", "foreach", "device", "expected"),
    [
        ((64, 64), False, CPU, 1),  # foreach=False: one at a time
        ((64, 64), False, CUDA, 1),
        ((64, 64), True, CPU, 2**27 // 4096),  # foreach=True: up to 2^27 elements per call
        ((1, 1), True, CPU, 2**27),
        ((2**14, 2**14), True, CPU, 1),  # larger than the budget: still one per call
        ((64, 64), None, CUDA, 2**27 // 4096),  # None off CPUs: as foreach=True
        ((64, 64), None, CPU, 2**19 // 4096),  # None on CPUs: chunks of 2^19 elements
        ((1, 1), None, CPU, 2**19),
        ((256, 512), None, CPU, 4),  # exactly 4 per chunk: still stacked
        ((512, 512), None, CPU, 1),  # 2 per chunk: not worth it, one at a time
    ],
)
def test_matrices_per_call(shape, foreach, device, expected):
    assert muon_mod._matrices_per_call(shape, foreach, device) == expected


def test_hardware_check_runs_once_at_the_first_step(monkeypatch):
    calls = []
    monkeypatch.setattr(
        pcopt.optim._muon, "warn_slow_newton_schulz", lambda groups: calls.append(list(groups))
    )
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = Muon([p], lr=0.01)
    assert calls == []
    for _ in range(3):
        p.grad = torch.randn(4, 4)
        opt.step()
    assert len(calls) == 1 and calls[0][0]["params"][0] is p


def _recorder():
    calls = []

    def ns(x, stack):
        calls.append((tuple(x.shape), stack))
        return x * 2

    return ns, calls


@pytest.mark.parametrize(
    ("n", "per_call", "expected"),
    [
        (3, 1, [((2, 3), False)] * 3),  # one at a time, unstacked
        (3, 0, [((2, 3), False)] * 3),
        (3, 2, [((2, 2, 3), True), ((1, 2, 3), True)]),  # chunks of per_call, stacked
        (1, 8, [((2, 3), False)]),  # a single matrix is never stacked
        (4, 4, [((4, 2, 3), True)]),
    ],
)
def test_newton_schulz_chunked_calls(n, per_call, expected):
    ns, calls = _recorder()
    mats = [torch.full((2, 3), float(i)) for i in range(n)]
    out = muon_mod._newton_schulz_chunked(ns, mats, per_call)
    assert calls == expected
    assert [o.shape for o in out] == [(2, 3)] * n
    assert all(torch.equal(o, 2 * m) for o, m in zip(out, mats))
