"""pcopt.spectral_clip against a float64 SVD of the soft clip, and against the closed-form scalar recursion.

Tolerances. The iteration runs 10 coupled Newton-Schulz steps (about 30 matrix products, each with
``m`` or ``n`` term sums). fp32 (unit roundoff 6e-8): the observed relative error is a few 1e-7; we allow
2e-5, a growth factor of ~300 over one rounding, comfortably above ``steps * sqrt(n) * u`` and small next to
any real error (a wrong bound or one missing step is off by 1e-2 or more). bf16 (unit roundoff 2^-8 = 3.9e-3):
every product rounds its output to 8 bits, so the result is good to a few units of roundoff; we allow 3e-2
(about 8 u) relative to the result, and 3% on the top singular value against ``c``.
"""

from __future__ import annotations

import math

import pytest
import torch

import pcopt
from pcopt.spectral_clip import auto_clip_steps, spectral_clip_flops

C = 10.0


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _with_spectrum(rows: int, cols: int, sigmas: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    U = _orthogonal(rows, gen)[:, :k]
    V = _orthogonal(cols, gen)[:, :k]
    return (U * sigmas.to(torch.float64)) @ V.T


def _reference(X: torch.Tensor, c: float) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    return (U * (S / torch.sqrt(1 + S**2 / c**2))) @ Vh


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


SPECTRA = {  # singular values relative to c
    "well_below": lambda k: torch.logspace(-3, -1, k),
    "around": lambda k: torch.logspace(math.log10(0.3), math.log10(3.0), k),
    "well_above": lambda k: torch.logspace(1, math.log10(30.0), k),
}


@pytest.mark.parametrize("regime", sorted(SPECTRA))
@pytest.mark.parametrize("shape", [(16, 40), (40, 16), (24, 24)])
def test_matches_svd_reference_fp32_and_fp64(regime, shape):
    sig = SPECTRA[regime](min(shape)) * C
    X = _with_spectrum(*shape, sig)
    ref = _reference(X, C)
    assert _rel(pcopt.spectral_clip(X, C), ref) < 1e-12  # float64 in, float64 iteration
    X32 = X.float()
    out = pcopt.spectral_clip(X32, C)
    assert out.dtype == torch.float32 and out.shape == X32.shape
    assert _rel(out, _reference(X32, C)) < 2e-5
    # singular values one by one, against c (the small ones are tested relative to themselves below)
    got = torch.linalg.svdvals(out.double())
    want = torch.linalg.svdvals(ref)
    assert torch.allclose(got, want, rtol=2e-5, atol=2e-5 * C)


@pytest.mark.parametrize("regime", sorted(SPECTRA))
def test_matches_svd_reference_bf16(regime):
    sig = SPECTRA[regime](16) * C
    X = _with_spectrum(16, 48, sig).float()
    ref = _reference(X, C)
    out = pcopt.spectral_clip(X, C, dtype=torch.bfloat16)
    assert out.dtype == torch.float32
    assert _rel(out, ref) < 3e-2
    top = torch.linalg.matrix_norm(out.double(), 2).item()
    assert abs(top - torch.linalg.matrix_norm(ref, 2).item()) < 0.03 * C
    # a bf16 input is computed in bf16 and returned as bf16
    out16 = pcopt.spectral_clip(X.bfloat16(), C)
    assert out16.dtype == torch.bfloat16 and _rel(out16, ref) < 3e-2


def test_small_singular_values_are_kept_relative_to_themselves():
    # sigma << c: H_c is the identity to second order (sigma^3 / 2c^2); check every singular value in fp32
    sig = torch.logspace(-4, -1, 12) * C
    X = _with_spectrum(12, 30, sig).float()
    got = torch.linalg.svdvals(pcopt.spectral_clip(X, C).double())
    want = torch.linalg.svdvals(_reference(X, C))
    assert torch.allclose(got, want, rtol=1e-4)


def _predicted_singular_values(X: torch.Tensor, c: float, steps: int) -> torch.Tensor:
    """Closed form of the iteration on each eigenvalue: x <- x (3 - x)^2 / 4 from x_0 = lam, z = sqrt(x / lam)."""
    W = X.double()
    if W.shape[0] > W.shape[1]:
        W = W.T
    S = W @ W.T
    bound = min(S.abs().sum(dim=1).max().item(), torch.linalg.matrix_norm(S).item())
    a = 1 + bound / c**2
    sig = torch.linalg.svdvals(W)
    lam = (1 + sig**2 / c**2) / a
    x = lam.clone()
    for _ in range(steps):
        x = x * (3 - x) ** 2 / 4
    return sig * torch.sqrt(x / lam) / math.sqrt(a)


def test_slow_convergence_regime_sigma_max_far_above_c():
    # sigma from 1e-2 c to 1e3 c: the bound a ~ 1e6 >> 2.25^10, so after 10 steps the small singular values
    # (eigenvalues of A / a near 1e-6) are not converged, while the large ones (near 1) are.
    sig = torch.logspace(-2, 3, 20) * C
    X = _with_spectrum(20, 50, sig)
    ref_sv = torch.linalg.svdvals(_reference(X, C))
    out = pcopt.spectral_clip(X, C, steps=10)  # float64: isolates the iteration from rounding
    got = torch.linalg.svdvals(out)
    # 1. exactly what the scalar recursion predicts for each singular value
    pred = torch.sort(_predicted_singular_values(X, C, 10), descending=True).values
    assert torch.allclose(got, pred, rtol=1e-8, atol=1e-10 * C)
    # 2. never above the exact clip, and the top of the spectrum (clipped to ~c) is right
    assert bool((got <= ref_sv * (1 + 1e-9)).all())
    assert abs(got[0].item() - ref_sv[0].item()) < 1e-6 * C
    # 3. the small ones come out far too small: the honest failure mode, not hidden by a loose tolerance
    assert got[-1].item() < 0.1 * ref_sv[-1].item()  # about 18x too small here
    # 4. more steps converge (fp64): 2.25^T must exceed a ~ 1e6, so T ~ 25 suffices
    conv = pcopt.spectral_clip(X, C, steps=25)
    assert torch.allclose(torch.linalg.svdvals(conv), ref_sv, rtol=1e-6)
    # 5. fp32 follows the same prediction (relative to c)
    got32 = torch.linalg.svdvals(pcopt.spectral_clip(X.float(), C, steps=10).double())
    assert torch.allclose(got32, pred, rtol=1e-4, atol=1e-4 * C)


def test_bound_holds_in_fp32_for_large_updates():
    gen = torch.Generator().manual_seed(3)
    for scale in (1.0, 30.0, 1000.0):
        X = torch.randn(32, 64, generator=gen) * scale
        top = torch.linalg.matrix_norm(pcopt.spectral_clip(X, C).double(), 2).item()
        assert top <= C * (1 + 1e-5)


def test_batch_equals_per_matrix_bitwise():
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(5, 12, 20, generator=gen) * torch.tensor([0.1, 1.0, 10.0, 100.0, 1e4]).view(5, 1, 1)
    out = pcopt.spectral_clip(batch, C, steps=10)
    for i in range(5):
        assert torch.equal(out[i], pcopt.spectral_clip(batch[i], C, steps=10)), i
    tall = batch.mT.contiguous()
    out_t = pcopt.spectral_clip(tall, C, steps=10)
    assert torch.allclose(out_t, out.mT, rtol=1e-5, atol=1e-6)
    # "auto" runs the batch's largest step count: a converged matrix only gets more steps of x <- x, the
    # fixed point, so it agrees with its own auto result to fp32 rounding (same 2e-5 as the SVD tests)
    auto = pcopt.spectral_clip(batch, C)
    for i in range(5):
        assert _rel(auto[i], pcopt.spectral_clip(batch[i], C)) < 2e-5, i


def _steps_to_converge(a: float, tol: float) -> int:
    """Independent count: iterate the coupled step on the 2 x 2 diagonal matrices A = diag(1, a) in float64
    (eigenvalue 1 is the worst case, A >= I) until Z sqrt(A) is within tol of I."""
    A = torch.diag(torch.tensor([1.0, a], dtype=torch.float64)) / a
    Y, Z, eye = A, torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    for t in range(1, 101):
        M = 0.5 * (3 * eye - Z @ Y)
        Y, Z = Y @ M, M @ Z
        if (1 - torch.diagonal(Z) * torch.sqrt(torch.diagonal(A))).abs().max() <= tol:
            return t
    return 100


@pytest.mark.parametrize("a", [1.0 + 1e-3, 10.0, 1e4, 1e6])
def test_auto_steps_is_the_fewest_that_converge(a):
    from pcopt.spectral_clip import auto_clip_steps

    for dtype in (torch.float32, torch.float64):
        eps = torch.finfo(dtype).eps
        # the count agrees with the matrix iteration within one step (the diagonal run rounds in float64)
        assert abs(auto_clip_steps(a, dtype) - _steps_to_converge(a, eps)) <= 1
    # grows like log(a) / log(2.25): 100x more a costs log(100) / log(2.25) = 5.7 more steps
    if a >= 1e4:
        assert auto_clip_steps(a, torch.float32) - auto_clip_steps(a / 100, torch.float32) in (5, 6, 7)


def test_sigma_max_100_times_c_is_accurate_by_default_and_the_authors_10_is_not():
    """The issue's case: singular values 1e-3 .. 100, c = 1 (sigma_max / c = 100)."""
    c = 1.0
    sig = torch.logspace(-3, 2, 24, dtype=torch.float64)
    X = _with_spectrum(24, 64, sig)
    ref = _reference(X, c)
    want = torch.linalg.svdvals(ref)
    # float64 iteration: only the iteration's own error is left (converged to float64 eps per singular value)
    assert _rel(pcopt.spectral_clip(X, c), ref) < 1e-10
    # float32: rounding A / a (entries <= 1) perturbs its smallest eigenvalue, 1 / a with a ~ 1.1e4 here, by
    # about sqrt(m) * 2^-24 absolutely, i.e. by sqrt(24) * 6e-8 * 1.1e4 = 3.2e-3 relatively; the inverse square
    # root halves that: 1.6e-3 per singular value, whatever the step count (measured 1.2e-4). Allow 2e-3.
    got = torch.linalg.svdvals(pcopt.spectral_clip(X.float(), c).double())
    assert torch.allclose(got, want, rtol=2e-3, atol=0)
    # the authors' 10 steps: the small singular values are far off (the default is what fixes it)
    ten = torch.linalg.svdvals(pcopt.spectral_clip(X, c, steps=10))
    assert ((ten - want).abs() / want).max() > 0.1


def test_vector_rule():
    g = torch.tensor([3.0, 4.0])  # norm 5
    assert torch.equal(pcopt.spectral_clip(g, 5.0), g)
    out = pcopt.spectral_clip(g, 2.5)
    assert torch.allclose(out, g / math.sqrt(1 + 4.0))
    assert torch.equal(pcopt.spectral_clip(torch.tensor(7.0), 10.0), torch.tensor(7.0))
    assert torch.allclose(
        pcopt.spectral_clip(torch.tensor(-30.0), 10.0), torch.tensor(-30.0 / math.sqrt(10.0))
    )


def test_huge_c_is_identity_in_fp32():
    X = torch.randn(8, 13, generator=torch.Generator().manual_seed(2))
    assert torch.equal(pcopt.spectral_clip(X, 1e30), X)
    assert torch.equal(pcopt.spectral_clip(X.T, 1e30), X.T)


def test_empty_and_flops():
    assert pcopt.spectral_clip(torch.zeros(0, 5), C).shape == (0, 5)
    assert spectral_clip_flops((16, 40), steps=10) == 4 * 16**2 * 40 + 56 * 16**3
    assert spectral_clip_flops((40, 16), steps=3) == spectral_clip_flops((16, 40), steps=3)
    assert spectral_clip_flops((2, 16, 40)) == 2 * spectral_clip_flops((16, 40))


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"c": 0.0}, ValueError, r"finite and > 0, got 0\.0"),
        ({"c": -1.0}, ValueError, r"finite and > 0, got -1\.0"),
        ({"c": float("inf")}, ValueError, r"finite and > 0, got inf"),
        ({"c": float("nan")}, ValueError, r"finite and > 0, got nan"),
        ({"c": "10"}, TypeError, r"real number \(float\), got str"),
        ({"c": True}, TypeError, r"real number \(float\), got bool"),
        ({"c": 1.0, "steps": 0}, ValueError, r"between 1 and 100.*got 0"),
        ({"c": 1.0, "steps": 2.5}, TypeError, r"steps must be an int.*float"),
        ({"c": 1.0, "dtype": torch.int32}, TypeError, r"dtype must be None.*torch\.int32"),
        ({"c": 1.0, "dtype": "half-ish"}, TypeError, r"dtype must be None.*half-ish"),
    ],
)
def test_bad_arguments(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        pcopt.spectral_clip(torch.randn(3, 4), **kwargs)


def test_bad_inputs():
    with pytest.raises(TypeError, match=r"expects a torch\.Tensor, got list"):
        pcopt.spectral_clip([[1.0, 2.0]], 1.0)
    with pytest.raises(TypeError, match=r"real floating tensor, got dtype torch\.int64"):
        pcopt.spectral_clip(torch.ones(2, 2, dtype=torch.int64), 1.0)


def test_auto_steps_past_the_bf16_limit_run_in_fp32():
    """A near-singular 256 x 256 (+-1 entries) at c = 0.5 needs ~20 automatic steps; the coupled iteration in bf16
    diverges there (NaN after 20 explicit bf16 steps), so the "auto" count runs it in fp32: finite, and within
    bf16's output rounding (2^-8) of a float64 SVD soft clip, where the explicit bf16 count is not finite."""
    from pcopt.spectral_clip import BF16_STABLE_STEPS, auto_clip_steps

    torch.manual_seed(0)
    X = torch.randn(256, 256).sign()
    a = 1 + float(torch.linalg.matrix_norm(X.double(), 2)) ** 2 / 0.25
    assert auto_clip_steps(a, torch.bfloat16) > BF16_STABLE_STEPS
    u, s, vh = torch.linalg.svd(X.double())
    ref = (u * (s / torch.sqrt(1 + s**2 / 0.25))) @ vh
    got = pcopt.spectral_clip(X.bfloat16(), 0.5)  # dtype None: the input's, bf16
    assert got.dtype == torch.bfloat16
    assert float((got.double() - ref).norm() / ref.norm()) < 2**-8
    # what it avoids: an explicit count that long, kept in bf16, diverges (rounding-driven, so the test asks only
    # for "no longer a clip": non-finite, or off by more than the result itself)
    bad = pcopt.spectral_clip(X, 0.5, steps=25, dtype=torch.bfloat16).double()
    assert not torch.isfinite(bad).all() or float((bad - ref).norm() / ref.norm()) > 1


# ----------------------------------------------------------------------------------------------------
# Tests that kill the surviving mutants of pcopt/spectral_clip.py (tools/mutation.py, docs/reliability.md).
#
# References: an independent float64 run of the scalar recursion, and FLOP counts by hand.


def _steps_by_hand(a_max: float, eps: float) -> int:
    """x_0 = 1 / a, x <- x (3 - x)^2 / 4 until 1 - sqrt(x) <= eps; at least one step."""
    xs = [1.0 / a_max]
    while len(xs) == 1 or 1.0 - math.sqrt(xs[-1]) > eps:
        xs.append(xs[-1] * (3.0 - xs[-1]) ** 2 / 4.0)
    return len(xs) - 1


def test_auto_steps_match_a_float64_recursion():
    assert auto_clip_steps(1.0, torch.float32) == 1  # already converged: one step
    for a in (1.5, 10.0, 1 + 100.0**2, 1e6):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            assert auto_clip_steps(a, dtype) == _steps_by_hand(a, torch.finfo(dtype).eps), (a, dtype)


@pytest.mark.parametrize("shape", [(3, 0), (0, 3), (2, 3, 0)])
def test_empty_matrices_come_back_unchanged(shape):
    X = torch.zeros(shape)
    out = pcopt.spectral_clip(X, 1.0)
    assert out.shape == X.shape and out is not X


def test_vector_flops():
    # ||g||: n multiply-adds (2n FLOPs), then one multiply per element: 3n.
    assert spectral_clip_flops((10,)) == 30
    assert spectral_clip_flops((4, 5)) == 4 * 16 * 5 + (6 * 10 - 4) * 64
