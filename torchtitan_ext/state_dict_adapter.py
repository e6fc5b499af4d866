"""Hugging Face <-> torchtitan key mapping for models with the PC layer, over any family's own adapter.

torchtitan's ``Llama3StateDictAdapter`` silently skips keys it does not know, so the PC keys
(``<m>.parametrizations.weight.original``, ``.0.gamma``, ``.0.u``, ``.0.v``) would vanish. This
adapter maps a PC matrix's **raw** weight to the Hugging Face name of the matrix, which is what
*loading* a dense Hugging Face checkpoint into a PC model needs (``--checkpoint.initial_load_in_hf``:
the dense weight becomes the raw weight, as ``pcopt.load_dense_state_dict`` does; gamma, u, v are
then reset by :class:`torchtitan_ext.checkpoint.PCCheckpointManager`).

Saving a PC model to Hugging Face format writes the **merged** weight instead: the checkpoint manager puts each
``W_eff`` in place of its raw weight before this adapter renames the keys (``--checkpoint.last_save_in_hf``), and
``python -m torchtitan_ext.export`` does the same from a DCP checkpoint.
"""

from __future__ import annotations

import functools
from typing import Any

from torchtitan.models.common.linear import Linear
from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

from pcopt.names import RAW_SUFFIX, STATE_SUFFIXES

__all__ = ["PCLlamaStateDictAdapter", "pc_module_fqns", "pc_state_dict_adapter"]

_RAW = RAW_SUFFIX
_PC_STATE = STATE_SUFFIXES


def pc_module_fqns(model_config) -> set[str]:
    """FQNs of the modules that carry the PC layer in a model config (``PCLinear`` configs)."""
    from torchtitan_ext.pc import PCLinear

    return {fqn for fqn, cfg, *_ in model_config.traverse(Linear.Config) if isinstance(cfg, PCLinear.Config)}


class _PCKeys:
    """Mixin over a family's torchtitan state-dict adapter: PC raw weights <-> the dense Hugging Face names."""

    def __init__(self, model_config, hf_assets_path: str | None):
        super().__init__(model_config, hf_assets_path)
        self.pc_fqns = pc_module_fqns(model_config)

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        dense: dict[str, Any] = {}
        for key, value in state_dict.items():
            if key.endswith(_PC_STATE):
                continue
            if key.endswith(_RAW) and key[: -len(_RAW)] in self.pc_fqns:
                key = key[: -len(_RAW)] + ".weight"
            dense[key] = value
        return super().to_hf(dense)

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in super().from_hf(hf_state_dict).items():
            module = key.removesuffix(".weight")
            if key.endswith(".weight") and module in self.pc_fqns:
                key = module + _RAW
            out[key] = value
        return out


@functools.cache
def pc_state_dict_adapter(adapter: type) -> type:
    """``adapter`` (a torchtitan family's state-dict adapter class) that also maps the PC keys (see above)."""
    if issubclass(adapter, _PCKeys):
        return adapter
    return type(f"PC{adapter.__name__}", (_PCKeys, adapter), {"__module__": __name__})


PCLlamaStateDictAdapter = pc_state_dict_adapter(Llama3StateDictAdapter)
"""``Llama3StateDictAdapter`` that maps PC raw weights to their dense Hugging Face names."""
