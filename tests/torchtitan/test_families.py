"""PC and Muon on torchtitan's own model families: the transform, the recipes by name, and no silent no-op.

In-process tests read the transformed configs (and models built on the meta device or the CPU); the runs at the
end train ``llama3_debugmodel``, ``qwen3_debugmodel``, ``deepseek_v3_debugmodel`` (FSDP2, DeepSeek's routed experts
sharded on their expert dim, and under expert parallelism 2) and a 2-layer cut of ``qwen3_moe_debug`` under expert
parallelism 2, with PC (routed experts too) + Muon on 2 gloo ranks, check that PC is active and that a resume is
bit-exact; the stock ``qwen3_moe_debug`` trains 2 steps under expert parallelism 2.
"""

from __future__ import annotations

import re
import shutil

import pytest
import torch

import pcopt
from tests.torchtitan._harness import torchrun

pytestmark = pytest.mark.torchtitan

FAMILIES = {  # stock debug config -> family
    "llama3_debugmodel": "llama3",
    "qwen3_debugmodel": "qwen3",
    "deepseek_v3_debugmodel": "deepseek_v3",
}


def _stock(name: str):
    from torchtitan_ext.transform import stock_config

    return stock_config(name)[1]


def _pc_fqns(config) -> list[str]:
    from torchtitan.models.common.linear import Linear

    from torchtitan_ext.pc import PCLinear

    return [
        f for f, c, *_ in config.model_spec.model.traverse(Linear.Config) if isinstance(c, PCLinear.Config)
    ]


def _pc_stacks(config) -> list[str]:
    from torchtitan.models.common.moe import GroupedExperts

    from torchtitan_ext.pc import PCGroupedExperts

    stacks = config.model_spec.model.traverse(GroupedExperts.Config)
    return [f for f, c, *_ in stacks if isinstance(c, PCGroupedExperts.Config)]


def _linears(config) -> list[str]:
    from torchtitan.models.common.linear import Linear

    return [f for f, *_ in config.model_spec.model.traverse(Linear.Config)]


# -- the targets: the paper's rule on each family --------------------------------------------------------------------
_PC_MODULES = re.compile(r"(attention\.wo|feed_forward\.w[123]|moe\.shared_experts\.w[123])$")
_NEVER = re.compile(r"(wq|wk|wv|wqkv|wkv_a|wkv_b|wq_a|wq_b|router\.gate|lm_head|output)$")


@pytest.mark.parametrize("stock", sorted(FAMILIES))
def test_with_pc_targets_attention_output_and_every_ffn_matrix(stock):
    from torchtitan_ext import with_pc

    config = _stock(stock)
    pc = with_pc(config)
    got = _pc_fqns(pc)
    # an independent rule over the model's Linear FQNs: attention output, dense FFN, shared-expert FFN
    expected = [f for f in _linears(config) if _PC_MODULES.search(f)]
    assert got == expected and got
    assert not [f for f in got if _NEVER.search(f)]
    assert not _pc_fqns(config), "with_pc modified its input"
    if stock == "deepseek_v3_debugmodel":  # layer 0 is dense, the others MoE with shared experts
        assert "layers.0.feed_forward.w1" in got and "layers.1.moe.shared_experts.w2" in got
    n_layers = len(config.model_spec.model.layers)
    assert len([f for f in got if f.endswith("attention.wo")]) == n_layers
    # the routed experts of every MoE layer, per expert (independent rule: a layer with a MoE block)
    moe_layers = [i for i, layer in enumerate(config.model_spec.model.layers) if getattr(layer, "moe", None)]
    assert _pc_stacks(pc) == [f"layers.{i}.moe.routed_experts.inner_experts" for i in moe_layers]
    assert bool(moe_layers) == (stock == "deepseek_v3_debugmodel")


