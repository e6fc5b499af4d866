"""Compatibility shims that let torchtitan 0.3.0 train on CPU (gloo) and on torch 2.13.

Nothing here is applied on a CUDA machine with a torch that has what torchtitan needs: the
launcher (``python -m torchtitan_ext.train``) calls :func:`install_cpu_shims` only when no GPU is
present, and the other pieces are no-ops unless their condition holds:

* :func:`install_cpu_shims` - torchtitan picks ``"cuda"`` when no accelerator is found
  (``torchtitan/tools/utils.py``); point its ``device_type``/``device_module`` at the CPU
  instead. Must run before any other torchtitan module is imported.
* :func:`install_set_timeout_shim` - ``torch.distributed.set_timeout`` is public only from torch
  2.14; torchtitan calls it after the first step.
* :class:`DenseMaskAttention` / :func:`dense_attention` - FlexAttention has no CPU backward; this
  subclass evaluates the same BlockMask densely with SDPA.
* :func:`force_sum_reduction_on_gloo` - gloo has no ``PREMUL_SUM``, which FSDP2 uses for torchtitan's
  gradient divide factor of 1.0; a plain SUM is the same reduction.
* :func:`check_spmd_backend` - the ``full_dtensor`` backend silently doubles the loss on torch < 2.14
  and ``spmd_types`` needs torch 2.14's FSDP2; refuse both there.
* :func:`install_log_filter` - drops two torchtitan warnings that our configs trigger and that say nothing
  (see :class:`QuietLogFilter`) and, on the CPU, the GPU-only ``memory`` and ``mfu`` fields of step lines,
  NCCL/CUDA-graph notices, per-layer override lines and the DTensor-RNG/torchdata warnings; it also
  collects the step lines for the one-line summary the launcher logs at the end of a run.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = [
    "QuietLogFilter",
    "TORCH_HAS_SPMD_FSDP",
    "check_spmd_backend",
    "force_sum_reduction_on_gloo",
    "install_cpu_shims",
    "install_log_filter",
    "install_set_timeout_shim",
]

TORCH_HAS_SPMD_FSDP = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)
"""torch >= 2.14: FSDP2 understands spmd_types and full_dtensor trains correctly."""


def check_spmd_backend(spmd_backend: str) -> None:
    """Raise ``ValueError`` for a backend that is wrong or unsupported on this torch version."""
    if TORCH_HAS_SPMD_FSDP or spmd_backend == "partial_dtensor":
        return
    why = {
        "full_dtensor": "it trains with a silently doubled loss on this torch version",
        "spmd_types": "torch's FSDP2 supports spmd_types only from torch 2.14",
    }.get(spmd_backend, "it is not a known backend")
    raise ValueError(
        f"parallelism.spmd_backend={spmd_backend!r} is refused on torch {torch.__version__}: {why}. "
        "Use --parallelism.spmd_backend partial_dtensor (the default of the torchtitan_ext configs "
        "on torch < 2.14), or upgrade to torch >= 2.14."
    )


def install_set_timeout_shim() -> bool:
    """Provide ``torch.distributed.set_timeout`` on torch versions that only have the private one."""
    if hasattr(dist, "set_timeout"):
        return False

    def set_timeout(timeout: timedelta, group: dist.ProcessGroup | None = None) -> None:
        dist.distributed_c10d._set_pg_timeout(timeout, group)

    dist.set_timeout = set_timeout
    return True


class _CPUDeviceModule:
    """The few ``torch.cuda``-style calls torchtitan makes on its ``device_module``, for the CPU."""

    def __getattr__(self, name: str):
        return getattr(torch.cpu, name)

    @staticmethod
    def current_device() -> int:
        # torchtitan passes this to ``barrier(device_ids=[...])``, which needs an int.
        return 0

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def set_device(device) -> None:
        pass

    @staticmethod
    def synchronize(device=None) -> None:
        pass

    @staticmethod
    def get_device_name(device=None) -> str:
        return "CPU"

    @staticmethod
    def get_device_properties(device=None):
        @dataclass
        class _Props:
            name: str
            total_memory: int

        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 1 << 30
        return _Props(name="CPU", total_memory=total)

    @staticmethod
    def memory_stats(device=None) -> dict:
        return {}

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass


def install_cpu_shims() -> None:
    """Make torchtitan use the CPU. Call before importing anything from torchtitan but its utils."""
    already = [
        m
        for m in (
            "torchtitan.trainer",
            "torchtitan.components.metrics",
            "torchtitan.distributed.utils",
            "torchtitan.distributed.parallel_dims",
        )
        if m in sys.modules
    ]
    import torchtitan.tools.utils as tt_utils

    if tt_utils.device_type != "cpu":
        if already:
            raise RuntimeError(
                f"install_cpu_shims() must run before torchtitan modules read the device type, but "
                f"{already} are already imported. Call it first (python -m torchtitan_ext.train does)."
            )
        tt_utils.device_type = "cpu"
        tt_utils.device_module = _CPUDeviceModule()
    install_set_timeout_shim()
    logger.info("torchtitan_ext: no GPU found, running torchtitan on the CPU with gloo")


def force_sum_reduction_on_gloo(model: torch.nn.Module) -> int:
    """Use SUM for FSDP2 gradient reductions on gloo (which lacks PREMUL_SUM). Returns modules changed."""
    from torch.distributed.fsdp import FSDPModule

    if not dist.is_initialized() or dist.get_backend() != "gloo":
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
            n += 1
    return n


_ANSI = r"(?:\x1b\[[0-9;]*m)?"
_MEMORY_FIELD = re.compile(_ANSI + r"memory: *-?[\d.]+GiB\(-?[\d.]+%\) *")
_CPU_PEAK_FLOPS_NOISE = (  # GPU peak-FLOPs lookup (only used for mfu) and GPU memory counters
    "Error running lspci",
    "Peak flops undefined for: CPU",
    "Peak FLOPS used for computing MFU",
    "CPU memory usage for model",
)
_MFU_FIELD = re.compile(r" *" + _ANSI + r"mfu: *(?:-?[\d.]+%|N/A)")
_CPU_NOISE = (  # GPU-only settings and per-layer detail that a CPU run cannot act on
    "ENV[TORCH_NCCL_ASYNC_ERROR_HANDLING]",  # an NCCL setting; CPU runs use gloo
    "CUDA graph capture is only supported",  # eager is what a CPU runs anyway
    "[Override] torchtitan_ext.cpu_attention.",  # one line per layer; "Applied N override(s)" stays
    "[GC] Initial GC collection took",
    "Sleeping 2 seconds for other ranks to complete",
)
_CPU_WARNINGS = (  # Python warnings (not log records) of a gloo/CPU run that say nothing to act on
    "DTensor random operators may not have complete support on cpu device mesh",
    r"DTensor manual_seed\(\) may not have complete support on cpu device mesh",
    "'set_vital' is deprecated",  # torchdata's StatefulDataLoader calls a deprecated torch function
)
_STRIP_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STEP_LINE = re.compile(r"step:\s*(\d+)\s+loss:\s*(\S+)\s+grad_norm:\s*(\S+)")
_PC_METRICS = re.compile(r"step (\d+) PC metrics: .*'pc/gmcn': ([-\d.e+naif]+)")


def _formatted(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except (TypeError, ValueError):  # a record whose args do not fit its format: not ours to judge
        return str(record.msg)


class QuietLogFilter(logging.Filter):
    """Drop torchtitan log records that our configs trigger without meaning, and GPU-only fields on CPU.

    * ``initial_load_model_only=True has no effect without an initial_load_path.``: logged by torchtitan's
      ``CheckpointManager.Config.__post_init__`` whenever a config is built with its own default
      ``initial_load_model_only=True`` and no initial checkpoint, i.e. for every plain run (once per
      construction of the config). With ``--checkpoint.initial_load_path`` it is not logged anyway.
    * ``model.safetensors.index.json not found at hf_assets_path: <tokenizer_dir>``: torchtitan's
      ``StateDictAdapter`` looks for a Hugging Face weight index next to the tokenizer; the debug configs
      point ``hf_assets_path`` at the embedded tokenizer (``tokenizer_dir``), which has no weights, so a
      Hugging Face export is written as one safetensors file, as intended. Only dropped for that folder.
    * With ``cpu=True``, the ``memory: ...GiB(...%)`` and ``mfu: ...%`` fields of torchtitan's step and
      validation lines: they read GPU memory counters and a GPU's peak FLOPs, meaningless on a CPU (the
      TensorBoard/W&B ``memory/*`` and ``mfu(%)`` scalars stay, equally meaningless there), and the two
      warnings about looking up a GPU's peak FLOPs for the MFU (``lspci``, ``Peak flops undefined``), the
      peak it then assumes (an A100's) and the ``CPU memory usage for model: -0.00GiB`` line.
    * With ``cpu=True``, also the lines a CPU run cannot act on: the ``TORCH_NCCL_ASYNC_ERROR_HANDLING``
      override (NCCL; CPU runs use gloo), ``CUDA graph capture is only supported on NVIDIA CUDA``, the
      per-layer ``[Override] torchtitan_ext.cpu_attention...`` lines (``Applied N override(s)`` stays), the
      initial GC timing and the final ``Sleeping 2 seconds`` line. :func:`install_log_filter` silences the
      matching Python warnings (DTensor RNG on a CPU mesh, torchdata's ``set_vital``).

    Every record that passes is also read for :meth:`summary`: the step lines and the PC metrics lines.
    """

    def __init__(self, tokenizer_dir: str | os.PathLike, *, cpu: bool) -> None:
        super().__init__()
        self.index_warning = f"model.safetensors.index.json not found at hf_assets_path: {tokenizer_dir}"
        self.cpu = cpu
        self.steps: dict[int, tuple[str, str]] = {}  # step -> (loss, grad_norm) as logged
        self.gmcn: dict[int, str] = {}  # step -> GMCN of the PC metrics line

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if not isinstance(msg, str):
            return True
        if msg.startswith("initial_load_model_only=True has no effect without"):
            return False
        if msg.startswith(self.index_warning):
            return False
        if self.cpu and msg.startswith(_CPU_PEAK_FLOPS_NOISE):
            return False
        if self.cpu and _formatted(record).startswith(_CPU_NOISE):  # some are format strings ("[GC] %s")
            return False
        if self.cpu and "memory:" in msg and "loss:" in msg:
            record.msg = _MFU_FIELD.sub("", _MEMORY_FIELD.sub("", msg))
        self._observe(record)
        return True

    def _observe(self, record: logging.LogRecord) -> None:
        """Remember the step lines and PC metrics that :meth:`summary` reports."""
        text = _STRIP_ANSI.sub("", _formatted(record))
        if m := _STEP_LINE.search(text):
            self.steps[int(m.group(1))] = (m.group(2), m.group(3))
        elif m := _PC_METRICS.search(text):
            self.gmcn[int(m.group(1))] = m.group(2)

    def summary(self) -> str | None:
        """One line for the end of a run: steps, first and last loss, last grad norm and GMCN (PC runs)."""
        if not self.steps:
            return None
        first, last = min(self.steps), max(self.steps)
        line = (
            f"Run summary: steps {first}-{last}, loss {self.steps[first][0]} at step {first}, "
            f"{self.steps[last][0]} at step {last}, grad_norm {self.steps[last][1]}"
        )
        if self.gmcn:
            g = max(self.gmcn)
            line += f", GMCN {float(self.gmcn[g]):.4g} at step {g} (PC metrics; see docs/torchtitan.md#gmcn)"
        return line


def install_log_filter(*, cpu: bool) -> QuietLogFilter:
    """Add a :class:`QuietLogFilter` to the root logger (torchtitan's) once; returns the one installed.

    A logger-level filter: it survives torchtitan's ``init_logger()``, which replaces the handlers.
    """
    from torchtitan_ext.data import TOKENIZER_DIR

    if cpu:
        import warnings

        for message in _CPU_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
    root = logging.getLogger()
    for f in root.filters:
        if isinstance(f, QuietLogFilter):
            f.cpu = cpu
            return f
    f = QuietLogFilter(TOKENIZER_DIR, cpu=cpu)
    root.addFilter(f)
    # Logger-level filters see only their own logger's records: the PC metrics lines come from this one.
    logging.getLogger("torchtitan_ext.metrics").addFilter(f)
    return f
