"""The seeded study harness end to end on a generated corpus: sweeps, seeds, intervals, resume, plots."""

from __future__ import annotations

import json
import math
import random
import re
import shutil

import pytest

pytest.importorskip("torchtitan", reason="the benchmarks build torchtitan's Llama3 model")
pytest.importorskip("tokenizers", reason="the token-efficiency benchmark trains a BPE with tokenizers")

from benchmarks import size_trend, study  # noqa: E402

pytestmark = pytest.mark.slow  # about 15-40 s: 13 tiny training runs

_WORDS = "the a lord said unto him and it was light dark water earth land went came saw good night".split()


def _t975_df2() -> float:
    # Student t with 2 degrees of freedom has the closed-form quantile (2p - 1) / sqrt(2 p (1 - p)).
    p = 0.975
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    rng = random.Random(0)
    data = root / "tiny.jsonl"
    with open(data, "w") as f:
        for i in range(50):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(20, 60))]
            f.write(json.dumps({"id": i, "text": " ".join(words).capitalize() + "."}) + "\n")
    out = root / "out"
    argv = ["--grid", "smoke", "--data", str(data), "--out", str(out), "--no-progress", "--threads", "1"]
    summary = study.main(argv)
    return {"argv": argv, "out": out, "data": data, "summary": summary}


def _interpolated_tokens(curve, target):
    # Independent first-crossing search with linear interpolation between evaluations.
    for i, (t, loss) in enumerate(zip(curve["tokens"], curve["val_loss"])):
        if loss <= target:
            if i == 0:
                return t
            t0, l0 = curve["tokens"][i - 1], curve["val_loss"][i - 1]
            return t0 + (t - t0) * (l0 - target) / (l0 - loss)
    return None


def test_t_quantile_matches_closed_forms():
    assert study.t_quantile(0.975, 2) == pytest.approx(_t975_df2(), rel=1e-5)
    assert study.t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-4)  # Cauchy
    assert study.t_quantile(0.5, 5) == 0.0
    with pytest.raises(ValueError, match=r"0.5 <= p < 1 and df >= 1, got p=1.2"):
        study.t_quantile(1.2, 3)


def test_summary_structure_and_intervals_from_seeds(smoke):
    out = smoke["out"]
    on_disk = json.loads((out / "smoke" / "summary.json").read_text())
    assert on_disk["complete"] is True and on_disk["seeds"] == [0, 1, 2]
    assert set(on_disk["arms"]) == {"muon", "muon_pc", "muon_pc:merge50"}
    assert set(on_disk["best_vs_best"]) == set(on_disk["same_lr"]) == {"muon_pc", "muon_pc:merge50"}
    t = _t975_df2()
    for spec, arm in on_disk["arms"].items():
        best = arm["best_lr"]
        files = arm["runs"][f"{best:g}"]
        assert sorted(files) == ["0", "1", "2"], spec
        finals = [json.loads(open(files[s]).read())["final_val_loss"] for s in ("0", "1", "2")]
        seeds_cfg = [json.loads(open(files[s]).read())["config"]["seed"] for s in ("0", "1", "2")]
        assert seeds_cfg == [0, 1, 2]
        st = arm["final_val_loss"]
        assert st["values"] == finals and st["n"] == 3
        mean = sum(finals) / 3
        sd = math.sqrt(sum((x - mean) ** 2 for x in finals) / 2)
        assert st["mean"] == pytest.approx(mean, rel=1e-12) and st["sd"] == pytest.approx(sd, rel=1e-12)
        assert st["ci95"] == pytest.approx(
            [mean - t * sd / math.sqrt(3), mean + t * sd / math.sqrt(3)], rel=1e-5
        )
        assert len(set(finals)) == 3, "seeds must give different runs"
    # The swept arms: the grid was extended once at its upper edge (max_extend=1) by a factor sqrt(2).
    sweep = on_disk["arms"]["muon"]["lr_sweep"]
    lrs = [r["lr"] for r in sweep]
    assert lrs[:2] == [1e-2, 2e-2] and all(r["seed"] == 0 for r in sweep)
    best = min(sweep, key=lambda r: r["final_val_loss"])
    assert on_disk["arms"]["muon"]["best_lr"] == best["lr"]
    assert on_disk["arms"]["muon"]["best_lr_interior"] == (lrs[0] < best["lr"] < lrs[-1])
    if len(lrs) == 3:
        assert lrs[2] == pytest.approx(2e-2 * math.sqrt(2), rel=0.02) or lrs[2] == pytest.approx(
            1e-2 / math.sqrt(2), rel=0.02
        )
    assert on_disk["arms"]["muon_pc:merge50"]["best_lr"] == on_disk["arms"]["muon"]["best_lr"]


