import math

from pcopt import demo


def test_demo_runs_all_arms_and_pc_flattens_spectra(capsys):
    results = demo.main(["--steps", "3", "--batch", "2", "--seq", "32"])
    assert [r["arm"] for r in results] == list(demo.ARMS)
    for r in results:
        assert math.isfinite(r["val_loss"]) and r["val_loss"] < math.log(256) + 0.5
    by_arm = {r["arm"]: r for r in results}
    # the PC map lowers the GMCN of the effective weights relative to the same raw initialisation
    assert by_arm["adamw_pc"]["gmcn_start"] < by_arm["adamw"]["gmcn_start"]
    assert by_arm["muon_pc"]["gmcn_start"] < by_arm["muon"]["gmcn_start"]
    out = capsys.readouterr().out
    assert "PC vs baseline" in out and "muon_pc" in out


def test_demo_rejects_unknown_arm(capsys):
    import pytest

    with pytest.raises(SystemExit):
        demo.main(["--arms", "sgd"])
    assert "unknown arm(s) ['sgd']" in capsys.readouterr().err
