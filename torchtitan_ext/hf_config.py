"""What a Hugging Face class needs from a torchtitan model config: its ``config.json``, and weight fix-ups.

One builder per torchtitan model family, keyed by ``model_spec.name``:

===============  ==========================  ======================================================
family           Hugging Face class          torchtitan model
===============  ==========================  ======================================================
``llama2``       ``LlamaForCausalLM``        ``Llama3Model`` (the torchtitan_ext Llama-2 style configs)
``llama3``       ``LlamaForCausalLM``        ``Llama3Model``
``qwen3``        ``Qwen3ForCausalLM``        ``Qwen3Model``, dense layers
``qwen3``        ``Qwen3MoeForCausalLM``     ``Qwen3Model`` with MoE layers (softmax routing, no shared experts)
``deepseek_v3``  ``DeepseekV3ForCausalLM``   ``DeepSeekV3Model`` (MLA, MoE with shared experts)
===============  ==========================  ======================================================

Every field is read from the torchtitan config (dims, heads, RoPE and its scaling, norm eps, MoE routing),
never from the Hugging Face defaults. Where the Hugging Face class cannot express a torchtitan setting, the
builder raises ``ValueError`` (what was found, what the class supports, what to change) instead of writing a
model that computes a different function. The one setting that is bridged rather than refused is DeepSeek's
latent RMSNorm eps: ``DeepseekV3ForCausalLM`` hard-codes 1e-6 for ``kv_a_layernorm``/``q_a_layernorm``, while
torchtitan builds them with ``RMSNorm.Config``'s 1e-5. Because ``x / sqrt(mean(x^2) + eps)`` is scale
invariant up to eps, scaling the latent rows of ``wkv_a`` (``wq_a``) by ``c = sqrt(1e-6 / eps)`` makes the
Hugging Face norm compute exactly the torchtitan one (:func:`deepseek_v3_state_dict`); the exported
``kv_a_proj_with_mqa`` rows then differ from torchtitan's ``wkv_a`` by that factor. DeepSeek's MTP layers
are left out (with a warning): ``DeepseekV3ForCausalLM`` has no modules for them, and they do not change the
main model's logits.

The weights themselves go through the family's own torchtitan ``state_dict_adapter`` (see
:func:`torchtitan_ext.export.export`); the builders here also check that the adapter's assumptions hold
(e.g. the Llama adapter permutes q/k for interleaved ``ComplexRoPE``, the Qwen3 one expects ``CosSinRoPE``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchtitan.models.common.attention import GQAttention
from torchtitan.models.common.feed_forward import FeedForward
from torchtitan.models.common.linear import Linear
from torchtitan.models.common.nn_modules import RMSNorm
from torchtitan.models.common.rope import ComplexRoPE, CosSinRoPE

logger = logging.getLogger(__name__)

__all__ = ["FAMILIES", "Family", "family_of"]

# DeepseekV3Attention builds ``DeepseekV3RMSNorm(config.kv_lora_rank)`` / ``(config.q_lora_rank)`` with the
# class default eps, which no config field changes (transformers/models/deepseek_v3/modeling_deepseek_v3.py).
HF_DEEPSEEK_LATENT_NORM_EPS = 1e-6


def _fail(family: str, what: str, fix: str) -> ValueError:
    return ValueError(f"Cannot export this {family} model to Hugging Face: {what}. {fix}")


def _uniform(family: str, values: list, what: str):
    """The one value all layers share (the Hugging Face configs have one field per setting, not per layer)."""
    distinct = []
    for v in values:
        if v not in distinct:
            distinct.append(v)
    if len(distinct) != 1:
        raise _fail(
            family,
            f"the layers differ in {what} ({distinct[:4]}), but the Hugging Face config has one value for all "
            "layers",
            "Export a model whose layers share this setting.",
        )
    return distinct[0]


def _check_linears(family: str, m) -> None:
    """No Linear may carry a bias: none of torchtitan's adapters maps ``.bias`` keys (they would be dropped)."""
    with_bias = [fqn for fqn, cfg, *_ in m.traverse(Linear.Config) if cfg.bias]
    if with_bias:
        raise _fail(
            family,
            f"Linear layers with a bias: {with_bias[:6]}{' ...' if len(with_bias) > 6 else ''}",
            "torchtitan's state_dict adapters map weights only; build the model with bias=False.",
        )


