"""How the PC layer executes: per forward (the reference) or once per optimizer step (the fast one).

One declaration, :func:`pcopt.precondition_model`, gives every selected weight one :class:`pcopt.PolynomialPC`
(``gamma``, ``u``, ``v``, settings) next to its raw weight ``W``. :func:`set_strategy` chooses how
``W_eff = gamma * sg(sigma) * p(W / sigma)`` is computed from that state:

``"per_forward"`` (what :func:`pcopt.precondition_model` registers)
    the ``torch.nn.utils.parametrize`` registration: every forward maps ``W`` and autograd differentiates the
    map in every micro-batch. The reference semantics; needed for batched (3-D) weights and for pipeline or
    tensor parallelism, where a module never holds its full matrix.

``"once_per_step"``
    ``module.weight`` is an ordinary parameter that holds ``W_eff`` (FSDP2 all-gathers, reshards,
    reduce-scatters and casts it like any ``Linear`` weight; ``torch.compile`` sees a plain ``Linear``). The
    model's :class:`pcopt.PCState` writes it after each optimizer step and, after the last micro-batch's
    backward, pulls the accumulated ``dL/dW_eff`` back to ``dL/dW`` and ``dL/dgamma``. The map then costs once
    per step, not once per micro-batch, and on FSDP2 shards it runs on each rank's shard: every PC matrix is
    sharded on its larger dim (:func:`shard_placement_fn`), so its small-side Gram is a sum of local Grams
    (one all-reduce) and ``p(X) = X q(X^T X)`` is applied locally. Gradients and steps equal the per-forward
    strategy's up to rounding.

Both keep the raw weight at ``<module>.parametrizations.weight.original`` and the rest of the state at
``<module>.parametrizations.weight.0.{gamma,u,v,pc_meta}``, so checkpoints move between them unchanged
(``W_eff`` is not saved; it is recomputed on load). The cost model and measurements are in ``docs/scale.md``;
the design and a step's data flow in ``docs/engine.md``.

Usage (every rank)::

    pcopt.precondition_model(model)                                    # the declaration
    pcopt.set_strategy(model, "once_per_step", shard=shard)            # shard(model, placement_fn): fully_shard
    state = pcopt.PCState(model)                                       # the owner of the step moments
    optimizer = pcopt.optim.build_optimizer(model)                     # attaches state.after_step
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
from pcopt.layer import PCHolder, PCSlot, PolynomialPC
from pcopt.polynomials import gram_polynomial, gram_polynomial_vjp, horner_chain
from pcopt.registration import declare_model, preconditioners, unregister
from pcopt.spectral import all_reduce_, shard_indices, sigma_estimate

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
        if param.ndim == 2:
            table[id(param)] = Shard(_larger_dim(tuple(param.shape)))

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
    if shard is not None:
        batched = [f"{fqn} {tuple(pc.raw_weight.shape)}" for fqn, pc in todo if pc.batch_shape]
        if batched:
            raise ValueError(
                f"The once-per-step strategy shards PC matrices (2-D weights); {batched[:3]} are batched. Run "
                "them unsharded (shard=None) or per forward."
            )
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
        _write(slot)
        out.append(fqn)
    _warn_small_dim(slots(model))
    if (pull_back or ("auto" if shard is None else "after_backward")) == "auto":
        _AutoPullBack.install(model, [pc._plist for _, pc in todo])
    logger.info(
        "PC once per step: %d weights, compute dtype %s, %d sharded, pull-back %s",
        len(out),
        compute_dtype or "auto (bf16 on CUDA, else fp32)",
        sum(bool(s.mesh_dims) for s in slots(model)),
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
    if is_dtensor(w):
        from torch.distributed.tensor import DTensor, Partial, Replicate

        mesh, placements = w.device_mesh, tuple(w.placements)
        shard_dims = {p.dim for p in placements if shards(p)}
        if (
            any(isinstance(p, Partial) for p in placements)
            or len(shard_dims) > 1
            or any(shards(p) and type(p).__name__ not in ("Shard", "_StridedShard") for p in placements)
        ):
            raise ValueError(
                f"set_strategy: {fqn} is placed as {placements}; the once-per-step strategy needs every sharded "
                "mesh dim to shard the same tensor dim (FSDP2, HSDP, or FSDP2 over tensor parallelism on the dim "
                "the tensor-parallel plan shards). Pass shard_placement_fn=placement_fn (the second argument of "
                "shard) to fully_shard."
            )
        raw = nn.Parameter(
            DTensor.from_local(local, mesh, placements, shape=w.shape, stride=w.stride()), requires_grad=True
        )
        gamma = DTensor.from_local(
            local_tensor(pc.gamma.detach()).to(local.device), mesh, [Replicate()] * mesh.ndim
        )
        pc.gamma = nn.Parameter(gamma, requires_grad=pc.gamma.requires_grad)
        mesh_dims = tuple(i for i, p in enumerate(placements) if shards(p))
        dim = shard_dims.pop() if shard_dims else _larger_dim(tuple(w.shape))
    else:  # one device: the raw parameter keeps its identity (an optimizer built before keeps working)
        raw = w
        module._parameters[name] = nn.Parameter(local, requires_grad=True)  # W_eff
        mesh, mesh_dims, dim = None, (), _larger_dim(tuple(w.shape[-2:]))
    pc.to(local.device)
    slot = PCSlot(raw, pc)
    slot.__dict__["owner"] = module
    slot.name = name
    slot.dim, slot.mesh, slot.mesh_dims, slot.compute_dtype = dim, mesh, mesh_dims, compute_dtype
    slot.placements = tuple(w.placements) if is_dtensor(w) else None
    if mesh_dims:
        slot.index = shard_indices(tuple(w.shape), dim, mesh, placements)
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
        if s.mesh_dims and s.original.shape[s.dim] < s.original.shape[1 - s.dim]
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
        _write(slot)  # collective when sharded: every rank loads


# -- the map and its pull-back, batched over same-shape matrices ------------------------------------------------
# Every per-step function below runs over *chunks*: slots whose local blocks have the same shape, orientation,
# dtype, device, mesh and polynomial, stacked along a new leading dim. A chunk's map, pull-back and all-reduce
# are one kernel chain and one collective, so the number of kernels grows with the number of distinct shapes
# (two or three in a Llama), not with the number of layers. Nothing here reads a tensor on the host.
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
        slot.index is None, tuple(pc.coefficients), pc.eps, pc.gamma.requires_grad,
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


def _stack(tensors: list[Tensor], dim: int, dtype: torch.dtype) -> Tensor:
    """``(b, rows, n)``: the oriented local blocks of a chunk, one stack copy (plus one cast)."""
    return _oriented(torch.stack(tensors), dim).to(dtype)


def _vectors(chunk: list[PCSlot], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(u_local, v_other)`` stacked: the vector along the sharded dim restricted to this rank, and the other."""
    s0 = chunk[0]
    along = torch.stack([s[0].u if s0.dim == 0 else s[0].v for s in chunk])
    other = torch.stack([s[0].v if s0.dim == 0 else s[0].u for s in chunk])
    if s0.index is not None:
        for s in chunk:
            if s.index.device != along.device:  # once: the index then lives where the state does
                s.index = s.index.to(along.device)
        along = along.gather(-1, torch.stack([s.index for s in chunk]))
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
        A = _stack([local_tensor(s.original) for s in chunk], s0.dim, cd)
        u_loc, v_o = _vectors(chunk, cd)
        G, sig = _reduced(s0, _partial_sums(A, u_loc, v_o), rd)
        sigma = (sig + s0[0].eps)[..., None, None]
        Q = gram_polynomial((G / sigma**2).to(horner_dtype(s0, cd)), s0[0].coefficients).to(cd)
        return (A @ Q) * _gammas(chunk, sigma.shape, cd)


@torch.no_grad()
def _write_chunk(chunk: list[PCSlot]) -> None:
    eff = _oriented(_effective(chunk), chunk[0].dim)  # laid out like the parameters
    torch._foreach_copy_([local_tensor(s.effective) for s in chunk], list(eff.unbind(0)))
    for s in chunk:
        s.stamp = stamp(s)


def _write(slot: PCSlot) -> None:
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
    dW = _oriented(dA, s0.dim).to(raw.dtype).contiguous()
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
        A = _stack([local_tensor(s.original).detach() for s in chunk], s0.dim, cd)
        Y = _stack([local_tensor(s.effective.grad).detach() for s in chunk], s0.dim, cd)
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
        if is_dtensor(p):
            from torch.distributed.tensor import DTensor

            p.grad = DTensor.from_local(g, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        else:
            p.grad = g


@torch.no_grad()
def initialize_(all_slots: list[PCSlot]) -> None:
    """Start each PC state from the current ``W_eff`` parameter values (after a meta-device build and init)."""
    check_layout(all_slots)
    for s in all_slots:
        local_tensor(s.original).copy_(local_tensor(s.effective))
        pc = s[0]
        pc.reset_state()  # gamma <- 1, fresh u, v and settings; PCState refreshes and writes W_eff next
