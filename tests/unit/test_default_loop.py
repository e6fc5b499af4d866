"""The README's training loop, unchanged, runs PC once per step: ``precondition_model`` + ``build_optimizer`` and a
plain ``backward()`` / ``step()`` loop, with gradient accumulation and clipping added and no pcopt call in it.

References: the same loop with ``strategy="per_forward"`` (the parametrize registration, autograd through the map in
every micro-batch). Speed proxies (host syncs, op counts) are measured on that loop as written.
"""

from __future__ import annotations

import pytest
import torch

import pcopt
from pcopt.demo import TinyLlama
from pcopt.profiling import StepProfile

_SMALL = dict(vocab=64, dim=32, n_layers=2, n_heads=2, hidden=64)


def _readme_loop(
    strategy: str | None,
    *,
    dtype,
    accumulation=4,
    steps=3,
    clip=0.5,
    n_layers=2,
    profile=False,
    adamw=None,
    autocast=None,
    record=None,
    prepare=None,
):
    """The README snippet's loop plus accumulation and clipping; returns the final state (and a profile).

    ``strategy``: None (``precondition_model``'s default), a strategy name, or ``"none"`` (no PC: the baseline).
    ``autocast``: a dtype to run forward and loss under ``torch.autocast("cpu", dtype=...)`` (AMP). ``record``: a
    dict that gets each step's ``"losses"`` and its accumulated ``"grads"`` before clipping, by parameter name.
    ``prepare``: called with the model after ``precondition_model``."""
    torch.manual_seed(0)
    model = TinyLlama(**{**_SMALL, "n_layers": n_layers}).to(dtype)
    if strategy != "none":
        kwargs = {} if strategy is None else {"strategy": strategy}
        pcopt.precondition_model(model, degree=5, **kwargs)
    if prepare is not None:
        prepare(model)
    opt = pcopt.build_optimizer(model, lr=1e-2, ns_dtype=dtype, adamw_kwargs=adamw or {})
    g = torch.Generator().manual_seed(1)
    prof = None
    for step in range(steps):
        ctx = StepProfile() if profile and step == steps - 1 else None
        if ctx is not None:
            ctx.__enter__()
        total = 0.0
        for _ in range(accumulation):
            x = torch.randint(0, _SMALL["vocab"], (4, 17), generator=g)
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                logits = model(x[:, :-1])
                loss = (
                    torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()) / accumulation
                )
            loss.backward()
            total = total + loss.detach() if record is not None else total
        if record is not None:
            record.setdefault("losses", []).append(float(total))
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            record.setdefault("grads", []).append(grads)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        if ctx is not None:
            ctx.__exit__(None, None, None)
            prof = ctx
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    return model, state, prof


def test_the_readme_loop_runs_once_per_step_by_default():
    model, _, _ = _readme_loop(None, dtype=torch.float32, steps=1, accumulation=1)
    assert pcopt.strategy_of(model) == "once_per_step"
    assert all(s.effective.grad is None for s in pcopt.strategy.slots(model))  # pulled back by itself


# Tolerance. float64: both paths compute the same gradients in another order (the pull-back's closed form against
# autograd through the map, the micro-batch sum before vs after the pull-back), each within a few hundred units of
# roundoff (2^-53) of its largest terms; Muon's Newton-Schulz then maps them through a polynomial with
# coefficients <= 5 over 5 steps, well-conditioned for these full-rank updates, and 3 steps at lr 1e-2 move each
# weight by <= 3 * 0.2 * sqrt(64) * 1e-2 = 0.05: 1e-12 leaves a factor > 100 over the rounding. fp32: the same with
# 2^-24, ~1e-7 per gradient entry relative to the largest; Newton-Schulz in fp32 amplifies the update's relative
# error by at most its steps' derivative bound, which for these matrices measured < 30 (no near-zero singular
# values of the update): 30 * 1e-7 * 0.05 per step, over 3 steps < 1e-6; 1e-5 leaves 10x. A dropped micro-batch
# moves the weights by ~1e-3 (test_a_dropped_micro_batch_is_caught).
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_default_equals_per_forward_with_accumulation_and_clipping(dtype, atol):
    _, ref, _ = _readme_loop("per_forward", dtype=dtype)
    _, got, _ = _readme_loop(None, dtype=dtype)
    assert ref.keys() == got.keys() and any(".parametrizations.weight.original" in k for k in ref)
    worst = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert worst <= atol, worst


def test_a_dropped_micro_batch_is_caught():
    """The bound above is not vacuous: accumulating 3 of 4 micro-batches moves the weights 100x beyond it."""
    _, ref, _ = _readme_loop("per_forward", dtype=torch.float32)
    _, short, _ = _readme_loop(None, dtype=torch.float32, accumulation=3)
    assert max((ref[k] - short[k]).abs().max().item() for k in ref) > 1e-3