def _norm_eps(family: str, cfg: RMSNorm.Config, where: str) -> float:
    if not isinstance(cfg, RMSNorm.Config):
        raise _fail(family, f"{where} is a {type(cfg).__qualname__}, not an RMSNorm", "Use RMSNorm.Config.")
    if not cfg.elementwise_affine:
        raise _fail(
            family,
            f"{where} has elementwise_affine=False (no weight), but the Hugging Face RMSNorm has one",
            "Use elementwise_affine=True.",
        )
    return cfg.eps


def _main_norm_eps(family: str, m) -> float:
    """The one ``rms_norm_eps`` of the Hugging Face config: attention_norm, ffn_norm and the final norm."""
    eps = [_norm_eps(family, layer.attention_norm, "attention_norm") for layer in m.layers]
    eps += [_norm_eps(family, layer.ffn_norm, "ffn_norm") for layer in m.layers]
    eps.append(_norm_eps(family, m.norm, "the final norm"))
    return _uniform(family, eps, "RMSNorm eps (attention_norm, ffn_norm, final norm)")


def _rope_parameters(
    family: str, rope, *, interleaved: bool | None, deepseek_mscale: float | None = None
) -> dict:
    """``rope_parameters`` of the Hugging Face config for a torchtitan ``RoPE.Config``.

    ``interleaved``: which torchtitan layout the family's adapter (and the Hugging Face class) expects:
    ``True`` ``ComplexRoPE`` (adjacent pairs), ``False`` ``CosSinRoPE`` (rotate-half), ``None`` either.

    torchtitan's RoPE is a pure rotation (its YaRN "mscale" is folded into DeepSeek's softmax scale, never
    into cos/sin), so YaRN is written with ``attention_factor=1.0``; for DeepSeek, ``mscale_all_dim`` carries
    the attention's mscale, from which ``DeepseekV3Attention`` derives the same softmax scale.
    """
    kind = {ComplexRoPE.Config: True, CosSinRoPE.Config: False}.get(type(rope))
    if kind is None or (interleaved is not None and kind != interleaved):
        want = {True: "ComplexRoPE", False: "CosSinRoPE", None: "ComplexRoPE or CosSinRoPE"}[interleaved]
        raise _fail(
            family,
            f"its RoPE is a {type(rope).__qualname__}, but the {family} export expects {want} (the layout "
            "torchtitan's state_dict adapter for this family converts to Hugging Face's)",
            f"Use {want}.Config.",
        )
    params: dict = {"rope_theta": float(rope.theta)}
    if rope.scaling == "none" or (rope.scaling == "yarn" and rope.rope_factor <= 1.0):
        # torchtitan applies YaRN only for rope_factor > 1 (and then no mscale either)
        return {"rope_type": "default", **params}
    if rope.scaling == "llama":
        return {
            "rope_type": "llama3",
            **params,
            "factor": float(rope.scaling_factor),
            "low_freq_factor": float(rope.low_freq_factor),
            "high_freq_factor": float(rope.high_freq_factor),
            "original_max_position_embeddings": rope.original_max_position_embeddings,
        }
    if rope.scaling == "yarn":
        if not rope.beta_fast or not rope.beta_slow:
            # Hugging Face reads ``beta_fast or 32`` / ``beta_slow or 1``: a zero would silently change
            raise _fail(
                family,
                f"YaRN beta_fast={rope.beta_fast}, beta_slow={rope.beta_slow}: Hugging Face replaces a zero by its "
                "default (32, 1)",
                "Use non-zero betas.",
            )
        yarn = {
            "rope_type": "yarn",
            **params,
            "factor": float(rope.rope_factor),
            "original_max_position_embeddings": rope.original_seq_len,
            "beta_fast": float(rope.beta_fast),
            "beta_slow": float(rope.beta_slow),
            "truncate": bool(rope.truncate),
            "attention_factor": 1.0,
        }
        if deepseek_mscale is not None:
            yarn["mscale_all_dim"] = float(deepseek_mscale)
        return yarn
    raise _fail(family, f"RoPE scaling {rope.scaling!r} is unknown", "Use 'none', 'llama' or 'yarn'.")