def test_token_ratio_paired_by_seed(smoke):
    on_disk = json.loads((smoke["out"] / "smoke" / "summary.json").read_text())
    cmp = on_disk["best_vs_best"]["muon_pc"]
    base = on_disk["arms"]["muon"]["runs"][f"{cmp['baseline_lr']:g}"]
    pc = on_disk["arms"]["muon_pc"]["runs"][f"{cmp['lr']:g}"]
    ratios = []
    for s in ("0", "1", "2"):
        b, p = json.loads(open(base[s]).read()), json.loads(open(pc[s]).read())
        target = max(b["final_val_loss"], p["final_val_loss"])
        ratios.append(_interpolated_tokens(b["curve"], target) / _interpolated_tokens(p["curve"], target))
        diff = p["final_val_loss"] - b["final_val_loss"]
        assert cmp["delta_final_val_loss"]["values"][int(s)] == pytest.approx(diff, rel=1e-12)
    assert cmp["token_ratio"]["values"] == pytest.approx(ratios, rel=1e-9)
    mean = sum(ratios) / 3
    sd = math.sqrt(sum((r - mean) ** 2 for r in ratios) / 2)
    half = _t975_df2() * sd / math.sqrt(3)
    assert cmp["token_ratio"]["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-5)
    ttt = cmp["tokens_to_target"]
    assert len(ttt["target"]) == len(ttt["mean"]) == len(ttt["ci95"]) and len(ttt["per_seed"]) == 3
    assert ttt["target"] == sorted(ttt["target"], reverse=True)  # from early (high) to late (low) targets


def test_resume_reuses_runs_and_budget_stops(smoke, tmp_path):
    again = study.main(smoke["argv"])
    assert again["new_runs_trained"] == 0 and again["complete"] is True
    assert again["arms"]["muon_pc"]["final_val_loss"] == smoke["summary"]["arms"]["muon_pc"]["final_val_loss"]
    partial = study.main(
        [
            "--grid",
            "smoke",
            "--data",
            str(smoke["data"]),
            "--out",
            str(tmp_path),
            "--max-runs",
            "0",
            "--no-progress",
            "--no-plots",
        ]  # fmt: skip
    )
    assert partial["complete"] is False and partial["new_runs_trained"] == 0
    assert json.loads((tmp_path / "smoke" / "summary.json").read_text())["complete"] is False


def test_arms_restricts_the_grid_and_keeps_the_lr_source(smoke, tmp_path, capsys):
    """``--arms`` trains only the named arms (plus the arm an lr is borrowed from), so that two processes can share
    a grid's cache; the smoke cache already holds them, so nothing is trained and the restricted summary is whole."""
    shutil.copytree(smoke["out"] / "tiny", tmp_path / "tiny")  # the cache, not the smoke grid's summary
    argv = [*smoke["argv"], "--out", str(tmp_path), "--no-plots", "--max-runs", "0"]  # the last --out wins
    part = study.main([*argv, "--arms", "muon_pc:merge50"])
    assert sorted(part["arms"]) == ["muon", "muon_pc:merge50"]
    assert part["complete"] is True and part["new_runs_trained"] == 0
    assert part["arms"]["muon"]["final_val_loss"] == smoke["summary"]["arms"]["muon"]["final_val_loss"]
    for bad, why in (("muon,adamw", r"got 'muon,adamw' \(not in the grid: adamw\)"), (" , ", r"got ' , '\n")):
        with pytest.raises(SystemExit):
            study.main([*argv, "--arms", bad])
        assert re.search(r"--arms: expected comma-separated arms of grid 'smoke' \(muon, muon_pc, muon_pc:merge50\), "
                         + why, capsys.readouterr().err)  # fmt: skip


def test_kept_records_from_another_checkout_are_reused_and_saved(smoke, tmp_path, monkeypatch):
    """A fresh checkout has no run cache: the records kept in the repository (``--save-records``) stand in for it,
    matched by the corpus's content even though they were made from another path."""
    records = tmp_path / "records"
    monkeypatch.setattr(study, "RECORDS", records)
    argv = [*smoke["argv"], "--save-records", "--no-plots"]
    saved = study.main(argv)  # the smoke cache: nothing trained, every run copied
    kept = sorted((records / "tiny" / "runs").glob("*.json"))
    assert saved["new_runs_trained"] == 0 and len(kept) == sum(
        1 for _ in (smoke["out"] / "tiny" / "runs").glob("*.json")
    )
    moved = tmp_path / "elsewhere" / "tiny.jsonl"  # same corpus, another checkout's path
    moved.parent.mkdir()
    moved.write_bytes(smoke["data"].read_bytes())
    fresh = ["--grid", "smoke", "--data", str(moved), "--out", str(tmp_path / "fresh_out"), "--no-progress",
             "--threads", "1", "--no-plots", "--max-runs", "0"]  # fmt: skip
    again = study.main(fresh)
    assert again["complete"] is True and again["new_runs_trained"] == 0
    assert again["arms"]["muon_pc"]["final_val_loss"] == smoke["summary"]["arms"]["muon_pc"]["final_val_loss"]
    other = tmp_path / "other" / "tiny.jsonl"  # another corpus under the same name: not reused
    other.parent.mkdir()
    other.write_text(smoke["data"].read_text().replace("lord", "king"))
    assert study.main([*fresh[:3], str(other), *fresh[4:]])["complete"] is False


def test_plots_written(smoke):
    for kind in ("loss", "tokens_to_target", "lr", "gmcn"):
        assert (smoke["out"] / "smoke" / f"study_smoke_{kind}.png").stat().st_size > 1000, kind
    tables = (smoke["out"] / "smoke" / "tables.md").read_text()
    mean = smoke["summary"]["best_vs_best"]["muon_pc"]["token_ratio"]["mean"]
    assert "best lr vs best lr" in tables and f"| {mean:.3f} [" in tables


def test_bad_grid_and_seeds_are_rejected(capsys):
    with pytest.raises(SystemExit):
        study.main(["--grid", "nope"])
    assert "--grid: expected one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--grid", "smoke", "--data", "missing.jsonl"])
    assert "--data: no file at 'missing.jsonl'" in capsys.readouterr().err


