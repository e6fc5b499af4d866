"""Split a model's parameters between Muon and AdamW by name (:func:`param_groups`).

Routing (first rule that applies wins; ``name`` is the parameter's FQN from ``model.named_parameters()``):

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
from typing import Any

import torch
from torch import nn

from pcopt.names import EMBEDDING_MODULES, GAMMA_PARAMS, HEAD_MODULES, WEIGHT_PARAMS, param_pattern
from pcopt.optim._combined import ROUTING_KEY

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ADAMW_PATTERN",
    "DEFAULT_MUON_PATTERN",
    "EMBEDDING_PATTERN",
    "GAMMA_PATTERN",
    "HEAD_PATTERN",
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
    from pcopt.strategy import effective_parameters

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
            "adamw_pattern=pcopt.optim.DEFAULT_ADAMW_PATTERN + r'|pos_emb$') or to muon_pattern."
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
