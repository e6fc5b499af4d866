"""Optimizers that know no model: they take param groups and hyperparameters, like ``torch.optim``.

* :class:`Muon` and the functional step :func:`muon` (``torch.optim.Muon`` compatible, exact on FSDP2/TP
  shards); :func:`newton_schulz` and its FLOP count.
* :class:`CombinedOptimizer`: named child optimizers with disjoint parameters, stepped as one.
* :class:`Spectra`: spectral clipping (SPECTRA) of the updates of any optimizer with decoupled weight decay.

Which parameter goes to which optimizer is the recipe layer's business (:func:`pcopt.param_groups`,
:func:`pcopt.build_optimizer`), and the PC state keeps itself current through the step hook that
:meth:`pcopt.PCState.attach` registers on any optimizer.
"""

import importlib
import warnings

from pcopt.optim._combined import ROUTING_KEY, CombinedOptimizer
from pcopt.optim._muon import AdjustLrT, Muon, muon
from pcopt.optim._newton_schulz import NS_COEFFICIENT_SETS, CoeffSetT, newton_schulz, newton_schulz_flops
from pcopt.optim.spectra import Spectra

__all__ = [
    "AdjustLrT",
    "CoeffSetT",
    "CombinedOptimizer",
    "Muon",
    "NS_COEFFICIENT_SETS",
    "ROUTING_KEY",
    "Spectra",
    "muon",
    "newton_schulz",
    "newton_schulz_flops",
]

# Names that moved in 0.3; they keep working until 0.4 with a DeprecationWarning naming the new home. The
# recipe layer is looked up by name when one of them is used, so that pcopt.optim imports nothing above it.
_MOVED = {
    "AdamW": ("torch.optim", "AdamW"),
    "build_optimizer": ("pcopt.training", "build_optimizer"),
    "param_groups": ("pcopt.training", "param_groups"),
    "DEFAULT_ADAMW_PATTERN": ("pcopt.training", "DEFAULT_ADAMW_PATTERN"),
    "DEFAULT_MUON_PATTERN": ("pcopt.training", "DEFAULT_MUON_PATTERN"),
    "EMBEDDING_PATTERN": ("pcopt.training", "EMBEDDING_PATTERN"),
    "GAMMA_PATTERN": ("pcopt.training", "GAMMA_PATTERN"),
    "HEAD_PATTERN": ("pcopt.training", "HEAD_PATTERN"),
}


def __getattr__(name: str):
    if name in _MOVED:
        module, attr = _MOVED[name]
        new = "pcopt." + attr if module == "pcopt.training" else f"{module}.{attr}"
        warnings.warn(
            f"pcopt.optim.{name} is deprecated and will be removed in pcopt 0.4: use {new} instead.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'pcopt.optim' has no attribute {name!r}")
