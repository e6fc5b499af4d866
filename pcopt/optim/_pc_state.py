"""The ``pc_state`` option of pcopt's optimizers: hand the model's :class:`pcopt.PCState` to ``step()``."""

from __future__ import annotations

from torch import nn


def resolve_pc_state(value, who: str):
    """``None``, a :class:`pcopt.PCState`, or a model (wrapped in a new ``PCState``); else ``TypeError``."""
    from pcopt.state import PCState

    if value is None or isinstance(value, PCState):
        return value
    if isinstance(value, nn.Module):
        return PCState(value)
    raise TypeError(
        f"{who}: pc_state must be a pcopt.PCState (or the preconditioned model), got {type(value).__name__}. "
        "Pass pc_state=pcopt.PCState(model)."
    )
