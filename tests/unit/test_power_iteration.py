"""The power iteration (pcopt/power_iteration.py): normalisation, start vectors, sigma, the healing of invalid
vectors and the batched half-steps, each pinned down exactly enough that every one-token mutant of the module
fails here or in test_parametrization.py (tools/mutation.py, docs/reliability.md).

References: literals, float64 SVD, and the shard bookkeeping re-derived by hand on a single process.
"""

from __future__ import annotations

import math

import pytest
import torch

import pcopt.power_iteration as spectral
from pcopt.power_iteration import _Group, _half_step, invalid, normalize, power_iteration_


def test_normalize_adds_the_epsilon_to_the_norm():
    # ||x|| = 5e-7: x / (5e-7 + 1e-7) has norm 5/6 (fp64, so the literal holds to ~1e-16).
    x = torch.tensor([3e-7, 4e-7], dtype=torch.float64)
    assert math.isclose(torch.linalg.vector_norm(normalize(x)).item(), 5 / 6, rel_tol=1e-12)


def test_invalid_uses_the_documented_norm_threshold():
    # "not finite or has norm <= 0.5": norms 0.5 and 0.503 sit on either side of the threshold.
    v = torch.tensor([[0.5, 0.0], [0.503, 0.0], [1.0, 0.0], [math.nan, 1.0], [0.0, 0.0]], dtype=torch.float64)
    assert invalid(v).tolist() == [True, False, False, True, True]


def _top_singular(W: torch.Tensor):
    U, S, Vh = torch.linalg.svd(W.double())
    return U[:, 0], S[0], Vh[0]


def test_a_bad_u_alone_is_restarted_before_iterating():
    torch.manual_seed(0)
    W = torch.randn(6, 4) * torch.tensor([4.0, 1.0, 0.5, 0.2])  # well separated top singular value
    u0, v0 = spectral.init_singular_vectors(W.shape, seed=3)
    u = torch.full_like(u0, math.nan)
    v = v0.clone()
    counts = power_iteration_([W], [u], [v], 30, init=([u0], [v0]))
    assert counts[0].item() == 1
    # Restarted, then iterated: u is the top left singular vector (gap 4x, 30 iterations: fp32-exact).
    u_ref, _, v_ref = _top_singular(W)
    assert abs(torch.dot(u.double(), u_ref).item()) == pytest.approx(1.0, abs=1e-5)
    assert abs(torch.dot(v.double(), v_ref).item()) == pytest.approx(1.0, abs=1e-5)


def test_float64_weights_iterate_in_float64():
    torch.manual_seed(1)
    W = torch.randn(8, 5, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.7, 0.3, 0.1], dtype=torch.float64)
    u, v = (t.double() for t in spectral.init_singular_vectors(W.shape))
    power_iteration_([W], [u], [v], 200, init=None)
    u_ref, _, v_ref = _top_singular(W)
    # (sigma_2/sigma_1)^2 = 1/9 per iteration: converged to fp64 rounding (~1e-15); an fp32 iteration would
    # leave the vectors rounded to fp32 (~6e-8). normalize's eps shortens them by ~1e-7 / sigma: compare
    # directions.
    for got, ref in ((u, u_ref), (v, v_ref)):
        d = got / got.norm()
        assert (d * torch.sign(d @ ref) - ref).abs().max().item() < 1e-12


def test_half_step_scatters_a_shard_and_flattens_for_the_reduction(monkeypatch):
    # One rank's block of a batched (2, 6, 8) weight: batch 1:2, rows 2:5, cols 3:8 (a single process).
    torch.manual_seed(2)
    full_W = torch.randn(2, 6, 8, dtype=torch.float64)
    index = (slice(1, 2), slice(2, 5), slice(3, 8))
    block = full_W[index]
    U = torch.randn(1, 2, 6, dtype=torch.float64)  # the stack (B = 1) of the global vectors
    V = torch.randn(1, 2, 8, dtype=torch.float64)
    reduced = []
    monkeypatch.setattr(spectral, "all_reduce_", lambda flat, mesh, dims: reduced.append(flat.clone()))
    g = _Group(block[None], U.clone(), V.clone(), index, full=False)
    (new_v,) = _half_step([g], None, (0,), transpose=True)
    (new_u,) = _half_step([g], None, (0,), transpose=False)
    exp_v = torch.zeros(1, 2, 8, dtype=torch.float64)
    exp_v[0, 1, 3:8] = U[0, 1, 2:5] @ block[0]
    exp_u = torch.zeros(1, 2, 6, dtype=torch.float64)
    exp_u[0, 1, 2:5] = block[0] @ V[0, 1, 3:8]
    torch.testing.assert_close(reduced[0], exp_v.reshape(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_v, normalize(exp_v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_u, normalize(exp_u), rtol=1e-12, atol=1e-12)
