"""Between preconditioned and plain models: merge, dense state_dicts, dense starts, checked loading.

* :func:`merge` - a trained PC model becomes a plain one holding ``W_eff`` (zero inference overhead).
* :func:`merged_state_dict` - the same as a state_dict, also for FSDP2-sharded models.
* :func:`load_dense_state_dict` - start a PC model from dense weights (the paper's start, or
  function-preserving through :mod:`pcopt.inverse`).
* :func:`load_state_dict` - ``model.load_state_dict`` that names the conversion when PC and dense layouts meet.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from pcopt._tensor import is_dtensor
from pcopt.kernel import write_
from pcopt.layer import refresh_
from pcopt.names import pc_keys, pc_module_of_key
from pcopt.registration import _pcs_of, preconditioner, preconditioners, unregister
from pcopt.slot import PCSlot

__all__ = ["effective_weight", "merge", "merged_state_dict", "load_dense_state_dict", "load_state_dict"]


def effective_weight(module: nn.Module, name: str = "weight", *, include_gamma: bool = True) -> Tensor:
    """The full effective weight (fp32 or wider) of a PC weight, also when its raw weight is sharded.

    With FSDP2-sharded weights this all-gathers: every rank must call it.
    """
    return preconditioner(module, name).effective_weight(include_gamma=include_gamma)


def merge(model: nn.Module) -> list[str]:
    """Replace every PC parametrization in ``model`` by a plain parameter holding its current ``W_eff``.

    The result runs with zero PC overhead and gives the same outputs as the preconditioned model (the
    current ``u``, ``v`` are used; no refresh happens). The raw parameter object is kept, its data replaced.
    Works on unsharded models in either strategy; for FSDP2-sharded ones use :func:`merged_state_dict`.
    Returns the merged FQNs.
    """
    merged = []
    for fqn, mod in list(model.named_modules()):
        for name, pc in _pcs_of(mod):
            if is_dtensor(pc.raw_weight):
                raise RuntimeError(
                    f"merge got a sharded (FSDP2) weight at {fqn}.{name}; merge works on unsharded models. "
                    "Use pcopt.merged_state_dict(model) on every rank to get a dense state_dict instead."
                )
            eff = pc.effective_weight()
            if isinstance(pc._plist, PCSlot):  # once per step: module.<name> already is a plain parameter
                holder = mod._modules["parametrizations"]
                del holder._modules[name]
                if not holder._modules:
                    del mod._modules["parametrizations"]
            else:
                unregister(mod, name)
            with torch.no_grad():
                getattr(mod, name).copy_(eff)
            merged.append(f"{fqn}.{name}" if fqn else name)
    if not merged:
        warnings.warn(
            "pcopt.merge: the model has no preconditioned weights; nothing to merge.",
            UserWarning,
            stacklevel=2,
        )
    return merged


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state_dict with every PC weight as a dense ``<fqn>.<name>`` entry holding ``W_eff``.

    PC entries (raw weight, gamma, u, v, pc_meta) are replaced by the merged weight, in the raw weight's
    dtype; other entries are as in ``model.state_dict()``. Loads into the same architecture without PC.
    Sharded PC weights are all-gathered, so every rank must call it.
    """
    sd = model.state_dict()
    for fqn, pc in preconditioners(model):
        mod_fqn, _, name = fqn.rpartition(".")
        for key in pc_keys(mod_fqn, name):
            sd.pop(key, None)
        sd[fqn] = pc.effective_weight().to(pc.raw_weight.dtype)
    return sd


