"""``torch.optim.AdamW`` with a log line per param group and the deprecated ``pc_state=`` option.

The update is ``torch.optim.AdamW``'s, unchanged (same arguments, defaults, state keys, foreach/fused
kernels). The PC layer needs nothing from the optimizer: ``pcopt.PCState(model).attach(optimizer)`` works
on the stock class (``pc_state=`` does the same and warns).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from pcopt.optim._pc_state import attach_pc_state

logger = logging.getLogger(__name__)

__all__ = ["AdamW"]


class AdamW(torch.optim.AdamW):
    r"""``torch.optim.AdamW``; ``pc_state=`` (deprecated) attaches the model's PC state to it.

    .. math::
       \begin{aligned}
            &\theta_t \leftarrow \mathrm{AdamW}(\theta_{t-1}, g_t)
                \quad \text{(torch.optim.AdamW, unchanged)} \\
            &\textbf{for}\ \text{each PC weight with raw } W:\
                \textbf{repeat } n:\ v \leftarrow \frac{W^\top u}{\lVert W^\top u \rVert},\
                u \leftarrow \frac{W v}{\lVert W v \rVert}
       \end{aligned}

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, foreach, capturable, differentiable, fused:
            exactly as :class:`torch.optim.AdamW` (same defaults: ``weight_decay=1e-2``). Weight decay is
            decoupled and applies to every parameter of a group, including raw PC weights and ``gamma``; the
            paper uses 0.1 on everything (``pcopt.optim.param_groups`` / ``build_optimizer`` default).

    Keyword-only args:
        pc_state (pcopt.PCState or nn.Module, optional): the preconditioned model's PC state (a model is
            wrapped in one). None (default): nothing is refreshed here.

    Under FSDP2 the refresh issues small vector all-reduces, so ``step()`` must run on every rank (it does).
    """

    def __init__(self, params: Any, *args: Any, pc_state=None, **kwargs: Any) -> None:
        super().__init__(params, *args, **kwargs)
        attach_pc_state(self, pc_state, "AdamW")
        for i, group in enumerate(self.param_groups):
            logger.info(
                "AdamW param group %d: %d tensors, %d elements, lr=%s, betas=%s, eps=%s, weight_decay=%s",
                i, len(group["params"]), sum(p.numel() for p in group["params"]), group["lr"], group["betas"],
                group["eps"], group["weight_decay"],
            )  # fmt: skip
