"""The recipe layer: which parameter gets which optimizer (:func:`param_groups`), and the PC-layer paper's
optimizer for any model in one call (:func:`build_optimizer`).

This is where the model meets the optimizers: :mod:`pcopt.optim` takes param groups and hyperparameters only,
like ``torch.optim``; the names of a model's parameters, its PC weights and the paper's settings
(:mod:`pcopt.recipes`) are read here.

:func:`param_groups` routes by name (first rule that applies wins; ``name`` is the parameter's FQN from
``model.named_parameters()``):

==========================================================  ==========  ==============================
parameter                                                   optimizer   group
==========================================================  ==========  ==============================
frozen (``requires_grad=False``), or a once-per-step ``W_eff``  none        not returned
matches ``adamw_pattern`` (default: token embeddings         AdamW       ``"adamw"``
``tok_embeddings``/``embed_tokens``/``wte``/``wpe``/
``word_embeddings`` and LM head ``output``/``lm_head``,
plain or preconditioned), or owned by an ``nn.Embedding``
PC ``gamma`` (``...parametrizations.<name>.0.gamma``)        AdamW       ``"adamw"`` gamma group
2-D and matches ``muon_pattern`` (default: ``...weight``     Muon        ``"muon"``
and raw PC weights ``...parametrizations.weight.original``)
any other non-matrix parameter (norms, biases, ...)          AdamW       ``"adamw"``
any other 2-D parameter                                      error       ``ValueError`` naming it
==========================================================  ==========  ==============================
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pcopt.hardware import preferred_dtype
from pcopt.names import EMBEDDING_MODULES, GAMMA_PARAMS, HEAD_MODULES, WEIGHT_PARAMS, param_pattern
from pcopt.optim import ROUTING_KEY, CombinedOptimizer, Muon
from pcopt.optim._muon import AdjustLrT, NsAlgorithmT
from pcopt.optim._newton_schulz import KELLER_COEFFICIENTS, CoeffSetT
from pcopt.recipes import ADAMW, MUON
from pcopt.registration import preconditioners
from pcopt.state import PCState
from pcopt.strategy import effective_parameters

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ADAMW_PATTERN",
    "DEFAULT_MUON_PATTERN",
    "EMBEDDING_PATTERN",
    "GAMMA_PATTERN",
    "HEAD_PATTERN",
    "build_optimizer",
    "param_groups",
]

EMBEDDING_PATTERN = param_pattern(EMBEDDING_MODULES)
HEAD_PATTERN = param_pattern(HEAD_MODULES)
DEFAULT_ADAMW_PATTERN = f"{EMBEDDING_PATTERN}|{HEAD_PATTERN}"
GAMMA_PATTERN = GAMMA_PARAMS
DEFAULT_MUON_PATTERN = WEIGHT_PARAMS


def _compile(pattern: str, what: str) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise ValueError(f"{what} must be a regular expression string, got {pattern!r}.")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{what} is not a valid regular expression: {pattern!r} ({exc}).") from None


def _check_wd(value: float | None, what: str) -> None:
    if value is not None and not (
        isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    ):
        raise ValueError(f"Invalid {what}: {value!r}. Expected a float >= 0 or None.")


def param_groups(
    model: nn.Module,
    *,
    muon_pattern: str | None = None,
    adamw_pattern: str | None = None,
    muon_weight_decay: float | None = None,
    adamw_weight_decay: float | None = None,
    gamma_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into Muon and AdamW param groups, by name.

    Returns plain dicts ``{"params": [...], "param_names": [...], "algorithm": "muon" | "adamw", ...}``:
    a Muon group (hidden matrices, including raw PC weights), an AdamW group (embeddings, LM head, norms,
    biases, every other non-matrix parameter) and, if the model has PC layers with learnable gamma, a second
    AdamW group holding the gammas. Empty groups are left out. See the module docstring for the rules.

    Args:
        model: any ``nn.Module`` (plain, preconditioned with :func:`pcopt.precondition_model`, or after
            ``fully_shard``).
        muon_pattern: regex searched in each FQN; matching 2-D parameters go to Muon
            (default ``DEFAULT_MUON_PATTERN``: names ending in ``weight`` or ``parametrizations.weight.original``).
        adamw_pattern: regex searched in each FQN; matches go to AdamW and take precedence over
            ``muon_pattern`` (default ``DEFAULT_ADAMW_PATTERN``: token embeddings and LM head).
        muon_weight_decay, adamw_weight_decay: if given, stored as ``"weight_decay"`` in those groups;
            otherwise the optimizer's default applies.
        gamma_weight_decay: weight decay of the gamma group; None keeps AdamW's (the paper decays gamma with
            0.1 like everything else). Pass 0.0 to exempt gamma.

    Raises:
        ValueError: a trainable 2-D parameter matches neither pattern (its name is given; add it to
            ``adamw_pattern`` or ``muon_pattern``), a pattern is not a valid regex, or ``model`` has no
            trainable parameters.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups expects an nn.Module, got {type(model).__name__}.")
    for value, what in ((muon_weight_decay, "muon_weight_decay"), (adamw_weight_decay, "adamw_weight_decay"),
                        (gamma_weight_decay, "gamma_weight_decay")):  # fmt: skip
        _check_wd(value, what)
    muon_re = _compile(DEFAULT_MUON_PATTERN if muon_pattern is None else muon_pattern, "muon_pattern")
    adamw_re = _compile(DEFAULT_ADAMW_PATTERN if adamw_pattern is None else adamw_pattern, "adamw_pattern")
    gamma_re = re.compile(GAMMA_PATTERN)

    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)
    }
    routes: dict[str, list[tuple[str, torch.nn.Parameter]]] = {"muon": [], "adamw": [], "gamma": []}
    unrouted: list[str] = []
    matched = {"muon_pattern": False, "adamw_pattern": False}
    written = {id(p) for p in effective_parameters(model)}  # W_eff: FSDP2's and the PC state's, never stepped
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in written:
            continue
        if adamw_re.search(name) or id(p) in embedding_params:
            matched["adamw_pattern"] = matched["adamw_pattern"] or bool(adamw_re.search(name))
            routes["adamw"].append((name, p))
        elif gamma_re.search(name):
            routes["gamma"].append((name, p))
        elif p.ndim == 2 and muon_re.search(name):
            matched["muon_pattern"] = True
            routes["muon"].append((name, p))
        elif p.ndim != 2:
            routes["adamw"].append((name, p))
        else:
            unrouted.append(f"{name} {tuple(p.shape)}")
    for key, user_value in (("muon_pattern", muon_pattern), ("adamw_pattern", adamw_pattern)):
        if user_value is not None and not matched[key]:
            warnings.warn(f"param_groups: {key}={user_value!r} matched no trainable parameter.", stacklevel=2)
    if unrouted:
        raise ValueError(
            f"param_groups: {len(unrouted)} trainable 2-D parameter(s) match neither muon_pattern "
            f"({muon_re.pattern!r}) nor adamw_pattern ({adamw_re.pattern!r}): {', '.join(unrouted)}. "
            "Every trainable parameter must land in exactly one group: add them to adamw_pattern (e.g. "
            "adamw_pattern=pcopt.training.DEFAULT_ADAMW_PATTERN + r'|pos_emb$') or to muon_pattern."
        )
    if not any(routes.values()):
        raise ValueError("param_groups: the model has no trainable parameters.")

    groups: list[dict[str, Any]] = []
    for route, algorithm, wd in (("muon", "muon", muon_weight_decay), ("adamw", "adamw", adamw_weight_decay),
                                 ("gamma", "adamw", gamma_weight_decay if gamma_weight_decay is not None
                                  else adamw_weight_decay)):  # fmt: skip
        if not routes[route]:
            continue
        group: dict[str, Any] = {
            "params": [p for _, p in routes[route]],
            "param_names": [n for n, _ in routes[route]],
            ROUTING_KEY: algorithm,
        }
        if wd is not None:
            group["weight_decay"] = wd
        groups.append(group)
        logger.info(
            "param_groups: %s%s <- %d tensors (%d elements), weight_decay=%s",
            algorithm, " (gamma)" if route == "gamma" else "", len(group["params"]),
            sum(p.numel() for p in group["params"]), wd if wd is not None else "optimizer default",
        )  # fmt: skip
    return groups


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
    ``after_step()`` (refresh of ``u``, ``v``; ``W_eff`` once per step) runs after every step, also when the
    result is wrapped (``pcopt.optim.Spectra``).

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
        >>> opt = pcopt.build_optimizer(model, lr=4.243e-3)
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
        children["adamw"] = adamw = torch.optim.AdamW(
            adamw_groups,
            lr=lr if adamw_lr is None else adamw_lr,
            betas=betas,
            eps=adamw_eps,
            weight_decay=adamw_wd,
            **(adamw_kwargs or {}),
        )
        for i, group in enumerate(adamw.param_groups):
            logger.info(
                "AdamW param group %d: %d tensors, %d elements, lr=%s, betas=%s, eps=%s, weight_decay=%s",
                i, len(group["params"]), sum(p.numel() for p in group["params"]), group["lr"], group["betas"],
                group["eps"], group["weight_decay"],
            )  # fmt: skip
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
