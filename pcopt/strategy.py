"""How the PC layer executes: per forward (the reference) or once per optimizer step (the fast one).

One declaration, :func:`pcopt.precondition_model`, gives every selected weight one :class:`pcopt.PolynomialPC`
(``gamma``, ``u``, ``v``, settings) next to its raw weight ``W``. :func:`set_strategy` chooses how
``W_eff = gamma * sg(sigma) * p(W / sigma)`` is computed from that state:

``"per_forward"`` (what :func:`pcopt.precondition_model` registers)
    the ``torch.nn.utils.parametrize`` registration: every forward maps ``W`` and autograd differentiates the
    map in every micro-batch. The reference semantics; needed under pipeline parallelism, and where a module
    never holds its full matrix in forward (tensor or expert parallelism) only once per step works.

``"once_per_step"``
    ``module.weight`` is an ordinary parameter that holds ``W_eff`` (FSDP2 all-gathers, reshards,
    reduce-scatters and casts it like any ``Linear`` weight; ``torch.compile`` sees a plain ``Linear``). The
    model's :class:`pcopt.PCState` writes it after each optimizer step and, after the last micro-batch's
    backward, pulls the accumulated ``dL/dW_eff`` back to ``dL/dW`` and ``dL/dgamma``. The map then costs once
    per step, not once per micro-batch, and on FSDP2 shards it runs on each rank's shard: every PC matrix is
    sharded on its larger dim (:func:`shard_placement_fn`), so its small-side Gram is a sum of local Grams
    (one all-reduce) and ``p(X) = X q(X^T X)`` is applied locally. A MoE expert stack ``(E, m, n)`` is batched
    per expert (its own ``gamma``, ``u``, ``v`` each); sharded on its expert dim (FSDP2's default ``Shard(0)``, or
    expert parallelism) each rank maps and pulls back its whole experts with no collective, and its ``gamma`` is
    sharded like the experts. Gradients and steps equal the per-forward strategy's up to rounding.

Both keep the raw weight at ``<module>.parametrizations.weight.original`` and the rest of the state at
``<module>.parametrizations.weight.0.{gamma,u,v,pc_meta}``, so checkpoints move between them unchanged
(``W_eff`` is not saved; it is recomputed on load). The cost model and measurements are in ``docs/scale.md``;
the design and a step's data flow in ``docs/engine.md``.

Usage (every rank)::

    pcopt.precondition_model(model)                                    # the declaration
    pcopt.set_strategy(model, "once_per_step", shard=shard)            # shard(model, placement_fn): fully_shard
    state = pcopt.PCState(model)                                       # the owner of the step moments
    optimizer = pcopt.build_optimizer(model)                     # attaches state.after_step
    for step in ...:
        for micro_batch in ...:
            loss(model(micro_batch)).backward()
        state.after_backward()                                         # dL/dW_eff -> dL/dW, dL/dgamma
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()                                               # + state.after_step(): refresh, W_eff
        optimizer.zero_grad()
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from pcopt._tensor import is_dtensor, is_fsdp_module, local_tensor, shards
from pcopt.kernel import pull_back_, write_one
from pcopt.layer import PolynomialPC
from pcopt.power_iteration import shard_indices
from pcopt.registration import declare_model, preconditioners, unregister
from pcopt.slot import PCHolder, PCSlot

logger = logging.getLogger(__name__)

__all__ = [
    "STRATEGIES",
    "effective_parameters",
    "precondition_model",
    "set_strategy",
    "shard_placement_fn",
    "strategy_of",
]

Strategy = Literal["per_forward", "once_per_step"]
STRATEGIES: tuple[str, ...] = ("per_forward", "once_per_step")
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


# -- introspection ----------------------------------------------------------------------------------------------
def strategy_of(model: nn.Module) -> str | None:
    """``"per_forward"``, ``"once_per_step"``, or None when ``model`` has no PC weights.

    Raises:
        RuntimeError: the model mixes both (weights preconditioned after :func:`set_strategy`).
    """
    kinds = {pc.strategy for _, pc in preconditioners(model)}
    if len(kinds) > 1:
        per = [f for f, pc in preconditioners(model) if pc.strategy == "per_forward"]
        raise RuntimeError(
            f"The model mixes PC strategies: {per[:3]} run per forward, the others once per step. One model, "
            "one strategy: precondition every weight first, then call pcopt.set_strategy(model, ...) once."
        )
    return kinds.pop() if kinds else None


def slots(model: nn.Module) -> list[PCSlot]:
    """The :class:`PCSlot` of every once-per-step PC weight, in ``named_modules()`` order (rank-independent)."""
    return [pc._plist for _, pc in preconditioners(model) if isinstance(pc._plist, PCSlot)]


def effective_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``W_eff`` parameters of the once-per-step strategy: FSDP2's and the PC state's, never an optimizer's.

    An optimizer that holds them anyway leaves them alone: ``PCState.after_backward`` sets their ``.grad`` to
    None and ``after_step`` overwrites them. Empty for the per-forward strategy.
    """
    return [s.effective for s in slots(model)]


