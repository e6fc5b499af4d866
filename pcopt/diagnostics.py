"""Spectral diagnostics from the paper: modified condition number (MCN) and its geometric mean (GMCN)."""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from pcopt._tensor import full_tensor
from pcopt.names import ATTENTION_FFN_MODULES
from pcopt.registration import is_preconditioned

__all__ = [
    "ATTENTION_FFN_TARGETS",
    "singular_values",
    "modified_condition_number",
    "condition_numbers",
    "gmcn",
    "pc_scalars",
]

ATTENTION_FFN_TARGETS = ATTENTION_FFN_MODULES  # every attention and FFN matrix (pcopt.names)


@torch.no_grad()
def singular_values(W: Tensor) -> Tensor:
    """Singular values (descending) from the eigenvalues of the smaller float64 Gram matrix.

    An order of magnitude faster than an SVD on CPU, and accurate in float64 down to about ``1e-7 sigma_1``
    (the Gram matrix squares the condition number), far below where the MCN of a weight matrix lives.
    """
    W = W.detach().to(torch.float64)
    gram = W.mT @ W if W.shape[-2] >= W.shape[-1] else W @ W.mT
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(-1)


@torch.no_grad()
def modified_condition_number(W: Tensor, fraction: float = 0.1) -> Tensor:
    """``sigma_1 / mean(bottom k singular values)``, ``k = max(1, ceil(fraction * min(m, n)))``.

    Computed in float64 (:func:`singular_values`); ``W`` is a matrix (returns a 0-d tensor) or a batch ``(..., m, n)``. A matrix whose
    bottom singular values are all zero has MCN ``inf``.
    """
    if W.ndim < 2:
        raise ValueError(
            f"modified_condition_number expects a matrix or a batch of matrices, got shape {tuple(W.shape)}."
        )
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    s = singular_values(full_tensor(W))
    k = max(1, math.ceil(fraction * s.shape[-1]))
    return s[..., 0] / s[..., -k:].mean(dim=-1)


def condition_numbers(model: nn.Module, targets: str | None = None) -> dict[str, float]:
    """MCN of every attention/FFN matrix in ``model`` (of ``W_eff`` for preconditioned ones), by weight FQN.

    Sharded weights are all-gathered (every rank must call it).
    """
    pattern = re.compile(targets or ATTENTION_FFN_TARGETS)
    out: dict[str, float] = {}
    for fqn, mod in model.named_modules():
        if not pattern.search(fqn):
            continue
        if is_preconditioned(mod, "weight"):
            W = mod.parametrizations["weight"][0].effective_weight(include_gamma=False)
        elif isinstance(mod._parameters.get("weight"), Tensor) and not parametrize.is_parametrized(
            mod, "weight"
        ):
            W = mod._parameters["weight"]
        else:
            continue
        if W.ndim != 2:
            continue
        out[f"{fqn}.weight"] = float(modified_condition_number(W))
    return out


def gmcn(model: nn.Module, targets: str | None = None) -> float:
    """Geometric mean of the MCN over all attention and FFN matrices (``W_eff`` for preconditioned ones)."""
    values = list(condition_numbers(model, targets).values())
    if not values:
        raise ValueError(
            "gmcn found no attention/FFN matrices in the model; pass targets=<regex on module names> "
            f"(the default is {ATTENTION_FFN_TARGETS!r})."
        )
    return math.exp(sum(math.log(v) for v in values) / len(values))


@torch.no_grad()
def pc_scalars(model: nn.Module) -> dict[str, tuple[float, float]]:
    """``{fqn: (sigma estimate, gamma)}`` of every PC weight (first matrix of a batched one).

    ``sigma`` is the streaming ``u^T W v + eps`` the forward uses. Gathers sharded weights (every rank must
    call it).
    """
    from pcopt.registration import preconditioners

    out = {}
    for fqn, pc in preconditioners(model):
        sigma = float(pc.sigma().flatten()[0])
        gamma = float(full_tensor(pc.gamma.detach()).flatten()[0])
        out[fqn] = (sigma, gamma)
    return out
