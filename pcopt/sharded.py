"""The PC layer at scale: ``W_eff`` computed once per optimizer step, on FSDP2 shards (:func:`distribute`).

The parametrize registration (:func:`pcopt.precondition_model`) declares PC and is the single-device
reference. Under it every micro-batch forward runs the full-matrix polynomial on every rank and autograd keeps
its intermediates. This module is another way to execute the same declaration, the way mixed-precision master
weights work:

* the module's forward weight ``module.weight`` holds ``W_eff`` as an ordinary parameter, so FSDP2 all-gathers,
  reshards, reduce-scatters and casts it like any ``Linear`` weight, and ``torch.compile`` / activation
  checkpointing see a plain ``Linear``;
* the PC state lives next to it in ``module.pc`` (:class:`PCShardState`): the raw weight ``W`` (sharded like
  ``W_eff``) and ``gamma`` are the parameters the optimizer updates, ``u``, ``v`` are buffers;
* :meth:`ShardedPC.after_backward` (after the last micro-batch's backward) turns the accumulated,
  reduce-scattered ``dL/dW_eff`` shard into ``dL/dW`` and ``dL/dgamma``; gradient clipping and the optimizer
  then see raw gradients; ``W_eff.grad`` is cleared;
* :meth:`ShardedPC.after_step` (after ``optimizer.step()``) refreshes ``u``, ``v`` and writes
  ``W_eff = PC(W)``, computed on the shards, into FSDP2's sharded parameter in place.

Each PC matrix is sharded on its larger dimension (:func:`shard_placement_fn`). The Gram matrix of the smaller
side is then a sum of local Grams and ``p(X) = X q(X^T X)`` is computed locally once that ``n x n`` sum has
been all-reduced. The pull-back needs the same Gram and ``C = W^T dL/dW_eff``; both go into a single
all-reduce. The cost model, the design choices and measurements are in ``docs/scale.md``.

Usage (every rank)::

    pcopt.precondition_model(model)                       # the declaration, as for one device
    pc = pcopt.sharded.distribute(model, shard)           # shard(model, placement_fn) applies fully_shard
    optimizer = pcopt.optim.AdamW(pc.optimizer_parameters(model), ...)
    for step in ...:
        for micro_batch in ...:
            loss(model(micro_batch)).backward()
        pc.after_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        pc.after_step()
        optimizer.zero_grad()

``shard`` is where the model is wrapped, e.g. ``lambda m, fn: [fully_shard(b, shard_placement_fn=fn) for b in
m.layers] and fully_shard(m, shard_placement_fn=fn)``: FSDP2 manages only the parameters present when
``fully_shard`` runs, so the conversion to ``W_eff`` must come before it and the PC state is registered after
it (FSDP2 never gathers the raw weight). Without ``shard`` the model stays unsharded (one device).

Checkpoints hold the PC state (raw ``W``, ``gamma``, ``u``, ``v``, settings), not ``W_eff``, which is recomputed
when a state_dict is loaded. :func:`to_parametrize_keys` / :func:`from_parametrize_keys` convert between these
keys and the parametrize path's, so checkpoints move between the two modes in both directions.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parametrize

import pcopt
from pcopt.names import pc_keys, pc_module_of_key
from pcopt.spectral import init_singular_vectors, power_iteration_

logger = logging.getLogger(__name__)

__all__ = [
    "HOLDER",
    "PCShardState",
    "ShardedPC",
    "distribute",
    "from_parametrize_keys",
    "shard_placement_fn",
    "to_parametrize_keys",
]

HOLDER = "pc"
"""Name of the child module that holds a weight's PC state in the sharded mode (``<module>.pc.raw`` ...)."""

_STATE_FIELDS = ("raw", "gamma", "u", "v", "pc_meta")
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


# -- the state ------------------------------------------------------------------------------------------------
class PCShardState(nn.Module):
    """The PC state of one weight in the sharded mode, registered as ``<module>.pc``.

    ``raw`` (the raw weight ``W``, placed like ``<module>.weight``) and ``gamma`` (shape ``(1,)``, replicated)
    are parameters; ``u``, ``v`` (power-iteration vectors, replicated) and ``pc_meta`` (``eps`` and the
    polynomial's coefficients, checked when a checkpoint is loaded) are buffers. It is state, not a layer.
    """

    def __init__(self, raw: Tensor, gamma: Tensor, u: Tensor, v: Tensor, meta: Tensor, learn_gamma: bool):
        super().__init__()
        self.raw = nn.Parameter(raw, requires_grad=True)
        self.gamma = nn.Parameter(gamma, requires_grad=learn_gamma)
        self.register_buffer("u", u)
        self.register_buffer("v", v)
        self.register_buffer("pc_meta", meta)

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            "PCShardState holds the PC state of a weight (raw weight, gamma, u, v); it has no forward. The "
            "module's forward uses <module>.weight, the effective weight written by ShardedPC.after_step()."
        )


