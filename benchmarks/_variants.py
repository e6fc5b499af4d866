"""Named variants of the token-efficiency arms (PC placement, degree, gamma handling, PC-then-merge, Muon lr rule).

A variant changes how one arm of :mod:`benchmarks.token_efficiency` is set up, never the default arms. It is
selected with ``--variant NAME`` (or the ``arm:NAME`` arm specs of :mod:`benchmarks.study`) and takes part in
the run's cache key, so variant runs never collide with default runs. Names:

* ``deg3``, ``deg5``, ``deg7``, ``deg9``: the PC polynomial of that degree instead of the recipe's.
* ``ffn``, ``wo``: PC on the FFN matrices only / on the attention output only.
* ``gamma_frozen``: gamma fixed at 1 (``learn_gamma=False``).
* ``gamma_nowd``: gamma learned without weight decay (Muon: ``gamma_weight_decay=0``).
* ``mergeK`` (``merge0`` ... ``merge100``): PC for the first K% of the steps, then :func:`pcopt.merge` and plain
  training of the merged weights by the same optimizer (the raw parameters are kept, so is their optimizer
  state). ``merge0`` merges before the first step: plain training from the PC-flattened initialisation
  ``sigma p(W0 / sigma)``. To first order in the lr this is what a Muon that orthogonalizes in ``W_eff``
  space and pulls the update back through the inverse PC Jacobian would do (see docs/study.md).
* ``adjust_original``: Muon's ``adjust_lr_fn="original"`` (``sqrt(max(1, A/B))``) instead of
  ``match_rms_adamw`` (``0.2 sqrt(max(A, B))``); the AdamW part keeps the arm's lr divided by
  :data:`ADJUST_ORIGINAL_LR_FACTOR`, so the ``--lr-muon`` of this variant is the Muon lr.

Variants may be combined with ``+`` (``deg3+gamma_nowd``); later parts override earlier ones where both set the
same thing.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import torch
from torch import nn

import pcopt
from benchmarks import _common as C
from pcopt import recipes

__all__ = ["ADJUST_ORIGINAL_LR_FACTOR", "Variant", "names", "resolve"]

# match_rms_adamw scales the lr of a (192, 512) matrix by 0.2 * sqrt(512) = 4.5 and "original" by 1-2.7: with
# "original" the Muon lr has to be about this much larger for the same update size.
ADJUST_ORIGINAL_LR_FACTOR = 4.0

FFN_TARGETS = r"(^|\.)feed_forward\.w[123]$"
WO_TARGETS = r"(^|\.)attention\.wo$"


@dataclasses.dataclass
class Variant:
    """What a variant changes; ``None`` fields keep the arm's default."""

    name: str
    degree: int | None = None
    targets: str | None = None
    learn_gamma: bool | None = None
    gamma_weight_decay: float | None = None
    merge_fraction: float | None = None
    adjust_lr_fn: str | None = None
    describe: list[str] = dataclasses.field(default_factory=list)

    # -- hooks called by benchmarks.token_efficiency.train_arm ---------------------------------------------
    def pc_degree(self, optimizer: str) -> int:
        return self.degree or C.PC_DEGREE[optimizer]

    def precondition(self, model: nn.Module, optimizer: str) -> list[str]:
        return pcopt.precondition_model(
            model, targets=self.targets, degree=self.pc_degree(optimizer), learn_gamma=self.learn_gamma
        )

    def build_optimizers(
        self, model: nn.Module, optimizer: str, lr: float
    ) -> tuple[list[torch.optim.Optimizer], bool]:
        if optimizer == "muon" and (self.gamma_weight_decay is not None or self.adjust_lr_fn is not None):
            import pcopt.optim

            kwargs = {}
            if self.gamma_weight_decay is not None:
                kwargs["gamma_weight_decay"] = self.gamma_weight_decay
            if self.adjust_lr_fn is not None:
                kwargs["adjust_lr_fn"] = self.adjust_lr_fn
                kwargs["adamw_lr"] = lr / ADJUST_ORIGINAL_LR_FACTOR
            return [pcopt.optim.build_optimizer(model, lr=lr, **kwargs)], True
        if optimizer == "adamw" and self.gamma_weight_decay is not None:
            import pcopt.optim

            gammas = [p for n, p in model.named_parameters() if n.endswith("gamma") and p.requires_grad]
            ids = {id(p) for p in gammas}
            rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
            groups = [{"params": rest}] + (
                [{"params": gammas, "weight_decay": self.gamma_weight_decay}] if gammas else []
            )
            opt = torch.optim.AdamW(groups, lr=lr, **dict(recipes.ADAMW))
            if pcopt.preconditioners(model):
                pcopt.PCState(model).attach(opt)
            return [opt], True
        return C.build_optimizers(model, optimizer, lr)

    def merge_step(self, steps: int) -> int | None:
        """The step (0-based, before it runs) at which the PC layers are merged, or None."""
        if self.merge_fraction is None:
            return None
        return round(self.merge_fraction * steps)

    def before_step(self, model: nn.Module, step: int, steps: int) -> bool:
        """Called before each step; merges at :meth:`merge_step`. Returns whether PC is still active."""
        at = self.merge_step(steps)
        if at is not None and step == at and pcopt.preconditioners(model):
            pcopt.merge(model)
        return bool(pcopt.preconditioners(model))


def _parse_one(part: str) -> Callable[[Variant], None]:
    if m := re.fullmatch(r"deg([3579])", part):
        degree = int(m.group(1))
        return lambda v: (setattr(v, "degree", degree), v.describe.append(f"PC degree {degree}"))
    if m := re.fullmatch(r"merge(\d{1,3})", part):
        k = int(m.group(1))
        if k > 100:
            raise ValueError(f"variant {part!r}: K must be 0..100 (percent of the steps), got {k}.")
        return lambda v: (
            setattr(v, "merge_fraction", k / 100),
            v.describe.append(f"PC for the first {k}% of the steps, then merged"),
        )
    simple = {
        "ffn": ("targets", FFN_TARGETS, "PC on FFN matrices only"),
        "wo": ("targets", WO_TARGETS, "PC on attention output only"),
        "gamma_frozen": ("learn_gamma", False, "gamma frozen at 1"),
        "gamma_nowd": ("gamma_weight_decay", 0.0, "gamma without weight decay"),
        "adjust_original": ("adjust_lr_fn", "original", "Muon adjust_lr_fn='original'"),
    }
    if part in simple:
        field, value, text = simple[part]
        return lambda v: (setattr(v, field, value), v.describe.append(text))
    raise ValueError(
        f"unknown variant {part!r}; expected one of {', '.join(names())} (combine with '+', e.g. 'deg3+gamma_nowd')."
    )


def names() -> list[str]:
    """The variant names (``mergeK`` stands for merge0 ... merge100)."""
    return [
        "deg3",
        "deg5",
        "deg7",
        "deg9",
        "ffn",
        "wo",
        "gamma_frozen",
        "gamma_nowd",
        "mergeK",
        "adjust_original",
    ]


def resolve(name: str | None) -> Variant | None:
    """The :class:`Variant` named ``name`` (``None`` or ``""``: no variant)."""
    if not name:
        return None
    if not isinstance(name, str):
        raise TypeError(f"variant must be a string such as 'deg3' or 'merge25', got {type(name).__name__}.")
    v = Variant(name)
    for part in name.split("+"):
        _parse_one(part.strip())(v)
    return v
