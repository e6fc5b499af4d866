"""Where and when the PC layer enters a torchtitan model.

1. **Config time** - :class:`PCConverter` (a torchtitan ``ModelConfigConverter``) swaps the
   ``Linear.Config`` of every target matrix (by default the attention output and the FFN matrices)
   for :class:`PCLinear.Config`, which carries the PC settings. Nothing is registered yet: torchtitan
   builds the model on the meta device and checks that every submodule follows its ``Module``
   protocol, which the containers of ``torch.nn.utils.parametrize`` do not.
2. **Parallelize time** - :func:`parallelize_llama_pc` wraps torchtitan's ``parallelize_llama``: it
   calls :meth:`PCLinear.attach` (``pcopt.precondition``) on every ``PCLinear`` first, i.e. before
   activation checkpointing, ``torch.compile`` and ``fully_shard``, so FSDP2 shards the raw weight
   ``parametrizations.weight.original`` and hands the parametrization the full weight in forward.
3. **Init time** - after ``to_empty``, torchtitan initialises each module's *direct* parameters from
   its ``param_init``. :meth:`PCLinear._init_self_parameters` applies the ``weight`` initialiser to
   ``parametrizations.weight.original`` instead (the same draw, in the same order, as the baseline's
   ``weight``), then ``pcopt.reset_preconditioners`` sets gamma to 1 and refreshes u, v.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from torchtitan.config import ParallelismConfig
from torchtitan.config.override import derive
from torchtitan.distributed import ParallelDims
from torchtitan.models.common.linear import Linear, ScaledBiasRowwiseLinear
from torchtitan.models.common.moe import GroupedExperts
from torchtitan.models.gpt_oss.moe import GptOssGroupedExperts
from torchtitan.models.llama3.parallelize import parallelize_llama
from torchtitan.protocols.model import ModelConfigConverter
from torchtitan.protocols.module import Module

import pcopt
from pcopt import PCOptions
from pcopt.names import EXPERT_STACK_TARGETS, PC_TARGETS
from torchtitan_ext.compat import check_spmd_backend, force_sum_reduction_on_gloo

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TARGETS",
    "EXPERT_STACKS",
    "PC_STRATEGIES",
    "PCConverter",
    "PCExperts",
    "PCGptOssGroupedExperts",
    "PCGroupedExperts",
    "PCLinear",
    "PCScaledBiasRowwiseLinear",
    "attach_pc_state",
    "canonical_strategy",
    "parallelize_llama_pc",
    "parallelize_with_pc",
    "with_pc_state",
]

PC_STRATEGIES = ("auto", *pcopt.STRATEGIES)
"""How PC executes in a torchtitan run: pcopt's strategies (``"once_per_step"``, ``"per_forward"``), or ``"auto"``
(once per step wherever it is exact: not under pipeline parallelism)."""

_OLD_NAMES = {"sharded": "once_per_step", "parametrize": "per_forward"}  # torchtitan_ext 0.2's mode names
PC_MODES = (*PC_STRATEGIES, *_OLD_NAMES)  # accepted for one release


def canonical_strategy(name: str) -> str:
    """pcopt's name for a PC strategy; the 0.2 names ``"sharded"``/``"parametrize"`` work with a warning."""
    if name in _OLD_NAMES:
        new = _OLD_NAMES[name]
        warnings.warn(
            f"PC mode {name!r} is now called {new!r} (pcopt's strategy names); the old name goes in the next "
            "release.",
            DeprecationWarning,
            stacklevel=3,
        )
        return new
    if name not in PC_STRATEGIES:
        raise ValueError(
            f"PC strategy must be one of {list(PC_STRATEGIES)}, got {name!r}. 'once_per_step' computes W_eff once "
            "per optimizer step on the FSDP2 shards, 'per_forward' in every forward, 'auto' picks once per step "
            "unless pipeline parallelism needs per forward."
        )
    return name


def _options(c) -> PCOptions:
    """The validated :class:`pcopt.PCOptions` of a config carrying the PC fields (pcopt's own messages)."""
    return PCOptions(
        degree=c.degree, num_power_iterations=c.num_power_iterations, learn_gamma=c.learn_gamma, eps=c.eps
    )


