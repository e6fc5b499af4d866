"""The functional Muon step (:func:`muon`) and what it is made of: momentum, Newton-Schulz in shape batches (on the
owner of each full matrix for DTensors), the lr rule per shape and per row block, and the update.

:class:`pcopt.optim.Muon` keeps the options and the state and calls :func:`muon_impl` once per param group.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal

import torch
from torch import Tensor

from pcopt._tensor import is_dtensor as _is_dtensor
from pcopt._tensor import local_tensor as _local
from pcopt._tensor import split_rows
from pcopt.optim._distributed import local_row_runs, map_full_matrices
from pcopt.optim._newton_schulz import (
    CoeffSetT,
    newton_schulz,
    newton_schulz_flops,
    resolve_algorithm,
    resolve_coefficients,
    resolve_dtype,
)

logger = logging.getLogger(__name__)

__all__ = ["AdjustLrT", "NsAlgorithmT", "adjust_lr", "muon"]

EPS = 1e-7
DEFAULT_NS_STEPS = 5
AdjustLrT = Literal["original", "match_rms_adamw"]
NsAlgorithmT = Literal["standard", "gram"]
ADJUST_LR_FNS = ("original", "match_rms_adamw")
# Same-shaped matrices are orthogonalized together in batches of at most this many elements (bounds the
# extra memory of the stacked copy and its Gram matrices).
_MAX_BATCH_ELEMENTS = 1 << 27
# On CPUs (foreach=None) only matrices of at most _CPU_BATCH_ELEMENTS / 4 elements are stacked, this many
# elements per call (1 MiB in bf16: the temporaries stay in cache). See _matrices_per_call.
_CPU_BATCH_ELEMENTS = 1 << 19


def adjust_lr(lr: float, adjust_lr_fn: str | None, shape: Sequence[int]) -> float:
    """Learning rate for a ``(A, B)`` matrix: Keller's ``sqrt(max(1, A/B))`` or Moonshot's ``0.2 sqrt(max(A, B))``.

    A batched weight ``(..., A, B)`` uses its matrices' shape ``(A, B)``.
    """
    rows, cols = shape[-2], shape[-1]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    return lr * 0.2 * math.sqrt(max(rows, cols))


def _symmetric_blocks(algorithm: str) -> int | None:
    """``"gram"`` is the FLOP-lean path: block-triangular symmetric products where they pay (by size);
    ``"standard"`` keeps torch's full products (bitwise torch.optim.Muon)."""
    return None if algorithm == "gram" else 1


def check_split(p: Tensor, split_sizes: tuple[int, ...]) -> None:
    """``ValueError`` unless ``p`` is a 2-D tensor (plain or DTensor) whose rows ``split_sizes`` partitions."""
    if p.ndim != 2 or sum(split_sizes) != p.shape[0]:
        raise ValueError(
            f"Muon(split_sizes={split_sizes}) splits the rows of 2-D weights into blocks of those sizes (summing "
            f"to the row count, {sum(split_sizes)} here); got a {'DTensor' if _is_dtensor(p) else 'tensor'} of "
            f"shape {tuple(p.shape)}. Give each fused weight a param group whose split_sizes sum to its rows."
        )


def check_interleave(p: Tensor, k: int) -> None:
    """``ValueError`` unless ``p``'s rows split into ``k`` interleaved matrices that lie whole on this rank."""
    if p.ndim < 2 or p.shape[-2] % k:
        raise ValueError(
            f"Muon(row_interleave={k}) treats a weight whose rows alternate between {k} matrices as those matrices; it "
            f"needs a row count divisible by {k}, got shape {tuple(p.shape)}. Give such weights their own param group."
        )
    if not whole_locally(p):
        raise ValueError(
            f"Muon(row_interleave={k}) needs each interleaved weight whole on its rank (a plain tensor, or a stack "
            f"sharded on its stack dims only); got a DTensor of shape {tuple(p.shape)} with placements "
            f"{p.placements}, which splits its rows. Shard such stacks on the expert dim (FSDP2 Shard(0), expert "
            "parallelism)."
        )


def _deinterleave(t: Tensor, k: int) -> list[Tensor]:
    """The ``k`` matrices (stacks) whose rows ``t`` interleaves: matrix ``j`` holds the (local) rows ``j::k``, each
    its own contiguous tensor (own allocation: elementwise kernels then treat every element as for a separate
    parameter, whose vectorized body and scalar tail depend on the data's alignment)."""
    return [m.contiguous() for m in split_rows(_local(t), k).unbind(-3)]


