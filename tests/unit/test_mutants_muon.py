"""Tests that kill the surviving mutants of pcopt/optim/_muon.py (benchmarks/mutation.py, docs/reliability.md).

References: the stacking rule of ``_matrices_per_call`` as its docstring states it, evaluated by hand with
the element budgets 2^19 (CPU chunks) and 2^27 (one call), and a recording stand-in for the hardware check.
"""

from __future__ import annotations

import pytest
import torch

import pcopt.optim._muon as muon_mod
from pcopt.optim import Muon

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
    monkeypatch.setattr(muon_mod, "warn_slow_newton_schulz", lambda groups: calls.append(list(groups)))
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
