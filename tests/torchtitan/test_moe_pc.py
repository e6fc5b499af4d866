"""PC on torchtitan's MoE routed experts leaves routing and load balancing alone (one process, CPU, float64).

A model with PC on its expert stacks and the plain model holding the PC model's merged weights compute the same
function; so the router must see the same scores, send the same tokens to the same experts (the counts that
torchtitan's auxiliary-loss-free load balancing turns into its expert-bias update) and get the same gradient.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.torchtitan]

pytest.importorskip("torchtitan")

from torchtitan.models.common.moe import GroupedExperts, MoE  # noqa: E402

import pcopt  # noqa: E402
from tests.torchtitan.test_export_families import _float64_grouped_experts  # noqa: E402
from torchtitan_ext.cpu_attention import DENSE_ATTENTION_OVERRIDE  # noqa: E402
from torchtitan_ext.export import build_model  # noqa: E402
from torchtitan_ext.pc import DEFAULT_TARGETS, PCConverter, PCGroupedExperts  # noqa: E402


def _config(pc: bool):
    from torchtitan.models.deepseek_v3.config_registry import deepseek_v3_debugmodel

    tc = deepseek_v3_debugmodel()
    m = tc.model_spec.model
    m.layers = m.layers[:2]  # a dense layer 0 and a MoE layer 1
    if pc:
        tc.model_spec.model = PCConverter.Config(degree=5, targets=DEFAULT_TARGETS).build().convert(m)
    tc.override.imports.append(DENSE_ATTENTION_OVERRIDE)
    return tc


def _step(model, tokens):
    positions = torch.arange(tokens.shape[1]).expand(*tokens.shape)
    out = model(tokens, attention_masks=model.get_attention_masks(positions=positions), positions=positions)
    out.float().logsumexp(-1).mean().backward()  # any scalar of the logits: the router gets a gradient
    return out.detach()


def test_router_gradient_and_load_balance_counts_are_those_of_the_merged_plain_model(monkeypatch):
    monkeypatch.setattr(GroupedExperts, "forward", _float64_grouped_experts)  # float64 experts, same math
    torch.manual_seed(0)
    pc_model = build_model(_config(pc=True), dtype=torch.float64)
    assert sum(isinstance(m, PCGroupedExperts) for m in pc_model.modules()) == 1
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # per-expert gamma in [0.5, 1.5] and refreshed u, v: W_eff far from W
        for _, pc in pcopt.preconditioners(pc_model):
            pc.gamma.copy_(0.5 + torch.rand(pc.gamma.shape, generator=g, dtype=torch.float64))
        for _ in range(3):
            pcopt.refresh(pc_model)
    plain = build_model(_config(pc=False), dtype=torch.float64)
    plain.load_state_dict(pcopt.merged_state_dict(pc_model))
    stack = pc_model.layers["1"].moe.routed_experts.inner_experts
    assert (stack.w1_EFD - stack.parametrizations.w1_EFD.original).abs().max() > 1e-3  # PC changes the stack

    tokens = torch.randint(0, 2048, (2, 32), generator=g)
    outs = [_step(m.train(), tokens) for m in (pc_model, plain)]  # training: the counts accumulate
    # the same float64 ops on the same values on both sides (PolynomialPC.map gives the per-forward stack and
    # merged_state_dict's), so only BLAS reassociation could differ: u64 = 1.1e-16 x reductions of <= 2048 terms x
    # |logits| <= ~5 is <= 1e-12 on any SIMD width; measured: bitwise equal (AVX2), logits up to 4.4
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-10)
    moes = [next(m for m in model.modules() if isinstance(m, MoE)) for model in (pc_model, plain)]
    # load balancing: the bias update is a function of these counts alone (torchtitan's optimizer pre-hook)
    assert torch.equal(moes[0].tokens_per_expert_E, moes[1].tokens_per_expert_E)
    assert int(moes[0].tokens_per_expert_E.sum()) == tokens.numel() * moes[0].router.top_k
    assert torch.equal(moes[0].expert_bias_E, moes[1].expert_bias_E)
    gate = [moe.router.gate.weight.grad for moe in moes]
    assert gate[0] is not None and gate[0].abs().max() > 0
    # relative to the gradient's scale, by the same argument (measured: bitwise equal)
    torch.testing.assert_close(gate[0], gate[1], rtol=0, atol=1e-10 * float(gate[1].abs().max()))
