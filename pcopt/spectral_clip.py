"""The soft spectral clip ``H_c(X) = (I + X X^T / c^2)^(-1/2) X`` without an SVD: :func:`spectral_clip`.

On singular values the map is ``sigma -> sigma / sqrt(1 + sigma^2 / c^2)``: about ``sigma`` below ``c``,
tending to ``c`` above it; singular vectors are unchanged. It is computed with matrix products only
(a coupled Newton-Schulz iteration for the inverse square root), in the wide orientation::

    S = X X^T  (X is m x n with m <= n; tall matrices are transposed first and back at the end)
    A = I + S / c^2
    a = 1 + min(max row sum of |S|, ||S||_F) / c^2      # an upper bound on lambda_max(A), no host sync
    Y = A / a ;  Z = I                                  # eigenvalues of A / a lie in [1/a, 1]
    T times:  M = (3 I - Z Y) / 2 ;  Y = Y M ;  Z = M Z  # Z -> (A / a)^(-1/2), Y -> (A / a)^(1/2)
    H = (Z / sqrt(a)) X

For every eigenvalue ``lam`` of ``A / a`` the iteration acts as the scalar recursion ``x <- x (3 - x)^2 / 4``
on ``x = z y`` (from ``x_0 = lam``), with ``z = sqrt(x / lam)``; ``x`` rises monotonically to 1, so ``z``
approaches ``lam^(-1/2)`` from below. Two consequences: the computed singular values never exceed the exact
ones (the clip never lets through more than ``c``), and convergence is slow for small ``lam``, i.e. for the
small singular values of a matrix whose ``sigma_max >> c`` (``a >> 1``): ``x`` grows about ``9/4`` times per
step while small, so ``T`` steps resolve ``a`` up to about ``2.25^T`` (about 3000 for ``T = 10``, i.e.
``sigma_max / c`` up to about 50). Beyond that the small singular values come out too small; the large ones,
whose ``lam`` is near 1, are still accurate. See docs/spectra.md.

So the default ``steps="auto"`` picks ``T`` from the bound ``a`` itself: every eigenvalue of ``A / a`` is at
least ``1 / a`` (``A >= I``) and the scalar recursion is monotone in ``x_0``, so running it in float64 from
``x_0 = 1 / a`` (:func:`auto_clip_steps`) gives the fewest steps after which every singular value's
relative error ``1 - sqrt(x_T)`` is below the iteration dtype's epsilon. ``T`` grows like
``log(a) / log(2.25)``, i.e. with ``2 log(sigma_max / c)``; ``a`` is one host sync per call (the largest
over a batch). ``steps=10`` (``AUTHORS_CLIP_STEPS``) is the SPECTRA authors' fixed count.

Vectors (1-D tensors) follow the vector rule: ``g`` unchanged if ``||g|| <= c``, else
``g / sqrt(1 + (||g|| / c)^2)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "spectral_clip",
    "spectral_clip_flops",
    "auto_clip_steps",
    "auto_clip_dtype",
    "auto_clip_plan",
    "BF16_STABLE_STEPS",
    "DEFAULT_CLIP_STEPS",
    "AUTHORS_CLIP_STEPS",
]

AUTHORS_CLIP_STEPS = 10
# spectral_clip_flops' default count; spectral_clip and pcopt.optim.Spectra default to "auto".
DEFAULT_CLIP_STEPS = AUTHORS_CLIP_STEPS
# The most steps a 16-bit iteration takes when the count is chosen automatically. The coupled iteration loses its
# commutativity to rounding and diverges in bf16 on near-singular inputs after ~15 steps (256 x 256 with +-1
# entries, c = 0.5: ||H||_F 8.2 after 14 steps, 4e3 after 16, 1e33 after 18, NaN after 20; the published code saw
# divergence at 15 or more), while fp32 stays stable to 40. An "auto" count above this runs in fp32.
BF16_STABLE_STEPS = 12


def auto_clip_dtype(steps: int, dtype: torch.dtype) -> torch.dtype:
    """The iteration dtype for an automatically chosen count: ``dtype``, or fp32 for a 16-bit dtype past
    :data:`BF16_STABLE_STEPS` (an explicit ``steps`` keeps the dtype asked for)."""
    if dtype.itemsize < 4 and steps > BF16_STABLE_STEPS:
        return torch.float32
    return dtype


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32,
                "fp64": torch.float64, "float64": torch.float64}  # fmt: skip


def check_threshold(c: Any, what: str = "c") -> float:
    """``c`` as a float; ``TypeError`` unless a real number, ``ValueError`` unless finite and > 0."""
    if isinstance(c, bool) or not isinstance(c, (int, float)):
        raise TypeError(
            f"spectral clip threshold {what} must be a real number (float), got {type(c).__name__} {c!r}. "
            f"Pass e.g. {what}=10.0."
        )
    c = float(c)
    if not math.isfinite(c) or c <= 0:
        raise ValueError(
            f"spectral clip threshold {what} must be finite and > 0, got {c!r}. Singular values are mapped "
            f"to sigma / sqrt(1 + sigma^2 / {what}^2); use e.g. {what}=10.0 (a very large value turns the clip off)."
        )
    return c


def check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(
            f"steps must be an int (Newton-Schulz iterations), got {type(steps).__name__} {steps!r}. "
            "pcopt.spectral_clip also takes steps='auto' (its default: as many as sigma_max / c needs)."
        )
    if not 1 <= steps <= 100:
        raise ValueError(
            f"steps must be between 1 and 100 Newton-Schulz iterations, got {steps}. The SPECTRA authors use "
            f"{AUTHORS_CLIP_STEPS}; pcopt.spectral_clip's default 'auto' picks the count from sigma_max / c."
        )
    return steps


def resolve_clip_dtype(dtype: Any, like: torch.dtype) -> torch.dtype:
    """``None`` -> ``like``; a floating dtype or its short name (``"bf16"``, ``"fp32"``...) -> that dtype."""
    if dtype is None:
        return like
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower()]
    if isinstance(dtype, torch.dtype) and dtype in _FLOAT_DTYPES:
        return dtype
    raise TypeError(
        f"dtype must be None (the input's dtype), a floating torch.dtype or one of {sorted(_DTYPE_NAMES)}, "
        f"got {dtype!r}."
    )


def vector_clip_scale(g: Tensor, c: float) -> Tensor:
    """The factor of the vector rule for ``g`` (a 0-D tensor): 1 if ``||g|| <= c``, else ``(1 + ||g||^2/c^2)^(-1/2)``."""
    norm = torch.linalg.vector_norm(g.float() if g.dtype in (torch.float16, torch.bfloat16) else g)
    return torch.where(norm <= c, torch.ones_like(norm), torch.rsqrt(1 + (norm / c) ** 2))


def _vector_clip(g: Tensor, c: float) -> Tensor:
    return g * vector_clip_scale(g, c).to(g.dtype)


def auto_clip_plan(a_max: float, dtype: torch.dtype) -> tuple[int, torch.dtype]:
    """``(steps, dtype)`` of an automatically chosen clip for the bound ``a_max``: :func:`auto_clip_steps` in
    ``dtype``, or, when that is too many for a 16-bit iteration (:func:`auto_clip_dtype`), fp32 and fp32's count."""
    steps = auto_clip_steps(a_max, dtype)
    dtype = auto_clip_dtype(steps, dtype)
    return auto_clip_steps(a_max, dtype), dtype


