"""The clip of a list of updates, plain or sharded: the step count, the iteration dtype and ``H_c`` of each tensor.

:class:`pcopt.optim.Spectra` calls these with its options; matrices that are DTensors are clipped on the full
matrix once in the world, by Muon's owner machinery (``_distributed.map_full_matrices``), vectors by the vector
rule on the gathered vector.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import Tensor

from pcopt._tensor import all_reduce_, full_tensor, like
from pcopt._tensor import is_dtensor as _is_dtensor
from pcopt.hardware import preferred_dtype
from pcopt.optim._distributed import map_full_matrices
from pcopt.spectral_clip import (
    AUTHORS_CLIP_STEPS,
    auto_clip_dtype,
    auto_clip_plan,
    spectral_clip,
    spectral_clip_flops,
    vector_clip_scale,
)

__all__ = ["clip_dtype", "clip_steps", "clip_updates"]


def clip_dtype(p: Tensor, dtype: torch.dtype | None, auto: bool, steps: int | None = None) -> torch.dtype:
    """The iteration dtype of ``p``'s clip: ``dtype`` or the device's preferred one; with ``steps`` chosen
    automatically (``auto``), fp32 instead of a 16-bit dtype past ``BF16_STABLE_STEPS`` (``auto_clip_dtype``)."""
    dtype = dtype if dtype is not None else preferred_dtype(p.device)
    return dtype if steps is None or not auto else auto_clip_dtype(steps, dtype)


def clip_steps(items: list[tuple[Tensor, Tensor, float]], steps: int | str, dtype: torch.dtype | None) -> int:
    """The Newton-Schulz steps of one clip of ``(param, local block, c)`` items: ``steps`` if an int, else (``"auto"``)
    from the largest ``||X||_F / c`` (an upper bound of ``sigma_max / c``), with one host sync.

    The squared norms are summed in float64 over each DTensor's mesh (a replicated mesh dim counts its shard
    more than once: a larger bound, still a bound), so every rank and the unsharded model get the same count.
    """
    if steps != "auto":
        return steps
    mats = [(p, x, c) for p, x, c in items if p.ndim >= 2 and 0.0 < c < math.inf]
    if not mats:
        return AUTHORS_CLIP_STEPS
    sq = torch.stack([torch.linalg.vector_norm(x, dtype=torch.float64) ** 2 / (c * c) for _, x, c in mats])
    by_mesh: dict[Any, list[int]] = {}
    for i, (p, _, _) in enumerate(mats):
        if _is_dtensor(p) and p.device_mesh.size() > 1:
            by_mesh.setdefault(p.device_mesh, []).append(i)
    for mesh, idx in by_mesh.items():  # one all-reduce per mesh, over all its dims at once
        part = sq[idx]
        all_reduce_(part, mesh, tuple(range(mesh.ndim)))
        sq[idx] = part
    finest = min((clip_dtype(p, dtype, True) for p, _, _ in mats), key=lambda d: torch.finfo(d).eps)
    count, _ = auto_clip_plan(1.0 + float(sq.max()), finest)  # the one host sync; fp32's count if fp32
    return count


def clip_updates(
    params: list[Tensor], locals_: list[Tensor], c: float, steps: int, dtype: torch.dtype | None, auto: bool
) -> list[Tensor]:
    """``H_c`` of each tensor (local blocks of DTensors come back as local blocks), in the tensors' dtype."""
    out: list[Tensor | None] = [None] * len(params)
    mats = [i for i, p in enumerate(params) if p.ndim >= 2]
    for i, p in enumerate(params):
        if p.ndim < 2:  # the vector rule, its norm taken on the full vector (gathered: exact, and small)
            out[i] = locals_[i] * vector_clip_scale(full_tensor(like(p, locals_[i])), c).to(locals_[i].dtype)
    if not mats:
        return out  # type: ignore[return-value]
    if not math.isfinite(c):
        for i in mats:
            out[i] = locals_[i]
        return out  # type: ignore[return-value]
    for i in mats:
        if params[i].ndim > 2 and _is_dtensor(params[i]):
            raise RuntimeError(
                f"Spectra clips >2-D DTensors only unsharded; got a {tuple(params[i].shape)} DTensor. Use "
                "apply_to='2d' or 'hidden', or a pattern that leaves it out."
            )
    two_d = [i for i in mats if params[i].ndim == 2]
    flat = [i for i in mats if params[i].ndim > 2]
    for i in flat:
        out[i] = spectral_clip(locals_[i].reshape(locals_[i].shape[0], -1), c, steps=steps,
                               dtype=clip_dtype(params[i], dtype, auto, steps)).view_as(locals_[i])  # fmt: skip
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i in two_d:
        by_dtype.setdefault(clip_dtype(params[i], dtype, auto, steps), []).append(i)
    for mm_dtype, idx in by_dtype.items():
        fn = partial(spectral_clip, c=c, steps=steps, dtype=mm_dtype)
        cost = partial(spectral_clip_flops, steps=steps)
        results = map_full_matrices(
            [params[i] for i in idx], [locals_[i].to(mm_dtype) for i in idx], fn, cost
        )
        for i, r in zip(idx, results):
            out[i] = r.to(locals_[i].dtype)
    return out  # type: ignore[return-value]
