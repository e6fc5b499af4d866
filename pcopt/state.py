"""Who keeps the PC state in step with the raw weights, and when: :class:`PCState`.

A preconditioned weight carries state besides its raw weight ``W``: the power-iteration vectors ``u``, ``v``
(``sigma = u^T W v + eps`` estimates the top singular value), the learnable ``gamma`` and, while gradients
are accumulated once per step, a held ``W_eff``. The optimizer changes ``W``; ``u``, ``v`` must then follow.
One object owns this for a model, :class:`PCState`, with one entry point per moment of a training step::

    state = pcopt.PCState(model)          # build_optimizer(model) makes one and calls it for you
    for step in ...:
        with state.accumulate():          # optional: W_eff once per step for all micro-batches
            for micro_batch in ...:
                loss(model(micro_batch)).backward()
        state.after_backward()            # gradients of W and gamma are complete from here on
        clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        state.after_step()                # refresh u, v (warm-started power iteration)
        optimizer.zero_grad()

In the sharded once-per-step mode (:func:`pcopt.sharded.distribute`, ``PCState(model, sharded=...)``) the
same two calls do more: ``after_backward`` pulls the reduce-scattered ``dL/dW_eff`` shards back to ``dL/dW``
and ``dL/dgamma``, and ``after_step`` also writes the new ``W_eff`` into FSDP2's parameter.

``after_step`` runs automatically when the optimizer was given the state: ``pcopt.optim.build_optimizer``
(always), ``pcopt.optim.Muon(..., pc_state=state)``, ``pcopt.optim.AdamW(..., pc_state=state)``, or any
``torch.optim.Optimizer`` after ``state.attach(optimizer)``. torchtitan_ext's optimizers container calls it
after every step. ``after_backward`` has nothing to do for the parametrize registration (autograd already
maps ``dL/dW_eff`` back to ``W`` and ``gamma``); it is the moment where an execution strategy that keeps
``W_eff`` outside autograd pulls gradients back, and calling it keeps a loop ready for one.

Under FSDP2 the refresh works on the sharded raw weights without gathering them (one vector all-reduce of
all PC weights per half-iteration per mesh), so every rank must reach ``after_step``. A forward that finds
its raw weight changed since the last refresh warns once: nothing refreshed ``u``, ``v`` after a step.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from pcopt._tensor import is_dtensor
from pcopt.layer import PolynomialPC
from pcopt.options import check_positive_int
from pcopt.registration import preconditioners
from pcopt.spectral import power_iteration_

logger = logging.getLogger(__name__)

__all__ = ["PCState", "refresh", "reset_preconditioners"]


def refresh_modules(pcs: Sequence[PolynomialPC], num_iterations: int | None = None) -> None:
    """Power iteration on the given PC modules (batched; one all-reduce per half-step per mesh)."""
    by_iters: dict[int, list[PolynomialPC]] = {}
    for pc in pcs:
        by_iters.setdefault(num_iterations or pc.num_power_iterations, []).append(pc)
    for iters, group in by_iters.items():
        for pc in group:
            bad = pc.invalid()
            if bad.any():
                pc.heal(bad, "was not finite or had zero norm before refresh")
        power_iteration_(
            [pc.raw_weight for pc in group], [pc.u for pc in group], [pc.v for pc in group], iters
        )
        for pc in group:
            bad = pc.invalid()
            if bad.any():
                pc.heal(bad, "became non-finite or zero during refresh (non-finite or zero weight?)")
            pc.mark_fresh()


def _modules(model: nn.Module | Sequence[nn.Module], what: str) -> list[nn.Module]:
    parts = (
        [model] if isinstance(model, nn.Module) else list(model) if isinstance(model, (list, tuple)) else None
    )
    if parts is None or not all(isinstance(m, nn.Module) for m in parts):
        raise TypeError(
            f"{what} expects an nn.Module or a list of them (model parts), got {type(model).__name__}. "
            "Pass the preconditioned model."
        )
    return parts


def refresh(model: nn.Module | Sequence[nn.Module], num_iterations: int | None = None) -> int:
    """Refresh ``u``, ``v`` of every PC weight in ``model`` by warm-started power iteration; returns how many.

    Works on FSDP2-sharded raw weights without gathering them (vector all-reduces only); every rank must
    call it. ``num_iterations`` defaults to each weight's ``num_power_iterations``. In a training loop use
    :meth:`PCState.after_step`, which does the same.
    """
    if num_iterations is not None:
        check_positive_int(num_iterations, "num_iterations")
    pcs = [pc for m in _modules(model, "pcopt.refresh") for _, pc in preconditioners(m)]
    if pcs:
        refresh_modules(pcs, num_iterations)
    return len(pcs)


def reset_preconditioners(model: nn.Module | Sequence[nn.Module]) -> int:
    """Set gamma to 1, re-initialise ``u``, ``v`` and refresh them, for every PC weight in ``model``.

    Use it after materialising a meta-device model (``to_empty``), where these hold garbage.
    """
    pcs = [pc for m in _modules(model, "pcopt.reset_preconditioners") for _, pc in preconditioners(m)]
    for pc in pcs:
        pc.reset_state()
    refresh_modules(pcs)
    return len(pcs)


class PCState:
    """The owner of the PC state of a model (or of its parts): one entry point per moment of a step.

    Args:
        model: the preconditioned model, or a list of model parts (pipeline stages).
        num_power_iterations: iterations per refresh in :meth:`after_step`; None uses each weight's own
            setting (``PCOptions.num_power_iterations``, 10 by default).

    The PC weights are looked up in the model at every call (``model.named_modules()`` order, the same on
    every rank), so a state made before ``fully_shard`` or ``merge`` stays valid. See the module docstring
    for the step sequence.
    """

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        *,
        num_power_iterations: int | None = None,
        sharded=None,
    ) -> None:
        self.modules = _modules(model, "PCState")
        if num_power_iterations is not None:
            check_positive_int(num_power_iterations, "num_power_iterations")
        self.num_power_iterations = num_power_iterations
        from pcopt.sharded import ShardedPC

        if sharded is not None and not isinstance(sharded, ShardedPC):
            raise TypeError(
                f"PCState: sharded must be the pcopt.sharded.ShardedPC that distribute() returned, got "
                f"{type(sharded).__name__}."
            )
        self.sharded = sharded
        if sharded is not None and num_power_iterations is not None:
            warnings.warn(
                "PCState: num_power_iterations has no effect on the sharded weights (each keeps its "
                "PCOptions.num_power_iterations); it applies to parametrized ones only.",
                UserWarning,
                stacklevel=2,
            )
        if not self.preconditioners() and sharded is None:
            warnings.warn(
                "pcopt.PCState: the model has no preconditioned weights, so after_step/accumulate do nothing. "
                "Call pcopt.precondition_model(model) first for them to have an effect.",
                UserWarning,
                stacklevel=2,
            )

    def preconditioners(self) -> list[tuple[str, PolynomialPC]]:
        """``(fqn, PolynomialPC)`` of every PC weight owned, in a rank-independent order."""
        return [item for m in self.modules for item in preconditioners(m)]

    def __len__(self) -> int:
        return len(self.preconditioners())

    def __repr__(self) -> str:
        return (
            f"PCState({len(self)} preconditioned weights, num_power_iterations={self.num_power_iterations})"
        )

    # -- the moments of a step ------------------------------------------------------------------------------
    def after_backward(self) -> None:
        """After the last micro-batch's backward, before gradient clipping and ``optimizer.step()``.

        Under the parametrize registration autograd has already produced the raw-weight and gamma
        gradients, so this checks only that no :meth:`accumulate` block is still open.
        """
        busy = [fqn for fqn, pc in self.preconditioners() if pc.holding]
        if busy:
            raise RuntimeError(
                f"PCState.after_backward was called inside an accumulate() block (still open for {busy[:3]}). "
                "Call it after the with block has exited."
            )
        if self.sharded is not None:
            self.sharded.after_backward()  # dL/dW_eff shards -> dL/dW, dL/dgamma (pcopt.sharded)

    @torch.no_grad()
    def after_step(self) -> int:
        """After ``optimizer.step()``: refresh ``u``, ``v`` of every PC weight; returns how many.

        Collective under FSDP2 (small vector all-reduces): every rank must call it.
        """
        pcs = [pc for _, pc in self.preconditioners()]
        if pcs:
            refresh_modules(pcs, self.num_power_iterations)
        n = len(pcs)
        if self.sharded is not None:
            n += self.sharded.after_step()  # refresh u, v and write W_eff on the shards
        logger.debug("PCState.after_step: refreshed %d preconditioned weights", n)
        return n

    def attach(self, optimizer: torch.optim.Optimizer):
        """Call :meth:`after_step` after every ``optimizer.step()`` (a step post-hook); returns its handle."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"PCState.attach expects a torch.optim.Optimizer, got {type(optimizer).__name__}."
            )
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.after_step())

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        """Compute each ``W_eff`` once for all micro-batches run inside the block (see :mod:`pcopt.accumulation`).

        On entry each ``W_eff`` is computed with its autograd graph and a detached copy that requires grad is
        held by the parametrization; micro-batch backward passes accumulate ``dL/dW_eff`` into that copy. On
        a clean exit one ``torch.autograd.backward`` call maps the sums back to ``W`` and ``gamma``
        (``sum_i J^T g_i = J^T sum_i g_i``). If the block raises, nothing is back-propagated through the map.

        Raises:
            RuntimeError: on entry for FSDP2 models or when a block is already open for the same weights; on
                exit when a raw weight or ``gamma`` was modified inside the block (the held ``W_eff`` would be
                stale).
        """
        pcs = self.preconditioners()
        if not pcs:
            yield
            return
        _check_not_fsdp2(self.modules, pcs)
        busy = [fqn for fqn, pc in pcs if pc.holding]
        if busy:
            raise RuntimeError(
                f"once_per_step / PCState.accumulate is already active for {busy[:3]} (nested use or a block "
                "that did not exit). Use one block per optimizer step."
            )
        entries: list[tuple[str, PolynomialPC, Tensor, Tensor, tuple[int, int]]] = []
        try:
            with torch.enable_grad():
                for fqn, pc in pcs:
                    raw = pc.raw_weight
                    eff = pc.map(raw, pc.gamma)  # the full PC map, with its autograd graph to raw and gamma
                    held = eff.detach().requires_grad_(eff.requires_grad)
                    pc.hold(held)
                    entries.append((fqn, pc, eff, held, (raw._version, pc.gamma._version)))
        except BaseException:
            for _, pc, *_ in entries:
                pc.hold(None)
            raise
        try:
            yield
        finally:
            for _, pc, *_ in entries:
                pc.hold(None)
        # Reached only when the block exited cleanly.
        stale = [
            fqn
            for fqn, pc, _, _, versions in entries
            if (pc.raw_weight._version, pc.gamma._version) != versions
        ]
        if stale:
            raise RuntimeError(
                f"Preconditioned weights were modified inside once_per_step ({stale[:3]}): the W_eff cached at "
                "entry is stale, so its gradients cannot be mapped back. Call optimizer.step() / zero_grad() "
                "/ pcopt.refresh after the with block, not inside it."
            )
        outputs, grads = [], []
        for _, _, eff, held, _ in entries:
            if held.grad is not None and eff.requires_grad:
                outputs.append(eff)
                grads.append(held.grad)
        if outputs:
            torch.autograd.backward(outputs, grads)
        logger.debug("accumulate: back-propagated %d of %d effective weights", len(outputs), len(entries))


def _check_not_fsdp2(modules: Sequence[nn.Module], pcs) -> None:
    from pcopt._tensor import is_fsdp_module

    sharded = [fqn for fqn, pc in pcs if is_dtensor(pc.raw_weight)]
    wrapped = [fqn or "<root>" for m in modules for fqn, sub in m.named_modules() if is_fsdp_module(sub)]
    if sharded or wrapped:
        where = f"sharded raw weights: {sharded[:3]}" if sharded else f"FSDP2 modules: {wrapped[:3]}"
        raise RuntimeError(
            "pcopt.accumulation.once_per_step does not support FSDP2 (fully_shard) models "
            f"({where}). FSDP2 gathers each weight only inside its module's forward and reduce-scatters its "
            "gradient after every micro-batch backward, so a W_eff computed once per step would bypass both "
            "and give wrong gradients. Run the micro-batches without once_per_step under FSDP2 (W_eff is then "
            "recomputed in every micro-batch forward), or use it on unsharded / DDP models."
        )
