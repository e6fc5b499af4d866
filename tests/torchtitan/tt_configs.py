"""Configs used only by the tests (``--module tests.torchtitan.tt_configs``); the first two are wrong on purpose."""

from torchtitan.components.optimizer import ParamGroupConfig

from torchtitan_ext.config_registry import debug_muon, llama2_model
from torchtitan_ext.pc import PCConverter


def pc_targets_match_nothing():
    config = debug_muon()
    config.model_spec = llama2_model("debug", pc=PCConverter.Config(targets="no_such_module", degree=5))
    return config


def muon_on_norm_weights():
    config = debug_muon()
    muon, adamw = config.optimizer.param_groups
    config.optimizer.param_groups = [
        ParamGroupConfig(
            pattern=r"(^|\.)(attention_norm|ffn_norm)\.weight$|" + muon.pattern,
            optimizer_name="Muon",
            optimizer_kwargs=muon.optimizer_kwargs,
        ),
        adamw,
    ]
    return config


def debug_adamw_pc_paper_ac():
    """The debug PC model under the activation checkpointing policy of the paper-sized configs."""
    from torchtitan_ext.config_registry import debug_adamw_pc, llama2_271m_adamw_pc

    config = debug_adamw_pc()
    config.activation_checkpoint = llama2_271m_adamw_pc().activation_checkpoint
    return config


# Real changes that the golden-loss comparison (test_train_runs.py) must reject: the PC degree, and the peak lr.
def debug_muon_pc_degree3():
    """``debug_muon_pc`` with the degree-3 PC polynomial instead of degree 5."""
    from torchtitan_ext.config_registry import debug_muon_pc

    config = debug_muon_pc()
    config.model_spec = llama2_model("debug", pc=PCConverter.Config(degree=3))
    return config


def debug_muon_pc_lr_x1_1():
    """``debug_muon_pc`` with its peak lr raised by 10% (the same for the Muon and the AdamW group)."""
    from torchtitan_ext.config_registry import debug_muon_pc

    config = debug_muon_pc()
    for group in config.optimizer.param_groups:
        group.optimizer_kwargs = {**group.optimizer_kwargs, "lr": group.optimizer_kwargs["lr"] * 1.1}
    return config


def qwen3_moe_tiny():
    """torchtitan's ``qwen3_moe_debug`` (Qwen3 MoE: 8 layers of 64 experts (768, 256), 2.7 min a step on 2 CPU
    ranks) cut to 2 layers of 8 experts (64, 256), top 2, its routing unchanged."""
    from torchtitan.models.common.rope import CosSinRoPE
    from torchtitan.models.qwen3 import _build_qwen3_moe_layers
    from torchtitan.models.qwen3.config_registry import qwen3_moe_debug

    config = qwen3_moe_debug()
    model = config.model_spec.model
    dim, head_dim = model.dim, 64
    model.layers = _build_qwen3_moe_layers(
        n_layers=2, dim=dim, n_heads=4, n_kv_heads=2, head_dim=head_dim, moe_hidden_dim=64, num_experts=8,
        top_k=2, attn_backend="flex", moe_comm_backend="standard",
        rope=CosSinRoPE.Config(dim=head_dim, max_seq_len=4096, theta=1000000.0),
    )  # fmt: skip
    return config


def qwen3_moe_tiny_muon_pc():
    """:func:`qwen3_moe_tiny` with pcopt's Muon and PC, for the CI's EP runs."""
    import torch

    from torchtitan_ext import for_cpu, with_muon, with_pc

    config = with_pc(with_muon(qwen3_moe_tiny()))
    return config if torch.cuda.is_available() else for_cpu(config)
