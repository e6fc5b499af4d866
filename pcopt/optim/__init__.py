"""Optimizers for PC-layer training: Muon (``torch.optim.Muon`` compatible, FSDP2-exact) and AdamW.

* :class:`Muon` and the functional step :func:`muon`; :func:`newton_schulz` and its FLOP count.
* :class:`AdamW`: ``torch.optim.AdamW`` whose step ends with ``pc_state.after_step()``.
* :func:`param_groups` splits a model by parameter name; :func:`build_optimizer` builds the paper's setup
  (Muon on hidden matrices, AdamW on the rest) as one :class:`CombinedOptimizer` that owns the model's
  :class:`pcopt.PCState`.
"""

from pcopt.optim._adamw import AdamW
from pcopt.optim._build import build_optimizer
from pcopt.optim._combined import CombinedOptimizer
from pcopt.optim._muon import AdjustLrT, Muon, muon
from pcopt.optim._newton_schulz import NS_COEFFICIENT_SETS, CoeffSetT, newton_schulz, newton_schulz_flops
from pcopt.optim._param_groups import (
    DEFAULT_ADAMW_PATTERN,
    DEFAULT_MUON_PATTERN,
    EMBEDDING_PATTERN,
    GAMMA_PATTERN,
    HEAD_PATTERN,
    param_groups,
)
from pcopt.optim.spectra import Spectra

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
    "muon",
    "newton_schulz",
    "newton_schulz_flops",
    "param_groups",
    "Spectra",
]
