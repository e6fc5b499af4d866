"""PC on MoE expert stacks ``(E, out, in)``, one device: state per expert, once per step equal to per forward.

Each expert matrix ``W[e]`` has its own ``sigma``, ``u``, ``v`` and ``gamma`` (the paper's per-matrix rule applied
to every matrix of the stack), held batched: ``u (E, out)``, ``v (E, in)``, ``gamma (E,)``. The sharded layouts
(FSDP2 on the expert dim, expert parallelism, FSDP2 on a matrix dim) are in ``tests/distributed/test_experts_pc.py``.

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


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("degree", [5, 9])
@pytest.mark.parametrize("micro_batches", [1, 4])
def test_stack_once_per_step_equals_per_forward(degree, micro_batches, dtype, tol):
    ref = _stacks(degree=degree, dtype=dtype)
    once = copy.deepcopy(ref)
    pcopt.set_strategy(once, "once_per_step")
    assert pcopt.strategy_of(once) == "once_per_step"
    x = torch.randn(micro_batches, 3, 5, DIM, dtype=dtype)
    for m in (ref, once):
        opt = pcopt.build_optimizer(m, lr=3e-3, ns_dtype=dtype)
        for _ in range(3):
            for chunk in x:
                m(chunk).pow(2).sum().backward()  # once per step: pulled back at the end of each backward
            m.grads = {n: (_raw(m, n).grad.clone(), m.parametrizations[n][0].gamma.grad.clone()) for n in
                       ("w1_EFD", "w2_EDF")}  # fmt: skip
            opt.step()
            opt.zero_grad()
    for name in ("w1_EFD", "w2_EDF"):
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


def _pc_step_profile(experts: int) -> StepProfile:
    m = _stacks(experts=experts, strategy="once_per_step")
    state = pcopt.PCState(m)
    x = torch.randn(2, 4, DIM)
    m(x).pow(2).sum().backward()  # warm-up: the index and stack caches
    state.after_step()
    with StepProfile() as prof:  # the PC work of a step: the pull-back, the refresh and W_eff's write
        pcopt.kernel.pull_back_(list(pcopt.strategy.slots(m)))
        state.after_step()
    return prof


def test_pc_on_a_stack_reads_nothing_on_the_host_and_its_ops_do_not_grow_with_experts():
    """The batched state makes a stack one kernel chain: 2 or 64 experts, the same aten ops, no host sync."""
    few, many = _pc_step_profile(2), _pc_step_profile(64)
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