DEFAULT_TARGETS = f"{PC_TARGETS}|{EXPERT_STACK_TARGETS}"
""":class:`PCConverter`'s default: the paper's matrices (attention output, dense and shared-expert FFN) and the
routed experts' stacks (``moe.routed_experts.inner_experts``: ``w1_EFD``, ``w2_EDF``, ``w3_EFD``, per expert)."""

EXPERT_STACKS = ("w1_EFD", "w2_EDF", "w3_EFD")
"""The 3-D parameters of torchtitan's ``GroupedExperts`` that get PC, one state per expert matrix."""


def _require_pc(module, name: str, what: str) -> None:
    """A converted module must have its PC layer by its first forward: never train it without PC silently."""
    if module.__dict__.get("_pc_checked", False):
        return
    if not pcopt.is_preconditioned(module, name):
        raise RuntimeError(
            f"This {type(module).__name__} ({what}) reached its forward without the PC layer: its model was "
            "converted by PCConverter, but nothing attached PC before parallelizing it, so it would train "
            "without PC. Build the run with torchtitan_ext.with_pc(config) (or a torchtitan_ext config such as "
            "<stock name>_muon_pc), which wraps the model spec's parallelize_fn; outside torchtitan, call "
            f"{type(module).__name__}.attach() on every converted module before fully_shard."
        )
    module._pc_checked = True


def _pc_config(base: type) -> type:
    """The config of a PC module: torchtitan's ``base`` config plus the PC settings."""

    @dataclass(kw_only=True, slots=True)
    class Config(base):
        degree: int = 9
        """Degree of the PC polynomial (3, 5, 7 or 9; the paper: 9 with AdamW, 5 with Muon)."""

        num_power_iterations: int = 10
        """Warm-started power iterations per refresh of the sigma estimate."""

        learn_gamma: bool = True
        """Train the per-matrix scale gamma."""

        eps: float = 1e-7
        """Added to the sigma estimate."""

        pc_mode: str = "auto"
        """How PC executes: ``"per_forward"`` (the map in every forward), ``"once_per_step"`` (``W_eff`` once per
        optimizer step on the FSDP2 shards, :mod:`pcopt.strategy`) or ``"auto"`` (once per step unless pipeline
        parallel; see :class:`PCConverter.Config`)."""

    return Config


class PCLinear(Linear):
    """A torchtitan ``Linear`` whose weight gets the PC layer before parallelization."""

    Config = _pc_config(Linear.Config)

    def __init__(self, config: Config):
        super().__init__(config)
        self._pc_config = config

    def forward(self, x):
        _require_pc(self, "weight", f"{self.in_features} -> {self.out_features}")
        return super().forward(x)

    def attach(self) -> None:
        """Register the PC parametrization on ``weight`` (idempotent). Must precede ``fully_shard``."""
        if pcopt.is_preconditioned(self):
            return
        pcopt.precondition(self, "weight", options=_options(self._pc_config))

    def _init_self_parameters(self) -> None:
        if not pcopt.is_preconditioned(self):
            Linear._init_self_parameters(self)
            return
        if self._param_init is None or "weight" not in self._param_init:
            raise ValueError(
                f"{type(self).__name__} needs a param_init with a 'weight' initialiser (got "
                f"{self._param_init!r}); the PC layer initialises the raw weight from it."
            )
        # The raw weight gets exactly the draw the baseline's plain ``weight`` gets.
        self._param_init["weight"](self.parametrizations.weight.original)
        for name, param in self.named_parameters(recurse=False):  # e.g. a bias
            if name == "weight":  # once per step: W_eff, written from the raw weight below (no RNG draw)
                continue
            self._init_param(name, param)
        pcopt.reset_preconditioners(self)


