"""One transform for any torchtitan ``Trainer.Config``: :func:`with_pc`, :func:`with_muon`, :func:`for_cpu`.

Each takes a config (torchtitan's own, e.g. ``torchtitan.models.qwen3.config_registry.qwen3_debugmodel()``, or
the user's) and returns a new one; the input is not modified::

    from torchtitan.models.llama3.config_registry import llama3_8b
    from torchtitan_ext import with_muon, with_pc

    config = with_pc(with_muon(llama3_8b()))   # PC (degree 5 with Muon) + pcopt's Muon

* :func:`with_pc` converts the target ``Linear`` configs into :class:`~torchtitan_ext.pc.PCLinear` configs and
  wraps the model spec: its ``parallelize_fn`` (the family's own TP/EP/AC/compile/FSDP2 plan) runs after PC is
  attached (:func:`~torchtitan_ext.pc.parallelize_with_pc`), its ``post_optimizer_build_fn`` is followed by
  the PC state's attachment, and its state-dict adapter learns the PC keys. The trainer, checkpoint manager,
  metrics and optimizers container become torchtitan_ext's subclasses (:class:`~torchtitan_ext.trainer.PCTrainer`
  calls the once-per-step pull-back after the last backward).
* :func:`with_muon` puts pcopt's Muon on the hidden matrices (fused ``wqkv`` split per q/k/v block of each
  KV group, MoE routed experts per expert) and AdamW on the rest (:func:`muon_param_groups` says which).
* :func:`for_cpu` makes a stock config run on a 2-core machine with the embedded tokenizer and text sample,
  and prints every change.

On the command line, ``--module torchtitan_ext --config <stock name><suffix>`` is ``with_pc``/``with_muon`` of
torchtitan's stock config function ``<stock name>`` (:func:`recipe_config`), plus ``for_cpu`` without a GPU.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import logging
import re

import torch
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig
from torchtitan.config.override import derive
from torchtitan.models.common.attention import FusedQKVLinear
from torchtitan.models.common.linear import Linear
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.trainer import Trainer

from pcopt import recipes
from pcopt.names import ATTENTION_FFN_MODULES, EXPERT_STACKS, param_pattern
from torchtitan_ext.checkpoint import PCCheckpointManager
from torchtitan_ext.metrics import PCMetricsProcessor
from torchtitan_ext.optimizer import PCOptimizersContainer, muon_kwargs
from torchtitan_ext.pc import (
    DEFAULT_TARGETS,
    PCConverter,
    PCLinear,
    canonical_strategy,
    parallelize_with_pc,
    with_pc_state,
)
from torchtitan_ext.state_dict_adapter import pc_state_dict_adapter
from torchtitan_ext.trainer import PCTrainer

logger = logging.getLogger(__name__)

__all__ = [
    "FAMILIES",
    "RECIPES",
    "for_cpu",
    "muon_param_groups",
    "pc_model_spec",
    "recipe_config",
    "stock_config",
    "with_muon",
    "with_pc",
]

FAMILIES = ("llama3", "qwen3", "qwen3_5", "deepseek_v3", "kimi_k2_7", "gpt_oss")
"""torchtitan 0.3's LLM families whose stock configs the recipes reach (``torchtitan.models.<family>``)."""

RECIPES = {"_muon": ("muon", False), "_muon_pc": ("muon", True), "_adamw_pc": ("adamw", True)}
"""Config-name suffix -> (optimizer, PC): ``<stock name>_muon_pc`` is Muon + PC on torchtitan's ``<stock name>``."""

ROUTED_EXPERTS = EXPERT_STACKS
"""MoE routed-expert stacks ``(E, out, in)`` with one matrix per expert, plain or PC raw (Muon per expert)."""

GPT_OSS_MLP1 = r"(^|\.)inner_experts\.(parametrizations\.)?mlp1_weight_EGD(\.original)?$"
"""gpt_oss's fused gate/up expert stack ``(E, 2F, D)``, plain or the raw stack of a preconditioned one: its rows
alternate gate (``0::2``) and up (``1::2``), so Muon runs per expert and per gate/up matrix (``row_interleave=2``)."""

GPT_OSS_MLP2 = r"(^|\.)inner_experts\.(parametrizations\.)?mlp2_weight_EDF(\.original)?$"
"""gpt_oss's down-projection expert stack ``(E, D, F)``, plain or PC raw: Muon per expert."""

