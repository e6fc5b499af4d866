"""pcopt.hardware: the bf16-or-fp32 decision, with the CPU's capability mocked, and Muon's slow-bf16 warning."""

import math
import warnings

import pytest
import torch
from torch import nn

import pcopt
from pcopt import hardware

AVX2_ONLY = {"architecture": "x86_64", "cpu_name": "test", "avx2": True, "avx512_f": False}
AVX512_NO_BF16 = {"architecture": "x86_64", "avx2": True, "avx512_f": True, "avx512_bf16": False}
AVX512_BF16 = {"architecture": "x86_64", "avx2": True, "avx512_f": True, "avx512_bf16": True}
AMX = {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": False, "amx_bf16": True, "amx_tile": True}


def _cpu(monkeypatch, level: str, flags: dict | None, slowdown: float | None = None):
    """Mock ATen's capability level and the CPU flags; the probe returns ``slowdown`` or must not run."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: level)
    if flags is None:
        monkeypatch.delattr(torch.cpu, "get_capabilities")
    else:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)

    def probe():
        if slowdown is None:
            raise AssertionError("the flags decide here: the probe must not run")
        return slowdown

    monkeypatch.setattr(hardware, "measure_bf16_slowdown", probe)


@pytest.mark.parametrize(
    "level, flags, expected",
    [
        ("AVX2", AVX2_ONLY, torch.float32),
        ("AVX512", AVX512_NO_BF16, torch.float32),  # AVX-512 without its bf16 extension emulates bf16
        ("AVX512", AVX512_BF16, torch.bfloat16),
        ("AVX512", AMX, torch.bfloat16),
        ("AVX2", AVX512_BF16, torch.float32),  # ATen capped at AVX2 (ATEN_CPU_CAPABILITY=avx2)
        ("DEFAULT", {"architecture": "aarch64", "neon": True, "bf16": False}, torch.float32),
    ],
    ids=["avx2", "avx512-no-bf16", "avx512-bf16", "amx", "capped-avx2", "arm-no-bf16"],
)
def test_cpu_decision_from_flags(monkeypatch, level, flags, expected):
    _cpu(monkeypatch, level, flags)
    assert hardware.preferred_dtype("cpu") == expected
    assert hardware.has_native_bf16(torch.device("cpu")) == (expected == torch.bfloat16)
    assert hardware.describe("cpu").startswith(f"cpu: {str(expected).removeprefix('torch.')} (")


@pytest.mark.parametrize(
    "slowdown, expected", [(0.5, torch.bfloat16), (1.0, torch.bfloat16), (6.0, torch.float32)]
)
@pytest.mark.parametrize(
    "flags", [{"architecture": "aarch64", "bf16": True}, None], ids=["arm-bf16", "no-flags"]
)
def test_cpu_decision_by_probe_where_flags_do_not_settle_it(monkeypatch, flags, slowdown, expected):
    _cpu(monkeypatch, "DEFAULT", flags, slowdown=slowdown)
    assert hardware.preferred_dtype("cpu") == expected
    assert f"measured bf16/fp32 matmul time {slowdown:.2f}" in hardware.describe("cpu")


def test_cuda_needs_native_bf16_not_emulation(monkeypatch):
    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return not including_emulation and native

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    native = True
    assert hardware.preferred_dtype("cuda") == torch.bfloat16
    native = False
    assert hardware.preferred_dtype("cuda:0") == torch.float32
    assert calls == [False, False]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.preferred_dtype("cuda") == torch.float32


def test_other_devices_and_the_default_device(monkeypatch):
    _cpu(monkeypatch, "AVX512", AVX512_BF16)
    assert hardware.preferred_dtype("meta") == torch.float32
    assert hardware.preferred_dtype() == torch.bfloat16  # torch's default device: the CPU
    with torch.device("meta"):
        assert hardware.preferred_dtype() == torch.float32


def test_bad_device_arguments():
    with pytest.raises(TypeError, match=r"device must be a torch.device, a string .* got float"):
        hardware.preferred_dtype(1.5)
    with pytest.raises(ValueError, match=r"Invalid device 'gpu0'.*Expected a torch device string"):
        hardware.has_native_bf16("gpu0")


def test_probe_measures_once_per_process():
    hardware.measure_bf16_slowdown.cache_clear()
    ratio = hardware.measure_bf16_slowdown()
    assert math.isfinite(ratio) and ratio > 0
    assert hardware.measure_bf16_slowdown() == ratio
    assert hardware.measure_bf16_slowdown.cache_info().hits == 1


def _muon_steps(n: int = 2, **kw) -> list[warnings.WarningMessage]:
    torch.manual_seed(0)
    lin = nn.Linear(16, 16, bias=False)
    opt = pcopt.optim.Muon(lin.parameters(), lr=0.01, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(n):
            lin(torch.randn(4, 16)).square().sum().backward()
            opt.step()
            opt.zero_grad()
    return [w for w in caught if issubclass(w.category, hardware.SlowBF16Warning)]


def test_muon_warns_once_for_bf16_on_a_cpu_without_it(monkeypatch):
    _cpu(monkeypatch, "AVX2", AVX2_ONLY, slowdown=7.25)
    monkeypatch.setattr(hardware, "_warned_newton_schulz", False)
    assert _muon_steps(ns_dtype=torch.float32) == []  # fp32 is the fast path: nothing to say
    caught = _muon_steps()  # torch.optim.Muon's default, bf16
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "without native bf16 (x86_64 CPU, ATen AVX2, no avx512_bf16/amx_bf16)" in message
    assert "7.2x as long as a float32 one" in message and "ns_dtype=torch.float32" in message
    assert caught[0].filename == __file__  # points at the caller's opt.step(), not into pcopt or torch
    assert _muon_steps(ns_dtype="bf16") == []  # once per process


def test_muon_does_not_warn_where_bf16_is_native(monkeypatch):
    _cpu(monkeypatch, "AVX512", AVX512_BF16)  # the probe must not run either
    monkeypatch.setattr(hardware, "_warned_newton_schulz", False)
    assert _muon_steps() == []
    assert hardware._warned_newton_schulz is False
