"""The PC layer's settings as one validated, immutable object."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from pcopt.polynomials import PC_COEFFICIENTS, polynomial, validate_coefficients

__all__ = ["PCOptions"]


def check_positive_int(value: Any, name: str, minimum: int = 1) -> None:
    """``TypeError`` unless ``value`` is an int (not bool); ``ValueError`` if it is below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class PCOptions:
    """How a weight is preconditioned: ``W_eff = gamma * sg(sigma) * p(W / sigma)``.

    Attributes:
        degree: 3, 5, 7 or 9, the PC polynomial of that degree (the paper: 9 with AdamW, 5 with Muon).
            Ignored when ``coefficients`` is given.
        coefficients: a custom odd polynomial, the coefficients of ``x, x^3, ...``.
        num_power_iterations: warm-started power iterations per refresh of ``u``, ``v``.
        learn_gamma: train ``gamma`` (``False`` freezes it at 1).
        eps: added to the sigma estimate ``u^T W v``.

    Every field is validated at construction (``ValueError`` for bad values, ``TypeError`` for wrong types).
    ``pcopt.precondition``, ``pcopt.precondition_model`` and torchtitan_ext's converter take either this object
    (``options=``) or the same fields as keywords.
    """

    degree: int = 9
    coefficients: tuple[float, ...] | None = None
    num_power_iterations: int = 10
    learn_gamma: bool = True
    eps: float = 1e-7

    def __post_init__(self) -> None:
        if self.coefficients is None:
            polynomial(self.degree)  # validates the degree
        else:
            object.__setattr__(self, "coefficients", validate_coefficients(self.coefficients))
        check_positive_int(self.num_power_iterations, "num_power_iterations")
        if not isinstance(self.learn_gamma, bool):
            raise TypeError(f"learn_gamma must be a bool, got {type(self.learn_gamma).__name__}.")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)):
            raise TypeError(
                f"eps must be a positive finite float, got {type(self.eps).__name__} {self.eps!r}."
            )
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a positive finite float, got {self.eps!r}.")
        object.__setattr__(self, "eps", float(self.eps))

    @property
    def polynomial(self) -> tuple[float, ...]:
        """The coefficients actually used (``coefficients``, else the degree's set)."""
        return self.coefficients if self.coefficients is not None else PC_COEFFICIENTS[self.degree]

    @property
    def effective_degree(self) -> int:
        """Degree of the polynomial actually used."""
        return 2 * len(self.polynomial) - 1

    def replace(self, **changes: Any) -> PCOptions:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def resolve(cls, options: PCOptions | None, overrides: dict[str, Any]) -> PCOptions:
        """``options`` (or the defaults) with the keyword ``overrides`` that are not None applied."""
        if options is not None and not isinstance(options, PCOptions):
            raise TypeError(f"options must be a pcopt.PCOptions, got {type(options).__name__}.")
        given = {k: v for k, v in overrides.items() if v is not None}
        base = options or cls()
        if isinstance(given.get("coefficients"), Sequence) and not isinstance(given["coefficients"], str):
            given["coefficients"] = tuple(given["coefficients"])
        return dataclasses.replace(base, **given) if given else base
