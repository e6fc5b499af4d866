"""The once-per-step map and its pull-back, batched over same-shape matrices: the PC layer's kernels.

Every per-step function here runs over *chunks*: slots (:class:`pcopt.slot.PCSlot`) whose local blocks have the
same shape, orientation, dtype, device, mesh and polynomial, stacked along a new leading dim. A chunk's map,
pull-back and all-reduce are one kernel chain and one collective, so the number of kernels grows with the number
of distinct shapes (two or three in a Llama), not with the number of layers. Nothing here reads a tensor on the
host.

* :func:`write_` computes ``W_eff = gamma * sg(sigma) * p(W / sigma)`` into each slot's effective parameter; on
  FSDP2 shards ``p(X) = X q(X^T X)`` uses the small-side Gram, a sum of local Grams (one all-reduce per chunk);
* :func:`pull_back_` maps the accumulated ``dL/dW_eff`` to ``dL/dW`` and ``dL/dgamma`` in closed form (the
  vector-Jacobian product of the Gram polynomial) and clears ``W_eff.grad``;
* :func:`initialize_` inverts the map once, for a model whose init wrote ``W_eff``.

Which weights run here and when is :mod:`pcopt.strategy`'s business; the moments are :class:`pcopt.PCState`'s.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pcopt._tensor import all_reduce_, is_dtensor, like, local_tensor
from pcopt.polynomials import gram_polynomial, gram_polynomial_vjp, horner_chain
from pcopt.power_iteration import sigma_estimate
from pcopt.slot import PCSlot

STACK_ELEMENTS = 1 << 26
"""Elements of raw weight per stacked chunk (256 MiB in fp32): bounds the stack copies and the intermediates
(``A``, ``Y``, ``dA`` of a chunk) while keeping a Llama's same-shape matrices in a few chunks."""


def _oriented(t: Tensor, dim: int) -> Tensor:
    """View of a matrix (or a stack) whose rows run along tensor dim ``dim`` (the sharded / larger one)."""
    return t if dim == 0 else t.mT


def stamp(slot: PCSlot) -> tuple[int, ...]:
    pc = slot[0]
    return (
        local_tensor(slot.original)._version,
        local_tensor(pc.gamma)._version,
        pc.u._version,
        pc.v._version,
    )


