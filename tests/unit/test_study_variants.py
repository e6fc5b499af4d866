"""The raw-scale variants of benchmarks/_variants.py (issue 32): retraction, relative step, separate decay.

Small float64 models, plain SGD (so that the expected weights have a closed form), both PC strategies.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pcopt
from benchmarks import _variants as V

STRATEGIES = ("per_forward", "once_per_step")
EPS = 1e-12  # the PC eps of these models: small, so that the W_eff bound below is tight
F64 = torch.finfo(torch.float64).eps


def _model(strategy: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # two weights of one shape (one foreach group) and one of another
    model = nn.Sequential(nn.Linear(8, 12, bias=False), nn.Linear(12, 12, bias=False), nn.Linear(12, 12))
    model = model.double()
    for lin in model:
        pcopt.precondition(lin, degree=5, eps=EPS)
    pcopt.set_strategy(model, strategy)
    pcopt.refresh(model)
    return model


def _params(model: nn.Module) -> list[nn.Parameter]:
    written = {id(p) for p in pcopt.effective_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in written]


def _set_grads(model: nn.Module, seed: int, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in _params(model):
        p.grad = scale * torch.randn(p.shape, generator=g, dtype=p.dtype)


def _sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(_params(model), lr=lr)
    pcopt.PCState(model).attach(opt)
    return opt


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("retract", ["sigma", "fro"])
def test_retraction_keeps_w_eff(strategy, retract):
    ctl_model = _model(strategy)
    ctl = V.RawScaleControl(_sgd(ctl_model, lr=0.3), ctl_model, retract=retract)
    pcs_ctl = pcopt.preconditioners(ctl_model)
    worst = 0.0
    for step in range(3):
        # The twin is the controlled model as it is before this step, stepped without the control: one step
        # of each from the same weights with the same gradients (over several steps the two runs differ, as
        # they should: the retraction changes the dynamics, not the function at a given step).
        ref = copy.deepcopy(ctl_model)
        ref_opt = _sgd(ref, lr=0.3)
        pcs_ref = pcopt.preconditioners(ref)
        _set_grads(ref, seed=step, scale=0.3)
        _set_grads(ctl_model, seed=step, scale=0.3)
        ref_opt.step()
        ctl.step()
        for (fqn, a), (_, b) in zip(pcs_ref, pcs_ctl):
            # The factor c of this step, from the unretracted twin (same u, v directions after the refresh).
            if retract == "sigma":
                c = (ctl.sigma0[fqn] - EPS) / (float(a.sigma()) - EPS)
            else:
                c = ctl.fro0[fqn] / float(a.raw_weight.detach().norm())
            worst = max(worst, abs(1 - c))
            w_ref, w_ctl = a.effective_weight(), b.effective_weight()
            # Bound. W_eff = gamma s p(W / s) is homogeneous of degree 1 in W but for two small constants: the
            # eps of s = u^T W v + eps, and the 1e-7 of the power iteration's normalize, x / (||x|| + 1e-7)
            # (pcopt.spectral.normalize), which makes ||u||, ||v|| = 1 - 1e-7 / (about sigma). Both twins get
            # the same directions of u, v from W and c W, so, in the frame of the unretracted weight,
            # W_eff(retracted) = gamma s' p(W / s') with s' - s = (eps + 2e-7 (1 + 1%)) (1/c - 1) to first order
            # (1%: |u^T W v| <= sigma_1 within a percent after 10 warm-started iterations). Per singular
            # value d/ds [s p(w/s)] = p(x) - x p'(x) = -sum_k 2k c_k x^(2k+1), x = w/s <= 1.01, so
            # ||dW_eff||_2 <= gamma * sum_k 2k |c_k| 1.01^(2k+1) * |s' - s|. Rounding: the degree-5 map is a few
            # 12x12 matmuls in float64, each good to ~12 * 2^-52 relative; 1e-12 ||W_eff||_2 covers it.
            k_sum = sum(2 * k * abs(ck) * 1.01 ** (2 * k + 1) for k, ck in enumerate(a.coefficients))
            gamma = float(b.gamma.detach().abs().max())
            ds = (EPS + 2 * 1e-7 * 1.01) * abs(1 / c - 1)
            bound = gamma * k_sum * ds + 1e-12 * float(torch.linalg.matrix_norm(w_ref, 2))
            diff = float(torch.linalg.matrix_norm(w_ctl - w_ref, 2))
            assert diff <= bound, (
                f"{fqn} step {step}: ||dW_eff||_2 = {diff:.3e} > bound {bound:.3e} (c = {c:.4f})"
            )
            # and the raw weight is back at its initial scale
            if retract == "fro":  # a norm of 144 float64 products: ~1e-15 relative
                got, want = float(b.raw_weight.detach().norm()), ctl.fro0[fqn]
                assert abs(got - want) <= 1e-13 * want, (
                    f"{fqn}: ||W||_F {got} after the retraction, initial {want}"
                )
        if retract == "sigma":
            # The retraction sets the PC layer's estimate u^T W v + eps to sigma0 with the u, v it has at that
            # moment (those of the last refresh). Applied again now, with no refresh in between, it must leave
            # every estimate at sigma0 to float64 rounding (one dot product of 12 terms: 1e-13 relative).
            ctl.retract_(pcs_ctl)
            for fqn, pc in pcs_ctl:
                got, want = float(pc.sigma()), ctl.sigma0[fqn]
                assert abs(got - want) <= 1e-13 * want, (
                    f"{fqn}: sigma {got} after the retraction, initial {want}"
                )
            pcopt.PCState(ctl_model).after_step()  # refresh u, v (and write W_eff) as a step would
    assert worst > 0.1, f"the test's steps barely moved the scale (max |1 - c| = {worst}); make them larger"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rel_step_scales_the_update_by_sigma_over_sigma0(strategy):
    lr = 0.2
    model = _model(strategy)
    ctl = V.RawScaleControl(_sgd(model, lr=lr), model, rel_step=True)
    pcs = pcopt.preconditioners(model)
    _set_grads(model, seed=0, scale=3.0)
    ctl.step()  # first step: sigma == sigma0, the plain SGD step; it changes sigma for the second
    before = {fqn: pc.raw_weight.detach().clone() for fqn, pc in pcs}
    ratio = {fqn: float(pc.sigma()) / ctl.sigma0[fqn] for fqn, pc in pcs}
    assert max(abs(r - 1) for r in ratio.values()) > 0.05, ratio
    _set_grads(model, seed=1)
    grads = {fqn: pc.raw_weight.grad.clone() for fqn, pc in pcs}
    ctl.step()
    for fqn, pc in pcs:
        want = before[fqn] - lr * ratio[fqn] * grads[fqn]  # closed form: SGD's update times sigma / sigma0
        got = pc.raw_weight.detach()
        # W1 + s ((W1 - lr g) - W1): each of the 3 roundings is within one ulp of max(|W1|, |lr g|) (times s)
        atol = 4 * F64 * max(1.0, ratio[fqn]) * float(before[fqn].abs().max() + lr * grads[fqn].abs().max())
        assert torch.allclose(got, want, rtol=0, atol=atol), (
            f"{fqn}: {float((got - want).abs().max()):.3e} > {atol:.3e}"
        )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pcwd_decays_only_the_raw_pc_weights(strategy):
    lr, wd = 0.1, 0.5
    model = _model(strategy)
    ctl = V.RawScaleControl(_sgd(model, lr=lr), model, pc_weight_decay=wd)
    raw_ids = {id(pc.raw_weight) for _, pc in pcopt.preconditioners(model)}
    _set_grads(model, seed=2)
    before = {id(p): p.detach().clone() for p in _params(model)}
    grads = {id(p): p.grad.clone() for p in _params(model)}
    ctl.step()
    for p in _params(model):
        decay = lr * wd if id(p) in raw_ids else 0.0  # SGD's group has weight_decay 0: only X acts
        want = before[id(p)] - lr * grads[id(p)] - decay * before[id(p)]
        # two roundings of values <= max(|W|, |lr g|): 4 ulps of that
        atol = 4 * F64 * float(before[id(p)].abs().max() + lr * grads[id(p)].abs().max())
        assert torch.allclose(p.detach(), want, rtol=0, atol=atol)


@pytest.mark.parametrize(
    "name, field, value",
    [
        ("retract_sigma", "retract", "sigma"),
        ("retract_fro", "retract", "fro"),
        ("rel_step", "rel_step", True),
        ("pcwd0", "pc_weight_decay", 0.0),
        ("pcwd0.3", "pc_weight_decay", 0.3),
        ("deg3+retract_sigma", "retract", "sigma"),
        ("retract_fro+retract_sigma", "retract", "sigma"),  # later parts override
        ("retract_sigma_drop", "retract_drop", True),
        ("retract_fro_drop", "retract", "fro"),
        ("retract_fro_drop", "retract_drop", True),
        ("retract_sigma", "retract_drop", False),
        ("retract_sigma_drop+retract_fro", "retract_drop", False),  # later parts override
    ],
)
def test_parser_accepts(name, field, value):
    v = V.resolve(name)
    assert getattr(v, field) == value and v.name == name


@pytest.mark.parametrize(
    "name, match",
    [
        ("retract", r"unknown variant 'retract'; expected one of .*retract_sigma.*retract_fro"),
        ("pcwd-1", r"variant 'pcwd-1': expected pcwdX with X a non-negative decimal number .* got '-1'"),
        ("pcwdx", r"expected pcwdX .* got 'x' after 'pcwd'"),
        ("rel_step+bogus", r"unknown variant 'bogus'"),
        (
            "retract_sigma_keep",
            r"variant 'retract_sigma_keep': expected retract_sigma, retract_fro, retract_sigma_drop or "
            r"retract_fro_drop, got 'sigma_keep' after 'retract_'\.",
        ),
        ("retract_drop", r"expected retract_sigma, .* got 'drop' after 'retract_'"),
        ("merge10+retract_fro_drop", r"mergeK cannot be combined with retract_\*"),
        ("merge10+retract_sigma", r"mergeK cannot be combined with retract_\*, rel_step or pcwdX"),
    ],
)
def test_parser_refuses(name, match):
    with pytest.raises(ValueError, match=match):
        V.resolve(name)


def test_control_refuses_a_model_without_pc():
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"no PC weights\. Call pcopt\.precondition_model"):
        V.RawScaleControl(torch.optim.SGD(model.parameters(), lr=0.1), model, retract="sigma")
    pc_model = _model("per_forward")
    with pytest.raises(ValueError, match=r"retract must be None, 'sigma' or 'fro', got 'spectral'"):
        V.RawScaleControl(_sgd(pc_model, 0.1), pc_model, retract="spectral")


def _muon_and_adamw(model: nn.Module, raw_optimizer: str, lr: float) -> torch.optim.Optimizer:
    """Muon or AdamW on the raw PC weights, AdamW on gamma and the bias, as one optimizer (pcopt's layout)."""
    raw_ids = {id(pc.raw_weight) for _, pc in pcopt.preconditioners(model)}
    raws = [p for p in _params(model) if id(p) in raw_ids]
    rest = [p for p in _params(model) if id(p) not in raw_ids]
    if raw_optimizer == "muon":
        first = pcopt.optim.Muon(raws, lr=lr, weight_decay=0.0, ns_dtype=torch.float64)
    else:
        first = torch.optim.AdamW(raws, lr=lr, weight_decay=0.0)
    opt = pcopt.optim.CombinedOptimizer(
        {"raw": first, "adamw": torch.optim.AdamW(rest, lr=lr, weight_decay=0.0)}
    )
    pcopt.PCState(model).attach(opt)
    return opt


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("retract", ["sigma", "fro"])
@pytest.mark.parametrize("raw_optimizer", ["muon", "adamw"])
def test_retraction_keeps_the_raw_weights_moments(strategy, retract, raw_optimizer):
    # Every gradient of a raw weight is taken at the retracted scale (sigma0 or ||W0||_F), so its moments must be
    # the plain averages of those gradients: Muon's buffer B <- lerp(B, g, 1 - 0.95), AdamW's exp_avg
    # <- lerp(m, g, 1 - 0.9) and exp_avg_sq <- 0.999 v + 0.001 g^2, whatever the weights do. The code before
    # the fix multiplied them by 1 / c (1 / c^2) at every retraction, which made Muon's effective momentum
    # 0.95 / c (> 1 for c < 0.95: old momentum never decays; in the issue-32 runs |B|_F grew 1e5-fold above its
    # bound max_t |g_t|_F).
    lr, steps = 0.3, 6
    model = _model(strategy)
    ctl = V.RawScaleControl(_muon_and_adamw(model, raw_optimizer, lr), model, retract=retract)
    pcs = pcopt.preconditioners(model)
    expect = {fqn: {} for fqn, _ in pcs}
    applied: list[list[float]] = []  # the factors c of each step's retraction
    retract_ = ctl.retract_
    ctl.retract_ = lambda p: applied.append(retract_(p)) or applied[-1]
    worst = 0.0
    for step in range(steps):
        _set_grads(model, seed=10 + step, scale=0.3)
        # the reference moments: the optimizers' own update rules, replayed on the gradients
        for fqn, pc in pcs:
            g, e = pc.raw_weight.grad, expect[fqn]
            if raw_optimizer == "muon":
                e["momentum_buffer"] = torch.lerp(e.get("momentum_buffer", torch.zeros_like(g)), g, 1 - 0.95)
            else:
                e["exp_avg"] = torch.lerp(e.get("exp_avg", torch.zeros_like(g)), g, 1 - 0.9)
                e["exp_avg_sq"] = e.get("exp_avg_sq", torch.zeros_like(g)) * 0.999 + 0.001 * g * g
        ctl.step()
        worst = max(worst, max(abs(1 - c) for c in applied[-1]))
    for fqn, pc in pcs:
        state = ctl.state[pc.raw_weight]
        for key, want in expect[fqn].items():
            got = state[key]
            # Same float64 ops on the same gradients (up to foreach vs. single-tensor kernels): a few ulps of the
            # largest value per step, over 6 steps. 64 ulps of max |want| covers it; the bug's 1 / c factors differ
            # from 1 by more than 5% (checked below).
            atol = 64 * F64 * float(want.abs().max())
            assert torch.allclose(got, want, rtol=0, atol=atol), (
                f"{fqn} {key}: max |got - want| = {float((got - want).abs().max()):.3e} > {atol:.3e}; "
                f"|got|_F / |want|_F = {float(got.norm() / want.norm()):.4f}"
            )
    assert len(applied) == steps and worst > 0.05, (
        f"the steps barely moved the scale (max |1 - c| = {worst}); make them larger"
    )


def _p_by_svd(w: torch.Tensor, s: float, coefficients) -> tuple[torch.Tensor, float]:
    """``p(w / s)`` through the SVD (independent of pcopt's matmul form) and the largest ``x = sigma_i / s``."""
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    x = S / s
    px = sum(ck * x ** (2 * k + 1) for k, ck in enumerate(coefficients))
    return U @ torch.diag(px) @ Vh, float(x.max())


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("retract", ["sigma", "fro"])
def test_drop_retraction_pins_the_raw_scale_and_leaves_gamma(strategy, retract):
    # retract_*_drop: the raw weight goes back to its initial sigma (or ||W0||_F), gamma and every optimizer state
    # are left as the optimizer made them, and W_eff = gamma * sigma0 * p(W / sigma) with W the plain step's
    # weight: the direction of the plain step, the scale pinned to gamma sigma0. Muon on the raw weights, AdamW
    # on gamma and the bias; a twin without the control gets the same gradients (they are synthetic, so they do
    # not depend on the weights), so its gamma and all of its moments are what the optimizer alone produces.
    lr, steps = 0.3, 6
    model, twin = _model(strategy), _model(strategy)
    ctl = V.RawScaleControl(_muon_and_adamw(model, "muon", lr), model, retract=retract, drop=True)
    twin_opt = _muon_and_adamw(twin, "muon", lr)
    pcs, pcs_twin = pcopt.preconditioners(model), pcopt.preconditioners(twin)
    retract_ = ctl.retract_
    worst = [0.0]

    def checked_retract(p):
        # Called inside ctl.step() after the optimizer's step and before the refresh: u, v are those of the last
        # refresh, the raw weight is the plain step's W. Everything is float64.
        before = {
            fqn: (pc.raw_weight.detach().clone(), float(pc.sigma()), pc.gamma.detach().clone())
            for fqn, pc in p
        }
        cs = retract_(p)
        for (fqn, pc), c in zip(p, cs):
            w, s_pre, gamma = before[fqn]
            worst[0] = max(worst[0], abs(1 - c))
            assert torch.equal(pc.gamma.detach(), gamma), f"{fqn}: the drop retraction changed gamma"
            if retract == "sigma":
                # sigma_hat = u^T (c W) v + eps = c (s_pre - eps) + eps = sigma0: one 12-term dot product and two
                # roundings of c, ~1e-15 relative; 1e-13 leaves room
                got, want = float(pc.sigma()), ctl.sigma0[fqn]
            else:  # a norm of 144 float64 products: ~1e-15 relative
                got, want = float(pc.raw_weight.detach().norm()), ctl.fro0[fqn]
            assert abs(got - want) <= 1e-13 * want, f"{fqn}: scale {got} after the retraction, initial {want}"
            # W_eff = gamma * S * p(W / s_pre), S = c s_pre (= sigma0 + (c - 1) eps for sigma: sigma0 to 1e-12
            # relative, so S = sigma0 is what the sigma case checks). pcopt evaluates gamma s' p(c W / s') with
            # s' = c (s_pre - eps) + eps, i.e. the same with s_pre -> s' / c and S -> s', both off by
            # |1 - 1/c| eps relative to s' (s_pre, s' ~ 0.3-3 here). Per singular value d/ds [s p(w / s)] =
            # -sum_k 2k c_k x^(2k+1) and p(x) itself is <= sum_k |c_k| x^(2k+1), so the eps terms are at most
            # gamma * 2 * sum_k (2k+1) |c_k| x^(2k+1) * |1 - 1/c| eps; rounding (a few 12x12 float64 matmuls and an
            # SVD, ~1e-14 relative) is covered by 1e-12 ||W_eff||_2.
            scale = ctl.sigma0[fqn] if retract == "sigma" else c * s_pre
            p_w, x_max = _p_by_svd(w, s_pre, pc.coefficients)
            want_eff = gamma * scale * p_w
            got_eff = pc.effective_weight()
            k_sum = sum((2 * k + 1) * abs(ck) * x_max ** (2 * k + 1) for k, ck in enumerate(pc.coefficients))
            norm = float(torch.linalg.matrix_norm(want_eff, 2))
            bound = float(gamma.abs().max()) * 2 * k_sum * abs(1 - 1 / c) * EPS * max(1.0, 1 / s_pre)
            bound += 1e-12 * norm
            diff = float(torch.linalg.matrix_norm(got_eff - want_eff, 2))
            assert diff <= bound, (
                f"{fqn}: ||W_eff - gamma S p(W / s)||_2 = {diff:.3e} > {bound:.3e} (c = {c:.4f})"
            )
            # and this is not W_eff kept: the dropped growth is visible at this step's size
            assert (
                abs(norm - float(torch.linalg.matrix_norm(gamma * s_pre * p_w, 2))) >= 0.5 * abs(1 - c) * norm
            )
        return cs

    ctl.retract_ = checked_retract
    for step in range(steps):
        _set_grads(model, seed=20 + step, scale=0.3)
        _set_grads(twin, seed=20 + step, scale=0.3)
        ctl.step()
        twin_opt.step()
        for (fqn, pc), (_, tw) in zip(pcs, pcs_twin):
            assert torch.equal(pc.gamma.detach(), tw.gamma.detach()), (
                f"{fqn} step {step}: gamma {pc.gamma.detach().tolist()} vs the optimizer's {tw.gamma.detach().tolist()}"
            )
            for param, twin_param in ((pc.gamma, tw.gamma), (pc.raw_weight, tw.raw_weight)):
                st, want = ctl.state[param], twin_opt.state[twin_param]
                assert st.keys() == want.keys()
                for key in st:
                    if torch.is_tensor(st[key]):
                        assert torch.equal(st[key], want[key]), (
                            f"{fqn} step {step}: {key} differs from the optimizer's"
                        )
    assert worst[0] > 0.05, f"the steps barely moved the scale (max |1 - c| = {worst[0]}); make them larger"


def test_drop_needs_a_retraction():
    model = _model("per_forward")
    with pytest.raises(ValueError, match=r"drop=True needs a retraction \(retract='sigma' or 'fro'\)"):
        V.RawScaleControl(_sgd(model, 0.1), model, drop=True)
