"""The PC layer as a ``torch.nn.utils.parametrize`` registration.

``precondition(linear)`` turns ``linear.weight`` into ``W_eff = gamma * sg(sigma) * p(W / sigma)``, where
``W = linear.parametrizations.weight.original`` is the raw trainable weight, ``sigma = u^T W v + eps`` is a
streaming power-iteration estimate of its top singular value (differentiable in ``W``; ``u``, ``v`` are
buffers) and ``p`` is a fixed odd polynomial that flattens the spectrum. After registration the module is
a ``ParametrizedLinear``; ``merge`` turns it back into a plain ``Linear`` holding ``W_eff``.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from pcopt.polynomials import apply_polynomial, evaluate_scalar, polynomial, validate_coefficients
from pcopt.spectral import init_singular_vectors, normalize, power_iteration_, sigma_estimate

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TARGETS",
    "precondition",
    "precondition_model",
    "is_preconditioned",
    "preconditioners",
    "refresh",
    "reset_preconditioners",
    "merge",
    "merged_state_dict",
    "load_dense_state_dict",
    "effective_weight",
]

# Attention output and all FFN matrices, for torchtitan Llama and Hugging Face Llama module names.
DEFAULT_TARGETS = r"(^|\.)(attention\.wo|feed_forward\.w[123]|self_attn\.o_proj|mlp\.(gate|up|down)_proj)$"

_REGISTRY: weakref.WeakSet[_PolynomialPC] = weakref.WeakSet()


def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full(t: Tensor) -> Tensor:
    """The full tensor behind ``t`` (all-gathers a DTensor: every rank must call this)."""
    return t.full_tensor() if _is_dtensor(t) else t


class _PolynomialPC(nn.Module):
    """``W -> gamma * sg(sigma) * p(W / sigma)`` with ``sigma = u^T W v + eps``.

    The polynomial runs in at least fp32 whatever the dtype of the incoming weight (bf16 under FSDP2 mixed
    precision); the result is cast back to the weight's dtype.
    """

    def __init__(
        self,
        shape: torch.Size,
        coefficients: tuple[float, ...],
        *,
        num_power_iterations: int,
        learn_gamma: bool,
        eps: float,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.coefficients = coefficients
        self.num_power_iterations = num_power_iterations
        self.eps = eps
        self.batch_shape = tuple(shape[:-2])
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        gamma_shape = self.batch_shape if self.batch_shape else (1,)
        self.gamma = nn.Parameter(
            torch.ones(gamma_shape, device=device, dtype=state_dtype), requires_grad=learn_gamma
        )
        u, v = init_singular_vectors(shape)
        self.register_buffer("u", u.to(device=device, dtype=state_dtype))
        self.register_buffer("v", v.to(device=device, dtype=state_dtype))
        self._label = f"weight of shape {tuple(shape)}"
        self._warned_reinit = False
        self._identity_inverse = True  # registration keeps the raw weight as it is
        # When set (by pcopt.accumulation), forward returns this precomputed W_eff leaf instead.
        self._cached_weight: Tensor | None = None
        _REGISTRY.add(self)

    def __setstate__(self, state) -> None:  # deepcopy / unpickle: keep the copy discoverable
        super().__setstate__(state)
        _REGISTRY.add(self)

    def extra_repr(self) -> str:
        return (
            f"degree={2 * len(self.coefficients) - 1}, num_power_iterations={self.num_power_iterations}, "
            f"eps={self.eps}, learn_gamma={self.gamma.requires_grad}"
        )

    @property
    def raw_weight(self) -> Tensor:
        """The current raw parameter (a sharded DTensor outside forward under FSDP2)."""
        return self._owner.original

    def forward(self, W: Tensor) -> Tensor:
        if self._cached_weight is not None:
            return self._cached_weight
        if _is_dtensor(W):
            raise RuntimeError(
                f"PC layer ({self._label}) received a DTensor weight in forward; it expects the full, unsharded "
                "matrix. Call pcopt.precondition before fully_shard (FSDP2 then hands the parametrization the "
                "unsharded weight), and use torchtitan's partial_dtensor backend."
            )
        return self._map(W, self.gamma)

    def _map(self, W: Tensor, gamma: Tensor) -> Tensor:
        """``gamma * sg(sigma) * p(W / sigma)`` computed in at least fp32, returned in ``W``'s dtype."""
        dtype = torch.promote_types(W.dtype, torch.float32)
        Wc = W.to(dtype)
        u = self.u.to(dtype, copy=True)  # copies: a later in-place refresh must not touch saved tensors
        v = self.v.to(dtype, copy=True)
        sigma = (sigma_estimate(Wc, u, v) + self.eps)[..., None, None]
        P = apply_polynomial(Wc / sigma, self.coefficients)
        scale = gamma.to(dtype).view(*self.batch_shape, 1, 1) * sigma.detach()
        return (P * scale).to(W.dtype)

    @torch.no_grad()
    def right_inverse(self, value: Tensor) -> Tensor:
        """Raw weight whose effective weight is ``value`` (function-preserving; also sets ``u``, ``v``).

        At registration the raw weight is kept as it is instead (the paper's initialisation), so only
        later assignments ``module.weight = dense`` go through the inverse. See ``_dense_to_raw``.
        """
        if self._identity_inverse:
            return value
        raw, u, v = _dense_to_raw(_full(value), self.coefficients, _full(self.gamma.detach()), self.eps)
        self.u.copy_(u)
        self.v.copy_(v)
        return raw.to(value.dtype)

    # -- power-iteration state -------------------------------------------------------------------
    def reset_state(self) -> None:
        """gamma <- 1 and deterministic unit ``u``, ``v`` (does not touch the raw weight)."""
        with torch.no_grad():
            self.gamma.fill_(1.0)
            u, v = init_singular_vectors((*self.batch_shape, self.u.shape[-1], self.v.shape[-1]))
            self.u.copy_(u)
            self.v.copy_(v)

    def _invalid(self) -> Tensor:
        """Per-matrix mask (shape ``batch_shape``) of non-finite or zero-norm ``u`` / ``v``."""
        bad = torch.zeros(self.batch_shape, dtype=torch.bool, device=self.u.device)
        for vec in (self.u, self.v):
            norms = torch.linalg.vector_norm(vec, dim=-1)
            bad |= ~torch.isfinite(vec).all(dim=-1) | ~(norms > 0.5)
        return bad

    def _heal(self, bad: Tensor, reason: str) -> None:
        """Re-initialise ``u``, ``v`` of the matrices flagged in ``bad`` (the others keep their state)."""
        if not self._warned_reinit:
            warnings.warn(
                f"pcopt: power-iteration state of the {self._label} {reason}; re-initialised u and v "
                "(check the weight and its gradients for inf/nan). Shown once per weight.",
                RuntimeWarning,
                stacklevel=4,
            )
            self._warned_reinit = True
        u, v = init_singular_vectors((*self.batch_shape, self.u.shape[-1], self.v.shape[-1]))
        mask = bad.unsqueeze(-1)
        self.u.copy_(torch.where(mask, u.to(self.u), self.u))
        self.v.copy_(torch.where(mask, v.to(self.v), self.v))


