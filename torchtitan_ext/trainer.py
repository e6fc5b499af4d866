"""torchtitan's ``Trainer`` plus the one moment it has no hook for: after the last micro-batch's backward.

Once per step (``PCConverter.Config(mode="sharded")``, pcopt's once-per-step strategy) the reduce-scattered
``dL/dW_eff`` shards must be pulled back to the raw weights *before* gradient clipping, so that clipping sees
the raw gradients, as per forward. :class:`PCTrainer` counts the forward-backward calls of a step and calls
the model's ``pcopt.PCState(model_parts).after_backward()`` after the last one. Everything else is
torchtitan's; the other moments are attached to the optimizers (``torchtitan_ext.pc.attach_pc_state``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torchtitan.trainer import Trainer

import pcopt

__all__ = ["PCTrainer"]


class PCTrainer(Trainer):
    """``Trainer`` that calls ``PCState.after_backward()`` once per step, after the last backward."""

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        pass

    def forward_backward_step(self, *args, **kwargs):
        loss = super().forward_backward_step(*args, **kwargs)
        self._pc_backwards = getattr(self, "_pc_backwards", 0) + 1
        if self._pc_backwards == self.gradient_accumulation_steps:
            self._pc_backwards = 0
            if any(pcopt.preconditioners(m) for m in self.model_parts):
                pcopt.PCState(self.model_parts).after_backward()
        return loss