@dataclass
class _Entry:
    """One PC weight: where it lives and its settings (the tensors are always read from the modules)."""

    fqn: str  # of the effective weight, "<module>.weight"
    module: nn.Module
    coefficients: tuple[float, ...]
    eps: float
    num_power_iterations: int
    shape: tuple[int, int]
    dim: int = 0  # tensor dim along which the rows of the oriented matrix run (the sharded / larger one)
    mesh: Any = None
    mesh_dims: tuple[int, ...] = ()  # mesh dims that shard `dim`
    index: Tensor | None = None  # this rank's indices along `dim` (None: all)
    stamp: tuple[int, ...] | None = field(
        default=None, repr=False
    )  # versions of raw, gamma at the W_eff write

    @property
    def state(self) -> PCShardState:
        return self.module._modules[HOLDER]

    @property
    def weight(self) -> Tensor:
        return self.module._parameters["weight"]


def _larger_dim(shape: tuple[int, ...]) -> int:
    return 0 if shape[0] >= shape[1] else 1


def _meta_tensor(coefficients: tuple[float, ...], eps: float) -> Tensor:
    return torch.tensor([eps, *coefficients], dtype=torch.float64)


def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _is_dtensor(t) else t


# -- placement ------------------------------------------------------------------------------------------------
def shard_placement_fn(model: nn.Module) -> Callable[[nn.Parameter], Any]:
    """A ``shard_placement_fn`` for ``fully_shard`` that shards every PC weight of ``model`` on its larger dim.

    Works on a preconditioned model (before :func:`distribute`: the raw weight is the parameter that becomes
    ``<module>.weight``) and on a distributed one. Other parameters get FSDP2's default (``Shard(0)``).
    FSDP2 requires dims other than 0 to divide evenly by the shard count.
    """
    from torch.distributed.tensor import Shard

    if not isinstance(model, nn.Module):
        raise TypeError(f"shard_placement_fn expects an nn.Module, got {type(model).__name__}.")
    table: dict[int, Shard] = {}
    for _, pc in pcopt.preconditioners(model):
        raw = pc.raw_weight
        if raw.ndim == 2:
            table[id(raw)] = Shard(_larger_dim(tuple(raw.shape)))
    for mod in model.modules():
        if isinstance(mod._modules.get(HOLDER), PCShardState) and "weight" in mod._parameters:
            table[id(mod._parameters["weight"])] = Shard(_larger_dim(tuple(mod.weight.shape)))

    def placement(param: nn.Parameter):
        return table.get(id(param))

    return placement


# -- the map on shards ----------------------------------------------------------------------------------------
def _q_of_gram(G: Tensor, coefficients: tuple[float, ...]) -> Tensor:
    """``q(G) = a_0 I + a_1 G + ... + a_k G^k`` by Horner's rule (out of place; one ``addmm`` per step)."""
    k = G.shape[-1]
    eye = torch.eye(k, dtype=G.dtype, device=G.device)
    if len(coefficients) == 1:
        return eye * coefficients[0]
    Q = torch.add(eye * coefficients[-2], G, alpha=coefficients[-1])
    for a in reversed(coefficients[:-2]):
        Q = torch.addmm(eye, G, Q, beta=a)
    return Q


def _all_reduce(buf: Tensor, entry: _Entry) -> None:
    """Sum ``buf`` over the mesh dims that shard the entry's weight (nothing when it is not sharded)."""
    for d in entry.mesh_dims:
        group = entry.mesh.get_group(d)
        if buf.device.type != "cpu" and dist.get_backend(group) == "gloo":
            host = buf.cpu()
            dist.all_reduce(host, group=group)
            buf.copy_(host)
        else:
            dist.all_reduce(buf, group=group)


def _oriented(t: Tensor, dim: int) -> Tensor:
    """View of a matrix whose rows run along tensor dim ``dim`` (the sharded one)."""
    return t if dim == 0 else t.mT


