"""pcopt: polynomial weight preconditioning (PC layer) with Muon and AdamW for LLM pretraining."""

from pcopt import accumulation, optim  # noqa: E402  (submodules, after the core they build on)
from pcopt.diagnostics import condition_numbers, gmcn, modified_condition_number
from pcopt.parametrizations import (
    DEFAULT_TARGETS,
    effective_weight,
    is_preconditioned,
    load_dense_state_dict,
    merge,
    merged_state_dict,
    precondition,
    precondition_model,
    preconditioners,
    refresh,
    reset_preconditioners,
)
from pcopt.polynomials import PC_COEFFICIENTS, apply_polynomial, polynomial

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TARGETS",
    "PC_COEFFICIENTS",
    "accumulation",
    "optim",
    "apply_polynomial",
    "condition_numbers",
    "effective_weight",
    "gmcn",
    "is_preconditioned",
    "load_dense_state_dict",
    "merge",
    "merged_state_dict",
    "modified_condition_number",
    "polynomial",
    "precondition",
    "precondition_model",
    "preconditioners",
    "refresh",
    "reset_preconditioners",
]
