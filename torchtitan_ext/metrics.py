"""PC diagnostics through torchtitan's metrics (console, TensorBoard, W&B).

:class:`PCMetricsProcessor` adds, every ``--metrics.pc_log_freq`` steps (0, the default, turns it
off: it all-gathers every matrix and runs SVDs), to the metrics torchtitan logs at that step:

* ``pc/gmcn`` - the paper's GMCN: geometric mean over all attention and FFN matrices of
  sigma_1 / mean(bottom 10% singular values), of W_eff for PC matrices (``pcopt.gmcn``);
* ``pc/sigma/<fqn>`` and ``pc/gamma/<fqn>`` - the streaming sigma estimate u^T W v + eps and the
  learned scale of every PC matrix, plus ``pc/sigma_mean`` and ``pc/gamma_mean``.

At every logging step (whatever ``pc_log_freq``), ``pc/power_restarts`` counts the power-iteration restarts
so far (``pcopt.PCState.health``: ``u``, ``v`` found non-finite or zero and re-initialised; 0 in a healthy run).

Metrics are logged only at steps torchtitan logs (``step == 1`` or a multiple of
``--metrics.log_freq``), so ``pc_log_freq`` must be a multiple of ``log_freq``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torchtitan.components.metrics import MetricsProcessor

import pcopt
import pcopt.diagnostics

logger = logging.getLogger(__name__)

__all__ = ["PCMetricsProcessor", "pc_metrics"]


@torch.no_grad()
def pc_metrics(model_parts: list[torch.nn.Module], *, with_gmcn: bool = True) -> dict[str, float]:
    """GMCN and per-matrix sigma/gamma of ``model_parts``. Collective under FSDP2: call on every rank."""
    out: dict[str, float] = {}
    sigmas, gammas = [], []
    for model in model_parts:
        for fqn, (sigma, gamma) in pcopt.diagnostics.pc_scalars(model).items():
            out[f"pc/sigma/{fqn}"] = sigma
            out[f"pc/gamma/{fqn}"] = gamma
            sigmas.append(sigma)
            gammas.append(gamma)
    if sigmas:
        out["pc/sigma_mean"] = sum(sigmas) / len(sigmas)
        out["pc/gamma_mean"] = sum(gammas) / len(gammas)
    if with_gmcn:
        per_matrix = [v for m in model_parts for v in pcopt.condition_numbers(m).values()]
        if per_matrix:
            out["pc/gmcn"] = math.exp(sum(math.log(v) for v in per_matrix) / len(per_matrix))
    return out


class PCMetricsProcessor(MetricsProcessor):
    """torchtitan's ``MetricsProcessor`` plus the PC diagnostics above every ``pc_log_freq`` steps."""

    @dataclass(kw_only=True, slots=True)
    class Config(MetricsProcessor.Config):
        pc_log_freq: int = 0
        """Log GMCN and sigma/gamma every this many steps (a multiple of log_freq); 0 disables it."""

        def __post_init__(self) -> None:
            if self.pc_log_freq < 0:
                raise ValueError(f"metrics.pc_log_freq must be >= 0 (0 disables it), got {self.pc_log_freq}.")
            if self.pc_log_freq and self.pc_log_freq % self.log_freq:
                raise ValueError(
                    f"metrics.pc_log_freq ({self.pc_log_freq}) must be a multiple of metrics.log_freq "
                    f"({self.log_freq}): PC metrics are logged with torchtitan's metrics at its logging steps."
                )

    def log(
        self,
        step: int,
        global_avg_loss: float,
        global_max_loss: float,
        grad_norm: float,
        extra_metrics: dict[str, Any] | None = None,
    ):
        freq = self.config.pc_log_freq
        if freq and step % freq == 0 and self.model_parts is not None:
            metrics = pc_metrics(self.model_parts)
            extra_metrics = {**(extra_metrics or {}), **metrics}
            summary = {k: v for k, v in metrics.items() if k.count("/") == 1}
            logger.info("step %d PC metrics: %s", step, {k: round(v, 5) for k, v in summary.items()})
        if self.model_parts is not None and any(pcopt.preconditioners(m) for m in self.model_parts):
            # the refresh heals u, v on the device without a sync; the count is read here, at a logging step
            # (one small device-to-host read per PC weight), and PCState.health() warns once per weight
            restarts = pcopt.PCState(self.model_parts).health()
            extra_metrics = {**(extra_metrics or {}), "pc/power_restarts": float(sum(restarts.values()))}
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra_metrics)