def _pcs_of(module: nn.Module) -> list[tuple[str, _PolynomialPC]]:
    """(tensor name, PC module) pairs registered on ``module`` itself."""
    if not parametrize.is_parametrized(module):
        return []
    return [
        (n, plist[0]) for n, plist in module.parametrizations.items() if isinstance(plist[0], _PolynomialPC)
    ]


def is_preconditioned(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` carries a PC parametrization."""
    return any(n == name for n, _ in _pcs_of(module))


def preconditioners(model: nn.Module) -> list[tuple[str, _PolynomialPC]]:
    """All PC parametrizations in ``model`` as ``(fqn of the effective tensor, PC module)`` pairs."""
    out = []
    for fqn, mod in model.named_modules():
        for name, pc in _pcs_of(mod):
            out.append((f"{fqn}.{name}" if fqn else name, pc))
    return out


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def precondition(
    module: nn.Module,
    name: str = "weight",
    *,
    degree: int = 9,
    coefficients: Sequence[float] | None = None,
    num_power_iterations: int = 10,
    learn_gamma: bool = True,
    eps: float = 1e-7,
) -> nn.Module:
    r"""Register the PC layer on ``module.<name>`` and return ``module``.

    The effective weight is :math:`W_\text{eff} = \gamma\,\mathrm{sg}(\hat\sigma)\,p(W/\hat\sigma)` with
    :math:`\hat\sigma = u^\top W v + \epsilon`. The raw weight ``W`` (unchanged by registration) moves to
    ``module.parametrizations.<name>.original``; the learnable scale ``gamma`` (one per matrix, init 1) and
    the buffers ``u``, ``v`` live in ``module.parametrizations.<name>[0]``. ``u``, ``v`` are refreshed by 10
    warm-started power iterations right away (unless on the meta device) and after every step of a pcopt
    optimizer (or by :func:`refresh`).

    Args:
        module: a module with a 2-D (``out x in``) or 3-D (batch of matrices) parameter ``name``.
        degree: 3, 5, 7 or 9: the PC polynomial of that degree (the paper: 9 with AdamW, 5 with Muon).
        coefficients: custom odd polynomial, the coefficients of ``x, x^3, ...``; overrides ``degree``.
        num_power_iterations: iterations per refresh.
        learn_gamma: train ``gamma`` (``False`` freezes it at 1).
        eps: added to the sigma estimate.

    Must be called before ``fully_shard`` (FSDP2 then gives the parametrization the unsharded weight).

    Example::

        >>> lin = pcopt.precondition(nn.Linear(64, 256, bias=False), degree=9)
        >>> type(lin).__name__
        'ParametrizedLinear'
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"precondition expects an nn.Module, got {type(module).__name__}.")
    if is_preconditioned(module, name):
        raise ValueError(
            f"{type(module).__name__}.{name} is already preconditioned. Call precondition once per weight "
            "(pcopt.merge removes the PC layer if you want to re-register it with other settings)."
        )
    if parametrize.is_parametrized(module, name):
        raise ValueError(
            f"{type(module).__name__}.{name} already has another parametrization; the PC layer must be the only "
            "parametrization of a weight. Remove the other one first."
        )
    param = module._parameters.get(name) if isinstance(name, str) else None
    if param is None:
        available = [n for n, _ in module.named_parameters(recurse=False)]
        raise ValueError(
            f"{type(module).__name__} has no parameter named {name!r}; expected one of {available}. "
            "Pass the name of a matrix parameter, e.g. name='weight'."
        )
    if _is_dtensor(param) or type(module).__name__.startswith("FSDP"):
        raise ValueError(
            f"{type(module).__name__}.{name} is already sharded (fully_shard was applied). Call "
            "pcopt.precondition / precondition_model before fully_shard."
        )
    if param.ndim not in (2, 3):
        raise ValueError(
            f"precondition expects a matrix (out x in) or a batch of matrices for {name!r}, got a tensor of "
            f"{param.ndim} dimension(s) with shape {tuple(param.shape)}. Precondition only 2-D/3-D weights."
        )
    coeffs = validate_coefficients(coefficients) if coefficients is not None else polynomial(degree)
    _check_int(num_power_iterations, "num_power_iterations", 1)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite float, got {eps!r}.")
    if not param.is_floating_point():
        raise ValueError(f"precondition expects a floating-point weight, got dtype {param.dtype}.")

    pc = _PolynomialPC(
        param.shape,
        coeffs,
        num_power_iterations=num_power_iterations,
        learn_gamma=learn_gamma,
        eps=float(eps),
        device=param.device,
        dtype=param.dtype,
    )
    pc._label = f"{type(module).__name__}.{name} of shape {tuple(param.shape)}"
    parametrize.register_parametrization(module, name, pc)
    pc._identity_inverse = False
    object.__setattr__(pc, "_owner", module.parametrizations[name])  # plain attribute, not a submodule
    module.register_load_state_dict_pre_hook(_DenseKeyGuard(name))
    if param.device.type != "meta":
        refresh_modules([pc])
    return module


class _DenseKeyGuard:
    """Refuse a dense ``<name>`` key loaded into a preconditioned module, pointing to the conversion."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(
        self, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
    ) -> None:
        dense, raw = prefix + self.name, f"{prefix}parametrizations.{self.name}.original"
        if dense in state_dict and raw not in state_dict and is_preconditioned(module, self.name):
            raise RuntimeError(
                f"The state_dict holds a dense '{dense}' but the model is preconditioned (it expects '{raw}'). "
                "Load dense checkpoints with pcopt.load_dense_state_dict(model, state_dict), or export a "
                "preconditioned model with pcopt.merged_state_dict(model) for a plain one."
            )


def precondition_model(
    model: nn.Module,
    *,
    targets: str | re.Pattern | Callable[[str, nn.Module], bool] | None = None,
    name: str = "weight",
    degree: int = 9,
    coefficients: Sequence[float] | None = None,
    num_power_iterations: int = 10,
    learn_gamma: bool = True,
    eps: float = 1e-7,
) -> list[str]:
    """Precondition ``<module>.<name>`` for every module whose FQN matches ``targets``.

    ``targets`` is a regex searched in module FQNs or a predicate ``(fqn, module) -> bool``. The default,
    ``DEFAULT_TARGETS``, selects the attention output and all FFN matrices (torchtitan ``attention.wo``,
    ``feed_forward.w1/w2/w3``; Hugging Face ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``); never
    embeddings, LM head, norms or q/k/v. Returns the FQNs of the modules it preconditioned and warns if
    nothing matched.
    """
    if targets is None:
        targets = DEFAULT_TARGETS
    if isinstance(targets, (str, re.Pattern)):
        pattern = re.compile(targets)

        def match(fqn: str, mod: nn.Module) -> bool:
            return pattern.search(fqn) is not None
    elif callable(targets):
        match = targets
    else:
        raise ValueError(
            f"targets must be a regex (str or re.Pattern) or a callable (fqn, module) -> bool, got {type(targets).__name__}."
        )
    chosen = [
        (fqn, mod)
        for fqn, mod in model.named_modules()
        if fqn and match(fqn, mod) and (name in mod._parameters or parametrize.is_parametrized(mod, name))
    ]
    for fqn, mod in chosen:
        precondition(
            mod,
            name,
            degree=degree,
            coefficients=coefficients,
            num_power_iterations=num_power_iterations,
            learn_gamma=learn_gamma,
            eps=eps,
        )
        mod.parametrizations[name][0]._label = f"{fqn}.{name}"
    touched = [fqn for fqn, _ in chosen]
    if not touched:
        warnings.warn(
            f"precondition_model: no module matched targets={getattr(targets, 'pattern', targets)!r} with a "
            f"parameter {name!r}; nothing was preconditioned. Check the module names (model.named_modules()).",
            UserWarning,
            stacklevel=2,
        )
    else:
        logger.info(
            "PC layer registered on %d weights (degree %d)",
            len(touched),
            2 * len(coefficients or polynomial(degree)) - 1,
        )
    return touched


def refresh_modules(pcs: Sequence[_PolynomialPC], num_iterations: int | None = None) -> None:
    """Power iteration on the given PC modules (batched; one all-reduce per half-step per mesh)."""
    by_iters: dict[int, list[_PolynomialPC]] = {}
    for pc in pcs:
        by_iters.setdefault(num_iterations or pc.num_power_iterations, []).append(pc)
    for iters, group in by_iters.items():
        for pc in group:
            bad = pc._invalid()
            if bad.any():
                pc._heal(bad, "was not finite or had zero norm before refresh")
        power_iteration_(
            [pc.raw_weight for pc in group], [pc.u for pc in group], [pc.v for pc in group], iters
        )
        for pc in group:
            bad = pc._invalid()
            if bad.any():
                pc._heal(bad, "became non-finite or zero during refresh (non-finite or zero weight?)")


def refresh(model_or_params: nn.Module | Iterable[Tensor], num_iterations: int | None = None) -> int:
    """Refresh ``u``, ``v`` of preconditioned weights by warm-started power iteration; returns how many.

    ``model_or_params`` is a module (every PC weight inside it) or an iterable of parameters (the PC weights
    whose raw parameter, ``...parametrizations.weight.original``, is among them: what an optimizer owns).
    Works on FSDP2-sharded raw weights without gathering them (vector all-reduces only); every rank must
    call it. ``num_iterations`` defaults to each weight's ``num_power_iterations``.
    """
    if isinstance(model_or_params, nn.Module):
        pcs = [pc for _, pc in preconditioners(model_or_params)]
    else:
        # Order by position in the given parameters: every rank must batch the same weights in the same
        # order into the shared all-reduces (the registry's iteration order differs between processes).
        order = {id(p): i for i, p in enumerate(model_or_params)}
        found = [pc for pc in list(_REGISTRY) if hasattr(pc, "_owner") and id(pc.raw_weight) in order]
        pcs = sorted(found, key=lambda pc: order[id(pc.raw_weight)])
    if pcs:
        refresh_modules(pcs, num_iterations)
    return len(pcs)


def reset_preconditioners(model: nn.Module) -> int:
    """Set gamma to 1, re-initialise ``u``, ``v`` and refresh them, for every PC weight in ``model``.

    Use it after materialising a meta-device model (``to_empty``), where these hold garbage.
    """
    pcs = [pc for _, pc in preconditioners(model)]
    for pc in pcs:
        pc.reset_state()
    refresh_modules(pcs)
    return len(pcs)


@torch.no_grad()
def effective_weight(module: nn.Module, name: str = "weight", *, include_gamma: bool = True) -> Tensor:
    """The full effective weight (fp32 or wider) of a PC weight, also when its raw weight is sharded.

    With FSDP2-sharded weights this all-gathers: every rank must call it.
    """
    plist = module.parametrizations[name]
    pc = plist[0]
    raw = _full(plist.original.detach())
    raw = raw.to(torch.promote_types(raw.dtype, torch.float32))
    if include_gamma:
        gamma = _full(pc.gamma.detach())
    else:  # not ones_like(gamma): under FSDP2 gamma is a sharded DTensor
        gamma = torch.ones(pc.batch_shape or (1,), dtype=raw.dtype, device=raw.device)
    return pc._map(raw, gamma)


def merge(model: nn.Module) -> list[str]:
    """Replace every PC parametrization in ``model`` by a plain parameter holding its current ``W_eff``.

    The result runs with zero PC overhead and gives the same outputs as the preconditioned model (the
    current ``u``, ``v`` are used; no refresh happens). The raw parameter object is kept, its data replaced.
    Works on unsharded models; for FSDP2-sharded ones use :func:`merged_state_dict`. Returns merged FQNs.
    """
    merged = []
    for fqn, mod in list(model.named_modules()):
        for name, pc in _pcs_of(mod):
            if _is_dtensor(pc.raw_weight):
                raise RuntimeError(
                    f"merge got a sharded (FSDP2) weight at {fqn}.{name}; merge works on unsharded models. "
                    "Use pcopt.merged_state_dict(model) on every rank to get a dense state_dict instead."
                )
            eff = effective_weight(mod, name)
            parametrize.remove_parametrizations(mod, name, leave_parametrized=False)
            with torch.no_grad():
                getattr(mod, name).copy_(eff)
            merged.append(f"{fqn}.{name}" if fqn else name)
    if not merged:
        warnings.warn(
            "pcopt.merge: the model has no preconditioned weights; nothing to merge.",
            UserWarning,
            stacklevel=2,
        )
    return merged


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state_dict with every PC weight as a dense ``<fqn>.<name>`` entry holding ``W_eff``.

    PC entries (raw weight, gamma, u, v) are replaced by the merged weight, in the raw weight's dtype; other
    entries are as in ``model.state_dict()``. Loads into the same architecture without PC. Sharded PC
    weights are all-gathered, so every rank must call it.
    """
    sd = model.state_dict()
    for fqn, pc in preconditioners(model):
        mod_fqn, _, name = fqn.rpartition(".")
        mod = model.get_submodule(mod_fqn)
        prefix = f"{mod_fqn}.parametrizations.{name}" if mod_fqn else f"parametrizations.{name}"
        for key in (f"{prefix}.original", f"{prefix}.0.gamma", f"{prefix}.0.u", f"{prefix}.0.v"):
            sd.pop(key, None)
        sd[fqn] = effective_weight(mod, name).to(pc.raw_weight.dtype)
    return sd


def load_dense_state_dict(
    model: nn.Module, state_dict: dict[str, Tensor], *, preserve_function: bool = False, strict: bool = True
):
    """Load a dense (non-PC) checkpoint into a preconditioned model.

    ``preserve_function=False`` (the paper's start from dense weights): each dense ``W`` becomes the raw
    weight, gamma is set to 1 and ``u``, ``v`` are refreshed, so ``W_eff = sigma p(W / sigma)`` (the
    spectrum is flattened from the first step on). ``preserve_function=True``: the raw weight is chosen so
    that ``W_eff`` equals the dense weight (SVD-based inverse of the polynomial, ``u``, ``v`` set to the exact
    top singular vectors), so the model computes the same function as the dense one. Unsharded models only.
    Returns what ``load_state_dict`` returns.
    """
    sd = dict(state_dict)
    pcs = preconditioners(model)
    for fqn, pc in pcs:
        mod_fqn, _, name = fqn.rpartition(".")
        prefix = f"{mod_fqn}.parametrizations.{name}" if mod_fqn else f"parametrizations.{name}"
        if fqn not in sd:
            if strict:
                raise RuntimeError(
                    f"load_dense_state_dict: the dense state_dict has no '{fqn}' for the preconditioned weight. "
                    "Pass the state_dict of the same architecture without PC (or strict=False)."
                )
            continue
        dense = sd.pop(fqn)
        sd[f"{prefix}.original"] = dense
        sd[f"{prefix}.0.gamma"] = torch.ones_like(pc.gamma)
        sd[f"{prefix}.0.u"] = pc.u.detach().clone()
        sd[f"{prefix}.0.v"] = pc.v.detach().clone()
    result = model.load_state_dict(sd, strict=strict)
    for fqn, pc in pcs:
        mod_fqn, _, name = fqn.rpartition(".")
        mod = model.get_submodule(mod_fqn)
        if preserve_function:
            setattr(mod, name, pc.raw_weight.detach().clone())  # right_inverse: raw <- p^-1, u, v <- exact
        else:
            pc.reset_state()
    if not preserve_function:
        refresh_modules([pc for _, pc in pcs])
    return result


def _increasing_branch_end(coefficients: Sequence[float]) -> float:
    """End of the first increasing stretch of ``p`` on ``[0, 1]``; where its inverse is well defined."""
    x = torch.linspace(0, 1, 20001, dtype=torch.float64)
    y = evaluate_scalar(coefficients, x)
    dec = torch.nonzero(y[1:] < y[:-1]).flatten()
    return float(x[dec[0]]) if len(dec) else 1.0


def _invert_polynomial(coefficients: Sequence[float], t: Tensor) -> Tensor:
    """Solve ``p(x) = t`` for ``x`` on the increasing branch of ``p`` (bisection, float64)."""
    hi_x = _increasing_branch_end(coefficients)
    peak = evaluate_scalar(coefficients, hi_x)
    if bool((t > peak + 1e-12).any()):
        raise ValueError(
            f"Cannot invert the PC polynomial: it peaks at {peak:.4f} on its increasing branch but a singular-value "
            f"ratio of {float(t.max()):.4f} is needed. Use a polynomial that reaches 1 (coefficients summing to 1)."
        )
    lo = torch.zeros_like(t)
    hi = torch.full_like(t, hi_x)
    for _ in range(60):
        mid = (lo + hi) / 2
        below = evaluate_scalar(coefficients, mid) < t
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return (lo + hi) / 2


def _dense_to_raw(dense: Tensor, coefficients, gamma: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Raw weight ``W`` and exact ``u``, ``v`` such that ``gamma sg(sigma) p(W / sigma) = dense`` (sigma = s_1)."""
    D = dense.detach().to(torch.float64)
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    g = (
        gamma.to(torch.float64).reshape(*D.shape[:-2], 1)
        if D.ndim > 2
        else gamma.to(torch.float64).reshape(1)
    )
    if bool((g <= 0).any()):
        raise ValueError(f"Function-preserving conversion needs gamma > 0, got {gamma.tolist()}.")
    s1 = S[..., :1]
    ratios = (S / s1.clamp_min(1e-300)).clamp(0, 1)
    x = _invert_polynomial(coefficients, ratios)
    x[..., 0] = 1.0  # the top direction sits at p(1) = 1, so sigma(W) = s_1 / gamma
    w = x * (s1 / g)
    w[..., 0] -= eps  # u^T W v + eps == s1 / gamma, the sigma the ratios were solved for
    raw = (U * w.unsqueeze(-2)) @ Vh
    return raw, normalize(U[..., :, 0]).float(), normalize(Vh[..., 0, :]).float()
