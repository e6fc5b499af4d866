"""Declaring the PC layer: register it on a weight (:func:`precondition`) or on a model's targets.

Registration is a ``torch.nn.utils.parametrize`` registration of :class:`pcopt.layer.PolynomialPC`; it is
the public way to declare PC and, on one device, its reference semantics. The raw weight keeps its object
and values; it moves to ``module.parametrizations.<name>.original`` (keys: :mod:`pcopt.names`).
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Callable, Sequence

from torch import nn
from torch.nn.utils import parametrize

from pcopt._tensor import is_dtensor, is_fsdp_module
from pcopt.layer import PolynomialPC, refresh_
from pcopt.names import PC_TARGETS, pc_keys, pc_module_of_key, rename_legacy_keys
from pcopt.options import PCOptions
from pcopt.slot import PCHolder

logger = logging.getLogger(__name__)

__all__ = [
    "declare_model",
    "guard_save_pretrained",
    "is_pretrained_model",
    "precondition",
    "is_preconditioned",
    "preconditioner",
    "preconditioners",
]

Targets = str | re.Pattern | Callable[[str, nn.Module], bool]


def _pcs_of(module: nn.Module) -> list[tuple[str, PolynomialPC]]:
    """(tensor name, PC module) pairs registered on ``module`` itself, in either execution strategy."""
    holder = module._modules.get("parametrizations")
    if isinstance(holder, PCHolder):  # once-per-step (pcopt.strategy)
        return [(n, slot[0]) for n, slot in holder.items()]
    if not parametrize.is_parametrized(module):
        return []
    return [
        (n, plist[0]) for n, plist in module.parametrizations.items() if isinstance(plist[0], PolynomialPC)
    ]


def is_preconditioned(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` carries a PC parametrization."""
    return any(n == name for n, _ in _pcs_of(module))


def preconditioner(module: nn.Module, name: str = "weight") -> PolynomialPC:
    """The :class:`PolynomialPC` of ``module.<name>`` (either strategy); ``ValueError`` if there is none."""
    for n, pc in _pcs_of(module):
        if n == name:
            return pc
    raise ValueError(
        f"{type(module).__name__}.{name} is not preconditioned. Call pcopt.precondition(module, {name!r}) first."
    )


def preconditioners(model: nn.Module) -> list[tuple[str, PolynomialPC]]:
    """All PC weights in ``model`` as ``(fqn of the effective tensor, PC module)`` pairs, both strategies.

    The order is ``model.named_modules()`` order, the same on every rank.
    """
    out = []
    for fqn, mod in model.named_modules():
        for name, pc in _pcs_of(mod):
            out.append((f"{fqn}.{name}" if fqn else name, pc))
    return out


