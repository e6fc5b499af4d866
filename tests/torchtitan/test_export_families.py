"""Hugging Face export of torchtitan's own model families, against torchtitan's forward (one process, CPU).

For each family -- torchtitan's ``llama3``, ``qwen3``, Qwen3-MoE (``qwen3_moe_debug``, 8 experts) and
``deepseek_v3`` debug models and torchtitan_ext's Llama-2 style ``debug_muon_pc`` -- shrunk to 2 layers
(DeepSeek: one dense, one MoE layer) with the PC layer on the attention output, the FFN, DeepSeek's shared experts
and the MoE routed experts (per expert):

1. the PC state is made non-trivial (gamma drawn in [0.5, 1.5], three power-iteration refreshes; DeepSeek's
   load-balance bias drawn too), and torchtitan's logits are computed in float64;
2. the model state is saved as a DCP checkpoint and exported by ``torchtitan_ext.export.export`` (float64);
3. ``transformers.AutoModelForCausalLM`` loads the folder; its logits must equal torchtitan's within a
   tolerance derived below, its MoE routing must be torchtitan's, every layer must hold the fixed number
   of tensors, and every PC matrix must be exported as ``pcopt.effective_weight`` of its module.

Configs that the Hugging Face classes cannot express are refused with a ``ValueError``
(:func:`test_export_refuses`), as is a family without an export.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.torchtitan]

pytest.importorskip("torchtitan")
transformers = pytest.importorskip("transformers")

import torch.distributed.checkpoint as dcp  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torchtitan.models.common.feed_forward import FeedForward  # noqa: E402
from torchtitan.models.common.moe import GroupedExperts, TokenChoiceTopKRouter  # noqa: E402

import pcopt  # noqa: E402
from torchtitan_ext.cpu_attention import DENSE_ATTENTION_OVERRIDE  # noqa: E402
from torchtitan_ext.export import build_model, export, hf_config  # noqa: E402
from torchtitan_ext.pc import PCConverter  # noqa: E402

# The paper's PC targets, DeepSeek's shared experts and its routed experts (3-D stacks, state per expert).
TARGETS = r"(^|\.)(attention\.wo|feed_forward\.w[123]|shared_experts\.w[123]|routed_experts\.inner_experts)$"
N_LAYERS = 2
BATCH, SEQ = 2, 64
U32 = 2.0**-24  # fp32 unit roundoff

# torchtitan module (relative to layers.<i>.) -> Hugging Face tensor (relative to model.layers.<i>.)
HF_NAME = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "moe.shared_experts.w1": "mlp.shared_experts.gate_proj",
    "moe.shared_experts.w3": "mlp.shared_experts.up_proj",
    "moe.shared_experts.w2": "mlp.shared_experts.down_proj",
    "moe.routed_experts.inner_experts.w1_EFD": "mlp.experts.{}.gate_proj",
    "moe.routed_experts.inner_experts.w3_EFD": "mlp.experts.{}.up_proj",
    "moe.routed_experts.inner_experts.w2_EDF": "mlp.experts.{}.down_proj",
}


def _llama2():
    from torchtitan_ext.config_registry import debug_muon_pc

    return debug_muon_pc()  # has the PC layer (degree 5) and, without a GPU, the dense-mask attention


def _llama3():
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    return llama3_debugmodel()


def _qwen3():
    from torchtitan.models.qwen3.config_registry import qwen3_debugmodel

    return qwen3_debugmodel()


def _deepseek_v3():
    from torchtitan.models.deepseek_v3.config_registry import deepseek_v3_debugmodel

    tc = deepseek_v3_debugmodel()
    # The debug model routes with softmax, which DeepseekV3TopkRouter cannot express (export refuses it:
    # test_export_refuses). Route as DeepSeek-V3 does -- sigmoid -- and set every other routing field away
    # from its neutral value, so the export of each is checked: node-limited routing (4 groups of 2 experts,
    # the best 2 groups kept), renormalised top-3, route_scale 2.5, and a load-balance bias (drawn below).
    for layer in tc.model_spec.model.layers:
        if layer.moe is not None:
            r = layer.moe.router
            r.score_func, r.num_expert_groups, r.num_limited_groups = "sigmoid", 4, 2
            r.route_norm, r.route_scale = True, 2.5
    return tc


def _qwen3_moe_export():
    from tests.torchtitan.tt_configs import qwen3_moe_tiny

    # qwen3_moe_debug's routing (softmax, renormalised top k, no shared experts) on 8 experts (64, 256), top 2
    return qwen3_moe_tiny()


# family -> (stock trainer config, tensors per dense layer, per MoE layer, non-layer tensors,
#            fp32 rounding sites per layer / per MoE layer on a token's path; see _tolerance)
FAMILIES = {
    "llama2": (_llama2, 9, None, 3, 3, 0),
    "llama3": (_llama3, 9, None, 3, 3, 0),
    "qwen3": (_qwen3, 11, None, 2, 4, 0),  # tied embedding: no lm_head.weight
    # dense: q, kv_a, kv_a_norm, kv_b, o, gate, up, down, 2 norms; MoE: 5 attention + 2 norms + router gate and
    # bias + 3 shared + 3 per routed expert (8)
    "deepseek_v3": (_deepseek_v3, 10, 12 + 3 * 8, 3, 4, 2),
    # MoE: q, k, v, o, q_norm, k_norm, 2 norms, router gate, 3 per routed expert (8); HF's router softmax is fp32
    # and torchtitan combines the experts' outputs in fp32: 2 islands per MoE layer, as DeepSeek's
    "qwen3_moe": (_qwen3_moe_export, 11, 9 + 3 * 8, 3, 4, 2),
}


def _trainer_config(family: str):
    make = FAMILIES[family][0]
    tc = make()
    m = tc.model_spec.model
    m.layers = m.layers[:N_LAYERS]  # CPU-sized; DeepSeek keeps its dense layer 0 and MoE layer 1
    if family != "llama2":  # the stock torchtitan configs get the PC layer here (routed experts per expert)
        tc.model_spec.model = PCConverter.Config(degree=5, targets=TARGETS).build().convert(m)
    if DENSE_ATTENTION_OVERRIDE not in tc.override.imports:  # every debug model uses FlexAttention
        tc.override.imports.append(DENSE_ATTENTION_OVERRIDE)
    return tc


def _float64_grouped_experts(self, x_RD, num_tokens_per_expert_E):
    """``GroupedExperts.forward`` in the input's dtype: the stock one runs its grouped GEMMs in bf16 whatever
    the model dtype (``x.bfloat16()``, ``w.bfloat16()``), which would bury the export check under bf16 rounding
    (it differs from the float64 Hugging Face model by ~1.5e-4 here). Same math: w2 (silu(w1 x) * w3 x) per
    expert, on the expert-sorted rows the dispatcher hands over."""
    out, start = [], 0
    for e, n in enumerate(num_tokens_per_expert_E.tolist()):
        x = x_RD[start : start + n]
        start += n
        out.append((F.silu(x @ self.w1_EFD[e].T) * (x @ self.w3_EFD[e].T)) @ self.w2_EDF[e].T)
    return torch.cat(out)


def _routing_margin(router, inputs, outputs, record):
    """Record torchtitan's expert choice and how far each token is from a tie (group and expert choice)."""
    x, bias = inputs
    topk_scores, ids, scores = outputs
    choice = scores if bias is None else scores + bias
    margins = []
    if router.num_expert_groups is not None:
        grouped = choice.unflatten(-1, (router.num_expert_groups, -1))
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # a group's score: its best two experts
        ranked_groups = group_scores.sort(-1, descending=True).values
        g = router.num_limited_groups
        margins.append(ranked_groups[..., g - 1] - ranked_groups[..., g])
        kept = group_scores >= ranked_groups[..., g - 1 : g]
        choice = grouped.masked_fill(~kept.unsqueeze(-1), float("-inf")).flatten(-2)
    ranked = choice.sort(-1, descending=True).values
    margins.append(ranked[..., router.top_k - 1] - ranked[..., router.top_k])
    record.append((ids.reshape(-1, router.top_k).sort(-1).values, min(float(m.min()) for m in margins)))