class PCScaledBiasRowwiseLinear(PCLinear):
    """torchtitan's ``ScaledBiasRowwiseLinear`` (a row-wise ``Linear`` whose bias is divided by the TP degree in
    forward: gpt_oss's and Kimi's attention output) with the PC layer on its weight; the bias is untouched."""

    @dataclass(kw_only=True, slots=True)
    class Config(PCLinear.Config):
        pass

    def __init__(self, config: Config):
        super().__init__(config)
        self.tp_degree = 1

    def parallelize(self, parallel_dims) -> None:
        self.tp_degree = parallel_dims.tp
        super().parallelize(parallel_dims)

    def forward(self, x):
        _require_pc(self, "weight", f"{self.in_features} -> {self.out_features}")
        return ScaledBiasRowwiseLinear.forward(self, x)


_PC_LINEAR_CONFIGS = {
    Linear.Config: PCLinear.Config,
    ScaledBiasRowwiseLinear.Config: PCScaledBiasRowwiseLinear.Config,
}
"""The Linear configs the PC layer takes, and their PC counterparts (same fields plus the PC settings)."""


class PCExperts:
    """The PC layer on a MoE block's routed-expert stacks ``(E, out, in)``, one state per expert matrix (a mixin
    before torchtitan's experts class: :class:`PCGroupedExperts`, :class:`PCGptOssGroupedExperts`).

    Each expert matrix has its own ``gamma``, ``u``, ``v`` (batched: ``gamma (E,)``, ``u (E, out)``), the paper's
    per-matrix rule applied to every matrix of the stack; a stack whose rows interleave ``k`` matrices (gpt_oss's
    gate/up) has one per expert and matrix (``gamma (E, k)``). Attached before parallelization like
    :class:`PCLinear`; once per step, expert parallelism and FSDP2 shard ``W_eff`` and the raw stack alike.
    """

    PC_STACKS: dict[str, int] = {}
    """The stacks that get PC -> how many matrices their rows interleave (``row_interleave``)."""

    def __init__(self, config):
        super().__init__(config)
        self._pc_config = config
        self._init_order = [n for n, _ in self.named_parameters(recurse=False)]  # the baseline's init order

    def forward(self, x_RD, num_tokens_per_expert_E):
        _require_pc(self, next(iter(self.PC_STACKS)), f"{self.num_experts} routed experts")
        return super().forward(x_RD, num_tokens_per_expert_E)

    def attach(self) -> None:
        """Register the PC layer on the stacks of :attr:`PC_STACKS` (idempotent). Must precede parallelization."""
        for name, k in self.PC_STACKS.items():
            if not pcopt.is_preconditioned(self, name):
                pcopt.precondition(self, name, options=_options(self._pc_config), row_interleave=k)

    def _init_self_parameters(self) -> None:
        if not pcopt.is_preconditioned(self, next(iter(self.PC_STACKS))):
            super()._init_self_parameters()
            return
        # the baseline's draws in its order, the PC stacks' into their raw stacks
        for name in self._init_order:
            param = self.parametrizations[name].original if name in self.PC_STACKS else self._parameters[name]
            self._init_param(name, param)
        pcopt.reset_preconditioners(self)


class PCGroupedExperts(PCExperts, GroupedExperts):
    """torchtitan's routed-expert stacks with the PC layer on ``w1_EFD``, ``w2_EDF``, ``w3_EFD`` (:class:`PCExperts`)."""

    PC_STACKS = dict.fromkeys(EXPERT_STACKS, 1)
    Config = _pc_config(GroupedExperts.Config)


class PCGptOssGroupedExperts(PCExperts, GptOssGroupedExperts):
    """gpt_oss's routed experts with the PC layer on ``mlp1_weight_EGD`` ``(E, 2F, D)``, whose rows alternate gate
    (``0::2``) and up (``1::2``): a state per expert and per gate/up matrix (``row_interleave=2``), and on
    ``mlp2_weight_EDF`` per expert. The biases are untouched (:class:`PCExperts`)."""

    PC_STACKS = {"mlp1_weight_EGD": 2, "mlp2_weight_EDF": 1}
    Config = _pc_config(GptOssGroupedExperts.Config)


_PC_EXPERTS = {GroupedExperts.Config: PCGroupedExperts, GptOssGroupedExperts.Config: PCGptOssGroupedExperts}
"""The routed-expert configs the PC layer takes -> their PC module classes (whose ``Config`` replaces them)."""