def _check_inner_attention(family: str, attn) -> None:
    """Causal attention over the whole sequence: sliding windows have no field in these Hugging Face configs."""
    window = getattr(attn.inner_attention, "window_size", (-1, 0))
    if tuple(window) != (-1, 0):
        raise _fail(
            family,
            f"its attention has window_size={window} (sliding window), but the export writes full causal attention",
            "Export a model with window_size=(-1, 0).",
        )


def _gqa(family: str, m, *, qk_norm: bool, moe: bool = False) -> tuple[dict, object]:
    """The fields shared by Llama and Qwen3 (``GQAttention`` + a ``FeedForward`` in every layer, or a MoE block
    where ``moe``), and the RoPE."""
    attns = [layer.attention for layer in m.layers]
    for a in attns:
        if not isinstance(a, GQAttention.Config):
            raise _fail(family, f"its attention is a {type(a).__qualname__}", "Use GQAttention.Config.")
        _check_inner_attention(family, a)
        if (a.qk_norm is not None) != qk_norm:
            raise _fail(
                family,
                f"its attention has qk_norm={'set' if a.qk_norm is not None else 'None'}, but the Hugging Face "
                f"class {'always has' if qk_norm else 'has no'} q/k RMSNorms",
                f"Export a model with qk_norm {'set' if qk_norm else 'None'}.",
            )
    for i, layer in enumerate(m.layers):
        if moe and getattr(layer, "moe", None) is not None:
            continue
        if getattr(layer, "moe", None) is not None or type(layer.feed_forward) is not FeedForward.Config:
            got = (
                "a MoE" if getattr(layer, "moe", None) is not None else type(layer.feed_forward).__qualname__
            )
            raise _fail(
                family,
                f"layer {i} has {got} instead of a dense SwiGLU FeedForward",
                "This export supports dense layers for this family.",
            )
    n_heads = _uniform(family, [a.n_heads for a in attns], "n_heads")
    n_kv = _uniform(family, [a.n_kv_heads or a.n_heads for a in attns], "n_kv_heads")
    head_dim = _uniform(family, [a.head_dim or m.dim // a.n_heads for a in attns], "head_dim")
    rope = _uniform(family, [a.rope for a in attns], "RoPE")
    if rope.dim != head_dim:
        raise _fail(
            family,
            f"RoPE dim {rope.dim} != head_dim {head_dim}",
            "torchtitan rotates the whole head; use rope.dim == head_dim.",
        )
    dense = [layer for layer in m.layers if getattr(layer, "moe", None) is None]
    return {
        "hidden_size": m.dim,
        "intermediate_size": _uniform(
            family, [layer.feed_forward.w1.out_features for layer in dense], "FFN hidden dim"
        )
        if dense
        else m.layers[0].moe.routed_experts.inner_experts.hidden_dim,  # unused: no dense layer
        "num_hidden_layers": len(m.layers),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": rope.max_seq_len,
        "vocab_size": m.vocab_size,
        "tie_word_embeddings": bool(m.enable_weight_tying),
        "attention_bias": False,
    }, rope


def llama_config(m, family: str = "llama3") -> dict:
    """``LlamaForCausalLM``: torchtitan's ``Llama3StateDictAdapter`` permutes q/k from ``ComplexRoPE``'s
    interleaved pairs to Hugging Face's rotate-half layout, so the RoPE must be a ``ComplexRoPE``."""
    fields, rope = _gqa(family, m, qk_norm=False)
    rope_parameters = _rope_parameters(family, rope, interleaved=True)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **fields,
        "rms_norm_eps": _main_norm_eps(family, m),
        "rope_theta": rope_parameters["rope_theta"],
        "rope_parameters": rope_parameters,
        "mlp_bias": False,
    }


def _qwen3_moe(family: str, m) -> dict:
    """The MoE fields of ``Qwen3MoeForCausalLM``: its router takes the softmax of the gate logits (fp32), the top
    ``num_experts_per_tok``, renormalised when ``norm_topk_prob`` -- torchtitan's ``TokenChoiceTopKRouter`` with
    ``score_func='softmax'``, no expert groups, ``route_scale`` 1, and no load-balance bias in the choice (checked
    on the weights: :func:`qwen3_state_dict`). Dense layers are ``mlp_only_layers``; there are no shared
    experts."""
    moe_layers = [i for i, layer in enumerate(m.layers) if getattr(layer, "moe", None) is not None]
    moes = [m.layers[i].moe for i in moe_layers]
    routers = [mo.router for mo in moes]
    checks = [
        (_uniform(family, [r.score_func for r in routers], "router score_func") != "softmax",
         "its router scores experts with sigmoid, but Qwen3MoeTopKRouter uses softmax", "score_func='softmax'"),
        (any(r.num_expert_groups is not None for r in routers),
         "its router limits experts to groups (node-limited routing), which Qwen3Moe has no field for",
         "num_expert_groups=None"),
        (_uniform(family, [r.route_scale for r in routers], "route_scale") != 1.0,
         "its router scales the expert weights (route_scale != 1), which Qwen3Moe cannot", "route_scale=1.0"),
        (any(r._debug_force_load_balance for r in routers),
         "_debug_force_load_balance routes round-robin, which Hugging Face cannot express",
         "debug.moe_force_load_balance off"),
        (any(r.gate.bias for r in routers), "the router gate has a bias; Qwen3MoeTopKRouter has none",
         "bias=False"),
        (any(mo.shared_experts is not None for mo in moes),
         "a MoE layer has shared experts, which Qwen3MoeSparseMoeBlock does not have", "shared_experts=None"),
    ]  # fmt: skip
    for bad, what, fix in checks:
        if bad:
            raise _fail(family, what, f"Train with {fix} to export as Qwen3MoeForCausalLM.")
    return {
        "num_experts": _uniform(family, [mo.num_experts for mo in moes], "num_experts"),
        "num_experts_per_tok": _uniform(family, [r.top_k for r in routers], "router top_k"),
        "moe_intermediate_size": _uniform(
            family, [mo.routed_experts.inner_experts.hidden_dim for mo in moes], "expert hidden dim"
        ),
        "norm_topk_prob": bool(_uniform(family, [r.route_norm for r in routers], "route_norm")),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(len(m.layers)) if i not in moe_layers],
        "router_aux_loss_coef": 0.0,
        "output_router_logits": False,
    }


