"""Newton-Schulz orthogonalization (the "zeroth power" of a matrix) and its coefficient sets.

One step of the quintic iteration maps ``X -> a X + (b A + c A^2) X`` with ``A = X X^T``; on singular values
it applies the odd polynomial ``p(s) = a s + b s^3 + c s^5``. After Frobenius pre-normalization (so every
singular value lies in [0, 1]) a few steps push all singular values towards 1, approximating ``U V^T`` of
the SVD ``X = U S V^T``.

The kernel works on a batch ``(..., m, n)`` of same-shaped matrices with batched matmuls; tall matrices
(``m > n``) are transposed so the Gram matrix is the smaller ``min(m, n)`` square. For every slice it does
the same operations in the same order as ``torch.optim.Muon`` (cast, transpose, divide by the clamped
Frobenius norm, then ``addmm``-style updates), so with a single repeated triple in bf16 the results are
bitwise identical to the stock optimizer's. ``stack=False`` runs the same kernels one matrix at a time (the
CPU default of :class:`pcopt.optim.Muon`: same bits, no large temporaries).

Gram Newton-Schulz (``algorithm="gram"``) for a wide ``n x m`` matrix (``n < m``). Every step multiplies
``X`` on the left by a polynomial of ``X X^T``, so ``X_k = Q_k X_0`` with ``Q_k`` an ``n x n`` polynomial of
``R_0 = X_0 X_0^T``, and all of these commute. With ``R_k = X_k X_k^T``:

    Z_k = a_k I + b_k R_k + c_k R_k^2        (the step's polynomial, n x n)
    Q_{k+1} = Z_k Q_k                         (Q_1 = Z_0: no product)
    R_{k+1} = X_{k+1} X_{k+1}^T = Z_k R_k Z_k  (Z_k is symmetric and commutes with R_k)
    X_K = Q_K X_0                             (the only other n x m product)

So ``K`` steps cost ``2 (2 n^2 m)`` (the first Gram and the final product) plus ``4K - 3`` products of
``n x n`` matrices (K squares, K - 1 updates of Q, 2 (K - 1) for R), against ``K (4 n^2 m + 2 n^3)`` for
the standard iteration. It is the same polynomial in ``X_0`` as the standard iteration (equal in exact
arithmetic). In low precision ``R_k`` is never recomputed from ``X``, so its rounding errors accumulate
instead of being washed out each step; ``gram_restart`` lists the steps before which ``X`` is formed
(``X_k = Q_k X_0``) and ``R`` recomputed from it, which resets that drift at the price of ``2 (2 n^2 m)``
FLOPs per restart.

Symmetric products (``symmetric_blocks=k > 1``). ``X X^T``, ``A^2`` and every ``n x n`` product of the Gram
iteration (``Z Q``, ``R Z``, ``Z (R Z)``: polynomials of one Gram matrix commute) are symmetric, so only the
``k (k + 1) / 2`` blocks on and above the diagonal of a ``k x k`` tiling of the result are multiplied (one
matmul per block row) and the blocks below are mirrored from them: ``(k + 1) / (2k)`` of the product's FLOPs
(0.75 for ``k = 2``), the rest of the iteration unchanged. The result is exactly symmetric; in exact arithmetic
it equals the full product. ``None`` picks 2 for matrices whose small side is at least
``SYMMETRIC_MIN_SIZE`` (below that, half-size matmuls lose more speed than they save FLOPs) and 1 otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "CoeffSetT",
    "NS_COEFFICIENT_SETS",
    "KELLER_COEFFICIENTS",
    "newton_schulz",
    "newton_schulz_flops",
    "NS_ALGORITHMS",
    "GRAM_RESTART",
    "SYMMETRIC_MIN_SIZE",
    "resolve_coefficients",
    "resolve_dtype",
]

CoeffSetT = Literal["keller", "polar_express"]

# Keller Jordan's quintic, repeated at every step (also torch.optim.Muon's default).
# Source: https://kellerjordan.github.io/posts/muon/ ; same constants as torch/optim/_muon.py.
KELLER_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.775, 2.0315)

# Polar Express (Amsel, Persson, Musco, Gower, arXiv:2505.16932), Algorithm 1: per-step minimax-optimal odd
# quintics for sign() on [l, 1]. The greedy construction makes every prefix optimal for its own number of
# steps, so using the first ``ns_steps`` triples is correct; the last triple repeats after the list ends.
_POLAR_EXPRESS_RAW: tuple[tuple[float, float, float], ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
# The paper's safety factor against bf16 round-off: p(x) -> p(x / 1.01) for every triple but the last
# (a / 1.01, b / 1.01^3, c / 1.01^5), and the input is normalized by 1.01 * ||X||_F.
_POLAR_EXPRESS_SAFETY = 1.01
_POLAR_EXPRESS: tuple[tuple[float, float, float], ...] = tuple(
    (a / _POLAR_EXPRESS_SAFETY, b / _POLAR_EXPRESS_SAFETY**3, c / _POLAR_EXPRESS_SAFETY**5)
    for a, b, c in _POLAR_EXPRESS_RAW[:-1]
) + (_POLAR_EXPRESS_RAW[-1],)

# name -> (per-step triples, factor applied to the Frobenius norm before dividing by it)
NS_COEFFICIENT_SETS: dict[str, tuple[tuple[tuple[float, float, float], ...], float]] = {
    "keller": ((KELLER_COEFFICIENTS,), 1.0),
    "polar_express": (_POLAR_EXPRESS, _POLAR_EXPRESS_SAFETY),
}

NS_ALGORITHMS = ("standard", "gram")
# Steps (0-based) before which Gram Newton-Schulz forms X and recomputes its Gram matrix in bf16/fp16 (see
# the module docstring): R_0 = X X^T rounded to bf16 has absolute eigenvalue errors ~2^-9 ||R||, i.e. errors
# ~sqrt(2^-9) in the small singular values it encodes, and without a restart they are amplified along
# with them (measured: sigma_max 3.2 with Keller, 108 with Polar Express, for singular values 1e-3..1).
# After 3 steps the small ones have grown ~40x and a fresh Gram matrix resolves them; the result is then
# as close to the float64 polynomial as the standard bf16 iteration (tests/unit/test_newton_schulz.py).
# fp32/fp64 iterate without restarts.
GRAM_RESTART: tuple[int, ...] = (3,)
# symmetric_blocks=None: 2 x 2 block-triangular symmetric products from this small side on. Measured on one CPU
# thread (benchmarks/newton_schulz.py --symmetric, time of the blocked A^2 over the full one, FLOPs 0.75): AMD
# EPYC fp32 AVX2 1.89 at 128, 1.01 at 256, 0.94 at 384, 0.82 at 512 and 1024; AVX-512 bf16 0.87 at 512. Below
# 512 the half-size matmuls run too far below the matmul peak to gain. Not measured on a GPU, where small
# matmuls are launch-bound and the crossover can only be higher.
SYMMETRIC_MIN_SIZE = 512

_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
}


def _is_triple(x: object) -> bool:
    return (
        isinstance(x, (tuple, list))
        and len(x) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in x)
    )


def resolve_dtype(ns_dtype: torch.dtype | str) -> torch.dtype:
    """Map ``ns_dtype`` (a floating torch dtype or one of 'bf16', 'fp16', 'fp32', 'fp64') to a dtype."""
    if isinstance(ns_dtype, torch.dtype) and ns_dtype in _DTYPES.values():
        return ns_dtype
    if isinstance(ns_dtype, str) and ns_dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[ns_dtype.lower().removeprefix("torch.")]
    raise ValueError(
        f"Invalid ns_dtype: {ns_dtype!r}. Expected torch.bfloat16, torch.float16, torch.float32, torch.float64 "
        "or one of the strings 'bf16', 'fp16', 'fp32', 'fp64'."
    )


def resolve_coefficients(
    ns_coefficients: Sequence[float],
    ns_coefficient_set: CoeffSetT | Sequence[Sequence[float]] | None,
    ns_steps: int,
) -> tuple[tuple[tuple[float, float, float], ...], float]:
    """Return ``(one (a, b, c) triple per step, norm factor)`` for a Muon param group.

    ``ns_coefficient_set=None`` repeats ``ns_coefficients`` (torch's argument) at every step. A name picks a
    set from ``NS_COEFFICIENT_SETS``; a sequence of triples is a custom per-step list. Lists shorter than
    ``ns_steps`` repeat their last triple. Raises ``ValueError`` on anything else.
    """
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 1 <= ns_steps < 100:
        raise ValueError(f"Invalid ns_steps: {ns_steps!r}. Expected an integer in [1, 99].")
    if not _is_triple(ns_coefficients):
        raise ValueError(
            f"Invalid ns_coefficients: {ns_coefficients!r}. Expected a tuple of three finite floats (a, b, c)."
        )
    if ns_coefficient_set is None:
        triples: tuple[tuple[float, float, float], ...] = (tuple(float(v) for v in ns_coefficients),)  # type: ignore[assignment]
        norm_factor = 1.0
    elif isinstance(ns_coefficient_set, str):
        if ns_coefficient_set not in NS_COEFFICIENT_SETS:
            raise ValueError(
                f"Unknown ns_coefficient_set: {ns_coefficient_set!r}. Expected one of "
                f"{sorted(NS_COEFFICIENT_SETS)} or a list of (a, b, c) triples, one per Newton-Schulz step."
            )
        triples, norm_factor = NS_COEFFICIENT_SETS[ns_coefficient_set]
    else:
        items = list(ns_coefficient_set) if isinstance(ns_coefficient_set, Sequence) else None
        if not items or not all(_is_triple(t) for t in items):
            raise ValueError(
                f"Invalid ns_coefficient_set: {ns_coefficient_set!r}. Expected a name "
                f"({', '.join(sorted(NS_COEFFICIENT_SETS))}) or a non-empty list of (a, b, c) triples of "
                "finite floats, one per Newton-Schulz step."
            )
        triples = tuple(tuple(float(v) for v in t) for t in items)  # type: ignore[misc]
        norm_factor = 1.0
    per_step = tuple(triples[min(i, len(triples) - 1)] for i in range(ns_steps))
    return per_step, norm_factor


def resolve_algorithm(ns_algorithm: str) -> str:
    """Validate ``ns_algorithm``: ``"standard"`` or ``"gram"``; raises ``ValueError`` otherwise."""
    if ns_algorithm not in NS_ALGORITHMS:
        raise ValueError(
            f"Invalid ns_algorithm: {ns_algorithm!r}. Expected 'standard' (X X^T every step, as torch) or "
            "'gram' (iterate on the small Gram matrix of rectangular matrices; fewer FLOPs)."
        )
    return ns_algorithm


def _use_gram(shape: Sequence[int], ns_steps: int, restart: Sequence[int], blocks: int) -> bool:
    """Gram NS only where it needs fewer FLOPs than the standard iteration (rectangular enough)."""
    gram = newton_schulz_flops(shape, ns_steps, "gram", restart, symmetric_blocks=blocks)
    return gram < newton_schulz_flops(shape, ns_steps, symmetric_blocks=blocks)


def resolve_symmetric_blocks(symmetric_blocks: int | None, shape: Sequence[int]) -> int:
    """The number of block rows of the symmetric products of a ``shape`` matrix (``None``: by size)."""
    if symmetric_blocks is None:
        return 2 if min(shape[-2:]) >= SYMMETRIC_MIN_SIZE else 1
    if isinstance(symmetric_blocks, bool) or not isinstance(symmetric_blocks, int) or symmetric_blocks < 1:
        raise ValueError(
            f"Invalid symmetric_blocks: {symmetric_blocks!r}. Expected None (by size), 1 (full products, "
            "as torch) or an integer k > 1 (only the blocks on and above the diagonal of a k x k tiling)."
        )
    return symmetric_blocks


def _edges(n: int, blocks: int) -> list[int]:
    blocks = min(blocks, n)
    return [n * i // blocks for i in range(blocks + 1)]


def _mm(A: Tensor, B: Tensor, out: Tensor | None = None) -> Tensor:
    """``A @ B`` through torch's kernel for the rank: ``mm`` for one matrix (as torch.optim.Muon), ``bmm`` for a batch."""
    return torch.mm(A, B, out=out) if A.ndim == 2 else torch.bmm(A, B, out=out)


def _addmm(C: Tensor, A: Tensor, B: Tensor, beta=1.0, alpha=1.0, out: Tensor | None = None) -> Tensor:
    """``beta C + alpha A @ B``: ``addmm`` for one matrix, ``baddbmm`` for a batch."""
    fn = torch.addmm if A.ndim == 2 else torch.baddbmm
    return fn(C, A, B, beta=beta, alpha=alpha, out=out)


def symmetric_product(
    A: Tensor, B: Tensor, blocks: int, C: Tensor | None = None, beta=1.0, alpha=1.0
) -> Tensor:
    """``beta C + alpha A B`` for ``(n, n)`` or ``(b, n, n)`` results that are symmetric in exact arithmetic (see the module
    docstring): the blocks on and above the diagonal are computed, one matmul per block row, the rest mirrored."""
    if blocks == 1:
        return _mm(A, B) if C is None else _addmm(C, A, B, beta=beta, alpha=alpha)
    n = A.size(-2)
    out = A.new_empty(*A.shape[:-2], n, n)
    edges = _edges(n, blocks)
    for r0, r1 in zip(edges, edges[1:]):
        block = out[..., r0:r1, r0:]  # the first block row is contiguous: written in place
        if C is None:
            _mm(A[..., r0:r1, :], B[..., r0:], out=block)
        else:
            _addmm(C[..., r0:r1, r0:], A[..., r0:r1, :], B[..., r0:], beta=beta, alpha=alpha, out=block)
        if r0:
            out[..., r0:r1, :r0] = out[..., :r0, r0:r1].mT
    return out


def _standard(X: Tensor, coefficients: Sequence[tuple[float, float, float]], blocks: int = 1) -> Tensor:
    for a, b, c in coefficients:
        A = symmetric_product(X, X.mT, blocks)
        B = symmetric_product(A, A, blocks, A, beta=b, alpha=c)
        X = _addmm(X, B, X, beta=a)
    return X


def _gram(
    X: Tensor, coefficients: Sequence[tuple[float, float, float]], restart: Sequence[int], blocks: int = 1
) -> Tensor:
    """Gram Newton-Schulz on a wide ``(b, n, m)`` batch (see the module docstring)."""
    R = symmetric_product(X, X.mT, blocks)
    Q: Tensor | None = None
    last = len(coefficients) - 1
    for k, (a, b, c) in enumerate(coefficients):
        if k > 0 and k in restart:
            X = _mm(Q, X)
            R = symmetric_product(X, X.mT, blocks)
            Q = None
        Z = symmetric_product(R, R, blocks, R, beta=b, alpha=c)
        Z.diagonal(dim1=-2, dim2=-1).add_(a)
        Q = Z if Q is None else symmetric_product(Z, Q, blocks)
        if k < last and k + 1 not in restart:
            R = symmetric_product(Z, symmetric_product(R, Z, blocks), blocks)
    return _mm(Q, X)


def newton_schulz(
    G: Tensor,
    coefficients: Sequence[tuple[float, float, float]],
    *,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
    norm_factor: float = 1.0,
    algorithm: str = "standard",
    gram_restart: Sequence[int] | None = None,
    symmetric_blocks: int | None = 1,
    stack: bool = True,
) -> Tensor:
    """Orthogonalize every matrix of ``G`` (shape ``(..., m, n)``) by Newton-Schulz; returns ``dtype``.

    ``coefficients`` holds one ``(a, b, c)`` per step. Each matrix is first divided by
    ``max(norm_factor * ||X||_F, eps)``. The result has the shape of ``G``. ``algorithm="gram"`` iterates on
    the Gram matrix where that needs fewer FLOPs (rectangular matrices; square ones use the standard
    iteration), restarting before the steps in ``gram_restart`` (None: ``GRAM_RESTART`` for 16-bit dtypes,
    no restart for fp32/fp64). ``symmetric_blocks=k > 1`` computes only the blocks on and above the diagonal
    of every symmetric product (``None``: 2 from ``SYMMETRIC_MIN_SIZE`` on, else 1; 1, the default, runs
    torch's kernels). ``stack=False`` loops over the matrices of
    the batch (same bits per matrix; the faster choice on CPUs, see docs/muon.md).
    """
    if G.ndim < 2:
        raise ValueError(
            f"newton_schulz expects a matrix or a batch of matrices, got shape {tuple(G.shape)}."
        )
    resolve_algorithm(algorithm)
    blocks = resolve_symmetric_blocks(symmetric_blocks, G.shape)
    if gram_restart is None:
        gram_restart = GRAM_RESTART if dtype.itemsize <= 2 else ()
    if not stack and G.ndim > 2 and math.prod(G.shape[:-2]) > 1:
        flat = G.reshape(-1, *G.shape[-2:])
        kw = dict(
            eps=eps,
            dtype=dtype,
            norm_factor=norm_factor,
            algorithm=algorithm,
            gram_restart=gram_restart,
            symmetric_blocks=blocks,
        )
        return torch.stack([newton_schulz(g, coefficients, **kw) for g in flat]).reshape(G.shape)  # type: ignore[arg-type]
    tall = G.size(-2) > G.size(-1)
    # As torch.optim.Muon: cast (a copy), then a tall matrix as the transposed view of that copy, not a contiguous
    # transpose. The matmuls then see torch's operand layout, which some CPUs' bf16 kernels need for the same bits
    # (without native bf16, a transposed-operand product rounds otherwise than a contiguous one). One matrix runs
    # torch's 2-D kernels (mm, addmm); a batch of b >= 2 runs bmm / baddbmm on a (b, m, n) tensor with the same
    # strides per matrix whatever b, which give every matrix mm's bits. A one-matrix batch does not: on an AMD
    # EPYC with avx512_bf16, bf16 bmm of a (1, n, m) transposed view (batch stride n) rounded otherwise than mm.
    X = G.to(dtype)
    if tall:
        X = X.mT
    X = X.reshape(-1, *X.shape[-2:])
    if X.size(0) == 1:
        X = X[0]
    copied = X.untyped_storage().data_ptr() != G.untyped_storage().data_ptr()  # never normalize G in place
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    if norm_factor != 1.0:
        norm = norm * norm_factor
    X = X.div_(norm.clamp(min=eps)) if copied else X / norm.clamp(min=eps)
    if algorithm == "gram" and _use_gram(G.shape, len(coefficients), gram_restart, blocks):
        X = _gram(X, coefficients, gram_restart, blocks)
    else:
        X = _standard(X, coefficients, blocks)
    X = X.reshape(*G.shape[:-2], *X.shape[-2:])
    return X.mT if tall else X


def symmetric_product_flops(n: int, inner: int, blocks: int) -> int:
    """FLOPs of an ``n x n`` result with inner dimension ``inner``, ``blocks`` block rows (see ``symmetric_product``)."""
    edges = _edges(n, blocks)
    return sum(2 * (r1 - r0) * inner * (n - r0) for r0, r1 in zip(edges, edges[1:]))


def newton_schulz_flops(
    shape: Sequence[int],
    ns_steps: int,
    algorithm: str = "standard",
    gram_restart: Sequence[int] = GRAM_RESTART,
    *,
    symmetric_blocks: int | None = 1,
) -> int:
    """Matmul FLOPs of ``ns_steps`` Newton-Schulz steps on one ``(m, n)`` matrix (multiply-add = 2 FLOPs).

    Standard, per step with ``s = min(m, n)``, ``l = max(m, n)``: Gram ``2 s^2 l``, ``A^2`` ``2 s^3``, apply
    ``2 s^2 l``. Gram (``algorithm="gram"``, as run: only where it is cheaper): ``2 s^2 l`` for each Gram
    matrix and each product ``Q X`` (one of each, plus one of each per restart), ``2 s^3`` for each of the
    ``s x s`` products (a square per step, ``Z Q`` after a phase's first step, ``Z (R Z)`` before a step
    that is not a restart). With ``symmetric_blocks=k``, every product but ``A X`` / ``Q X`` costs
    ``(k + 1) / (2k)`` of that (exactly: the blocks on and above the diagonal).
    """
    s, l_ = sorted(int(d) for d in shape[-2:])
    k = resolve_symmetric_blocks(symmetric_blocks, shape)
    gram_sl, square, apply_sl = (
        symmetric_product_flops(s, l_, k),
        symmetric_product_flops(s, s, k),
        2 * s * s * l_,
    )
    standard = ns_steps * (gram_sl + square + apply_sl)
    if algorithm != "gram":
        return standard
    restarts = sorted({r for r in gram_restart if 0 < r < ns_steps})
    phases = len(restarts) + 1
    small = ns_steps + (ns_steps - phases) + 2 * (ns_steps - phases)
    gram = phases * (gram_sl + apply_sl) + small * square
    return min(gram, standard)
