"""Tests that kill the surviving mutants of pcopt/optim/_newton_schulz.py (benchmarks/mutation.py).

References: the Polar Express paper's published coefficient listing (Amsel et al., arXiv:2505.16932,
Algorithm 1, as released with the paper), the classical quintic (15 x - 10 x^3 + 3 x^5) / 8, and
torch.optim's own Newton-Schulz kernel.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz

from pcopt.optim._newton_schulz import (
    KELLER_COEFFICIENTS,
    NS_COEFFICIENT_SETS,
    newton_schulz,
    resolve_coefficients,
    resolve_dtype,
)
from tests.unit.test_newton_schulz import PUBLISHED_POLAR_EXPRESS


def test_polar_express_is_the_published_list_with_the_safety_factor():
    triples, norm_factor = NS_COEFFICIENT_SETS["polar_express"]
    assert norm_factor == 1.01
    assert len(triples) == len(PUBLISHED_POLAR_EXPRESS) == 8
    for got, (a, b, c) in zip(triples[:-1], PUBLISHED_POLAR_EXPRESS[:-1]):
        # p(x / 1.01): one division per coefficient, so 1 ulp of fp64 at most.
        assert got == pytest.approx((a / 1.01, b / 1.01**3, c / 1.01**5), rel=1e-15)
    # The last one is the classical quintic that fixes 1 with p'(1) = p''(1) = 0: (15, -10, 3) / 8.
    assert triples[-1] == (15 / 8, -10 / 8, 3 / 8) == PUBLISHED_POLAR_EXPRESS[-1]


@pytest.mark.parametrize(
    "coefficients",
    [(3.4, -4.7), (3.4, -4.7, 2.0, 0.1), [3.4, -4.7, math.nan], "abc", (3.4, True, 2.0)],
)
def test_only_three_finite_numbers_are_a_triple(coefficients):
    with pytest.raises(ValueError, match="ns_coefficients"):
        resolve_coefficients(coefficients, None, 5)
    with pytest.raises(ValueError, match="ns_coefficient_set"):
        resolve_coefficients(KELLER_COEFFICIENTS, [coefficients], 5)


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64, torch.bool])
def test_non_floating_dtypes_are_refused(dtype):
    with pytest.raises(ValueError, match="Invalid ns_dtype"):
        resolve_dtype(dtype)


@pytest.mark.parametrize("shape", [(16, 16), (12, 20), (20, 12)])
def test_bitwise_equal_to_torch_optim_muon_in_bf16(shape):
    # The module's contract: one repeated triple in bf16 gives torch.optim.Muon's bits; square matrices are
    # not transposed there (a transposed square iteration rounds differently).
    torch.manual_seed(sum(shape))
    G = torch.randn(shape)
    ours = newton_schulz(G, (KELLER_COEFFICIENTS,) * 5, eps=1e-7, dtype=torch.bfloat16)
    theirs = _zeropower_via_newtonschulz(G, KELLER_COEFFICIENTS, 5, 1e-7)
    assert torch.equal(ours, theirs)