def qwen3_state_dict(m, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Refuse a Qwen3-MoE model whose load-balance bias is set: torchtitan adds ``expert_bias_E`` to the scores
    for the choice of experts, ``Qwen3MoeForCausalLM`` has no such term, so it would route other tokens. A zero
    bias (load balancing off, or never updated) changes nothing and is left out."""
    bias_keys = [k for k in state_dict if k.endswith("moe.expert_bias_E")]
    biased = [k for k in bias_keys if bool((state_dict[k] != 0).any())]
    if biased:
        raise _fail(
            "qwen3",
            f"its MoE layers {biased[:3]} route with torchtitan's load-balance bias (expert_bias_E != 0), which "
            "Qwen3MoeForCausalLM's router does not have, so it would send tokens to other experts",
            "Train with load_balance_coeff=None to export this family's MoE, or export a DeepSeek-V3-style model "
            "(its router has the bias).",
        )
    if bias_keys:
        state_dict = {k: v for k, v in state_dict.items() if k not in bias_keys}
    return state_dict


def qwen3_config(m, family: str = "qwen3") -> dict:
    """``Qwen3ForCausalLM`` (dense) or ``Qwen3MoeForCausalLM`` (MoE layers, :func:`_qwen3_moe`): q/k RMSNorm
    over head_dim with the model's ``rms_norm_eps``, rotate-half RoPE (``CosSinRoPE``; the Qwen3 adapter does
    not permute), full attention in every layer."""
    moe = any(getattr(layer, "moe", None) is not None for layer in m.layers)
    fields, rope = _gqa(family, m, qk_norm=True, moe=moe)
    eps = _main_norm_eps(family, m)
    qk_eps = _uniform(
        family, [_norm_eps(family, layer.attention.qk_norm, "qk_norm") for layer in m.layers], "qk_norm eps"
    )
    if qk_eps != eps:
        raise _fail(
            family,
            f"q/k RMSNorm eps {qk_eps} differs from the other norms' {eps}, but Qwen3 uses rms_norm_eps for both",
            "Use one eps for all RMSNorms.",
        )
    rope_parameters = _rope_parameters(family, rope, interleaved=False)
    n = fields["num_hidden_layers"]
    return {
        "architectures": ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if moe else "qwen3",
        **fields,
        **(_qwen3_moe(family, m) if moe else {}),
        "rms_norm_eps": eps,
        "rope_parameters": rope_parameters,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": n,
        "layer_types": ["full_attention"] * n,
    }


def _deepseek_layers(family: str, m) -> tuple[int, list]:
    """``first_k_dense_replace`` and the MoE configs: Hugging Face's layers are k dense, then all MoE."""
    is_moe = [layer.moe is not None for layer in m.layers]
    k = is_moe.index(True) if any(is_moe) else len(is_moe)
    if not all(is_moe[k:]):
        raise _fail(
            family,
            f"its MoE layers are {[i for i, x in enumerate(is_moe) if x]}, but DeepseekV3 has dense layers "
            "0..first_k_dense_replace-1 and MoE layers after them",
            "Put all dense layers first.",
        )
    return k, [layer.moe for layer in m.layers[k:]]