def _step_interleaved(k: int, params, grads, momentum_buffers, options: dict) -> None:
    """The step of weights whose rows interleave ``k`` matrices: each matrix as a copy of its own (so the step is
    bitwise that of separate parameters), stepped together, then written back in place."""
    p_k, b_k = [_deinterleave(p, k) for p in params], [_deinterleave(b, k) for b in momentum_buffers]
    g_k = [_deinterleave(g, k) for g in grads]
    flat = lambda ts: [m for t in ts for m in t]  # noqa: E731
    muon_impl(flat(p_k), flat(g_k), flat(b_k), **options)
    for dst, src in (*zip(params, p_k), *zip(momentum_buffers, b_k)):
        split_rows(_local(dst), k).copy_(torch.stack(src, dim=-3))


def whole_locally(p: Tensor) -> bool:
    """Whether every matrix of ``p`` lies whole in this rank's local tensor: a plain tensor, or a stack of
    matrices ``(..., m, n)`` whose DTensor placements shard only the stack dims (MoE experts under FSDP2 ``Shard(0)``,
    expert parallelism, or both: torchtitan's ``(_StridedShard(0), Shard(0))``) or replicate. Such a parameter needs
    no collective: each rank orthogonalizes its own matrices."""
    if not _is_dtensor(p):
        return True
    if p.ndim <= 2:
        return False
    from torch.distributed.tensor import Replicate

    return all(
        isinstance(pl, Replicate)
        or (type(pl).__name__ in ("Shard", "_StridedShard") and pl.dim % p.ndim < p.ndim - 2)
        for pl in p.placements
    )