_FUSING_OVERRIDES = ("torchtitan.overrides.fused_swiglu.",)
"""Overrides that fuse ``w1``/``w3`` into one 3-D ``w13`` parameter: PC and per-matrix Muon need them apart."""


# -- configs -----------------------------------------------------------------------------------------------------
def _upgrade(cfg, base: type, target: type, what: str):
    """``cfg`` as a ``target`` config (torchtitan_ext's subclass of ``base``), fields copied."""
    if isinstance(cfg, target):
        return cfg
    if type(cfg) is not base:
        raise ValueError(
            f"with_pc/with_muon replace the config's {what} ({base.__module__}.{base.__qualname__}) with "
            f"torchtitan_ext's {target.__qualname__}, but this config uses {type(cfg).__qualname__}, a subclass "
            f"it cannot merge. Derive your class from {target.__module__}.{target.__qualname__} instead."
        )
    return derive(cfg, target)


def _pc_components(config: Trainer.Config) -> Trainer.Config:
    """The config with torchtitan_ext's trainer, checkpoint manager, metrics and optimizers container."""
    config = _upgrade(config, Trainer.Config, PCTrainer.Config, "trainer")
    spec = config.model_spec
    # PC-less too: the same wrapper (gloo's SUM fix)
    if getattr(spec.parallelize_fn, "_pc_inner", None) is None:
        config.model_spec = dataclasses.replace(
            spec, parallelize_fn=_with_pc_parallelize(spec.parallelize_fn, ())
        )
    config.checkpoint = _upgrade(
        config.checkpoint, CheckpointManager.Config, PCCheckpointManager.Config, "checkpoint"
    )
    config.metrics = _upgrade(config.metrics, MetricsProcessor.Config, PCMetricsProcessor.Config, "metrics")
    config.optimizer = _upgrade(
        config.optimizer, OptimizersContainer.Config, PCOptimizersContainer.Config, "optimizer"
    )
    return config


def _drop_fusing_overrides(config: Trainer.Config, why: str) -> None:
    dropped = [o for o in config.override.imports if o.startswith(_FUSING_OVERRIDES)]
    if dropped:
        config.override.imports = [o for o in config.override.imports if o not in dropped]
        logger.info(
            "%s: dropped --override.imports %s (it fuses w1 and w3 into one parameter; the stock FeedForward "
            "computes the same function and checkpoints the same keys)",
            why,
            dropped,
        )


def _uses_muon(config: Trainer.Config) -> bool:
    groups = getattr(config.optimizer, "param_groups", None) or []
    return any(g.optimizer_name == "Muon" for g in groups)


def with_pc(
    config: Trainer.Config,
    *,
    degree: int | None = None,
    targets: str | None = None,
    strategy: str = "auto",
    num_power_iterations: int = 10,
    learn_gamma: bool = True,
    eps: float = 1e-7,
) -> Trainer.Config:
    """``config`` with the PC layer on its ``targets`` (see the module docstring).

    Args:
        config: any torchtitan ``Trainer.Config`` (not modified).
        degree: the PC polynomial's degree (3, 5, 7, 9); None: the paper's, 5 if the config already uses Muon
            (apply :func:`with_muon` first), else 9.
        targets: regex searched in the FQNs of ``Linear`` modules and expert stacks; None:
            :data:`torchtitan_ext.pc.DEFAULT_TARGETS` (attention output, dense FFN and shared-expert FFN matrices,
            and the MoE routed experts' stacks per expert; never q/k/v, embeddings, LM head, router or norms).
        strategy: ``"auto"`` (once per step unless pipeline parallel), ``"once_per_step"`` or ``"per_forward"``.

    Raises:
        ValueError: ``targets`` matches no ``Linear`` (the message lists them), the model already has PC, or a
            component config is a foreign subclass torchtitan_ext cannot replace.
    """
    config = copy.deepcopy(config)
    strategy = canonical_strategy(strategy)
    if degree is None:
        degree = recipes.pc_degree("muon" if _uses_muon(config) else "adamw")
    converter = PCConverter.Config(
        targets=DEFAULT_TARGETS if targets is None else targets,
        degree=degree,
        num_power_iterations=num_power_iterations,
        learn_gamma=learn_gamma,
        eps=eps,
        mode=strategy,
    ).build()
    _drop_fusing_overrides(config, "PC")
    config.model_spec = pc_model_spec(config.model_spec, converter)
    return _pc_components(config)


