"""Muon with ``torch.optim.Muon`` semantics, named Newton-Schulz coefficient sets, and DTensor support.

Drop-in for ``torch.optim.Muon``: same positional arguments, defaults, state key (``momentum_buffer``) and,
on plain tensors with the default settings, bitwise the same updates. Additions (keyword-only): named or
per-step Newton-Schulz coefficients, the iteration dtype, batched Newton-Schulz over same-shaped matrices,
and exact, non-redundant orthogonalization of DTensors on 1-D and 2-D meshes (see ``_distributed.py``). Like
torch's, it takes param groups and hyperparameters and knows nothing of the model or of the PC layer.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from pcopt.hardware import warn_slow_newton_schulz
from pcopt.optim._muon_step import (
    ADJUST_LR_FNS,
    DEFAULT_NS_STEPS,
    EPS,
    AdjustLrT,
    NsAlgorithmT,
    check_interleave,
    check_split,
    muon,
    whole_locally,
)
from pcopt.optim._newton_schulz import (
    KELLER_COEFFICIENTS,
    CoeffSetT,
    resolve_algorithm,
    resolve_coefficients,
    resolve_dtype,
)

logger = logging.getLogger(__name__)

__all__ = ["Muon", "muon", "AdjustLrT", "NsAlgorithmT"]


def _validate_options(options: MutableMapping[str, Any], *, warn: bool = True) -> None:
    """Raise ``ValueError`` for invalid Muon hyperparameters (constructor defaults or a param group).

    ``warn=False`` skips the warnings (the defaults are checked again, with warnings, as each group is added).
    """
    lr = options["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got a tensor of shape {tuple(lr.shape)}.")
        lr = lr.item()
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}. Expected lr >= 0.")
    if not 0.0 <= options["momentum"] < 1.0:
        raise ValueError(f"Invalid momentum value: {options['momentum']}. Expected 0 <= momentum < 1.")
    if not 0.0 <= options["weight_decay"]:
        raise ValueError(
            f"Invalid weight_decay value: {options['weight_decay']}. Expected weight_decay >= 0."
        )
    eps = options["eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0.0:
        raise ValueError(f"Invalid epsilon value: {eps}. Expected a float > 0 (default {EPS}).")
    if options["adjust_lr_fn"] is not None and options["adjust_lr_fn"] not in ADJUST_LR_FNS:
        raise ValueError(  # torch.optim.Muon's wording first (its tests match it), then the fix
            f"Adjust learning rate function {options['adjust_lr_fn']} is not supported. "
            "Expected None, 'original' or 'match_rms_adamw'."
        )
    resolve_coefficients(options["ns_coefficients"], options["ns_coefficient_set"], options["ns_steps"])
    custom = options["ns_coefficient_set"]
    if warn and custom is not None and not isinstance(custom, str) and len(custom) > options["ns_steps"]:
        warnings.warn(
            f"ns_coefficient_set has {len(custom)} triples but ns_steps={options['ns_steps']}; the last "
            f"{len(custom) - options['ns_steps']} are unused. Pass ns_steps={len(custom)} to use them all.",
            stacklevel=4,
        )
    resolve_dtype(options["ns_dtype"])
    resolve_algorithm(options["ns_algorithm"])
    if not isinstance(options["batched_weights"], bool):
        raise ValueError(
            f"Invalid batched_weights: {options['batched_weights']!r}. Expected True (orthogonalize each 2-D "
            "slice of a (..., m, n) weight) or False (only 2-D parameters, as torch.optim.Muon)."
        )
    split = options["split_sizes"]
    if split is not None and (
        not isinstance(split, (tuple, list))
        or not split
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in split)
    ):
        raise ValueError(
            f"Invalid split_sizes: {split!r}. Expected None (each matrix whole, as torch.optim.Muon) or a "
            "sequence of positive ints, the row counts of the blocks a fused weight stacks (e.g. "
            "(q_dim, kv_dim, kv_dim) for a fused QKV weight, (head_dim,) * n_heads per head)."
        )
    k = options["row_interleave"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(
            f"Invalid row_interleave: {k!r}. Expected an int >= 1: 1 (default) orthogonalizes each matrix whole, k > 1 "
            "treats a weight whose rows alternate between k matrices (gpt_oss's mlp1: gate and up rows, k=2) as those k."
        )
    if k > 1 and split is not None:
        raise ValueError(
            f"Muon got split_sizes={split!r} and row_interleave={k}: a weight's rows are either contiguous blocks or "
            "interleaved matrices. Give each layout its own param group."
        )
    if options["foreach"] is not None and not isinstance(options["foreach"], bool):
        raise ValueError(
            f"Invalid foreach: {options['foreach']!r}. Expected None (stack same-shaped matrices except on "
            "CPUs), True (always stack) or False (one matrix at a time)."
        )


class Muon(Optimizer):
    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = KELLER_COEFFICIENTS,
        eps: float = EPS,
        ns_steps: int = DEFAULT_NS_STEPS,
        adjust_lr_fn: AdjustLrT | None = None,
        *,
        ns_coefficient_set: CoeffSetT | Sequence[tuple[float, float, float]] | None = None,
        ns_dtype: torch.dtype | str = torch.bfloat16,
        foreach: bool | None = None,
        ns_algorithm: NsAlgorithmT = "standard",
        batched_weights: bool = False,
        split_sizes: Sequence[int] | None = None,
        row_interleave: int = 1,
    ) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
            "ns_coefficient_set": ns_coefficient_set,
            "ns_dtype": ns_dtype,
            "foreach": foreach,
            "ns_algorithm": ns_algorithm,
            "batched_weights": batched_weights,
            "split_sizes": None if split_sizes is None else tuple(split_sizes),
            "row_interleave": row_interleave,
        }
        _validate_options(defaults, warn=False)
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            logger.info(
                "Muon param group %d: %d matrices, %d elements, lr=%s, weight_decay=%s, momentum=%s, "
                "nesterov=%s, adjust_lr_fn=%s, ns_steps=%d, ns_coefficient_set=%s, ns_dtype=%s, ns_algorithm=%s",
                i, len(group["params"]), sum(p.numel() for p in group["params"]), group["lr"],
                group["weight_decay"], group["momentum"], group["nesterov"], group["adjust_lr_fn"],
                group["ns_steps"], group["ns_coefficient_set"], group["ns_dtype"], group["ns_algorithm"],
            )  # fmt: skip

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if isinstance(group.get("split_sizes"), list):
            group["split_sizes"] = tuple(group["split_sizes"])
        try:
            _validate_options(group)
            for p in group["params"]:
                if group["split_sizes"] is not None:
                    check_split(p, group["split_sizes"])
                if group["row_interleave"] > 1:
                    check_interleave(p, group["row_interleave"])
                if group["batched_weights"] and p.ndim > 2:
                    if not whole_locally(p):
                        raise ValueError(
                            f"Muon(batched_weights=True) orthogonalizes the 2-D slices of plain tensors, and of "
                            f"DTensors sharded on their stack dims only; got a DTensor of shape {tuple(p.shape)} "
                            f"with placements {p.placements}, which splits its matrices. Shard such weights on "
                            "dim 0 (e.g. FSDP2 shard_placement_fn returning Shard(0)), or split them into 2-D "
                            "parameters."
                        )
                    continue
                if p.ndim != 2:
                    raise ValueError(
                        f"Muon only supports 2D parameters whereas we found a parameter with size: {p.size()}. "
                        "Route embeddings, the LM head, norms, biases and gamma to AdamW "
                        "(pcopt.param_groups / build_optimizer do this by name). For (..., m, n) "
                        "weights such as MoE experts pass batched_weights=True."
                    )
        except ValueError:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # checkpoints written by torch.optim.Muon lack the extra keys
            group.setdefault("ns_coefficient_set", None)
            group.setdefault("ns_dtype", torch.bfloat16)
            group.setdefault("foreach", None)
            group.setdefault("ns_algorithm", "standard")
            group.setdefault("batched_weights", False)
            group.setdefault("split_sizes", None)
            group.setdefault("row_interleave", 1)

    def _init_group(
        self,
        group: MutableMapping[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor],
    ) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            if torch.is_complex(p) or torch.is_complex(p.grad):
                raise RuntimeError(
                    f"Muon does not support complex parameters or gradients, got dtype {p.grad.dtype} for a "
                    f"parameter of shape {tuple(p.shape)}. Optimize real and imaginary parts as separate "
                    "real parameters (torch.view_as_real)."
                )
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"Muon does not support sparse gradients (parameter of shape {tuple(p.shape)}). Use "
                    "dense gradients (e.g. nn.Embedding(sparse=False)) or optimize it with another optimizer."
                )
            if p.grad.shape != p.shape:
                raise RuntimeError(
                    f"Muon expects a gradient of its parameter's shape, got shape {tuple(p.grad.shape)} for a "
                    f"parameter of shape {tuple(p.shape)}. Assign p.grad a tensor of p's shape."
                )
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            momentum_buffers.append(state["momentum_buffer"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): a closure that reevaluates the model and returns the loss.
        """
        if "_ns_dtype_checked" not in self.__dict__:  # first step only: is bf16 emulated on this CPU?
            self._ns_dtype_checked = True
            warn_slow_newton_schulz(self.param_groups)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            momentum_buffers: list[Tensor] = []
            self._init_group(group, params, grads, momentum_buffers)
            muon(
                params,
                grads,
                momentum_buffers,
                foreach=group["foreach"],
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                nesterov=group["nesterov"],
                ns_coefficients=group["ns_coefficients"],
                eps=group["eps"],
                ns_steps=group["ns_steps"],
                adjust_lr_fn=group["adjust_lr_fn"],
                ns_coefficient_set=group["ns_coefficient_set"],
                ns_dtype=group["ns_dtype"],
                ns_algorithm=group["ns_algorithm"],
                split_sizes=group["split_sizes"],
                row_interleave=group["row_interleave"],
            )
        return loss