def auto_clip_steps(a_max: float, dtype: torch.dtype = torch.float32) -> int:
    """Fewest coupled steps for a bound ``a_max >= lambda_max(I + X X^T / c^2)`` (see the module docstring).

    Runs the scalar recursion ``x <- x (3 - x)^2 / 4`` from ``x = 1 / a_max`` in float64 until
    ``1 - sqrt(x) <= eps(dtype)``; at most 100 steps.
    """
    tol = torch.finfo(dtype).eps
    x, steps = 1.0 / max(float(a_max), 1.0), 0
    while steps < 100 and (steps == 0 or 1.0 - math.sqrt(x) > tol):
        x = x * (3.0 - x) ** 2 / 4.0
        steps += 1
    return steps


def _matrix_clip(X: Tensor, c: float, steps: int | None, dtype: torch.dtype) -> Tensor:
    """``H_c`` of a ``(..., M, N)`` batch; each matrix uses its own bound (results do not depend on the batch)."""
    out_dtype = X.dtype
    W = X.to(dtype)
    transposed = W.shape[-2] > W.shape[-1]
    if transposed:
        W = W.mT
    m = W.shape[-2]
    S = W @ W.mT
    bound = torch.minimum(S.abs().sum(dim=-1).amax(dim=-1), torch.linalg.matrix_norm(S))  # (...,)
    a = (1 + bound / (c * c)).unsqueeze(-1).unsqueeze(-1)
    if steps is None:  # "auto": one host sync for the whole batch
        steps, plan_dtype = auto_clip_plan(a.max().item(), dtype)
        if plan_dtype != dtype:  # too many steps for a 16-bit iteration: fp32 from here on
            dtype = plan_dtype
            W = W.to(dtype)
            S = W @ W.mT
            a = a.to(dtype)
    eye = torch.eye(m, dtype=dtype, device=W.device)
    Y = (eye + S / (c * c)) / a
    # first step with Z = I (bitwise the same as multiplying by I): M = (3I - Y)/2, Y = Y M, Z = M
    M = 0.5 * (3 * eye - Y)
    Y = Y @ M
    Z = M
    for _ in range(steps - 1):
        M = 0.5 * (3 * eye - Z @ Y)
        Y = Y @ M
        Z = M @ Z
    H = (Z * torch.rsqrt(a)) @ W
    if transposed:
        H = H.mT
    return H.to(out_dtype)


