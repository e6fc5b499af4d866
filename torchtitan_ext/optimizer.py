"""torchtitan optimizers container that knows pcopt's Muon by name (and SPECTRA as an option).

Param groups are torchtitan's own ``ParamGroupConfig`` regexes on canonical parameter FQNs (first
match wins), e.g. ``--optimizer.param_groups`` in a config function. The name ``"Muon"`` is added to
torchtitan's ``Adam`` / ``AdamW`` / ``DistMuon``: :class:`pcopt.optim.Muon` (``torch.optim.Muon`` keyword
names; each FSDP2 matrix is orthogonalized once in the world, exactly).

The container holds no PC state: the model spec's ``post_optimizer_build_fn``
(:func:`torchtitan_ext.pc.attach_pc_state`) attaches the model's :class:`pcopt.PCState` to it, so its
``after_step()`` (refresh of ``u``, ``v``; once per step also ``W_eff``) follows every ``step()``.
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

__all__ = ["MUON_MATRICES", "PCOptimizersContainer", "adamw_config", "muon_config", "muon_kwargs"]

MUON_MATRICES = param_pattern(ATTENTION_FFN_MODULES)
"""Hidden matrices (raw weights for PC ones): what Muon optimizes. Anchored at a name boundary, not at the
start: torchtitan matches patterns against module-wrapper FQNs (``_checkpoint_wrapped_module``)."""

_MATRIX_ONLY = {"Muon"}


def _training_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


_SHOWN_OPTIONS = {"split_sizes": None, "batched_weights": False, "row_interleave": 1}
"""The matrix-layout options a param group's log line names when they differ from these defaults."""


class PCOptimizersContainer(OptimizersContainer):
    """``OptimizersContainer`` + the ``Muon`` name + SPECTRA; skips once-per-step ``W_eff`` parameters."""

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
        skip = {id(w) for w in pcopt.effective_parameters(model)}
        if skip:  # once per step, W_eff belongs to FSDP2 and is written by the PC state, never stepped
            for group in (g for gs in groups.values() for g in gs):
                keep = [i for i, p in enumerate(group["params"]) if id(p) not in skip]
                group["params"] = [group["params"][i] for i in keep]
                group["param_names"] = [group["param_names"][i] for i in keep]
        for opt_name in _MATRIX_ONLY & set(groups):
            for group, pattern in zip(groups[opt_name], patterns[opt_name]):
                batched = group.get("batched_weights", False)
                bad = [
                    f"{n} {tuple(p.shape)}"
                    for n, p in zip(group["param_names"], group["params"])
                    if p.ndim != 2 and not (batched and p.ndim > 2)
                ]
                if bad:
                    raise ValueError(
                        f"{opt_name} optimizes matrices only, but its param group pattern {pattern!r} "
                        f"matched {len(bad)} parameter(s) that are not 2-D: {bad[:6]}. Put a group for "
                        "them (e.g. AdamW) before it, narrow the pattern, or (stacks of matrices such as MoE "
                        "experts) set batched_weights=True in its optimizer_kwargs."
                    )
        for opt_name, gs in groups.items():
            for group, pattern in zip(gs, patterns[opt_name]):
                extra = {k: group[k] for k, off in _SHOWN_OPTIONS.items() if group.get(k, off) != off}
                logger.info(
                    "optimizer %s, pattern %r: %d parameters, %d elements%s",
                    opt_name,
                    pattern,
                    len(group["params"]),
                    sum(p.numel() for p in group["params"]),
                    f", {extra}" if extra else "",
                )
        return groups, patterns

    def _validate_params(self, all_params) -> None:
        # Once per step, the W_eff parameters are trainable (FSDP2 reduce-scatters their gradients) but are
        # written by the PC state, not stepped: count them as assigned.
        effective = [w for m in self.model_parts for w in pcopt.effective_parameters(m)]
        super()._validate_params([*all_params, *effective])

    def __init__(self, config: Config, *, model_parts: list[torch.nn.Module]) -> None:
        if config.pc_refresh_iterations is not None and (
            isinstance(config.pc_refresh_iterations, bool) or config.pc_refresh_iterations < 1
        ):
            raise ValueError(
                f"optimizer.pc_refresh_iterations must be >= 1 or None, got {config.pc_refresh_iterations}."
            )
        once = [m for m in model_parts if pcopt.strategy_of(m) == "once_per_step"]
        if once and len(model_parts) > 1:
            raise ValueError("PC once per step supports one model part (no pipeline parallelism).")
        super().__init__(config, model_parts=model_parts)
        # Read by torchtitan_ext.pc.attach_pc_state (the model spec's post_optimizer_build_fn), which attaches
        # the model's pcopt.PCState to this container; the container itself holds no PC state.
        self.pc_refresh_iterations = config.pc_refresh_iterations
        if config.spectral_clip is not None:
            self.optimizers = [self._with_spectra(o, config, model_parts) for o in self.optimizers]

    @staticmethod
    def _with_spectra(optimizer: Optimizer, config: Config, model_parts: list[torch.nn.Module]) -> Optimizer:
        """``optimizer`` wrapped in :class:`pcopt.optim.Spectra` if it holds hidden matrices, else as is."""
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for part in model_parts:
            hidden = {
                id(p) for g in pcopt.param_groups(part) if g["algorithm"] == "muon" for p in g["params"]
            }
            if ids & hidden:
                return pcopt.optim.Spectra(
                    optimizer,
                    c=config.spectral_clip,
                    clip_params=[p for g in optimizer.param_groups for p in g["params"] if id(p) in hidden],
                    warmup_steps=config.spectral_clip_warmup_steps,
                )
        return optimizer


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


def muon_kwargs() -> dict[str, Any]:
    """pcopt's Muon options of the paper's recipe (:data:`pcopt.recipes.MUON`), with the fast paths: Newton-Schulz
    in bf16 on GPUs and CPUs that compute it natively (fp32 on the others), and Gram Newton-Schulz on rectangular
    matrices (square ones run the standard iteration either way)."""
    return {**recipes.MUON, "ns_dtype": preferred_dtype(_training_device()), "ns_algorithm": "gram"}


def muon_config(
    lr: float, *, adamw_name: str = "AdamW", matrices: str = MUON_MATRICES
) -> PCOptimizersContainer.Config:
    """Muon on the hidden matrices, AdamW (same peak lr) on embeddings, LM head, norms and gamma.

    The paper's Muon (:data:`pcopt.recipes.MUON`): momentum 0.95 with Nesterov, 5 Newton-Schulz steps with
    Keller Jordan's coefficients, the "moonlight" lr scale 0.2*sqrt(max(A, B)) (``match_rms_adamw``),
    decoupled weight decay 0.1. As :func:`pcopt.build_optimizer`, it uses the fast options where
    exactness to ``torch.optim.Muon`` is not promised: Newton-Schulz in the hardware's preferred dtype and Gram
    Newton-Schulz on rectangular matrices (``ns_algorithm="gram"``, the same polynomial with fewer FLOPs,
    docs/muon.md). Set ``optimizer_kwargs["ns_algorithm"] = "standard"`` for torch's iteration.
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
                pattern=matrices, optimizer_name="Muon", optimizer_kwargs={"lr": lr, **muon_kwargs()}
            ),
            ParamGroupConfig(
                pattern=r".*",
                optimizer_name=adamw_name,
                optimizer_kwargs={"lr": lr, **recipes.ADAMW},
            ),
        ],
    )