class PCConverter(ModelConfigConverter):
    """Swap target ``Linear`` configs for :class:`PCLinear` configs (see the module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(ModelConfigConverter.Config):
        targets: str = DEFAULT_TARGETS
        """Regex searched in module FQNs (e.g. ``layers.3.feed_forward.w1``, ``layers.3.moe.routed_experts
        .inner_experts``) selecting the PC ``Linear`` layers and expert stacks (default :data:`DEFAULT_TARGETS`:
        attention output, dense and shared-expert FFN as in the paper, and the routed experts)."""

        degree: int = 9
        num_power_iterations: int = 10
        learn_gamma: bool = True
        eps: float = 1e-7
        mode: str = "auto"
        """How PC executes (pcopt's strategy names). ``"once_per_step"``: ``W_eff`` is computed once per optimizer
        step on the FSDP2 shards and the model's forward sees a plain Linear (:mod:`pcopt.strategy`; one device,
        FSDP2, HSDP, FSDP x TP). ``"per_forward"``: the PC map runs in every micro-batch forward (the reference
        semantics; also under pipeline parallelism). ``"auto"`` (default): once per step wherever it is exact,
        i.e. without pipeline parallelism, else per forward. The 0.2 names ``"sharded"``/``"parametrize"`` are
        accepted for one release."""

    def __init__(self, config: Config, **kwargs):
        try:
            self.pattern = re.compile(config.targets)
        except re.error as e:
            raise ValueError(f"PC targets {config.targets!r} is not a valid regex: {e}") from None
        self.options = _options(config)
        config.mode = canonical_strategy(config.mode)
        self.config = config
        self.converted: list[str] = []
        self.skipped: list[str] = []  # matched expert stacks of a layout PC does not take (logged)

    def convert(self, model_config: Module.Config) -> Module.Config:
        c = self.config
        pc_fields = dict(
            degree=c.degree, num_power_iterations=c.num_power_iterations, learn_gamma=c.learn_gamma, eps=c.eps,
            pc_mode=c.mode,
        )  # fmt: skip
        linears = list(model_config.traverse(Linear.Config))
        stacks = list(model_config.traverse(GroupedExperts.Config))
        matched = n_stacks = 0
        for fqn, cfg, parent, attr in [*linears, *stacks]:
            if not self.pattern.search(fqn):
                continue
            if isinstance(cfg, (PCLinear.Config, *(m.Config for m in _PC_EXPERTS.values()))):
                raise ValueError(f"{fqn} already has the PC layer; apply PCConverter once.")
            if isinstance(cfg, GroupedExperts.Config):
                if type(cfg) not in _PC_EXPERTS:  # an experts class of another layout
                    self.skipped.append(f"{fqn} ({type(cfg).__qualname__})")
                    continue
                target = _PC_EXPERTS[type(cfg)]
                names = list(target.PC_STACKS)
                missing = [n for n in names if cfg.param_init is None or n not in cfg.param_init]
                if missing:
                    raise ValueError(
                        f"PC target {fqn} has no param_init for {missing}; set it so the raw stacks are initialised."
                    )
                new = derive(cfg, target.Config, **pc_fields)
                n_stacks += len(names)
            else:
                if type(cfg) not in _PC_LINEAR_CONFIGS:
                    raise ValueError(
                        f"PC target {fqn} is a {type(cfg).__qualname__}, but the PC layer supports torchtitan's "
                        f"{', '.join(c.__qualname__.removesuffix('.Config') for c in _PC_LINEAR_CONFIGS)} layers and "
                        "GroupedExperts stacks only. Narrow the targets regex or drop the other converter."
                    )
                if cfg.param_init is None or "weight" not in cfg.param_init:
                    raise ValueError(
                        f"PC target {fqn} has no param_init['weight']; set it so the raw weight is initialised."
                    )
                new = derive(cfg, _PC_LINEAR_CONFIGS[type(cfg)], **pc_fields)
            if parent is None:
                model_config = new
            elif isinstance(parent, list):
                parent[attr] = new
            else:
                setattr(parent, attr, new)
            matched += 1
            self.converted.append(fqn)
        if matched == 0:
            available = [fqn for fqn, *_ in [*linears, *stacks]]
            what = "Linear layer or expert stack" if stacks else "Linear layer"
            raise ValueError(
                f"PC targets {c.targets!r} matched no {what} of the model. Its {len(available)} Linear layers"
                f"{' and expert stacks' if stacks else ''}: {_abbreviate(available)}. Fix the regex (it is "
                "searched in these module FQNs)."
            )
        n_modules = sum(f in self.converted for f, *_ in stacks)
        logger.info(
            "PC layer (%s) will be applied to %d modules matching %r (%d Linear layers, %d expert modules: %d "
            "stacks, state per expert matrix)%s",
            self.options, matched, c.targets, matched - n_modules, n_modules, n_stacks,
            f"; without PC: {len(self.skipped)} expert modules {_abbreviate(self.skipped)} (a layout the PC layer "
            "does not take)" if self.skipped else "",
        )  # fmt: skip
        return model_config


def _abbreviate(fqns: list[str]) -> str:
    """FQNs with their layer index folded (``layers.*.attention.wo``), each distinct name once."""
    seen: dict[str, None] = {}
    for f in fqns:
        seen.setdefault(re.sub(r"(^|\.)layers\.\d+\.", r"\1layers.*.", f), None)
    return ", ".join(seen)


def attach_pc_state(optimizers, model_parts, parallel_dims) -> None:
    """torchtitan's ``post_optimizer_build_fn``: the model's :class:`pcopt.PCState` joins the optimizers.

    Runs once the model is initialised (``to_empty`` + ``init_weights``: :class:`PCLinear` initialises its raw
    weight, resets the PC state and, once per step, writes ``W_eff``) and the optimizers are built. The state
    is attached to the optimizers container: ``after_step`` (refresh; ``W_eff``) follows every step of all its
    optimizers, after SPECTRA's clip. :class:`torchtitan_ext.trainer.PCTrainer` calls ``after_backward``.
    """
    if not any(pcopt.preconditioners(m) for m in model_parts):
        return
    state = pcopt.PCState(
        model_parts, num_power_iterations=getattr(optimizers, "pc_refresh_iterations", None)
    )
    state.attach(optimizers)
    logger.info("PC state attached to the optimizers: %s", state)


def with_pc_state(post_optimizer_build_fn: Callable | None) -> Callable:
    """A ``post_optimizer_build_fn`` that runs a model family's own one (e.g. torchtitan's MoE load-balancing hook)
    and then :func:`attach_pc_state`."""
    if post_optimizer_build_fn is None:
        return attach_pc_state
    if (
        getattr(post_optimizer_build_fn, "_pc_inner", None) is not None
        or post_optimizer_build_fn is attach_pc_state
    ):
        return post_optimizer_build_fn

    def post_optimizer_build(optimizers, model_parts, parallel_dims) -> None:
        post_optimizer_build_fn(optimizers, model_parts, parallel_dims)
        attach_pc_state(optimizers, model_parts, parallel_dims)

    post_optimizer_build._pc_inner = post_optimizer_build_fn
    post_optimizer_build.__qualname__ = (
        f"with_pc_state({getattr(post_optimizer_build_fn, '__qualname__', '?')})"
    )
    return post_optimizer_build


@contextlib.contextmanager
def _shard_larger_dim(placement_fn):
    """Make torchtitan's ``fully_shard`` calls shard each PC matrix on its larger dim (other params: Shard(0)).

    torchtitan's ``apply_fsdp_to_decoder`` exposes no ``shard_placement_fn`` for dense blocks, so its module
    global is wrapped for the duration of the call.
    """
    import torchtitan.distributed.fsdp as tt_fsdp

    original = tt_fsdp.fully_shard

    def fully_shard(module, *args, **kwargs):
        theirs = kwargs.get("shard_placement_fn")
        if theirs is None:
            kwargs["shard_placement_fn"] = placement_fn
        else:  # a MoE block's own placement (experts on the EP mesh): PC matrices first, the rest as torchtitan says

            def composed(param, _ours=placement_fn, _theirs=theirs):
                ours, result = _ours(param), _theirs(param)
                if ours is None:
                    return result
                # a per-parameter mesh (EP > 1): ours on the mesh torchtitan chose
                if hasattr(result, "mesh_info"):
                    return dataclasses.replace(result, placement=ours)
                return ours

            kwargs["shard_placement_fn"] = composed
        return original(module, *args, **kwargs)

    tt_fsdp.fully_shard = fully_shard
    try:
        yield
    finally:
        tt_fsdp.fully_shard = original


def attach_pc(model) -> list[str]:
    """Register the PC layer on every :class:`PCLinear` and :class:`PCGroupedExperts` of ``model``; returns their
    FQNs."""
    fqns = []
    for fqn, module in model.named_modules():
        if isinstance(module, (PCLinear, PCExperts)):
            module.attach()
            fqns.append(fqn)
    return fqns


def _skipped_report(model) -> str:
    """What the PC targets leave out of a model, and why (one clause per kind)."""
    experts = [n for n, p in model.named_parameters() if p.ndim == 3 and ".parametrizations." not in n]
    parts = []
    if experts:
        parts.append(f"{len(experts)} MoE expert stacks ({_abbreviate(experts)}: not in the PC targets)")
    parts.append("q/k/v, embeddings, LM head, routers and norms (the paper's rule)")
    return "; ".join(parts)


# torch._dynamo.config.recompile_limit's default: the recompilations dynamo allows one code object
_STOCK_RECOMPILE_LIMIT = 8


def allow_per_block_recompiles(model, compile_config) -> int | None:
    """Raise dynamo's ``recompile_limit`` so that torchtitan's per-block compile of a per-forward PC model fits.

    ``parametrize`` gives every PC module its own class and dynamo guards on it, so each TransformerBlock that
    torchtitan compiles (``fullgraph=True``) is one more compilation of the same code; past the limit (8 by default)
    the compile fails with ``FailOnRecompileLimitHit``. The limit becomes the number of blocks plus the stock limit
    (what one block's own recompilations, e.g. a change of shapes, may use). Returns the new limit, or None where
    compile is off (``compile_config.enable`` with ``"model"`` in ``components``, as torchtitan's parallelize
    functions read it) or the limit already suffices. Once per step needs none of this: its blocks hold plain
    Linears, one compilation for all."""
    import torch._dynamo

    if compile_config is None or not (compile_config.enable and "model" in compile_config.components):
        return None
    n_blocks = len(getattr(model, "layers", ()))
    config = torch._dynamo.config
    needed = n_blocks + _STOCK_RECOMPILE_LIMIT
    if config.recompile_limit >= needed:
        return None
    config.recompile_limit = needed
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, needed)
    logger.info(
        "PC per forward with --compile.enable: torch._dynamo.config.recompile_limit raised to %d (%d blocks + %d): "
        "parametrize gives every PC module its own class, so dynamo compiles each TransformerBlock once; past "
        "the limit torchtitan's fullgraph block compile fails with FailOnRecompileLimitHit",
        needed, n_blocks, needed - n_blocks,
    )  # fmt: skip
    return needed


def parallelize_with_pc(
    model,
    *,
    parallelize_fn: Callable,
    expected: tuple[str, ...] = (),
    parallel_dims: ParallelDims,
    parallelism: ParallelismConfig,
    **kwargs,
):
    """``parallelize_fn`` (a model family's own plan: TP, EP, AC, compile, FSDP2) with the PC layer attached first.

    Attaches PC to every :class:`PCLinear`, chooses the strategy (``"auto"``: once per step unless pipeline
    parallel), runs ``parallelize_fn`` with each PC matrix sharded on its larger dim, fixes gloo's reductions, and
    logs what got PC and what did not. ``expected`` are the FQNs the converter turned into ``PCLinear`` configs:
    one that is not a ``PCLinear`` any more (an override replaced its module) is an error, not a silent skip.
    """
    check_spmd_backend(parallelism.spmd_backend)
    kwargs = dict(parallel_dims=parallel_dims, parallelism=parallelism, **kwargs)
    pc_modules = {fqn: m for fqn, m in model.named_modules() if isinstance(m, (PCLinear, PCExperts))}
    lost = [f for f in expected if not any(k == f or k.endswith("." + f) for k in pc_modules)]
    if lost:
        raise RuntimeError(
            f"{len(lost)} PC targets are no PCLinear in the built model ({_abbreviate(lost)}): something replaced "
            "their modules after the PC conversion (e.g. an --override.imports such as "
            "torchtitan.overrides.fused_swiglu fuses w1/w3 into one parameter). Drop that override for a PC run, "
            "or narrow the PC targets to modules that stay Linear."
        )
    modes = {m._pc_config.pc_mode for m in pc_modules.values()}
    if modes:
        if parallelism.spmd_backend != "partial_dtensor":
            raise ValueError(
                f"The PC layer needs parallelism.spmd_backend='partial_dtensor' (got "
                f"{parallelism.spmd_backend!r}): its parametrization must receive the full, unsharded "
                "weight, which FSDP2 hands it only on that backend. Pass --parallelism.spmd_backend "
                "partial_dtensor."
            )
        if parallel_dims.cp_enabled or (parallel_dims.tp_enabled and modes & {"per_forward"}):
            raise ValueError(
                f"The PC layer runs under data parallelism (FSDP2/HSDP), tensor parallelism with PC once per step "
                f"(strategy 'auto' or 'once_per_step') and pipeline parallelism per forward; got "
                f"tensor_parallel_degree={parallel_dims.tp}, context_parallel_degree={parallel_dims.cp}, PC "
                f"strategy {sorted(modes)}. Set context_parallel_degree to 1, and use once per step (a _pc config, "
                "not _per_forward) with tensor parallelism."
            )
        if (
            parallel_dims.ep_enabled
            and modes & {"per_forward"}
            and any(isinstance(m, PCExperts) for m in pc_modules.values())
        ):
            raise ValueError(
                f"PC per forward maps a whole weight in every forward, but expert parallelism (degree "
                f"{parallel_dims.ep}) leaves each rank its own experts only. Use PC once per step (strategy 'auto' "
                "or 'once_per_step', the _pc configs), or set expert_parallel_degree to 1."
            )
        if len(modes) > 1:
            raise ValueError(
                f"All PC layers of a model run in one strategy, got {sorted(modes)}; set one PCConverter mode."
            )
        for module in pc_modules.values():
            module.attach()
    mode = next(iter(modes), None)
    if mode == "auto":  # once per step wherever it is exact: not under pipeline parallelism
        mode = "per_forward" if parallel_dims.pp_enabled else "once_per_step"
    if mode == "once_per_step" and parallel_dims.pp_enabled:
        raise ValueError(
            "PC once per step supports FSDP2/HSDP/TP without pipeline parallelism; set "
            "pipeline_parallel_degree to 1 or use PCConverter.Config(mode='per_forward') (or 'auto')."
        )
    if mode is not None:
        n_modules = sum(isinstance(m, PCExperts) for m in pc_modules.values())
        n_stacks = sum(len(m.PC_STACKS) for m in pc_modules.values() if isinstance(m, PCExperts))
        logger.info(
            "PC layer on %d matrices%s, %s%s: %s. Without PC: %s",
            len(pc_modules) - n_modules,
            f" and {n_stacks} expert stacks (state per expert matrix)" if n_stacks else "",
            mode,
            " (FSDP2 shards)" if mode == "once_per_step" else "",
            _abbreviate(list(pc_modules)),
            _skipped_report(model),
        )
    if mode == "once_per_step":

        def shard(m, placement_fn):
            with _shard_larger_dim(placement_fn):
                parallelize_fn(m, **kwargs)

        pcopt.set_strategy(model, "once_per_step", shard=shard)
    else:
        if mode == "per_forward":
            allow_per_block_recompiles(model, kwargs.get("compile_config"))
        model = parallelize_fn(model, **kwargs)
    n = force_sum_reduction_on_gloo(model)
    if n:
        logger.info("gloo: FSDP2 gradient reductions use SUM on %d modules", n)
    return model


def parallelize_llama_pc(model, **kwargs):
    """torchtitan's ``parallelize_llama`` with the PC layer attached first (:func:`parallelize_with_pc`)."""
    return parallelize_with_pc(model, parallelize_fn=parallelize_llama, **kwargs)
