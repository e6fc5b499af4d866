"""The owner of the PC state: :class:`PCState`. Who changes it, and when, in each execution strategy.

A preconditioned weight has one state (:class:`pcopt.PolynomialPC` beside its raw weight ``W``): ``gamma``,
the power-iteration vectors ``u``, ``v`` (``sigma = u^T W v + eps`` estimates the top singular value) and
its settings. The optimizer changes ``W`` and ``gamma``; **nothing but** :class:`PCState` **changes the rest**,
and only at these moments of a training step::

    state = pcopt.PCState(model)          # build_optimizer(model) makes one and attaches it
    state.attach(optimizer)               # a step post-hook: after_step() after every optimizer.step()
    for step in ...:
        for micro_batch in ...:
            loss(model(micro_batch)).backward()
        state.after_backward()            # gradients of W and gamma are complete from here on
        clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()                  # -> state.after_step(): refresh u, v (and write W_eff)
        optimizer.zero_grad()

=================  =====================================================  =========================================
moment             per-forward (parametrize, the reference)               once-per-step (:func:`pcopt.set_strategy`)
=================  =====================================================  =========================================
forward            maps ``W`` in every forward; autograd keeps the graph  a plain Linear on the ``W_eff`` parameter
after_backward     nothing to do (autograd already produced dL/dW)       pulls ``dL/dW_eff`` back to ``dL/dW``,
                                                                          ``dL/dgamma``; clears ``W_eff.grad``
after_step         refreshes ``u``, ``v`` (warm-started power iteration)  refreshes ``u``, ``v``, writes ``W_eff``
initialize         gamma = 1, fresh ``u``, ``v``, refresh                 raw ``W`` <- ``W_eff`` as initialised,
                                                                          then the same, and writes ``W_eff``
load_state_dict    ``u``, ``v`` are the loaded ones                       the same, and ``W_eff`` is rewritten
=================  =====================================================  =========================================

``after_step`` runs by itself once the state is attached to the optimizer that is stepped (``state.attach``,
one post-hook; ``build_optimizer`` attaches it; attached to an optimizer that another one steps, such as the base
of a ``Spectra`` wrapper, it waits for the outer step to end, so the refresh follows the clip). The attached pre-hook refuses a step whose once-per-step gradients were not pulled
back. Under FSDP2 every moment is collective (vector and Gram all-reduces on the shards; no weight is
gathered): every rank must reach it. A per-forward weight whose raw weight changed since the last refresh
warns once at its next forward: nothing refreshed ``u``, ``v`` after a step.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from pcopt._tensor import is_dtensor
from pcopt.kernel import initialize_, pull_back_, stamp, write_
from pcopt.layer import PolynomialPC, refresh_
from pcopt.options import check_positive_int
from pcopt.registration import preconditioners
from pcopt.strategy import set_strategy, slots, strategy_of

logger = logging.getLogger(__name__)

__all__ = ["PCState", "refresh", "reset_preconditioners"]


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
    parts = _modules(model, "pcopt.refresh")
    pcs = [pc for m in parts for _, pc in preconditioners(m)]
    refresh_(pcs, num_iterations)
    write_([s for m in parts for s in slots(m)])
    for pc in pcs:  # asked for by hand: report restarts of u, v (a host sync per weight)
        pc.report_heals()
    return len(pcs)


def reset_preconditioners(model: nn.Module | Sequence[nn.Module]) -> int:
    """Set gamma to 1, re-initialise ``u``, ``v`` and refresh them, for every PC weight in ``model``.

    Use it after materialising a meta-device model (``to_empty``), where these hold garbage.
    """
    parts = _modules(model, "pcopt.reset_preconditioners")
    pcs = [pc for m in parts for _, pc in preconditioners(m)]
    for pc in pcs:
        pc.reset_state()
    refresh_(pcs)
    write_([s for m in parts for s in slots(m)])
    return len(pcs)


class PCState:
    """The owner of the PC state of a model (or of its parts): one entry point per moment of a step.

    Args:
        model: the preconditioned model, or a list of model parts (pipeline stages).
        num_power_iterations: iterations per refresh in :meth:`after_step`; None uses each weight's own
            setting (``PCOptions.num_power_iterations``, 10 by default).

    The PC weights are looked up in the model at every call (``model.named_modules()`` order, the same on
    every rank), so a state made before :func:`pcopt.set_strategy`, ``fully_shard`` or ``merge`` stays valid.
    See the module docstring for who changes what, and when.
    """

    def __init__(
        self, model: nn.Module | Sequence[nn.Module], *, num_power_iterations: int | None = None
    ) -> None:
        self.modules = _modules(model, "PCState")
        if num_power_iterations is not None:
            check_positive_int(num_power_iterations, "num_power_iterations")
        self.num_power_iterations = num_power_iterations
        self.strategy  # noqa: B018  (raises on a model that mixes strategies)
        if not self.preconditioners():
            warnings.warn(
                "pcopt.PCState: the model has no preconditioned weights, so its moments do nothing. Call "
                "pcopt.precondition_model(model) first for them to have an effect.",
                UserWarning,
                stacklevel=2,
            )

    def preconditioners(self) -> list[tuple[str, PolynomialPC]]:
        """``(fqn, PolynomialPC)`` of every PC weight owned, in a rank-independent order."""
        return [item for m in self.modules for item in preconditioners(m)]

    @property
    def strategy(self) -> str | None:
        """``"per_forward"``, ``"once_per_step"`` or None (no PC weights); see :func:`pcopt.set_strategy`."""
        kinds = {strategy_of(m) for m in self.modules} - {None}
        if len(kinds) > 1:
            raise RuntimeError(
                f"The model parts mix PC strategies ({sorted(kinds)}). Call pcopt.set_strategy on every part."
            )
        return kinds.pop() if kinds else None

    def _slots(self):
        return [s for m in self.modules for s in slots(m)]

    def __len__(self) -> int:
        return len(self.preconditioners())

    def __repr__(self) -> str:
        return (
            f"PCState({len(self)} preconditioned weights, strategy={self.strategy}, "
            f"num_power_iterations={self.num_power_iterations})"
        )

    # -- the moments of a step ------------------------------------------------------------------------------
    def after_backward(self) -> None:
        """After the last micro-batch's backward, before gradient clipping and ``optimizer.step()``.

        Once per step: pulls each accumulated (FSDP2: reduce-scattered) ``dL/dW_eff`` back through the map
        into the raw weight's and ``gamma``'s gradients (accumulated if they exist) and clears ``W_eff.grad``;
        one all-reduce of ``2 n^2 + 1`` floats per sharded weight. Per forward: autograd already did this, so
        it only checks that no :meth:`accumulate` block is still open.

        Raises:
            RuntimeError: inside an :meth:`accumulate` block, or when a raw weight changed since ``W_eff`` was
                written (an optimizer step without :meth:`after_step`).
        """
        busy = [s[0].label for s in self._slots() if s.temporary]
        if busy:
            raise RuntimeError(
                f"PCState.after_backward was called inside an accumulate() block (still open for {busy[:3]}). "
                "Call it after the with block has exited."
            )
        pull_back_(self._slots())

    def health(self) -> dict[str, int]:
        """``{fqn: restarts}``: how often a refresh restarted ``u``, ``v`` that were not finite or ~zero.

        The refresh heals on the device without a host sync; this reads the counts (one sync per weight) and
        warns once per weight that needed a restart. Call it where you log metrics (torchtitan_ext's metrics
        do, at every log step).
        """
        return {fqn: pc.report_heals() for fqn, pc in self.preconditioners()}

    def check_pulled_back(self) -> None:
        """``RuntimeError`` if a once-per-step ``W_eff`` still carries a gradient (no :meth:`after_backward`)."""
        pending = [s[0].label for s in self._slots() if s.effective.grad is not None]
        if pending:
            raise RuntimeError(
                f"The effective weights {pending[:3]} still carry gradients that were not pulled back to their raw "
                "weights, so the optimizer would step without them. Call PCState.after_backward() after the last "
                "micro-batch's backward, before gradient clipping and optimizer.step()."
            )

    @torch.no_grad()
    def after_step(self) -> int:
        """After ``optimizer.step()``: refresh ``u``, ``v`` of every PC weight (and write each once-per-step
        ``W_eff``); returns how many. Collective under FSDP2: every rank must call it.

        Raises:
            RuntimeError: a once-per-step ``W_eff`` still carries a gradient (see :meth:`check_pulled_back`).
        """
        self.check_pulled_back()
        pcs = [pc for _, pc in self.preconditioners()]
        refresh_(pcs, self.num_power_iterations)
        write_(self._slots())
        logger.debug("PCState.after_step: refreshed %d preconditioned weights", len(pcs))
        return len(pcs)

    @torch.no_grad()
    def initialize(self) -> int:
        """Start the PC state of a model built on the meta device, after ``to_empty`` and its own init.

        Once per step, the init wrote ``<module>.weight``: the raw weights take those values. Then, in both
        strategies, ``gamma = 1``, ``u``, ``v`` are re-initialised and refreshed (and ``W_eff`` is written).
        Returns how many weights.
        """
        initialize_(self._slots())
        return reset_preconditioners(self.modules)

    def attach(self, optimizer: torch.optim.Optimizer):
        """Run :meth:`after_step` after every ``optimizer.step()``; returns a handle (``.remove()`` detaches).

        A step post-hook, plus a pre-hook that refuses to step while once-per-step gradients wait for
        :meth:`after_backward`. Any optimizer works, the one the loop steps or one inside it: when the hooked
        optimizer steps inside another one's ``step()`` (a :class:`pcopt.optim.CombinedOptimizer`, a
        ``Spectra`` wrapper, torchtitan's optimizers container), the refresh waits for the outermost step to
        end, so that it sees the final weights (after SPECTRA's clip, for instance).
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"PCState.attach expects a torch.optim.Optimizer, got {type(optimizer).__name__}. Pass the "
                "optimizer whose step() the training loop calls."
            )
        pre = optimizer.register_step_pre_hook(_BeforeStep(self))
        post = optimizer.register_step_post_hook(_AfterStep(self))
        return _Handles(pre, post)

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        """Compute each ``W_eff`` once for all micro-batches run inside the block (per-forward models).

        The block runs the model in the once-per-step strategy (:func:`pcopt.set_strategy`): ``W_eff`` is
        written on entry, the micro-batches accumulate ``dL/dW_eff``, and on a clean exit
        :meth:`after_backward` pulls the sum back to ``W`` and ``gamma`` (``sum_i J^T g_i = J^T sum_i g_i``);
        then the model is per-forward again. Raw weights and ``gamma`` keep their identity, so an optimizer
        built before is unaffected. If the block raises, nothing is pulled back. A model that already runs
        once per step needs no block (it yields at once).

        Raises:
            RuntimeError: on entry for FSDP2 models or when a block is already open for the same weights; on
                exit when a raw weight or ``gamma`` was modified inside the block (the ``W_eff`` written on
                entry would be stale).
        """
        pcs = self.preconditioners()
        busy = [s[0].label for s in self._slots() if s.temporary]
        if busy:
            raise RuntimeError(
                f"once_per_step / PCState.accumulate is already active for {busy[:3]} (nested use or a block "
                "that did not exit). Use one block per optimizer step."
            )
        if not pcs or self.strategy == "once_per_step":  # once per step already: nothing to do
            yield
            return
        _check_not_fsdp2(self.modules, pcs)
        parts = [m for m in self.modules if preconditioners(m)]
        for m in parts:
            set_strategy(m, "once_per_step", pull_back="after_backward")  # one pull-back at the block's exit
        all_slots = self._slots()
        written = [stamp(s) for s in all_slots]
        for s in all_slots:
            s.temporary = True
        clean = False
        try:
            yield
            clean = True
        finally:
            for s in all_slots:
                s.temporary = False
            try:
                if clean:
                    stale = [s[0].label for s, w in zip(all_slots, written) if stamp(s) != w]
                    if stale:
                        raise RuntimeError(
                            f"Preconditioned weights were modified inside once_per_step ({stale[:3]}): the W_eff "
                            "written at entry is stale, so its gradients cannot be mapped back. Call "
                            "optimizer.step() / zero_grad() / pcopt.refresh after the with block, not inside it."
                        )
                    pull_back_(all_slots)
            finally:
                for m in parts:
                    set_strategy(m, "per_forward")  # W_eff and any gradient left on it are dropped


