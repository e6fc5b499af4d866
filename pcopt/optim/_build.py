"""The PC-layer paper's optimizer for any model in one call: :func:`build_optimizer`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pcopt.hardware import preferred_dtype
from pcopt.optim._adamw import AdamW
from pcopt.optim._combined import ROUTING_KEY, CombinedOptimizer
from pcopt.optim._muon import AdjustLrT, Muon, NsAlgorithmT
from pcopt.optim._newton_schulz import KELLER_COEFFICIENTS, CoeffSetT
from pcopt.optim._param_groups import param_groups
from pcopt.recipes import ADAMW, MUON
from pcopt.registration import preconditioners
from pcopt.state import PCState

__all__ = ["build_optimizer"]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = MUON["weight_decay"],
    momentum: float = MUON["momentum"],
    nesterov: bool = MUON["nesterov"],
    adjust_lr_fn: AdjustLrT | None = MUON["adjust_lr_fn"],
    ns_coefficients: tuple[float, float, float] = KELLER_COEFFICIENTS,
    ns_steps: int = MUON["ns_steps"],
    ns_coefficient_set: CoeffSetT | Sequence[tuple[float, float, float]] | None = None,
    ns_dtype: torch.dtype | str | None = None,
    ns_algorithm: NsAlgorithmT = "gram",
    adamw_lr: float | None = None,
    betas: tuple[float, float] = ADAMW["betas"],
    adamw_eps: float = ADAMW["eps"],
    adamw_weight_decay: float | None = None,
    gamma_weight_decay: float | None = None,
    muon_pattern: str | None = None,
    adamw_pattern: str | None = None,
    num_power_iterations: int | None = None,
    adamw_kwargs: dict[str, Any] | None = None,
) -> CombinedOptimizer:
    """The PC-layer paper's optimizer for any model: Muon on hidden matrices, AdamW on everything else.

    Defaults reproduce the paper's Muon runs: Muon (momentum 0.95, Nesterov, 5 Keller steps in the preferred dtype,
    ``adjust_lr_fn="match_rms_adamw"``) and AdamW (betas (0.9, 0.95), eps 1e-8) with the **same peak lr**,
    weight decay 0.1 on every parameter including gamma and the raw PC weights. Parameters are split by
    :func:`param_groups`. The result is one :class:`CombinedOptimizer`: use it with any
    ``torch.optim.lr_scheduler``, ``state_dict``/``load_state_dict``, ``zero_grad`` and closures. If the model
    is preconditioned, the model's :class:`pcopt.PCState` is attached to it (``state.attach``), so its
    ``after_step()`` (refresh of ``u``, ``v``; ``W_eff`` once per step) runs after every step. In the
    once-per-step strategy, call ``pcopt.PCState(model).after_backward()`` before clipping and ``step()``.

    Args:
        lr: peak learning rate of both groups (AdamW's can differ via ``adamw_lr``).
        weight_decay: decoupled weight decay of the Muon group and default for the AdamW groups.
        adamw_weight_decay, gamma_weight_decay: override the AdamW / gamma group's decay (None: inherit).
        momentum, nesterov, adjust_lr_fn, ns_coefficients, ns_steps, ns_coefficient_set: Muon's.
        ns_dtype: Newton-Schulz dtype; None (default) picks it for the parameters' device with
            :func:`pcopt.hardware.preferred_dtype` (bf16 on CUDA and on CPUs with native bf16, else fp32).
        ns_algorithm: ``"gram"`` (default: Gram Newton-Schulz on rectangular matrices, fewer FLOPs, see
            docs/muon.md) or ``"standard"`` (torch.optim.Muon's iteration).
        betas, adamw_eps: AdamW's betas and eps. ``adamw_kwargs``: more ``torch.optim.AdamW`` kwargs
            (``foreach``, ``fused``, ...).
        muon_pattern, adamw_pattern: see :func:`param_groups`.
        num_power_iterations: power iterations of the refresh after each step (None: each weight's own, 10).

    Example::

        >>> pcopt.precondition_model(model, degree=5)
        >>> opt = pcopt.optim.build_optimizer(model, lr=4.243e-3)
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 220))
        >>> for x, y in data:
        ...     loss_fn(model(x), y).backward(); opt.step(); sched.step(); opt.zero_grad()
    """
    adamw_wd = weight_decay if adamw_weight_decay is None else adamw_weight_decay
    groups = param_groups(
        model,
        muon_pattern=muon_pattern,
        adamw_pattern=adamw_pattern,
        muon_weight_decay=weight_decay,
        adamw_weight_decay=adamw_wd,
        gamma_weight_decay=gamma_weight_decay,
    )
    children: dict[str, torch.optim.Optimizer] = {}
    muon_groups = [g for g in groups if g[ROUTING_KEY] == "muon"]
    adamw_groups = [g for g in groups if g[ROUTING_KEY] == "adamw"]
    if muon_groups:
        if ns_dtype is None:
            ns_dtype = preferred_dtype(muon_groups[0]["params"][0].device)
        children["muon"] = Muon(
            muon_groups,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            ns_coefficient_set=ns_coefficient_set,
            ns_dtype=ns_dtype,
            ns_algorithm=ns_algorithm,
        )
    if adamw_groups:
        children["adamw"] = AdamW(
            adamw_groups,
            lr=lr if adamw_lr is None else adamw_lr,
            betas=betas,
            eps=adamw_eps,
            weight_decay=adamw_wd,
            **(adamw_kwargs or {}),
        )
    pc_state = PCState(model, num_power_iterations=num_power_iterations) if preconditioners(model) else None
    if pc_state is None and num_power_iterations is not None:
        warnings.warn(
            "build_optimizer: num_power_iterations has no effect, the model has no preconditioned weights.",
            UserWarning,
            stacklevel=2,
        )
    optimizer = CombinedOptimizer(children)
    if pc_state is not None:
        pc_state.attach(optimizer)
    return optimizer
