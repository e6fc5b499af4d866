"""Tests that kill the surviving mutants of pcopt/spectral_clip.py (benchmarks/mutation.py, docs/reliability.md).

References: an independent float64 run of the scalar recursion, and FLOP counts by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

import pcopt
from pcopt.spectral_clip import auto_clip_steps, spectral_clip_flops


def _steps_by_hand(a_max: float, eps: float) -> int:
    """x_0 = 1 / a, x <- x (3 - x)^2 / 4 until 1 - sqrt(x) <= eps; at least one step."""
    xs = [1.0 / a_max]
    while len(xs) == 1 or 1.0 - math.sqrt(xs[-1]) > eps:
        xs.append(xs[-1] * (3.0 - xs[-1]) ** 2 / 4.0)
    return len(xs) - 1


def test_auto_steps_match_a_float64_recursion():
    assert auto_clip_steps(1.0, torch.float32) == 1  # already converged: one step
    for a in (1.5, 10.0, 1 + 100.0**2, 1e6):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            assert auto_clip_steps(a, dtype) == _steps_by_hand(a, torch.finfo(dtype).eps), (a, dtype)


@pytest.mark.parametrize("shape", [(3, 0), (0, 3), (2, 3, 0)])
def test_empty_matrices_come_back_unchanged(shape):
    X = torch.zeros(shape)
    out = pcopt.spectral_clip(X, 1.0)
    assert out.shape == X.shape and out is not X


def test_vector_flops():
    # ||g||: n multiply-adds (2n FLOPs), then one multiply per element: 3n.
    assert spectral_clip_flops((10,)) == 30
    assert spectral_clip_flops((4, 5)) == 4 * 16 * 5 + (6 * 10 - 4) * 64