def pc_model_spec(spec: ModelSpec, converter: PCConverter) -> ModelSpec:
    """``spec`` with its model converted by ``converter`` and its hooks wrapped for PC (see :func:`with_pc`)."""
    if any(isinstance(c, PCLinear.Config) for _, c, *_ in spec.model.traverse(Linear.Config)):
        raise ValueError("This config's model already has the PC layer; apply with_pc once.")
    model = converter.convert(copy.deepcopy(spec.model))
    return dataclasses.replace(
        spec,
        model=model,
        parallelize_fn=_with_pc_parallelize(spec.parallelize_fn, tuple(converter.converted)),
        post_optimizer_build_fn=with_pc_state(spec.post_optimizer_build_fn),
        state_dict_adapter=pc_state_dict_adapter(spec.state_dict_adapter)
        if spec.state_dict_adapter
        else None,
    )


def _with_pc_parallelize(parallelize_fn, expected: tuple[str, ...]):
    """``parallelize_fn`` wrapped by :func:`parallelize_with_pc` (idempotent: an already wrapped one is unwrapped)."""
    inner = getattr(parallelize_fn, "_pc_inner", parallelize_fn)

    def parallelize(model, **kwargs):
        return parallelize_with_pc(model, parallelize_fn=inner, expected=expected, **kwargs)

    parallelize._pc_inner = inner
    parallelize.__qualname__ = f"with_pc({getattr(inner, '__qualname__', '?')})"
    return parallelize


# -- Muon --------------------------------------------------------------------------------------------------------
def _meta_parameters(model_config) -> dict[str, tuple[int, ...]]:
    """Parameter FQN -> shape of ``model_config`` built on the meta device (PC raw weights as ``.weight``)."""
    with torch.device("meta"):
        model = model_config.build()
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _config_parameters(model_config) -> dict[str, tuple[int, ...]]:
    """What :func:`_meta_parameters` gives, read off the config tree, for models that do not build without a GPU
    (e.g. torchtitan's CUDA-only expert dispatchers): every ``Linear``'s weight and every expert stack."""
    from torchtitan.models.common.moe import GroupedExperts

    out = {
        f"{f}.weight": (c.out_features, c.in_features) for f, c, *_ in model_config.traverse(Linear.Config)
    }
    for fqn, cfg, *_ in model_config.traverse(GroupedExperts.Config):
        for name in ("w1_EFD", "w2_EDF", "w3_EFD"):
            out[f"{fqn}.{name}"] = (cfg.num_experts, 1, 1)
    return out


def _qkv_splits(model_config) -> dict[tuple[int, ...], list[str]]:
    """Fused ``wqkv`` module FQNs by their Muon row blocks: per KV group, its q heads, its k head, its v head.

    torchtitan's ``FusedQKVLinear`` stacks the rows as ``n_kv`` groups of ``(heads_per_kv + 2) * head_dim``:
    ``heads_per_kv`` query heads, then the group's key head and value head. Each of those is one contiguous row
    block, so Muon orthogonalizes them apart (GQA's q/k/v of one group; per head under MHA).
    """
    out: dict[tuple[int, ...], list[str]] = {}
    for fqn, cfg, *_ in model_config.traverse(FusedQKVLinear.Config):
        n_kv, hd = cfg.n_kv_heads, cfg.head_dim
        rows = cfg.wqkv.out_features
        hpk = cfg.n_heads // n_kv
        split = (hpk * hd, hd, hd) * n_kv
        if sum(split) != rows:
            raise ValueError(
                f"{fqn}.wqkv has {rows} rows, but n_kv_heads={n_kv}, n_heads={cfg.n_heads}, head_dim={hd} give "
                f"{sum(split)}: its layout is not torchtitan's FusedQKVLinear one. Pass with_muon(split_qkv=False)."
            )
        out.setdefault(split, []).append(f"{fqn}.wqkv" if fqn else "wqkv")
    return out