def _check_not_fsdp2(modules: Sequence[nn.Module], pcs) -> None:
    from pcopt._tensor import is_fsdp_module

    sharded = [fqn for fqn, pc in pcs if is_dtensor(pc.raw_weight)]
    wrapped = [fqn or "<root>" for m in modules for fqn, sub in m.named_modules() if is_fsdp_module(sub)]
    if sharded or wrapped:
        where = f"sharded raw weights: {sharded[:3]}" if sharded else f"FSDP2 modules: {wrapped[:3]}"
        raise RuntimeError(
            "PCState.accumulate does not support FSDP2 (fully_shard) models "
            f"({where}). FSDP2 gathers each weight only inside its module's forward and reduce-scatters its "
            "gradient after every micro-batch backward, so a W_eff computed once per step would bypass both "
            "and give wrong gradients. Run the micro-batches without once_per_step under FSDP2 (W_eff is then "
            "recomputed in every micro-batch forward), or use it on unsharded / DDP models."
        )


class _BeforeStep:
    """Step pre-hook of :meth:`PCState.attach`: refuse a step with gradients not yet pulled back."""

    def __init__(self, state: PCState) -> None:
        self.state = state

    def __call__(self, optimizer, args, kwargs) -> None:
        self.state.check_pulled_back()


# The code object of the wrapper that torch.optim.Optimizer puts around every subclass's step() (it runs the
# step hooks); a frame running it is an optimizer step in progress, its ``self`` the optimizer.
_STEP_WRAPPER_CODE = torch.optim.Optimizer.profile_hook_step(lambda *args, **kwargs: None).__code__