# -- the declaration with its strategy ---------------------------------------------------------------------------
def precondition_model(
    model: nn.Module, *, strategy: Strategy = "once_per_step", **options: Any
) -> list[str]:
    """Precondition the attention output and FFN matrices of ``model`` (or ``targets=``) and choose how PC runs.

    ``options`` are those of :func:`pcopt.registration.declare_model`: ``targets`` (a regex searched in module
    FQNs, or a predicate ``(fqn, module) -> bool``; default :data:`pcopt.names.PC_TARGETS`: torchtitan's
    ``attention.wo``, ``feed_forward.w1/w2/w3``, Hugging Face's ``o_proj``, ``gate_proj``, ``up_proj``,
    ``down_proj``, shared experts; never embeddings, LM head, norms or q/k/v), ``name``, ``options``, ``degree``,
    ``coefficients``, ``num_power_iterations``, ``learn_gamma``, ``eps``. Returns the FQNs of the modules it
    preconditioned and warns if nothing matched.

    ``strategy`` (:func:`set_strategy`): ``"once_per_step"`` (default) computes ``W_eff`` once per optimizer step
    and pulls its gradient back at the end of every backward, so any training loop runs the fast path unchanged
    (accumulation, clipping, AMP, DDP); ``"per_forward"`` keeps the parametrize registration (the reference; also
    what to shard with ``fully_shard`` yourself). Under FSDP2 call ``set_strategy(model, "once_per_step",
    shard=...)`` after this (it re-binds an unsharded model). A model on the meta device keeps the per-forward
    registration until it is materialised.
    """
    if strategy not in STRATEGIES:
        raise ValueError(
            f"precondition_model: strategy must be one of {list(STRATEGIES)}, got {strategy!r}. 'once_per_step' "
            "(default) computes W_eff once per optimizer step; 'per_forward' maps the weight in every forward."
        )
    touched = declare_model(model, **options)
    if (
        touched
        and strategy == "once_per_step"
        and not any(p.device.type == "meta" for p in model.parameters())
    ):
        set_strategy(model, "once_per_step")
    return touched


# -- placement --------------------------------------------------------------------------------------------------
def _larger_dim(shape: tuple[int, ...]) -> int:
    return 0 if shape[0] >= shape[1] else 1


