"""Numerical faults: non-finite gradients and weights, zero matrices, bf16 weights with ill-conditioned spectra.

What is guaranteed (docs/reliability.md): a NaN/Inf that reaches a PC weight (through a gradient and an
optimizer step, or written into the weight) never leaves non-finite ``u``/``v`` behind: the refresh
re-initialises them on the device (no host sync), and ``PCState.health()`` / ``pcopt.refresh`` warn once,
naming the weight; once the weight is finite again the next refresh
recovers the float64 ``sigma_1``. A zero matrix gives ``sigma = eps``, ``W_eff = 0`` and finite gradients.
bf16 weights are mapped in fp32 and stay within 5e-3 (relative Frobenius) of the fp32 map for
condition numbers 1e4 and 1e8 (measured with 1e4, 1e5, 1e6 too).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.optim import AdamW

import pcopt
from pcopt.optim import Muon
from pcopt.power_iteration import sigma_estimate
from tests.conftest import TwoMatrices


def _matrix(m: int, n: int, singular_values, seed: int = 0) -> torch.Tensor:
    """float64 ``U diag(s) V^T`` with random orthonormal U, V."""
    g = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(singular_values, dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return (U * s) @ V.T


def _block() -> nn.Module:
    """Two PC matrices with a clear spectral gap (sigma_1 / sigma_2 = 2), so 10 iterations converge."""
    block = TwoMatrices()
    with torch.no_grad():
        spectrum = [1.0, *torch.linspace(0.5, 0.01, 15).tolist()]
        block.w1.weight.copy_(_matrix(24, 16, spectrum, seed=1))
        block.w2.weight.copy_(_matrix(16, 24, spectrum, seed=2))
    assert pcopt.precondition_model(block, targets=r"^w[12]$", degree=5) == ["w1", "w2"]
    return block


def _sigma_error(module: nn.Module) -> float:
    pc = module.parametrizations.weight[0]
    W = module.parametrizations.weight.original.detach()
    est = float(sigma_estimate(W, pc.u, pc.v)) + pc.eps
    s1 = float(torch.linalg.matrix_norm(W.double(), 2))
    return abs(est - s1) / s1


def _assert_unit_and_finite(module: nn.Module) -> None:
    pc = module.parametrizations.weight[0]
    for vec in (pc.u, pc.v):
        assert torch.isfinite(vec).all()
        assert abs(float(vec.norm()) - 1) < 1e-5


def _attached(opt, block):
    pcopt.PCState(block).attach(opt)
    return opt


OPTIMIZERS = {
    "Muon": lambda block: _attached(
        Muon([block.w1.parametrizations.weight.original, block.w2.parametrizations.weight.original], lr=0.02),
        block,
    ),
    "AdamW": lambda block: _attached(AdamW(block.parameters(), lr=1e-3), block),
}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_non_finite_gradient_through_a_step_never_poisons_u_v(name, bad):
    block = _block()
    clean = {n: p.detach().clone() for n, p in block.named_parameters()}
    opt = OPTIMIZERS[name](block)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    block(x).square().mean().backward()
    raw1 = block.w1.parametrizations.weight.original
    raw1.grad[3, 5] = bad  # one bad entry in one matrix's gradient

    opt.step()  # the refresh heals on the device, without a host sync; health() reads and reports it
    with pytest.warns(RuntimeWarning, match=r"w1\.weight .*re-initialised u and v\. Shown once per weight"):
        health = pcopt.PCState(block).health()
    assert health["w1.weight"] >= 1 and health["w2.weight"] == 0, health
    assert not torch.isfinite(raw1).all(), (
        "the bad gradient reached the weight (the optimizer does not filter)"
    )
    _assert_unit_and_finite(block.w1)
    # The other matrix is untouched by the fault: its refresh is exact.
    _assert_unit_and_finite(block.w2)
    assert _sigma_error(block.w2) < 1e-4

    # A second step (the NaN weight now spreads to every gradient) does not warn about w1 again (once
    # per weight), and the u, v of both matrices stay finite.
    opt.zero_grad()
    block(x).square().mean().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        pcopt.PCState(block).health()
    assert not [w for w in caught if "w1.weight" in str(w.message)]
    _assert_unit_and_finite(block.w1)
    _assert_unit_and_finite(block.w2)

    # Restoring finite weights (e.g. from a checkpoint) recovers sigma from the re-initialised u, v.
    with torch.no_grad():
        for n, p in block.named_parameters():
            p.copy_(clean[n])
    pcopt.refresh(block)
    assert _sigma_error(block.w1) < 1e-4 and _sigma_error(block.w2) < 1e-4
    assert torch.isfinite(block(x)).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_weight_heals_u_v_and_recovers(bad):
    block = _block()
    raw = block.w2.parametrizations.weight.original
    clean = raw.detach().clone()
    with torch.no_grad():
        raw[0, 0] = bad
    with pytest.warns(RuntimeWarning, match=r"w2\.weight became non-finite or zero during refresh"):
        pcopt.refresh(block)
    _assert_unit_and_finite(block.w2)
    _assert_unit_and_finite(block.w1)
    assert _sigma_error(block.w1) < 1e-4
    with torch.no_grad():
        raw.copy_(clean)
    pcopt.refresh(block)
    assert _sigma_error(block.w2) < 1e-4


def test_non_finite_u_v_from_a_checkpoint_heal_before_the_refresh():
    block = _block()
    sd = block.state_dict()
    sd["w1.parametrizations.weight.0.u"] = torch.full_like(sd["w1.parametrizations.weight.0.u"], float("nan"))
    sd["w1.parametrizations.weight.0.v"] = torch.zeros_like(sd["w1.parametrizations.weight.0.v"])
    block.load_state_dict(sd)
    with pytest.warns(RuntimeWarning, match=r"w1\.weight became non-finite or zero during refresh"):
        pcopt.refresh(block)
    assert _sigma_error(block.w1) < 1e-4


def test_zero_matrix_gives_sigma_eps_zero_output_and_finite_gradients():
    block = _block()
    with torch.no_grad():
        block.w1.parametrizations.weight.original.zero_()  # e.g. decayed or pruned to zero
    with pytest.warns(RuntimeWarning, match=r"w1\.weight became non-finite or zero"):
        pcopt.refresh(block)
    pc = block.w1.parametrizations.weight[0]
    W = block.w1.parametrizations.weight.original
    assert float(sigma_estimate(W.detach(), pc.u, pc.v)) + pc.eps == pc.eps
    assert torch.equal(block.w1.weight, torch.zeros(24, 16))
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    # d loss / d W_eff is non-zero at W_eff = 0 for this loss; the raw gradient is a_0 * gamma * that.
    loss = (block.w1(x) - 1).square().sum()
    loss.backward()
    assert torch.isfinite(W.grad).all() and W.grad.abs().max() > 0
    assert torch.isfinite(pc.gamma.grad).all()
    g_eff = 2 * (torch.zeros(4, 24) - 1).T @ x  # d loss / d W_eff
    a0 = pcopt.polynomial(5)[0]
    torch.testing.assert_close(W.grad, a0 * g_eff, rtol=1e-5, atol=1e-5)


def test_zero_matrix_in_a_batch_leaves_the_other_matrices_exact():
    class Batched(nn.Module):
        def __init__(self):
            super().__init__()
            W = torch.stack([_matrix(8, 6, [1.0, 0.5, 0.3, 0.2, 0.1, 0.05], seed=s) for s in range(3)])
            self.weight = nn.Parameter(W.float())

    m = Batched()
    with torch.no_grad():
        m.weight[1].zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pcopt.precondition(m, "weight")
        pcopt.refresh(m)
    pc = m.parametrizations.weight[0]
    W = m.parametrizations.weight.original.detach()
    est = sigma_estimate(W, pc.u, pc.v)
    torch.testing.assert_close(est[[0, 2]].double(), torch.ones(2, dtype=torch.float64), rtol=1e-4, atol=0)
    assert torch.isfinite(pc.u).all() and torch.isfinite(pc.v).all()


# --- bf16 weights -----------------------------------------------------------------------------------
def _spectrum(kind: str, k: int, cond: float) -> torch.Tensor:
    if kind == "geometric":
        s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), k, dtype=torch.float64)
    else:  # trained-like: a few outliers, a bulk, and a tail of small singular values down to 1/cond
        tail = k // 8
        s = torch.cat(
            [
                torch.tensor([1.0, 0.6, 0.4], dtype=torch.float64),
                torch.linspace(0.25, 0.05, k - 3 - tail, dtype=torch.float64),
                torch.logspace(-2, -torch.log10(torch.tensor(cond)).item(), tail, dtype=torch.float64),
            ]
        )
    return s * 0.02 * k**0.5  # the scale of a std-0.02 initialised matrix


BF16_REL_FRO = 5e-3  # relative Frobenius error of the bf16 map vs the fp32 map
BF16_REL_MAX = 1.5e-2  # largest entry error / largest entry
BF16_CASES = [
    (degree, shape, kind, cond)
    for cond in (1e4, 1e8)
    for kind in ("geometric", "trained")
    for shape in ((256, 96), (96, 256), (128, 128))
    for degree in (3, 5, 7, 9)
]


def bf16_errors(degree, shape, kind, cond) -> dict[str, float]:
    """Errors of the PC map of a bf16 weight against the fp32 map of the same weight (same u, v).

    ``rounding`` is the error of the fp32 result rounded to bf16: the floor any bf16 output has. Print the
    largest over the test cases with
    ``python -c "from tests.unit.test_reliability import *; print(bf16_worst(BF16_CASES))"``.
    """
    s = _spectrum(kind, min(shape), cond)
    W = _matrix(*shape, s.tolist(), seed=int(cond) % 97).float()
    lin = nn.Linear(shape[1], shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    pcopt.precondition(lin, degree=degree)
    pc = lin.parametrizations.weight[0]
    with torch.no_grad():
        ref = pc(W).double()
        out = pc(W.bfloat16())
    assert out.dtype == torch.bfloat16
    out = out.double()
    sig32 = float(sigma_estimate(W, pc.u, pc.v))
    sig16 = float(sigma_estimate(W.bfloat16().float(), pc.u, pc.v))
    return {
        "finite": float(torch.isfinite(out).all()),
        "rel_fro": float((out - ref).norm() / ref.norm()),
        "rel_max": float((out - ref).abs().max() / ref.abs().max()),
        "rounding": float((ref.bfloat16().double() - ref).norm() / ref.norm()),
        "sigma_rel": abs(sig16 - sig32) / sig32,
    }


def bf16_worst(cases) -> dict[str, float]:
    errors = [bf16_errors(*c) for c in cases]
    return {k: (min if k == "finite" else max)(e[k] for e in errors) for k in errors[0]}


@pytest.mark.parametrize("degree,shape,kind,cond", BF16_CASES)
def test_bf16_weight_stays_finite_and_close_to_fp32(degree, shape, kind, cond):
    e = bf16_errors(degree, shape, kind, cond)
    assert e["finite"] == 1.0
    assert e["rel_fro"] < BF16_REL_FRO, e
    assert e["rel_max"] < BF16_REL_MAX, e
    assert e["sigma_rel"] < 4e-3, e  # the sigma estimate moves by bf16 rounding only