def outermost_step(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer | None:
    """The outermost other optimizer whose ``step()`` is running around the caller (None: ``optimizer`` is
    stepped by the loop itself). Read from the Python call stack: only ``torch.optim.Optimizer`` steps count."""
    outer = None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _STEP_WRAPPER_CODE:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, torch.optim.Optimizer) and candidate is not optimizer:
                outer = candidate
        frame = frame.f_back
    return outer


class _AfterStep(_BeforeStep):
    """Step post-hook of :meth:`PCState.attach`: the refresh (and ``W_eff`` write) after every step, deferred to
    the end of the outermost optimizer step when the hooked optimizer is stepped by another one."""

    def __init__(self, state: PCState) -> None:
        super().__init__(state)
        self.deferred = None  # the one-shot post-hook handle on the outer optimizer, while one waits

    def __call__(self, optimizer, args, kwargs) -> None:
        outer = outermost_step(optimizer)
        if outer is None:
            self.state.after_step()
        elif self.deferred is None:
            self.deferred = outer.register_step_post_hook(self._run_deferred)

    def _run_deferred(self, optimizer, args, kwargs) -> None:
        self.deferred.remove()
        self.deferred = None
        self.state.after_step()


class _Handles:
    """The two hook handles of :meth:`PCState.attach`; ``remove()`` removes both."""

    def __init__(self, *handles) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