def shard_placement_fn(model: nn.Module) -> Callable[[nn.Parameter], Any]:
    """A ``shard_placement_fn`` for ``fully_shard`` that shards every PC matrix of ``model`` on its larger dim.

    A matrix that tensor parallelism already shards (a 2-D DTensor with a ``Shard`` placement) is sharded on that
    same dim, PC or not (FSDP2 then places it as ``_StridedShard``), so that all of a PC matrix's shards split
    one dim and its small-side Gram is a sum of local Grams. Other parameters get FSDP2's default
    (``Shard(0)``). FSDP2 requires dims other than 0 to divide evenly by the shard count. :func:`set_strategy`
    passes it to ``shard``.
    """
    from torch.distributed.tensor import Shard

    if not isinstance(model, nn.Module):
        raise TypeError(f"shard_placement_fn expects an nn.Module, got {type(model).__name__}.")
    table: dict[int, Shard] = {}
    for _, pc in preconditioners(model):
        slot = pc._plist
        param = slot.effective if isinstance(slot, PCSlot) else pc.raw_weight
        if param.ndim == 2:  # rows that interleave matrices stay whole: the columns are sharded instead
            table[id(param)] = Shard(1 if pc.row_interleave > 1 else _larger_dim(tuple(param.shape)))

    def placement(param: nn.Parameter):
        if is_dtensor(param) and param.ndim == 2:  # tensor parallel first: shard the dim it shards
            dims = [p.dim for p in param.placements if shards(p)]
            if dims:
                return Shard(dims[0])
        return table.get(id(param))

    return placement


