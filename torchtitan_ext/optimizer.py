"""torchtitan optimizers container that knows pcopt's Muon and PC-aware AdamW by name.

Param groups are torchtitan's own ``ParamGroupConfig`` regexes on canonical parameter FQNs (first
match wins), e.g. ``--optimizer.param_groups`` in a config function. Names added to torchtitan's
``Adam`` / ``AdamW`` / ``DistMuon``:

* ``"Muon"`` - :class:`pcopt.optim.Muon` (``torch.optim.Muon`` keyword names; gathers each FSDP2
  shard to the full matrix for Newton-Schulz).
* ``"PCAdamW"`` - :class:`pcopt.optim.AdamW` (AdamW aware of PC-reparameterized weights).

After every ``step()`` the container refreshes the power-iteration state (u, v) of every PC weight
in the model parts, batched into one vector all-reduce per half-iteration.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig

import pcopt
import pcopt.optim

logger = logging.getLogger(__name__)

__all__ = ["MUON_MATRICES", "PCOptimizersContainer", "adamw_config", "muon_config"]

MUON_MATRICES = (
    r"(^|\.)(attention\.(qkv_linear\.w[qkv]|wo)|feed_forward\.w[123])"
    r"\.(weight|parametrizations\.weight\.original)$"
)
"""Hidden matrices of a torchtitan Llama (raw weights for PC ones): what Muon optimizes. Unanchored at
the start: torchtitan matches patterns against module-wrapper FQNs (``_checkpoint_wrapped_module``)."""

_MATRIX_ONLY = {"Muon"}


def _pcopt_factory(cls: type[Optimizer]) -> Callable[..., Optimizer]:
    # The container refreshes every PC weight once per step (one batched all-reduce per half-iteration);
    # the optimizers' own per-optimizer refresh would repeat it.
    return functools.partial(cls, refresh_preconditioners=False)


class PCOptimizersContainer(OptimizersContainer):
    """``OptimizersContainer`` + ``Muon``/``PCAdamW`` names + PC refresh after each step."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        pc_refresh_iterations: int | None = None
        """Power iterations per refresh after each step (None: each PC weight's own setting, 10)."""

    @staticmethod
    def _resolve_optimizer_factory(name: str) -> Callable[..., Optimizer]:
        if name == "Muon":
            return _pcopt_factory(pcopt.optim.Muon)
        if name == "PCAdamW":
            return _pcopt_factory(pcopt.optim.AdamW)
        try:
            return OptimizersContainer._resolve_optimizer_factory(name)
        except NotImplementedError:
            raise ValueError(
                f"Unknown optimizer_name {name!r}: expected one of 'Muon', 'PCAdamW', 'AdamW', 'Adam', "
                "'DistMuon'."
            ) from None

    @staticmethod
    def _build_param_groups(model, param_group_configs, impl_kwargs):
        groups, patterns = OptimizersContainer._build_param_groups(model, param_group_configs, impl_kwargs)
        for opt_name in _MATRIX_ONLY & set(groups):
            for group, pattern in zip(groups[opt_name], patterns[opt_name]):
                bad = [
                    f"{n} {tuple(p.shape)}"
                    for n, p in zip(group["param_names"], group["params"])
                    if p.ndim != 2
                ]
                if bad:
                    raise ValueError(
                        f"{opt_name} optimizes matrices only, but its param group pattern {pattern!r} "
                        f"matched {len(bad)} parameter(s) that are not 2-D: {bad[:6]}. Put a group for "
                        "them (e.g. AdamW) before it, or narrow the pattern."
                    )
        return groups, patterns

    def __init__(self, config: Config, *, model_parts: list[torch.nn.Module]) -> None:
        if config.pc_refresh_iterations is not None and config.pc_refresh_iterations < 1:
            raise ValueError(
                f"optimizer.pc_refresh_iterations must be >= 1 or None, got {config.pc_refresh_iterations}."
            )
        super().__init__(config, model_parts=model_parts)
        self._pc_refresh_iterations = config.pc_refresh_iterations
        self._has_pc = any(pcopt.preconditioners(m) for m in model_parts)

    def step(self, closure=None):
        super().step(closure)
        if self._has_pc:
            with torch.no_grad():
                for model in self.model_parts:
                    pcopt.refresh(model, self._pc_refresh_iterations)
        return None


def adamw_config(lr: float, *, name: str = "AdamW", **kwargs: Any) -> PCOptimizersContainer.Config:
    """One AdamW group over every parameter, the paper's betas/eps/weight decay (weight decay on all)."""
    return PCOptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(
                pattern=r".*",
                optimizer_name=name,
                optimizer_kwargs={"lr": lr, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, **kwargs},
            )
        ],
    )


def muon_config(
    lr: float, *, adamw_name: str = "AdamW", matrices: str = MUON_MATRICES
) -> PCOptimizersContainer.Config:
    """Muon on the hidden matrices, AdamW (same peak lr) on embeddings, LM head, norms and gamma.

    The paper's Muon: momentum 0.95 with Nesterov, 5 Newton-Schulz steps with the (3.4445, -4.775,
    2.0315) coefficients, the "moonlight" lr scale 0.2*sqrt(max(A, B)) (``match_rms_adamw``), decoupled
    weight decay 0.1.
    """
    try:
        re.compile(matrices)
    except re.error as e:
        raise ValueError(
            f"muon_config: matrices={matrices!r} is not a valid regex ({e}). Pass a pattern searched in "
            "parameter FQNs, e.g. the default MUON_MATRICES."
        ) from None
    return PCOptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(
                pattern=matrices,
                optimizer_name="Muon",
                optimizer_kwargs={
                    "lr": lr,
                    "weight_decay": 0.1,
                    "momentum": 0.95,
                    "nesterov": True,
                    "ns_coefficients": (3.4445, -4.775, 2.0315),
                    "ns_steps": 5,
                    "adjust_lr_fn": "match_rms_adamw",
                },
            ),
            ParamGroupConfig(
                pattern=r".*",
                optimizer_name=adamw_name,
                optimizer_kwargs={"lr": lr, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1},
            ),
        ],
    )
