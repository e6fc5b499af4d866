"""Named variants of the token-efficiency arms (PC placement, degree, gamma handling, PC-then-merge, Muon lr rule).

A variant changes how one arm of :mod:`benchmarks.token_efficiency` is set up, never the default arms. It is
selected with ``--variant NAME`` (or the ``arm:NAME`` arm specs of :mod:`benchmarks.study`) and takes part in
the run's cache key, so variant runs never collide with default runs. Names:

* ``deg3``, ``deg5``, ``deg7``, ``deg9``: the PC polynomial of that degree instead of the recipe's.
* ``ffn``, ``wo``: PC on the FFN matrices only / on the attention output only.
* ``gamma_frozen``: gamma fixed at 1 (``learn_gamma=False``).
* ``gamma_nowd``: gamma learned without weight decay (Muon: ``gamma_weight_decay=0``).
* ``mergeK`` (``merge0`` ... ``merge100``): PC for the first K% of the steps, then :func:`pcopt.merge` and plain
  training of the merged weights by the same optimizer (the raw parameters are kept, so is their optimizer
  state). ``merge0`` merges before the first step: plain training from the PC-flattened initialisation
  ``sigma p(W0 / sigma)``. To first order in the lr this is what a Muon that orthogonalizes in ``W_eff``
  space and pulls the update back through the inverse PC Jacobian would do (see docs/study.md).
* ``adjust_original``: Muon's ``adjust_lr_fn="original"`` (``sqrt(max(1, A/B))``) instead of
  ``match_rms_adamw`` (``0.2 sqrt(max(A, B))``); the AdamW part keeps the arm's lr divided by
  :data:`ADJUST_ORIGINAL_LR_FACTOR`, so the ``--lr-muon`` of this variant is the Muon lr.

* ``retract_sigma``: after every optimizer step, each raw PC weight is rescaled to its initial top singular
  value, ``W <- c W`` with ``c = (sigma0 - eps) / (sigma_hat - eps)`` (``sigma_hat = u^T W v + eps`` of
  :meth:`pcopt.PolynomialPC.sigma`, with the ``u``, ``v`` of the last refresh), and ``gamma <- gamma / c``.
  ``W_eff = gamma sg(sigma) p(W / sigma)`` is homogeneous of degree 1 in ``W`` (up to ``eps``), so ``W_eff`` is
  unchanged and the scale of ``W_eff`` lives in ``gamma`` alone. It runs inside the optimizer step, before the
  PC refresh (:class:`RawScaleControl`), in both strategies.
* ``retract_fro``: the same with ``||W||_F`` held at its initial value (``c = ||W0||_F / ||W||_F``).
* ``retract_sigma_drop``, ``retract_fro_drop``: the same rescaling ``W <- c W`` of the raw weight, but gamma
  and its optimizer state are left alone, so the growth of the scale that the step caused is dropped instead of
  moved into gamma. ``sigma`` scales with ``W``, so ``W_eff`` changes by ``c``: ``W_eff = gamma sigma0 p(W /
  sigma)`` (``retract_sigma_drop``; ``||W||_F`` pinned instead for ``retract_fro_drop``). The scale of ``W_eff``
  is then held by gamma, which only its own optimizer moves (fixed-norm training of the raw weight).
* ``rel_step``: the update of each raw PC weight (decay included) is multiplied by ``sigma / sigma0``, with
  ``sigma`` the estimate before the step: a step of fixed size relative to the weight's top singular value,
  equal to the plain one at initialisation (so the lr grid keeps its meaning).
* ``pcwdX`` (``pcwd0``, ``pcwd0.3``, ``pcwd1``): decoupled weight decay ``X`` on the raw PC weights only
  (the rest keeps 0.1); applied exactly as ``W_new + lr (wd - X) W_old`` after the step, for optimizers whose
  decay is ``W <- (1 - lr wd) W`` (Muon and AdamW both are).

Optimizer state under the retractions (both kinds): a moment is an average of gradients, and it is only rescaled if the
parameter's scale changed between the steps whose gradients it averages. The raw weight's did not: every
gradient is taken at a retracted weight, at ``sigma0`` (or ``||W0||_F``); the unretracted ``W_t + dW_t`` only
exists between the optimizer step and the retraction, and no gradient is taken there. So the raw weight's
moments (Muon's ``momentum_buffer``, AdamW's ``exp_avg``, ``exp_avg_sq``) are left as they are. Under the
``_drop`` retractions gamma is not touched, and neither is its state. Under the others gamma's scale does change,
by ``1 / c`` per step, and at a fixed ``W_eff`` its gradient scales by ``c``. So gamma's AdamW
moments are multiplied by ``c`` and ``c^2``, which leaves its Adam direction ``m / sqrt(v)`` unchanged.
(Until this was fixed, the raw weight's moments were also multiplied by ``1 / c`` at every step. With Muon the
buffer ``B <- 0.95 B + 0.05 g`` then became ``0.95 / c`` old momentum plus new gradient, and the old momentum
never decayed once ``1 / c > 1 / 0.95``; see docs/study.md, issue 32.) Weight decay on the raw weight has no
lasting effect under a retraction (the retraction resets the scale); the decay of gamma is then the decay of
``W_eff``.

What a retraction that keeps ``W_eff`` does not bound: it keeps ``W_eff`` unchanged, so the growth of ``sigma`` that one step
causes is kept too, now in gamma. With the raw weight held at ``sigma0``, Muon's step has a fixed size
relative to ``sigma``, so this growth compounds (``gamma = prod 1/c``): ``W_eff`` grows geometrically. Without
a retraction the same steps grow ``sigma`` additively. Gamma's own decay (``lr * wd`` per step) and its AdamW step
(about ``lr``, additive) cannot stop it once gamma is large. The ``_drop`` retractions are the variant this points
to: the growth is discarded at every step.

Variants may be combined with ``+`` (``deg3+gamma_nowd``, ``retract_sigma+rel_step``); later parts override
earlier ones where both set the same thing. Unknown names raise ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import torch
from torch import nn

import pcopt
from benchmarks import _common as C
from pcopt import recipes

__all__ = ["ADJUST_ORIGINAL_LR_FACTOR", "RawScaleControl", "Variant", "names", "resolve"]

# match_rms_adamw scales the lr of a (192, 512) matrix by 0.2 * sqrt(512) = 4.5 and "original" by 1-2.7: with
# "original" the Muon lr has to be about this much larger for the same update size.
ADJUST_ORIGINAL_LR_FACTOR = 4.0

FFN_TARGETS = r"(^|\.)feed_forward\.w[123]$"
WO_TARGETS = r"(^|\.)attention\.wo$"


@dataclasses.dataclass
class Variant:
    """What a variant changes; ``None`` fields keep the arm's default."""

    name: str
    degree: int | None = None
    targets: str | None = None
    learn_gamma: bool | None = None
    gamma_weight_decay: float | None = None
    merge_fraction: float | None = None
    adjust_lr_fn: str | None = None
    retract: str | None = None  # "sigma" | "fro": the raw weight's scale held fixed
    retract_drop: bool = False  # True: the step's growth of the scale is dropped; False: gamma absorbs it
    rel_step: bool = False  # raw PC weights' update scaled by sigma / sigma0
    pc_weight_decay: float | None = None  # decoupled decay of the raw PC weights only
    describe: list[str] = dataclasses.field(default_factory=list)

    # -- hooks called by benchmarks.token_efficiency.train_arm ---------------------------------------------
    def pc_degree(self, optimizer: str) -> int:
        return self.degree or C.PC_DEGREE[optimizer]

    def precondition(self, model: nn.Module, optimizer: str) -> list[str]:
        return pcopt.precondition_model(
            model, targets=self.targets, degree=self.pc_degree(optimizer), learn_gamma=self.learn_gamma
        )

    def build_optimizers(
        self, model: nn.Module, optimizer: str, lr: float
    ) -> tuple[list[torch.optim.Optimizer], bool]:
        opts, self_refresh = self._build_optimizers(model, optimizer, lr)
        if self.retract is None and not self.rel_step and self.pc_weight_decay is None:
            return opts, self_refresh
        if not self_refresh:
            raise ValueError(
                f"variant {self.name!r} needs optimizers with the PC state attached (pcopt.PCState.attach) so that "
                "the refresh follows the raw-scale control; got ones that do not refresh themselves."
            )
        wrapped = [
            RawScaleControl(
                o,
                model,
                retract=self.retract,
                drop=self.retract_drop,
                rel_step=self.rel_step,
                pc_weight_decay=self.pc_weight_decay,
            )
            for o in opts
        ]
        return wrapped, True

    def _build_optimizers(
        self, model: nn.Module, optimizer: str, lr: float
    ) -> tuple[list[torch.optim.Optimizer], bool]:
        if optimizer == "muon" and (self.gamma_weight_decay is not None or self.adjust_lr_fn is not None):
            import pcopt.optim

            kwargs = {}
            if self.gamma_weight_decay is not None:
                kwargs["gamma_weight_decay"] = self.gamma_weight_decay
            if self.adjust_lr_fn is not None:
                kwargs["adjust_lr_fn"] = self.adjust_lr_fn
                kwargs["adamw_lr"] = lr / ADJUST_ORIGINAL_LR_FACTOR
            return [pcopt.optim.build_optimizer(model, lr=lr, **kwargs)], True
        if optimizer == "adamw" and self.gamma_weight_decay is not None:
            import pcopt.optim

            gammas = [p for n, p in model.named_parameters() if n.endswith("gamma") and p.requires_grad]
            ids = {id(p) for p in gammas}
            rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
            groups = [{"params": rest}] + (
                [{"params": gammas, "weight_decay": self.gamma_weight_decay}] if gammas else []
            )
            opt = torch.optim.AdamW(groups, lr=lr, **dict(recipes.ADAMW))
            if pcopt.preconditioners(model):
                pcopt.PCState(model).attach(opt)
            return [opt], True
        return C.build_optimizers(model, optimizer, lr)

    def merge_step(self, steps: int) -> int | None:
        """The step (0-based, before it runs) at which the PC layers are merged, or None."""
        if self.merge_fraction is None:
            return None
        return round(self.merge_fraction * steps)

    def before_step(self, model: nn.Module, step: int, steps: int) -> bool:
        """Called before each step; merges at :meth:`merge_step`. Returns whether PC is still active."""
        at = self.merge_step(steps)
        if at is not None and step == at and pcopt.preconditioners(model):
            pcopt.merge(model)
        return bool(pcopt.preconditioners(model))