@pytest.mark.parametrize("stock", sorted(FAMILIES))
def test_with_pc_wraps_the_familys_own_hooks(stock):
    from torchtitan_ext import with_pc
    from torchtitan_ext.checkpoint import PCCheckpointManager
    from torchtitan_ext.metrics import PCMetricsProcessor
    from torchtitan_ext.optimizer import PCOptimizersContainer
    from torchtitan_ext.trainer import PCTrainer

    config = _stock(stock)
    spec = config.model_spec
    pc = with_pc(config)
    assert pc.model_spec.parallelize_fn._pc_inner is spec.parallelize_fn  # the family's own plan runs inside
    if spec.post_optimizer_build_fn is not None:  # qwen3/deepseek: the MoE load-balancing hook still runs
        assert pc.model_spec.post_optimizer_build_fn._pc_inner is spec.post_optimizer_build_fn
    assert issubclass(pc.model_spec.state_dict_adapter, spec.state_dict_adapter)
    assert isinstance(pc, PCTrainer.Config)
    assert isinstance(pc.checkpoint, PCCheckpointManager.Config)
    assert isinstance(pc.metrics, PCMetricsProcessor.Config)
    assert isinstance(pc.optimizer, PCOptimizersContainer.Config)
    assert pc.training == config.training and pc.lr_scheduler == config.lr_scheduler


def test_with_pc_degree_follows_the_optimizer():
    from torchtitan_ext import with_muon, with_pc
    from torchtitan_ext.pc import PCLinear

    def degrees(cfg):
        return {c.degree for _, c, *_ in cfg.model_spec.model.traverse(PCLinear.Config)}

    assert degrees(with_pc(_stock("llama3_debugmodel"))) == {9}  # AdamW: the paper's 9
    assert degrees(with_pc(with_muon(_stock("llama3_debugmodel")))) == {5}  # Muon: 5
    assert degrees(with_pc(_stock("llama3_debugmodel"), degree=3)) == {3}


def test_targets_matching_nothing_list_the_models_linears_and_expert_stacks():
    from torchtitan_ext import with_pc

    with pytest.raises(
        ValueError,
        match=r"PC targets 'no_such' matched no Linear layer or expert stack of the model\. Its \d+ Linear layers "
        r"and expert stacks: .*layers\.\*\.attention\.wkv_a.*layers\.\*\.moe\.router\.gate.*"
        r"layers\.\*\.moe\.routed_experts\.inner_experts",
    ):
        with_pc(_stock("deepseek_v3_debugmodel"), targets="no_such")


def test_with_pc_twice_and_unknown_strategy_are_refused():
    from torchtitan_ext import with_pc

    once = with_pc(_stock("qwen3_debugmodel"))
    with pytest.raises(ValueError, match=r"already has the PC layer; apply with_pc once"):
        with_pc(once)
    with pytest.raises(ValueError, match=r"PC strategy must be one of .*got 'fast'"):
        with_pc(_stock("qwen3_debugmodel"), strategy="fast")


def test_overrides_that_fuse_w1_and_w3_are_dropped_for_pc_and_muon():
    from torchtitan_ext import with_muon, with_pc

    config = _stock("deepseek_v3_16b_minimal_async_ep")
    assert any("fused_swiglu" in o for o in config.override.imports)  # this stock config fuses them
    for transformed in (with_pc(config), with_muon(config)):
        assert not any("fused_swiglu" in o for o in transformed.override.imports)
    assert any("fused_swiglu" in o for o in config.override.imports)  # the input is unchanged


# -- Muon's groups ----------------------------------------------------------------------------------------------------
def _assignment(config) -> dict[str, tuple[str, dict]]:
    """Parameter FQN -> (optimizer, kwargs) by torchtitan's rule (first pattern that matches), on the meta model."""
    from torchtitan_ext.transform import _meta_parameters

    out = {}
    for name in _meta_parameters(config.model_spec.model):
        for g in config.optimizer.param_groups:
            if re.search(g.pattern, name):
                out[name] = (g.optimizer_name, g.optimizer_kwargs)
                break
    return out


@pytest.mark.parametrize("stock", sorted(FAMILIES))
def test_muon_on_hidden_matrices_adamw_on_the_rest(stock):
    from torchtitan_ext import with_muon
    from torchtitan_ext.transform import _meta_parameters

    config = with_muon(_stock(stock))
    shapes = _meta_parameters(config.model_spec.model)
    got = _assignment(config)
    assert set(got) == set(shapes)
    for name, (opt, kwargs) in got.items():
        hidden = re.search(r"(attention|feed_forward|shared_experts)\..*weight$", name) and not name.endswith(
            ("norm.weight",)
        )
        experts = re.search(r"inner_experts\.w[123]_E[A-Z]+$", name)
        if hidden and len(shapes[name]) == 2:
            assert opt == "Muon", name
        elif experts:
            assert opt == "Muon" and kwargs.get("batched_weights") is True, name
        else:  # embeddings, LM head, norms, routers
            assert opt == "AdamW", name
            assert re.search(r"(tok_embeddings|lm_head|output|norm|router\.gate)\.weight$", name), name