def test_size_trend_rows_are_the_grids_comparisons(smoke, tmp_path):
    """The size trend's row for a comparison is the grid's best-vs-best entry; its seed-0 ratio recomputed here from
    the two seed-0 records; an arm whose runs are missing is a 'not run' row, not dropped."""
    shutil.copytree(smoke["out"] / "tiny", tmp_path / "tiny")
    extra = ("--data", str(smoke["data"]))
    (row,) = size_trend.trend((("smoke",),), ("muon_pc",), out=str(tmp_path), extra_argv=extra)
    cmp = smoke["summary"]["best_vs_best"]["muon_pc"]
    assert row["token_ratio"]["mean"] == cmp["token_ratio"]["mean"] and row["seeds"] == cmp["seeds"]
    arms = smoke["summary"]["arms"]
    base, pc = (
        json.loads(open(arms[a]["runs"][f"{arms[a]['best_lr']:g}"]["0"]).read()) for a in ("muon", "muon_pc")
    )
    target = max(base["final_val_loss"], pc["final_val_loss"])
    expected = _interpolated_tokens(base["curve"], target) / _interpolated_tokens(pc["curve"], target)
    assert row["seed0_token_ratio"] == pytest.approx(expected, rel=1e-12)
    assert row["seed0_delta"] == pytest.approx(pc["final_val_loss"] - base["final_val_loss"], abs=1e-12)
    assert row["params"] == base["params"] > 0
    assert f"| muon_pc vs muon | {base['params'] / 1e6:.1f}M | `smoke` |" in size_trend.markdown([row])
    empty = size_trend.trend((("smoke",),), ("muon_pc",), out=str(tmp_path / "empty"), extra_argv=extra)
    assert empty == [{"comparison": "muon_pc", "spec": "muon_pc", "grid": "smoke", "missing": True}]
    assert "| muon_pc | | `smoke` | | not run | not run |" in size_trend.markdown(empty)
