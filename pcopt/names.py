"""Module-name patterns and state-dict keys of the PC layer: the one place that spells them.

Patterns are regexes searched (``re.search``) in module FQNs. Each covers torchtitan's Llama names
(``attention.wo``, ``feed_forward.w1``; torchtitan 0.3 nests q/k/v in ``attention.qkv_linear``) and Hugging
Face Llama names (``self_attn.o_proj``, ``mlp.gate_proj``). They are anchored at a name boundary on the left
(``(^|\\.)``, so wrapper prefixes such as ``_checkpoint_wrapped_module.`` still match) and at the end.

A preconditioned weight ``<module>.weight`` is stored as four entries (see :func:`pc_keys`)::

    <module>.parametrizations.weight.original   raw weight W (what the optimizer updates)
    <module>.parametrizations.weight.0.gamma    learnable scale, one per matrix
    <module>.parametrizations.weight.0.u        power-iteration left vector (buffer)
    <module>.parametrizations.weight.0.v        power-iteration right vector (buffer)
    <module>.parametrizations.weight.0.pc_meta  degree/coefficients/eps the state was trained with (extra state)
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = [
    "ATTENTION_FFN_MODULES",
    "PC_TARGETS",
    "EMBEDDING_MODULES",
    "EXPERT_STACK_TARGETS",
    "EXPERT_STACKS",
    "GAMMA_PARAMS",
    "WEIGHT_PARAMS",
    "HEAD_MODULES",
    "PCKeys",
    "RAW_SUFFIX",
    "STATE_SUFFIXES",
    "pc_keys",
    "rename_legacy_keys",
    "pc_module_of_key",
    "param_pattern",
]

PC_TARGETS = (
    r"(^|\.)(attention\.wo|feed_forward\.w[123]|shared_experts\.w[123]"
    r"|self_attn\.o_proj|mlp\.(gate|up|down)_proj|mlp\.shared_experts?\.(gate|up|down)_proj)$"
)
"""The PC layer's default targets (the paper's): attention output and every FFN matrix, dense or a MoE's shared
experts (torchtitan's ``moe.shared_experts.w1``, Hugging Face's ``mlp.shared_expert(s).gate_proj``); never
q/k/v, embeddings, LM head, router or norms. MoE routed experts are 3-D stacks, not ``Linear`` modules."""

ATTENTION_FFN_MODULES = (
    r"(^|\.)(attention\.(qkv_linear\.)?(wq|wk|wv|wqkv|wo|wq_a|wq_b|wkv_a|wkv_b)|feed_forward\.w[123]"
    r"|shared_experts\.w[123]"
    r"|self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate|up|down)_proj|mlp\.shared_experts?\.(gate|up|down)_proj)$"
)
"""Every attention (q, k, v, fused qkv, MLA's low-rank ``wq_a``/``wq_b``/``wkv_a``/``wkv_b``, output) and FFN
matrix (dense, or a MoE's shared experts): what GMCN averages and Muon optimizes."""

EXPERT_STACK_TARGETS = r"(^|\.)routed_experts\.inner_experts$"
"""torchtitan's MoE routed experts (``GroupedExperts``: the 3-D stacks ``w1_EFD``, ``w2_EDF``, ``w3_EFD``), which
``torchtitan_ext``'s converter preconditions per expert besides :data:`PC_TARGETS`."""

EXPERT_STACKS = r"(^|\.)inner_experts\.(parametrizations\.)?(w1_EFD|w2_EDF|w3_EFD)(\.original)?$"
"""Parameter-FQN regex of torchtitan's routed-expert stacks ``(E, out, in)``, plain or the raw stack of a
preconditioned one (Muon per expert)."""

EMBEDDING_MODULES = r"(^|\.)(tok_embeddings|embed_tokens|wte|wpe|word_embeddings)$"
"""Token and position embeddings (AdamW in the paper's Muon recipe)."""

HEAD_MODULES = r"(^|\.)(output|lm_head)$"
"""The LM head (AdamW in the paper's Muon recipe)."""


GAMMA_PARAMS = r"(^|\.)parametrizations\.[^.]+\.0\.gamma$"
"""Parameter-FQN regex of every PC ``gamma`` (both execution strategies)."""

WEIGHT_PARAMS = r"(^|\.)(weight|parametrizations\.weight\.original)$"
"""Parameter-FQN regex of every ``weight``, plain or the raw weight of a preconditioned one."""


def param_pattern(module_pattern: str, name: str = "weight") -> str:
    """Parameter-FQN regex for ``<module>.<name>`` of the modules ``module_pattern`` selects.

    It matches the plain parameter and, for preconditioned modules, the raw weight
    ``<module>.parametrizations.<name>.original``.
    """
    if not module_pattern.endswith("$"):
        raise ValueError(
            f"param_pattern expects a module pattern anchored at the end ('...$'), got {module_pattern!r}."
        )
    n = re.escape(name)
    return f"{module_pattern[:-1]}\\.({n}|parametrizations\\.{n}\\.original)$"


class PCKeys(NamedTuple):
    """State-dict keys of one preconditioned weight (see the module docstring)."""

    raw: str
    gamma: str
    u: str
    v: str
    meta: str

    @property
    def state(self) -> tuple[str, str, str]:
        """The PC state entries besides the raw weight: gamma, u, v."""
        return (self.gamma, self.u, self.v)


def pc_keys(module_fqn: str, name: str = "weight") -> PCKeys:
    """State-dict keys of the preconditioned ``<module_fqn>.<name>`` (``module_fqn`` may be empty)."""
    prefix = f"{module_fqn}.parametrizations.{name}" if module_fqn else f"parametrizations.{name}"
    return PCKeys(
        f"{prefix}.original", f"{prefix}.0.gamma", f"{prefix}.0.u", f"{prefix}.0.v", f"{prefix}.0.pc_meta"
    )


_PC_KEY = re.compile(r"^(?:(?P<module>.+)\.)?parametrizations\.(?P<name>[^.]+)\.(original|0\.[^.]+)$")


def pc_module_of_key(key: str) -> tuple[str, str] | None:
    """``(module_fqn, name)`` of a PC state-dict key (raw weight, gamma, u, v, meta), else None."""
    m = _PC_KEY.match(key)
    return (m.group("module") or "", m.group("name")) if m else None


_ANY = pc_keys("_")
RAW_SUFFIX = _ANY.raw[1:]
"""Key suffix of a PC raw weight: ``.parametrizations.weight.original`` (``<module> + RAW_SUFFIX``)."""
STATE_SUFFIXES = tuple(k[1:] for k in (*_ANY.state, _ANY.meta))
"""Key suffixes of the rest of a PC weight's state: gamma, u, v, pc_meta."""


LEGACY_SHARDED_FIELDS = {"raw": "raw", "gamma": "gamma", "u": "u", "v": "v", "pc_meta": "meta"}
"""pcopt 0.2's sharded mode stored a weight's PC state as ``<module>.pc.<field>``; the loaders rename those keys
to :func:`pc_keys` (field -> ``PCKeys`` attribute)."""


def rename_legacy_keys(state_dict: dict, module_fqn: str, name: str = "weight") -> None:
    """Rename pcopt 0.2 sharded-mode keys ``<module>.pc.raw`` ... of one weight in place (see above)."""
    prefix = f"{module_fqn}.pc." if module_fqn else "pc."
    keys = pc_keys(module_fqn, name)
    for field, attr in LEGACY_SHARDED_FIELDS.items():
        if prefix + field in state_dict:
            state_dict[getattr(keys, attr)] = state_dict.pop(prefix + field)