# -- the switch -------------------------------------------------------------------------------------------------
def set_strategy(
    model: nn.Module,
    strategy: Strategy = "once_per_step",
    *,
    shard: Callable[[nn.Module, Callable[[nn.Parameter], Any]], Any] | None = None,
    compute_dtype: torch.dtype | None = None,
    pull_back: str | None = None,
) -> list[str]:
    """Choose how the PC weights of ``model`` execute; returns the FQNs of the weights switched.

    ``"once_per_step"``: every per-forward registration is replaced by a plain ``<module>.weight`` parameter
    holding ``W_eff``, the raw weight and :class:`PolynomialPC` move to a :class:`PCSlot` at the same keys, and
    then ``shard(model, placement_fn)`` runs: apply ``fully_shard`` there with
    ``shard_placement_fn=placement_fn``. FSDP2 manages only the parameters present when ``fully_shard`` runs,
    so the raw weights are bound after it, placed like their ``W_eff`` (FSDP2 never gathers them).
    ``shard=None`` keeps the model unsharded (one device, gradient accumulation, or DDP).

    ``"per_forward"``: back to the parametrize registration (unsharded models only).

    Args:
        model: a preconditioned model (:func:`pcopt.precondition_model`), not yet sharded; on the meta device,
            call ``pcopt.PCState(model).initialize()`` after materialising and initialising it.
        strategy: ``"once_per_step"`` or ``"per_forward"``.
        shard: ``(model, placement_fn) -> Any`` that applies ``fully_shard`` (once-per-step only).
        compute_dtype: dtype of the once-per-step map's matmuls: None (default: bf16 on CUDA, else fp32;
            fp64 for fp64 weights; see :func:`map_dtype`), ``torch.float32``, ``torch.bfloat16`` or
            ``torch.float64``; reductions, ``sigma`` and ``gamma`` stay in at least fp32.
        pull_back: when ``dL/dW_eff`` becomes ``dL/dW`` and ``dL/dgamma`` (once per step only).
            ``"auto"`` (the default without ``shard``): at the end of every backward, by itself, so any loop
            works unchanged (gradient accumulation, clipping, AMP): one pull-back per micro-batch, exact because
            it is linear in ``dL/dW_eff``. ``"after_backward"`` (the default with ``shard``, e.g. torchtitan):
            the loop calls ``pcopt.PCState(model).after_backward()`` after the last micro-batch, one pull-back
            per step; the optimizer refuses to step before it.

    Raises:
        ValueError: an unknown strategy or ``compute_dtype``, no PC weights, a weight that is not a 2-D
            ``weight``, a model already sharded, or a ``shard`` that placed a weight in a way PC cannot use.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"set_strategy expects an nn.Module, got {type(model).__name__}.")
    if strategy not in STRATEGIES:
        raise ValueError(
            f"Unknown PC strategy {strategy!r}; expected one of {list(STRATEGIES)}. 'once_per_step' computes "
            "W_eff once per optimizer step (the fast one), 'per_forward' in every forward (the reference)."
        )
    if shard is not None and not callable(shard):
        raise TypeError(
            f"set_strategy: shard must be a callable (model, placement_fn) that applies fully_shard, got "
            f"{type(shard).__name__}."
        )
    if pull_back not in (None, *PULL_BACKS):
        raise ValueError(
            f"set_strategy: pull_back must be one of {list(PULL_BACKS)} or None, got {pull_back!r}. 'auto' pulls "
            "dL/dW_eff back at the end of every backward; 'after_backward' waits for PCState.after_backward()."
        )
    if pull_back == "auto" and shard is not None:
        raise ValueError(
            "set_strategy: pull_back='auto' is for unsharded models (one device, DDP); under FSDP2 (shard=...) the "
            "loop calls pcopt.PCState(model).after_backward() after the last micro-batch (torchtitan_ext does)."
        )
    if compute_dtype is not None and (
        not isinstance(compute_dtype, torch.dtype) or compute_dtype not in _COMPUTE_DTYPES
    ):
        raise ValueError(
            f"compute_dtype must be one of {[str(d) for d in _COMPUTE_DTYPES]}, got {compute_dtype}. Use "
            "torch.float32 or torch.bfloat16, or None (bf16 on CUDA, fp32 elsewhere)."
        )
    pcs = preconditioners(model)
    if not pcs:
        raise ValueError(
            "set_strategy: the model has no preconditioned weights. Call pcopt.precondition_model(model) first."
        )
    if strategy == "per_forward":
        if shard is not None:
            raise ValueError(
                "set_strategy: shard applies to 'once_per_step' only; shard a per-forward model yourself."
            )
        return _to_per_forward(model)
    wrapped = [n or "<root>" for n, m in model.named_modules() if is_fsdp_module(m)]
    if wrapped or any(is_dtensor(pc.raw_weight) for _, pc in pcs):
        raise ValueError(
            f"set_strategy: the model is already sharded (fully_shard was applied to {wrapped[:3]}). Call "
            "pcopt.set_strategy(model, 'once_per_step', shard=shard) on the unsharded preconditioned model and "
            "apply fully_shard inside shard."
        )
    if all(pc.strategy == "once_per_step" for _, pc in pcs):
        # unsharded once per step (what precondition_model sets): bind again with these arguments
        _to_per_forward(model)
        pcs = preconditioners(model)
    todo = [(fqn, pc) for fqn, pc in pcs if pc.strategy == "per_forward"]
    placement_fn = shard_placement_fn(model)
    pending = []
    for fqn, pc in todo:
        mod_fqn, _, name = fqn.rpartition(".")
        module = model.get_submodule(mod_fqn)
        # module.<name> becomes the raw Parameter object itself for now: FSDP2 shards it as W_eff, and _bind
        # then gives the raw weight its own parameter (on one device: the same object, W_eff a new one).
        registration = module.__class__, module._modules["parametrizations"]  # reinstated by "per_forward"
        unregister(module, name)
        pending.append((fqn, module, name, pc, registration))
    if shard is not None:
        shard(model, placement_fn)
    out = []
    for fqn, module, name, pc, registration in pending:
        slot = _bind(fqn, module, name, pc, compute_dtype)
        if slot.placements is None and len(registration[1]) == 1:
            slot.__dict__["registration"] = registration
        write_one(slot)
        out.append(fqn)
    _warn_small_dim(slots(model))
    if (pull_back or ("auto" if shard is None else "after_backward")) == "auto":
        _AutoPullBack.install(model, [pc._plist for _, pc in todo])
    logger.info(
        "PC once per step: %d weights, compute dtype %s, %d sharded, pull-back %s",
        len(out),
        compute_dtype or "auto (bf16 on CUDA, else fp32)",
        sum(bool(s.mesh_dims) or s.experts is not None for s in slots(model)),
        pull_back or ("auto" if shard is None else "after_backward"),
    )
    return out


PULL_BACKS = ("auto", "after_backward")


class _AutoPullBack:
    """Pulls ``dL/dW_eff`` back to ``dL/dW``, ``dL/dgamma`` at the end of every backward that reached a ``W_eff``.

    A post-accumulate-grad hook on each ``W_eff`` queues one callback per backward on autograd's engine; that
    callback queues a second one, which runs after every callback queued during the backward (DDP's, which
    finishes its gradient all-reduce there), and pulls back every slot whose ``W_eff`` has a gradient, batched
    by shape (:func:`pull_back_`). No host synchronisation. Under DDP the raw weights, ``gamma`` and the PC
    buffers are left out of DDP's reduction and broadcasts (``_ddp_params_and_buffers_to_ignore`` on the model):
    DDP averages ``dL/dW_eff``, and the pull-back of that average is what per-forward DDP computes, as the
    pull-back is linear. (So start every rank from the same seed, as DDP users do: DDP does not broadcast them.)
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.queued_for: int | None = None  # the autograd graph task whose end the pull-back is queued for

    @classmethod
    def install(cls, model: nn.Module, new_slots: list[PCSlot]) -> None:
        auto = model.__dict__.get("_pcopt_auto_pull_back")
        if auto is None:
            auto = cls(model)
            model.__dict__["_pcopt_auto_pull_back"] = auto
        for slot in new_slots:
            slot.auto_handle = slot.effective.register_post_accumulate_grad_hook(auto._hook)
        # DDP averages dL/dW_eff; the raw weights and gamma get their gradients from that average, and u, v are
        # the same on every rank (DDP would broadcast them before every forward, a write that marks W_eff stale)
        names = {id(t): n for n, t in (*model.named_parameters(), *model.named_buffers())}
        state = [t for s in slots(model) for t in (s.original, s[0].gamma, *s[0].buffers())]
        ignore = [names[id(t)] for t in state if id(t) in names]
        old = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
        model._ddp_params_and_buffers_to_ignore = old + [n for n in ignore if n not in old]

    def _hook(self, param: Tensor) -> None:
        task = (
            torch._C._current_graph_task_id()
        )  # a backward that failed never ran its callbacks: ask per task
        if self.queued_for != task:
            self.queued_for = task
            torch.autograd.Variable._execution_engine.queue_callback(self._after_backward_callbacks)

    def _after_backward_callbacks(self) -> None:
        torch.autograd.Variable._execution_engine.queue_callback(self._pull_back)

    def _pull_back(self) -> None:
        self.queued_for = None
        pull_back_([s for s in slots(self.model) if getattr(s, "auto_handle", None) is not None])