def _parse_one(part: str) -> Callable[[Variant], None]:
    if m := re.fullmatch(r"deg([3579])", part):
        degree = int(m.group(1))
        return lambda v: (setattr(v, "degree", degree), v.describe.append(f"PC degree {degree}"))
    if m := re.fullmatch(r"merge(\d{1,3})", part):
        k = int(m.group(1))
        if k > 100:
            raise ValueError(f"variant {part!r}: K must be 0..100 (percent of the steps), got {k}.")
        return lambda v: (
            setattr(v, "merge_fraction", k / 100),
            v.describe.append(f"PC for the first {k}% of the steps, then merged"),
        )
    if m := re.fullmatch(r"pcwd(\d+(?:\.\d+)?)", part):
        wd = float(m.group(1))
        return lambda v: (
            setattr(v, "pc_weight_decay", wd),
            v.describe.append(f"weight decay {wd:g} on the raw PC weights only"),
        )
    if m := re.fullmatch(r"retract_(sigma|fro)(_drop)?", part):
        kind, drop = m.group(1), bool(m.group(2))
        norm = "sigma" if kind == "sigma" else "Frobenius norm"
        text = f"raw PC weights retracted to their initial {norm}, " + (
            "the growth dropped (gamma untouched)" if drop else "gamma absorbs the scale"
        )
        return lambda v: (
            setattr(v, "retract", kind),
            setattr(v, "retract_drop", drop),
            v.describe.append(text),
        )
    if part.startswith("retract_"):
        raise ValueError(
            f"variant {part!r}: expected retract_sigma, retract_fro, retract_sigma_drop or retract_fro_drop, got "
            f"{part[8:]!r} after 'retract_'."
        )
    if part.startswith("pcwd"):
        raise ValueError(
            f"variant {part!r}: expected pcwdX with X a non-negative decimal number (pcwd0, pcwd0.3, pcwd1), got "
            f"{part[4:]!r} after 'pcwd'."
        )
    simple = {
        "rel_step": ("rel_step", True, "update of the raw PC weights scaled by sigma / sigma0"),
        "ffn": ("targets", FFN_TARGETS, "PC on FFN matrices only"),
        "wo": ("targets", WO_TARGETS, "PC on attention output only"),
        "gamma_frozen": ("learn_gamma", False, "gamma frozen at 1"),
        "gamma_nowd": ("gamma_weight_decay", 0.0, "gamma without weight decay"),
        "adjust_original": ("adjust_lr_fn", "original", "Muon adjust_lr_fn='original'"),
    }
    if part in simple:
        field, value, text = simple[part]
        return lambda v: (setattr(v, field, value), v.describe.append(text))
    raise ValueError(
        f"unknown variant {part!r}; expected one of {', '.join(names())} (combine with '+', e.g. 'deg3+gamma_nowd')."
    )