def spectral_clip(X: Tensor, c: float, *, steps: int | str = "auto", dtype: Any = None) -> Tensor:
    r"""Soft spectral clip ``H_c(X) = (I + X X^T / c^2)^{-1/2} X`` of a matrix or a batch of matrices.

    Singular values map as :math:`\sigma \mapsto \sigma / \sqrt{1 + \sigma^2 / c^2}` (below ``c`` for every
    ``sigma``); singular vectors are kept. Computed by a coupled Newton-Schulz iteration (matrix products
    only, no SVD, no host synchronization; see the module docstring and docs/spectra.md).

    Args:
        X: a floating tensor. 0-D/1-D: the vector rule (``X`` unchanged if ``||X|| <= c``, else
            ``X / sqrt(1 + (||X|| / c)^2)``). 2-D: one matrix. ``(..., M, N)``: a batch, each matrix clipped
            on its own (its own eigenvalue bound), so a matrix's result does not depend on what it is batched
            with.
        c: the threshold, a finite float > 0.
        steps: Newton-Schulz iterations. ``"auto"`` (default): as many as the bound on ``sigma_max / c``
            needs for every singular value to converge to the dtype's precision (:func:`auto_clip_steps`; one
            host sync; about ``2.4 ln(sigma_max / c) + 5``: 16 steps for float32 at ``sigma_max / c = 100``;
            a 16-bit ``dtype`` runs in fp32 when that is more than :data:`BF16_STABLE_STEPS`).
            An int fixes the count: the authors' 10 converges up to ``sigma_max / c`` of about 50; beyond, the
            small singular values come out too small (never too large).
        dtype: dtype of the iteration: None (default: ``X``'s dtype), a floating dtype or ``"bf16"``,
            ``"fp32"``, ... The result has ``X``'s dtype.

    Returns:
        A tensor of ``X``'s shape and dtype.

    Cost of an ``M x N`` matrix (``m = min(M, N)``, ``n = max(M, N)``): ``4 m^2 n + (6 steps - 4) m^3``
    FLOPs (:func:`spectral_clip_flops`); "auto" spends more steps only where ``sigma_max / c`` needs them.
    """
    if not isinstance(X, Tensor):
        raise TypeError(f"spectral_clip expects a torch.Tensor, got {type(X).__name__}.")
    if not X.is_floating_point():
        raise TypeError(
            f"spectral_clip expects a real floating tensor, got dtype {X.dtype}. Convert it first (X.float())."
        )
    c = check_threshold(c)
    steps = None if isinstance(steps, str) and steps == "auto" else check_steps(steps)
    compute = resolve_clip_dtype(dtype, X.dtype)
    if X.ndim <= 1:
        return _vector_clip(X, c)
    if X.shape[-1] == 0 or X.shape[-2] == 0:
        return X.clone()
    return _matrix_clip(X, c, steps, compute)


def spectral_clip_flops(shape: tuple[int, ...], steps: int = DEFAULT_CLIP_STEPS) -> int:
    """FLOPs of :func:`spectral_clip` on one matrix of ``shape`` (multiply-adds count 2; elementwise ops not).

    ``S = X X^T``: ``2 m^2 n``; first step ``Y M``: ``2 m^3``; each further step three ``m x m`` products:
    ``6 m^3``; ``Z X``: ``2 m^2 n``. Total ``4 m^2 n + (6 steps - 4) m^3`` with ``m = min``, ``n = max``.
    """
    if len(shape) < 2:
        return 3 * math.prod(shape)
    m, n = sorted(shape[-2:])
    return math.prod(shape[:-2]) * (4 * m * m * n + (6 * steps - 4) * m**3)