def _bind(
    fqn: str, module: nn.Module, name: str, pc: PolynomialPC, compute_dtype: torch.dtype | None
) -> PCSlot:
    """Register ``module.parametrizations.<name>`` = :class:`PCSlot`, the raw weight placed like W_eff."""
    w = module._parameters[name]
    local = local_tensor(w).detach().clone()
    experts = None
    if is_dtensor(w):
        from torch.distributed.tensor import DTensor, Replicate

        mesh, placements = w.device_mesh, tuple(w.placements)
        dim, mesh_dims, expert_dims = _sharded_dims(fqn, w, pc)
        raw = nn.Parameter(
            DTensor.from_local(local, mesh, placements, shape=w.shape, stride=w.stride()), requires_grad=True
        )
        gamma = local_tensor(pc.gamma.detach()).to(local.device)
        gamma_placements = [Replicate()] * mesh.ndim
        if expert_dims:  # each rank's gamma entries are those of its experts (no collective in the pull-back)
            gamma_placements = _only_dim(placements, 0, w.ndim)  # gamma (E,) placed as the expert dim
            experts = shard_indices(tuple(w.shape), 0, mesh, gamma_placements)
            gamma = gamma[experts.to(gamma.device)]
        gamma = DTensor.from_local(
            gamma, mesh, gamma_placements, shape=pc.gamma.shape, stride=pc.gamma.stride()
        )
        pc.gamma = nn.Parameter(gamma, requires_grad=pc.gamma.requires_grad)
    else:  # one device: the raw parameter keeps its identity (an optimizer built before keeps working)
        raw = w
        module._parameters[name] = nn.Parameter(local, requires_grad=True)  # W_eff
        mesh, mesh_dims, dim = None, (), _larger_dim(pc.matrix_shape(w.shape)[-2:])
    pc.to(local.device)
    slot = PCSlot(raw, pc)
    slot.__dict__["owner"] = module
    slot.name = name
    slot.dim, slot.mesh, slot.mesh_dims, slot.compute_dtype = dim, mesh, mesh_dims, compute_dtype
    slot.placements = tuple(w.placements) if is_dtensor(w) else None
    if mesh_dims:
        at = w.ndim - 2 + dim
        slot.index = shard_indices(tuple(w.shape), at, mesh, _only_dim(placements, at, w.ndim))
    slot.experts = experts
    holder = module._modules.get("parametrizations")
    if not isinstance(holder, PCHolder):
        holder = PCHolder()
        module.add_module("parametrizations", holder)
    holder.add_module(name, slot)
    if not getattr(module, "_pcopt_once_per_step_hooks", False):
        module._pcopt_once_per_step_hooks = True
        module.register_state_dict_post_hook(_drop_effective)
        module.register_load_state_dict_pre_hook(_keep_effective)
        module.register_load_state_dict_post_hook(_rewrite_after_load)
    return slot


