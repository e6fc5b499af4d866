"""SPECTRA: spectral clipping of another optimizer's updates (:class:`Spectra`).

Post-clipping wraps any optimizer with decoupled weight decay ``lambda`` and lr ``eta``. For each selected
parameter ``X``::

    X_k saved;  base.step()  ->  X_{k+1} = (1 - lambda eta) X_k - eta U        (U: the base's update direction)
    U = (X_k - X_{k+1}) / eta - lambda X_k                                       (lr and decay undone)
    X_{k+1} <- (1 - lambda eta) X_k - eta alpha H_{c_k}(U),   alpha = sqrt(max(1, rows / cols))

computed as ``X_{k+1} + eta (U - alpha H_{c_k}(U))``, so that whenever the clip changes nothing (``c`` huge,
``alpha = 1``) the result is the base optimizer's, bit for bit. The weight decay stays outside the clip.
``H_c`` is :func:`pcopt.spectral_clip` (singular values ``sigma -> sigma / sqrt(1 + sigma^2 / c^2)``).
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from pcopt._tensor import local_tensor as _local
from pcopt.optim._combined import ROUTING_KEY, CombinedOptimizer
from pcopt.optim._muon import Muon
from pcopt.optim._spectra_clip import clip_steps, clip_updates
from pcopt.spectral_clip import (
    check_steps,
    check_threshold,
    resolve_clip_dtype,
)

logger = logging.getLogger(__name__)

__all__ = ["Spectra"]

ApplyToT = Literal["hidden", "2d", "all"]
_APPLY_TO = ("hidden", "2d", "all")
_DECAYS = ("linear", "cosine")
_STEP_KEY = "spectra_step"
_BASE_LR_KEY = "spectra_base_lr"


def _float(value: Any) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _shape_factor(shape: torch.Size) -> float:
    """``alpha = sqrt(max(1, rows / cols))`` of the (global) shape; 1 for vectors."""
    if len(shape) < 2:
        return 1.0
    return math.sqrt(max(1.0, shape[0] / max(1, math.prod(shape[1:]))))


def _leaf_optimizers(optimizer: Optimizer) -> list[Optimizer]:
    if isinstance(optimizer, CombinedOptimizer):
        return [o for child in optimizer.optimizers.values() for o in _leaf_optimizers(child)]
    return [optimizer]


def _coupled_decay_reason(opt: Optimizer, group: dict[str, Any], decoupled: bool | None) -> str | None:
    """Why ``group``'s weight decay is not decoupled (None when it is, or when there is none)."""
    wd = _float(group.get("weight_decay", 0.0))
    if isinstance(opt, (torch.optim.AdamW, Muon, torch.optim.Muon)) or wd == 0.0 or decoupled:
        return None
    name = type(opt).__name__
    if isinstance(opt, torch.optim.Adam):
        if group.get("decoupled_weight_decay", False):
            return None
        return (f"torch.optim.Adam with weight_decay={wd} adds an L2 term to the gradient (coupled decay). Use "
                "torch.optim.AdamW, Adam(..., decoupled_weight_decay=True) or weight_decay=0")  # fmt: skip
    if isinstance(opt, torch.optim.SGD):
        return (f"torch.optim.SGD with weight_decay={wd} adds an L2 term to the gradient (coupled decay). Use "
                "weight_decay=0 (SGD has no decoupled decay)")  # fmt: skip
    return (f"{name} has weight_decay={wd} and is not known to decay as X <- (1 - lr * weight_decay) X. Pass "
            "decoupled=True if it does, or use weight_decay=0")  # fmt: skip