def _fqn_pattern(module_fqns: list[str]) -> str:
    """Parameter regex for the weights of these modules, searched in runtime FQNs (activation checkpointing and
    ``torch.compile`` insert wrapper names such as ``_checkpoint_wrapped_module`` after ``layers.<i>``)."""
    names = sorted({re.sub(r"^(.*\.)?layers\.\d+\.", "", f) for f in module_fqns})
    layers = sorted(
        {m.group(1) for f in module_fqns for m in [re.search(r"layers\.(\d+)\.", f)] if m}, key=int
    )
    tail = "|".join(re.escape(n) for n in names)
    prefix = f"layers\\.({'|'.join(layers)})\\.(.*\\.)?" if layers else "(^|\\.)"
    return param_pattern(f"{prefix}({tail})$")


def muon_param_groups(
    config: Trainer.Config,
    *,
    lr: float,
    adamw_lr: float | None = None,
    split_qkv: bool = True,
    experts: bool = True,
    **kwargs,
) -> list[ParamGroupConfig]:
    """torchtitan param groups for pcopt's Muon recipe on ``config``'s model, first match wins:

    1. fused ``wqkv``: Muon with ``split_sizes`` (see :func:`_qkv_splits`), one group per distinct layout;
    2. every other attention and FFN matrix (:data:`pcopt.names.ATTENTION_FFN_MODULES`: q/k/v, MLA's
       ``wq``/``wq_a``/``wq_b``/``wkv_a``/``wkv_b``, output, dense and shared-expert FFN): Muon;
    3. MoE routed-expert stacks ``(E, out, in)``: Muon per expert (``batched_weights=True``); gpt_oss's ``mlp1``
       per expert and per gate/up matrix (its rows interleave them: ``row_interleave=2``), its ``mlp2`` per expert;
    4. the rest (embeddings, LM head, norms, biases (gpt_oss's expert biases too), routers, PC's ``gamma``):
       AdamW at ``adamw_lr`` (default ``lr``, as the paper's "moonlight" scale makes them share it).

    Groups that would match no parameter of the model are left out (torchtitan requires every pattern to match).
    """
    try:
        params = _meta_parameters(config.model_spec.model)
    except (RuntimeError, AssertionError, ImportError) as e:  # a CUDA-only module: read the config instead
        logger.info(
            "with_muon: the model does not build on the meta device here (%s); groups from its config", e
        )
        params = _config_parameters(config.model_spec.model)
    muon = {"lr": lr, **muon_kwargs(), **kwargs}
    groups: list[ParamGroupConfig] = []
    claimed: set[str] = set()

    def add(pattern: str, optimizer: str, options: dict) -> None:
        hits = [n for n in params if n not in claimed and re.search(pattern, n)]
        if hits:
            groups.append(
                ParamGroupConfig(pattern=pattern, optimizer_name=optimizer, optimizer_kwargs=options)
            )
            claimed.update(hits)

    if split_qkv:
        splits = _qkv_splits(config.model_spec.model)
        for split, fqns in splits.items():
            # one layout for every layer (the stock configs): one pattern by name; else one per set of layers
            pattern = param_pattern(r"(^|\.)qkv_linear\.wqkv$") if len(splits) == 1 else _fqn_pattern(fqns)
            add(pattern, "Muon", {**muon, "split_sizes": list(split)})
    add(param_pattern(ATTENTION_FFN_MODULES), "Muon", muon)
    if experts:
        add(ROUTED_EXPERTS, "Muon", {**muon, "batched_weights": True})
        add(GPT_OSS_MLP1, "Muon", {**muon, "batched_weights": True, "row_interleave": 2})
        add(GPT_OSS_MLP2, "Muon", {**muon, "batched_weights": True})
    groups.append(
        ParamGroupConfig(
            pattern=r".*", optimizer_name="AdamW", optimizer_kwargs={"lr": adamw_lr or lr, **recipes.ADAMW}
        )
    )
    return groups


def _peak_lr(config: Trainer.Config) -> float | None:
    groups = getattr(config.optimizer, "param_groups", None) or []
    lrs = [g.optimizer_kwargs.get("lr") for g in groups if g.optimizer_kwargs.get("lr") is not None]
    return max(lrs) if lrs else getattr(config.optimizer, "lr", None)


