import math
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import pcopt
from pcopt.polynomials import (
    PC_COEFFICIENTS,
    apply_polynomial,
    evaluate_scalar,
    gram_polynomial,
    gram_polynomial_vjp,
    horner_chain,
    polynomial,
    validate_coefficients,
)


def _svd_reference(X: torch.Tensor, coeffs) -> torch.Tensor:
    """p applied to the singular values through a float64 SVD: U diag(p(s)) V^T."""
    U, S, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    return (U * evaluate_scalar(coeffs, S).unsqueeze(-2)) @ Vh


@pytest.mark.parametrize("degree", [3, 5, 7, 9])
def test_coefficients_map_one_to_one_and_amplify_small_values(degree):
    coeffs = pcopt.polynomial(degree)
    assert len(coeffs) == (degree + 1) // 2
    assert math.isclose(evaluate_scalar(coeffs, 1.0), 1.0, abs_tol=1e-9)
    assert coeffs[0] > 1.0  # p'(0) > 1: small singular values grow
    # p >= 0.9 from these points on (the reference's flattening thresholds) and never above ~1.02
    start = {3: 0.726, 5: 0.549, 7: 0.396, 9: 0.320}[degree]
    y = evaluate_scalar(coeffs, torch.linspace(start, 1.0, 500, dtype=torch.float64))
    assert y.min() > 0.899 and y.max() < 1.021


@pytest.mark.parametrize("degree", [3, 5, 7, 9])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (3, 16, 20), (32, 32)])
def test_apply_polynomial_matches_svd_reference(degree, shape):
    g = torch.Generator().manual_seed(degree)
    X = torch.randn(*shape, generator=g, dtype=torch.float64)
    X = X / torch.linalg.matrix_norm(X, 2, keepdim=True)  # singular values in [0, 1]
    coeffs = PC_COEFFICIENTS[degree]
    ref = _svd_reference(X, coeffs)
    got64 = apply_polynomial(X, coeffs)
    assert torch.allclose(got64, ref, atol=1e-12, rtol=0)
    got32 = apply_polynomial(X.float(), coeffs).double()
    assert (got32 - ref).norm() / ref.norm() < 1e-6


def test_single_coefficient_is_scaling():
    X = torch.randn(5, 7)
    assert torch.equal(apply_polynomial(X, (0.5,)), X * 0.5)


def test_validate_coefficients():
    assert validate_coefficients([1.5, -0.5]) == (1.5, -0.5)
    with pytest.warns(UserWarning, match=r"sum to 2.*p\(1\) != 1"):
        validate_coefficients((1.0, 1.0))
    with pytest.raises(ValueError, match="must be finite"):
        validate_coefficients((1.0, float("nan")))
    with pytest.raises(ValueError, match="are empty"):
        validate_coefficients(())
    with pytest.raises(ValueError, match="sequence of floats"):
        validate_coefficients("1.5,-0.5")
    with pytest.raises(
        ValueError, match="Unsupported PC polynomial degree: expected one of \\[3, 5, 7, 9\\], got 4"
    ):
        pcopt.polynomial(4)


def test_selective_activation_checkpointing_saves_matmuls_without_mutation_errors():
    # torchtitan's selective AC saves matmul outputs; an in-place op on one of them would be refused.
    from functools import partial

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    saved_ops = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved_ops else CheckpointPolicy.PREFER_RECOMPUTE

    coeffs = pcopt.polynomial(9)
    for shape in [(48, 24), (2, 24, 48)]:
        X = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        target = torch.randn(shape, dtype=torch.float64)
        (apply_polynomial(X, coeffs) * target).sum().backward()
        expected, X.grad = X.grad, None
        out = checkpoint(
            apply_polynomial,
            X,
            coeffs,
            use_reentrant=False,
            context_fn=partial(create_selective_checkpoint_contexts, policy),
        )
        (out * target).sum().backward()
        assert torch.allclose(X.grad, expected, rtol=1e-12, atol=0)


# The published table (the PC-layer paper's released configs, pc_level 1..4 -> degree 3, 5, 7, 9), written out
# here from the paper rather than read from pcopt, so that a typo in pcopt.polynomials fails.
PUBLISHED_PC_COEFFICIENTS = {
    3: (1.507, -0.507),
    5: (2.083, -1.643, 0.560),
    7: (2.909, -4.649, 4.023, -1.283),
    9: (3.625, -9.261, 14.097, -10.351, 2.890),
}
# Shape facts of each published polynomial on [0, 1], derived independently in float64 and printed to 3
# decimals (4 for the degree-9 maximum): (max p, where it is, the first x with p(x) >= 0.9).
PUBLISHED_SHAPE = {
    3: (1.000, 0.995, 0.726),
    5: (1.010, 0.839, 0.549),
    7: (1.019, 0.623, 0.396),
    9: (1.0205, 0.513, 0.320),
}


def test_pc_coefficients_are_the_published_table():
    assert PC_COEFFICIENTS.keys() == PUBLISHED_PC_COEFFICIENTS.keys()
    for degree, published in PUBLISHED_PC_COEFFICIENTS.items():
        assert PC_COEFFICIENTS[degree] == published, degree


@pytest.mark.parametrize("degree", [3, 5, 7, 9])
def test_pc_polynomial_shape_matches_the_published_facts(degree):
    """A coefficient change that keeps p(1) = 1 still moves the maximum, its location or the 0.9 crossing."""
    x = torch.linspace(0.0, 1.0, 1_000_001, dtype=torch.float64)  # grid step 1e-6
    p = evaluate_scalar(PC_COEFFICIENTS[degree], x)
    top, where, reach = PUBLISHED_SHAPE[degree]
    # Half a unit of the printed digit, plus one grid step for the locations.
    half = 5e-5 if degree == 9 else 5e-4
    assert abs(p.max().item() - top) <= half, (degree, p.max().item())
    assert abs(x[p.argmax()].item() - where) <= 5e-4 + 1e-6, (degree, x[p.argmax()].item())
    first = x[torch.nonzero(p >= 0.9)[0, 0]].item()
    assert abs(first - reach) <= 5e-4 + 1e-6, (degree, first)


# ----------------------------------------------------------------------------------------------------
# Tests that kill the surviving mutants of pcopt/polynomials.py (tools/mutation.py, docs/reliability.md).
#
# References are independent of the code under test: float64 matrix powers, FLOP counts by hand, literals.


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
