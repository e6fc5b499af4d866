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
import logging
import re
from dataclasses import dataclass

from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
from torchtitan.config.override import derive
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import ActivationCheckpointingConfig
from torchtitan.models.common.linear import Linear
from torchtitan.models.llama3.parallelize import parallelize_llama
from torchtitan.protocols.model import ModelConfigConverter
from torchtitan.protocols.module import Module

import pcopt
from pcopt import PCOptions
from pcopt.names import PC_TARGETS
from torchtitan_ext.compat import check_spmd_backend, force_sum_reduction_on_gloo

logger = logging.getLogger(__name__)

__all__ = ["PC_MODES", "PCConverter", "PCLinear", "attach_pc_state", "parallelize_llama_pc"]

PC_MODES = ("auto", "parametrize", "sharded")


def _options(c) -> PCOptions:
    """The validated :class:`pcopt.PCOptions` of a config carrying the PC fields (pcopt's own messages)."""
    return PCOptions(
        degree=c.degree, num_power_iterations=c.num_power_iterations, learn_gamma=c.learn_gamma, eps=c.eps
    )


class PCLinear(Linear):
    """A torchtitan ``Linear`` whose weight gets the PC layer before parallelization."""

    @dataclass(kw_only=True, slots=True)
    class Config(Linear.Config):
        degree: int = 9
        """Degree of the PC polynomial (3, 5, 7 or 9; the paper: 9 with AdamW, 5 with Muon)."""

        num_power_iterations: int = 10
        """Warm-started power iterations per refresh of the sigma estimate."""

        learn_gamma: bool = True
        """Train the per-matrix scale gamma."""

        eps: float = 1e-7
        """Added to the sigma estimate."""

        pc_mode: str = "auto"
        """How PC executes: ``"parametrize"`` (the map in every forward), ``"sharded"`` (``W_eff`` once per
        optimizer step on the FSDP2 shards: pcopt's once-per-step strategy, :mod:`pcopt.strategy`) or
        ``"auto"`` (``"sharded"`` unless pipeline parallel; see :class:`PCConverter.Config`)."""

    def __init__(self, config: Config):
        super().__init__(config)
        self._pc_config = config

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