def _map_outside_autocast(model: torch.nn.Module) -> None:
    """Per forward with its map in fp32 under AMP: the once-per-step map's precision (``pcopt.kernel`` computes
    ``W_eff`` with autocast off), while the rest of the forward runs under autocast exactly as before."""
    from pcopt.layer import PolynomialPC

    for _, pc in pcopt.preconditioners(model):

        def forward(W, pc=pc):
            with torch.autocast("cpu", enabled=False):
                return PolynomialPC.forward(pc, W)

        pc.forward = forward


def _normwise(a: dict, b: dict) -> float:
    """``||a - b|| / ||b||`` over all tensors together (Frobenius)."""
    num = sum(((a[k] - b[k]) ** 2).sum() for k in b) ** 0.5
    return float(num / sum((b[k] ** 2).sum() for k in b) ** 0.5)


U_BF16 = 2.0**-8  # bfloat16's unit roundoff: 8 significant bits, round to nearest


# Which ops run in bf16 under torch.autocast("cpu", dtype=torch.bfloat16). The forward around PC is the same in both
# strategies: every Linear casts its input and weight to bf16 and rounds its output; cross-entropy runs in fp32. The
# map is not: once per step computes W_eff outside the forward with autocast off (fp32), while per forward runs the
# map inside the forward, so autocast runs its matmuls (sigma's, the polynomial's) in bf16 - a W_eff off by ~u
# normwise (measured 3.0e-3..3.8e-3 for these matrices), which is no rounding of the same computation. The right
# reference is therefore per forward with its map outside autocast (_map_outside_autocast); plain per forward under
# AMP is a different, less exact computation, and the test shows it lands outside the bound.
#
# Bound on the first step's gradients (same weights in both runs). The two W_eff are the same fp32 map in two
# forms (closed-form Gram polynomial vs autograd's Horner on W), <= 16 fp32 ulps of max|W| apart (measured <= 11).
# The Linear rounds each to bf16; an entry w lands on another bf16 value only if it lies within 2^-20 max|W| of a
# rounding boundary (probability ~ 2 * 2^-20 max|W| / (2^-8 |w|)), and then moves by one bf16 ulp (<= 2^-7 |w|).
# Summed over the entries, the squared normwise change is ~ 2^-27 max|W| sum|w| / ||W||^2 <= 2^-25 for dense
# matrices (max|W| sum|w| <= 4 ||W||^2: max ~ 4 rms, sum|w| ~ 0.8 N rms): normwise <= 2^-12.5 (measured <= 1.6e-5).
# Everything downstream is the same autocast ops on inputs that differ only there, and the gradients respond to a
# weight perturbation with gain < 1 in this 2-layer, RMS-normalised model (the bf16 map's ~u moves them by ~u/4):
# bound 2^-12 = u/16 normwise. Measured 3.8e-6 on the AMD EPYC here (AVX2), 2.0e-8 under ATEN_CPU_CAPABILITY=
# default; plain per forward (bf16 map) 8.7e-4 and 9.2e-4. Nothing in it depends on the machine's bf16 kernels: an AVX-512-BF16 or AMX CPU rounds its bf16
# matmuls differently, but both runs call the same kernel on the same operands except the flipped entries; only
# which entries flip changes, and the count of flips is what the bound is made of.
#
# Bound on the 3 steps' losses. After step 1 the weights differ, so the trajectories are two runs of one
# computation whose roundings differ: the updates are scale-free (Muon orthogonalises, AdamW normalises), so each
# run's departure of the loss from L_0 carries at most one bf16 rounding, u relative, of its size, and the two
# runs' at most 2u: |dL_k| <= 2u max_j |L_j - L_0| (here 0.072 -> 5.6e-4). Measured <= 3.7e-5 (AVX2) and 1.8e-5
# (default); AMP against fp32 itself moves them by 1.7e-4. A dropped micro-batch changes each step's loss by ~1/4.
def test_default_equals_per_forward_under_bf16_autocast():
    runs = {}
    for name, strategy, prepare in (
        ("default", None, None),
        ("reference", "per_forward", _map_outside_autocast),
        ("bf16_map", "per_forward", None),
    ):
        runs[name] = {}
        _readme_loop(
            strategy, dtype=torch.float32, autocast=torch.bfloat16, record=runs[name], prepare=prepare
        )
    default, reference = runs["default"], runs["reference"]
    grads, ref_grads = default["grads"][0], reference["grads"][0]
    assert grads.keys() == ref_grads.keys() and any(".parametrizations.weight.original" in k for k in grads)
    bound = U_BF16 / 16
    assert _normwise(grads, ref_grads) <= bound, _normwise(grads, ref_grads)
    # per forward as it is maps in bf16 under autocast: a different computation, outside the bound
    assert _normwise(runs["bf16_map"]["grads"][0], ref_grads) > bound
    losses, ref_losses = default["losses"], reference["losses"]
    moved = max(abs(x - ref_losses[0]) for x in ref_losses)
    assert moved > 1e-2  # it trains, so the bound below is not that of a frozen model
    worst = max(abs(a - b) for a, b in zip(losses, ref_losses))
    assert worst <= 2 * U_BF16 * moved, (worst, moved)


