"""The paper's training recipe (Wang et al., 2026), as constants that the demo, benchmarks and configs share.

* PC degree 9 with AdamW and 5 with Muon, on the attention output and FFN matrices.
* AdamW: betas (0.9, 0.95), eps 1e-8, decoupled weight decay 0.1 on every parameter (gamma included).
* Muon on the hidden matrices: momentum 0.95 with Nesterov, 5 Newton-Schulz steps with Keller Jordan's
  coefficients, the "moonlight" lr scale ``0.2 sqrt(max(A, B))`` (``match_rms_adamw``), weight decay 0.1; the
  rest (embeddings, LM head, norms, gamma) on AdamW with the same peak lr.
* Gradient clipping at norm 1.0; linear warmup over 1% of the steps, then cosine decay to 10% of the peak.
"""

from __future__ import annotations

import math
from types import MappingProxyType

from pcopt.optim._newton_schulz import KELLER_COEFFICIENTS

__all__ = [
    "ADAMW",
    "FINAL_LR_RATIO",
    "GRAD_CLIP",
    "MUON",
    "PC_DEGREE",
    "WARMUP_FRACTION",
    "WEIGHT_DECAY",
    "lr_factor",
    "pc_degree",
]

PC_DEGREE = MappingProxyType({"adamw": 9, "muon": 5})
WEIGHT_DECAY = 0.1
ADAMW = MappingProxyType({"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": WEIGHT_DECAY})
MUON = MappingProxyType(
    {
        "momentum": 0.95,
        "nesterov": True,
        "ns_coefficients": KELLER_COEFFICIENTS,
        "ns_steps": 5,
        "adjust_lr_fn": "match_rms_adamw",
        "weight_decay": WEIGHT_DECAY,
    }
)
GRAD_CLIP = 1.0
WARMUP_FRACTION = 0.01
FINAL_LR_RATIO = 0.1


def pc_degree(optimizer: str) -> int:
    """The paper's PC polynomial degree for ``optimizer`` ("adamw": 9, "muon": 5)."""
    try:
        return PC_DEGREE[optimizer]
    except KeyError:
        raise ValueError(f"optimizer must be one of {sorted(PC_DEGREE)}, got {optimizer!r}.") from None


def lr_factor(
    step: int,
    total_steps: int,
    warmup_fraction: float = WARMUP_FRACTION,
    final_ratio: float = FINAL_LR_RATIO,
) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warmup, then cosine to ``final_ratio``."""
    warmup = max(1, round(warmup_fraction * total_steps))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
