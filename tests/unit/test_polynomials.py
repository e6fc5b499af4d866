import math

import pytest
import torch

import pcopt
from pcopt.polynomials import PC_COEFFICIENTS, apply_polynomial, evaluate_scalar, validate_coefficients


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