def test_gpt_oss_experts_get_muon_per_expert_and_per_gate_up_matrix():
    """gpt_oss's ``mlp1 (E, 2F, D)`` alternates gate and up rows: Muon per expert with ``row_interleave=2``; its
    ``mlp2 (E, D, F)`` per expert; the expert biases and sinks stay on AdamW. The group's kwargs build pcopt's Muon
    on the stacks (the construction-time checks pass on the real shapes)."""
    import torch

    from pcopt.optim import Muon
    from torchtitan_ext import with_muon
    from torchtitan_ext.transform import _meta_parameters

    config = with_muon(_stock("gpt_oss_debugmodel"))
    shapes = _meta_parameters(config.model_spec.model)
    got = _assignment(config)
    mlp1 = {n: kw for n, (opt, kw) in got.items() if n.endswith("inner_experts.mlp1_weight_EGD")}
    mlp2 = {n: kw for n, (opt, kw) in got.items() if n.endswith("inner_experts.mlp2_weight_EDF")}
    assert mlp1 and len(mlp1) == len(mlp2)
    assert all(
        got[n][0] == "Muon" and kw["row_interleave"] == 2 and kw["batched_weights"] for n, kw in mlp1.items()
    )
    assert all(
        got[n][0] == "Muon" and "row_interleave" not in kw and kw["batched_weights"] for n, kw in mlp2.items()
    )
    assert all(got[n][0] == "AdamW" for n in got if re.search(r"inner_experts\.mlp[12]_bias", n))
    name = next(iter(mlp1))
    kwargs = {k: v for k, v in mlp1[name].items() if k != "lr"}
    Muon([{"params": [torch.nn.Parameter(torch.zeros(shapes[name]))], **kwargs}], lr=1e-2)
    # with PC the optimizer sees the raw stacks (``...parametrizations.<name>.original``): the same groups
    for plain in (*mlp1, *mlp2):
        module, _, stack = plain.rpartition(".")
        raw = f"{module}.parametrizations.{stack}.original"
        first = next(g for g in config.optimizer.param_groups if re.search(g.pattern, raw))
        assert (first.optimizer_name, first.optimizer_kwargs) == got[plain], raw


