"""Deprecated: the power iteration moved to :mod:`pcopt.power_iteration` (and the mesh sums to pcopt's tensor
helpers). This module keeps the old import path working until pcopt 0.4."""

import warnings

from pcopt._tensor import all_reduce_, mesh_group  # noqa: F401
from pcopt.power_iteration import *  # noqa: F401, F403
from pcopt.power_iteration import init_singular_vectors, normalize, power_iteration_, sigma_estimate  # noqa: F401

warnings.warn(
    "pcopt.spectral is deprecated and will be removed in pcopt 0.4: use pcopt.power_iteration.",
    DeprecationWarning,
    stacklevel=2,
)