def with_muon(
    config: Trainer.Config,
    *,
    lr: float | None = None,
    adamw_lr: float | None = None,
    split_qkv: bool = True,
    experts: bool = True,
    **muon_options,
) -> Trainer.Config:
    """``config`` with pcopt's Muon on the hidden matrices and AdamW on the rest (:func:`muon_param_groups`).

    Args:
        lr: Muon's peak lr (with the "moonlight" scale ``0.2 sqrt(max(A, B))`` it is AdamW-sized); None: the
            config's own peak lr.
        adamw_lr: the AdamW group's lr (default ``lr``).
        split_qkv: orthogonalize each q/k/v block of a fused ``wqkv`` apart (default); False: the fused matrix whole.
        experts: Muon per expert on MoE routed experts (default); False: AdamW on them.
        muon_options: more :class:`pcopt.optim.Muon` keywords for the Muon groups (e.g. ``ns_algorithm``).
    """
    config = copy.deepcopy(config)
    if lr is None:
        lr = _peak_lr(config)
        if lr is None:
            raise ValueError(
                "with_muon: the config's optimizer has no lr to inherit; pass with_muon(config, lr=...)."
            )
    _drop_fusing_overrides(config, "Muon")
    config = _pc_components(config)
    old = config.optimizer
    config.optimizer = dataclasses.replace(
        old,
        param_groups=muon_param_groups(
            config, lr=lr, adamw_lr=adamw_lr, split_qkv=split_qkv, experts=experts, **muon_options
        ),
    )
    return config


# -- stock configs by name ---------------------------------------------------------------------------------------
@functools.cache
def _registry(family: str):
    """``torchtitan.models.<family>.config_registry``, or the ImportError that stops it (e.g. a missing extra)."""
    try:
        return importlib.import_module(f"torchtitan.models.{family}.config_registry")
    except ImportError as e:  # qwen3_5 needs flash-linear-attention, kimi_k2_7 torchvision
        return e


def _stock_names(module) -> list[str]:
    return sorted(
        n
        for n, f in vars(module).items()
        if callable(f)
        and not n.startswith("_")
        and getattr(f, "__module__", None) == module.__name__
        and n[0].islower()
        and "Config" in str(getattr(f, "__annotations__", {}).get("return", ""))
    )


def _find_stock(name: str, asked: str | None = None):
    """``(family, function)`` of torchtitan's stock config function ``name``, without calling it."""
    unavailable = {}
    for family in FAMILIES:
        module = _registry(family)
        if isinstance(module, ImportError):
            unavailable[family] = module
            continue
        if name in _stock_names(module):
            return family, getattr(module, name)
    hint = "".join(f"; {f} does not import here ({e})" for f, e in unavailable.items())
    raise ValueError(_unknown(asked or name, f"no torchtitan family has a config function {name!r}{hint}"))


def stock_config(name: str) -> tuple[str, Trainer.Config]:
    """``(family, config)`` of torchtitan's stock config function ``name`` (searched in :data:`FAMILIES`)."""
    family, fn = _find_stock(name)
    return family, fn()


def _unknown(name: str, why: str) -> str:
    lines = [f"Unknown config {name!r}: {why}.", "Config names are <stock name><suffix>, with suffix one of:"]
    lines += [f"  {s:<10} {opt}{' + PC' if pc else ''}" for s, (opt, pc) in RECIPES.items()]
    lines.append("and stock names from torchtitan's families:")
    for family in FAMILIES:
        module = _registry(family)
        names = (
            f"(does not import: {module})"
            if isinstance(module, ImportError)
            else ", ".join(_stock_names(module))
        )
        lines.append(f"  {family}: {names}")
    lines.append("e.g. llama3_debugmodel_muon_pc, qwen3_debugmodel_adamw_pc, deepseek_v3_16b_muon; the paper's "
                 "Llama-2 configs: debug_muon_pc, llama2_1b_muon_pc, ...")  # fmt: skip
    return "\n".join(lines)