def _only_dim(placements: tuple, dim: int, ndim: int) -> tuple:
    """``placements`` with every placement that does not shard tensor dim ``dim`` replaced by ``Replicate``."""
    from torch.distributed.tensor import Replicate

    return tuple(p if shards(p) and p.dim % ndim == dim else Replicate() for p in placements)


def _sharded_dims(fqn: str, w: Tensor, pc: PolynomialPC) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """``(dim, mesh_dims, expert_dims)`` of a DTensor PC weight: the matrix dim (0 rows, 1 columns) its rows are
    oriented along (the sharded one, else the larger), the mesh dims that shard that matrix dim (its Gram is a sum
    over them), and the mesh dims that shard the expert dim of a ``(E, m, n)`` stack (local, whole matrices).
    Rows that interleave ``pc.row_interleave > 1`` matrices must not be sharded (their view needs them whole)."""
    from torch.distributed.tensor import Partial

    placements, ndim = tuple(w.placements), w.ndim
    matrix = {p.dim % ndim - (ndim - 2) for p in placements if shards(p) and p.dim % ndim >= ndim - 2}
    if (
        any(isinstance(p, Partial) for p in placements)
        or len(matrix) > 1
        or any(shards(p) and type(p).__name__ not in ("Shard", "_StridedShard") for p in placements)
    ):
        raise ValueError(
            f"set_strategy: {fqn} is placed as {placements}; the once-per-step strategy needs every mesh dim that "
            "shards a matrix dim to shard the same one (FSDP2, HSDP, or FSDP2 over tensor parallelism on the dim "
            "the tensor-parallel plan shards; an expert stack may also be sharded on its expert dim). Pass "
            "shard_placement_fn=placement_fn (the second argument of shard) to fully_shard."
        )
    if pc.row_interleave > 1 and 0 in matrix:
        raise ValueError(
            f"set_strategy: {fqn} interleaves the rows of {pc.row_interleave} matrices, and it is placed as {placements}, "
            "which shards its rows; each rank needs those rows whole. Shard it on its expert dim (FSDP2 Shard(0), "
            "expert parallelism) or its columns (shard_placement_fn=placement_fn, the second argument of shard, "
            "does that for 2-D weights)."
        )
    mesh_dims = tuple(i for i, p in enumerate(placements) if shards(p) and p.dim % ndim >= ndim - 2)
    expert_dims = tuple(i for i, p in enumerate(placements) if shards(p) and p.dim % ndim < ndim - 2)
    dim = matrix.pop() if matrix else _larger_dim(pc.matrix_shape(w.shape)[-2:])
    return dim, mesh_dims, expert_dims


