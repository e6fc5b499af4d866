"""Config functions for ``--module torchtitan_ext --config <name>``.

Names are ``<model>_<optimizer>[_pc]``:

==================  ===========================================================================
model               ``debug`` (CPU-sized), ``llama2_271m``, ``llama2_1b``
optimizer           ``adamw`` or ``muon`` (Muon on hidden matrices, AdamW on the rest)
``_pc``             PC layer on attention output + FFN (degree 9 with AdamW, 5 with Muon), ``W_eff``
                    once per optimizer step on the FSDP2 shards (``debug_*_pc_per_forward``: in every forward)
``_spectra``        SPECTRA post-clipping of the hidden matrices' updates, c = 10 (``debug`` AdamW only)
==================  ===========================================================================

e.g. ``debug_muon_pc``, ``llama2_271m_adamw``, ``llama2_1b_muon_pc``. Every function returns a
torchtitan ``Trainer.Config``; any torchtitan flag overrides it on the command line.

The paper's models are Llama-2 style: MHA (no GQA), RoPE theta 10000, untied embeddings, RMSNorm
eps 1e-5, vocab 32000, seq 8192, torchtitan's Llama init. Hyperparameters (paper, 8 GPUs): global
batch 320 sequences, lr 8.485e-4 (271M AdamW), 4.243e-3 (271M Muon), 3e-4 (1B AdamW), 1.5e-3 (1B
Muon), betas (0.9, 0.95), weight decay 0.1 (also on gamma), clip 1.0, warmup 1% of the steps then
cosine to 10% of the peak; baseline and PC share every hyperparameter.
"""

from __future__ import annotations

import torch
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import LRSchedulersContainer
from torchtitan.components.validate import Validator
from torchtitan.config import ParallelismConfig, TrainingConfig
from torchtitan.config.configs import DebugConfig
from torchtitan.distributed.activation_checkpoint import SelectiveAC
from torchtitan.distributed.pipeline_parallel import pipeline_llm
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm, compute_ffn_hidden_dim
from torchtitan.models.llama3 import (
    _EMBEDDING_INIT,
    _NORM_INIT,
    _build_llama3_layers,
    _output_linear_init,
)
from torchtitan.models.llama3.model import Llama3Model
from torchtitan.models.llama3.parallelize import parallelize_llama
from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.trainer import Trainer

from pcopt import recipes
from torchtitan_ext import transform
from torchtitan_ext.compat import install_set_timeout_shim
from torchtitan_ext.data import TOKENIZER_DIR, register_datasets
from torchtitan_ext.optimizer import adamw_config, muon_config
from torchtitan_ext.pc import PCConverter

__all__ = [
    "debug_adamw",
    "debug_adamw_pc",
    "debug_muon",
    "debug_muon_pc",
    "debug_muon_pc_per_forward",
    "debug_adamw_pc_per_forward",
    "llama2_1b_adamw",
    "llama2_1b_adamw_pc",
    "llama2_1b_muon",
    "llama2_1b_muon_pc",
    "llama2_271m_adamw",
    "llama2_271m_adamw_pc",
    "llama2_271m_muon",
    "llama2_271m_muon_pc",
    "llama2_model",
    "pc_degree",
]

register_datasets()
install_set_timeout_shim()  # torch < 2.14 lacks torch.distributed.set_timeout, which torchtitan calls

# (dim, n_layers, n_heads, ffn hidden, vocab)
_FLAVORS = {
    "debug": (256, 6, 16, compute_ffn_hidden_dim(256, multiple_of=256), 2048),
    "271M": (1024, 16, 16, 2816, 32000),
    "1B": (2048, 18, 16, 5632, 32000),
}
MAX_SEQ_LEN = 8192

# Peak learning rates from the paper's released configs (debug uses the 271M values).
_LR = {
    ("debug", "adamw"): 8.485e-4,
    ("debug", "muon"): 4.243e-3,
    ("271M", "adamw"): 8.485e-4,
    ("271M", "muon"): 4.243e-3,
    ("1B", "adamw"): 3e-4,
    ("1B", "muon"): 1.5e-3,
}


pc_degree = recipes.pc_degree  # the paper's PC polynomial degree: 9 with AdamW, 5 with Muon


def llama2_model(flavor: str, *, pc: PCConverter.Config | None = None) -> ModelSpec:
    """A Llama-2 style model spec (MHA, RoPE theta 10000, untied), optionally with the PC layer."""
    dim, n_layers, n_heads, hidden, vocab = _FLAVORS[flavor]
    model = Llama3Model.Config(
        dim=dim,
        vocab_size=vocab,
        enable_weight_tying=False,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, eps=1e-5, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=_output_linear_init(dim)),
        layers=_build_llama3_layers(
            n_layers=n_layers,
            dim=dim,
            n_heads=n_heads,
            n_kv_heads=None,  # MHA
            hidden_dim=hidden,
            fuse_qkv=False,  # separate wq/wk/wv: Muon orthogonalizes each, HF export maps them 1:1
            rope=ComplexRoPE.Config(
                dim=dim // n_heads, max_seq_len=MAX_SEQ_LEN, theta=10000.0, scaling="none"
            ),
            attn_backend="flex",
        ),
    )
    spec = ModelSpec(
        name="llama2",
        flavor=flavor,
        model=model,
        parallelize_fn=parallelize_llama,
        pipelining_fn=pipeline_llm,
        post_optimizer_build_fn=None,
        state_dict_adapter=Llama3StateDictAdapter,
    )
    return spec if pc is None else transform.pc_model_spec(spec, pc.build())