def _block_bounds(split_sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` global row range of each block of ``split_sizes``."""
    out, start = [], 0
    for n in split_sizes:
        out.append((start, start + n))
        start += n
    return out


def _split_rows(
    split_sizes: tuple[int, ...], params: list[Tensor], grads: list[Tensor], bufs: list[Tensor]
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Row-block views of each parameter, gradient and momentum buffer: every block is then a matrix of its own
    (its own Newton-Schulz and lr adjustment by its shape), updated in place through the views."""
    out: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
    for tensors in zip(params, grads, bufs):
        for dest, t in zip(out, tensors):
            dest.extend(t.split(list(split_sizes), dim=0))
    return out


def _momentum(
    grads: Sequence[Tensor], bufs: Sequence[Tensor], momentum: float, nesterov: bool
) -> list[Tensor]:
    """EMA momentum in place on the (local) buffers; returns the (local) update directions."""
    out = []
    for g, buf in zip(grads, bufs):
        g, buf = _local(g), _local(buf)
        buf.lerp_(g, 1 - momentum)
        out.append(g.lerp(buf, momentum) if nesterov else buf)
    return out


def _apply_updates(
    params: Sequence[Tensor],
    updates: Sequence[Tensor],
    lr: float,
    weight_decay: float,
    adjust_lr_fn: str | None,
    split_sizes: Sequence[int] | None = None,
) -> None:
    for p, update in zip(params, updates):
        local = _local(p)
        local.mul_(1 - lr * weight_decay)
        if split_sizes is None or not _is_dtensor(p):
            local.add_(update, alpha=-adjust_lr(lr, adjust_lr_fn, p.shape))  # global shape for DTensors
            continue
        # A fused DTensor weight: each local row takes the lr of its block's (global) shape, through the same
        # row-view add_ as the unsharded path's blocks, so that each element sees the same two ops.
        bounds = _block_bounds(split_sizes)
        row = 0
        for r0, r1 in local_row_runs(p):
            for b0, b1 in bounds:
                a, b = max(r0, b0), min(r1, b1)
                if a < b:
                    lr_b = adjust_lr(lr, adjust_lr_fn, (b1 - b0, p.shape[1]))
                    local[row + a - r0 : row + b - r0].add_(update[row + a - r0 : row + b - r0], alpha=-lr_b)
            row += r1 - r0


def _matrices_per_call(shape: Sequence[int], foreach: bool | None, device: torch.device) -> int:
    """How many same-shaped updates go through one stacked Newton-Schulz call (1: one at a time).

    ``foreach=True`` (and ``None`` off CPUs) stacks up to ``_MAX_BATCH_ELEMENTS`` elements per call. On CPUs
    ``None`` stacks only small matrices, in chunks of at most ``_CPU_BATCH_ELEMENTS`` elements: there a
    batched matmul runs at the speed of a loop of matmuls, so stacking only saves per-op overhead, which
    matters for small matrices (measured 3.8x at dim 64, 1.5x at dim 128, nothing at dim 256), while large
    stacked temporaries (fresh multi-MB allocations, out of cache) made the stacked step 1.15x to 2.1x slower
    than the loop at dim 512 (docs/muon.md). Stacked or not, every matrix gets the same bits.
    """
    numel = max(1, math.prod(shape))
    if foreach is False:
        return 1
    if foreach is None and device.type == "cpu":
        n = _CPU_BATCH_ELEMENTS // numel
        return n if n >= 4 else 1
    return max(1, _MAX_BATCH_ELEMENTS // numel)


def _newton_schulz_chunked(ns: Callable[..., Tensor], mats: Sequence[Tensor], per_call: int) -> list[Tensor]:
    """``ns`` on each matrix of ``mats`` (same shape), ``per_call`` of them stacked per call."""
    if per_call <= 1 or len(mats) == 1:
        return [ns(m, stack=False) for m in mats]
    out: list[Tensor] = []
    for start in range(0, len(mats), per_call):
        out.extend(ns(torch.stack(list(mats[start : start + per_call])), stack=True).unbind(0))
    return out


def _orthogonalize(
    params: Sequence[Tensor],
    updates: Sequence[Tensor],
    ns: Callable[..., Tensor],
    dtype: torch.dtype,
    cost: Callable[[tuple[int, int]], int],
    foreach: bool | None,
    split_sizes: Sequence[int] | None = None,
) -> list[Tensor]:
    """Newton-Schulz of every update (of every row block of ``split_sizes``, for DTensors); local updates of DTensor params come back as local blocks.

    DTensors (any placements of any mesh: FSDP2, HSDP, TP, FSDP x TP) go through ``map_full_matrices``: each
    matrix is assembled on one owner rank of its mesh, orthogonalized there once in the world (with the
    owner's other same-shaped matrices, one collective pair for all unless ``foreach`` is False), and its
    blocks sent back. Same-shaped matrices are stacked as :func:`_matrices_per_call` says.
    """
    out: list[Tensor | None] = [None] * len(params)
    plain = [i for i, p in enumerate(params) if whole_locally(p)]
    sharded = [i for i, p in enumerate(params) if not whole_locally(p)]

    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i in plain:
        by_shape.setdefault(tuple(updates[i].shape), []).append(i)
    for shape, idx in by_shape.items():
        per_call = _matrices_per_call(shape, foreach, updates[idx[0]].device)
        for i, r in zip(idx, _newton_schulz_chunked(ns, [updates[i] for i in idx], per_call)):
            out[i] = r

    def stacked_ns(batch: Tensor) -> Tensor:  # a (b, M, N) stack of one shape
        per_call = _matrices_per_call(batch.shape[1:], foreach, batch.device)
        if per_call >= batch.shape[0]:
            return ns(batch, stack=True)
        return torch.stack(_newton_schulz_chunked(ns, batch.unbind(0), per_call))

    def owner_fn(batch: Tensor) -> Tensor:  # the owner's (b, M, N) stack of one shape
        if split_sizes is None:
            return stacked_ns(batch)
        # a fused weight: every row block is a matrix of its own, same-shaped blocks stacked together
        blocks = batch.split(list(split_sizes), dim=1)
        out_blocks: list[Tensor | None] = [None] * len(blocks)
        by_rows: dict[int, list[int]] = {}
        for j, blk in enumerate(blocks):
            by_rows.setdefault(blk.shape[1], []).append(j)
        for idx in by_rows.values():
            result = stacked_ns(torch.cat([blocks[j] for j in idx])).split(batch.shape[0])
            for j, r in zip(idx, result):
                out_blocks[j] = r
        return torch.cat(out_blocks, dim=1)  # type: ignore[arg-type]

    for chunk in [sharded] if foreach is not False else [[i] for i in sharded]:
        if chunk:
            blocks = [updates[i].to(dtype) for i in chunk]
            for i, r in zip(chunk, map_full_matrices([params[i] for i in chunk], blocks, owner_fn, cost)):
                out[i] = r
    return out  # type: ignore[return-value]


def muon_impl(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    foreach: bool | None,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float],
    ns_steps: int,
    eps: float,
    adjust_lr_fn: str | None,
    ns_coefficient_set: CoeffSetT | Sequence[tuple[float, float, float]] | None,
    ns_dtype: torch.dtype | str,
    ns_algorithm: str,
    split_sizes: Sequence[int] | None = None,
    row_interleave: int = 1,
) -> None:
    if not params:
        return
    # whole on each rank (check_interleave): the k matrices stepped as matrices of their own
    if row_interleave > 1:
        options = dict(
            foreach=foreach, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_coefficients=ns_coefficients, ns_steps=ns_steps, eps=eps, adjust_lr_fn=adjust_lr_fn,
            ns_coefficient_set=ns_coefficient_set, ns_dtype=ns_dtype, ns_algorithm=ns_algorithm,
        )  # fmt: skip
        _step_interleaved(row_interleave, params, grads, momentum_buffers, options)
        return
    if split_sizes is not None:  # plain weights: row views; DTensors: split on the owner of the full matrix
        plain = [i for i, p in enumerate(params) if not _is_dtensor(p)]
        sharded = [i for i, p in enumerate(params) if _is_dtensor(p)]
        views = _split_rows(
            tuple(split_sizes),
            [params[i] for i in plain],
            [grads[i] for i in plain],
            [momentum_buffers[i] for i in plain],
        )
        params, grads, momentum_buffers = (
            v + [t[i] for i in sharded] for v, t in zip(views, (params, grads, momentum_buffers))
        )
    lr = lr.item() if isinstance(lr, Tensor) else lr
    coefficients, norm_factor = resolve_coefficients(ns_coefficients, ns_coefficient_set, ns_steps)
    dtype = resolve_dtype(ns_dtype)
    algorithm = resolve_algorithm(ns_algorithm)
    ns = partial(
        newton_schulz,
        coefficients=coefficients,
        eps=eps,
        dtype=dtype,
        norm_factor=norm_factor,
        algorithm=algorithm,
        symmetric_blocks=_symmetric_blocks(algorithm),
    )
    cost = partial(
        newton_schulz_flops,
        ns_steps=ns_steps,
        algorithm=algorithm,
        symmetric_blocks=_symmetric_blocks(algorithm),
    )
    if any(_is_dtensor(p) != _is_dtensor(g) for p, g in zip(params, grads)):
        raise RuntimeError(
            "Muon got a DTensor parameter with a plain-tensor gradient (or the reverse); "
            "parameters and gradients must both be DTensors with the same placements."
        )
    if foreach is not False:
        # Plain tensors: momentum, Newton-Schulz and update one stacked call (or one matrix) at a time, so
        # each update is used while it is still in cache (the whole-list phases cost ~5% on a CPU).
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(params):
            if whole_locally(p):  # local shapes: a rank's share of an expert stack
                by_shape.setdefault(tuple(_local(p).shape), []).append(i)
        for shape, idx in by_shape.items():
            per_call = _matrices_per_call(shape, foreach, params[idx[0]].device)
            for start in range(0, len(idx), per_call):
                chunk = idx[start : start + per_call]
                updates = _momentum(
                    [grads[i] for i in chunk], [momentum_buffers[i] for i in chunk], momentum, nesterov
                )
                updates = _newton_schulz_chunked(ns, updates, per_call)
                _apply_updates([params[i] for i in chunk], updates, lr, weight_decay, adjust_lr_fn)
        # DTensors: all at once, so that a step makes one pair of collectives per mesh
        sharded = [i for i, p in enumerate(params) if not whole_locally(p)]
        if sharded:
            ps = [params[i] for i in sharded]
            updates = _momentum(
                [grads[i] for i in sharded], [momentum_buffers[i] for i in sharded], momentum, nesterov
            )
            updates = _orthogonalize(ps, updates, ns, dtype, cost, foreach, split_sizes)
            _apply_updates(ps, updates, lr, weight_decay, adjust_lr_fn, split_sizes)
    else:  # the readable reference: one matrix at a time
        for p, g, buf in zip(params, grads, momentum_buffers):
            (update,) = _momentum([g], [buf], momentum, nesterov)
            (update,) = _orthogonalize([p], [update], ns, dtype, cost, False, split_sizes)
            _apply_updates([p], [update], lr, weight_decay, adjust_lr_fn, split_sizes)


def muon(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    foreach: bool | None = None,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float],
    ns_steps: int,
    eps: float,
    adjust_lr_fn: str | None,
    ns_coefficient_set: CoeffSetT | Sequence[tuple[float, float, float]] | None = None,
    ns_dtype: torch.dtype | str = torch.bfloat16,
    ns_algorithm: NsAlgorithmT = "standard",
    split_sizes: Sequence[int] | None = None,
    row_interleave: int = 1,
) -> None:
    r"""Functional Muon step (see :class:`Muon`). Updates ``params`` and ``momentum_buffers`` in place.

    ``foreach=False`` runs the per-matrix loop; True stacks same-shaped matrices; None (default) stacks them
    except large ones on CPUs (same bits either way). DTensor parameters (any placements) are gathered to one owner rank
    per matrix in every mode (every rank must call this). Parameters of shape ``(..., m, n)`` are batches of
    matrices, each orthogonalized on its own. ``split_sizes`` treats every parameter as the row blocks it stacks
    (see :class:`Muon`), ``row_interleave`` as the matrices its rows interleave.
    """
    muon_impl(
        params,
        grads,
        momentum_buffers,
        foreach=foreach,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        nesterov=nesterov,
        ns_coefficients=ns_coefficients,
        ns_steps=ns_steps,
        eps=eps,
        adjust_lr_fn=adjust_lr_fn,
        ns_coefficient_set=ns_coefficient_set,
        ns_dtype=ns_dtype,
        ns_algorithm=ns_algorithm,
        split_sizes=split_sizes,
        row_interleave=row_interleave,
    )
