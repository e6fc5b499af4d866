"""``torchtitan_ext.benchmark``: the pure parts on synthetic numbers, and one tiny real benchmark.

The synthetic tests check closed-form values (medians, ranges and quartiles of known lists, the rotation of
3 arms over 3 rounds) and run no torchrun. The real run is 2 rounds of ``debug_muon`` vs ``debug_muon_pc``
(4 steps, seq 64, local batch 1, gradient accumulation 2) on 2 gloo ranks: 4 launches, about 70 s on an idle
2-core machine (longer while other jobs share it).
"""

from __future__ import annotations

import math
import re

import pytest

from torchtitan_ext import benchmark
from torchtitan_ext.benchmark import Row, format_table, rotation, schedule, steady_tps, summarize

pytestmark = [pytest.mark.torchtitan, pytest.mark.slow]


def test_rotation_of_three_arms_over_three_rounds():
    assert schedule(["B", "C1", "C2"], 3) == [["B", "C1", "C2"], ["C1", "C2", "B"], ["C2", "B", "C1"]]
    assert rotation(["B", "C1"], 3) == ["C1", "B"]
    # every arm takes every position once in len(arms) rounds
    for position in range(3):
        assert sorted(order[position] for order in schedule(["B", "C1", "C2"], 3)) == ["B", "C1", "C2"]


def test_steady_tps_is_the_median_after_warmup():
    assert steady_tps({1: 5.0, 2: 100.0, 3: 300.0, 4: 200.0, 5: 1000.0}, warmup=1) == 250.0
    assert steady_tps({1: 5.0, 2: 100.0, 3: 300.0, 4: 200.0}, warmup=1) == 200.0
    with pytest.raises(ValueError, match="warm-up"):
        steady_tps({1: 5.0, 2: 100.0}, warmup=2)


def test_summarize_pairs_ratios_within_rounds():
    tps = {
        "B": [100.0, 200.0, 100.0, 50.0, 100.0],
        "C": [80.0, 180.0, 70.0, 45.0, 95.0],  # ratios 0.8, 0.9, 0.7, 0.9, 0.95
        "D": [100.0, 100.0, 100.0, 100.0, 100.0],  # ratios 1, 0.5, 1, 2, 1
    }
    loss1 = {"B": [8.0, 8.0, 8.2, 8.0, 8.0], "C": [7.9] * 5, "D": [8.1] * 5}
    base, c, d = summarize(tps, "B", loss1)
    assert [r.arm for r in (base, c, d)] == ["B", "C", "D"]
    assert base.baseline and not c.baseline
    assert base.ratios == (1.0,) * 5 and base.ratio_median == 1.0
    assert base.tps_median == 100.0 and c.tps_median == 80.0 and d.tps_median == 100.0
    assert base.loss1 == 8.0 and c.loss1 == 7.9
    assert c.ratios == pytest.approx((0.8, 0.9, 0.7, 0.9, 0.95))
    assert c.ratio_median == pytest.approx(0.9)
    assert (c.ratio_min, c.ratio_max) == pytest.approx((0.7, 0.95))
    # sorted 0.7 0.8 0.9 0.9 0.95: Q1 = x[1], Q3 = x[3] with linear interpolation at (n-1)/4 = 1 and 3
    assert c.ratio_iqr == pytest.approx((0.8, 0.9))
    # the pairing matters: median(D) / median(B) is 1, the median of the paired ratios is also 1, but the
    # spread shows the rounds disagree
    assert d.ratios == pytest.approx((1.0, 0.5, 1.0, 2.0, 1.0))
    assert d.ratio_median == 1.0 and (d.ratio_min, d.ratio_max) == (0.5, 2.0)
    assert d.ratio_iqr == pytest.approx((1.0, 1.0))


def test_summarize_iqr_interpolates_and_needs_four_rounds():
    # ratios 1, 2, 3, 4: positions 0.75 and 2.25 -> Q1 1.75, Q3 3.25; median 2.5
    (_, c) = summarize({"B": [10.0] * 4, "C": [10.0, 20.0, 30.0, 40.0]}, "B")
    assert c.ratio_median == 2.5 and c.ratio_iqr == pytest.approx((1.75, 3.25))
    assert c.loss1 is None
    (_, c3) = summarize({"B": [10.0] * 3, "C": [10.0, 20.0, 30.0]}, "B")
    assert c3.ratio_iqr is None and c3.ratio_median == 2.0 and (c3.ratio_min, c3.ratio_max) == (1.0, 3.0)


def test_summarize_rejects_bad_input():
    with pytest.raises(ValueError, match="rounds"):
        summarize({"B": [1.0, 2.0], "C": [1.0]}, "B")
    with pytest.raises(ValueError, match="positive"):
        summarize({"B": [1.0, 0.0], "C": [1.0, 1.0]}, "B")
    with pytest.raises(ValueError, match="baseline"):
        summarize({"C": [1.0]}, "B")


def test_format_table_has_a_row_per_arm():
    rows = summarize({"B": [100.0] * 4, "C": [80.0, 90.0, 70.0, 100.0]}, "B")
    table = format_table(rows).splitlines()
    assert table[0].startswith("| run |") and "ratio to `B`" in table[0]
    assert table[2].startswith("| `B` (baseline) | 100.0 | 1 |")
    assert (
        table[3] == "| `C` | 85.0 | **0.850** | 0.700-1.000 | 0.775-0.925 | 0.800, 0.900, 0.700, 1.000 | - |"
    )


def test_accumulation_and_global_batch_flag_are_exclusive():
    pytest.importorskip("torchtitan")
    with pytest.raises(ValueError, match="not both"):
        benchmark.accumulation_flags(
            "torchtitan_ext", ["debug_muon"], 2, ["--training.global_batch_size", "8"], 2
        )


def test_tiny_real_benchmark(capsys):
    """2 rounds of debug_muon vs debug_muon_pc, 4 steps, small shapes, accumulation 2: the table and the ratios."""
    pytest.importorskip("torchtitan")
    rows = benchmark.main(
        "--baseline debug_muon --candidates debug_muon_pc --repeats 2 --steps 4 --warmup 1 --nproc 2 "
        "--accumulation 2 --timeout 120 -- --training.seq_len 64 --training.local_batch_size 1".split()
    )
    out = capsys.readouterr().out
    assert [r.arm for r in rows] == ["debug_muon", "debug_muon_pc"]
    # rotation: round 0 baseline first, round 1 candidate first
    runs = re.findall(r"^round (\d) +(\S+):", out, flags=re.M)
    assert runs == [("0", "debug_muon"), ("0", "debug_muon_pc"), ("1", "debug_muon_pc"), ("1", "debug_muon")]
    assert "gradient accumulation debug_muon 2, debug_muon_pc 2" in out
    cand = rows[1]
    assert len(cand.ratios) == 2 and all(math.isfinite(x) and x > 0 for x in cand.ratios)
    assert math.isfinite(cand.ratio_median) and cand.ratio_median > 0 and cand.ratio_iqr is None
    assert all(r.loss1 is not None and math.isfinite(r.loss1) for r in rows)
    table = out[out.index("| run |") :].splitlines()
    assert table[2].startswith("| `debug_muon` (baseline) |")
    assert table[3].startswith("| `debug_muon_pc` |")
    assert isinstance(cand, Row)
