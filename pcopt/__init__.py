"""pcopt: polynomial weight preconditioning (PC layer) with Muon and AdamW for LLM pretraining.

Where things live:

* declaring PC: :func:`precondition` (:mod:`pcopt.registration`), :func:`precondition_model` (declares and picks
  the strategy, :mod:`pcopt.strategy`), settings as
  :class:`PCOptions`; the map itself is :class:`pcopt.layer.PolynomialPC`;
* how it executes: :func:`set_strategy` (:mod:`pcopt.strategy`: per forward, the reference, or once per
  optimizer step, also on FSDP2 shards);
* keeping its state current during training: :class:`PCState` (:mod:`pcopt.state`: who changes the PC
  state, and when, in each strategy);
* after training: :func:`merge`, :func:`merged_state_dict`; dense starts: :func:`load_dense_state_dict`
  (:mod:`pcopt.conversion`);
* names, keys and the paper's recipe: :mod:`pcopt.names`, :mod:`pcopt.recipes`;
* spectra: :func:`gmcn` and friends (:mod:`pcopt.diagnostics`);
* optimizers that know no model: :mod:`pcopt.optim` (Muon, CombinedOptimizer, Spectra); the recipe layer that
  routes a model's parameters to them: :func:`param_groups`, :func:`build_optimizer` (:mod:`pcopt.training`).
"""

from pcopt import accumulation, optim  # noqa: E402, I001  (submodules, after the core they build on)
from pcopt.conversion import (
    effective_weight,
    load_dense_state_dict,
    load_state_dict,
    merge,
    merged_state_dict,
)
from pcopt.diagnostics import condition_numbers, gmcn, modified_condition_number
from pcopt.layer import PolynomialPC
from pcopt.names import PC_TARGETS
from pcopt.options import PCOptions
from pcopt.polynomials import PC_COEFFICIENTS, apply_polynomial, polynomial
from pcopt.registration import (
    is_preconditioned,
    precondition,
    preconditioner,
    preconditioners,
)
from pcopt.spectral_clip import spectral_clip
from pcopt.state import PCState, refresh, reset_preconditioners
from pcopt.strategy import (
    STRATEGIES,
    effective_parameters,
    precondition_model,
    set_strategy,
    shard_placement_fn,
    strategy_of,
)
from pcopt import training  # noqa: E402, I001  (the recipe layer, over the core and the optimizers)
from pcopt.training import build_optimizer, param_groups

__version__ = "0.2.0"

__all__ = [
    "PCOptions",
    "PCState",
    "PC_COEFFICIENTS",
    "PC_TARGETS",
    "STRATEGIES",
    "PolynomialPC",
    "accumulation",
    "apply_polynomial",
    "build_optimizer",
    "condition_numbers",
    "effective_parameters",
    "effective_weight",
    "gmcn",
    "is_preconditioned",
    "load_dense_state_dict",
    "load_state_dict",
    "merge",
    "merged_state_dict",
    "modified_condition_number",
    "optim",
    "param_groups",
    "polynomial",
    "precondition",
    "precondition_model",
    "preconditioner",
    "preconditioners",
    "refresh",
    "reset_preconditioners",
    "set_strategy",
    "shard_placement_fn",
    "spectral_clip",
    "strategy_of",
    "training",
]
