"""Which compute dtype is fast here: bfloat16 where the hardware has it, float32 otherwise.

Everything in pcopt that picks a dtype for the user (the demo, the benchmarks' defaults) asks
:func:`preferred_dtype`. The rule, in :func:`has_native_bf16`:

* **CUDA**: bf16 when ``torch.cuda.is_bf16_supported(including_emulation=False)``, i.e. the GPU computes in
  bf16 natively (compute capability 8.0 and later).
* **x86-64 CPU**: bf16 when the CPU reports ``avx512_bf16`` or ``amx_bf16`` (``torch.cpu.get_capabilities()``)
  *and* ATen's kernel level ``torch.backends.cpu.get_cpu_capability()`` is ``"AVX512"`` (not capped to AVX2
  by ``ATEN_CPU_CAPABILITY``). On an AVX2-only CPU bf16 is emulated: a bf16 matrix product is several times
  *slower* than float32 (about 7x on a 2-core AVX2 server, one thread), while on AVX-512 BF16 / AMX it is
  about 2-3x faster.
* **Other CPUs** (ARM, or a torch without ``torch.cpu.get_capabilities``): a measured probe, cached per
  process (:func:`measure_bf16_slowdown`): bf16 counts as native when the CPU reports a bf16 extension (ARM:
  ``bf16``/``sve_bf16``; unknown: assumed possible) and a 256x256 bf16 matrix product is no slower than
  float32.
* **Other devices** (MPS, XPU, ...): no, float32.

:func:`preferred_dtype` is ``torch.bfloat16`` when :func:`has_native_bf16` holds and ``torch.float32``
otherwise. :func:`describe` says in one line what was decided and why (benchmarks record it).

``pcopt.optim.Muon`` keeps ``torch.optim.Muon``'s bf16 Newton-Schulz default so that it stays a bitwise
drop-in; on a CPU without native bf16 its first step warns once per process (:class:`SlowBF16Warning`, from
:func:`warn_slow_newton_schulz`) with the measured slowdown and the switch (``ns_dtype=torch.float32``).
Silence it with ``warnings.filterwarnings("ignore", category=pcopt.hardware.SlowBF16Warning)``.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = [
    "SlowBF16Warning",
    "describe",
    "has_native_bf16",
    "measure_bf16_slowdown",
    "preferred_dtype",
    "warn_slow_newton_schulz",
]

PROBE_SIZE = 256
"""Side of the square matrices of the bf16-vs-fp32 probe (about 1 ms per product on an AVX2 core)."""

_X86 = ("x86_64", "amd64", "x86", "i386", "i686")
_X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_ARM_BF16_FLAGS = ("bf16", "sve_bf16")


class SlowBF16Warning(UserWarning):
    """bf16 was asked for on a CPU that emulates it (several times slower than float32 there)."""


def _device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.get_default_device()
    if isinstance(device, torch.device):
        return device
    if isinstance(device, str):
        try:
            return torch.device(device)
        except RuntimeError as e:
            raise ValueError(
                f"Invalid device {device!r}: {e}. Expected a torch device string such as 'cpu' or 'cuda:0'."
            ) from None
    raise TypeError(
        f"device must be a torch.device, a string such as 'cpu' or 'cuda', or None (torch's default device), "
        f"got {type(device).__name__}."
    )


def _cpu_flags() -> Mapping[str, Any] | None:
    """``torch.cpu.get_capabilities()``, or None where this torch lacks it."""
    get = getattr(torch.cpu, "get_capabilities", None)
    return None if get is None else get()


def _architecture(flags: Mapping[str, Any] | None) -> str:
    arch = flags.get("architecture") if flags else None
    return str(arch or platform.machine()).lower()


@functools.cache
def measure_bf16_slowdown() -> float:
    """Time of a bf16 CPU matrix product over that of the same float32 one (> 1: bf16 is slower).

    Measured once per process (cached) on ``PROBE_SIZE`` x ``PROBE_SIZE`` matrices, with torch's current
    thread count, bf16 and fp32 products alternating and the fastest of 5 of each kept (so that load from
    other processes affects both alike). Takes a few milliseconds; ``measure_bf16_slowdown.cache_clear()``
    measures again.
    """
    g = torch.Generator().manual_seed(0)
    a32 = torch.randn(PROBE_SIZE, PROBE_SIZE, generator=g)
    b32 = torch.randn(PROBE_SIZE, PROBE_SIZE, generator=g)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    for i in range(12):
        for dtype, (a, b) in ((torch.float32, (a32, b32)), (torch.bfloat16, (a16, b16))):
            t0 = time.perf_counter()
            torch.mm(a, b)
            elapsed = time.perf_counter() - t0
            if i >= 2:  # the first two rounds warm up the kernels
                best[dtype] = min(best[dtype], elapsed)
    return best[torch.bfloat16] / max(best[torch.float32], 1e-9)


def _cpu_decision() -> tuple[bool, str]:
    """(native bf16?, why) for this process's CPU."""
    level = torch.backends.cpu.get_cpu_capability()
    flags = _cpu_flags()
    arch = _architecture(flags)
    if flags is not None and arch in _X86:
        have = [f for f in _X86_BF16_FLAGS if flags.get(f, False)]
        if not have:
            return False, f"{arch} CPU, ATen {level}, no avx512_bf16/amx_bf16"
        if level != "AVX512":
            return False, f"{arch} CPU with {'/'.join(have)} but ATen capped at {level}"
        return True, f"{arch} CPU, ATen {level}, {'/'.join(have)}"
    if flags is not None and arch in ("aarch64", "arm64"):
        have = [f for f in _ARM_BF16_FLAGS if flags.get(f, False)]
        if not have:
            return False, f"{arch} CPU, ATen {level}, no bf16 extension"
    else:
        have = []
    ratio = measure_bf16_slowdown()
    ext = "/".join(have) if have else "flags unknown"
    return ratio <= 1.0, f"{arch} CPU, ATen {level}, {ext}, measured bf16/fp32 matmul time {ratio:.2f}"