def _deepseek_moe(family: str, moes: list) -> dict:
    """The routing fields: DeepseekV3TopkRouter scores with sigmoid, adds ``e_score_correction_bias`` (the
    torchtitan ``expert_bias_E``) for the choice only, keeps the best ``topk_group`` of ``n_group`` groups by
    the sum of each group's top-2 scores, then the top ``num_experts_per_tok``; optionally renormalises and
    scales by ``routed_scaling_factor`` -- torchtitan's ``TokenChoiceTopKRouter`` step for step."""
    routers = [mo.router for mo in moes]
    score_func = _uniform(family, [r.score_func for r in routers], "router score_func")
    if score_func != "sigmoid":
        raise _fail(
            family,
            f"its router scores experts with {score_func!r}, but DeepseekV3TopkRouter always uses sigmoid "
            "(transformers' DeepseekV2ForCausalLM routes with softmax, but this export writes DeepseekV3 only)",
            "Train with TokenChoiceTopKRouter.Config(score_func='sigmoid') (the DeepSeek-V3 setting) to export as "
            "DeepseekV3ForCausalLM.",
        )
    if any(r._debug_force_load_balance for r in routers):
        raise _fail(
            family,
            "_debug_force_load_balance routes round-robin, which Hugging Face cannot express",
            "Set debug.moe_force_load_balance off.",
        )
    if any(r.gate.bias for r in routers):
        raise _fail(family, "the router gate has a bias; DeepseekV3TopkRouter has none", "Use bias=False.")
    groups = _uniform(family, [(r.num_expert_groups, r.num_limited_groups) for r in routers], "expert groups")
    n_experts = _uniform(family, [mo.num_experts for mo in moes], "num_experts")
    if groups[0] is None:
        n_group, topk_group = 1, 1  # one group, always kept: plain top-k
    else:
        n_group, topk_group = groups
        if topk_group is None:
            raise _fail(family, "num_expert_groups is set without num_limited_groups", "Set both.")
    moe_hidden = _uniform(
        family, [mo.routed_experts.inner_experts.hidden_dim for mo in moes], "expert hidden dim"
    )
    if any(mo.shared_experts is None for mo in moes):
        raise _fail(
            family,
            "a MoE layer has no shared experts, but DeepseekV3MoE always adds them",
            "Export a model with shared_experts.",
        )
    shared_hidden = _uniform(
        family, [mo.shared_experts.w1.out_features for mo in moes], "shared expert hidden"
    )
    if type(moes[0].shared_experts) is not FeedForward.Config or shared_hidden % moe_hidden:
        raise _fail(
            family,
            f"shared experts of hidden dim {shared_hidden} ({type(moes[0].shared_experts).__qualname__}) are not "
            f"n_shared_experts x moe_intermediate_size ({moe_hidden}) SwiGLU experts",
            "Use a FeedForward with hidden_dim = n_shared * expert hidden dim.",
        )
    return {
        "n_routed_experts": n_experts,
        "num_experts_per_tok": _uniform(family, [r.top_k for r in routers], "router top_k"),
        "n_shared_experts": shared_hidden // moe_hidden,
        "moe_intermediate_size": moe_hidden,
        "routed_scaling_factor": float(_uniform(family, [r.route_scale for r in routers], "route_scale")),
        "norm_topk_prob": bool(_uniform(family, [r.route_norm for r in routers], "route_norm")),
        "n_group": n_group,
        "topk_group": topk_group,
        # not read by transformers' DeepseekV3 (which always routes this way), but by other readers of
        # DeepSeek-V3 configs (e.g. vLLM) to pick sigmoid scoring with the correction bias
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
    }