def _config(flavor: str, optimizer: str, pc: bool, pc_mode: str = "auto") -> Trainer.Config:
    lr = _LR[(flavor, optimizer)]
    model_spec = llama2_model(flavor)
    opt = adamw_config(lr) if optimizer == "adamw" else muon_config(lr)
    opt.implementation = "fused" if torch.cuda.is_available() else "foreach"

    if flavor == "debug":
        steps, warmup = 30, 2
        training = TrainingConfig(local_batch_size=2, seq_len=256, steps=steps, max_norm=recipes.GRAD_CLIP)
        hf_assets_path = str(TOKENIZER_DIR)
        dataloader = HuggingFaceTextDataLoader.Config(dataset="kjv_sample")
        log_freq, ckpt_interval = 1, 10
        activation_checkpoint = None  # CPU-sized: nothing to save, recompute only costs time
    else:
        steps = 22_000 if flavor == "271M" else 61_100
        warmup = round(steps * recipes.WARMUP_FRACTION)
        training = TrainingConfig(
            local_batch_size=8 if flavor == "271M" else 4,
            global_batch_size=320,
            seq_len=8192,
            steps=steps,
            max_norm=recipes.GRAD_CLIP,
        )
        hf_assets_path = "./assets/hf/Llama-2-7b-hf"  # the Llama-2 tokenizer (vocab 32000)
        dataloader = HuggingFaceTextDataLoader.Config(
            dataset="text", dataset_path="HuggingFaceFW/fineweb:sample-350BT"
        )
        log_freq, ckpt_interval = 10, 1000
        # torchtitan's stock selective AC: the PC polynomial is free of in-place ops, so saved matmul
        # outputs stay valid. Same policy for baseline and PC runs, so their step times compare.
        activation_checkpoint = SelectiveAC.Config()

    config = Trainer.Config(
        model_spec=model_spec,
        hf_assets_path=hf_assets_path,
        loss=ChunkedLossWrapper.Config(
            loss_fn=CrossEntropyLoss.Config(global_vocab_size=model_spec.model.vocab_size)
        ),
        optimizer=opt,
        lr_scheduler=LRSchedulersContainer.Config(
            warmup_steps=warmup, decay_type="cosine", min_lr_factor=recipes.FINAL_LR_RATIO
        ),
        training=training,
        dataloader=dataloader,
        metrics=MetricsProcessor.Config(log_freq=log_freq),
        parallelism=ParallelismConfig(spmd_backend="partial_dtensor"),
        checkpoint=CheckpointManager.Config(interval=ckpt_interval, last_save_model_only=False),
        activation_checkpoint=activation_checkpoint,
        validator=Validator.Config(enable=False, freq=500, steps=40 if flavor != "1B" else 80),
        debug=DebugConfig(seed=42),
    )
    if not torch.cuda.is_available():
        from torchtitan_ext.cpu_attention import DENSE_ATTENTION_OVERRIDE

        config.override.imports.append(DENSE_ATTENTION_OVERRIDE)
    if pc:  # the same transform as for any torchtitan config, with the paper's degree
        return transform.with_pc(config, degree=pc_degree(optimizer), strategy=pc_mode)
    return transform._pc_components(config)


def debug_adamw() -> Trainer.Config:
    return _config("debug", "adamw", pc=False)


def debug_adamw_pc() -> Trainer.Config:
    return _config("debug", "adamw", pc=True)


def _spectra(config: Trainer.Config, c: float = 10.0) -> Trainer.Config:
    """SPECTRA post-clipping (docs/spectra.md) of the hidden matrices' updates, ``c * lr`` constant in warmup."""
    config.optimizer.spectral_clip = c
    config.optimizer.spectral_clip_warmup_steps = config.lr_scheduler.warmup_steps
    return config


def debug_adamw_spectra() -> Trainer.Config:
    return _spectra(_config("debug", "adamw", pc=False))


def debug_adamw_pc_spectra() -> Trainer.Config:
    return _spectra(_config("debug", "adamw", pc=True))


def debug_muon() -> Trainer.Config:
    return _config("debug", "muon", pc=False)


def debug_muon_pc() -> Trainer.Config:
    return _config("debug", "muon", pc=True)


def debug_muon_pc_per_forward() -> Trainer.Config:
    """``debug_muon_pc`` with the PC map in every forward (the parametrize registration: the reference
    semantics, and the mode that runs under pipeline parallelism) instead of once per step."""
    return _config("debug", "muon", pc=True, pc_mode="per_forward")


def debug_adamw_pc_per_forward() -> Trainer.Config:
    """``debug_adamw_pc`` with the PC map in every forward (see ``debug_muon_pc_per_forward``)."""
    return _config("debug", "adamw", pc=True, pc_mode="per_forward")


def llama2_271m_adamw() -> Trainer.Config:
    return _config("271M", "adamw", pc=False)


def llama2_271m_adamw_pc() -> Trainer.Config:
    return _config("271M", "adamw", pc=True)


def llama2_271m_muon() -> Trainer.Config:
    return _config("271M", "muon", pc=False)


def llama2_271m_muon_pc() -> Trainer.Config:
    return _config("271M", "muon", pc=True)


def llama2_1b_adamw() -> Trainer.Config:
    return _config("1B", "adamw", pc=False)


def llama2_1b_adamw_pc() -> Trainer.Config:
    return _config("1B", "adamw", pc=True)


def llama2_1b_muon() -> Trainer.Config:
    return _config("1B", "muon", pc=False)


def llama2_1b_muon_pc() -> Trainer.Config:
    return _config("1B", "muon", pc=True)


def __getattr__(name: str):
    """``<stock name><suffix>``: torchtitan's stock config function with a recipe (:func:`transform.recipe_config`).

    Unknown names raise ``ValueError`` listing the families, their stock names and the suffixes.
    """
    if name.startswith("_"):
        raise AttributeError(name)
    return transform.recipe_config(name)
