"""PC on MoE expert stacks ``(E, out, in)``, one device: state per expert, once per step equal to per forward.

Each expert matrix ``W[e]`` has its own ``sigma``, ``u``, ``v`` and ``gamma`` (the paper's per-matrix rule applied
to every matrix of the stack), held batched: ``u (E, out)``, ``v (E, in)``, ``gamma (E,)``. The sharded layouts
(FSDP2 on the expert dim, expert parallelism, FSDP2 on a matrix dim) are in ``tests/distributed/test_experts_pc.py``.
gpt_oss's fused stack ``(E, 2F, D)``, whose rows interleave gate and up (``row_interleave=2``), runs through the same
tests (``LAYOUTS``) and its own below: a state per expert and per gate/up matrix, ``gamma (E, 2)``, ``u (E, 2, F)``.

Tolerances are those of ``tests/unit/test_strategy.py`` (same maps, same op orders, reductions of <= 80 terms):
float64 below 1e-12 relative, fp32 below 1e-5.
"""

import copy

import pytest
import torch
from torch import nn

import pcopt
from pcopt.profiling import StepProfile

DIM, HIDDEN = 24, 40


class _Experts(nn.Module):
    def __init__(self, experts: int, dtype=torch.float32) -> None:
        super().__init__()
        self.w1_EFD = nn.Parameter(torch.randn(experts, HIDDEN, DIM, dtype=dtype) / DIM**0.5)
        self.w2_EDF = nn.Parameter(torch.randn(experts, DIM, HIDDEN, dtype=dtype) / HIDDEN**0.5)

    def forward(self, x):  # every token through every expert, mixed by weights that differ per expert
        w1 = self.w1_EFD
        gates = torch.linspace(0.5, 1.5, w1.shape[0], dtype=x.dtype) / w1.shape[0]
        h = nn.functional.silu(torch.einsum("btd,efd->btef", x, w1))
        return torch.einsum("btef,edf,e->btd", h, self.w2_EDF, gates)


def _stacks(experts=4, degree=5, dtype=torch.float32, strategy="per_forward", seed=0):
    torch.manual_seed(seed)
    m = _Experts(experts, dtype)
    for name in ("w1_EFD", "w2_EDF"):
        pcopt.precondition(m, name, degree=degree)
    if strategy == "once_per_step":
        pcopt.set_strategy(m, "once_per_step")
    return m


def _raw(m, name):
    return m.parametrizations[name].original


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


# gpt_oss's fused gate/up stack: rows that interleave two matrices
class _Fused(nn.Module):
    """gpt_oss's expert FFN: ``mlp1`` ``(E, 2F, D)`` holds gate rows ``0::2`` and up rows ``1::2``."""

    def __init__(self, experts: int, dtype=torch.float32) -> None:
        super().__init__()
        self.mlp1_weight_EGD = nn.Parameter(torch.randn(experts, 2 * HIDDEN, DIM, dtype=dtype) / DIM**0.5)
        self.mlp2_weight_EDF = nn.Parameter(torch.randn(experts, DIM, HIDDEN, dtype=dtype) / HIDDEN**0.5)

    def forward(self, x):
        w1 = self.mlp1_weight_EGD
        gates = torch.linspace(0.5, 1.5, w1.shape[0], dtype=x.dtype) / w1.shape[0]
        h = torch.einsum("btd,egd->bteg", x, w1)
        a = nn.functional.silu(h[..., ::2]) * h[..., 1::2]
        return torch.einsum("btef,edf,e->btd", a, self.mlp2_weight_EDF, gates)


def _fused(experts=3, degree=5, dtype=torch.float32, strategy="per_forward", seed=0):
    torch.manual_seed(seed)
    m = _Fused(experts, dtype)
    pcopt.precondition(m, "mlp1_weight_EGD", degree=degree, row_interleave=2)
    pcopt.precondition(m, "mlp2_weight_EDF", degree=degree)
    if strategy == "once_per_step":
        pcopt.set_strategy(m, "once_per_step")
    return m


FUSED = ("mlp1_weight_EGD", "mlp2_weight_EDF")


LAYOUTS = {"stacks": (_stacks, ("w1_EFD", "w2_EDF")), "interleaved": (_fused, FUSED)}
"""Plain stacks, and gpt_oss's layout (``mlp1``'s rows interleave gate and up: ``row_interleave=2``)."""


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("degree", [5, 9])
@pytest.mark.parametrize("micro_batches", [1, 4])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_stack_once_per_step_equals_per_forward(layout, degree, micro_batches, dtype, tol):
    build, names = LAYOUTS[layout]
    ref = build(degree=degree, dtype=dtype)
    once = copy.deepcopy(ref)
    pcopt.set_strategy(once, "once_per_step")
    assert pcopt.strategy_of(once) == "once_per_step"
    x = torch.randn(micro_batches, 3, 5, DIM, dtype=dtype)
    for m in (ref, once):
        opt = pcopt.build_optimizer(m, lr=3e-3, ns_dtype=dtype)
        for _ in range(3):
            for chunk in x:
                m(chunk).pow(2).sum().backward()  # once per step: pulled back at the end of each backward
            m.grads = {
                n: (_raw(m, n).grad.clone(), m.parametrizations[n][0].gamma.grad.clone()) for n in names
            }
            opt.step()
            opt.zero_grad()
    for name in names:
        assert _rel(once.grads[name][0], ref.grads[name][0]) < tol
        assert _rel(once.grads[name][1], ref.grads[name][1]) < tol
        assert _rel(_raw(once, name), _raw(ref, name)) < tol
        assert once._parameters[name].grad is None  # pulled back, cleared
    assert _rel(once(x[0]), ref(x[0])) < tol


