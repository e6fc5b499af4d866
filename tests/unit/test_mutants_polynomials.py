"""Tests that kill the surviving mutants of pcopt/polynomials.py (benchmarks/mutation.py, docs/reliability.md).

References are independent of the code under test: float64 matrix powers, FLOP counts by hand, literals.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pcopt.polynomials import (
    PC_COEFFICIENTS,
    apply_polynomial,
    gram_polynomial,
    gram_polynomial_vjp,
    horner_chain,
    polynomial,
    validate_coefficients,
)


@pytest.mark.parametrize("degree", [3.0, 5.0, True, "3"])
def test_polynomial_rejects_non_int_degrees(degree):
    # 3.0 == 3 and hashes alike, so only the isinstance check rejects it.
    with pytest.raises(ValueError, match="Unsupported PC polynomial degree"):
        polynomial(degree)


@pytest.mark.parametrize("degree", sorted(PC_COEFFICIENTS))
def test_published_sets_validate_without_a_warning(degree):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validate_coefficients(PC_COEFFICIENTS[degree]) == PC_COEFFICIENTS[degree]


@pytest.mark.parametrize(
    ("offset", "warns"), [(0.5e-6, False), (0.99e-6, False), (1.005e-6, True), (2e-6, True)]
)
def test_sum_tolerance_is_one_in_a_million(offset, warns):
    # Offsets of 0.5e-6 and more are far above the fp64 rounding of fsum (~1e-16), so they are exact here.
    coeffs = (1.5 + offset, -0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validate_coefficients(coeffs)
    assert any("p(1) != 1" in str(w.message) for w in caught) == warns


@pytest.mark.parametrize(("m", "n"), [(4, 64), (64, 4)])
def test_only_the_smaller_gram_matrix_is_formed(m, n):
    # Hand count (multiply-add = 2 FLOPs), s = min(m, n), l = max(m, n): the Gram matrix 2 s^2 l, one s x s
    # Horner product per coefficient after the second 2 s^3, the final product 2 s^2 l.
    coeffs = PC_COEFFICIENTS[7]
    s, l_ = min(m, n), max(m, n)
    X = torch.randn(m, n, dtype=torch.float64)
    with FlopCounterMode(display=False) as counter:
        apply_polynomial(X, coeffs)
    assert counter.get_total_flops() == 2 * (2 * s * s * l_) + (len(coeffs) - 2) * 2 * s**3


@pytest.mark.parametrize("shape", [(3, 3), (2, 3, 3)])
def test_one_coefficient_is_a_multiple_of_the_identity(shape):
    G = torch.randn(shape, dtype=torch.float64)
    chain = horner_chain(G, (0.7,))
    assert len(chain) == 1
    expected = 0.7 * torch.eye(3, dtype=torch.float64).expand(shape)
    assert torch.equal(gram_polynomial(G, (0.7,)), expected)
    assert torch.equal(
        gram_polynomial_vjp(G, chain, (0.7,), torch.ones(shape, dtype=torch.float64)), torch.zeros(shape)
    )


def _vjp_reference(G: torch.Tensor, coeffs, R: torch.Tensor) -> torch.Tensor:
    """d/dG <R, sum_k a_k G^k> = sum_k a_k sum_{i<k} (G^T)^i R (G^T)^(k-1-i), with explicit float64 powers."""
    eye = torch.eye(G.shape[-1], dtype=torch.float64).expand_as(G)
    powers = [eye]
    for _ in range(len(coeffs)):
        powers.append(powers[-1] @ G.mT)
    out = torch.zeros_like(G)
    for k, a in enumerate(coeffs):
        for i in range(k):
            out = out + a * powers[i] @ R @ powers[k - 1 - i]
    return out


@pytest.mark.parametrize("degree", sorted(PC_COEFFICIENTS))
@pytest.mark.parametrize("shape", [(5, 5), (3, 4, 4)])
def test_gram_polynomial_vjp_matches_float64_powers(degree, shape):
    torch.manual_seed(degree)
    coeffs = PC_COEFFICIENTS[degree]
    G = torch.randn(shape, dtype=torch.float64) / 2  # not symmetric: a missing transpose shows
    R = torch.randn(shape, dtype=torch.float64)
    got = gram_polynomial_vjp(G, horner_chain(G, coeffs), coeffs, R)
    ref = _vjp_reference(G, coeffs, R)
    # fp64, at most 4 Horner steps of 5x5 products with entries O(10): rounding ~1e-13 relative to the scale.
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10 * ref.abs().max().item())
