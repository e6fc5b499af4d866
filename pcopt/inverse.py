"""Inverse of the PC map: the raw weight whose effective weight is a given dense matrix.

Used for function-preserving dense starts (``pcopt.load_dense_state_dict(..., preserve_function=True)``) and
for assignments ``module.weight = dense`` on a preconditioned module. An SVD of the dense matrix gives its
singular values ``s_i``; each ratio ``s_i / s_1`` is mapped back through ``p`` by bisection on the
polynomial's first increasing branch on ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pcopt.polynomials import evaluate_scalar
from pcopt.power_iteration import normalize

__all__ = ["dense_to_raw", "invert_polynomial", "increasing_branch_end"]


def increasing_branch_end(coefficients: Sequence[float]) -> float:
    """End of the first increasing stretch of ``p`` on ``[0, 1]``; where its inverse is well defined."""
    x = torch.linspace(0, 1, 20001, dtype=torch.float64)
    y = evaluate_scalar(coefficients, x)
    dec = torch.nonzero(y[1:] < y[:-1]).flatten()
    return float(x[dec[0]]) if len(dec) else 1.0


def invert_polynomial(coefficients: Sequence[float], t: Tensor) -> Tensor:
    """Solve ``p(x) = t`` for ``x`` on the increasing branch of ``p`` (bisection, float64)."""
    hi_x = increasing_branch_end(coefficients)
    peak = evaluate_scalar(coefficients, hi_x)
    if bool((t > peak + 1e-12).any()):
        raise ValueError(
            f"Cannot invert the PC polynomial: it peaks at {peak:.4f} on its increasing branch but a singular-value "
            f"ratio of {float(t.max()):.4f} is needed. Use a polynomial that reaches 1 (coefficients summing to 1)."
        )
    lo = torch.zeros_like(t)
    hi = torch.full_like(t, hi_x)
    for _ in range(60):
        mid = (lo + hi) / 2
        below = evaluate_scalar(coefficients, mid) < t
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return (lo + hi) / 2


def dense_to_raw(dense: Tensor, coefficients, gamma: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Raw weight ``W`` and exact ``u``, ``v`` such that ``gamma sg(sigma) p(W / sigma) = dense`` (sigma = s_1)."""
    D = dense.detach().to(torch.float64)
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    g = (
        gamma.to(torch.float64).reshape(*D.shape[:-2], 1)
        if D.ndim > 2
        else gamma.to(torch.float64).reshape(1)
    )
    if bool((g <= 0).any()):
        raise ValueError(f"Function-preserving conversion needs gamma > 0, got {gamma.tolist()}.")
    s1 = S[..., :1]
    ratios = (S / s1.clamp_min(1e-300)).clamp(0, 1)
    x = invert_polynomial(coefficients, ratios)
    x[..., 0] = 1.0  # the top direction sits at p(1) = 1, so sigma(W) = s_1 / gamma
    w = x * (s1 / g)
    w[..., 0] -= eps  # u^T W v + eps == s1 / gamma, the sigma the ratios were solved for
    raw = (U * w.unsqueeze(-2)) @ Vh
    return raw, normalize(U[..., :, 0]).float(), normalize(Vh[..., 0, :]).float()