def test_state_is_per_expert_and_each_expert_maps_like_a_matrix_of_its_own():
    """sigma per expert against float64 SVD; ``W_eff[e]`` against a 2-D PC on ``W[e]`` with ``W[e]``'s state."""
    m = _stacks(experts=3, dtype=torch.float64, strategy="once_per_step")
    pcopt.refresh(m, num_iterations=200)  # converged: the gap of these random matrices is > 1%
    with torch.no_grad():
        for e in range(3):
            m.parametrizations["w1_EFD"][0].gamma[e] = 0.5 + e  # distinct per expert
    pcopt.PCState(m).after_step()  # writes W_eff
    pc = pcopt.preconditioner(m, "w1_EFD")
    raw = _raw(m, "w1_EFD").detach()
    assert pc.u.shape == (3, HIDDEN) and pc.v.shape == (3, DIM) and pc.gamma.shape == (3,)
    top = torch.linalg.svdvals(raw)[:, 0]
    # u^T W v + eps with unit vectors shrunk by normalize's 1e-7 (``x / (|x| + 1e-7)``, |x| ~ sigma): the estimate
    # is sigma (1 - 1e-7 / sigma)^2 + eps, within 2e-7 + eps of the top singular value once converged; the
    # experts' sigmas differ by ~2%, so a mixed-up expert is far outside.
    assert float((pc.sigma() - top).abs().max()) <= 2e-7 + pc.eps
    for e in range(3):
        single = nn.Linear(DIM, HIDDEN, bias=False, dtype=torch.float64)
        with torch.no_grad():
            single.weight.copy_(raw[e])
        pcopt.precondition(single, degree=5)
        one = pcopt.preconditioner(single)
        with torch.no_grad():
            one.u.copy_(pc.u[e])
            one.v.copy_(pc.v[e])
            one.gamma.fill_(0.5 + e)
            assert _rel(m.w1_EFD[e], single.weight) < 1e-12, e


def _pc_step_profile(experts: int, build=_stacks) -> StepProfile:
    m = build(experts=experts, strategy="once_per_step")
    state = pcopt.PCState(m)
    x = torch.randn(2, 4, DIM)
    m(x).pow(2).sum().backward()  # warm-up: the index and stack caches
    state.after_step()
    with StepProfile() as prof:  # the PC work of a step: the pull-back, the refresh and W_eff's write
        pcopt.kernel.pull_back_(list(pcopt.strategy.slots(m)))
        state.after_step()
    return prof


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_pc_on_a_stack_reads_nothing_on_the_host_and_its_ops_do_not_grow_with_experts(layout):
    """The batched state makes a stack one kernel chain: 2 or 64 experts, the same aten ops, no host sync."""
    build = LAYOUTS[layout][0]
    few, many = _pc_step_profile(2, build), _pc_step_profile(64, build)
    assert few.total_syncs == 0 and many.total_syncs == 0, (few.syncs, many.syncs)
    assert few.total_ops == many.total_ops, (few.ops - many.ops) + (many.ops - few.ops)


@pytest.mark.parametrize("strategy", ["per_forward", "once_per_step"])
def test_merge_writes_the_plain_stack(strategy):
    m = _stacks(experts=3, strategy=strategy, dtype=torch.float64)
    x = torch.randn(2, 4, DIM, dtype=torch.float64)
    with torch.no_grad():
        expected = {n: getattr(m, n).detach().clone() for n in ("w1_EFD", "w2_EDF")}
        y = m(x)
    pcopt.merge(m)
    assert not pcopt.preconditioners(m)
    for n, w in expected.items():
        p = m._parameters[n]
        assert type(p) is nn.Parameter and p.shape == w.shape
        # merge recomputes W_eff as W p(W^T W) (the per-forward form); once per step wrote W q(G / sigma^2): the
        # same polynomial in another op order, float64 rounding far below 1e-12
        assert _rel(p, w) < 1e-12, n
    assert _rel(m(x), y) < 1e-12


