"""torchtitan's DCP checkpoint manager, extended so a dense checkpoint can start a PC run.

A PC run's checkpoints hold, besides torchtitan's usual state (optimizer, lr scheduler, dataloader,
step), every PC matrix as ``<m>.parametrizations.weight.original`` (raw weight),
``<m>.parametrizations.weight.0.gamma``, the power-iteration buffers ``...0.u`` / ``...0.v`` and the PC
settings ``...0.pc_meta`` (keys: ``pcopt.names``); the
optimizer state is keyed by the same parameter FQNs. Resuming restores all of it, so a resumed run
continues exactly.

:class:`PCCheckpointManager` adds, for an *initial* load (``--checkpoint.initial_load_path``, used when
the run's own checkpoint folder is empty):

* a **dense** DCP checkpoint (a baseline run's: ``<m>.weight`` keys) loads into a PC model: each
  dense weight becomes the raw weight (``pcopt.load_dense_state_dict`` semantics), then gamma is set
  to 1 and u, v are re-initialised and refreshed for the loaded weights;
* the same after a Hugging Face initial load (``--checkpoint.initial_load_in_hf``), whose key mapping
  :class:`torchtitan_ext.state_dict_adapter.PCLlamaStateDictAdapter` provides.

``--checkpoint.last_save_in_hf`` writes the **merged** model: every PC matrix as its ``W_eff`` under the stock key
(once per step: the ``W_eff`` parameter the last step wrote; per forward: the map of the raw weight), the PC state
left out, through the family's state-dict adapter, so ``transformers`` loads it as a plain model.

Two guards, for PC and baseline runs alike:

* a checkpoint whose PC layout does not match the model's (a PC checkpoint resumed by a config without
  the PC layer, a dense checkpoint resumed with its optimizer state by a PC config, different PC
  targets) raises an error that names the conversion, before DCP's list of missing keys;
* a save into a step folder that already holds a complete checkpoint (``.metadata``, the marker
  torchtitan's loader looks for) removes that marker first, so a save killed mid-write leaves a folder
  the loader skips rather than old metadata over new data.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.checkpointer.base import DATALOADER, LR_SCHEDULER, MODEL, OPTIMIZER, TRAIN_STATE
from torchtitan.tools import filesystem

import pcopt
from pcopt._tensor import is_dtensor
from pcopt.names import RAW_SUFFIX, STATE_SUFFIXES

logger = logging.getLogger(__name__)

__all__ = ["PCCheckpointManager"]

_RAW = RAW_SUFFIX
_PC_STATE = STATE_SUFFIXES
_DENSE = ".weight"
_EXPORT = "python -m torchtitan_ext.export --config <the PC config> --checkpoint {ckpt} --output <dir>"


def _check_pc_layout(requested: list[str], saved: set[str], checkpoint_id: str) -> None:
    """Raise if the model wants dense weights where the checkpoint has PC ones, or PC targets differ."""
    pc_saved = [
        k for k in requested if k.endswith(_DENSE) and k not in saved and k[: -len(_DENSE)] + _RAW in saved
    ]
    if pc_saved:
        module = pc_saved[0][: -len(_DENSE)]
        raise RuntimeError(
            f"Checkpoint {checkpoint_id} was written with the PC layer on {len(pc_saved)} matrices this model "
            f"has without it (e.g. it holds '{module}{_RAW}' where this model expects '{pc_saved[0]}'). To "
            "resume it, use the config it was trained with (the one with the PC layer, e.g. debug_muon_pc). "
            "To continue without PC, export its merged weights with `"
            + _EXPORT.format(ckpt=checkpoint_id)
            + "` and start from them with `--checkpoint.initial_load_path <dir> "
            "--checkpoint.initial_load_in_hf`."
        )
    raw = [k for k in requested if k.endswith(_RAW)]
    dense_saved = [k for k in raw if k not in saved and k[: -len(_RAW)] + _DENSE in saved]
    if dense_saved and any(k in saved for k in raw):
        raise RuntimeError(
            f"Checkpoint {checkpoint_id} has the PC layer on other matrices than this model: it holds dense "
            f"weights for {len(dense_saved)} of this model's PC matrices (e.g. "
            f"'{dense_saved[0][: -len(_RAW)]}{_DENSE}'). Resume it with the PC targets of the run that wrote it "
            "(PCConverter.Config.targets), or start from its weights only after exporting them with `"
            + _EXPORT.format(ckpt=checkpoint_id)
            + "`."
        )


class PCCheckpointManager(CheckpointManager):
    """``CheckpointManager`` that starts PC runs from dense checkpoints (see the module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        pass

    def __init__(self, config: Config, *, model_parts, **kwargs) -> None:
        self._pc_model_parts = model_parts
        self._has_pc = any(pcopt.preconditioners(m) for m in model_parts)
        super().__init__(config, model_parts=model_parts, **kwargs)

    def _reset_pc_state(self, why: str) -> None:
        n = sum(pcopt.reset_preconditioners(m) for m in self._pc_model_parts)
        logger.info("%s: reset gamma to 1 and refreshed u, v of %d PC matrices", why, n)

    def dcp_save(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: str,
        async_mode,
        enable_garbage_collection: bool = False,
        to_hf: bool = False,
    ):
        if to_hf and self._has_pc:
            state_dict = self._merged(state_dict)
        if not to_hf and not filesystem.is_remote(checkpoint_id):
            marker = os.path.join(checkpoint_id, ".metadata")
            if os.path.isfile(marker) and (not dist.is_initialized() or dist.get_rank() == 0):
                # DCP writes .metadata last (coordinator rank, after every rank's data): removing the old one
                # first means a folder holds a .metadata only once the new save has completed.
                os.remove(marker)
                logger.warning(
                    "Overwriting the complete checkpoint %s (its .metadata was removed first)", checkpoint_id
                )
        return super().dcp_save(
            state_dict,
            checkpoint_id=checkpoint_id,
            async_mode=async_mode,
            enable_garbage_collection=enable_garbage_collection,
            to_hf=to_hf,
        )

    @torch.no_grad()
    def _merged(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with each PC raw weight replaced by its ``W_eff`` (same key, dtype and placement) and the
        rest of the PC state dropped: what a Hugging Face save writes under the stock names (collective)."""
        effective = {}
        for part in self._pc_model_parts:
            for fqn, pc in pcopt.preconditioners(part):
                module = fqn.rpartition(".")[0]
                # written by the last step's PCState.after_step, placed like raw
                if pc.strategy == "once_per_step":
                    effective[module] = pc._plist.effective.detach()
                else:  # per forward: the map of the (gathered) raw weight, placed back like it
                    raw = pc.raw_weight
                    full = pc.effective_weight()
                    if is_dtensor(raw):
                        from torch.distributed.tensor import distribute_tensor

                        full = distribute_tensor(full.to(raw.device), raw.device_mesh, raw.placements)
                    effective[module] = full
        out: dict[str, Any] = {}
        merged = 0
        for key, value in state_dict.items():
            if key.endswith(_PC_STATE):
                continue
            module = key[: -len(_RAW)] if key.endswith(_RAW) else None
            if module in effective:
                value = effective[module].to(value.dtype)
                merged += 1
            out[key] = value
        logger.info(
            "Hugging Face save: %d PC matrices written as their merged W_eff, PC state left out", merged
        )
        return out

    def dcp_load(
        self, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool, from_quantized: bool
    ) -> None:
        if from_hf:
            super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)
            if self._has_pc:
                self._reset_pc_state(f"dense Hugging Face weights loaded from {checkpoint_id}")
            return
        if filesystem.is_remote(checkpoint_id):  # the layout checks read local DCP metadata only
            return super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)
        saved = set(dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata)
        _check_pc_layout(list(state_dict), saved, checkpoint_id)
        raw_keys = [k for k in state_dict if k.endswith(_RAW)]
        dense_start = bool(raw_keys) and not any(k in saved for k in raw_keys)
        if not dense_start:
            return super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)

        # A dense checkpoint: load each dense weight in place into the PC raw weight.
        extra = sorted(k for k in state_dict if k in (OPTIMIZER, LR_SCHEDULER, DATALOADER, TRAIN_STATE))
        if extra:
            raise ValueError(
                f"Checkpoint {checkpoint_id} holds dense weights (no PC keys) and this model has the PC layer, so "
                f"only its model weights can be loaded, but {extra} were requested too (a resume: its optimizer "
                "state belongs to the dense weights). To start a PC run from it, use an empty --checkpoint.folder "
                f"and --checkpoint.initial_load_path {checkpoint_id} with --checkpoint.initial_load_model_only "
                "(the default). To resume it as it was, use the config without the PC layer."
            )
        missing = [k for k in raw_keys if k[: -len(_RAW)] + ".weight" not in saved]
        if missing:
            raise RuntimeError(
                f"Checkpoint {checkpoint_id} has neither PC keys nor dense weights for {missing[:4]} "
                "(expected '<module>.weight'). It does not match this model's architecture."
            )
        remapped = {}
        for key, value in state_dict.items():
            if key.endswith(_PC_STATE):
                continue  # not in a dense checkpoint; reset below
            if key.endswith(_RAW):
                key = key[: -len(_RAW)] + ".weight"
            remapped[key] = value
        dcp.load(remapped, checkpoint_id=checkpoint_id)
        self.states[MODEL].load_state_dict({k: v for k, v in state_dict.items() if not k.endswith(_PC_STATE)})
        self._reset_pc_state(f"dense checkpoint {checkpoint_id} loaded into the PC raw weights")