def has_native_bf16(device: torch.device | str | None = None) -> bool:
    """Whether ``device`` (None: ``torch.get_default_device()``) computes in bf16 at full speed.

    The rule is in the module docstring: CUDA with compute capability >= 8.0; x86-64 CPUs reporting
    ``avx512_bf16``/``amx_bf16`` at ATen level ``"AVX512"``; other CPUs by a measured, cached probe; no other
    device. Raises ``TypeError``/``ValueError`` for something that is not a device.
    """
    dev = _device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if dev.type == "cpu":
        return _cpu_decision()[0]
    return False


def preferred_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """``torch.bfloat16`` where ``device`` has native bf16 (:func:`has_native_bf16`), ``torch.float32`` otherwise.

    Example::

        >>> dtype = pcopt.hardware.preferred_dtype()          # this process's default device (the CPU)
        >>> opt = pcopt.build_optimizer(model, lr=1e-2, ns_dtype=dtype)
        >>> with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16): ...
    """
    return torch.bfloat16 if has_native_bf16(device) else torch.float32


def describe(device: torch.device | str | None = None) -> str:
    """One line naming the device, the chosen dtype and why, e.g. ``cpu: float32 (x86_64 CPU, ATen AVX2, ...)``."""
    dev = _device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"{dev}: float32 (CUDA not available)"
        native = has_native_bf16(dev)
        major, minor = torch.cuda.get_device_capability(dev)
        why = f"{torch.cuda.get_device_name(dev)}, compute capability {major}.{minor}"
    elif dev.type == "cpu":
        native, why = _cpu_decision()
        name = (_cpu_flags() or {}).get("cpu_name") or platform.processor()
        if name:
            why = f"{name}, {why}"
    else:
        native, why = False, "bf16 is only chosen on CUDA and CPUs"
    return f"{dev}: {'bfloat16' if native else 'float32'} ({why})"


_warned_newton_schulz = False


def _is_bf16(dtype: Any) -> bool:
    if isinstance(dtype, str):
        return dtype.lower().removeprefix("torch.") in ("bf16", "bfloat16")
    return dtype == torch.bfloat16


def warn_slow_newton_schulz(param_groups: Iterable[Mapping[str, Any]]) -> None:
    """Warn once per process if a Muon group runs bf16 Newton-Schulz on a CPU without native bf16.

    Called by ``pcopt.optim.Muon`` at its first step. The warning (:class:`SlowBF16Warning`) gives the
    measured slowdown (:func:`measure_bf16_slowdown`) and how to switch to float32. Nothing is measured, and
    nothing warned, where bf16 is native, on CUDA, or for groups with another ``ns_dtype``.
    """
    global _warned_newton_schulz
    if _warned_newton_schulz:
        return
    on_cpu = any(
        _is_bf16(group.get("ns_dtype")) and any(p.device.type == "cpu" for p in group["params"])
        for group in param_groups
    )
    if not on_cpu:
        return
    native, why = _cpu_decision()
    if native:
        return
    _warned_newton_schulz = True
    warnings.warn(
        f"Muon runs Newton-Schulz in bfloat16 (ns_dtype=torch.bfloat16, torch.optim.Muon's default) on a CPU "
        f"without native bf16 ({why}): a bf16 matrix product takes {measure_bf16_slowdown():.1f}x as long as "
        "a float32 one here. Pass ns_dtype=torch.float32 to pcopt.optim.Muon or "
        "pcopt.build_optimizer (or ns_dtype=pcopt.hardware.preferred_dtype()) for the fast path; the "
        "update then differs from the bf16 one only by bf16 rounding.",
        SlowBF16Warning,
        stacklevel=_outside_stacklevel(),
    )


def _outside_stacklevel() -> int:
    """``stacklevel`` of the first caller outside pcopt and torch (the user's ``opt.step()`` line)."""
    inside = (os.path.dirname(__file__), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level