def horner_dtype(slot: PCSlot, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the Horner chain on the ``n x n`` Gram: at least fp32 for degree >= 7, else ``compute_dtype``.

    A bf16 map's error on ``W_eff`` is the bf16 rounding of the Gram and the apply (~3e-3 relative) plus the
    Horner chain's cancellation, which grows with the coefficients: at degree 9 a bf16 chain triples the error
    (1.0e-2 vs 3.2e-3 with the chain alone in fp32, 2816x1024 and 5632x2048, ``docs/scale.md``), at degree 5 it
    adds nothing measurable. The chain costs ``2(k-2) n^3`` of the map's ``4 m n^2 + 2(k-2) n^3`` FLOPs.
    """
    if compute_dtype.itemsize < 4 and len(slot[0].coefficients) > 3:
        return torch.promote_types(compute_dtype, torch.float32)
    return compute_dtype


def map_dtype(slot: PCSlot) -> torch.dtype:
    """The dtype of ``slot``'s matmuls: the one given to :func:`set_strategy`, else chosen by where it runs.

    On CUDA, fp32/bf16 weights map in bf16 (fp32 accumulation; reductions, sigma and gamma in fp32): the GPU's
    fp32 matmul rate is ~1/12 of its bf16 rate there, and the bf16 map's error on ``W_eff`` is a few units of
    bf16 rounding (``docs/engine.md``). Elsewhere, and for fp64 weights, at least fp32 (exact to the
    per-forward reference). Resolved at each call, so a model bound on the meta device and materialised on a
    GPU gets the GPU's choice.
    """
    if slot.compute_dtype is not None:
        return slot.compute_dtype
    raw = local_tensor(slot.original)
    if raw.device.type == "cuda" and raw.dtype in (torch.float32, torch.bfloat16):
        return torch.bfloat16
    return torch.promote_types(raw.dtype, torch.float32)


def _chunk_key(slot: PCSlot) -> tuple:
    raw, pc = local_tensor(slot.original), slot[0]
    return (
        tuple(raw.shape), slot.dim, raw.dtype, raw.device, slot.compute_dtype, id(slot.mesh), slot.mesh_dims,
        slot.placements, slot.index is None, tuple(pc.coefficients), pc.eps, pc.gamma.requires_grad,
        pc.row_interleave,
    )  # fmt: skip


def chunks(all_slots: list[PCSlot]) -> list[list[PCSlot]]:
    """Group ``all_slots`` by :func:`_chunk_key` (first-seen order) and cut each group to :data:`STACK_ELEMENTS`.

    Every rank holds the same slots in the same order, so every rank forms the same chunks and issues the same
    collectives in the same order.
    """
    groups: dict[tuple, list[PCSlot]] = {}
    for s in all_slots:
        groups.setdefault(_chunk_key(s), []).append(s)
    out = []
    for group in groups.values():
        per = max(1, STACK_ELEMENTS // max(1, local_tensor(group[0].original).numel()))
        out += [group[i : i + per] for i in range(0, len(group), per)]
    return out


def _stack(chunk: list[PCSlot], tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """``(b, [E, [k,]] rows, n)``: the oriented local matrices of a chunk's blocks, one stack copy (plus one cast)."""
    s0 = chunk[0]
    return _oriented(s0[0].matrices(torch.stack(tensors)), s0.dim).to(dtype)


def _unstacked(chunk: list[PCSlot], M: Tensor) -> Tensor:
    """The inverse of :func:`_stack`'s layout: ``(b, *parameter shape)``, index ``i`` laid out like slot ``i``'s
    parameter (a view of ``M``, or one copy where the slots' rows interleave matrices)."""
    s0 = chunk[0]
    return s0[0].weight_of(_oriented(M, s0.dim))


def _vectors(chunk: list[PCSlot], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(u_local, v_other)`` stacked: the vector along the sharded dim restricted to this rank, and the other."""
    s0 = chunk[0]
    along = torch.stack([s[0].u if s0.dim == 0 else s[0].v for s in chunk])  # (b, [E,] rows)
    other = torch.stack([s[0].v if s0.dim == 0 else s[0].u for s in chunk])
    for s in chunk:  # once: the indices then live where the state does
        if s.index is not None and s.index.device != along.device:
            s.index = s.index.to(along.device)
        if s.experts is not None and s.experts.device != along.device:
            s.experts = s.experts.to(along.device)
    # this rank's experts of a stack sharded on its expert dim (one layout per chunk)
    if s0.experts is not None:
        along, other = along.index_select(1, s0.experts), other.index_select(1, s0.experts)
    if s0.index is not None:
        index = torch.stack([s.index for s in chunk])  # (b, rows_local)
        index = index.view(len(chunk), *[1] * (along.ndim - 2), -1).expand(*along.shape[:-1], -1)
        along = along.gather(-1, index)
    return along.to(dtype), other.to(dtype)


def _partial_sums(A: Tensor, u_loc: Tensor, v_o: Tensor, *more: Tensor) -> list[Tensor]:
    """``[A^T A, A^T M for M in more, u^T A v]`` of this rank's blocks, per matrix of the stack."""
    return [A.mT @ A, *(A.mT @ M for M in more), sigma_estimate(A, u_loc, v_o)]


def _reduced(slot: PCSlot, parts: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """Sum a chunk's partial sums over the ranks that shard its matrices: one all-reduce for all of them."""
    if not slot.mesh_dims:
        return [p.to(dtype) for p in parts]
    buf = torch.cat([p.to(dtype).reshape(-1) for p in parts])
    all_reduce_(buf, slot.mesh, slot.mesh_dims)
    return [b.view(p.shape) for b, p in zip(torch.split(buf, [p.numel() for p in parts]), parts)]


def _gammas(chunk: list[PCSlot], shape: torch.Size, dtype: torch.dtype) -> Tensor:
    return torch.stack([local_tensor(s[0].gamma).detach() for s in chunk]).to(dtype).reshape(shape)


@torch.no_grad()
def _effective(chunk: list[PCSlot]) -> Tensor:
    """The chunk's blocks of ``W_eff = gamma * A q(A^T A / sigma^2)``, ``(b, rows, n)`` in the compute dtype."""
    s0 = chunk[0]
    cd = map_dtype(s0)
    rd = torch.promote_types(cd, torch.float32)  # reductions, sigma and gamma: at least fp32
    with torch.autocast(device_type=local_tensor(s0.original).device.type, enabled=False):
        A = _stack(chunk, [local_tensor(s.original) for s in chunk], cd)
        u_loc, v_o = _vectors(chunk, cd)
        G, sig = _reduced(s0, _partial_sums(A, u_loc, v_o), rd)
        sigma = (sig + s0[0].eps)[..., None, None]
        Q = gram_polynomial((G / sigma**2).to(horner_dtype(s0, cd)), s0[0].coefficients).to(cd)
        return (A @ Q) * _gammas(chunk, sigma.shape, cd)


@torch.no_grad()
def _write_chunk(chunk: list[PCSlot]) -> None:
    eff = _unstacked(chunk, _effective(chunk))  # laid out like the parameters
    torch._foreach_copy_([local_tensor(s.effective) for s in chunk], list(eff.unbind(0)))
    for s in chunk:
        s.stamp = stamp(s)


def write_one(slot: PCSlot) -> None:
    if slot.effective.device.type != "meta":
        _write_chunk([slot])


def write_(all_slots: list[PCSlot]) -> None:
    """``W_eff = PC(W)`` on the shards, written into each ``<module>.weight`` in place (no refresh)."""
    check_layout(all_slots)
    for chunk in chunks([s for s in all_slots if s.effective.device.type != "meta"]):
        _write_chunk(chunk)


def check_layout(all_slots: list[PCSlot]) -> None:
    for s in all_slots:
        w, raw = s.effective, s.original
        placed = [tuple(t.placements) if is_dtensor(t) else None for t in (w, raw)]
        if placed != [s.placements, s.placements]:
            raise RuntimeError(
                f"The effective weight of a PC matrix is placed as {getattr(w, 'placements', 'a plain tensor')}, "
                f"its raw weight as {getattr(raw, 'placements', 'a plain tensor')}: fully_shard was applied after "
                "pcopt.set_strategy (precondition_model sets once per step by default). Apply it inside: "
                "set_strategy(model, 'once_per_step', shard=lambda m, fn: <your fully_shard calls with "
                "shard_placement_fn=fn>), or keep the per-forward registration for your own fully_shard: "
                "pcopt.precondition_model(model, strategy='per_forward')."
            )


def pull_back_(all_slots: list[PCSlot]) -> None:
    """Turn each accumulated ``dL/dW_eff`` (shard) into ``dL/dW`` and ``dL/dgamma``; clear ``W_eff.grad``."""
    check_layout(all_slots)
    stale = [s for s in all_slots if s.stamp is not None and s.stamp != stamp(s)]
    if stale:
        raise RuntimeError(
            f"The raw weights of {[s[0].label for s in stale[:3]]} changed since their effective weights were "
            "written, so the gradients on W_eff belong to an older weight. Call PCState.after_step() after every "
            "optimizer.step() (pcopt.PCState(model).attach(optimizer) does it)."
        )
    pending = []
    for s in all_slots:
        w, grad = s.effective, s.effective.grad
        if grad is None:
            continue
        if is_dtensor(grad) and tuple(grad.placements) != tuple(w.placements):
            raise RuntimeError(
                f"The gradient of {s[0].label} is placed as {grad.placements}, its weight as {w.placements}. "
                "Enable FSDP2 gradient sync for the last micro-batch (model.set_requires_gradient_sync(True)) "
                "before PCState.after_backward()."
            )
        pending.append(s)
    for chunk in chunks(pending):
        _pull_back_chunk(chunk)
        for s in chunk:
            s.effective.grad = None


def _pull_back_chunk(chunk: list[PCSlot]) -> None:
    s0 = chunk[0]
    raw = local_tensor(s0.original)
    dA, dgamma = _raw_gradients(chunk)
    # Laid out like the parameters (contiguous, their dtype), as fused/foreach optimizers require.
    dW = _unstacked(chunk, dA.to(raw.dtype)).contiguous()
    _accumulate([s.original for s in chunk], list(dW.unbind(0)))
    if s0[0].gamma.requires_grad:
        g = local_tensor(s0[0].gamma)
        _accumulate(
            [s[0].gamma for s in chunk], list(dgamma.to(g.dtype).reshape(len(chunk), *g.shape).unbind(0))
        )


@torch.no_grad()
def _raw_gradients(chunk: list[PCSlot]) -> tuple[Tensor, Tensor]:
    """``(dL/dA, dL/dgamma)`` of a chunk from its accumulated ``dL/dW_eff``, in closed form (no autograd graph).

    With ``sigma = u^T W v + eps``, ``H = G / sigma^2`` and ``S = <C, q(H)>`` the loss as a function of the
    reduced quantities is ``L = gamma sg(sigma)/sigma S`` (equal to ``sum_r <Y_r, W_eff_r>``), so

    - ``dL/dC = gamma q(H)``, ``dL/dgamma = S``;
    - ``dL/dG = dH / sigma^2`` with ``dH`` the reverse-mode Horner of ``dL/dq = gamma C``;
    - ``dL/dsigma = -(2 <dH, H> + gamma S) / sigma`` (through ``H`` and through ``sg(sigma)/sigma``);

    and the chain rule through this rank's partial sums ``A^T A``, ``A^T Y``, ``u^T A v`` (linear Jacobians)
    gives ``dL/dA_r = A_r (dG + dG^T) + Y_r dC^T + dsigma u_r v^T``. Every ``sigma`` stays on the device.
    """
    s0 = chunk[0]
    pc = s0[0]
    cd = map_dtype(s0)
    rd = torch.promote_types(cd, torch.float32)
    with torch.autocast(device_type=local_tensor(s0.original).device.type, enabled=False):
        # Partial sums of this rank's blocks A of the raw weights and Y of dL/dW_eff, summed over the ranks:
        # G = sum A_r^T A_r, C = sum A_r^T Y_r, u^T W v (one all-reduce of b (2 n^2 + 1) floats per chunk).
        A = _stack(chunk, [local_tensor(s.original).detach() for s in chunk], cd)
        Y = _stack(chunk, [local_tensor(s.effective.grad).detach() for s in chunk], cd)
        u_loc, v_o = _vectors(chunk, cd)
        G, C, sig = _reduced(s0, _partial_sums(A, u_loc, v_o, Y), rd)
        gamma = _gammas(chunk, sig.shape, rd)
        sigma = sig + pc.eps
        hd = horner_dtype(s0, cd)
        H = (G / (sigma**2)[..., None, None]).to(hd)
        chain = horner_chain(H, pc.coefficients)
        Q = chain[-1].to(cd).to(rd)  # the q(H) the map applied (rounded to the compute dtype)
        S = (C * Q).sum((-2, -1))
        dC = gamma[..., None, None] * Q
        dH = gram_polynomial_vjp(H, chain, pc.coefficients, (gamma[..., None, None] * C).to(hd)).to(rd)
        dG = dH / (sigma**2)[..., None, None]
        dsig = -(2 * (dH * H.to(rd)).sum((-2, -1)) + gamma * S) / sigma
        dG, dC, dsig = dG.to(cd), dC.to(cd), dsig.to(cd)
        dA = Y @ dC.mT + A @ (dG + dG.mT) + dsig[..., None, None] * u_loc[..., :, None] * v_o[..., None, :]
    return dA, S


def _accumulate(params: list[nn.Parameter], local_grads: list[Tensor]) -> None:
    """``param.grad += local_grad``: one foreach add for those that have a gradient, a new one for the rest."""
    old = [(local_tensor(p.grad), g) for p, g in zip(params, local_grads) if p.grad is not None]
    if old:
        torch._foreach_add_(*map(list, zip(*old)))
    for p, g in zip(params, local_grads):
        if p.grad is not None:
            continue
        p.grad = like(p, g)


@torch.no_grad()
def initialize_(all_slots: list[PCSlot]) -> None:
    """Start each PC state from the current ``W_eff`` parameter values (after a meta-device build and init)."""
    check_layout(all_slots)
    for s in all_slots:
        local_tensor(s.original).copy_(local_tensor(s.effective))
        pc = s[0]
        pc.reset_state()  # gamma <- 1, fresh u, v and settings; PCState refreshes and writes W_eff next
