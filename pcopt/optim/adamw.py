"""AdamW that keeps the PC layer's power-iteration state current: ``torch.optim.AdamW`` plus a refresh.

The update is ``torch.optim.AdamW``'s, unchanged (same arguments, defaults, state keys, foreach/fused
kernels). The one addition the reparameterization needs: after every ``step()``, the streaming estimate
``sigma = u^T W v`` of each preconditioned weight whose raw parameter (``...parametrizations.weight.original``)
this optimizer owns is refreshed by warm-started power iteration (10 iterations by default, as
:func:`pcopt.refresh`). Without it ``u``, ``v`` would describe the weight of the previous step.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from pcopt.optim._awareness import check_num_power_iterations, refresh_after_step

logger = logging.getLogger(__name__)

__all__ = ["AdamW"]


class AdamW(torch.optim.AdamW):
    r"""``torch.optim.AdamW`` that refreshes the PC weights it owns after every step.

    .. math::
       \begin{aligned}
            &\theta_t \leftarrow \mathrm{AdamW}(\theta_{t-1}, g_t)
                \quad \text{(torch.optim.AdamW, unchanged)} \\
            &\textbf{for}\ \text{each PC weight with raw } W \in \theta:\
                \textbf{repeat } n:\ v \leftarrow \frac{W^\top u}{\lVert W^\top u \rVert},\
                u \leftarrow \frac{W v}{\lVert W v \rVert}
       \end{aligned}

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, foreach, capturable, differentiable, fused:
            exactly as :class:`torch.optim.AdamW` (same defaults: ``weight_decay=1e-2``). Weight decay is
            decoupled and applies to every parameter of a group, including raw PC weights and ``gamma``; the
            paper uses 0.1 on everything (``pcopt.optim.param_groups`` / ``build_optimizer`` default).

    Keyword-only args:
        refresh_preconditioners (bool): refresh after each step (default: True). The refresh is a step
            post-hook, so it also runs when ``step`` is called through an lr scheduler's wrapper.
        num_power_iterations (int, optional): power iterations per refresh; None uses each weight's own
            setting (10 by default).

    Under FSDP2 the refresh issues small vector all-reduces, so ``step()`` must run on every rank (it does).
    """

    def __init__(
        self,
        params: Any,
        *args: Any,
        refresh_preconditioners: bool = True,
        num_power_iterations: int | None = None,
        **kwargs: Any,
    ) -> None:
        check_num_power_iterations(num_power_iterations)
        super().__init__(params, *args, **kwargs)
        self.refresh_preconditioners = bool(refresh_preconditioners)
        self.num_power_iterations = num_power_iterations
        self.register_step_post_hook(refresh_after_step)
        for i, group in enumerate(self.param_groups):
            logger.info(
                "AdamW param group %d: %d tensors, %d elements, lr=%s, betas=%s, eps=%s, weight_decay=%s",
                i, len(group["params"]), sum(p.numel() for p in group["params"]), group["lr"], group["betas"],
                group["eps"], group["weight_decay"],
            )  # fmt: skip

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["refresh_preconditioners"] = self.refresh_preconditioners
        state["num_power_iterations"] = self.num_power_iterations
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("refresh_preconditioners", True)
        self.__dict__.setdefault("num_power_iterations", None)
        if refresh_after_step not in self._optimizer_step_post_hooks.values():  # hooks are not pickled
            self.register_step_post_hook(refresh_after_step)
