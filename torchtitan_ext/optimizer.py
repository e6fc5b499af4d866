"""torchtitan optimizers container that knows pcopt's Muon by name and owns the model's PC state.

Param groups are torchtitan's own ``ParamGroupConfig`` regexes on canonical parameter FQNs (first
match wins), e.g. ``--optimizer.param_groups`` in a config function. The name ``"Muon"`` is added to
torchtitan's ``Adam`` / ``AdamW`` / ``DistMuon``: :class:`pcopt.optim.Muon` (``torch.optim.Muon`` keyword
names; each FSDP2 matrix is orthogonalized once in the world, exactly).

The container holds the model parts' :class:`pcopt.PCState` and calls its ``after_step()`` after every
``step()``: the refresh of ``u``, ``v`` of every PC weight, batched into one vector all-reduce per
half-iteration. The optimizers themselves are given no PC state, so nothing refreshes twice.
"""

from __future__ import annotations

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
from pcopt import recipes
from pcopt.hardware import preferred_dtype
from pcopt.names import ATTENTION_FFN_MODULES, param_pattern

logger = logging.getLogger(__name__)

__all__ = ["MUON_MATRICES", "PCOptimizersContainer", "adamw_config", "muon_config"]

MUON_MATRICES = param_pattern(ATTENTION_FFN_MODULES)
"""Hidden matrices (raw weights for PC ones): what Muon optimizes. Anchored at a name boundary, not at the
start: torchtitan matches patterns against module-wrapper FQNs (``_checkpoint_wrapped_module``)."""

_MATRIX_ONLY = {"Muon"}


def _training_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class PCOptimizersContainer(OptimizersContainer):
    """``OptimizersContainer`` + the ``Muon`` name + the model's :class:`pcopt.PCState` after each step."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        pc_refresh_iterations: int | None = None
        """Power iterations per refresh after each step (None: each PC weight's own setting, 10)."""

        spectral_clip: float | None = None
        """SPECTRA post-clip threshold ``c`` (docs/spectra.md): the hidden matrices' updates of every optimizer
        go through :class:`pcopt.optim.Spectra` (published default 10.0). None (default): off."""

        spectral_clip_warmup_steps: int = 0
        """Steps over which ``c * lr`` is held constant (set it to the lr warmup; 0: ``c`` is constant)."""

    @staticmethod
    def _resolve_optimizer_factory(name: str) -> Callable[..., Optimizer]:
        if name == "Muon":
            return pcopt.optim.Muon
        try:
            return OptimizersContainer._resolve_optimizer_factory(name)
        except NotImplementedError:
            raise ValueError(
                f"Unknown optimizer_name {name!r}: expected one of 'Muon', 'AdamW', 'Adam', 'DistMuon'. "
                "(PC needs no special AdamW: this container refreshes the PC state after every step.)"
            ) from None

    @staticmethod
    def _build_param_groups(model, param_group_configs, impl_kwargs):
        groups, patterns = OptimizersContainer._build_param_groups(model, param_group_configs, impl_kwargs)
        from torchtitan_ext.pc import sharded_pc

        sharded = sharded_pc(model)
        if sharded is not None:  # W_eff belongs to FSDP2 and is written by the PC state, never stepped
            skip = {id(w) for w in sharded.effective_weights()}
            for group in (g for gs in groups.values() for g in gs):
                keep = [i for i, p in enumerate(group["params"]) if id(p) not in skip]
                group["params"] = [group["params"][i] for i in keep]
                group["param_names"] = [group["param_names"][i] for i in keep]
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

    def _validate_params(self, all_params) -> None:
        # The sharded PC mode's W_eff parameters are trainable (FSDP2 reduce-scatters their gradients) but are
        # written by the PC state, not stepped: count them as assigned.
        from torchtitan_ext.pc import sharded_pc

        effective = [w for m in self.model_parts if (s := sharded_pc(m)) is not None for w in s.effective_weights()]
        super()._validate_params([*all_params, *effective])

    def __init__(self, config: Config, *, model_parts: list[torch.nn.Module]) -> None:
        if config.pc_refresh_iterations is not None and (
            isinstance(config.pc_refresh_iterations, bool) or config.pc_refresh_iterations < 1
        ):
            raise ValueError(
                f"optimizer.pc_refresh_iterations must be >= 1 or None, got {config.pc_refresh_iterations}."
            )
        from torchtitan_ext.pc import sharded_pc

        sharded = [s for s in map(sharded_pc, model_parts) if s is not None]
        if len(sharded) > 1:
            raise ValueError("The sharded PC mode supports one model part (no pipeline parallelism).")
        if sharded:
            # The model has just been initialised (to_empty + init_weights wrote <module>.weight): start the
            # PC state from those values, as registration does, and write the first W_eff.
            sharded[0].initialize()
        super().__init__(config, model_parts=model_parts)
        has_pc = any(pcopt.preconditioners(m) for m in model_parts)
        self.pc_state = (
            pcopt.PCState(
                model_parts,
                num_power_iterations=config.pc_refresh_iterations,
                sharded=sharded[0] if sharded else None,
            )
            if has_pc or sharded
            else None
        )
        if config.spectral_clip is not None:
            self.optimizers = [self._with_spectra(o, config, model_parts) for o in self.optimizers]

    @staticmethod
    def _with_spectra(optimizer: Optimizer, config: Config, model_parts: list[torch.nn.Module]) -> Optimizer:
        """``optimizer`` wrapped in :class:`pcopt.optim.Spectra` if it holds hidden matrices, else as is."""
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for part in model_parts:
            hidden = {
                id(p) for g in pcopt.optim.param_groups(part) if g["algorithm"] == "muon" for p in g["params"]
            }
            if ids & hidden:
                return pcopt.optim.Spectra(
                    optimizer,
                    c=config.spectral_clip,
                    model=part,
                    warmup_steps=config.spectral_clip_warmup_steps,
                )
        return optimizer

    def step(self, closure=None):
        super().step(closure)
        if self.pc_state is not None:
            self.pc_state.after_step()
        return None


def adamw_config(lr: float, *, name: str = "AdamW", **kwargs: Any) -> PCOptimizersContainer.Config:
    """One AdamW group over every parameter, the paper's betas/eps/weight decay (weight decay on all)."""
    return PCOptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(
                pattern=r".*",
                optimizer_name=name,
                optimizer_kwargs={"lr": lr, **recipes.ADAMW, **kwargs},
            )
        ],
    )


def muon_config(
    lr: float, *, adamw_name: str = "AdamW", matrices: str = MUON_MATRICES
) -> PCOptimizersContainer.Config:
    """Muon on the hidden matrices, AdamW (same peak lr) on embeddings, LM head, norms and gamma.

    The paper's Muon (:data:`pcopt.recipes.MUON`): momentum 0.95 with Nesterov, 5 Newton-Schulz steps with
    Keller Jordan's coefficients, the "moonlight" lr scale 0.2*sqrt(max(A, B)) (``match_rms_adamw``),
    decoupled weight decay 0.1.
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
                # Newton-Schulz in bf16 on GPUs and CPUs that compute it natively, fp32 on the others
                optimizer_kwargs={"lr": lr, **recipes.MUON, "ns_dtype": preferred_dtype(_training_device())},
            ),
            ParamGroupConfig(
                pattern=r".*",
                optimizer_name=adamw_name,
                optimizer_kwargs={"lr": lr, **recipes.ADAMW},
            ),
        ],
    )