def recipe_config(name: str):
    """The zero-argument config function ``<stock name><suffix>`` (see :data:`RECIPES`); ValueError if unknown."""
    for suffix in sorted(RECIPES, key=len, reverse=True):
        if name.endswith(suffix) and len(name) > len(suffix):
            stock, (optimizer, pc) = name[: -len(suffix)], RECIPES[suffix]
            break
    else:
        raise ValueError(_unknown(name, "it ends in none of the recipe suffixes"))
    family, stock_fn = _find_stock(stock, name)  # fail now, with the list, not when torchtitan calls it

    def config() -> Trainer.Config:
        cfg = stock_fn()
        if optimizer == "muon":
            cfg = with_muon(cfg)
        if pc:
            cfg = with_pc(cfg)
        if not torch.cuda.is_available():
            cfg = for_cpu(cfg)
        logger.info(
            "config %s: torchtitan's %s.%s + %s%s", name, family, stock, optimizer, " + PC" if pc else ""
        )
        return cfg

    config.__name__ = config.__qualname__ = name
    config.__doc__ = f"torchtitan's ``{stock}`` with pcopt's {optimizer}{' and the PC layer' if pc else ''}."
    return config


# -- CPU ---------------------------------------------------------------------------------------------------------
CPU_SEQ_LEN, CPU_LOCAL_BATCH = 256, 2


def for_cpu(config: Trainer.Config, *, quiet: bool = False) -> Trainer.Config:
    """``config`` runnable on a 2-core CPU machine; every change is printed (unless ``quiet``).

    The stock debug configs name ``./tests/assets/tokenizer`` and ``c4_test``, which the torchtitan wheel does not
    ship: a missing tokenizer folder becomes the embedded one and a missing dataset the embedded text sample.
    Sequences are cut to 256 tokens and the local batch to 2, FlexAttention (no CPU backward) becomes dense-mask
    SDPA, fused optimizer kernels become foreach, the validator and CUDA graphs are off, and the SPMD backend is
    torchtitan's ``partial_dtensor`` (the only correct one on torch < 2.14). The model is not changed.
    """
    import os

    from torchtitan_ext.compat import TORCH_HAS_SPMD_FSDP
    from torchtitan_ext.cpu_attention import DENSE_ATTENTION_OVERRIDE
    from torchtitan_ext.data import TOKENIZER_DIR, register_datasets

    register_datasets()
    config = copy.deepcopy(config)
    changes = []

    def change(what: str, old, new) -> None:
        if old != new:
            changes.append(f"{what}: {old!r} -> {new!r}")

    if not os.path.isdir(config.hf_assets_path or ""):
        change("hf_assets_path", config.hf_assets_path, str(TOKENIZER_DIR))
        config.hf_assets_path = str(TOKENIZER_DIR)
    dataloader = config.dataloader
    if getattr(dataloader, "dataset", None) in ("c4_test", "c4", "c4_validation"):
        change("dataloader.dataset", dataloader.dataset, "kjv_sample")
        dataloader.dataset = "kjv_sample"
        dataloader.dataset_path = None
    t = config.training
    for field, cap in (("seq_len", CPU_SEQ_LEN), ("local_batch_size", CPU_LOCAL_BATCH)):
        if getattr(t, field) > cap:
            change(f"training.{field}", getattr(t, field), cap)
            setattr(t, field, cap)
    if t.global_batch_size not in (-1, None) and t.global_batch_size % t.local_batch_size:
        change("training.global_batch_size", t.global_batch_size, -1)
        t.global_batch_size = -1
    if not TORCH_HAS_SPMD_FSDP and config.parallelism.spmd_backend != "partial_dtensor":
        change("parallelism.spmd_backend", config.parallelism.spmd_backend, "partial_dtensor")
        config.parallelism.spmd_backend = "partial_dtensor"
    if getattr(config.optimizer, "implementation", None) == "fused":
        change("optimizer.implementation", "fused", "foreach")
        config.optimizer.implementation = "foreach"
    # torchtitan refuses EP's all-to-all dispatcher under them
    if not getattr(t, "disable_cuda_graphs", True):
        change("training.disable_cuda_graphs", False, True)
        t.disable_cuda_graphs = True
    if config.validator.enable:
        change("validator.enable", True, False)
        config.validator.enable = False
    if DENSE_ATTENTION_OVERRIDE not in config.override.imports:
        change("override.imports", "+", DENSE_ATTENTION_OVERRIDE)
        config.override.imports = [*config.override.imports, DENSE_ATTENTION_OVERRIDE]
    if changes and not quiet:
        logger.info("CPU run (no GPU): %s", "; ".join(changes))
    return config
