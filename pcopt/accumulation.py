"""Compute each effective weight once per optimizer step across gradient-accumulation micro-batches.

Without this, every micro-batch forward recomputes ``W_eff = gamma * sg(sigma) * p(W / sigma)`` and every
micro-batch backward differentiates through the polynomial again, so the PC cost scales with the number
of micro-batches. The PC map is linear in nothing but its upstream gradient, hence

    sum_i dL_i/dW = J_pc(W)^T (sum_i dL_i/dW_eff),

and one backward through the PC map on the accumulated ``dL/dW_eff`` gives the same gradients for the raw
weight and ``gamma`` as per-micro-batch backward (up to floating-point summation order)::

    with pcopt.accumulation.once_per_step(model):
        for micro_batch in micro_batches:
            loss_fn(model(micro_batch)).backward()
    # gradients of the raw weights and gammas are complete here
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()

On entry each ``W_eff`` is computed once with its autograd graph and a detached copy that requires grad is
installed as the tensor the parametrization returns; micro-batch backward passes accumulate into that
copy's ``.grad``. On a clean exit the accumulated gradients are sent through the PC map in one
``torch.autograd.backward`` call. If the block raises, the cache is dropped and nothing is back-propagated
through the PC map.

Not supported under FSDP2 (raw weights are sharded ``DTensor`` s): FSDP2 all-gathers a weight inside the
owning module's forward and frees it afterwards, and reduce-scatters its gradient at the end of each
micro-batch backward. An ``W_eff`` computed outside that window would need a second, unmanaged
all-gather of the full weight, and the gradient accumulated on it would bypass FSDP2's reduce-scatter
(and its gradient divide factor and mixed-precision reduce dtype). ``once_per_step`` raises a
``RuntimeError`` there instead of silently producing wrong gradients.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from pcopt.parametrizations import _is_dtensor, preconditioners

logger = logging.getLogger(__name__)

__all__ = ["once_per_step"]


def _check_not_fsdp2(model: nn.Module, pcs) -> None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        FSDPModule = ()  # noqa: N806
    sharded = [fqn for fqn, pc in pcs if _is_dtensor(pc.raw_weight)]
    wrapped = [fqn or "<root>" for fqn, m in model.named_modules() if isinstance(m, FSDPModule)]
    if sharded or wrapped:
        where = f"sharded raw weights: {sharded[:3]}" if sharded else f"FSDP2 modules: {wrapped[:3]}"
        raise RuntimeError(
            "pcopt.accumulation.once_per_step does not support FSDP2 (fully_shard) models "
            f"({where}). FSDP2 gathers each weight only inside its module's forward and reduce-scatters its "
            "gradient after every micro-batch backward, so a W_eff computed once per step would bypass both "
            "and give wrong gradients. Run the micro-batches without once_per_step under FSDP2 (W_eff is then "
            "recomputed in every micro-batch forward), or use it on unsharded / DDP models."
        )


@contextlib.contextmanager
def once_per_step(model: nn.Module) -> Iterator[None]:
    """Reuse one ``W_eff`` per preconditioned weight for all micro-batches run inside the block.

    Run every forward/backward of one optimizer step inside the ``with`` block and call
    ``optimizer.step()`` (and gradient clipping) after it: the gradients of the raw weights and of
    ``gamma`` are only complete once the block has exited. Gradients equal those of running the
    micro-batches without the block, up to floating-point summation order.

    Raises:
        RuntimeError: on entry, for FSDP2-sharded models or when already inside ``once_per_step`` for the
            same weights; on exit, when a raw weight or ``gamma`` was modified inside the block (e.g. an
            optimizer step), since the cached ``W_eff`` would then be stale.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"once_per_step expects an nn.Module, got {type(model).__name__}.")
    pcs = preconditioners(model)
    if not pcs:
        warnings.warn(
            "pcopt.accumulation.once_per_step: the model has no preconditioned weights; the block runs "
            "unchanged. Call pcopt.precondition_model(model) first for it to have an effect.",
            UserWarning,
            stacklevel=3,
        )
        yield
        return
    _check_not_fsdp2(model, pcs)
    busy = [fqn for fqn, pc in pcs if pc._cached_weight is not None]
    if busy:
        raise RuntimeError(
            f"once_per_step is already active for {busy[:3]} (nested use or a block that did not exit). "
            "Use one once_per_step block per optimizer step."
        )

    entries: list[tuple[str, object, Tensor, Tensor, tuple[int, int]]] = []
    try:
        with torch.enable_grad():
            for fqn, pc in pcs:
                raw = pc.raw_weight
                eff = pc(raw)  # the full PC map, with its autograd graph to raw and gamma
                leaf = eff.detach().requires_grad_(eff.requires_grad)
                pc._cached_weight = leaf
                entries.append((fqn, pc, eff, leaf, (raw._version, pc.gamma._version)))
    except BaseException:
        for _, pc, *_ in entries:
            pc._cached_weight = None
        raise

    try:
        yield
    finally:
        for _, pc, *_ in entries:
            pc._cached_weight = None

    # Reached only when the block exited cleanly.
    stale = [
        fqn for fqn, pc, _, _, versions in entries if (pc.raw_weight._version, pc.gamma._version) != versions
    ]
    if stale:
        raise RuntimeError(
            f"Preconditioned weights were modified inside once_per_step ({stale[:3]}): the W_eff cached at "
            "entry is stale, so its gradients cannot be mapped back. Call optimizer.step() / zero_grad() "
            "/ pcopt.refresh after the with block, not inside it."
        )
    outputs, grads = [], []
    for _, _, eff, leaf, _ in entries:
        if leaf.grad is not None and eff.requires_grad:
            outputs.append(eff)
            grads.append(leaf.grad)
    if outputs:
        torch.autograd.backward(outputs, grads)
    logger.debug("once_per_step: back-propagated %d of %d effective weights", len(outputs), len(entries))