def _to_per_forward(model: nn.Module) -> list[str]:
    out = []
    for fqn, pc in preconditioners(model):
        if pc.strategy != "once_per_step":
            continue
        slot = pc._plist
        if is_dtensor(slot.original):
            raise ValueError(
                f"set_strategy: {fqn} is sharded; the per-forward strategy is chosen before fully_shard. Build the "
                "model again, or save a checkpoint (its keys are the same in both strategies) and load it there."
            )
        handle = getattr(slot, "auto_handle", None)
        if handle is not None:
            handle.remove()
            slot.auto_handle = None
        module, name = slot.owner, slot.name
        holder = module._modules["parametrizations"]
        del holder._modules[name]
        if not holder._modules:
            del module._modules["parametrizations"]
        saved = slot.__dict__.get("registration")
        if saved is not None and not holder._modules and saved[1][name].original is slot.original:
            # the registration this module had before set_strategy: no new class, no map call
            del module._parameters[name]
            module.__class__, module._modules["parametrizations"] = saved
            pc.bind(saved[1][name])
            pc.mark_fresh()
            out.append(fqn)
            continue
        module._parameters[name] = slot.original  # the raw weight becomes the parametrized original
        pc._identity_inverse = True
        pc._fresh = None  # registration calls the map once (a shape check); the raw weight is current
        parametrize.register_parametrization(module, name, pc)
        pc._identity_inverse = False
        pc.bind(module.parametrizations[name])
        pc.mark_fresh()
        out.append(fqn)
    return out


def _warn_small_dim(all_slots: list[PCSlot]) -> None:
    bad = [
        f"{tuple(s.original.shape)} on dim {s.dim}"
        for s in all_slots
        if s.mesh_dims and s.original.shape[-2:][s.dim] < s.original.shape[-2:][1 - s.dim]
    ]
    if bad:
        warnings.warn(
            f"pcopt: PC matrices {bad[:3]} are sharded on their smaller dim, so their Gram matrix (and its "
            "all-reduce) is the larger side. Results are exact but slow; pass shard_placement_fn=placement_fn "
            "(the second argument of shard) to fully_shard.",
            UserWarning,
            stacklevel=3,
        )


# -- checkpoint hooks of a once-per-step module -----------------------------------------------------------------
def _slots_of(module: nn.Module) -> list[PCSlot]:
    holder = module._modules.get("parametrizations")
    return list(holder._modules.values()) if isinstance(holder, PCHolder) else []


def _drop_effective(module, state_dict, prefix, local_metadata) -> None:
    """state_dict: ``<module>.<name>`` (W_eff) is left out; the PC state defines it."""
    for slot in _slots_of(module):
        state_dict.pop(prefix + slot.name, None)


def _keep_effective(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    """load_state_dict: ``<module>.<name>`` is not expected; it is recomputed from the loaded state."""
    for slot in _slots_of(module):
        if prefix + slot.name not in state_dict:
            state_dict[prefix + slot.name] = slot.effective.detach()  # loads onto itself: a no-op


def _rewrite_after_load(module, incompatible_keys) -> None:
    for slot in _slots_of(module):
        write_one(slot)  # collective when sharded: every rank loads