def precondition(
    module: nn.Module,
    name: str = "weight",
    *,
    options: PCOptions | None = None,
    degree: int | None = None,
    coefficients: Sequence[float] | None = None,
    num_power_iterations: int | None = None,
    learn_gamma: bool | None = None,
    eps: float | None = None,
    row_interleave: int = 1,
) -> nn.Module:
    r"""Register the PC layer on ``module.<name>`` and return ``module``.

    The effective weight is :math:`W_\text{eff} = \gamma\,\mathrm{sg}(\hat\sigma)\,p(W/\hat\sigma)` with
    :math:`\hat\sigma = u^\top W v + \epsilon`. The raw weight ``W`` (unchanged by registration) moves to
    ``module.parametrizations.<name>.original``; the learnable scale ``gamma`` (one per matrix, init 1) and
    the buffers ``u``, ``v`` live in ``module.parametrizations.<name>[0]``. ``u``, ``v`` are refreshed by
    warm-started power iterations right away (unless on the meta device) and then once per optimizer step
    by the model's :class:`pcopt.PCState` (see :mod:`pcopt.state`).

    Args:
        module: a module with a 2-D (``out x in``) or 3-D (batch of matrices) parameter ``name``.
        options: the settings as one :class:`pcopt.PCOptions`; the keywords below override its fields.
        degree: 3, 5, 7 or 9 (default 9): the PC polynomial of that degree (the paper: 9 with AdamW, 5 with
            Muon).
        coefficients: custom odd polynomial, the coefficients of ``x, x^3, ...``; overrides ``degree``.
        num_power_iterations: iterations per refresh (default 10).
        learn_gamma: train ``gamma`` (default True; ``False`` freezes it at 1).
        eps: added to the sigma estimate (default 1e-7).
        row_interleave: ``k > 1`` for a weight whose rows alternate between ``k`` matrices (gpt_oss's fused gate/up
            expert stack ``(E, 2F, D)``: gate rows ``0::2``, up rows ``1::2``): each of them gets its own PC state
            (``gamma (E, k)``, ``u (E, k, F)``) and map, as if they were separate weights.

    Must be called before ``fully_shard`` (FSDP2 then gives the parametrization the unsharded weight).

    Example::

        >>> lin = pcopt.precondition(nn.Linear(64, 256, bias=False), degree=9)
        >>> type(lin).__name__
        'ParametrizedLinear'
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"precondition expects an nn.Module, got {type(module).__name__}.")
    opts = PCOptions.resolve(
        options,
        dict(
            degree=degree,
            coefficients=coefficients,
            num_power_iterations=num_power_iterations,
            learn_gamma=learn_gamma,
            eps=eps,
        ),
    )
    if isinstance(module._modules.get("parametrizations"), PCHolder):
        raise ValueError(
            f"{type(module).__name__} already runs PC once per step (pcopt.set_strategy), so {name!r} cannot be "
            "preconditioned per forward: one model, one strategy. Precondition every weight first, then call "
            "pcopt.set_strategy(model, 'once_per_step')."
        )
    if is_preconditioned(module, name):
        raise ValueError(
            f"{type(module).__name__}.{name} is already preconditioned. Call precondition once per weight "
            "(pcopt.merge removes the PC layer if you want to re-register it with other settings)."
        )
    if parametrize.is_parametrized(module, name):
        raise ValueError(
            f"{type(module).__name__}.{name} already has another parametrization; the PC layer must be the only "
            "parametrization of a weight. Remove the other one first."
        )
    param = module._parameters.get(name) if isinstance(name, str) else None
    if param is None:
        available = [n for n, _ in module.named_parameters(recurse=False)]
        raise ValueError(
            f"{type(module).__name__} has no parameter named {name!r}; expected one of {available}. "
            "Pass the name of a matrix parameter, e.g. name='weight'."
        )
    if is_dtensor(param) or is_fsdp_module(module):
        raise ValueError(
            f"{type(module).__name__}.{name} is already sharded (fully_shard was applied). Call "
            "pcopt.precondition / precondition_model before fully_shard."
        )
    if param.ndim not in (2, 3):
        raise ValueError(
            f"precondition expects a matrix (out x in) or a batch of matrices for {name!r}, got a tensor of "
            f"{param.ndim} dimension(s) with shape {tuple(param.shape)}. Precondition only 2-D/3-D weights."
        )
    if not param.is_floating_point():
        raise ValueError(f"precondition expects a floating-point weight, got dtype {param.dtype}.")
    if isinstance(row_interleave, bool) or not isinstance(row_interleave, int) or row_interleave < 1:
        raise ValueError(
            f"precondition expects row_interleave to be a positive int (the number of matrices whose rows the weight "
            f"interleaves; 1: none), got {row_interleave!r}."
        )
    if param.shape[-2] % row_interleave:
        raise ValueError(
            f"precondition(row_interleave={row_interleave}) treats the rows of {name!r} as {row_interleave} interleaved "
            f"matrices, so its row count must be divisible by {row_interleave}; got shape {tuple(param.shape)}."
        )

    pc = PolynomialPC(
        param.shape, opts, device=param.device, dtype=param.dtype, row_interleave=row_interleave
    )
    pc.label = f"{type(module).__name__}.{name} of shape {tuple(param.shape)}"
    parametrize.register_parametrization(module, name, pc)
    pc._identity_inverse = False
    pc.bind(module.parametrizations[name])
    module.register_load_state_dict_pre_hook(_LoadGuard(name))
    module.register_load_state_dict_post_hook(_MarkFresh(name))
    if param.device.type != "meta":
        refresh_([pc])
        pc.report_heals()
    return module


def unregister(module: nn.Module, name: str = "weight") -> nn.Parameter:
    """Remove the per-forward registration of ``module.<name>``; the raw parameter object becomes ``module.<name>``.

    Unlike ``parametrize.remove_parametrizations`` this leaves the generated ``Parametrized...`` class alone
    when nothing else is parametrized (the module goes back to its own class): ``copy.deepcopy`` shares that
    class between a model and its copies, and deleting its property would break the other copies.
    """
    raw = module.parametrizations[name].original
    # other tensors stay parametrized: torch's removal, on a class of its own
    if len(module.parametrizations) > 1:
        cls = module.__class__  # (torch's removal deletes the property from the class the copies share)
        body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, body)
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        return raw
    module.__class__ = module.__class__.__bases__[0]
    del module._modules["parametrizations"]
    module.register_parameter(name, raw)
    return raw


class _LoadGuard:
    """Check what is loaded into a preconditioned module before torch does.

    A dense ``<name>`` key is refused with a message naming the conversion, and PC state saved with other
    settings (degree, coefficients, eps) is refused instead of loading silently.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(
        self, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
    ) -> None:
        if not is_preconditioned(module, self.name):
            return
        keys = pc_keys(prefix.rstrip("."), self.name)
        rename_legacy_keys(state_dict, prefix.rstrip("."), self.name)  # pcopt 0.2 sharded-mode checkpoints
        if keys.raw in state_dict and _is_once_per_step(module):
            state_dict.pop(prefix + self.name, None)  # a legacy W_eff entry: recomputed after the load
        dense = prefix + self.name
        if dense in state_dict and keys.raw not in state_dict:
            raise RuntimeError(
                f"The state_dict holds a dense '{dense}' but the model is preconditioned (it expects "
                f"'{keys.raw}'). Load dense checkpoints with pcopt.load_dense_state_dict(model, state_dict), "
                "or export a preconditioned model with pcopt.merged_state_dict(model) for a plain one."
            )
        if keys.meta in state_dict:
            preconditioner(module, self.name).check_meta(state_dict[keys.meta], keys.meta)


