"""Odd matrix polynomials that flatten a spectrum, and their evaluation on the smaller Gram matrix.

An odd polynomial ``p(x) = a_0 x + a_1 x^3 + ... + a_k x^(2k+1)`` acts on the singular values of a
matrix ``X = U diag(s) V^T`` as ``p(X) = U diag(p(s)) V^T``. Writing ``q(g) = a_0 + a_1 g + ... + a_k g^k``,
``p(X) = X q(X^T X)`` (tall ``X``) ``= q(X X^T) X`` (wide ``X``), so only the ``min(m, n)``-sized Gram
matrix is ever formed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from einops import pack, unpack
from torch import Tensor

__all__ = [
    "PC_COEFFICIENTS",
    "polynomial",
    "apply_polynomial",
    "gram_polynomial",
    "gram_polynomial_vjp",
    "horner_chain",
    "validate_coefficients",
    "evaluate_scalar",
]

# Coefficients (a_0, a_1, ...) of x, x^3, x^5, ... for the PC layer polynomials, by degree of p.
# Source: Wang et al., "PC Layer: Polynomial Weight Preconditioning" (2026), released training configs
# (pc_level 1..4). Each set sums to 1, so p(1) = 1 and the top singular direction keeps its scale.
PC_COEFFICIENTS: dict[int, tuple[float, ...]] = {
    3: (1.507, -0.507),
    5: (2.083, -1.643, 0.560),
    7: (2.909, -4.649, 4.023, -1.283),
    9: (3.625, -9.261, 14.097, -10.351, 2.890),
}


def polynomial(degree: int) -> tuple[float, ...]:
    """Return the coefficients of the PC polynomial of the given degree (3, 5, 7 or 9).

    The tuple holds the coefficients of ``x, x^3, x^5, ...`` in that order.
    """
    if isinstance(degree, bool) or not isinstance(degree, int) or degree not in PC_COEFFICIENTS:
        raise ValueError(
            f"Unsupported PC polynomial degree: expected one of {sorted(PC_COEFFICIENTS)}, got {degree!r}. "
            "Pass degree=3, 5, 7 or 9, or give your own odd polynomial with coefficients=(a_1, a_3, ...)."
        )
    return PC_COEFFICIENTS[degree]


def evaluate_scalar(coefficients: Sequence[float], x):
    """Evaluate the odd polynomial on scalars or arrays (numpy or torch): ``sum_j a_j x^(2j+1)``."""
    x2 = x * x
    acc = 0.0 * x + coefficients[-1]
    for a in reversed(coefficients[:-1]):
        acc = acc * x2 + a
    return acc * x


def validate_coefficients(coefficients: Sequence[float]) -> tuple[float, ...]:
    """Check a custom coefficient set and return it as a tuple of floats.

    The coefficients are those of the odd powers ``x, x^3, x^5, ...``. They must be finite and non-empty.
    A set that does not map 1 to 1 (``sum != 1``) is accepted with a warning: the top singular value is then
    rescaled by ``p(1)`` and only the learnable gamma can compensate.
    """
    if isinstance(coefficients, (str, bytes)) or not isinstance(coefficients, Sequence):
        raise ValueError(
            "PC coefficients must be a sequence of floats (the coefficients of x, x^3, x^5, ...), "
            f"got {type(coefficients).__name__}. Example: coefficients=(1.5, -0.5)."
        )
    try:
        values = tuple(float(c) for c in coefficients)
    except (TypeError, ValueError):
        raise ValueError(
            f"PC coefficients must all be real numbers (coefficients of x, x^3, x^5, ...), got {coefficients!r}."
        ) from None
    if not values:
        raise ValueError(
            "PC coefficients are empty: expected at least one coefficient (of x). Example: coefficients=(1.5, -0.5)."
        )
    if not all(math.isfinite(c) for c in values):
        raise ValueError(f"PC coefficients must be finite, got {values}. Remove the inf/nan entries.")
    total = math.fsum(values)
    if abs(total - 1.0) > 1e-6:
        warnings.warn(
            f"PC coefficients {values} sum to {total:.6g}, so p(1) != 1: the top singular value of the "
            "effective weight is scaled by that factor. Normalise them to sum to 1 to keep the scale of W.",
            stacklevel=3,
        )
    return values


def apply_polynomial(X: Tensor, coefficients: Sequence[float]) -> Tensor:
    """Apply the odd polynomial with ``coefficients`` (of ``x, x^3, ...``) to the singular values of ``X``.

    ``X`` is a matrix ``(m, n)`` or a batch ``(..., m, n)``. The Gram matrix of the smaller side is formed
    once and ``q`` is evaluated by Horner's rule with one fused multiply-add (``addmm`` / ``baddbmm``) per
    coefficient after the second. Differentiable, and free of in-place ops (activation-checkpoint safe).
    """
    if X.ndim < 2:
        raise ValueError(
            f"apply_polynomial expects a matrix or a batch of matrices, got shape {tuple(X.shape)}."
        )
    coefficients = tuple(coefficients)
    if len(coefficients) == 1:
        return X * coefficients[0]
    tall = X.shape[-2] >= X.shape[-1]
    gram = X.mT @ X if tall else X @ X.mT
    q = gram_polynomial(gram, coefficients)
    return X @ q if tall else q @ X


def gram_polynomial(gram: Tensor, coefficients: Sequence[float]) -> Tensor:
    """``q(G) = a_0 I + a_1 G + ... + a_k G^k`` for a Gram matrix ``G`` ``(..., k, k)``: ``p(X) = X q(X^T X)``.

    Horner's rule with one fused multiply-add (``addmm`` / ``baddbmm``) per coefficient after the second.
    Everything is out of place, so activation checkpointing (which forbids mutating saved tensors) and
    autograd work unchanged. Both execution strategies of the PC layer evaluate the polynomial here.
    """
    return horner_chain(gram, coefficients)[-1]


def horner_chain(gram: Tensor, coefficients: Sequence[float]) -> list[Tensor]:
    """Horner's iterates ``[Q_{d-1}, ..., Q_0]`` of ``q(G)`` (``Q_j = a_j I + G Q_{j+1}``, ``Q_d = a_d I``).

    The last one is ``q(G)``; :func:`gram_polynomial_vjp` takes the list to differentiate without autograd.
    """
    coefficients = tuple(coefficients)
    k = gram.shape[-1]
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    if len(coefficients) == 1:
        return [(eye * coefficients[0]).expand_as(gram)]
    chain = [torch.add(eye * coefficients[-2], gram, alpha=coefficients[-1])]
    if gram.ndim > 2:  # any batch shape, flattened into the one batch dim baddbmm takes
        g3, batch_shape = pack([gram], "* k l")
        q3, _ = pack([chain[0]], "* k l")
        eye3 = eye.expand_as(g3)
        for a in reversed(coefficients[:-2]):
            q3 = torch.baddbmm(eye3, g3, q3, beta=a)
            chain.append(unpack(q3, batch_shape, "* k l")[0])
        return chain
    for a in reversed(coefficients[:-2]):
        chain.append(torch.addmm(eye, gram, chain[-1], beta=a))
    return chain


def gram_polynomial_vjp(
    gram: Tensor, chain: Sequence[Tensor], coefficients: Sequence[float], grad_q: Tensor
) -> Tensor:
    """``dL/dG`` from ``dL/dq(G)`` by reverse-mode Horner, with the iterates of :func:`horner_chain`.

    ``Q_j = a_j I + G Q_{j+1}`` gives ``dG += R_j Q_{j+1}^T`` and ``R_{j+1} = G^T R_j`` (``R_0 = dL/dq``), and
    the first iterate ``a_{d-1} I + a_d G`` adds ``a_d R_{d-1}``: two matmuls per Horner step, what autograd
    would run, without a graph (so ``torch.compile`` traces it whole).
    """
    coefficients = tuple(coefficients)
    if len(coefficients) == 1:
        return torch.zeros_like(gram)
    grad = None
    r = grad_q
    for q_next in reversed(chain[:-1]):
        term = r @ q_next.mT
        grad = term if grad is None else grad + term
        r = gram.mT @ r
    last = r * coefficients[-1]
    return last if grad is None else grad + last