Muon.__doc__ = r"""Implements Muon (MomentUm Orthogonalized by Newton-Schulz), compatible with ``torch.optim.Muon``.

    .. math::
       \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)},\ \lambda \text{ (weight decay)},\ \mu \text{ (momentum)},\
                \textit{nesterov},\ (a_t, b_t, c_t)_{t=1}^{k} \text{ (NS coefficients)},\ \varepsilon,\
                s \text{ (norm factor)} \\
            &\textbf{initialize}: B_0 \leftarrow 0 \\
            &\textbf{for}\ t = 1, 2, \ldots: \\
            &\quad g_t \leftarrow \nabla_\theta f_t(\theta_{t-1}) \\
            &\quad B_t \leftarrow \mu B_{t-1} + (1 - \mu) g_t
                \quad \text{(EMA, stored as ``momentum\_buffer``)} \\
            &\quad \widetilde B_t \leftarrow (1 - \mu) g_t + \mu B_t \ \text{if nesterov, else } B_t \\
            &\quad X \leftarrow \widetilde B_t^{(\top \text{ if rows} > \text{cols})} /
                \max(s \lVert \widetilde B_t \rVert_F, \varepsilon) \quad \text{(in ns\_dtype)} \\
            &\quad \textbf{for}\ j = 1..k:\ A \leftarrow X X^\top;\ X \leftarrow a_j X + (b_j A + c_j A^2) X \\
            &\quad O_t \leftarrow X^{(\top \text{ if transposed})} \\
            &\quad \theta_t \leftarrow (1 - \gamma \lambda)\, \theta_{t-1}
                \quad \text{(decoupled weight decay, unadjusted lr)} \\
            &\quad \theta_t \leftarrow \theta_t - \mathrm{AdjustLR}(\gamma; A, B)\, O_t
       \end{aligned}

    ``AdjustLR`` is ``gamma * sqrt(max(1, A/B))`` for ``adjust_lr_fn=None``/``"original"`` (Keller Jordan) and
    ``0.2 * gamma * sqrt(max(A, B))`` for ``"match_rms_adamw"`` (Moonshot; the PC-layer paper's Muon, which
    then shares its lr with the AdamW group).

    Args:
        params (iterable): 2-D parameters or param-group dicts (extra group keys are kept and ignored).
            Embeddings, the LM head, norms, biases and PC ``gamma`` belong to AdamW; use
            :func:`pcopt.param_groups` or :func:`pcopt.build_optimizer` to split a model by name.
        lr (float, Tensor, optional): learning rate (default: 1e-3).
        weight_decay (float, optional): decoupled weight decay, applied with the unadjusted lr (default: 0.1).
        momentum (float, optional): EMA momentum in ``[0, 1)`` (default: 0.95).
        nesterov (bool, optional): Nesterov-style mix of gradient and momentum (default: True).
        ns_coefficients (tuple of three floats, optional): ``(a, b, c)`` used at every Newton-Schulz step
            when ``ns_coefficient_set`` is None (default: Keller Jordan's (3.4445, -4.775, 2.0315)).
        eps (float, optional): lower clamp of the Frobenius norm before normalization (default: 1e-7).
        ns_steps (int, optional): number of Newton-Schulz steps, 1..99 (default: 5).
        adjust_lr_fn (str, optional): None or ``"original"``, or ``"match_rms_adamw"`` (default: None).

    Keyword-only args (pcopt additions):
        ns_coefficient_set (str or list of triples, optional): ``"keller"`` (Keller's triple at every step),
            ``"polar_express"`` (Amsel et al. 2025 per-step coefficients with the 1.01 safety factor, also on
            the normalization; use ``ns_steps`` up to 8, the last triple repeats beyond), or a list of
            ``(a, b, c)``, one per step (the last repeats if the list is shorter than ``ns_steps``; extra
            triples are unused). None (default) uses ``ns_coefficients`` at every step, as torch.
        ns_dtype (torch.dtype or str, optional): dtype of the iteration: bf16 (default, as torch), fp16, fp32
            or fp64 (also as strings ``"bf16"``, ``"fp32"``...).
        foreach (bool, optional): True stacks same-shaped matrices into one batched matmul chain per shape
            (chunked to bound memory); None (default) does so off CPUs, and on CPUs only for small matrices
            (up to 2^17 elements, in cache-sized chunks; large ones run one at a time, which is faster there,
            see docs/muon.md); False runs the per-matrix reference loop. All give the same bits.
        ns_algorithm (str, optional): ``"standard"`` (default, as torch) or ``"gram"``, the FLOP-lean path:
            Gram Newton-Schulz on rectangular matrices (iterates on the small ``min(m, n)`` square Gram
            matrix, restarting once in bf16; square matrices keep the standard iteration), and, on matrices
            whose small side is at least 512, every symmetric product (``X X^T``, ``A^2``, the Gram
            iteration's) computed as the 3 blocks on and above the diagonal of a 2 x 2 tiling (0.75x its
            FLOPs). The same polynomial of the update; not bitwise torch's. The default of
            :func:`pcopt.build_optimizer`.
        split_sizes (sequence of int, optional): None (default, as torch) orthogonalizes each matrix whole; row
            counts summing to the rows of every parameter of the group treat a fused weight as the blocks it
            stacks: ``(q_dim, kv_dim, kv_dim)`` for a fused QKV weight, ``(head_dim,) * n_heads`` for per-head
            Muon. Each block gets its own Newton-Schulz and its lr adjusted by its own shape, exactly as if it
            were a separate parameter (the momentum buffer stays one tensor). Plain tensors are split into row views;
            a DTensor (FSDP2, TP) is split on the owner rank of its full matrix, and each local row is updated
            with its block's lr, so the step equals the unsharded one.
        row_interleave (int, optional): 1 (default, as torch) orthogonalizes each matrix whole; ``k > 1`` treats a
            weight whose rows alternate between ``k`` matrices (row ``r`` belongs to matrix ``r % k``; gpt_oss's fused
            ``mlp1`` stacks gate and up rows this way, ``k = 2``) as those ``k`` matrices: each gets its own
            Newton-Schulz and its lr adjusted by its own shape ``(rows / k, cols)``, stepped as a contiguous copy
            (bitwise the step of a separate parameter) and written back in place. Plain tensors, and DTensors
            whose matrices lie whole on each rank (stacks sharded on their stack dims); not with ``split_sizes``.
        batched_weights (bool, optional): False (default, as torch) refuses parameters that are not 2-D;
            True treats a ``(..., m, n)`` parameter (MoE experts ``(E, m, n)``) as a batch of matrices and
            orthogonalizes each 2-D slice on its own (lr adjusted by ``(m, n)``). Plain tensors only.

    DTensors (FSDP2, HSDP, TP, FSDP x TP: any mix of ``Shard(0)``, ``Shard(1)``, ``_StridedShard`` and
    ``Replicate`` on a 1-D or 2-D mesh) are orthogonalized on the full matrix, once in the world: each matrix
    has an owner rank of its mesh (balanced by FLOPs) that gathers it, runs Newton-Schulz batched with its
    other same-shaped matrices, and sends every rank its block of the result (two ``all_to_all`` collectives
    per mesh, param group and step, in ``ns_dtype``). The result is bitwise the same as unsharded.
    Momentum and the update stay on the local shards.

    Example::

        >>> from pcopt.optim import Muon
        >>> opt = Muon([p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n],
        ...            lr=0.02, adjust_lr_fn="match_rms_adamw", ns_coefficient_set="polar_express")
        >>> loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
    """