def names() -> list[str]:
    """The variant names (``mergeK`` stands for merge0 ... merge100, ``pcwdX`` for pcwd0, pcwd0.3, ...)."""
    return [
        "deg3",
        "deg5",
        "deg7",
        "deg9",
        "ffn",
        "wo",
        "gamma_frozen",
        "gamma_nowd",
        "mergeK",
        "adjust_original",
        "retract_sigma",
        "retract_fro",
        "retract_sigma_drop",
        "retract_fro_drop",
        "rel_step",
        "pcwdX",
    ]


def resolve(name: str | None) -> Variant | None:
    """The :class:`Variant` named ``name`` (``None`` or ``""``: no variant)."""
    if not name:
        return None
    if not isinstance(name, str):
        raise TypeError(f"variant must be a string such as 'deg3' or 'merge25', got {type(name).__name__}.")
    v = Variant(name)
    for part in name.split("+"):
        _parse_one(part.strip())(v)
    if v.merge_fraction is not None and (v.retract or v.rel_step or v.pc_weight_decay is not None):
        raise ValueError(
            f"variant {name!r}: mergeK cannot be combined with retract_*, rel_step or pcwdX (after the merge there "
            "is no raw PC weight left to control); use one of them alone."
        )
    return v


# ----------------------------------------------------------------------------------------------------------
# Control of the raw PC weights' scale: retraction, relative step, separate decay
# ----------------------------------------------------------------------------------------------------------
class RawScaleControl(torch.optim.Optimizer):
    """Wraps the optimizer of a preconditioned model and controls the scale of its raw PC weights.

    ``step()`` runs the wrapped optimizer's step, then (in this order) the decay correction of ``pcwdX``, the
    ``rel_step`` scaling of the update and the retraction (see the module docstring). With ``drop=True`` the
    retraction rescales the raw weights only (gamma and its state are left alone); otherwise gamma takes the
    inverse factor. It is a
    ``torch.optim.Optimizer`` whose ``param_groups`` and ``state`` are the wrapped optimizer's, so lr schedulers
    and ``zero_grad`` act on the wrapped optimizer; the :class:`pcopt.PCState` attached to the wrapped optimizer
    defers its refresh (``u``, ``v``; ``W_eff`` once per step) to the end of this step, so the refresh sees the
    controlled weights, in both strategies.

    The raw weights, gammas and initial scales are looked up through the public
    :func:`pcopt.preconditioners` (``PolynomialPC.raw_weight``, ``.gamma``, ``.sigma()``). Each rescaling is one
    ``torch._foreach_mul_`` per group of raw weights of the same shape and dtype.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        retract: str | None = None,
        drop: bool = False,
        rel_step: bool = False,
        pc_weight_decay: float | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"RawScaleControl wraps a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        if retract not in (None, "sigma", "fro"):
            raise ValueError(f"retract must be None, 'sigma' or 'fro', got {retract!r}.")
        if drop and retract is None:
            raise ValueError(
                "drop=True needs a retraction (retract='sigma' or 'fro'); there is nothing to drop."
            )
        if pc_weight_decay is not None and not (
            isinstance(pc_weight_decay, (int, float)) and pc_weight_decay >= 0
        ):
            raise ValueError(f"pc_weight_decay must be a float >= 0 or None, got {pc_weight_decay!r}.")
        pcs = pcopt.preconditioners(model)
        if not pcs:
            raise ValueError(
                "RawScaleControl: the model has no PC weights. Call pcopt.precondition_model(model) before building "
                "the optimizer."
            )
        self.optimizer, self.model = optimizer, model
        self.retract, self.drop = retract, drop
        self.rel_step, self.pc_weight_decay = rel_step, pc_weight_decay
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.sigma0 = {fqn: self._sigmas([pc])[0] for fqn, pc in pcs}
        self.fro0 = {fqn: float(pc.raw_weight.detach().norm()) for fqn, pc in pcs}
        self._group_of = {id(p): g for g in self.param_groups for p in g["params"]}

    @staticmethod
    @torch.no_grad()
    def _sigmas(pcs) -> list[float]:
        return [float(pc.sigma().reshape(-1)[0]) for pc in pcs]

    def _by_shape(self, items):
        groups: dict[tuple, list] = {}
        for item in items:
            raw = item[1].raw_weight
            groups.setdefault((tuple(raw.shape), raw.dtype), []).append(item)
        return list(groups.values())

    @torch.no_grad()
    def step(self, closure=None):
        pcs = pcopt.preconditioners(self.model)
        for fqn, pc in pcs:
            if pc.batch_shape:
                raise ValueError(
                    f"RawScaleControl: {fqn} is a batched PC weight {tuple(pc.raw_weight.shape)}; only 2-D weights "
                    "are supported (one sigma per weight)."
                )
        prev = None
        if self.rel_step or self.pc_weight_decay is not None:
            prev = [pc.raw_weight.detach().clone() for _, pc in pcs]
        scale = self._sigmas([pc for _, pc in pcs]) if self.rel_step else None  # sigma before the step
        with torch.enable_grad():
            loss = self.optimizer.step(closure)
        raws = [pc.raw_weight.detach() for _, pc in pcs]
        if self.pc_weight_decay is not None:
            # the optimizer decayed W by (1 - lr wd); W_new + lr (wd - X) W_old decays it by (1 - lr X) instead
            alphas = []
            for _, pc in pcs:
                g = self._group_of[id(pc.raw_weight)]
                alphas.append(float(g["lr"]) * (float(g.get("weight_decay", 0.0)) - self.pc_weight_decay))
            torch._foreach_add_(raws, torch._foreach_mul(prev, alphas))
        if self.rel_step:
            # W_old + s (W_new - W_old), s = sigma / sigma0: one foreach op per shape group
            ratios = {fqn: sig / self.sigma0[fqn] for (fqn, _), sig in zip(pcs, scale)}
            index = {fqn: i for i, (fqn, _) in enumerate(pcs)}
            for group in self._by_shape(pcs):
                ids = [index[fqn] for fqn, _ in group]
                new, old = [raws[i] for i in ids], [prev[i] for i in ids]
                delta = torch._foreach_sub(new, old)
                torch._foreach_mul_(delta, [ratios[fqn] for fqn, _ in group])
                torch._foreach_add_(delta, old)
                for w, d in zip(new, delta):
                    w.copy_(d)
        if self.retract is not None:
            self.retract_(pcs)
        return loss

    @torch.no_grad()
    def retract_(self, pcs) -> list[float]:
        """Rescale every raw PC weight to its initial sigma (or Frobenius norm); returns the factors c.

        Gamma is rescaled by ``1 / c`` (so ``W_eff`` is unchanged) unless ``drop``: then gamma and its optimizer
        state are left as the optimizer made them, and ``W_eff`` changes by ``c``.
        """
        if self.retract == "sigma":
            now = self._sigmas([pc for _, pc in pcs])
            factors = [(self.sigma0[fqn] - pc.eps) / (s - pc.eps) for (fqn, pc), s in zip(pcs, now)]
        else:
            factors = [self.fro0[fqn] / float(pc.raw_weight.detach().norm()) for fqn, pc in pcs]
        c_of = {fqn: c for (fqn, _), c in zip(pcs, factors)}
        for group in self._by_shape(pcs):
            cs = [c_of[fqn] for fqn, _ in group]
            raws = [pc.raw_weight.detach() for _, pc in group]
            torch._foreach_mul_(raws, cs)
            if self.drop:
                continue
            gammas = [pc.gamma.detach() for _, pc in group]
            torch._foreach_mul_(gammas, [1.0 / c for c in cs])
            for (_, pc), c in zip(group, cs):
                # gamma's scale changed (its gradient at fixed W_eff scales by c); the raw weight's did not:
                # its gradients are all taken at the retracted scale, so its moments keep their units
                self._rescale_state(pc.gamma, c)
        return factors

    def _rescale_state(self, param: torch.Tensor, k: float) -> None:
        # the gradient of a parameter scaled by 1/k scales by k: first moments by k, second moments by k^2
        st = self.state.get(param)
        if not st:
            return
        for key in ("momentum_buffer", "exp_avg"):
            if key in st:
                st[key].mul_(k)
        if "exp_avg_sq" in st:
            st["exp_avg_sq"].mul_(k * k)
