"""Optimizers for PC-layer training: Muon (``torch.optim.Muon`` compatible, FSDP2-exact) and AdamW.

The functional Muon step is ``pcopt.optim.muon.muon``.

Both refresh the power-iteration state of the preconditioned weights they own after every ``step()``.
:func:`build_optimizer` builds the paper's setup (Muon on hidden matrices, AdamW on the rest) for any model.
"""

from pcopt.optim._newton_schulz import NS_COEFFICIENT_SETS, CoeffSetT, newton_schulz, newton_schulz_flops
from pcopt.optim.adamw import AdamW
from pcopt.optim.combined import CombinedOptimizer
from pcopt.optim.muon import AdjustLrT, Muon
from pcopt.optim.param_groups import (
    DEFAULT_ADAMW_PATTERN,
    DEFAULT_MUON_PATTERN,
    EMBEDDING_PATTERN,
    GAMMA_PATTERN,
    HEAD_PATTERN,
    build_optimizer,
    param_groups,
)

__all__ = [
    "AdamW",
    "AdjustLrT",
    "CoeffSetT",
    "CombinedOptimizer",
    "DEFAULT_ADAMW_PATTERN",
    "DEFAULT_MUON_PATTERN",
    "EMBEDDING_PATTERN",
    "GAMMA_PATTERN",
    "HEAD_PATTERN",
    "Muon",
    "NS_COEFFICIENT_SETS",
    "build_optimizer",
    "newton_schulz",
    "newton_schulz_flops",
    "param_groups",
]
