"""Export a torchtitan_ext DCP checkpoint as a merged Hugging Face model (safetensors + config.json).

Usage::

    python -m torchtitan_ext.export --config debug_muon_pc \\
        --checkpoint outputs/checkpoint/step-30 --output exported/

Every PC matrix is written as its merged effective weight ``W_eff = gamma * sigma * p(W / sigma)``
(``pcopt.merged_state_dict``, with the checkpoint's u and v), so the exported model is a plain Hugging Face
model with zero inference overhead that computes what the PC model computes. Dense (baseline) checkpoints
export as they are. Runs in one process on the CPU; no GPU or torchrun needed. The tokenizer files found
in the config's ``hf_assets_path`` (or ``--hf_assets_path``) are copied along.

The model family is the config's ``model_spec.name``: ``llama2`` and ``llama3`` export as
``LlamaForCausalLM``, ``qwen3`` (dense) as ``Qwen3ForCausalLM``, ``deepseek_v3`` as ``DeepseekV3ForCausalLM``
(:mod:`torchtitan_ext.hf_config` writes their ``config.json`` from the torchtitan config and refuses what the
Hugging Face class cannot express). The weights go through the family's own torchtitan ``state_dict_adapter``
(fused ``wqkv`` is split into ``wq``/``wk``/``wv`` by torchtitan's state_dict hook, MoE expert stacks into
per-expert matrices by the adapter).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torchtitan.config.override import apply_overrides
from torchtitan.trainer import Trainer

import pcopt
from torchtitan_ext.hf_config import family_of
from torchtitan_ext.pc import attach_pc

logger = logging.getLogger(__name__)

__all__ = ["build_model", "export", "hf_config", "load_checkpoint", "load_trainer_config"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def load_trainer_config(config: str | Trainer.Config, module: str = "torchtitan_ext") -> Trainer.Config:
    """Call the config function ``config`` of ``module`` (its ``config_registry`` if it has one).

    A ``Trainer.Config`` object is returned as it is (e.g. a stock torchtitan config with the PC layer added).
    """
    if isinstance(config, Trainer.Config):
        return config
    try:
        mod = importlib.import_module(f"{module}.config_registry")
    except ModuleNotFoundError:
        mod = importlib.import_module(module)
    try:
        fn = getattr(mod, config, None)
        generated = ""
    except ValueError as e:  # a module-level __getattr__ (recipe names) that says which names it makes
        fn, generated = None, f" {e}"
    if fn is None:
        available = sorted(getattr(mod, "__all__", None) or (n for n in vars(mod) if not n.startswith("_")))
        raise ValueError(
            f"{mod.__name__} has no config function {config!r}. Pass one of {available} "
            f"(or --module for configs defined elsewhere).{generated}"
        )
    return fn()


def build_model(trainer_config: Trainer.Config, *, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The config's model, unsharded on the CPU in ``dtype`` (fp32), with the PC layer attached and initialised.

    The config's ``--override.imports`` are applied first, as the trainer does (the torchtitan_ext configs
    add the dense-mask attention on machines without a GPU). A wider ``dtype`` (float64) converts the
    initialised model, so a checkpoint loaded into it keeps its float64 values (DCP casts on load).
    """
    trainer_config = copy.deepcopy(trainer_config)  # overrides mutate the config tree in place
    apply_overrides(trainer_config.override, trainer_config)
    model_config = trainer_config.model_spec.model
    with torch.device("meta"):
        model = model_config.build()
    attach_pc(model)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    if dtype != torch.float32:
        # Module.double() & co convert floating-point tensors only; Module.to(dtype) would also cast the
        # complex RoPE cache of ComplexRoPE to a real tensor (its cosines), breaking the rotation
        casts = {torch.float64: model.double, torch.bfloat16: model.bfloat16, torch.float16: model.half}
        if dtype not in casts:
            raise ValueError(f"build_model builds in float32 or {sorted(map(str, casts))}, got {dtype}.")
        casts[dtype]()
    model.eval()
    return model


def load_checkpoint(model: torch.nn.Module, checkpoint: str | os.PathLike) -> None:
    """Load the model state (including PC raw weights, gamma, u, v) of a torchtitan DCP checkpoint."""
    checkpoint = str(checkpoint)
    if not os.path.isfile(os.path.join(checkpoint, ".metadata")):
        raise ValueError(
            f"{checkpoint!r} is not a DCP checkpoint folder (no .metadata). Pass a step folder such as "
            "<dump_folder>/checkpoint/step-100."
        )
    state = model.state_dict()
    dcp.load(state, checkpoint_id=checkpoint)
    model.load_state_dict(state)


