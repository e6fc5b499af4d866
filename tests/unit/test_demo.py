import io
import math

import pytest
import torch

from pcopt import demo


def test_demo_runs_all_arms_and_pc_flattens_spectra(capsys):
    results = demo.main(["--steps", "3", "--batch", "2", "--seq", "32", "--timing-rounds", "2"])
    assert [r["arm"] for r in results] == list(demo.ARMS)
    # Every arm learns in 3 steps: an untrained byte model sits near the uniform ln 256 = 5.545 nats per byte
    # (small init logits), and these 3 steps lower it by 0.38 (Muon) to 0.74 (AdamW); an arm whose optimizer
    # does not step, or steps the wrong way, stays above ln 256 - 0.2. Nor can 3 steps beat the validation
    # bytes' unigram entropy (2.99 nats, computed here): a loss below it means targets leaked into inputs.
    val = demo.load_sample_bytes()[int(0.9 * len(demo.load_sample_bytes())) :]
    freq = torch.bincount(val, minlength=256).double() / len(val)
    unigram_entropy = -(freq[freq > 0] * freq[freq > 0].log()).sum().item()
    for r in results:
        assert unigram_entropy < r["val_loss"] < math.log(256) - 0.2, (
            r["arm"],
            r["val_loss"],
            unigram_entropy,
        )
        assert len(r["interleaved_ms"]) == 2 and min(r["interleaved_ms"]) > 0
    by_arm = {r["arm"]: r for r in results}
    # the PC map lowers the GMCN of the effective weights relative to the same raw initialisation
    assert by_arm["adamw_pc"]["gmcn_start"] < by_arm["adamw"]["gmcn_start"]
    assert by_arm["muon_pc"]["gmcn_start"] < by_arm["muon"]["gmcn_start"]
    out = capsys.readouterr().out
    assert "nats per byte" in out and "lower = flatter spectrum" in out
    assert "Muon's Newton-Schulz in " in out and "pcopt.hardware: cpu: " in out
    assert "  muon_pc   [####################] 3/3  loss " in out  # the progress bar with the running loss
    assert "PC vs baseline" in out and "median of 2 interleaved pairs" in out


def test_demo_without_timing_reports_no_step_time_ratio(capsys):
    results = demo.main(
        ["--arms", "adamw,adamw_pc", "--steps", "1", "--batch", "1", "--seq", "16", "--timing-rounds", "0"]
    )
    assert all("step_time_ratio" not in r for r in results)
    assert "step time x" not in capsys.readouterr().out.split("PC vs baseline")[-1]


@pytest.mark.parametrize("native", [torch.bfloat16, torch.float32])
def test_muon_arms_take_the_dtype_the_hardware_helper_prefers(monkeypatch, native):
    monkeypatch.setattr(demo, "preferred_dtype", lambda device=None: native)
    model = demo.TinyLlama(dim=32, n_layers=1, n_heads=2, hidden=64)
    opt = demo.make_arm_optimizer(model, "muon", 1e-2)
    muon = opt.optimizers["muon"]
    assert muon.param_groups and all(g["ns_dtype"] == native for g in muon.param_groups)
    fixed = demo.make_arm_optimizer(model, "muon", 1e-2, ns_dtype=torch.float64)
    assert all(g["ns_dtype"] == torch.float64 for g in fixed.optimizers["muon"].param_groups)
    assert isinstance(demo.make_arm_optimizer(model, "adamw", 1e-3), torch.optim.AdamW)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_in_a_log_and_on_a_terminal():
    log = io.StringIO()
    bar = demo._Progress("muon", 20, stream=log)
    for i in range(20):
        bar.update(i + 1, 5.0 - i / 10)
    bar.close("muon done")
    lines = log.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1] == "muon done"  # one line per 10% in a log, then the summary
    assert lines[0].startswith("  muon      [##..................]  2/20  loss 4.900 ")
    term = _Terminal()
    bar = demo._Progress("muon", 3, stream=term)
    for i in range(3):
        bar.update(i + 1, 1.0)
    bar.close("muon done")
    text = term.getvalue()
    assert text.count("\n") == 1 and text.startswith("\r  muon ") and text.endswith("\r\033[Kmuon done\n")


def test_interleaved_timing_alternates_the_order():
    calls = []

    class _Fake:
        def __init__(self, arm):
            self.arm = arm

        def step(self):
            calls.append(self.arm)

    times = demo.interleaved_step_ms([_Fake("a"), _Fake("b"), _Fake("c")], rounds=3)
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_demo_rejects_unknown_arm(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--arms", "sgd"])
    assert "unknown arm(s) ['sgd']" in capsys.readouterr().err


def test_help_is_plain_text_and_documents_the_size_options(capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert ":func:" not in out and "``" not in out, "Sphinx markup in --help"
    for option in ("--steps", "--seq", "--batch"):
        line = next(x for x in out.splitlines() if x.strip().startswith(option))
        assert len(line.split()) > 2, f"{option} has no help text: {line!r}"