def deepseek_v3_config(m, family: str = "deepseek_v3") -> dict:
    """``DeepseekV3ForCausalLM``: MLA (``q_lora_rank`` 0 -> a plain ``q_proj``), YaRN with the softmax mscale,
    ``first_k_dense_replace`` dense layers, then MoE layers with shared experts (see :func:`_deepseek_moe`)."""
    from torchtitan.models.deepseek_v3.model import Attention

    attns = [layer.attention for layer in m.layers]
    for a in attns:
        if not isinstance(a, Attention.Config):
            raise _fail(family, f"its attention is a {type(a).__qualname__}", "Use the MLA Attention.Config.")
        _check_inner_attention(family, a)
    u = lambda f, what: _uniform(family, [f(a) for a in attns], what)  # noqa: E731
    q_lora_rank = u(lambda a: a.q_lora_rank, "q_lora_rank")
    qk_rope = u(lambda a: a.qk_rope_head_dim, "qk_rope_head_dim")
    rope = u(lambda a: a.rope, "RoPE")
    if rope.dim != qk_rope:
        raise _fail(
            family, f"RoPE dim {rope.dim} != qk_rope_head_dim {qk_rope}", "Use rope.dim == qk_rope_head_dim."
        )
    uses_yarn = rope.scaling == "yarn" and rope.rope_factor > 1.0
    mscale = u(lambda a: a.mscale, "attention mscale")
    rope_parameters = _rope_parameters(
        family, rope, interleaved=None, deepseek_mscale=mscale if uses_yarn else None
    )
    k, moes = _deepseek_layers(family, m)
    dense = [layer.feed_forward for layer in m.layers[:k]]
    for i, ff in enumerate(dense):
        if type(ff) is not FeedForward.Config:
            raise _fail(family, f"layer {i} has a {type(ff).__qualname__}", "Use a SwiGLU FeedForward.")
    if getattr(m, "mtp_layers", None):
        logger.warning(
            "The %d MTP layers are not exported: transformers' DeepseekV3ForCausalLM has no MTP modules. The "
            "exported model computes the main model's next-token logits, which the MTP layers do not change.",
            len(m.mtp_layers),
        )
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": m.dim,
        "num_hidden_layers": len(m.layers),
        "num_attention_heads": u(lambda a: a.n_heads, "n_heads"),
        "num_key_value_heads": u(lambda a: a.n_heads, "n_heads"),
        "q_lora_rank": q_lora_rank or None,
        "kv_lora_rank": u(lambda a: a.kv_lora_rank, "kv_lora_rank"),
        "qk_nope_head_dim": u(lambda a: a.qk_nope_head_dim, "qk_nope_head_dim"),
        "qk_rope_head_dim": qk_rope,
        "v_head_dim": u(lambda a: a.v_head_dim, "v_head_dim"),
        "rope_interleave": isinstance(rope, ComplexRoPE.Config),
        "rope_parameters": rope_parameters,
        "max_position_embeddings": rope.max_seq_len,
        "hidden_act": "silu",
        "rms_norm_eps": _main_norm_eps(family, m),
        "first_k_dense_replace": k,
        "vocab_size": m.vocab_size,
        "tie_word_embeddings": bool(m.enable_weight_tying),
        "attention_bias": False,
        "num_nextn_predict_layers": 0,
    }
    if dense:
        config["intermediate_size"] = _uniform(
            family, [ff.w1.out_features for ff in dense], "dense FFN hidden"
        )
    if moes:
        config.update(_deepseek_moe(family, moes))
    # the latent norms' eps is bridged by rescaling the latent rows (deepseek_v3_state_dict); it must be > 0
    latent_norms = [("kv_norm", lambda a: a.kv_norm)] + (
        [("q_norm", lambda a: a.q_norm)] if q_lora_rank else []
    )
    for where, get in latent_norms:
        eps = u(lambda a, get=get, where=where: _norm_eps(family, get(a), where), f"{where} eps")
        if not eps > 0:
            raise _fail(family, f"{where} eps is {eps}; the eps bridge needs eps > 0", "Use a positive eps.")
    return config