def _tolerance(family: str, n_moe_layers: int, max_abs_logit: float) -> float:
    """Bound on |torchtitan - Hugging Face| logits for an exact export.

    Both models are float64 and compute the same function, so float64 rounding (u64 = 1.1e-16, summed over
    a few hundred terms per dot product: ~1e-13) is negligible. What is not float64 is a fixed set of fp32
    islands, each on one side only (or, for RoPE, in different order on the two sides):

    * Hugging Face's RMSNorms upcast to fp32 whatever the model dtype (LlamaRMSNorm, Qwen3RMSNorm and
      DeepseekV3RMSNorm: ``hidden_states.to(torch.float32)``): one rounding of the input, the mean of d
      squares, rsqrt, the product. PyTorch's CPU sum is a cascade (pairwise) sum whose error is
      ~log2(d) u32 whatever the SIMD width (AVX2/AVX-512 reorder, but do not lengthen, the cascade), so a
      normalised vector is off by <= 8 u32 relative (d <= 512 here: (9 / 2 + 3) u32).
    * RoPE: torchtitan rotates in fp32 (``query.float()`` times a complex64 / fp32 table), Hugging Face
      multiplies float64 q, k by fp32 cos/sin. Both round the angle the same way (one fp32 product of the
      position and the same fp32 inverse frequency), so what differs is <= 3 roundings plus the table's
      cos/sin (<= 1 ulp each): <= 8 u32.
    * Qwen3's q/k norms (fp32 on the Hugging Face side): as an RMSNorm.
    * DeepSeek MoE layers: Hugging Face's router runs in fp32 (its gate weight is kept fp32); torchtitan
      scales expert outputs in fp32 (``LocalTokenDispatcher.combine``): two more islands of <= 8 u32.

    (Attention itself is float64 on both sides: SDPA, pinned below; Hugging Face's eager attention would add
    an fp32 softmax.) Each island perturbs one activation by a relative <= 8 u32; to first order the
    perturbations of the n islands on a token's path add linearly (worst case: all aligned), and the
    random-init pre-norm blocks pass them on with a gain of about 1, so |delta logits| <= 8 u32 * n *
    max|logits|, n = sites per layer * layers + 1 (final norm) + 2 per MoE layer. None of it depends on the
    CPU beyond the summation order the bound already allows for. Measured on an AVX-512 Xeon: 2.4e-7 to
    5e-7, 1/25 to 1/55 of the bound; the smallest export bugs tried are 2.4x to 6x above it (DeepSeek without
    the latent-eps bridge: 5.9e-5, checked below; llama3 without its RoPE scaling: 9.5e-5 at 64 positions).
    """
    per_layer, per_moe = FAMILIES[family][4], FAMILIES[family][5]
    n_sites = per_layer * N_LAYERS + 1 + per_moe * n_moe_layers
    return 8 * U32 * n_sites * max(1.0, max_abs_logit)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_matches_torchtitan_logits(family, tmp_path, monkeypatch):
    monkeypatch.setattr(GroupedExperts, "forward", _float64_grouped_experts)
    tc = _trainer_config(family)
    torch.manual_seed(0)
    model = build_model(tc, dtype=torch.float64)

    # Non-trivial PC state: gamma in [0.5, 1.5], u and v refreshed further (W_eff != W even at gamma 1).
    g = torch.Generator().manual_seed(1)
    pcs = pcopt.preconditioners(model)
    n_moe = sum(isinstance(m, GroupedExperts) for m in model.modules())
    # wo and w1, w2, w3 (dense FFN or shared experts) per layer, and the 3 routed stacks of each MoE layer
    n_ffn = sum(isinstance(m, FeedForward) for m in model.modules())  # dense or shared experts: w1, w2, w3
    assert len(pcs) == N_LAYERS + 3 * n_ffn + 3 * n_moe
    assert n_moe == {"deepseek_v3": 1, "qwen3_moe": N_LAYERS}.get(family, 0)
    with torch.no_grad():
        for _, pc in pcs:
            pc.gamma.copy_(0.5 + torch.rand(pc.gamma.shape, generator=g, dtype=torch.float64))
        for _ in range(3):
            pcopt.refresh(model)
        for name, buf in model.named_buffers():
            if name.endswith("moe.expert_bias_E") and family == "deepseek_v3":  # Qwen3-MoE routes without one
                # fp32 values: Hugging Face keeps e_score_correction_bias in fp32 (_keep_in_fp32_modules_strict)
                buf.copy_((0.1 * torch.rand(buf.shape, generator=g) - 0.05).float())

    tokens = torch.randint(0, tc.model_spec.model.vocab_size, (BATCH, SEQ), generator=g)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    tt_routing, hf_routing = [], []
    routers = [m for m in model.modules() if isinstance(m, TokenChoiceTopKRouter)]
    hooks = [r.register_forward_hook(lambda r, i, o: _routing_margin(r, i, o, tt_routing)) for r in routers]
    with torch.no_grad():
        ref = model(
            tokens, attention_masks=model.get_attention_masks(positions=positions), positions=positions
        )
    for h in hooks:
        h.remove()
    assert ref.dtype == torch.float64

    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "ckpt"))
    out = export(tc, tmp_path / "ckpt", tmp_path / "hf", dtype=torch.float64)

    # HF's grouped_mm experts kernel has no float64 on the CPU; its eager loop computes the same experts.
    kwargs = {"experts_implementation": "eager"} if family in ("deepseek_v3", "qwen3_moe") else {}
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float64, attn_implementation="sdpa", **kwargs
    ).eval()
    assert type(hf).__name__ == json.loads((out / "config.json").read_text())["architectures"][0]
    hf_routers = [m for n, m in hf.named_modules() if n.endswith("mlp.gate")]
    hooks = [
        r.register_forward_hook(lambda r, i, o: hf_routing.append(o[2].sort(-1).values)) for r in hf_routers
    ]
    with torch.no_grad():
        got = hf(tokens).logits
    for h in hooks:
        h.remove()

    # MoE routing: the same experts for every token, and no token within 1e-6 of a tie (the routers' scores
    # differ by ~1e-8 between the two sides, fp32 gate on HF's), so the choice is the same on any CPU.
    assert len(tt_routing) == len(hf_routing) == len(routers)
    for (ids, margin), hf_ids in zip(tt_routing, hf_routing):
        assert torch.equal(ids, hf_ids)
        assert margin > 1e-6, f"a token is within {margin:.1e} of a routing tie; pick another seed"

    tol = _tolerance(family, len(routers), ref.abs().max().item())
    diff = (ref - got).abs().max().item()
    assert ref.shape == got.shape
    assert diff <= tol, (family, diff, tol)

    # The tolerance is tight enough to catch the smallest export bug seen: writing wkv_a unscaled, i.e. without
    # the latent-eps bridge. HF's norm then sees kv, not c kv, at eps 1e-6 -- the same as c kv at eps
    # 1e-6 c^2 = 1e-7 (c^2 = 1e-6 / 1e-5), which is set here instead of exporting again.
    if family == "deepseek_v3":
        for layer in hf.model.layers:
            layer.self_attn.kv_a_layernorm.variance_epsilon = 1e-7
        with torch.no_grad():
            off = (ref - hf(tokens).logits).abs().max().item()
        assert off > 2 * tol, (off, tol)

    # Tensors: a fixed number per layer; every PC matrix exported as its effective weight.
    tensors = load_file(str(out / "model.safetensors"))
    per_layer: dict[int, int] = {}
    for key in tensors:
        if (m := re.match(r"model\.layers\.(\d+)\.", key)) is not None:
            per_layer[int(m[1])] = per_layer.get(int(m[1]), 0) + 1
    n_dense, n_moe, n_other = FAMILIES[family][1:4]
    expected = {i: n_moe if i >= N_LAYERS - len(routers) else n_dense for i in range(N_LAYERS)}
    assert per_layer == expected
    assert len(tensors) - sum(per_layer.values()) == n_other
    assert not any("parametrizations" in k for k in tensors)
    for fqn, _ in pcs:
        layer, module, name = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|w[123]_E[DF]{2})", fqn).groups()
        effective = pcopt.effective_weight(model.get_submodule(f"layers.{layer}.{module}"), name)
        hf_name = HF_NAME[module if name == "weight" else f"{module}.{name}"]
        # an expert stack: each expert's matrix of the merged stack (its own gamma, u, v), one HF tensor each
        per_expert = effective.unbind(0) if effective.ndim == 3 else [effective]
        for e, matrix in enumerate(per_expert):
            exported = tensors[f"model.layers.{layer}.{hf_name.format(e)}.weight"]
            # the same float64 computation on the same (DCP round-tripped, float64) values; another BLAS may sum
            # in another order: <= k u64 sum|a||b| with k <= 1024 and O(1) terms, ~1e-13
            torch.testing.assert_close(exported, matrix, rtol=0, atol=1e-12)


