"""Export a torchtitan_ext DCP checkpoint as a merged Hugging Face Llama (safetensors + config.json).

Usage::

    python -m torchtitan_ext.export --config debug_muon_pc \\
        --checkpoint outputs/checkpoint/step-30 --output exported/

Every PC matrix is written as its merged effective weight ``W_eff = gamma * sigma * p(W / sigma)``
(``pcopt.merged_state_dict``, with the checkpoint's u and v), so the exported model is a plain
``LlamaForCausalLM`` with zero inference overhead that computes what the PC model computes. Dense
(baseline) checkpoints export as they are. Runs in one process on the CPU; no GPU or torchrun needed.
The tokenizer files found in the config's ``hf_assets_path`` (or ``--hf_assets_path``) are copied along.
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
from torchtitan_ext.pc import attach_pc

logger = logging.getLogger(__name__)

__all__ = ["build_model", "export", "hf_config", "load_checkpoint", "load_trainer_config"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def load_trainer_config(config: str, module: str = "torchtitan_ext") -> Trainer.Config:
    """Call the config function ``config`` of ``module`` (its ``config_registry`` if it has one)."""
    try:
        mod = importlib.import_module(f"{module}.config_registry")
    except ModuleNotFoundError:
        mod = importlib.import_module(module)
    fn = getattr(mod, config, None)
    if fn is None:
        available = sorted(getattr(mod, "__all__", None) or (n for n in vars(mod) if not n.startswith("_")))
        raise ValueError(
            f"{mod.__name__} has no config function {config!r}. Pass one of {available} "
            "(or --module for configs defined elsewhere)."
        )
    return fn()


def build_model(trainer_config: Trainer.Config) -> torch.nn.Module:
    """The config's model, unsharded on the CPU in fp32, with the PC layer attached and initialised.

    The config's ``--override.imports`` are applied first, as the trainer does (the torchtitan_ext configs
    add the dense-mask attention on machines without a GPU).
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
    """``config.json`` of the equivalent Hugging Face ``LlamaForCausalLM``."""
    m = trainer_config.model_spec.model
    attn = m.layers[0].attention
    n_heads = attn.n_heads
    n_kv = attn.n_kv_heads or n_heads
    rope = attn.rope
    if rope.scaling != "none":
        raise ValueError(f"Export supports plain RoPE only, got scaling={rope.scaling!r}.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.dim,
        "intermediate_size": m.layers[0].feed_forward.w1.out_features,
        "num_hidden_layers": len(m.layers),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": attn.head_dim or m.dim // n_heads,
        "hidden_act": "silu",
        "rms_norm_eps": m.norm.eps,
        "rope_theta": rope.theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope.theta},
        "max_position_embeddings": rope.max_seq_len,
        "vocab_size": m.vocab_size,
        "tie_word_embeddings": bool(m.enable_weight_tying),
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


@torch.no_grad()
def export(
    config: str,
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    module: str = "torchtitan_ext",
    dtype: torch.dtype = torch.float32,
    hf_assets_path: str | None = None,
) -> Path:
    """Write the merged model of ``checkpoint`` to ``output`` as Hugging Face safetensors; returns ``output``."""
    from safetensors.torch import save_file

    trainer_config = load_trainer_config(config, module)
    model = build_model(trainer_config)
    load_checkpoint(model, checkpoint)
    n_pc = len(pcopt.preconditioners(model))
    merged = pcopt.merged_state_dict(model) if n_pc else model.state_dict()
    adapter = trainer_config.model_spec.state_dict_adapter(trainer_config.model_spec.model, None)
    hf_sd = adapter.to_hf({k: v for k, v in merged.items()})
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
    (output / "config.json").write_text(
        json.dumps(hf_config(trainer_config, dtype, bos_id, eos_id), indent=2) + "\n"
    )
    logger.info(
        "exported %s (%d PC matrices merged, %d tensors, %s) to %s",
        checkpoint,
        n_pc,
        len(hf_sd),
        dtype,
        output,
    )
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Export a torchtitan_ext checkpoint as a merged Hugging Face Llama."
    )
    parser.add_argument("--config", required=True, help="config function name, e.g. debug_muon_pc")
    parser.add_argument("--module", default="torchtitan_ext", help="module holding the config function")
    parser.add_argument(
        "--checkpoint", required=True, help="DCP step folder, e.g. outputs/checkpoint/step-30"
    )
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
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