def _vectors(entry: _Entry, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(u_local, v_other)``: the vector along the sharded dim restricted to this rank, and the other one."""
    state = entry.state
    along, other = (state.u, state.v) if entry.dim == 0 else (state.v, state.u)
    if entry.index is not None:
        along = along[entry.index.to(along.device)]
    return along.to(dtype), other.to(dtype)


class ShardedPC:
    """Owner of the PC state of a model in the sharded, once-per-step mode (built by :func:`distribute`).

    One entry point per moment of a training step: :meth:`after_backward` (pull-back of the gradients),
    :meth:`after_step` (refresh ``u``, ``v``; write ``W_eff``). Also :meth:`initialize` after a meta-device
    model is materialised and initialised, :meth:`write_effective_weights` after tensors were loaded in place,
    and :meth:`optimizer_parameters` (the model's parameters without the ``W_eff`` ones). Every method that
    touches sharded weights is collective: call it on every rank.

    Attributes:
        compute_dtype: dtype of the map's matmuls (fp32 default; bf16 optional). Reductions (the Gram
            all-reduce), ``sigma``, ``gamma`` and the power iteration stay fp32; ``torch.autocast`` does not
            change any of it.
    """

    def __init__(self, entries: list[_Entry], compute_dtype: torch.dtype) -> None:
        self._entries = entries
        self.compute_dtype = compute_dtype
        self._warned_heal: set[str] = set()

    # -- introspection ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"ShardedPC({len(self)} preconditioned weights, compute_dtype={self.compute_dtype})"

    @property
    def names(self) -> list[str]:
        """FQNs of the effective weights (``<module>.weight``), in a rank-independent order."""
        return [e.fqn for e in self._entries]

    def states(self) -> list[tuple[str, PCShardState]]:
        """``(fqn of the effective weight, PCShardState)`` of every PC weight."""
        return [(e.fqn, e.state) for e in self._entries]

    def effective_weights(self) -> list[Tensor]:
        """The ``W_eff`` parameters (``<module>.weight``); they belong to FSDP2, not to the optimizer."""
        return [e.weight for e in self._entries]

    def optimizer_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        """``model.named_parameters()`` without the ``W_eff`` parameters: what the optimizer should update.

        (An optimizer that holds ``W_eff`` anyway skips it: :meth:`after_backward` leaves its ``.grad`` None,
        and :meth:`after_step` overwrites it.)
        """
        skip = {id(w) for w in self.effective_weights()}
        for name, p in model.named_parameters():
            if id(p) not in skip:
                yield name, p

    # -- checks ----------------------------------------------------------------------------------------------
    def _check_layout(self) -> None:
        for e in self._entries:
            w, raw = e.weight, e.state.raw
            if (
                _is_dtensor(w) != (e.mesh is not None)
                or _is_dtensor(w) != _is_dtensor(raw)
                or (_is_dtensor(w) and tuple(w.placements) != tuple(raw.placements))
            ):
                raise RuntimeError(
                    f"{e.fqn} is placed differently from its raw weight {e.fqn[: -len('weight')]}{HOLDER}.raw "
                    f"({getattr(w, 'placements', 'plain tensor')} vs {getattr(raw, 'placements', 'plain tensor')})."
                    " fully_shard was applied after pcopt.sharded.distribute; apply it inside distribute "
                    "instead: distribute(model, lambda m, placement_fn: <your fully_shard calls>)."
                )

    def _stamp(self, e: _Entry) -> tuple[int, ...]:
        s = e.state
        return (_local(s.raw)._version, _local(s.gamma)._version, s.u._version, s.v._version)

    # -- the map ---------------------------------------------------------------------------------------------
    def _autocast_off(self, device: torch.device):
        return torch.autocast(device_type=device.type, enabled=False)

    @torch.no_grad()
    def _effective_local(self, e: _Entry) -> Tensor:
        """This rank's block of ``W_eff = gamma * A q(A^T A / sigma^2)`` (one all-reduce of n*n + 1 floats)."""
        s = e.state
        raw = _local(s.raw)
        cd = self.compute_dtype
        with self._autocast_off(raw.device):
            A = _oriented(raw, e.dim).to(cd)
            u_loc, v_o = _vectors(e, cd)
            buf = torch.cat([(A.mT @ A).reshape(-1).float(), (u_loc @ A @ v_o).float().reshape(1)])
            _all_reduce(buf, e)
            n = A.shape[1]
            sigma = buf[-1] + e.eps
            G = (buf[:-1].view(n, n) / sigma**2).to(cd)
            eff = (A @ _q_of_gram(G, e.coefficients)) * _local(s.gamma).float().to(cd)
        return _oriented(eff, e.dim)

    @torch.no_grad()
    def write_effective_weights(self) -> None:
        """``W_eff = PC(W)`` on the shards, written into ``<module>.weight`` in place (no refresh of ``u``, ``v``).

        :meth:`after_step` calls it; call it yourself after loading raw weights in place (e.g. ``dcp.load``
        into ``model.state_dict()`` without ``load_state_dict``). ``load_state_dict`` calls it per weight.
        """
        self._check_layout()
        for e in self._entries:
            self._write_one(e)

    @torch.no_grad()
    def _write_one(self, e: _Entry) -> None:
        w = e.weight
        if w.device.type == "meta":
            return
        _local(w).copy_(self._effective_local(e).to(w.dtype))
        e.stamp = self._stamp(e)

    # -- the moments of a step -------------------------------------------------------------------------------
    def after_backward(self) -> None:
        """After the last micro-batch's backward, before gradient clipping and ``optimizer.step()``.

        For every PC weight: pulls the accumulated (FSDP2: reduce-scattered) ``dL/dW_eff`` shard back through
        the map into ``raw.grad`` and ``gamma.grad`` (accumulated if they exist), then sets ``W_eff.grad`` to
        None. The map's ``n x n`` part is differentiated by autograd; the chain rule to the shard uses the
        linear Jacobians of the local partial sums (two matmuls of the shard's size). One all-reduce of ``2 n^2 + 1`` floats per weight; ``gamma``'s gradient comes out of it on every
        rank, so no other collective is needed.

        Raises:
            RuntimeError: when a raw weight or ``gamma`` changed since ``W_eff`` was written (an optimizer step
                without :meth:`after_step`), or when a gradient is not placed like its weight (FSDP2 gradient
                sync was disabled for the last backward).
        """
        self._check_layout()
        stale = [e.fqn for e in self._entries if e.stamp is not None and e.stamp != self._stamp(e)]
        if stale:
            raise RuntimeError(
                f"The raw weights of {stale[:3]} changed since their effective weights were written, so the "
                "gradients on W_eff belong to an older weight. Call pc.after_step() after every "
                "optimizer.step() (and pc.write_effective_weights() after loading weights in place)."
            )
        for e in self._entries:
            grad = e.weight.grad
            if grad is None:
                continue
            if _is_dtensor(grad) and tuple(grad.placements) != tuple(e.weight.placements):
                raise RuntimeError(
                    f"The gradient of {e.fqn} is placed as {grad.placements}, its weight as "
                    f"{e.weight.placements}. Enable FSDP2 gradient sync for the last micro-batch "
                    "(model.set_requires_gradient_sync(True)) before calling pc.after_backward()."
                )
            self._pull_back(e, _local(grad))
            e.weight.grad = None

    def _pull_back(self, e: _Entry, y_local: Tensor) -> None:
        s = e.state
        raw = _local(s.raw)
        cd = self.compute_dtype
        learn_gamma = s.gamma.requires_grad
        with self._autocast_off(raw.device):
            # 1. Local partial sums of this rank's block A of the raw weight.
            A = _oriented(raw.detach(), e.dim).to(cd)
            Y = _oriented(y_local.detach(), e.dim).to(cd)
            u_loc, v_o = _vectors(e, cd)
            parts = [A.mT @ A, A.mT @ Y, u_loc @ A @ v_o]
            n = A.shape[1]
            buf = torch.cat([p.float().reshape(-1) for p in parts])
            _all_reduce(buf, e)  # [G = sum A_r^T A_r, C = sum A_r^T Y_r, u^T W v]
            # 2. The loss as a function of the reduced quantities: L = gamma sg(sigma)/sigma <C, q(G/sigma^2)>,
            #    equal to sum_r <Y_r, W_eff_r>. Its gradients are the totals over all ranks.
            G = buf[: n * n].view(n, n).to(cd).requires_grad_(True)
            C = buf[n * n : 2 * n * n].view(n, n).to(cd).requires_grad_(True)
            sig = buf[-1:].clone().requires_grad_(True)
            gamma = _local(s.gamma).detach().float().clone().requires_grad_(learn_gamma)
            with torch.enable_grad():
                sigma = sig + e.eps
                Q = _q_of_gram(G / (sigma**2).to(cd), e.coefficients)
                L = (gamma * (sigma.detach() / sigma) * (C.float() * Q.float()).sum()).sum()
                inputs = [G, C, sig] + ([gamma] if learn_gamma else [])
                grads = torch.autograd.grad(L, inputs)
            # 3. Chain rule through this rank's partial sums A^T A, A^T Y, u^T A v (their Jacobians are linear):
            #    dL/dA_r = A_r (dG + dG^T) + Y_r dC^T + dsigma u_r v^T.
            dG, dC, dsig = grads[0], grads[1], grads[2].to(cd)
            dA = torch.addmm(Y @ dC.mT, A, dG + dG.mT)
            dA.addr_(u_loc, v_o, alpha=float(dsig))
        self._accumulate(s.raw, _oriented(dA, e.dim).to(raw.dtype))
        if learn_gamma:
            self._accumulate(s.gamma, grads[3].to(_local(s.gamma).dtype))

    @staticmethod
    def _accumulate(param: nn.Parameter, local_grad: Tensor) -> None:
        if param.grad is not None:
            _local(param.grad).add_(local_grad)
            return
        if _is_dtensor(param):
            from torch.distributed.tensor import DTensor

            param.grad = DTensor.from_local(
                local_grad.contiguous(),
                param.device_mesh,
                param.placements,
                shape=param.shape,
                stride=param.stride(),
            )
        else:
            param.grad = local_grad

    @torch.no_grad()
    def after_step(self) -> int:
        """After ``optimizer.step()``: refresh ``u``, ``v`` (warm-started power iteration on the shards, vector
        all-reduces only), then write ``W_eff = PC(W)`` into every ``<module>.weight``. Returns how many.

        Raises:
            RuntimeError: when a ``W_eff`` still carries a gradient, i.e. :meth:`after_backward` was not called
                after the last backward (the optimizer would have stepped without the PC gradients).
        """
        self._check_layout()
        pending = [e.fqn for e in self._entries if e.weight.grad is not None]
        if pending:
            raise RuntimeError(
                f"pc.after_step() found gradients on the effective weights {pending[:3]}: they were not pulled "
                "back to the raw weights, so the optimizer stepped without them. Call pc.after_backward() "
                "after the last micro-batch's backward, before gradient clipping and optimizer.step()."
            )
        self.refresh()
        self.write_effective_weights()
        return len(self._entries)

    @torch.no_grad()
    def refresh(self) -> None:
        """Warm-started power iteration on the raw shards (``pcopt.spectral.power_iteration_``); heals NaN state."""
        live = [e for e in self._entries if e.state.raw.device.type != "meta"]
        self._heal(live, "was not finite or had zero norm before refresh")
        by_iters: dict[int, list[_Entry]] = {}
        for e in live:
            by_iters.setdefault(e.num_power_iterations, []).append(e)
        for iters, group in by_iters.items():
            power_iteration_(
                [e.state.raw for e in group], [e.state.u for e in group], [e.state.v for e in group], iters
            )
        self._heal(live, "became non-finite or zero during refresh (non-finite or zero weight?)")

    def _heal(self, entries: Iterable[_Entry], reason: str) -> None:
        for e in entries:
            s = e.state
            ok = all(
                bool(torch.isfinite(x).all()) and float(torch.linalg.vector_norm(x)) > 0.5 for x in (s.u, s.v)
            )
            if ok:
                continue
            if e.fqn not in self._warned_heal:
                self._warned_heal.add(e.fqn)
                warnings.warn(
                    f"pcopt: power-iteration state of {e.fqn} {reason}; re-initialised u and v (check the "
                    "weight and its gradients for inf/nan). Shown once per weight.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            u, v = init_singular_vectors(e.shape)
            s.u.copy_(u)
            s.v.copy_(v)

    @torch.no_grad()
    def initialize(self) -> None:
        """Start the PC state from the current ``<module>.weight`` values, as registration does.

        For a model built on the meta device: after ``to_empty`` and the model's own initialisation (which
        writes ``<module>.weight``), the raw weight takes those values, ``gamma = 1``, ``u``, ``v`` are
        re-initialised and refreshed, and ``W_eff`` is written.
        """
        self._check_layout()
        for e in self._entries:
            s = e.state
            _local(s.raw).copy_(_local(e.weight))
            _local(s.gamma).fill_(1.0)
            u, v = init_singular_vectors(e.shape)
            s.u.copy_(u)
            s.v.copy_(v)
            s.pc_meta.copy_(_meta_tensor(e.coefficients, e.eps))
        self.refresh()
        self.write_effective_weights()


# -- construction ---------------------------------------------------------------------------------------------
def distribute(
    model: nn.Module,
    shard: Callable[[nn.Module, Callable[[nn.Parameter], Any]], Any] | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> ShardedPC:
    """Switch a preconditioned model to the sharded once-per-step mode and return its :class:`ShardedPC`.

    Every PC registration of ``model`` (:func:`pcopt.precondition_model`) is replaced by a plain
    ``<module>.weight`` parameter that holds ``W_eff``, with the PC state in ``<module>.pc``. Then
    ``shard(model, placement_fn)`` is called: apply ``fully_shard`` there, passing
    ``shard_placement_fn=placement_fn`` (each PC matrix sharded on its larger dim). Afterwards the raw weights
    are registered with the same placements as ``W_eff`` (outside FSDP2, which never gathers them) and the
    first ``W_eff`` is written. ``shard=None`` keeps the model unsharded.

    Args:
        model: a model preconditioned with :func:`pcopt.precondition_model` (or :func:`pcopt.precondition`),
            not yet sharded; every rank builds it with the same values (or on the meta device, then call
            :meth:`ShardedPC.initialize` after initialising it).
        shard: ``(model, placement_fn) -> Any`` that applies ``fully_shard``; its return value is ignored.
        compute_dtype: ``torch.float32`` (default), ``torch.bfloat16`` or ``torch.float64``: dtype of the
            map's matmuls (reductions stay fp32).

    Raises:
        TypeError: ``model`` is not a module, ``shard`` not callable, ``compute_dtype`` not a dtype.
        ValueError: no PC weights, a weight that is not a matrix, already distributed, already sharded, a
            bad ``compute_dtype``, or ``shard`` placed a weight in a way the mode cannot use.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"distribute expects an nn.Module, got {type(model).__name__}.")
    if shard is not None and not callable(shard):
        raise TypeError(
            f"distribute: shard must be a callable (model, placement_fn) that applies fully_shard, got "
            f"{type(shard).__name__}."
        )
    if not isinstance(compute_dtype, torch.dtype):
        raise TypeError(f"compute_dtype must be a torch.dtype, got {type(compute_dtype).__name__}.")
    if compute_dtype not in _COMPUTE_DTYPES:
        raise ValueError(
            f"compute_dtype must be one of {[str(d) for d in _COMPUTE_DTYPES]}, got {compute_dtype}. Use "
            "torch.float32 (default) or torch.bfloat16."
        )
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, PCShardState) for m in model.modules()):
        raise ValueError(
            "distribute: the model is already in the sharded PC mode (it has PCShardState modules). Call "
            "distribute once per model."
        )
    wrapped = [n or "<root>" for n, m in model.named_modules() if isinstance(m, FSDPModule)]
    pcs = pcopt.preconditioners(model)
    if wrapped or any(_is_dtensor(pc.raw_weight) for _, pc in pcs):
        raise ValueError(
            f"distribute: the model is already sharded (fully_shard was applied to {wrapped[:3]}). Call "
            "pcopt.sharded.distribute(model, shard) on the unsharded preconditioned model and apply "
            "fully_shard inside shard."
        )
    if not pcs:
        raise ValueError(
            "distribute: the model has no preconditioned weights. Call pcopt.precondition_model(model) first."
        )
    for fqn, pc in pcs:
        if tuple(pc.batch_shape) or pc.raw_weight.ndim != 2:
            raise ValueError(
                f"distribute supports PC matrices (2-D weights); {fqn} has shape {tuple(pc.raw_weight.shape)}. "
                "Run batched (3-D) PC weights through the parametrize path (do not distribute this model)."
            )
        if not fqn.endswith(".weight"):
            raise ValueError(
                f"distribute supports PC on parameters named 'weight'; got {fqn}. Precondition "
                "module.weight, or run this model through the parametrize path."
            )
    placement_fn = shard_placement_fn(model)

    entries: list[_Entry] = []
    pending: list[tuple[_Entry, Tensor, Tensor, Tensor, bool]] = []
    for fqn, pc in pcs:
        module = model.get_submodule(fqn[: -len(".weight")])
        if HOLDER in module._modules or hasattr(module, HOLDER):
            raise ValueError(
                f"distribute: {fqn[: -len('.weight')]} already has an attribute {HOLDER!r}; the sharded PC mode "
                f"stores the PC state there. Rename that attribute."
            )
        raw = pc.raw_weight
        entry = _Entry(
            fqn=fqn,
            module=module,
            coefficients=tuple(float(c) for c in pc.coefficients),
            eps=float(pc.eps),
            num_power_iterations=int(pc.num_power_iterations),
            shape=tuple(raw.shape),
        )
        gamma = pc.gamma.detach().clone().reshape(1)
        pending.append(
            (entry, gamma, pc.u.detach().clone(), pc.v.detach().clone(), bool(pc.gamma.requires_grad))
        )
        # module.weight becomes the raw Parameter object itself (values and identity kept): FSDP2 shards it,
        # and its local shard is copied into the raw state below before W_eff overwrites it.
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        entries.append(entry)

    if shard is not None:
        shard(model, placement_fn)

    pc_mode = ShardedPC(entries, compute_dtype)
    for entry, gamma, u, v, learn_gamma in pending:
        _bind(pc_mode, entry, gamma, u, v, learn_gamma)
    _warn_small_dim(entries)
    pc_mode.write_effective_weights()
    logger.info(
        "sharded PC mode: %d weights, compute dtype %s, %d sharded",
        len(entries),
        compute_dtype,
        sum(bool(e.mesh_dims) for e in entries),
    )
    return pc_mode


def _bind(owner: ShardedPC, entry: _Entry, gamma: Tensor, u: Tensor, v: Tensor, learn_gamma: bool) -> None:
    """Register ``<module>.pc`` with the raw weight placed like ``<module>.weight`` (after fully_shard)."""
    w = entry.module._parameters["weight"]
    meta = _meta_tensor(entry.coefficients, entry.eps).to(u.device)
    if not _is_dtensor(w):
        entry.dim = _larger_dim(entry.shape)
        state = PCShardState(w.detach().clone(), gamma.to(w.device), u, v, meta, learn_gamma)
        _attach(owner, entry, state)
        return
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor

    mesh, placements = w.device_mesh, tuple(w.placements)
    if any(isinstance(p, Partial) for p in placements):
        raise ValueError(
            f"distribute: {entry.fqn} has a Partial placement {placements}; expected Shard/Replicate."
        )
    shard_dims = {p.dim for p in placements if p.is_shard()}
    if len(shard_dims) > 1 or any(p.is_shard() and type(p).__name__ != "Shard" for p in placements):
        raise ValueError(
            f"distribute: {entry.fqn} is placed as {placements}; the sharded PC mode needs every sharded mesh "
            "dim to shard the same tensor dim with plain Shard placements (FSDP2 or HSDP). Shard it with "
            "pcopt.sharded.shard_placement_fn(model) only."
        )
    entry.dim = shard_dims.pop() if shard_dims else _larger_dim(entry.shape)
    entry.mesh = mesh
    entry.mesh_dims = tuple(i for i, p in enumerate(placements) if p.is_shard())
    if entry.mesh_dims:
        size = entry.shape[entry.dim]
        shape2d = (size, 1) if entry.dim == 0 else (1, size)
        ar = torch.arange(size).view(shape2d)
        entry.index = distribute_tensor(ar, mesh, placements, src_data_rank=None).to_local().reshape(-1).cpu()
    local_raw = _local(w).detach().clone()
    raw = DTensor.from_local(local_raw, mesh, placements, shape=w.shape, stride=w.stride())
    g = DTensor.from_local(gamma.to(local_raw.device), mesh, [Replicate()] * mesh.ndim)
    state = PCShardState(raw, g, u.to(local_raw.device), v.to(local_raw.device), meta, learn_gamma)
    _attach(owner, entry, state)


def _attach(owner: ShardedPC, entry: _Entry, state: PCShardState) -> None:
    entry.module.add_module(HOLDER, state)
    entry.module.register_state_dict_post_hook(_DropEffective())
    entry.module.register_load_state_dict_pre_hook(_KeepEffective())
    state.register_load_state_dict_pre_hook(_CheckMeta(entry))
    state.register_load_state_dict_post_hook(_Rewrite(owner, entry))


class _DropEffective:
    """state_dict: leave ``<module>.weight`` (W_eff) out; the PC state in ``<module>.pc`` defines it."""

    def __call__(self, module, state_dict, prefix, local_metadata) -> None:
        state_dict.pop(prefix + "weight", None)


class _KeepEffective:
    """load_state_dict: ``<module>.weight`` is not expected (it is recomputed from the loaded PC state)."""

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "weight"
        if key not in state_dict and HOLDER in module._modules:
            state_dict[key] = module._parameters["weight"].detach()  # loads onto itself: a no-op copy


class _CheckMeta:
    def __init__(self, entry: _Entry) -> None:
        self.entry = entry

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "pc_meta"
        if key not in state_dict:
            return
        ours = _meta_tensor(self.entry.coefficients, self.entry.eps)
        theirs = state_dict[key].detach().to("cpu", torch.float64).flatten()
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-2, atol=0.0):
            raise RuntimeError(
                f"The checkpoint's PC state at '{key}' holds eps and coefficients {theirs.tolist()}, but "
                f"{self.entry.fqn} is preconditioned with {ours.tolist()}. Precondition the model with the "
                "checkpoint's settings (pcopt.PCOptions) before distribute to resume it."
            )


class _Rewrite:
    """After a load into ``<module>.pc``: recompute ``W_eff`` from the loaded state (collective when sharded)."""

    def __init__(self, owner: ShardedPC, entry: _Entry) -> None:
        self.owner = owner
        self.entry = entry

    def __call__(self, module, incompatible_keys) -> None:
        self.owner._write_one(self.entry)


def _warn_small_dim(entries: list[_Entry]) -> None:
    bad = [
        f"{e.fqn} {e.shape} on dim {e.dim}"
        for e in entries
        if e.mesh_dims and e.shape[e.dim] < e.shape[1 - e.dim]
    ]
    if bad:
        warnings.warn(
            f"pcopt.sharded: {bad[:3]} are sharded on their smaller dim, so their Gram matrix (and its "
            "all-reduce) is the larger side. Results are exact but slow; pass shard_placement_fn=placement_fn "
            "(the second argument of shard) to fully_shard.",
            UserWarning,
            stacklevel=3,
        )


# -- checkpoint keys ------------------------------------------------------------------------------------------
def _sharded_keys(module_fqn: str) -> dict[str, str]:
    prefix = f"{module_fqn}.{HOLDER}" if module_fqn else HOLDER
    return {f: f"{prefix}.{f}" for f in _STATE_FIELDS}


def to_parametrize_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename sharded-mode PC keys (``<module>.pc.raw`` ...) to the parametrize path's (values untouched).

    ``<module>.pc.raw`` -> ``<module>.parametrizations.weight.original``, ``.pc.gamma`` / ``.u`` / ``.v`` /
    ``.pc_meta`` -> ``<module>.parametrizations.weight.0.<same>``; a ``<module>.weight`` of such a module
    (``W_eff``) is dropped. Other keys pass unchanged. Use it to write a checkpoint the parametrize path
    loads, or (on the target ``state_dict`` of ``dcp.load``) to load a parametrize checkpoint in place.
    """
    modules = {}
    for key in state_dict:
        head, _, tail = key.rpartition(".")
        mod, _, holder = head.rpartition(".") if "." in head else ("", "", head)
        if holder == HOLDER and tail in _STATE_FIELDS:
            modules[mod] = True
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        head, _, tail = key.rpartition(".")
        mod, _, holder = head.rpartition(".") if "." in head else ("", "", head)
        if holder == HOLDER and tail in _STATE_FIELDS:
            keys = pc_keys(mod)
            out[
                {"raw": keys.raw, "gamma": keys.gamma, "u": keys.u, "v": keys.v, "pc_meta": keys.meta}[tail]
            ] = value
        elif tail == "weight" and head in modules:
            continue
        else:
            out[key] = value
    return out


def from_parametrize_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename the parametrize path's PC keys to the sharded mode's (the inverse of :func:`to_parametrize_keys`).

    Keys of PC weights other than ``weight`` raise ``ValueError`` (the sharded mode preconditions ``weight``).
    """
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        found = pc_module_of_key(key)
        if found is None:
            out[key] = value
            continue
        mod, name = found
        if name != "weight":
            raise ValueError(
                f"from_parametrize_keys: {key!r} is the PC state of {name!r}; the sharded mode preconditions "
                "parameters named 'weight' only."
            )
        keys = pc_keys(mod)
        new = _sharded_keys(mod)
        table = {keys.raw: "raw", keys.gamma: "gamma", keys.u: "u", keys.v: "v", keys.meta: "pc_meta"}
        if key not in table:
            raise ValueError(
                f"from_parametrize_keys: unknown PC key {key!r}; expected one of {sorted(table)}."
            )
        out[new[table[key]]] = value
    return out