def _named(family: str, name: str):
    tc = _trainer_config(family)
    tc.model_spec = dataclasses.replace(tc.model_spec, name=name)
    return tc


def _softmax_router():
    from torchtitan.models.deepseek_v3.config_registry import deepseek_v3_debugmodel

    return deepseek_v3_debugmodel()  # the stock debug model: softmax routing


def _qwen3_moe_sigmoid():
    tc = _trainer_config("qwen3_moe")
    for layer in tc.model_spec.model.layers:
        layer.moe.router.score_func = "sigmoid"
    return tc


def _biased_attention():
    tc = _trainer_config("llama3")
    tc.model_spec.model.layers[0].attention.wo.bias = True
    return tc


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: _named("llama3", "not_a_family"),
            r"supports the model families llama2 -> LlamaForCausalLM, llama3 -> LlamaForCausalLM, "
            r"qwen3 -> Qwen3ForCausalLM, deepseek_v3 -> DeepseekV3ForCausalLM; .*'not_a_family'",
        ),
        (_softmax_router, r"router scores experts with 'softmax'.*always uses sigmoid.*score_func='sigmoid'"),
        (
            _qwen3_moe_sigmoid,
            r"qwen3 model to Hugging Face: its router scores experts with sigmoid, but Qwen3MoeTopKRouter uses "
            r"softmax\. Train with score_func='softmax'",
        ),
        (_biased_attention, r"Linear layers with a bias: \['layers\.0\.attention\.wo'\]"),
    ],
    ids=["unknown-family", "softmax-router", "qwen3-moe-sigmoid", "bias"],
)
def test_export_refuses(make, match, tmp_path):
    tc = make()
    with pytest.raises(ValueError, match=match):
        hf_config(tc, torch.float32, None, None)
    # export refuses before it looks for the checkpoint (there is none)
    with pytest.raises(ValueError, match=match):
        export(tc, tmp_path / "no-checkpoint", tmp_path / "out")


def test_qwen3_moe_export_refuses_a_load_balance_bias():
    """torchtitan routes with ``scores + expert_bias_E``; Qwen3MoeForCausalLM has no such term."""
    from torchtitan_ext.hf_config import qwen3_state_dict

    w = torch.ones(2, 2)
    zero = {"layers.0.moe.expert_bias_E": torch.zeros(4), "layers.0.attention.wo.weight": w}
    assert qwen3_state_dict(None, zero) == {"layers.0.attention.wo.weight": w}  # no bias: nothing to write
    with pytest.raises(ValueError, match=r"expert_bias_E != 0.*load_balance_coeff=None"):
        qwen3_state_dict(None, {"layers.0.moe.expert_bias_E": torch.tensor([0.0, 1e-3, 0.0, 0.0])})