@pytest.mark.parametrize("strategy", ["per_forward", "once_per_step"])
def test_interleaved_rows_get_a_state_each_and_map_like_separate_matrices(strategy):
    """``W_eff[e, j::2]`` against a 2-D PC on the matrix ``W[e, j::2]`` with that matrix's own state, sigma
    against its float64 SVD, and the gradient of a loss against the 2-D layers' (float64 throughout)."""
    m = _fused(dtype=torch.float64, strategy=strategy)
    # converged: these six matrices' gaps s2 / s1 are >= 2.8% (0.972 at most), so 2000 iterations leave a
    # relative error of ~0.972^4000 ~ 1e-49 (200 left 7e-6 on the closest)
    pcopt.refresh(m, num_iterations=2000)
    pc = pcopt.preconditioner(m, "mlp1_weight_EGD")
    assert pc.u.shape == (3, 2, HIDDEN) and pc.v.shape == (3, 2, DIM) and pc.gamma.shape == (3, 2)
    with torch.no_grad():
        pc.gamma.copy_(torch.arange(6, dtype=torch.float64).view(3, 2) / 4 + 0.5)  # distinct per matrix
    if strategy == "once_per_step":
        pcopt.PCState(m).after_step()
    raw = _raw(m, "mlp1_weight_EGD").detach()
    top = torch.stack([torch.linalg.svdvals(raw[:, j::2])[:, 0] for j in (0, 1)], dim=1)
    # converged estimate within 2e-7 + eps of the top singular value (see the test of the plain stack above)
    assert float((pc.sigma() - top).abs().max()) <= 2e-7 + pc.eps
    # the vector-Jacobian product at a random dL/dW_eff: autograd per forward, the closed-form pull-back once per step
    G = torch.randn(3, 2 * HIDDEN, DIM, dtype=torch.float64)
    if strategy == "per_forward":
        (m.mlp1_weight_EGD * G).sum().backward()
    else:
        m._parameters["mlp1_weight_EGD"].grad = G.clone()
        pcopt.kernel.pull_back_(list(pcopt.strategy.slots(m)))
    for e in range(3):
        for j in (0, 1):
            single = nn.Linear(DIM, HIDDEN, bias=False, dtype=torch.float64)
            with torch.no_grad():
                single.weight.copy_(raw[e, j::2])
            pcopt.precondition(single, degree=5)
            one = pcopt.preconditioner(single)
            with torch.no_grad():
                one.u.copy_(pc.u[e, j])
                one.v.copy_(pc.v[e, j])
                one.gamma.fill_(float(pc.gamma[e, j]))
            # the same map and VJP on the same matrix, in another op order (once per step: the Gram form):
            # float64 rounding over reductions of <= 40 terms, far below 1e-12
            assert _rel(m.mlp1_weight_EGD.detach()[e, j::2], single.weight.detach()) < 1e-12, (e, j)
            (single.weight * G[e, j::2]).sum().backward()
            assert (
                _rel(_raw(m, "mlp1_weight_EGD").grad[e, j::2], single.parametrizations.weight.original.grad)
                < 1e-12
            )
            assert _rel(pc.gamma.grad[e, j], one.gamma.grad[0]) < 1e-12, (e, j)


@pytest.mark.parametrize("strategy", ["per_forward", "once_per_step"])
def test_interleaved_stack_merges_and_loads_dense_weights_function_preserving(strategy):
    m = _fused(strategy=strategy, dtype=torch.float64)
    x = torch.randn(2, 4, DIM, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
    dense = pcopt.merged_state_dict(m)
    assert dense["mlp1_weight_EGD"].shape == (3, 2 * HIDDEN, DIM)
    # a fresh model loads the merged stacks through the SVD inverse per matrix. It stores the exact u, v normalized
    # as x / (|x| + 1e-7), so its sigma estimate is s_1 (1 - 2e-7); W_eff = gamma sigma p(W / sigma) then moves by
    # a relative (1 - x p'(x) / p(x)) * 2e-7 <= 2e-7 per singular value (0 <= x p' / p <= 1 on (0, 1] for the
    # degree-5 p); float64 SVD and inversion add ~1e-13. The output is a product through 3 such matrices (gate,
    # up, down), silu's slope <= 1.1: <= 7e-7.
    fresh = _fused(strategy=strategy, dtype=torch.float64, seed=1)
    pcopt.load_dense_state_dict(fresh, dense, preserve_function=True)
    with torch.no_grad():
        for name in FUSED:
            assert _rel(getattr(fresh, name), dense[name]) < 2.5e-7, name
        assert _rel(fresh(x), y) < 7e-7
    pcopt.merge(m)
    assert not pcopt.preconditioners(m)
    assert _rel(m(x), y) < 1e-12


def test_row_interleave_errors():
    m = _Fused(2)
    with pytest.raises(ValueError, match=r"row_interleave=3.*divisible by 3.*\(2, 80, 24\)"):
        pcopt.precondition(m, "mlp1_weight_EGD", row_interleave=3)
    with pytest.raises(ValueError, match=r"row_interleave to be a positive int.*got 0"):
        pcopt.precondition(m, "mlp1_weight_EGD", row_interleave=0)
