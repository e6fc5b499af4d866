"""torchtitan_ext: PC layer and Muon for torchtitan 0.3.0, as a thin adapter over :mod:`pcopt`.

Launch with ``torchrun ... -m torchtitan_ext.train --module torchtitan_ext --config <name>`` (or the
stock ``-m torchtitan.train`` on a GPU). The configs live in :mod:`torchtitan_ext.config_registry`: the paper's
Llama-2 ones and ``<torchtitan stock name>_muon`` / ``_muon_pc`` / ``_adamw_pc``. In Python,
``torchtitan_ext.with_pc(config)`` and ``torchtitan_ext.with_muon(config)`` transform any ``Trainer.Config``.
This package imports nothing from torchtitan at import time, so the CPU shims of the launcher can be
installed before torchtitan reads its device type.
"""

import importlib.util
import re

REQUIRED_TORCH = (2, 13)
"""torchtitan 0.3.0 imports ``torch.distributed.fsdp.DataParallelMeshDims``, which torch 2.11 lacks."""


def check_torch_version(version: str) -> None:
    """Raise ImportError unless ``version`` (a ``torch.__version__`` string) is at least :data:`REQUIRED_TORCH`."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None or (int(m.group(1)), int(m.group(2))) < REQUIRED_TORCH:
        need = ".".join(map(str, REQUIRED_TORCH))
        raise ImportError(
            f"torchtitan_ext needs torch>={need} (torchtitan 0.3.0 does not import on older torch), "
            f"but torch {version} is installed. Install a newer torch, e.g. `pip install torch==2.13.0` "
            f"(CPU: add `--index-url https://download.pytorch.org/whl/cpu`), then `pip install -e .[torchtitan]`. "
            "pcopt itself (PC layer, Muon, AdamW) works on torch>=2.11 without torchtitan_ext."
        )


def _installed_torch_version() -> str:
    import torch

    return torch.__version__


check_torch_version(_installed_torch_version())

if importlib.util.find_spec("torchtitan") is None:  # pragma: no cover - depends on the environment
    raise ImportError(
        "torchtitan_ext needs torchtitan 0.3.0: install it with `pip install -e .[torchtitan]` "
        "(plus `pip install triton` on CPU-only machines, since torchtitan imports it)."
    )

__all__ = ["for_cpu", "with_muon", "with_pc"]


def __getattr__(name: str):
    """``with_pc``, ``with_muon`` and ``for_cpu`` (:mod:`torchtitan_ext.transform`), imported on first use so that
    importing the package loads no torchtitan module (the launcher's CPU shims must come first)."""
    if name in __all__:
        from torchtitan_ext import transform

        return getattr(transform, name)
    raise AttributeError(f"module 'torchtitan_ext' has no attribute {name!r}")
