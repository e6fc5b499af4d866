"""torchtitan_ext: PC layer and Muon for torchtitan 0.3.0, as a thin adapter over :mod:`pcopt`.

Launch with ``torchrun ... -m torchtitan_ext.train --module torchtitan_ext --config <name>`` (or the
stock ``-m torchtitan.train`` on a GPU). The configs live in :mod:`torchtitan_ext.config_registry`.
This package imports nothing from torchtitan at import time, so the CPU shims of the launcher can be
installed before torchtitan reads its device type.
"""

import importlib.util

if importlib.util.find_spec("torchtitan") is None:  # pragma: no cover - depends on the environment
    raise ImportError(
        "torchtitan_ext needs torchtitan 0.3.0: install it with `pip install -e .[torchtitan]` "
        "(plus `pip install triton` on CPU-only machines, since torchtitan imports it)."
    )

__all__: list[str] = []