class PCConverter(ModelConfigConverter):
    """Swap target ``Linear`` configs for :class:`PCLinear` configs (see the module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(ModelConfigConverter.Config):
        targets: str = PC_TARGETS
        """Regex searched in module FQNs (e.g. ``layers.3.feed_forward.w1``) selecting the PC matrices
        (default :data:`pcopt.names.PC_TARGETS`: attention output and FFN, as in the paper)."""

        degree: int = 9
        num_power_iterations: int = 10
        learn_gamma: bool = True
        eps: float = 1e-7
        mode: str = "auto"
        """How PC executes. ``"sharded"``: ``W_eff`` is computed once per optimizer step on the FSDP2 shards and
        the model's forward sees a plain Linear (pcopt's once-per-step strategy, :mod:`pcopt.strategy`; one
        device, FSDP2, HSDP). ``"parametrize"``: the PC map runs in every micro-batch forward (the reference
        semantics; also under pipeline parallelism). ``"auto"`` (default): ``"sharded"`` wherever it is exact,
        i.e. without pipeline parallelism, else ``"parametrize"``."""

    def __init__(self, config: Config, **kwargs):
        try:
            self.pattern = re.compile(config.targets)
        except re.error as e:
            raise ValueError(f"PC targets {config.targets!r} is not a valid regex: {e}") from None
        self.options = _options(config)
        if config.mode not in PC_MODES:
            raise ValueError(
                f"PC mode must be one of {list(PC_MODES)}, got {config.mode!r}. Set PCConverter.Config(mode=...)."
            )
        self.config = config

    def convert(self, model_config: Module.Config) -> Module.Config:
        c = self.config
        linears = list(model_config.traverse(Linear.Config))
        matched = 0
        for fqn, cfg, parent, attr in linears:
            if not self.pattern.search(fqn):
                continue
            if isinstance(cfg, PCLinear.Config):
                raise ValueError(f"{fqn} already has the PC layer; apply PCConverter once.")
            if type(cfg) is not Linear.Config:
                raise ValueError(
                    f"PC target {fqn} is a {type(cfg).__qualname__}, but the PC layer supports plain "
                    "torchtitan Linear layers only. Narrow the targets regex or drop the other converter."
                )
            if cfg.param_init is None or "weight" not in cfg.param_init:
                raise ValueError(
                    f"PC target {fqn} has no param_init['weight']; set it so the raw weight is initialised."
                )
            new = derive(
                cfg,
                PCLinear.Config,
                degree=c.degree,
                num_power_iterations=c.num_power_iterations,
                learn_gamma=c.learn_gamma,
                eps=c.eps,
                pc_mode=c.mode,
            )
            if parent is None:
                model_config = new
            elif isinstance(parent, list):
                parent[attr] = new
            else:
                setattr(parent, attr, new)
            matched += 1
        if matched == 0:
            available = [fqn for fqn, *_ in linears]
            raise ValueError(
                f"PC targets {c.targets!r} matched no Linear layer of the model. Linear layers: "
                f"{available[:12]}{' ...' if len(available) > 12 else ''}. Fix the regex (it is searched in "
                "these module FQNs)."
            )
        logger.info(
            "PC layer (%s) will be applied to %d matrices matching %r", self.options, matched, c.targets
        )
        return model_config


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


@contextlib.contextmanager
def _shard_larger_dim(placement_fn):
    """Make torchtitan's ``fully_shard`` calls shard each PC matrix on its larger dim (other params: Shard(0)).

    torchtitan's ``apply_fsdp_to_decoder`` exposes no ``shard_placement_fn`` for dense blocks, so its module
    global is wrapped for the duration of the call.
    """
    import torchtitan.distributed.fsdp as tt_fsdp

    original = tt_fsdp.fully_shard

    def fully_shard(module, *args, **kwargs):
        kwargs.setdefault("shard_placement_fn", placement_fn)
        return original(module, *args, **kwargs)

    tt_fsdp.fully_shard = fully_shard
    try:
        yield
    finally:
        tt_fsdp.fully_shard = original


def attach_pc(model) -> list[str]:
    """Register the PC layer on every :class:`PCLinear` of ``model``; returns their FQNs."""
    fqns = []
    for fqn, module in model.named_modules():
        if isinstance(module, PCLinear):
            module.attach()
            fqns.append(fqn)
    return fqns


def parallelize_llama_pc(
    model,
    *,
    parallel_dims: ParallelDims,
    training: TrainingConfig,
    parallelism: ParallelismConfig,
    compile_config: CompileConfig,
    ac_config: ActivationCheckpointingConfig,
    dump_folder: str,
):
    """torchtitan's ``parallelize_llama`` with the PC layer attached first and gloo reductions fixed."""
    check_spmd_backend(parallelism.spmd_backend)
    modes = {m._pc_config.pc_mode for m in model.modules() if isinstance(m, PCLinear)}
    if modes:
        if parallelism.spmd_backend != "partial_dtensor":
            raise ValueError(
                f"The PC layer needs parallelism.spmd_backend='partial_dtensor' (got "
                f"{parallelism.spmd_backend!r}): its parametrization must receive the full, unsharded "
                "weight, which FSDP2 hands it only on that backend. Pass --parallelism.spmd_backend "
                "partial_dtensor."
            )
        if parallel_dims.cp_enabled or (parallel_dims.tp_enabled and modes & {"parametrize"}):
            raise ValueError(
                f"The PC layer runs under data parallelism (FSDP2/HSDP), tensor parallelism with PC once per step "
                f"(mode 'auto' or 'sharded') and pipeline parallelism per forward; got "
                f"tensor_parallel_degree={parallel_dims.tp}, context_parallel_degree={parallel_dims.cp}, PC mode "
                f"{sorted(modes)}. Set context_parallel_degree to 1, and use a _pc config (not _per_forward) "
                "with tensor parallelism."
            )
        fqns = attach_pc(model)
        logger.info("PC layer attached to %d matrices before FSDP: %s ...", len(fqns), fqns[:4])
    kwargs = dict(
        parallel_dims=parallel_dims,
        training=training,
        parallelism=parallelism,
        compile_config=compile_config,
        ac_config=ac_config,
        dump_folder=dump_folder,
    )
    if len(modes) > 1:
        raise ValueError(
            f"All PC layers of a model run in one mode, got {sorted(modes)}; set one PCConverter mode."
        )
    mode = next(iter(modes), "parametrize")
    if mode == "auto":  # once per step wherever it is exact: not under pipeline parallelism
        mode = "parametrize" if parallel_dims.pp_enabled else "sharded"
        logger.info("PC mode 'auto' -> %r (pipeline parallel: %s)", mode, parallel_dims.pp_enabled)
    if mode == "sharded":
        if parallel_dims.pp_enabled:
            raise ValueError(
                "PC mode 'sharded' supports FSDP2/HSDP without pipeline parallelism; set "
                "pipeline_parallel_degree to 1 or use PCConverter.Config(mode='parametrize') (or 'auto')."
            )

        def shard(m, placement_fn):
            with _shard_larger_dim(placement_fn):
                parallelize_llama(m, **kwargs)

        pcopt.set_strategy(model, "once_per_step", shard=shard)
        logger.info(
            "PC layer once per step on the FSDP2 shards: %d weights", len(pcopt.preconditioners(model))
        )
    else:
        model = parallelize_llama(model, **kwargs)
    n = force_sum_reduction_on_gloo(model)
    if n:
        logger.info("gloo: FSDP2 gradient reductions use SUM on %d modules", n)
    return model
