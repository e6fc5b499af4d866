"""Saving preconditioned Hugging Face ``transformers`` models: plain checkpoints and resumable training state.

``transformers``' own ``model.save_pretrained(path)`` on a preconditioned model writes the PC entries
(``...parametrizations.weight.original``, ``...0.gamma``, ``...0.u``, ``...0.v``, ``...0.pc_meta``) in
place of ``...weight``. ``from_pretrained`` cannot load them: it reports missing and unexpected keys and
returns a model whose attention-output and MLP weights are **randomly initialised**. This module gives the
two saves that work:

* :func:`save_pretrained` - a plain checkpoint: every PC weight is written as its effective weight ``W_eff``
  (:func:`pcopt.merged_state_dict`), the rest unchanged. ``AutoModelForCausalLM.from_pretrained`` loads it
  with equal logits and no PC code; the model itself stays preconditioned (training can go on).
* :func:`save_training_state` - the same plain checkpoint plus ``pcopt_training_state.safetensors`` holding
  the PC entries; :func:`load_training_state` puts them back into a model preconditioned with the same
  settings, bit for bit. ``from_pretrained`` ignores the extra file, so one folder serves both uses.

:func:`pcopt.precondition_model` guards ``model.save_pretrained(path)`` of every ``PreTrainedModel`` it
preconditions (:func:`guard_save_pretrained`): the stock save refuses (``RuntimeError``, with these two ways
out) while the model holds PC weights, instead of writing a checkpoint that loads random weights. Example::

    model = LlamaForCausalLM(config)
    pcopt.precondition_model(model, degree=5)           # model.save_pretrained(path) now refuses
    ...                                                   # train
    pcopt.huggingface.save_training_state(model, "ckpt")  # plain weights + PC state
    plain = LlamaForCausalLM.from_pretrained("ckpt")      # inference: no PC, zero overhead

    resumed = LlamaForCausalLM.from_pretrained("ckpt")    # resume training:
    pcopt.precondition_model(resumed, degree=5)           #   same PC settings
    pcopt.huggingface.load_training_state(resumed, "ckpt")

Unsharded models only; FSDP2 training checkpoints go through torch.distributed.checkpoint (see
docs/torchtitan.md). Needs ``transformers`` (and ``safetensors``, which it installs); pcopt itself does not.
"""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from pcopt import merged_state_dict, preconditioners
from pcopt.names import pc_keys, pc_module_of_key
from pcopt.registration import guard_save_pretrained as _guard
from pcopt.registration import refuse_pc_keys

__all__ = [
    "TRAINING_STATE_FILE",
    "guard_save_pretrained",
    "load_training_state",
    "save_pretrained",
    "save_training_state",
]

TRAINING_STATE_FILE = "pcopt_training_state.safetensors"
"""File name of the PC entries that :func:`save_training_state` writes next to the plain checkpoint."""

_FORMAT = {"format": "pt", "pcopt": "pc-training-state-v1"}


def _check_model(model: Any, who: str) -> None:
    if not isinstance(model, nn.Module) or not callable(getattr(type(model), "save_pretrained", None)):
        raise TypeError(
            f"{who} expects a transformers PreTrainedModel (an nn.Module with save_pretrained), got "
            f"{type(model).__name__}. For other models save pcopt.merged_state_dict(model) with torch.save "
            "or safetensors."
        )


def _pc_entries(model: nn.Module) -> dict[str, Tensor]:
    """The PC entries (raw weight, gamma, u, v, pc_meta) of every PC weight, keyed as in model.state_dict()."""
    sd = model.state_dict()
    out = {}
    for fqn, _pc in preconditioners(model):
        mod_fqn, _, name = fqn.rpartition(".")
        for key in pc_keys(mod_fqn, name):
            if isinstance(sd[key], DTensor):
                raise RuntimeError(
                    f"save_training_state got a sharded (FSDP2) tensor at '{key}'; it saves unsharded models. "
                    "Save sharded training state with torch.distributed.checkpoint (torchtitan's checkpointer)."
                )
            out[key] = sd[key].detach().contiguous()
    return out


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """``model.save_pretrained(save_directory, **kwargs)`` with every PC weight written as its ``W_eff``.

    The checkpoint is a plain one of the same architecture: ``from_pretrained`` loads it without pcopt and
    gives the preconditioned model's logits. The model is not changed (it stays preconditioned). A
    ``state_dict=`` given in ``kwargs`` is used as it is, but refused (``ValueError``) if it holds PC entries.
    Models without PC weights are saved exactly as ``save_pretrained`` would.
    """
    _check_model(model, "pcopt.huggingface.save_pretrained")
    state_dict = kwargs.pop("state_dict", None)
    if state_dict is None:
        state_dict = merged_state_dict(model) if preconditioners(model) else None
    else:
        refuse_pc_keys(state_dict, "pcopt.huggingface.save_pretrained")
    # the class's method: bypasses guard_save_pretrained's refusal on the instance
    type(model).save_pretrained(model, save_directory, state_dict=state_dict, **kwargs)


