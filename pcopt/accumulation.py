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

``once_per_step(model)`` is ``pcopt.PCState(model).accumulate()``; the mechanics are described there.

Not supported under FSDP2 (raw weights are sharded ``DTensor`` s): FSDP2 all-gathers a weight inside the
owning module's forward and frees it afterwards, and reduce-scatters its gradient at the end of each
micro-batch backward. An ``W_eff`` computed outside that window would need a second, unmanaged
all-gather of the full weight, and the gradient accumulated on it would bypass FSDP2's reduce-scatter
(and its gradient divide factor and mixed-precision reduce dtype). ``once_per_step`` raises a
``RuntimeError`` there instead of silently producing wrong gradients.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from torch import nn

from pcopt.registration import preconditioners
from pcopt.state import PCState

__all__ = ["once_per_step"]


@contextlib.contextmanager
def once_per_step(model: nn.Module) -> Iterator[None]:
    """Reuse one ``W_eff`` per preconditioned weight for all micro-batches run inside the block.

    Run every forward/backward of one optimizer step inside the ``with`` block and call
    ``optimizer.step()`` (and gradient clipping) after it: the gradients of the raw weights and of
    ``gamma`` are only complete once the block has exited. Gradients equal those of running the
    micro-batches without the block, up to floating-point summation order. Same as
    :meth:`pcopt.PCState.accumulate`.

    Raises:
        RuntimeError: on entry, for FSDP2-sharded models or when already inside ``once_per_step`` for the
            same weights; on exit, when a raw weight or ``gamma`` was modified inside the block (e.g. an
            optimizer step), since the cached ``W_eff`` would then be stale.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"once_per_step expects an nn.Module, got {type(model).__name__}.")
    if not preconditioners(model):
        warnings.warn(
            "pcopt.accumulation.once_per_step: the model has no preconditioned weights; the block runs "
            "unchanged. Call pcopt.precondition_model(model) first for it to have an effect.",
            UserWarning,
            stacklevel=3,
        )
        yield
        return
    with PCState(model).accumulate():
        yield
