"""tools/mutation.py: the mutants it generates, and a planted operator flip that the tests must kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tools import mutation

ROOT = Path(__file__).resolve().parents[2]

_SOURCE = """\
__all__ = ["f"]


def f(x: int = 3, y: float = 0.5) -> bool:
    if x < 2 and y == 0.5:
        raise ValueError(f"bad {x + 1}")
    x += 2 ** 3
    return (x * y) is True
"""


def _mutated_lines(source: str) -> set[tuple[int, str]]:
    return {(m.line, m.lines(source)[1]) for m in mutation.generate(source)}


def test_each_mutant_changes_one_token_and_skips_annotations_messages_and_all():
    got = _mutated_lines(_SOURCE)
    expected = {
        (4, "def f(x: int = 4, y: float = 0.5) -> bool:"),
        (4, "def f(x: int = 3, y: float = 0.505) -> bool:"),
        (5, "if x <= 2 and y == 0.5:"),
        (5, "if x < 3 and y == 0.5:"),
        (5, "if x < 2 or y == 0.5:"),
        (5, "if x < 2 and y != 0.5:"),
        (5, "if x < 2 and y == 0.505:"),
        (7, "x -= 2 ** 3"),
        (7, "x += 2 * 3"),
        (7, "x += 3 ** 3"),
        (7, "x += 2 ** 4"),
        (8, "return (x / y) is True"),
        (8, "return (x * y) is not True"),
        (8, "return (x * y) is False"),
    }
    # Line 1 (__all__) and line 6 (the raise and its f-string) are messages and names, not maths.
    assert got == expected


def test_function_filter_and_deterministic_sample():
    src = "def a(x):\n    return x + 1\n\n\ndef b(x):\n    return x - 1\n"
    assert {m.function for m in mutation.generate(src, functions="b")} == {"b"}
    many = mutation.generate((ROOT / "pcopt" / "polynomials.py").read_text())
    first, again = mutation.sample(many, 5, seed=3), mutation.sample(many, 5, seed=3)
    assert first == again and len(first) == 5
    assert [m.index for m in first] == sorted(m.index for m in first)


def test_smoke_kills_the_planted_operator_flip(tmp_path):
    # In its own process: the runner forks children that import the mutated copy of pcopt, never this one.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tools.mutation", "--smoke", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "pcopt_polynomials.json").read_text())
    planted = next(r for r in summary["results"] if r["index"] == summary["planted"])
    assert planted["before"] == "acc = acc * x2 + a"
    assert planted["after"] == mutation.SMOKE_PLANTED
    assert planted["status"] == "killed" and planted["exit_code"] == 1  # a failing test, not an import error
    assert summary["mutants"] == 3
    assert summary["killed"] + summary["survived"] == 3
