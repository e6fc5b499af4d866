"""torchtitan's ``Trainer`` plus the one moment it has no hook for: after the last micro-batch's backward.

In the sharded PC mode (``PCConverter.Config(mode="sharded")``) the reduce-scattered ``dL/dW_eff`` shards must
be pulled back to the raw weights *before* gradient clipping, so that clipping sees the raw gradients, as in
the parametrize path. :class:`PCTrainer` counts the forward-backward calls of a step and calls the
optimizers container's ``pc_state.after_backward()`` after the last one. Everything else is torchtitan's.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchtitan.trainer import Trainer

__all__ = ["PCTrainer"]


class PCTrainer(Trainer):
    """``Trainer`` that calls ``pc_state.after_backward()`` once per step, after the last backward."""

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        pass

    def forward_backward_step(self, *args, **kwargs):
        loss = super().forward_backward_step(*args, **kwargs)
        self._pc_backwards = getattr(self, "_pc_backwards", 0) + 1
        if self._pc_backwards == self.gradient_accumulation_steps:
            self._pc_backwards = 0
            state = getattr(self.optimizers, "pc_state", None)
            if state is not None:
                state.after_backward()
        return loss