def load_dense_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    preserve_function: bool = False,
    strict: bool = True,
):
    """Load a dense (non-PC) checkpoint into a preconditioned model.

    ``preserve_function=False`` (the paper's start from dense weights): each dense ``W`` becomes the raw
    weight, gamma is set to 1 and ``u``, ``v`` are refreshed, so ``W_eff = sigma p(W / sigma)`` (the
    spectrum is flattened from the first step on). ``preserve_function=True``: the raw weight is chosen so
    that ``W_eff`` equals the dense weight (SVD-based inverse of the polynomial, ``u``, ``v`` set to the exact
    top singular vectors), so the model computes the same function as the dense one. Unsharded models only.
    Returns what ``load_state_dict`` returns.
    """
    sd = dict(state_dict)
    pcs = preconditioners(model)
    for fqn, pc in pcs:
        mod_fqn, _, name = fqn.rpartition(".")
        keys = pc_keys(mod_fqn, name)
        if fqn not in sd:
            if strict:
                raise RuntimeError(
                    f"load_dense_state_dict: the dense state_dict has no '{fqn}' for the preconditioned weight. "
                    "Pass the state_dict of the same architecture without PC (or strict=False)."
                )
            continue
        sd[keys.raw] = sd.pop(fqn)
        sd[keys.gamma] = torch.ones_like(pc.gamma)
        sd[keys.u] = pc.u.detach().clone()
        sd[keys.v] = pc.v.detach().clone()
        sd[keys.meta] = pc.pc_meta.detach().clone()
    result = model.load_state_dict(sd, strict=strict)
    for fqn, pc in pcs:
        mod_fqn, _, name = fqn.rpartition(".")
        mod = model.get_submodule(mod_fqn)
        if preserve_function and isinstance(pc._plist, PCSlot):
            _preserve_once_per_step(fqn, pc)
        elif preserve_function:
            setattr(mod, name, pc.raw_weight.detach().clone())  # right_inverse: raw <- p^-1, u, v <- exact
            pc.mark_fresh()
        else:
            pc.reset_state()
    if not preserve_function:
        refresh_([pc for _, pc in pcs])
    write_([pc._plist for _, pc in pcs if isinstance(pc._plist, PCSlot)])
    return result


@torch.no_grad()
def _preserve_once_per_step(fqn: str, pc) -> None:
    """Once per step: the loaded dense weight sits in the raw weight; make it ``W_eff`` instead (SVD inverse)."""
    from pcopt.inverse import dense_to_raw

    if is_dtensor(pc.raw_weight):
        raise RuntimeError(
            f"load_dense_state_dict(preserve_function=True) got a sharded weight at {fqn}; it works on unsharded "
            "models. Load the dense weights before pcopt.set_strategy(..., shard=...)."
        )
    dense = pc.raw_weight.detach()
    raw, u, v = dense_to_raw(pc.matrices(dense), pc.coefficients, pc.gamma.detach(), pc.eps)
    pc.raw_weight.copy_(pc.weight_of(raw).to(dense.dtype))
    pc.u.copy_(u)
    pc.v.copy_(v)
    pc.mark_fresh()


def load_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], *, strict: bool = True):
    """``model.load_state_dict(state_dict, strict=strict)`` that explains PC/dense layout mismatches.

    A state_dict with PC keys (``...parametrizations.weight.original``, ...) loaded into a model without the
    PC layer at those weights is refused with the two ways out: precondition the model the same way, or
    save the checkpoint with :func:`merged_state_dict`. A dense state_dict loaded into a preconditioned model
    names :func:`load_dense_state_dict`.
    """
    pc_weights = {f"{m}.{n}" if m else n for m, n in filter(None, map(pc_module_of_key, state_dict))}
    ours = {fqn for fqn, _ in preconditioners(model)}
    missing_pc = sorted(pc_weights - ours)
    if missing_pc:
        raise RuntimeError(
            f"The state_dict holds preconditioned (PC) weights that this model does not have: {missing_pc[:3]}"
            f"{' ...' if len(missing_pc) > 3 else ''} ({len(missing_pc)} in all). To load it into a plain model, "
            "save it with pcopt.merged_state_dict(pc_model) (dense W_eff); to resume training, precondition "
            "this model first with the same settings (pcopt.precondition_model(model, ...))."
        )
    return model.load_state_dict(state_dict, strict=strict)