def _latent_scale(eps: float) -> float:
    """``c`` with ``RMSNorm_eps_hf(c x) == RMSNorm_eps(x)`` for all x: ``c^2 = eps_hf / eps``."""
    return math.sqrt(HF_DEEPSEEK_LATENT_NORM_EPS / eps)


def deepseek_v3_state_dict(m, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bridge the latent norms' eps (see the module docstring) and leave out the MTP layers.

    The latent ``kv`` (the first ``kv_lora_rank`` outputs of ``wkv_a``) and ``q`` latent (``wq_a``) feed
    only their RMSNorm, so scaling those rows by ``c`` changes nothing but the eps the norm sees. Scaled in
    float64 (one rounding, at the export dtype). The k_pe rows of ``wkv_a`` are left as they are.
    """
    out = {k: v for k, v in state_dict.items() if not k.startswith("mtp_layers.")}
    for i, layer in enumerate(m.layers):
        a = layer.attention
        rows = [("wkv_a", a.kv_lora_rank, a.kv_norm.eps)]
        if a.q_lora_rank:
            rows.append(("wq_a", a.q_lora_rank, a.q_norm.eps))
        for name, n_rows, eps in rows:
            c = _latent_scale(eps)
            if c == 1.0:
                continue
            key = f"layers.{i}.attention.{name}.weight"
            w = out[key].detach().to(torch.float64, copy=True)
            w[:n_rows] *= c
            out[key] = w
    return out


@dataclass(frozen=True)
class Family:
    """A torchtitan model family's Hugging Face export: config builder and torchtitan-side weight fix-up."""

    name: str
    hf_class: str
    config: Callable[[object, str], dict]
    adjust_state_dict: Callable[[object, dict], dict] = lambda m, sd: sd

    def hf_config(self, model_config) -> dict:
        """The architecture part of ``config.json`` (no token ids, no dtype)."""
        _check_linears(self.name, model_config)
        return self.config(model_config, self.name)


FAMILIES: dict[str, Family] = {
    "llama2": Family("llama2", "LlamaForCausalLM", llama_config),
    "llama3": Family("llama3", "LlamaForCausalLM", llama_config),
    "qwen3": Family(
        "qwen3", "Qwen3ForCausalLM", qwen3_config, qwen3_state_dict
    ),  # Qwen3MoeForCausalLM with MoE
    "deepseek_v3": Family("deepseek_v3", "DeepseekV3ForCausalLM", deepseek_v3_config, deepseek_v3_state_dict),
}


def family_of(trainer_config) -> Family:
    """The export recipe of ``trainer_config.model_spec.name``; ``ValueError`` naming the supported ones."""
    name = trainer_config.model_spec.name
    family = FAMILIES.get(name)
    if family is None:
        supported = ", ".join(f"{k} -> {f.hf_class}" for k, f in FAMILIES.items())
        raise ValueError(
            f"Hugging Face export supports the model families {supported}; this config's model_spec.name is "
            f"{name!r}. Export a config of a supported family (or add a builder to torchtitan_ext.hf_config)."
        )
    return family