def _is_once_per_step(module: nn.Module) -> bool:
    return isinstance(module._modules.get("parametrizations"), PCHolder)


class _MarkFresh:
    """After ``load_state_dict``: the loaded ``u``, ``v`` belong to the loaded raw weight."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module, incompatible_keys) -> None:
        if is_preconditioned(module, self.name):
            preconditioner(module, self.name).mark_fresh()


def _matcher(targets: Targets) -> Callable[[str, nn.Module], bool]:
    if isinstance(targets, (str, re.Pattern)):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ValueError(
                f"targets={targets!r} is not a valid regex ({e}); pass a pattern searched in module FQNs."
            ) from None
        return lambda fqn, mod: pattern.search(fqn) is not None
    if callable(targets):
        return targets
    raise TypeError(
        "targets must be a regex (str or re.Pattern) or a callable (fqn, module) -> bool, got "
        f"{type(targets).__name__}."
    )


def declare_model(
    model: nn.Module,
    *,
    targets: Targets | None = None,
    name: str = "weight",
    options: PCOptions | None = None,
    degree: int | None = None,
    coefficients: Sequence[float] | None = None,
    num_power_iterations: int | None = None,
    learn_gamma: bool | None = None,
    eps: float | None = None,
) -> list[str]:
    """Precondition ``<module>.<name>`` for every module whose FQN matches ``targets``.

    ``targets`` is a regex searched in module FQNs or a predicate ``(fqn, module) -> bool``. The default,
    :data:`pcopt.names.PC_TARGETS`, selects the attention output and all FFN matrices (torchtitan
    ``attention.wo``, ``feed_forward.w1/w2/w3``; Hugging Face ``o_proj``, ``gate_proj``, ``up_proj``,
    ``down_proj``); never embeddings, LM head, norms or q/k/v. ``options`` and the keywords are those of
    :func:`precondition`. Returns the FQNs of the modules it preconditioned and warns if nothing matched.

    This is the declaration alone (the per-forward registration); :func:`pcopt.precondition_model` declares and
    then chooses the execution strategy. On a ``transformers`` ``PreTrainedModel`` it also guards
    ``model.save_pretrained`` (:func:`guard_save_pretrained`), whose stock save would write unloadable PC keys.
    """
    match = _matcher(PC_TARGETS if targets is None else targets)
    opts = PCOptions.resolve(
        options,
        dict(
            degree=degree,
            coefficients=coefficients,
            num_power_iterations=num_power_iterations,
            learn_gamma=learn_gamma,
            eps=eps,
        ),
    )
    chosen = [
        (fqn, mod)
        for fqn, mod in model.named_modules()
        if fqn and match(fqn, mod) and (name in mod._parameters or parametrize.is_parametrized(mod, name))
    ]
    for fqn, mod in chosen:
        precondition(mod, name, options=opts)
        mod.parametrizations[name][0].label = f"{fqn}.{name}"
    touched = [fqn for fqn, _ in chosen]
    if not touched:
        warnings.warn(
            f"precondition_model: no module matched targets={getattr(targets, 'pattern', targets)!r} with a "
            f"parameter {name!r}; nothing was preconditioned. Check the module names (model.named_modules()).",
            UserWarning,
            stacklevel=3,  # the caller of pcopt.precondition_model
        )
    else:
        logger.info("PC layer registered on %d weights (degree %d)", len(touched), opts.effective_degree)
        if is_pretrained_model(model):
            guard_save_pretrained(model)
    return touched


# -- the stock save of a preconditioned Hugging Face model -------------------------------------------------------
def is_pretrained_model(model: object) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel``, without importing ``transformers``.

    An instance of that class exists only once ``transformers.modeling_utils`` has been imported, so a model is
    one exactly when that module is loaded and the model is an instance of its ``PreTrainedModel``.
    """
    base = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)
    return isinstance(base, type) and isinstance(model, base)


