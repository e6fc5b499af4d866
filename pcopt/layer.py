"""The per-weight PC state and the map ``W -> gamma * sg(sigma) * p(W / sigma)``: :class:`PolynomialPC`.

:class:`PolynomialPC` is what :func:`pcopt.precondition` registers on a weight, whatever the execution
strategy. It holds the PC state of that weight: the learnable ``gamma`` (one per matrix), the power-iteration
buffers ``u``, ``v`` and the settings (:class:`pcopt.PCOptions`, also stored in the ``pc_meta`` buffer so that
a checkpoint remembers them). The raw weight ``W`` sits next to it, at ``<module>.parametrizations.<name>
.original``, in both strategies (:mod:`pcopt.strategy`):

* **per-forward**: the ``torch.nn.utils.parametrize`` registration; ``ParametrizationList`` holds ``W`` and
  this module, and every forward maps ``W``;
* **once-per-step**: a :class:`pcopt.slot.PCSlot` holds ``W`` and this module under a
  :class:`pcopt.slot.PCHolder` that takes the place of ``module.parametrizations``; ``module.<name>`` is an
  ordinary parameter holding ``W_eff``.

So the checkpoint keys are the same in both. Who updates ``u``, ``v`` and when: :mod:`pcopt.state`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pcopt._tensor import full_tensor, is_dtensor, join_rows, split_rows
from pcopt.options import PCOptions
from pcopt.polynomials import apply_polynomial
from pcopt.power_iteration import init_singular_vectors, power_iteration_, sigma_estimate

__all__ = ["PolynomialPC", "refresh_"]


def _meta_values(options: PCOptions) -> list[float]:
    return [options.eps, *options.polynomial]


class PolynomialPC(nn.Module):
    """``W -> gamma * sg(sigma) * p(W / sigma)`` with ``sigma = u^T W v + eps``.

    Without ``torch.autocast`` the polynomial runs in at least fp32 whatever the dtype of the incoming
    weight (bf16 under FSDP2 mixed precision); the result is cast back to the weight's dtype.

    Read API: :attr:`raw_weight`, :meth:`sigma` (the current estimate), :meth:`effective_weight`,
    :attr:`options`. ``u``, ``v`` and ``gamma`` are ordinary buffers/parameters.
    """

    def __init__(
        self,
        shape: torch.Size,
        options: PCOptions,
        *,
        device: torch.device,
        dtype: torch.dtype,
        row_interleave: int = 1,
    ) -> None:
        super().__init__()
        self.options = options
        self.row_interleave = row_interleave
        shape = self.matrix_shape(shape)
        self.batch_shape = tuple(shape[:-2])
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        gamma_shape = self.batch_shape if self.batch_shape else (1,)
        self.gamma = nn.Parameter(
            torch.ones(gamma_shape, device=device, dtype=state_dtype), requires_grad=options.learn_gamma
        )
        u, v = init_singular_vectors(shape)
        self.register_buffer("u", u.to(device=device, dtype=state_dtype))
        self.register_buffer("v", v.to(device=device, dtype=state_dtype))
        # Where a refresh restarts u, v whose values are not finite or ~zero (kept on the device: the health
        # check is a torch.where, no host sync), and how many restarts happened (read by PCState.health()).
        self.register_buffer("u0", u.to(device=device, dtype=state_dtype, copy=True), persistent=False)
        self.register_buffer("v0", v.to(device=device, dtype=state_dtype, copy=True), persistent=False)
        self.register_buffer(
            "heals", torch.zeros(self.batch_shape, dtype=torch.int64, device=device), persistent=False
        )
        self._reported_heals = 0
        self.register_buffer(
            "pc_meta", torch.tensor(_meta_values(options), dtype=torch.float64, device=device)
        )
        self.label = f"weight of shape {tuple(shape)}"
        self._identity_inverse = True  # registration keeps the raw weight as it is
        self._fresh: tuple[int, int] | None = None  # (id, _version) of the raw weight at the last refresh
        self._warned_stale = False
        self.__dict__["_plist"] = None  # the ParametrizationList holding the raw weight (see attach)

    # -- settings ------------------------------------------------------------------------------------------
    @property
    def coefficients(self) -> tuple[float, ...]:
        return self.options.polynomial

    @property
    def eps(self) -> float:
        return self.options.eps

    @property
    def num_power_iterations(self) -> int:
        return self.options.num_power_iterations

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"degree={o.effective_degree}, num_power_iterations={o.num_power_iterations}, eps={o.eps}, "
            f"learn_gamma={self.gamma.requires_grad}"
            + (f", row_interleave={self.row_interleave}" if self.row_interleave > 1 else "")
        )

    # -- the matrices of the weight -----------------------------------------------------------------------
    def matrix_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of the matrices a weight of ``shape`` holds: ``shape`` itself, or ``(..., k, rows / k, cols)``
        when its rows interleave ``k = row_interleave`` matrices."""
        *batch, rows, cols = shape
        k = self.row_interleave
        return (*batch, k, rows // k, cols) if k > 1 else tuple(shape)

    def matrices(self, W: Tensor) -> Tensor:
        """``W`` as its matrices, ``(*batch_shape, m, n)``: a view (:func:`pcopt._tensor.split_rows`)."""
        return split_rows(W, self.row_interleave)

    def weight_of(self, M: Tensor) -> Tensor:
        """The inverse of :meth:`matrices`: the weight laid out as the raw parameter."""
        return join_rows(M, self.row_interleave)

    # -- read API ------------------------------------------------------------------------------------------
    @property
    def strategy(self) -> str:
        """``"once_per_step"`` when held by a :class:`pcopt.slot.PCSlot` (which says so), else ``"per_forward"``
        (parametrize's ``ParametrizationList``)."""
        return getattr(self._plist, "strategy", "per_forward")

    @property
    def raw_weight(self) -> Tensor:
        """The current raw parameter (a sharded DTensor outside forward under FSDP2)."""
        if self._plist is None:
            raise RuntimeError(
                f"PC layer ({self.label}) is not registered on a module; use pcopt.precondition(module)."
            )
        return self._plist.original

    def bind(self, plist: nn.Module) -> None:
        """Remember the container that holds the raw weight as ``.original`` (``ParametrizationList`` or
        :class:`PCSlot`; set by :func:`pcopt.precondition` and :func:`pcopt.set_strategy`).

        Stored outside ``_modules`` (it is this module's parent, not a child); deepcopy and pickling keep it.
        """
        self.__dict__["_plist"] = plist

    @torch.no_grad()
    def sigma(self) -> Tensor:
        """The streaming estimate ``u^T W v + eps`` of the top singular value, shape ``batch_shape`` or ``()``.

        All-gathers a sharded raw weight (every rank must call it).
        """
        raw = full_tensor(self.raw_weight.detach())
        dtype = torch.promote_types(raw.dtype, torch.float32)
        return sigma_estimate(self.matrices(raw.to(dtype)), self.u.to(dtype), self.v.to(dtype)) + self.eps

    @torch.no_grad()
    def effective_weight(self, *, include_gamma: bool = True) -> Tensor:
        """The full ``W_eff`` in fp32 (fp64 for fp64 weights); all-gathers sharded weights."""
        raw = full_tensor(self.raw_weight.detach())
        raw = raw.to(torch.promote_types(raw.dtype, torch.float32))
        if include_gamma:
            gamma = full_tensor(self.gamma.detach())
        else:  # not ones_like(gamma): under FSDP2 gamma is a sharded DTensor
            gamma = torch.ones(self.batch_shape or (1,), dtype=raw.dtype, device=raw.device)
        return self.map(raw, gamma)

    # -- the map -------------------------------------------------------------------------------------------
    def forward(self, W: Tensor) -> Tensor:
        if not torch.compiler.is_compiling() and self._fresh is not None and not self._warned_stale:
            self._check_fresh(W)
        if is_dtensor(W):
            raise RuntimeError(
                f"PC layer ({self.label}) received a DTensor weight in forward; it expects the full, unsharded "
                "matrix. Call pcopt.precondition before fully_shard (FSDP2 then hands the parametrization the "
                "unsharded weight), and use torchtitan's partial_dtensor backend."
            )
        return self.map(W, self.gamma)

    def mark_fresh(self) -> None:
        """Record that ``u``, ``v`` describe the current raw weight (called after every refresh and load)."""
        raw = self.raw_weight
        self._fresh = None if raw.device.type == "meta" else (id(raw), raw._version)

    def _check_fresh(self, W: Tensor) -> None:
        # Only a plain raw weight is checked: under FSDP2 forward sees an unsharded copy (another object).
        ident, version = self._fresh
        if id(W) == ident and W._version != version:
            self._warned_stale = True
            warnings.warn(
                f"pcopt: the raw weight of {self.label} changed since u, v were last refreshed (an optimizer "
                "step without a refresh?), so sigma is estimated from the previous weight. Attach the model's "
                "PC state to the optimizer (pcopt.PCState(model).attach(optimizer); pcopt.build_optimizer "
                "does it), or call state.after_step() after every optimizer.step(). Shown once per weight.",
                UserWarning,
                stacklevel=5,
            )

    def map(self, W: Tensor, gamma: Tensor) -> Tensor:
        """``gamma * sg(sigma) * p(W / sigma)`` computed in at least fp32, returned in ``W``'s dtype."""
        dtype = torch.promote_types(W.dtype, torch.float32)
        Wc = self.matrices(W.to(dtype))
        u = self.u.to(dtype, copy=True)  # copies: a later in-place refresh must not touch saved tensors
        v = self.v.to(dtype, copy=True)
        sigma = (sigma_estimate(Wc, u, v) + self.eps)[..., None, None]
        P = apply_polynomial(Wc / sigma, self.coefficients)
        scale = gamma.to(dtype).view(*self.batch_shape, 1, 1) * sigma.detach()
        return self.weight_of(P * scale).to(W.dtype)

    @torch.no_grad()
    def right_inverse(self, value: Tensor) -> Tensor:
        """Raw weight whose effective weight is ``value`` (function-preserving; also sets ``u``, ``v``).

        At registration the raw weight is kept as it is instead (the paper's initialisation), so only
        later assignments ``module.weight = dense`` go through the inverse (:mod:`pcopt.inverse`).
        """
        if self._identity_inverse:
            return value
        from pcopt.inverse import dense_to_raw

        raw, u, v = dense_to_raw(
            self.matrices(full_tensor(value)), self.coefficients, full_tensor(self.gamma.detach()), self.eps
        )
        self.u.copy_(u)
        self.v.copy_(v)
        return self.weight_of(raw).to(value.dtype)

    # -- power-iteration state -----------------------------------------------------------------------------
    def reset_state(self) -> None:
        """gamma <- 1, deterministic unit ``u``, ``v`` and the settings buffer (not the raw weight)."""
        with torch.no_grad():
            self.gamma.fill_(1.0)
            u, v = init_singular_vectors((*self.batch_shape, self.u.shape[-1], self.v.shape[-1]))
            for buf, value in ((self.u, u), (self.v, v), (self.u0, u), (self.v0, v)):
                buf.copy_(value)
            self.heals.zero_()
            self._reported_heals = 0
            self.pc_meta.copy_(torch.tensor(_meta_values(self.options), dtype=self.pc_meta.dtype))

    def check_meta(self, saved: Tensor, key: str) -> None:
        """``RuntimeError`` if a checkpoint's ``pc_meta`` was written with other PC settings than ours."""
        ours = _meta_values(self.options)
        theirs = [float(x) for x in saved.detach().to("cpu", torch.float64).flatten()]
        same = len(theirs) == len(ours) and all(
            abs(a - b) <= 1e-2 * max(abs(a), abs(b)) for a, b in zip(ours, theirs)
        )
        if not same:

            def describe(vals):
                return f"degree {2 * len(vals) - 3}, eps {vals[0]:.3g}, coefficients {tuple(round(c, 4) for c in vals[1:])}"

            raise RuntimeError(
                f"The checkpoint's PC state at '{key}' was trained with {describe(theirs)}, but the model is "
                f"preconditioned with {describe(ours)}. Precondition the model with the checkpoint's settings "
                "(pcopt.PCOptions(degree=..., coefficients=..., eps=...)) to resume it, or start from its "
                "merged weights (pcopt.merged_state_dict) with pcopt.load_dense_state_dict."
            )

    def report_heals(self) -> int:
        """How many times a refresh restarted ``u``, ``v`` (host sync); warns once per weight when > 0."""
        n = int(self.heals.sum())
        if n > self._reported_heals and self._reported_heals == 0:
            warnings.warn(
                f"pcopt: power-iteration state of the {self.label} became non-finite or zero during refresh "
                f"({n} restart(s) so far: a non-finite or zero weight, or non-finite gradients?); re-initialised "
                "u and v. Shown once per weight.",
                RuntimeWarning,
                stacklevel=3,
            )
        self._reported_heals = n
        return n


@torch.no_grad()
def refresh_(pcs: list[PolynomialPC], num_iterations: int | None = None) -> None:
    """Warm-started power iteration on the given PC modules, both strategies, plain or sharded raw weights.

    Batched (:func:`pcopt.power_iteration.power_iteration_`): one batched matmul per half-step per shape, one
    all-reduce per half-step per mesh. ``u``, ``v`` that are not finite or ~zero restart from ``u0``, ``v0``
    before and after, without a host sync; ``heals`` counts it (:meth:`PolynomialPC.report_heals`).
    """
    pcs = [pc for pc in pcs if pc.raw_weight.device.type != "meta"]
    by_iters: dict[int, list[PolynomialPC]] = {}
    for pc in pcs:
        by_iters.setdefault(num_iterations or pc.num_power_iterations, []).append(pc)
    for iters, group in by_iters.items():
        counts = power_iteration_(
            [pc.matrices(pc.raw_weight) for pc in group],
            [pc.u for pc in group],
            [pc.v for pc in group],
            iters,
            init=([pc.u0 for pc in group], [pc.v0 for pc in group]),
        )
        torch._foreach_add_([pc.heals for pc in group], counts)
        for pc in group:
            pc.mark_fresh()


def __getattr__(name: str):
    if name in ("PCSlot", "PCHolder"):  # moved in 0.3, next to the strategy switch; until 0.4
        import importlib
        import warnings

        warnings.warn(
            f"pcopt.layer.{name} is deprecated and will be removed in pcopt 0.4: use pcopt.slot.{name}.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module("pcopt.slot"), name)
    raise AttributeError(f"module 'pcopt.layer' has no attribute {name!r}")
