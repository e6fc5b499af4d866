"""The once-per-step containers: :class:`PCSlot` and :class:`PCHolder`, in place of parametrize's machinery.

In the per-forward strategy ``torch.nn.utils.parametrize`` holds a weight's raw ``W`` and its
:class:`pcopt.PolynomialPC` in a ``ParametrizationList`` under ``module.parametrizations``. The once-per-step
strategy (:mod:`pcopt.strategy`) swaps that for these two: the same names, hence the same checkpoint keys,
while ``module.<name>`` becomes an ordinary parameter holding ``W_eff``. They hold state; the map is
:mod:`pcopt.layer`'s and its batched form :mod:`pcopt.kernel`'s.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pcopt.layer import PolynomialPC

__all__ = ["PCHolder", "PCSlot"]


class PCSlot(nn.Module):
    """Once-per-step strategy: holds a PC weight's raw ``W`` (``original``) and its :class:`PolynomialPC` (``0``).

    The same names as torch's ``ParametrizationList``, so the state_dict keys are those of the per-forward
    strategy. The ``W_eff`` parameter (``module.<name>``) and how this rank's shard sits in the full matrix
    are plain attributes set by :mod:`pcopt.strategy`; it is state, not a layer (no forward).
    """

    strategy = "once_per_step"  # read by PolynomialPC.strategy

    def __init__(self, original: nn.Parameter, pc: PolynomialPC) -> None:
        super().__init__()
        self.original = original
        self.add_module("0", pc)
        pc.bind(self)
        self.__dict__["owner"] = None  # the module whose parameter holds W_eff (set by pcopt.strategy)
        self.name = "weight"
        self.dim = 0  # tensor dim along which the oriented matrix's rows run (the sharded / larger one)
        self.mesh = None
        self.mesh_dims: tuple[int, ...] = ()  # mesh dims that shard `dim`
        self.index: Tensor | None = None  # this rank's indices along `dim` (None: all), on the state's device
        self.experts: Tensor | None = None  # a sharded (E, m, n) stack: this rank's experts (None: all)
        self.compute_dtype: torch.dtype | None = None  # of the map; None: bf16 on CUDA, else fp32 (map_dtype)
        self.placements: tuple | None = None  # of W_eff and raw when bound (None: plain tensors)
        self.stamp: tuple[int, ...] | None = None  # versions of raw, gamma, u, v when W_eff was written
        self.temporary = False  # inside PCState.accumulate(): switched back to per-forward on exit

    def __getitem__(self, i: int) -> PolynomialPC:
        if i != 0:
            raise IndexError(f"PCSlot holds one PolynomialPC at index 0, got index {i}.")
        return self._modules["0"]

    def __len__(self) -> int:
        return 1

    @property
    def effective(self) -> nn.Parameter:
        """The ``W_eff`` parameter the module's forward uses (FSDP2 manages it like any weight)."""
        return self.owner._parameters[self.name]

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            "PCSlot holds the PC state of a weight (raw weight, gamma, u, v); it has no forward. The module's "
            "forward uses <module>.weight, the effective weight the model's pcopt.PCState writes after each step."
        )


class PCHolder(nn.Module):
    """Once-per-step strategy: ``module.parametrizations``, mapping a tensor name to its :class:`PCSlot`.

    Not a ``ModuleDict``, so ``torch.nn.utils.parametrize.is_parametrized`` is False: ``module.<name>`` is a
    plain parameter. ``holder[name]`` and ``holder.items()`` read like the per-forward ``ModuleDict``.
    """

    def __getitem__(self, name: str) -> PCSlot:
        return self._modules[name]

    def __contains__(self, name: str) -> bool:
        return name in self._modules

    def items(self):
        return self._modules.items()

    def forward(self, *args, **kwargs):
        raise RuntimeError("PCHolder holds PC state; it has no forward.")