def refuse_pc_keys(state_dict: dict, who: str) -> None:
    """Raise ``ValueError`` if ``state_dict`` holds PC entries, which ``from_pretrained`` cannot load."""
    pc = sorted(k for k in state_dict if pc_module_of_key(k))
    if pc:
        raise ValueError(
            f"{who}: the state_dict holds {len(pc)} PC entries (e.g. '{pc[0]}') that from_pretrained cannot "
            "load into a transformers model (those weights would be randomly initialised). Pass "
            "state_dict=pcopt.merged_state_dict(model), or leave state_dict out."
        )


class _GuardedSavePretrained:
    """``model.save_pretrained`` that refuses to write PC entries (see :func:`guard_save_pretrained`).

    An object held in the model's ``__dict__``, not a closure: ``copy.deepcopy`` and pickling give the copy a
    guard of its own (a closure would keep saving the original model).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory, *args, **kwargs):
        model = self.model
        state_dict = kwargs.get("state_dict")
        if state_dict is not None:
            refuse_pc_keys(state_dict, f"{type(model).__name__}.save_pretrained")
        elif preconditioners(model):
            n = len(preconditioners(model))
            raise RuntimeError(
                f"{type(model).__name__}.save_pretrained would write the PC entries of {n} preconditioned "
                "weights (...parametrizations.weight.original, gamma, u, v) instead of their weights; "
                "from_pretrained cannot load those and would initialise the weights randomly. Use "
                "pcopt.huggingface.save_pretrained(model, path) for a plain checkpoint with W_eff, "
                "pcopt.huggingface.save_training_state(model, path) to resume training later, or "
                "pcopt.merge(model) first when training is over."
            )
        return type(model).save_pretrained(model, save_directory, *args, **kwargs)


def guard_save_pretrained(model: nn.Module) -> nn.Module:
    """Make ``model.save_pretrained`` refuse to write PC entries that ``from_pretrained`` cannot load.

    :func:`declare_model` (so :func:`pcopt.precondition_model`) calls it on every ``transformers``
    ``PreTrainedModel`` it preconditions. After it, ``model.save_pretrained(path)`` raises ``RuntimeError`` naming
    ``pcopt.huggingface.save_pretrained`` and ``save_training_state`` while the model holds PC weights, unless
    it is given a ``state_dict=`` without PC entries (one with PC entries is refused with ``ValueError``); after
    :func:`pcopt.merge` it saves as usual. Calling it again changes nothing. Returns the model.
    """
    if not isinstance(model.__dict__.get("save_pretrained"), _GuardedSavePretrained):
        model.__dict__["save_pretrained"] = _GuardedSavePretrained(model)
    return model