def save_training_state(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """:func:`save_pretrained`, plus the PC entries in ``<save_directory>/pcopt_training_state.safetensors``.

    The folder loads as a plain model with ``from_pretrained``; :func:`load_training_state` restores the PC
    state of a model preconditioned with the same settings from it. Optimizer state is not included (save
    ``optimizer.state_dict()`` with ``torch.save``). ``kwargs`` go to ``save_pretrained``
    (``is_main_process=False`` also skips the PC file).
    """
    from safetensors.torch import save_file

    _check_model(model, "pcopt.huggingface.save_training_state")
    if "state_dict" in kwargs:
        raise TypeError(
            "save_training_state takes no state_dict: it writes the model's merged weights and its PC state. "
            "Use pcopt.huggingface.save_pretrained(model, path, state_dict=...) for a custom plain checkpoint."
        )
    entries = _pc_entries(model)
    if not entries:
        raise ValueError(
            "save_training_state: the model has no preconditioned weights, so there is no PC state to save. "
            "Use model.save_pretrained(path), or pcopt.precondition_model(model, ...) before training."
        )
    save_pretrained(model, save_directory, **kwargs)
    if kwargs.get("is_main_process", True):
        save_file(entries, os.path.join(save_directory, TRAINING_STATE_FILE), metadata=_FORMAT)


def load_training_state(model: nn.Module, save_directory: str | os.PathLike) -> list[str]:
    """Load the PC state written by :func:`save_training_state` into a preconditioned model.

    The model must be preconditioned at the same weights with the same settings (degree, coefficients,
    eps) as when it was saved, typically ``from_pretrained(save_directory)`` followed by the same
    ``pcopt.precondition_model`` call; its other weights are not touched. Raw weights, gamma, ``u`` and
    ``v`` are then exactly the saved ones. Raises ``FileNotFoundError`` without the PC file and
    ``RuntimeError`` when the PC weights or settings differ. Returns the FQNs of the PC weights loaded.
    """
    from safetensors.torch import load_file

    path = os.path.join(save_directory, TRAINING_STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"load_training_state: no {TRAINING_STATE_FILE} in {os.fspath(save_directory)!r}. It is written "
            "by pcopt.huggingface.save_training_state; a folder from save_pretrained holds merged weights "
            "only (start from them with pcopt.load_dense_state_dict, or train without PC)."
        )
    entries = load_file(path)
    saved = {f"{m}.{n}" if m else n for m, n in filter(None, map(pc_module_of_key, entries))}
    ours = {fqn for fqn, _ in preconditioners(model)}
    if saved != ours:
        missing, extra = sorted(saved - ours), sorted(ours - saved)
        hint = (
            "Precondition the model first, the same way as when it was saved (pcopt.precondition_model)."
            if not ours
            else "Precondition the same weights as when it was saved (same targets)."
        )
        raise RuntimeError(
            f"load_training_state: the saved PC state and the model's PC weights differ: saved but not "
            f"preconditioned here {missing[:3]}{' ...' if len(missing) > 3 else ''} ({len(missing)}), "
            f"preconditioned here but not saved {extra[:3]}{' ...' if len(extra) > 3 else ''} "
            f"({len(extra)}). {hint}"
        )
    result = model.load_state_dict(entries, strict=False)  # PC settings are checked by pcopt's load hook
    missing_pc = [k for k in result.missing_keys if pc_module_of_key(k)]
    if missing_pc or result.unexpected_keys:
        raise RuntimeError(
            f"load_training_state: incomplete PC state in {path!r}: missing {missing_pc[:3]}, unexpected "
            f"{result.unexpected_keys[:3]}. Save it again with pcopt.huggingface.save_training_state."
        )
    return sorted(ours)


def guard_save_pretrained(model: nn.Module) -> nn.Module:
    """Make ``model.save_pretrained`` refuse to write PC entries that ``from_pretrained`` cannot load.

    :func:`pcopt.precondition_model` already does this for every ``transformers`` ``PreTrainedModel`` it
    preconditions; call it for a model preconditioned another way (:func:`pcopt.precondition` on its modules).
    After it, ``model.save_pretrained(path)`` on a model that still holds PC weights raises ``RuntimeError``
    naming :func:`save_pretrained` and :func:`save_training_state`, unless it is given a ``state_dict=`` without
    PC entries; after :func:`pcopt.merge` it saves as usual. Returns the model.
    """
    _check_model(model, "pcopt.huggingface.guard_save_pretrained")
    return _guard(model)
