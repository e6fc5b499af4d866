"""Several optimizers over disjoint parameters, stepped, scheduled and checkpointed as one."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

logger = logging.getLogger(__name__)

__all__ = ["CombinedOptimizer"]

ROUTING_KEY = "algorithm"


class CombinedOptimizer(Optimizer):
    """One ``torch.optim.Optimizer`` made of named child optimizers with disjoint parameters.

    ``param_groups`` is the concatenation of the children's groups: the *same* dicts, so an lr scheduler
    (``torch.optim.lr_scheduler.*``) that edits ``group["lr"]`` drives the children. ``state`` is one dict
    shared with the children. ``step(closure)`` evaluates the closure once (with grad enabled) and steps
    every child in order; ``zero_grad``, ``state_dict`` and ``load_state_dict`` are torch's and cover all
    groups (each group keeps its routing key ``"algorithm"``, the child's name).

    Args:
        optimizers: mapping ``name -> optimizer`` (e.g. ``{"muon": Muon(...), "adamw": AdamW(...)}``).
            ``add_param_group(group)`` sends ``group`` to the child named ``group["algorithm"]``.

    A :class:`pcopt.PCState` attached to it or to a child refreshes the PC state once, after every child has
    stepped.

    Example::

        >>> opt = CombinedOptimizer({"muon": Muon(matrices, lr=0.02), "adamw": torch.optim.AdamW(others, lr=0.02)})
        >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
        >>> loss.backward(); opt.step(); sched.step(); opt.zero_grad()
    """

    def __init__(self, optimizers: Mapping[str, Optimizer]) -> None:
        if not isinstance(optimizers, Mapping) or not optimizers:
            raise ValueError(
                f"CombinedOptimizer expects a non-empty mapping name -> torch.optim.Optimizer, got {optimizers!r}."
            )
        seen: dict[int, str] = {}
        for name, opt in optimizers.items():
            if not isinstance(opt, Optimizer):
                raise TypeError(
                    f"CombinedOptimizer child {name!r} must be a torch.optim.Optimizer, got {type(opt)}."
                )
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        raise ValueError(
                            f"A parameter of shape {tuple(p.shape)} is in both {seen[id(p)]!r} and {name!r}; "
                            "every parameter must belong to exactly one child optimizer."
                        )
                    seen[id(p)] = name
                group.setdefault(ROUTING_KEY, name)
        self.optimizers: dict[str, Optimizer] = dict(optimizers)
        self._num_groups = {name: len(opt.param_groups) for name, opt in self.optimizers.items()}
        self._building = True
        super().__init__([g for opt in self.optimizers.values() for g in opt.param_groups], {})
        self._building = False
        for opt in self.optimizers.values():
            self.state.update(opt.state)
        self._share_with_children()

    def _share_with_children(self) -> None:
        """Point every child at its slice of ``self.param_groups`` and at the shared ``self.state``."""
        start = 0
        for name, opt in self.optimizers.items():
            n = self._num_groups[name]
            opt.__setstate__({"state": self.state, "param_groups": self.param_groups[start : start + n]})
            start += n

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._building:
            super().add_param_group(param_group)
            return
        name = param_group.get(ROUTING_KEY)
        if name not in self.optimizers:
            raise ValueError(
                f"CombinedOptimizer.add_param_group needs param_group[{ROUTING_KEY!r}] naming a child optimizer, "
                f"one of {sorted(self.optimizers)}; got {name!r}."
            )
        child = self.optimizers[name]
        child.add_param_group(param_group)
        group = child.param_groups[-1]
        self._num_groups[name] += 1
        names = list(self.optimizers)
        position = sum(self._num_groups[n] for n in names[: names.index(name) + 1]) - 1
        self.param_groups.insert(position, group)
        self._share_with_children()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Evaluate ``closure`` once (grad enabled), then step every child optimizer in order."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        counts = {}
        for group in state_dict["param_groups"]:
            counts[group.get(ROUTING_KEY)] = counts.get(group.get(ROUTING_KEY), 0) + 1
        if counts != self._num_groups:
            raise ValueError(
                f"Loaded state dict has param groups {counts} (by {ROUTING_KEY!r}), this optimizer has "
                f"{self._num_groups}. Build the optimizer with the same model and settings as the checkpoint."
            )
        super().load_state_dict(state_dict)
        self._share_with_children()

    def __getstate__(self) -> dict[str, Any]:
        return {"optimizers": self.optimizers, "_num_groups": self._num_groups, **super().__getstate__()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_building", False)
        if "optimizers" in state:
            self._share_with_children()

    def __repr__(self) -> str:
        inner = ", ".join(
            f"{name}={type(opt).__name__}({len(opt.param_groups)} groups)"
            for name, opt in self.optimizers.items()
        )
        return f"CombinedOptimizer({inner})"
