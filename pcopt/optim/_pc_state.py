"""The deprecated ``pc_state=`` option of pcopt's optimizers: it now means ``PCState.attach(optimizer)``.

Optimizers know nothing of the PC layer. The model's :class:`pcopt.PCState` is attached to the optimizer that
the loop steps (``state.attach(optimizer)``, one step post-hook); ``pc_state=`` does that and warns.
"""

from __future__ import annotations

import warnings

from torch import nn


def attach_pc_state(optimizer, value, who: str) -> None:
    """``pc_state=value`` given to ``who``: attach it (``None``: nothing), with a ``DeprecationWarning``."""
    if value is None:
        return
    from pcopt.state import PCState

    if isinstance(value, nn.Module):
        value = PCState(value)
    if not isinstance(value, PCState):
        raise TypeError(
            f"{who}: pc_state must be a pcopt.PCState (or the preconditioned model), got {type(value).__name__}. "
            "Better: leave it out and call pcopt.PCState(model).attach(optimizer)."
        )
    warnings.warn(
        f"{who}(pc_state=...) is deprecated: optimizers do not carry PC state. Use "
        "pcopt.PCState(model).attach(optimizer) (pcopt.optim.build_optimizer does it for you).",
        DeprecationWarning,
        stacklevel=3,
    )
    value.attach(optimizer)