def pc_ops(strategy: str | None, n_layers: int) -> tuple[int, int]:
    """``(aten ops, host syncs)`` that PC adds to one step of the README loop (fused AdamW, accumulation 1):
    the loop with PC minus the same loop without it, both profiled at their second step."""
    out = []
    for s in ("none", strategy):
        _, _, prof = _readme_loop(s, dtype=torch.float32, steps=2, accumulation=1, n_layers=n_layers, profile=True,
                                  adamw={"fused": True})  # fmt: skip
        out.append((prof.total_ops, prof.total_syncs))
    (base_ops, base_syncs), (ops, syncs) = out
    assert base_syncs == 0, base_syncs  # the reference itself is sync-free, so any sync is PC's
    return ops - base_ops, syncs


def test_readme_loop_adds_no_host_syncs_and_ops_grow_with_shapes_not_layers():
    """The loop as written (auto pull-back at each backward): PC reads nothing on the host, and its op count from
    4 to 16 layers stays within 1.3x (same-shape matrices share one batched pull-back, map and refresh).

    AdamW is the fused one, as on a GPU: torch's unfused AdamW reads each parameter's step counter on the host
    (one sync per parameter, PC's gammas included), which is the optimizer's, not PC's."""
    (ops4, syncs4), (ops16, syncs16) = pc_ops(None, 4), pc_ops(None, 16)
    assert syncs4 == syncs16 == 0
    assert ops4 > 0 and ops16 <= 1.3 * ops4, (ops4, ops16)


def test_a_backward_that_fails_does_not_leave_the_pull_back_off():
    """A backward that raises never runs its end callbacks; the next backward still pulls back."""
    torch.manual_seed(0)
    model = TinyLlama(**_SMALL)
    pcopt.precondition_model(model, degree=5)
    x = torch.randint(0, 64, (2, 9))

    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("boom")

    out = model(x)
    with pytest.raises(RuntimeError, match="boom"):
        (Boom.apply(out[..., :1]).sum() + out.sum()).backward()
    model.zero_grad(set_to_none=True)
    for s in pcopt.strategy.slots(model):
        s.effective.grad = None
    model(x).sum().backward()
    slots = pcopt.strategy.slots(model)
    assert all(s.effective.grad is None for s in slots)
    assert all(s.original.grad is not None for s in slots)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [None, "per_forward"])
def test_torch_compile_matches_eager(strategy):
    """``torch.compile(model)`` in the README loop, in both strategies. Once per step (default) the model is plain
    Linears to dynamo and the auto pull-back still runs at each backward; per forward dynamo traces the parametrize
    registration, so the map and its backward are compiled into the model's graph. Either way: 0 graph breaks, one
    graph, and no recompilation over 20 steps (the per-forward map once guarded on the raw weight's version, which
    every step changes, and recompiled each step until dynamo's limit sent it back to eager).

    Bound: inductor fuses and reorders the forward's (and per forward the map's) fp32 reductions (a few ulps, ~1e-6
    relative, per step), which 20 steps of Muon carry into the losses (~4 nats): measured 4.8e-7 in both
    strategies; 1e-4 leaves 200x, while a lost pull-back (no update of the raw weights) changes the loss by > 1e-2
    within 20 steps."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    kwargs = {} if strategy is None else {"strategy": strategy}

    def run(compiled: bool, steps: int = 20):
        torch.manual_seed(0)
        model = TinyLlama(**_SMALL)
        pcopt.precondition_model(model, degree=5, **kwargs)
        opt = pcopt.build_optimizer(model, lr=1e-2, ns_dtype=torch.float32)
        fwd = torch.compile(model) if compiled else model
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(steps):
            x = torch.randint(0, _SMALL["vocab"], (4, 17), generator=g)
            loss = torch.nn.functional.cross_entropy(fwd(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses, model

    with fresh_cache():  # a private inductor cache (its key leaves out ATEN_CPU_CAPABILITY)
        eager, model = run(False)
        counters.clear()
        compiled, _ = run(True)
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        explained = torch._dynamo.explain(model)(torch.randint(0, _SMALL["vocab"], (4, 16)))
    assert pcopt.strategy_of(model) == (strategy or "once_per_step")
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    assert (graphs, breaks) == (1, 0), (graphs, dict(counters["graph_break"]))  # one compile for all 20 steps
    assert max(abs(a - b) for a, b in zip(eager, compiled)) <= 1e-4
    assert eager[-1] < eager[0] - 1e-2  # it trains: the bound is far below what a lost update does