class Spectra(Optimizer):
    r"""Spectral clipping (SPECTRA) of the updates of any optimizer with decoupled weight decay.

    .. math::
       \begin{aligned}
            &X_{k+1}^{base} \leftarrow \mathrm{base.step}(X_k), \qquad
                U_k = (X_k - X_{k+1}^{base}) / \eta - \lambda X_k \\
            &X_{k+1} \leftarrow (1 - \lambda\eta) X_k - \eta\, \alpha\, H_{c_k}(U_k), \qquad
                H_c(U) = (I + U U^\top / c^2)^{-1/2} U, \quad \alpha = \sqrt{\max(1, \text{rows} / \text{cols})}
       \end{aligned}

    A real ``torch.optim.Optimizer``: ``param_groups`` and ``state`` are the base optimizer's own (the same
    objects), so ``torch.optim.lr_scheduler.*``, ``zero_grad``, ``state_dict``/``load_state_dict`` (also
    through ``torch.distributed.checkpoint``) and ``step(closure)`` work on the wrapper. The wrapper's step
    count and each group's reference lr are kept in the param groups (``"spectra_step"``,
    ``"spectra_base_lr"``), so they travel with every optimizer checkpoint. A step where every group has
    ``lr == 0`` (how ``torch.distributed.checkpoint`` and torchtitan create optimizer state) is not counted.

    Args:
        optimizer: the base optimizer, with decoupled weight decay: ``torch.optim.AdamW``, ``pcopt.optim.Muon``,
            ``torch.optim.AdamW``/``Muon``, ``torch.optim.Adam`` (``decoupled_weight_decay=True`` or no decay),
            ``torch.optim.SGD`` without decay, a :class:`CombinedOptimizer` of those (``build_optimizer``), or
            any optimizer given ``decoupled=True``.
        c: the post-clip threshold (default 10.0, the published default); None turns post-clipping off
            (pre-clipping alone).

    Keyword-only args:
        apply_to: which parameters are clipped. ``"hidden"`` (default): the 2-D hidden matrices, as
            :func:`pcopt.param_groups` routes them to Muon (raw PC weights included, embeddings and LM head
            excluded); the base optimizer must be built from those groups (``pcopt.build_optimizer`` is), whose
            routing key says which they are. ``"2d"``: every 2-D parameter. ``"all"``: every parameter (1-D ones by the vector
            rule, >2-D ones as ``(shape[0], -1)`` matrices; the published runs use this).
        pattern: a regex searched in parameter names; the matching parameters are clipped (instead of
            ``apply_to``). The names are the param groups' ``"param_names"``: build the base optimizer from
            ``model.named_parameters()`` (or from :func:`pcopt.param_groups`, which names them).
        clip_params: the parameters to clip, given as tensors (instead of ``apply_to`` or ``pattern``): for a
            caller that knows which are the hidden matrices while the base optimizer's groups do not say it.
        steps, dtype: Newton-Schulz iterations and their dtype (default None:
            :func:`pcopt.hardware.preferred_dtype` of the parameters' device, bf16 where native, else fp32).
            ``steps="auto"`` (default): once per clip, as many as the largest ``||X||_F / c`` of all clipped
            matrices needs for every singular value to converge to the clip dtype's precision
            (:func:`pcopt.spectral_clip.auto_clip_steps`; ``||X||_F >= sigma_max``), one host sync per optimizer
            step for all matrices together (plus one all-reduce of a vector per mesh dim under FSDP2). An int
            fixes the count; the SPECTRA authors use 10, which leaves the small singular values of a matrix with
            ``sigma_max / c`` above ~50 under-clipped (docs/spectra.md).
        shape_factor: multiply the clipped update by ``alpha`` (default True, as published). With
            ``alpha > 1`` (tall matrices) the update is scaled by ``alpha`` even where nothing is clipped.
        warmup_steps: for the first ``warmup_steps`` steps, ``c_k = c * base_lr / lr_k`` (so ``c_k * lr_k``
            stays ``c * base_lr``). ``base_lr``: the reference lr (default: each group's ``initial_lr`` if an lr
            scheduler already set it, else its ``lr`` when the wrapper is built).
        decay_fraction, total_steps, final_scale, decay: over the last ``decay_fraction * total_steps`` steps,
            ``c_k`` goes from ``c`` to ``c * final_scale`` (``"linear"`` or ``"cosine"``). Off by default.
        pre_clip: threshold of the optional pre-clipping of the selected parameters' gradients (published
            value 0.1), applied by :meth:`clip_gradients_` (call it after backward and before global-norm
            clipping) or else at the start of ``step()``. The authors advise against combining it with
            post-clipping.
        decoupled: declare that an optimizer of another class decays as ``X <- (1 - lr wd) X``.

    On a PC model the selected parameters are the raw weights: their update is what is clipped. A
    :class:`pcopt.PCState` attached to the base optimizer (``build_optimizer`` attaches it) refreshes ``u``,
    ``v`` after the wrapper's step, so after the clip.

    DTensors (FSDP2 and every placement :class:`pcopt.optim.Muon` supports) are clipped on the full matrix
    once in the world, by Muon's owner machinery (two ``all_to_all`` per mesh, group and step), with the same
    result as unsharded. The parameters' snapshot ``X_k`` costs one extra copy of the selected parameters.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``; an option has the wrong type.
        ValueError: bad values (``c <= 0``, non-finite, unknown ``apply_to``...), no parameter selected, or a
            base optimizer whose weight decay is coupled (an L2 term in the gradient).
        RuntimeError: at ``step()``, a group's decay became coupled, or a >2-D DTensor is selected.

    Example::

        >>> base = torch.optim.AdamW(pcopt.param_groups(model), lr=3e-3, weight_decay=0.1)
        >>> opt = pcopt.optim.Spectra(base, c=10.0, warmup_steps=200)
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))
        >>> loss_fn(model(x), y).backward(); opt.step(); sched.step(); opt.zero_grad()
    """

    def __init__(
        self,
        optimizer: Optimizer,
        c: float | None = 10.0,
        *,
        apply_to: ApplyToT = "hidden",
        pattern: str | None = None,
        clip_params: Iterable[Tensor] | None = None,
        steps: int | Literal["auto"] = "auto",
        dtype: torch.dtype | str | None = None,
        shape_factor: bool = True,
        warmup_steps: int = 0,
        base_lr: float | None = None,
        decay_fraction: float = 0.0,
        total_steps: int | None = None,
        final_scale: float = 0.0,
        decay: Literal["linear", "cosine"] = "linear",
        pre_clip: float | None = None,
        decoupled: bool | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"Spectra wraps a torch.optim.Optimizer, got {type(optimizer).__name__}. Build the base optimizer "
                "first, e.g. Spectra(torch.optim.AdamW(pcopt.param_groups(model), lr=1e-3), c=10.0)."
            )
        if isinstance(optimizer, Spectra):
            raise TypeError("Spectra got a Spectra optimizer; wrap the base optimizer once.")
        self.c = None if c is None else check_threshold(c, "c")
        self.pre_clip = None if pre_clip is None else check_threshold(pre_clip, "pre_clip")
        if self.c is None and self.pre_clip is None:
            raise ValueError(
                "Spectra with c=None and pre_clip=None clips nothing. Pass c (post-clipping, e.g. 10.0) and/or "
                "pre_clip (gradient pre-clipping, e.g. 0.1), or use the base optimizer alone."
            )
        self.steps = "auto" if isinstance(steps, str) and steps == "auto" else check_steps(steps)
        self.dtype = None if dtype is None else resolve_clip_dtype(dtype, torch.float32)
        if not isinstance(shape_factor, bool):
            raise TypeError(f"Spectra: shape_factor must be a bool, got {type(shape_factor).__name__}.")
        self.shape_factor = shape_factor
        if apply_to not in _APPLY_TO:
            raise ValueError(f"Spectra: apply_to must be one of {_APPLY_TO}, got {apply_to!r}.")
        if pattern is not None and apply_to != "hidden":
            raise ValueError(
                f"Spectra: pass either pattern ({pattern!r}) or apply_to ({apply_to!r}), not both: a pattern "
                "selects the parameters by itself."
            )
        self._clip_ids = None
        if clip_params is not None:
            if pattern is not None or apply_to != "hidden":
                raise ValueError(
                    "Spectra: pass one of clip_params, pattern or apply_to: each selects the parameters by itself."
                )
            self._clip_ids = {id(p) for p in clip_params}
            known = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if not self._clip_ids <= known:
                raise ValueError(
                    f"Spectra: {len(self._clip_ids - known)} of the {len(self._clip_ids)} clip_params are not "
                    "parameters of the base optimizer; pass tensors from its param groups."
                )
        self.apply_to = apply_to
        self._pattern = None
        if pattern is not None:
            if not isinstance(pattern, str):
                raise TypeError(f"Spectra: pattern must be a regex string, got {type(pattern).__name__}.")
            try:
                self._pattern = re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"Spectra: pattern {pattern!r} is not a valid regular expression ({exc})."
                ) from None
        self._check_schedule(warmup_steps, base_lr, decay_fraction, total_steps, final_scale, decay)
        self.decoupled = decoupled
        for leaf in _leaf_optimizers(optimizer):
            for group in leaf.param_groups:
                reason = _coupled_decay_reason(leaf, group, decoupled)
                if reason is not None:
                    raise ValueError(f"Spectra needs decoupled weight decay: {reason}.")

        self.optimizer = optimizer
        self._hidden = self._hidden_ids(optimizer)
        self._building = True
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self._building = False
        self._share()
        for group in self.param_groups:
            self._init_group(group)
        self._selected: set[int] = set()
        for group in self.param_groups:
            self._select_group(group)
        if not self._selected:
            raise ValueError(
                f"Spectra selected no parameter (apply_to={self.apply_to!r}, pattern="
                f"{None if self._pattern is None else self._pattern.pattern!r}). Build the base optimizer from "
                "model.named_parameters() or pcopt.param_groups(model) so that names are known, pass another "
                "pattern, or apply_to='2d' / 'all'."
            )
        self._grads_clipped = False
        logger.info(
            "Spectra over %s: %d parameters clipped (apply_to=%s), c=%s, pre_clip=%s, steps=%s, dtype=%s",
            type(optimizer).__name__, len(self._selected), self.apply_to, self.c, self.pre_clip, self.steps,
            self.dtype,
        )  # fmt: skip

    # ------------------------------------------------------------------ construction helpers
    def _check_schedule(self, warmup_steps, base_lr, decay_fraction, total_steps, final_scale, decay) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Spectra: warmup_steps must be an int >= 0, got {warmup_steps!r}.")
        if base_lr is not None:
            if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or not math.isfinite(base_lr) \
                    or base_lr <= 0:  # fmt: skip
                raise ValueError(f"Spectra: base_lr must be a finite float > 0 or None, got {base_lr!r}.")
            if warmup_steps == 0:
                warnings.warn(
                    "Spectra: base_lr has no effect without warmup_steps > 0.", UserWarning, stacklevel=3
                )
        if isinstance(decay_fraction, bool) or not isinstance(decay_fraction, (int, float)) \
                or not 0.0 <= decay_fraction <= 1.0:  # fmt: skip
            raise ValueError(f"Spectra: decay_fraction must be a float in [0, 1], got {decay_fraction!r}.")
        if isinstance(final_scale, bool) or not isinstance(final_scale, (int, float)) \
                or not 0.0 <= final_scale <= 1.0:  # fmt: skip
            raise ValueError(f"Spectra: final_scale must be a float in [0, 1], got {final_scale!r}.")
        if decay not in _DECAYS:
            raise ValueError(f"Spectra: decay must be one of {_DECAYS}, got {decay!r}.")
        if decay_fraction > 0:
            if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
                raise ValueError(
                    f"Spectra: decay_fraction={decay_fraction} needs total_steps, the length of training (an int "
                    f">= 1), got {total_steps!r}."
                )
        elif total_steps is not None or final_scale != 0.0 or decay != "linear":
            warnings.warn(
                "Spectra: total_steps / final_scale / decay have no effect with decay_fraction=0 (no late decay "
                "of c). Pass decay_fraction > 0 to decay c over the end of training.",
                UserWarning,
                stacklevel=3,
            )
        self.warmup_steps, self.base_lr = warmup_steps, base_lr
        self.decay_fraction, self.total_steps = float(decay_fraction), total_steps
        self.final_scale, self.decay = float(final_scale), decay

    def _hidden_ids(self, optimizer: Optimizer) -> set[int] | None:
        """Parameters that ``pcopt.param_groups`` routed to Muon (None: unknown, the groups carry no routing
        key)."""
        groups = optimizer.param_groups
        if groups and all(ROUTING_KEY in g for g in groups):
            return {id(p) for g in groups if g[ROUTING_KEY] == "muon" for p in g["params"]}
        return None

    def _init_group(self, group: dict[str, Any]) -> None:
        group.setdefault(_STEP_KEY, 0)
        if _BASE_LR_KEY not in group:
            group[_BASE_LR_KEY] = self.base_lr if self.base_lr is not None else _float(
                group.get("initial_lr", group["lr"]))  # fmt: skip

    def _name(self, group: dict[str, Any], i: int, p: Tensor) -> str | None:
        names = group.get("param_names")
        return names[i] if names is not None and i < len(names) else None

    def _select_group(self, group: dict[str, Any]) -> None:
        for i, p in enumerate(group["params"]):
            if self._clip_ids is not None:
                chosen = id(p) in self._clip_ids
            elif self._pattern is not None:
                name = self._name(group, i, p)
                chosen = name is not None and bool(self._pattern.search(name))
            elif self.apply_to == "all":
                chosen = True
            elif self.apply_to == "2d":
                chosen = p.ndim == 2
            else:
                if self._hidden is None:
                    raise ValueError(
                        "Spectra(apply_to='hidden') picks the 2-D hidden matrices by the routing key of the param "
                        "groups that pcopt.param_groups(model) makes, and the base optimizer's groups have none. "
                        "Build it from pcopt.param_groups(model) (pcopt.build_optimizer does), or pass "
                        "apply_to='2d' / 'all'."
                    )
                chosen = id(p) in self._hidden
            if chosen:
                self._selected.add(id(p))

    def _share(self) -> None:
        """The same param-group dicts and state as the base optimizer (after building and after loading)."""
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state

    # ------------------------------------------------------------------ torch.optim.Optimizer API
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._building:
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)
        self._share()
        group = self.param_groups[-1]
        reason = next(
            (r for leaf in _leaf_optimizers(self.optimizer) for g in leaf.param_groups if g is group
             for r in [_coupled_decay_reason(leaf, g, self.decoupled)] if r), None,
        )  # fmt: skip
        if reason is not None:
            raise ValueError(f"Spectra needs decoupled weight decay: {reason}.")
        self._init_group(group)
        self._select_group(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._grads_clipped = False

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)
        self._share()
        for group in self.param_groups:
            self._init_group(group)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "optimizer" in state:
            self._share()

    def __repr__(self) -> str:
        return (f"Spectra({self.optimizer!r}, c={self.c}, apply_to={self.apply_to!r}, pre_clip={self.pre_clip}, "
                f"{len(self._selected)} clipped)")  # fmt: skip

    # ------------------------------------------------------------------ the method
    def threshold(self, group: dict[str, Any]) -> float:
        """The post-clip threshold ``c_k`` of ``group`` at its current step and lr (warmup and late decay)."""
        assert self.c is not None
        step, lr = group[_STEP_KEY], _float(group["lr"])
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.c * group[_BASE_LR_KEY] / lr if lr > 0 else math.inf
        if self.decay_fraction > 0 and self.total_steps is not None:
            n_decay = int(self.decay_fraction * self.total_steps)
            start = self.total_steps - n_decay
            if n_decay > 0 and step >= start:
                progress = min(1.0, (step - start) / n_decay)
                shape = 1 - progress if self.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
                return self.c * (self.final_scale + (1 - self.final_scale) * shape)
        return self.c

    @torch.no_grad()
    def clip_gradients_(self) -> None:
        """Pre-clip the gradients of the selected parameters in place (threshold ``pre_clip``), once per step.

        Call after backward (and gradient accumulation) and before global-norm clipping; otherwise ``step()``
        calls it. Under FSDP2 every rank must call it (a collective per mesh).
        """
        if self.pre_clip is None:
            raise RuntimeError(
                "Spectra.clip_gradients_: pre_clip is None. Build Spectra with pre_clip=0.1 (say)."
            )
        if self._grads_clipped:
            return
        params = [
            p
            for g in self.param_groups
            for p in g["params"]
            if id(p) in self._selected and p.grad is not None
        ]
        grads = [_local(p.grad) for p in params]
        steps = clip_steps([(p, g, self.pre_clip) for p, g in zip(params, grads)], self.steps, self.dtype)
        for p, h in zip(
            params, clip_updates(params, grads, self.pre_clip, steps, self.dtype, self.steps == "auto")
        ):
            _local(p.grad).copy_(h)
        self._grads_clipped = True

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Evaluate ``closure`` (grad enabled), pre-clip if asked, step the base optimizer, clip its updates."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.pre_clip is not None:
            self.clip_gradients_()
        todo: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]] = []
        if self.c is not None:
            for group in self.param_groups:
                reason = next((_coupled_decay_reason(leaf, group, self.decoupled)
                               for leaf in _leaf_optimizers(self.optimizer) if any(g is group for g in leaf.param_groups)),
                              None)  # fmt: skip
                if reason is not None:
                    raise RuntimeError(f"Spectra needs decoupled weight decay at step time: {reason}.")
                if _float(group["lr"]) == 0.0:
                    continue
                params = [p for p in group["params"] if id(p) in self._selected and p.grad is not None]
                if params:
                    todo.append((group, params, [p.detach().clone() for p in params]))
        self.optimizer.step()
        work = []
        for group, params, before in todo:
            lr, wd = _float(group["lr"]), _float(group.get("weight_decay", 0.0))
            updates = [(_local(x0) - _local(p)) / lr - wd * _local(x0) for p, x0 in zip(params, before)]
            work.append((params, updates, lr, self.threshold(group)))
        items = [(p, u, c) for params, updates, _, c in work for p, u in zip(params, updates)]
        steps = clip_steps(items, self.steps, self.dtype)
        for params, updates, lr, c in work:
            # c = 0 (the end of a decay to final_scale = 0): the clipped update is zero, only the decay remains
            clipped = (
                [torch.zeros_like(u) for u in updates]
                if c == 0.0
                else clip_updates(params, updates, c, steps, self.dtype, self.steps == "auto")
            )
            for p, u, h in zip(params, updates, clipped):
                alpha = _shape_factor(p.shape) if self.shape_factor else 1.0
                _local(p).add_((u - h) if alpha == 1.0 else (u - alpha * h), alpha=lr)
        # a step with lr = 0 everywhere (how DCP and torchtitan create optimizer state) is not counted
        if any(_float(g["lr"]) != 0.0 for g in self.param_groups):
            for group in self.param_groups:
                group[_STEP_KEY] += 1
        self._grads_clipped = False
        return loss