def test_gpt_oss_with_pc_preconditions_its_biased_attention_output_and_its_experts(caplog):
    """gpt_oss's ``wo`` is a ``ScaledBiasRowwiseLinear`` (bias divided by the TP degree): ``with_pc`` makes it a
    :class:`PCScaledBiasRowwiseLinear`. Its experts become :class:`PCGptOssGroupedExperts`: ``mlp1 (E, 2F, D)``
    with a state per expert and per gate/up matrix (its rows interleave them), ``mlp2`` per expert. Every raw weight
    and bias gets the baseline's draw. (gpt_oss's FlexAttention with sinks compiles on first use, and inductor
    refuses it on a CPU, so forwards are tested on the layers, below, and on the stacks in tests/unit.)"""
    import logging

    from torchtitan_ext import with_pc
    from torchtitan_ext.export import build_model
    from torchtitan_ext.pc import PCGptOssGroupedExperts, PCScaledBiasRowwiseLinear

    config = _stock("gpt_oss_debugmodel")
    config.model_spec.model.layers = config.model_spec.model.layers[:2]
    with caplog.at_level(logging.INFO, logger="torchtitan_ext.pc"):
        pc_config = with_pc(config)
    assert re.search(r"4 modules .*\(2 Linear layers, 2 expert modules: 4 stacks", caplog.text), caplog.text
    assert "without PC" not in caplog.text
    torch.manual_seed(0)
    base = build_model(config)
    torch.manual_seed(0)
    model = build_model(pc_config)
    experts = "layers.{}.moe.routed_experts.inner_experts"
    assert [f for f, _ in pcopt.preconditioners(model)] == [
        f for i in range(2) for f in (f"layers.{i}.attention.wo.weight", *(
            f"{experts.format(i)}.{n}" for n in ("mlp1_weight_EGD", "mlp2_weight_EDF")))
    ]  # fmt: skip
    for i in range(2):
        wo, ref = (
            model.get_submodule(f"layers.{i}.attention.wo"),
            base.get_submodule(f"layers.{i}.attention.wo"),
        )
        assert isinstance(wo, PCScaledBiasRowwiseLinear) and ref.bias is not None
        assert torch.equal(wo.parametrizations.weight.original, ref.weight)
        assert torch.equal(wo.bias, ref.bias)
        pc, ref = model.get_submodule(experts.format(i)), base.get_submodule(experts.format(i))
        assert isinstance(pc, PCGptOssGroupedExperts)
        for name in ("mlp1_weight_EGD", "mlp2_weight_EDF"):
            assert torch.equal(pc.parametrizations[name].original, getattr(ref, name)), (i, name)
        for name in ("mlp1_bias_EG", "mlp2_bias_ED"):
            assert torch.equal(getattr(pc, name), getattr(ref, name)), (i, name)
        E, G, D = ref.mlp1_weight_EGD.shape
        mlp1 = pc.parametrizations.mlp1_weight_EGD[0]
        assert mlp1.gamma.shape == (E, 2) and mlp1.u.shape == (E, 2, G // 2) and mlp1.v.shape == (E, 2, D)


@pytest.mark.parametrize("strategy", pcopt.STRATEGIES)
@pytest.mark.parametrize("tp_degree", [1, 2])
def test_pc_scaled_bias_rowwise_linear_is_the_plain_layer_with_w_eff(strategy, tp_degree):
    """Forward and gradients of the PC layer equal those of torchtitan's ``ScaledBiasRowwiseLinear`` holding
    ``W_eff``, with its bias divided by ``tp_degree`` in forward (and so its gradient, as autograd gives torchtitan's
    layer). Bound 1e-12, float64 throughout: both layers run the same ``F.linear`` on the same ``W_eff`` (once per
    step holds it as written by the strategy, per forward recomputes it with the same ops); the closed-form check
    ``x W^T + b / tp`` sums 24 products of entries of size <= ~5 in another order, at most 24 * 5 * 2**-53 ~ 1e-14
    apart, and the bias gradients are sums of 3 rows. None of it depends on the CPU's vector width (float64
    reductions of 24 terms), so the bound holds with 100x margin on AVX2, AVX-512 and AMX alike."""
    from torchtitan.config.override import derive
    from torchtitan.models.common.linear import ScaledBiasRowwiseLinear

    from torchtitan_ext.pc import PCScaledBiasRowwiseLinear

    wo = _stock("gpt_oss_debugmodel").model_spec.model.layers[0].attention.wo
    small = derive(wo, ScaledBiasRowwiseLinear.Config, in_features=24, out_features=16)
    layer = derive(small, PCScaledBiasRowwiseLinear.Config, degree=5).build().double()
    layer.attach()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.randn(16, 24, generator=gen, dtype=torch.float64))
        layer.bias.copy_(torch.randn(16, generator=gen, dtype=torch.float64))
    pcopt.reset_preconditioners(layer)
    pcopt.set_strategy(layer, strategy)
    layer.tp_degree = tp_degree
    plain = small.build().double()
    (pc,) = [m for _, m in pcopt.preconditioners(layer)]
    with torch.no_grad():
        plain.weight.copy_(pc.effective_weight())
        plain.bias.copy_(layer.bias)
    plain.tp_degree = tp_degree
    x = torch.randn(3, 24, generator=gen, dtype=torch.float64)
    y, y_ref = layer(x), plain(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(y_ref, x @ plain.weight.T + layer.bias / tp_degree, rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(layer.bias.grad, plain.bias.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(plain.bias.grad, g.sum(0) / tp_degree, rtol=0, atol=1e-12)


@pytest.mark.parametrize("strategy", pcopt.STRATEGIES)
def test_pc_gpt_oss_experts_run_torchtitans_forward_on_w_eff(strategy):
    """:class:`PCGptOssGroupedExperts` is torchtitan's gpt_oss experts holding ``W_eff``: on the same tokens and
    counts per expert, its output equals that of the plain module given its ``W_eff`` stacks and biases, bit for
    bit (both cast the same fp32 ``W_eff`` to bf16 and run the same grouped matmuls), and the raw stacks and
    biases got the plain module's init draws."""
    from torchtitan.config.override import derive

    from torchtitan_ext.pc import PCGptOssGroupedExperts

    cfg = _stock("gpt_oss_debugmodel").model_spec.model.layers[0].moe.routed_experts.inner_experts
    small = derive(cfg, type(cfg), num_experts=4, dim=24, hidden_dim=16)

    def build(config, pc):
        with torch.device("meta"):
            module = config.build()
        if pc:
            module.attach()
        module.to_empty(device="cpu")
        torch.manual_seed(0)
        with torch.no_grad():
            module.init_states(buffer_device=torch.device("cpu"))
        return module

    layer, plain = build(derive(small, PCGptOssGroupedExperts.Config, degree=5), True), build(small, False)
    for name in ("mlp1_weight_EGD", "mlp2_weight_EDF"):
        assert torch.equal(layer.parametrizations[name].original, getattr(plain, name)), name
    pcopt.set_strategy(layer, strategy)
    if strategy == "once_per_step":
        pcopt.PCState(layer).after_step()  # writes W_eff
    with torch.no_grad():
        for name in ("mlp1_weight_EGD", "mlp2_weight_EDF"):
            getattr(plain, name).copy_(getattr(layer, name))
    x, counts = torch.randn(10, 24), torch.tensor([3, 0, 5, 2])
    assert torch.equal(layer(x, counts), plain(x, counts))


@pytest.mark.parametrize("stock", ["llama3_debugmodel", "qwen3_debugmodel", "llama3_8b"])
def test_fused_wqkv_is_split_per_q_k_v_block_of_each_kv_group(stock):
    from torchtitan.models.common.attention import FusedQKVLinear

    from torchtitan_ext import with_muon

    config = with_muon(_stock(stock))
    (qkv,) = [c for _, c, *_ in config.model_spec.model.traverse(FusedQKVLinear.Config)][:1]
    hd, n_kv, n_heads = qkv.head_dim, qkv.n_kv_heads, qkv.n_heads
    got = _assignment(config)
    splits = {tuple(kw["split_sizes"]) for n, (_, kw) in got.items() if n.endswith("wqkv.weight")}
    # FusedQKVLinear's rows: n_kv groups of (n_heads / n_kv query heads, one key head, one value head)
    assert splits == {(n_heads // n_kv * hd, hd, hd) * n_kv}
    assert sum(next(iter(splits))) == qkv.wqkv.out_features
    if stock == "llama3_8b":  # GQA: 32 query heads over 8 KV heads of 128
        assert next(iter(splits))[:3] == (512, 128, 128)


# -- names ------------------------------------------------------------------------------------------------------------
def test_every_stock_config_is_reachable_with_each_suffix():
    from torchtitan_ext import config_registry
    from torchtitan_ext.transform import FAMILIES as ALL
    from torchtitan_ext.transform import RECIPES, _registry, _stock_names

    names = [n for f in ALL if not isinstance(_registry(f), ImportError) for n in _stock_names(_registry(f))]
    assert {"llama3_8b", "qwen3_debugmodel", "deepseek_v3_671b", "gpt_oss_20b", "qwen3_moe_debug"} <= set(
        names
    )
    for name in names:
        for suffix in RECIPES:
            fn = getattr(config_registry, name + suffix)  # resolves without building
            assert callable(fn) and fn.__name__ == name + suffix


def test_recipe_configs_build(monkeypatch):
    from torchtitan_ext import config_registry

    cfg = config_registry.llama3_8b_muon_pc()
    assert len(_pc_fqns(cfg)) == 32 * 4
    assert [g.optimizer_name for g in cfg.optimizer.param_groups] == ["Muon", "Muon", "AdamW"]


def test_unknown_config_names_list_families_and_suffixes():
    from torchtitan.config.manager import ConfigManager

    from torchtitan_ext import config_registry

    with pytest.raises(
        ValueError, match=r"(?s)Unknown config 'llama3_9b_muon_pc'.*_muon_pc +muon \+ PC.*llama3: "
    ):
        config_registry.llama3_9b_muon_pc  # noqa: B018
    # through torchtitan's own command line
    with pytest.raises(
        ValueError, match=r"(?s)ends in none of the recipe suffixes.*qwen3: .*qwen3_debugmodel"
    ):
        ConfigManager().parse_args(["--module", "torchtitan_ext", "--config", "qwen3_debugmodel_lion"])
    with pytest.raises(AttributeError):
        config_registry._private  # noqa: B018


# -- no silent no-op --------------------------------------------------------------------------------------------------
def test_converter_without_the_transform_raises_at_first_forward():
    """The obvious attempt: PCConverter in torchtitan's model_registry, no with_pc. It must never train without PC."""
    from torchtitan.models.qwen3 import model_registry

    from torchtitan_ext.pc import PCConverter, PCLinear

    spec = model_registry("debugmodel", converters=[PCConverter.Config(degree=5)])
    model = spec.model.build()  # what torchtitan's parallelize_qwen3 would then shard, without attaching PC
    pcs = [m for m in model.modules() if isinstance(m, PCLinear)]
    assert len(pcs) == 32
    with pytest.raises(
        RuntimeError, match=r"reached its forward without the PC layer.*torchtitan_ext\.with_pc"
    ):
        pcs[0](torch.randn(2, pcs[0].in_features))
    pcs[1].attach()  # attached: it runs, as W_eff
    out = pcs[1](torch.randn(2, pcs[1].in_features))
    assert out.shape == (2, pcs[1].out_features)


def test_pc_raw_weights_get_the_baselines_init_draw():
    """Same seed: every PC raw weight equals the baseline's weight (the same RNG draws in the same order)."""
    from torchtitan_ext import with_pc
    from torchtitan_ext.pc import attach_pc

    def build(config):
        with torch.device("meta"):
            model = config.model_spec.model.build()
        attach_pc(model)
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        with torch.no_grad():
            model.init_weights(buffer_device=torch.device("cpu"))
        return model

    base_cfg = _stock("qwen3_debugmodel")
    base, pc = build(base_cfg), build(with_pc(base_cfg))
    base_sd = base.state_dict()
    raw = {k.replace(".parametrizations.weight.original", ".weight"): v for k, v in pc.state_dict().items()}
    assert sum(k.endswith(".parametrizations.weight.original") for k in pc.state_dict()) == 32
    for key, value in base_sd.items():
        assert torch.equal(raw[key], value), key


# -- 2-rank runs ------------------------------------------------------------------------------------------------------
STEPS, EVERY = 4, 2
_EP = ("--parallelism.expert_parallel_degree", "2")
# The stock MoE models under EP at 64 tokens of one sequence per rank (for_cpu's 2 x 256 costs ~105 s a step for
# DeepSeek's, 160-196 s for Qwen3's): what these runs check (PC on every target, the checkpoint's keys, a bit-exact
# resume) does not depend on the batch, and the step's cost then is the model's fixed per-step work (Muon, PC).
_SMALL_BATCH = ("--training.seq_len", "64", "--training.local_batch_size", "1")
# run -> (config, module, extra flags, PC Linear matrices, PC expert modules (3 stacks each))
_RUNS = {
    "llama3_debugmodel": ("llama3_debugmodel_muon_pc", "torchtitan_ext", (), 24, 0),
    "qwen3_debugmodel": ("qwen3_debugmodel_muon_pc", "torchtitan_ext", (), 32, 0),
    "deepseek_v3_debugmodel": (
        "deepseek_v3_debugmodel_muon_pc",
        "torchtitan_ext",
        (),
        24,
        5,
    ),  # FSDP2 on experts
    "deepseek_v3_debugmodel_ep": (
        "deepseek_v3_debugmodel_muon_pc",
        "torchtitan_ext",
        (*_EP, *_SMALL_BATCH),
        24,
        5,
    ),
    "qwen3_moe_tiny": ("qwen3_moe_tiny_muon_pc", "tests.torchtitan.tt_configs", _EP, 2, 2),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def _train(name: str, dump, *extra: str):
    config, module, flags, *_ = _RUNS[name]
    return torchrun(
        config, dump, "--training.steps", str(STEPS), "--checkpoint.enable", "--checkpoint.interval", str(EVERY),
        *flags, *extra, module=module, timeout=400,
    ).check()  # fmt: skip


@pytest.fixture(scope="module", params=sorted(_RUNS))
def pc_run(request, workdir):
    stock = request.param
    return stock, _train(stock, workdir / stock, "--metrics.pc_log_freq", str(EVERY))


@pytest.mark.slow
def test_family_trains_with_pc_and_muon(pc_run):
    stock, run = pc_run
    losses = run.losses
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1], losses
    *_, n, n_experts = _RUNS[stock]
    stacks = f" and {3 * n_experts} expert stacks \\(state per expert matrix\\)" if n_experts else ""
    pc_line = rf"PC layer on {n} matrices{stacks}, once_per_step \(FSDP2 shards\)"
    assert re.search(pc_line, run.log), run.log[-3000:]
    assert re.search(r"step 2 PC metrics: \{'pc/sigma_mean'", run.log)
    assert re.search(r"optimizer Muon, pattern .*", run.log) and "CPU run (no GPU)" in run.log
    # the checkpoint holds the raw weights of the PC matrices (W_eff is recomputed), plain ones elsewhere
    import torch.distributed.checkpoint as dcp

    keys = set(
        dcp.FileSystemReader(str(run.dump / "checkpoint" / f"step-{STEPS}"))
        .read_metadata()
        .state_dict_metadata
    )
    raw = {k for k in keys if k.endswith(".parametrizations.weight.original")}
    assert len(raw) == n and "layers.0.attention.wo.parametrizations.weight.original" in raw
    assert not any(k.endswith("attention.wo.weight") for k in keys)
    expert_state = r"inner_experts\.parametrizations\.w[123]_E[DF]{2}\.(original|0\.gamma)$"
    stacks = {k for k in keys if re.search(expert_state, k)}
    assert len(stacks) == 6 * n_experts, sorted(stacks)[:6]
    assert not any(re.search(r"inner_experts\.w[123]_E[DF]{2}$", k) for k in keys)  # W_eff is recomputed


@pytest.mark.slow
def test_family_resume_is_bit_exact(pc_run, workdir):
    stock, run = pc_run
    dump = workdir / f"{stock}-resumed"
    (dump / "checkpoint").mkdir(parents=True)
    shutil.copytree(run.dump / "checkpoint" / f"step-{EVERY}", dump / "checkpoint" / f"step-{EVERY}")
    resumed = _train(stock, dump)
    assert sorted(resumed.steps) == list(range(EVERY + 1, STEPS + 1))
    for step in resumed.steps:
        assert resumed.steps[step] == run.steps[step], (step, resumed.steps[step], run.steps[step])


@pytest.mark.slow
def test_stock_qwen3_moe_debug_trains_with_pc_and_muon_under_ep(workdir):
    """torchtitan's own ``qwen3_moe_debug`` (8 layers of 64 experts (768, 256), top 8) as ``_muon_pc`` under EP 2: two
    steps (the step costs ~36 s on 2 CPU ranks, mostly PC's fp32 map and pull-back of 768 local expert matrices; the
    bit-exact resume under EP is checked on its 2-layer cut, ``qwen3_moe_tiny``, above)."""
    run = torchrun(
        "qwen3_moe_debug_muon_pc", workdir / "qwen3_moe_debug", "--training.steps", "2", *_SMALL_BATCH, *_EP,
        timeout=400,
    ).check()  # fmt: skip
    assert sorted(run.losses) == [1, 2] and run.losses[2] < run.losses[1], run.losses
    assert re.search(
        r"PC layer on 8 matrices and 24 expert stacks \(state per expert matrix\), once_per_step", run.log
    )
    assert re.search(r"optimizer Muon, pattern .*", run.log), run.log[-3000:]


@pytest.mark.slow
def test_muon_recipe_without_pc_trains(workdir):
    run = torchrun(
        "llama3_debugmodel_muon", workdir / "l3_muon", "--training.steps", "3", timeout=300
    ).check()
    assert run.losses[3] < run.losses[1]
    assert "PC layer" not in run.log