def hf_config(
    trainer_config: Trainer.Config, dtype: torch.dtype, bos_id: int | None, eos_id: int | None
) -> dict:
    """``config.json`` of the equivalent Hugging Face model of the config's family (``model_spec.name``).

    ``ValueError`` for a family without an export (it names the supported ones) and for a torchtitan setting
    the Hugging Face class cannot express (:mod:`torchtitan_ext.hf_config`).
    """
    config = family_of(trainer_config).hf_config(trainer_config.model_spec.model)
    config.update(bos_token_id=bos_id, eos_token_id=eos_id, torch_dtype=str(dtype).removeprefix("torch."))
    return config


def _to_hf(adapter, state_dict: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """``adapter.to_hf(state_dict)``, refusing to drop a tensor: torchtitan's adapters skip (or KeyError on)
    keys they have no Hugging Face name for, which would export a model missing weights.

    Every adapter exported here maps key by key, so each key is probed alone; only the tied ``lm_head``
    may map to nothing (Hugging Face ties it to the embedding).
    """
    dropped = []
    for key, value in state_dict.items():
        try:
            mapped = adapter.to_hf({key: value})
        except KeyError:
            mapped = {}
        if not mapped and not (tied and key == "lm_head.weight"):
            dropped.append(key)
    if dropped:
        raise ValueError(
            f"{type(adapter).__name__} has no Hugging Face name for {dropped[:8]}"
            f"{' ...' if len(dropped) > 8 else ''}; exporting would drop these tensors. Export a model without "
            "them, or map them in the model's state_dict_adapter."
        )
    return adapter.to_hf(dict(state_dict))


@torch.no_grad()
def export(
    config: str | Trainer.Config,
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    module: str = "torchtitan_ext",
    dtype: torch.dtype = torch.float32,
    hf_assets_path: str | None = None,
) -> Path:
    """Write the merged model of ``checkpoint`` to ``output`` as Hugging Face safetensors; returns ``output``.

    ``config``: a config function name of ``module``, or a ``Trainer.Config``. The merge runs in fp32, or in
    float64 for a float64 export (the model is built in float64, so the checkpoint's values are not rounded).
    """
    from safetensors.torch import save_file

    trainer_config = load_trainer_config(config, module)
    family = family_of(trainer_config)
    model_config = trainer_config.model_spec.model
    # refuse an inexpressible model before loading anything
    config_json = hf_config(trainer_config, dtype, None, None)
    model = build_model(trainer_config, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    load_checkpoint(model, checkpoint)
    n_pc = len(pcopt.preconditioners(model))
    merged = pcopt.merged_state_dict(model) if n_pc else model.state_dict()
    merged = family.adjust_state_dict(model_config, merged)
    adapter = trainer_config.model_spec.state_dict_adapter(model_config, None)
    hf_sd = _to_hf(adapter, merged, tied=bool(model_config.enable_weight_tying))
    hf_sd = {k: v.detach().to(dtype).contiguous() for k, v in hf_sd.items()}

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    save_file(hf_sd, str(output / "model.safetensors"), metadata={"format": "pt"})

    assets = Path(hf_assets_path or trainer_config.hf_assets_path)
    bos_id = eos_id = None
    for name in _TOKENIZER_FILES:
        if (assets / name).is_file():
            shutil.copy(assets / name, output / name)
    if (assets / "tokenizer.json").is_file() and (assets / "tokenizer_config.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(assets / "tokenizer.json"))
        tc = json.loads((assets / "tokenizer_config.json").read_text())

        def _tok(key):
            t = tc.get(key)
            return t.get("content") if isinstance(t, dict) else t

        bos_id = tok.token_to_id(_tok("bos_token")) if _tok("bos_token") else None
        eos_id = tok.token_to_id(_tok("eos_token")) if _tok("eos_token") else None
    config_json.update(bos_token_id=bos_id, eos_token_id=eos_id)
    (output / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    logger.info(
        "exported %s as %s (%d PC matrices merged, %d tensors, %s) to %s",
        checkpoint,
        family.hf_class,
        n_pc,
        len(hf_sd),
        dtype,
        output,
    )
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Export a torchtitan_ext checkpoint as a merged Hugging Face model (Llama, Qwen3, DeepSeek-V3)."
    )
    parser.add_argument("--config", required=True, help="config function name, e.g. debug_muon_pc")
    parser.add_argument("--module", default="torchtitan_ext", help="module holding the config function")
    parser.add_argument(
        "--checkpoint", required=True, help="DCP step folder, e.g. outputs/checkpoint/step-30"
    )
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument(
        "--hf_assets_path", default=None, help="tokenizer folder to copy (default: the config's)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    export(
        args.config,
        args.checkpoint,
        args.output,
        module=args.module,
        dtype=getattr(torch, args.dtype),
        hf_assets_path=args.hf_assets_path,
    )


if __name__ == "__main__":
    main()
