"""The config functions: names, the paper's models and hyperparameters, where PC goes, bad PC settings."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.torchtitan

torchtitan = pytest.importorskip("torchtitan")

from torchtitan.models.common.linear import Linear  # noqa: E402
from torchtitan.trainer import Trainer  # noqa: E402

from torchtitan_ext import config_registry  # noqa: E402
from torchtitan_ext.compat import TORCH_HAS_SPMD_FSDP, check_spmd_backend  # noqa: E402
from torchtitan_ext.pc import PCConverter, PCLinear  # noqa: E402

NAMES = [
    f"{model}_{opt}{pc}"
    for model in ("debug", "llama2_271m", "llama2_1b")
    for opt in ("adamw", "muon")
    for pc in ("", "_pc")
]
PAPER_LR = {
    ("llama2_271m", "adamw"): 8.485e-4,
    ("llama2_271m", "muon"): 4.243e-3,
    ("llama2_1b", "adamw"): 3e-4,
    ("llama2_1b", "muon"): 1.5e-3,
}
# dim, layers, heads, ffn hidden, vocab
PAPER_MODEL = {"llama2_271m": (1024, 16, 16, 2816, 32000), "llama2_1b": (2048, 18, 16, 5632, 32000)}


def _config(name: str) -> Trainer.Config:
    return getattr(config_registry, name)()


def _linears(cfg: Trainer.Config) -> dict[str, Linear.Config]:
    return {fqn: c for fqn, c, *_ in cfg.model_spec.model.traverse(Linear.Config)}


def _group_kwargs(cfg: Trainer.Config) -> dict[str, dict]:
    return {g.optimizer_name: g.optimizer_kwargs for g in cfg.optimizer.param_groups}


@pytest.mark.parametrize("name", NAMES)
def test_every_config_builds_with_the_paper_recipe(name):
    cfg = _config(name)
    assert isinstance(cfg, Trainer.Config)
    model = cfg.model_spec.model
    opt = "muon" if "_muon" in name else "adamw"
    pc = name.endswith("_pc")
    flavor = name.rsplit(f"_{opt}", 1)[0]

    # Llama-2 style: MHA, RoPE theta 10000 without scaling, untied embeddings, separate wq/wk/wv.
    attn = model.layers[0].attention
    assert attn.n_kv_heads in (None, attn.n_heads)
    assert attn.rope.theta == 10000.0 and attn.rope.scaling == "none"
    assert model.enable_weight_tying is False
    assert {"layers.0.attention.qkv_linear.wq", "layers.0.attention.qkv_linear.wkv"} <= set(_linears(cfg))
    if flavor in PAPER_MODEL:
        dim, n_layers, n_heads, hidden, vocab = PAPER_MODEL[flavor]
        assert (model.dim, len(model.layers), attn.n_heads, model.vocab_size) == (
            dim,
            n_layers,
            n_heads,
            vocab,
        )
        assert model.layers[0].feed_forward.w1.out_features == hidden
        assert cfg.training.seq_len == 8192 and cfg.training.global_batch_size == 320
        assert cfg.lr_scheduler.warmup_steps == cfg.training.steps // 100  # 1%
        assert _group_kwargs(cfg)["Muon" if opt == "muon" else "AdamW"]["lr"] == PAPER_LR[(flavor, opt)]

    # Shared recipe: clip 1.0, cosine to 10% of the peak, betas (0.9, 0.95), weight decay 0.1 everywhere.
    assert cfg.training.max_norm == 1.0
    assert cfg.lr_scheduler.decay_type == "cosine" and cfg.lr_scheduler.min_lr_factor == 0.1
    kwargs = _group_kwargs(cfg)
    adamw = kwargs["AdamW"]
    assert adamw["betas"] == (0.9, 0.95) and adamw["weight_decay"] == 0.1
    assert cfg.optimizer.param_groups[-1].pattern == ".*"
    if opt == "muon":
        muon = kwargs["Muon"]
        assert muon["lr"] == adamw["lr"]  # the AdamW branch uses the Muon group's peak lr
        assert (muon["momentum"], muon["nesterov"], muon["ns_steps"], muon["weight_decay"]) == (
            0.95,
            True,
            5,
            0.1,
        )
        assert muon["adjust_lr_fn"] == "match_rms_adamw"
    assert cfg.parallelism.spmd_backend == "partial_dtensor"

    # PC exactly on attention output + FFN of every layer, degree 9 with AdamW and 5 with Muon.
    pcs = {fqn: c for fqn, c in _linears(cfg).items() if isinstance(c, PCLinear.Config)}
    if not pc:
        assert not pcs
    else:
        expected = {
            f"layers.{i}.{m}"
            for i in range(len(model.layers))
            for m in ("attention.wo", *(f"feed_forward.w{j}" for j in (1, 2, 3)))
        }
        assert set(pcs) == expected
        assert {c.degree for c in pcs.values()} == {9 if opt == "adamw" else 5}


@pytest.mark.parametrize("opt", ["adamw", "muon"])
@pytest.mark.parametrize("flavor", ["debug", "llama2_271m", "llama2_1b"])
def test_baseline_and_pc_share_every_hyperparameter(flavor, opt):
    base, pc = _config(f"{flavor}_{opt}"), _config(f"{flavor}_{opt}_pc")
    strip = lambda cfg: [(g.pattern, g.optimizer_kwargs) for g in cfg.optimizer.param_groups]  # noqa: E731
    assert strip(base) == strip(pc)
    assert base.training == pc.training and base.lr_scheduler == pc.lr_scheduler


@pytest.mark.parametrize("name,target", [("llama2_271m_muon_pc", 271e6), ("llama2_1b_adamw", 1.06e9)])
def test_paper_model_sizes(name, target):
    with torch.device("meta"):
        model = _config(name).model_spec.model.build()
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / target - 1) < 0.01, n


def test_pc_targets_matching_nothing_is_refused():
    with pytest.raises(
        ValueError,
        match=r"PC targets 'wq_typo' matched no Linear layer.*Its 37 Linear layers: lm_head, layers\.\*\.attention",
    ):
        config_registry.llama2_model("debug", pc=PCConverter.Config(targets="wq_typo"))


def test_pc_bad_degree_and_regex_are_refused():
    with pytest.raises(
        ValueError, match=r"Unsupported PC polynomial degree: expected one of \[3, 5, 7, 9\], got 4"
    ):
        config_registry.llama2_model("debug", pc=PCConverter.Config(degree=4))
    with pytest.raises(ValueError, match=r"PC targets '\(' is not a valid regex"):
        config_registry.llama2_model("debug", pc=PCConverter.Config(targets="("))


def test_pc_twice_is_refused():
    spec = config_registry.llama2_model("debug", pc=PCConverter.Config())
    with pytest.raises(ValueError, match=r"already has the PC layer"):
        PCConverter.Config().build().convert(spec.model)


def test_custom_targets_select_only_those_matrices():
    spec = config_registry.llama2_model(
        "debug", pc=PCConverter.Config(targets=r"feed_forward\.w2$", degree=7)
    )
    pcs = [fqn for fqn, c, *_ in spec.model.traverse(Linear.Config) if isinstance(c, PCLinear.Config)]
    assert pcs == [f"layers.{i}.feed_forward.w2" for i in range(6)]


@pytest.mark.skipif(TORCH_HAS_SPMD_FSDP, reason="the refusal applies to torch < 2.14")
def test_spmd_backends_refused_on_old_torch():
    check_spmd_backend("partial_dtensor")
    with pytest.raises(
        ValueError, match=r"full_dtensor.*silently doubled loss.*--parallelism.spmd_backend partial_dtensor"
    ):
        check_spmd_backend("full_dtensor")
    with pytest.raises(ValueError, match=r"spmd_types.*only from torch 2.14"):
        check_spmd_backend("spmd_types")


def test_dense_attention_only_on_cpu_machines():
    cfg = _config("debug_muon_pc")
    has = "torchtitan_ext.cpu_attention.dense_attention" in cfg.override.imports
    assert has == (not torch.cuda.is_available())


def test_metrics_pc_log_freq_validation():
    from torchtitan_ext.metrics import PCMetricsProcessor

    assert PCMetricsProcessor.Config().pc_log_freq == 0  # off by default
    with pytest.raises(ValueError, match=r"pc_log_freq \(15\) must be a multiple of metrics.log_freq \(10\)"):
        PCMetricsProcessor.Config(log_freq=10, pc_log_freq=15)
    with pytest.raises(ValueError, match=r"pc_log_freq must be >= 0"):
        PCMetricsProcessor.Config(pc_log_freq=-1)


def test_warmup_is_one_percent_and_lr_ends_at_ten_percent():
    cfg = _config("llama2_271m_adamw")
    assert cfg.lr_scheduler.warmup_steps == 220 and cfg.training.steps == 22_000
    cfg = _config("llama2_1b_muon_pc")
    assert cfg.lr_scheduler.warmup_steps == 611 and cfg.training.steps == 61_100
    assert math.isclose(cfg.lr_scheduler.min_lr_factor, 0.1)


def test_pc_mode_is_validated_and_carried_to_the_layers():
    from torchtitan_ext.config_registry import debug_muon_pc, debug_muon_pc_per_forward, llama2_1b_adamw_pc
    from torchtitan_ext.pc import PCLinear

    with pytest.raises(
        ValueError, match=r"PC strategy must be one of \['auto', 'per_forward', 'once_per_step'\], got 'fast'"
    ):
        PCConverter.Config(mode="fast").build()
    assert PCConverter.Config().mode == "auto"  # once per step wherever exact (no pipeline parallelism)
    for config, mode in (
        (debug_muon_pc, "auto"),
        (llama2_1b_adamw_pc, "auto"),
        (debug_muon_pc_per_forward, "per_forward"),
    ):
        modes = {cfg.pc_mode for _, cfg, *_ in config().model_spec.model.traverse(PCLinear.Config)}
        assert modes == {mode}, config.__name__


@pytest.mark.parametrize("old,new", [("sharded", "once_per_step"), ("parametrize", "per_forward")])
def test_old_strategy_names_work_for_one_release_with_a_warning(old, new):
    with pytest.warns(DeprecationWarning, match=rf"PC mode '{old}' is now called '{new}'"):
        converter = PCConverter.Config(mode=old).build()
    assert converter.config.mode == new
