"""PCState.attach keeps the PC state current through a step hook on any optimizer, the one the loop steps or one
stepped inside it (a CombinedOptimizer's child, a Spectra base): the refresh then waits for the outermost step.

The references are closed-form: a refresh by hand (``pcopt.refresh``) after the same stock optimizer's step, and
the effective weight recomputed from the final raw weight and gamma.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import pcopt
from pcopt.optim import CombinedOptimizer, Muon, Spectra


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4))
    pcopt.precondition(model[0], degree=9)
    return model


def _train(model, opt, steps: int, seed: int = 1, sched=None, manual_refresh: bool = False) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 10, generator=gen)
        model(x).square().mean().backward()
        opt.step()
        if manual_refresh:
            pcopt.refresh(model)
        if sched is not None:
            sched.step()
        opt.zero_grad()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"lr": 3e-3, "betas": (0.9, 0.95), "weight_decay": 0.1, "foreach": True},
        {"lr": 1e-2, "amsgrad": True, "foreach": False, "maximize": True},
    ],
    ids=["defaults", "paper-foreach", "amsgrad-loop"],
)
def test_attached_refresh_equals_a_refresh_by_hand_bitwise(kwargs):
    a, b = _model(), _model()
    opt_a = torch.optim.AdamW(a.parameters(), **kwargs)
    pcopt.PCState(a).attach(opt_a)
    opt_b = torch.optim.AdamW(b.parameters(), **kwargs)
    _train(a, opt_a, 4)
    _train(b, opt_b, 4, manual_refresh=True)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name  # raw weights, gamma, u and v
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), _model().parameters()))


def _sigma_error(pc) -> float:
    W = pc.raw_weight.detach().double()
    exact = torch.linalg.matrix_norm(W, 2)
    return (abs(pc.u.double() @ W @ pc.v.double() - exact) / exact).item()


@pytest.mark.parametrize("attached", [True, False])
def test_step_refreshes_only_when_attached(attached):
    model = _model()
    pc = model[0].parametrizations.weight[0]
    with torch.no_grad():
        pc.reset_state()
    u0 = pc.u.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    if attached:
        pcopt.PCState(model).attach(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stale-state warning is tested in test_muon
        _train(model, opt, 3)
    if attached:
        assert _sigma_error(pc) < 1e-4  # 10 warm iterations per step on a 16x10 matrix: converged
    else:
        assert torch.equal(pc.u, u0) and _sigma_error(pc) > 1e-2


def test_refresh_runs_through_lr_scheduler_and_on_any_optimizer():
    model = _model()
    pc = model[0].parametrizations.weight[0]
    with torch.no_grad():
        pc.reset_state()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    pcopt.PCState(model, num_power_iterations=50).attach(opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, 2, sched=sched)
    assert _sigma_error(pc) < 1e-4
    other = _model(1)
    pc2 = other[0].parametrizations.weight[0]
    with torch.no_grad():
        pc2.reset_state()
    sgd = torch.optim.SGD(other.parameters(), lr=0.05)
    handle = pcopt.PCState(other, num_power_iterations=50).attach(sgd)
    _train(other, sgd, 2)
    assert _sigma_error(pc2) < 1e-4
    handle.remove()
    assert not sgd._optimizer_step_pre_hooks and not sgd._optimizer_step_post_hooks
    with pytest.raises(TypeError, match=r"PCState.attach expects a torch.optim.Optimizer, got list"):
        pcopt.PCState(other).attach([sgd])


def _once_per_step_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16, bias=False), nn.Tanh(), nn.Linear(16, 4, bias=False))
    pcopt.precondition_model(model, targets=r"^0$", degree=5)  # once per step, the default
    return model


def _counting(state: pcopt.PCState) -> list[int]:
    calls: list[int] = []
    after_step = state.after_step
    state.after_step = lambda: (calls.append(1), after_step())[1]
    return calls


def test_state_attached_to_a_child_refreshes_once_after_every_child_stepped():
    """Attached to the Muon child, the refresh must still follow the AdamW child's gamma update: W_eff is written
    from the final W and gamma (a refresh inside the Muon child's step would write it with the old gamma)."""
    model = _once_per_step_model()
    groups = pcopt.param_groups(model)
    muon = Muon([g for g in groups if g["algorithm"] == "muon"], lr=0.05, ns_dtype=torch.float32)
    adamw = torch.optim.AdamW([g for g in groups if g["algorithm"] == "adamw"], lr=0.05)
    opt = CombinedOptimizer({"muon": muon, "adamw": adamw})
    state = pcopt.PCState(model)
    calls = _counting(state)
    state.attach(muon)
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        model(torch.randn(8, 12, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        assert len(calls) == step + 1  # once per outer step, not once per child
        (pc,) = [pc for _, pc in pcopt.preconditioners(model)]
        # W_eff recomputed from the final raw weight and gamma, through the per-forward map of the same u, v:
        # the same ops on the same values, so equal to rounding of the one write (fp32, 16x12: < 1e-6).
        expected = pcopt.effective_weight(model[0])
        assert torch.allclose(model[0].weight, expected, rtol=0, atol=1e-6), step
    assert not opt._optimizer_step_post_hooks  # the one-shot hook on the outer optimizer removed itself


def test_state_attached_to_a_spectra_base_refreshes_after_the_clip():
    model = _model()
    base = torch.optim.AdamW(model.parameters(), lr=0.5, weight_decay=0.1)
    opt = Spectra(base, c=0.05, apply_to="2d", dtype=torch.float32)
    state = pcopt.PCState(model, num_power_iterations=50)
    seen = {}
    after_step = state.after_step
    raw = model[0].parametrizations.weight.original

    def spy():
        seen["w"] = raw.detach().clone()
        return after_step()

    state.after_step = spy
    state.attach(base)
    _train(model, opt, 1)
    assert torch.equal(seen["w"], raw)  # it ran after Spectra's step had written the clipped W


def test_a_failed_outer_step_leaves_one_refresh_for_the_next_step():
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)

    class Outer(torch.optim.Optimizer):
        fail = True

        def __init__(self):
            super().__init__([torch.zeros(1, requires_grad=True)], {"lr": 0.0})

        def step(self, closure=None):
            inner.step()
            if Outer.fail:
                raise RuntimeError("outer step failed after its inner step")

    outer = Outer()
    state = pcopt.PCState(model)
    calls = _counting(state)
    state.attach(inner)
    model(torch.randn(8, 10)).square().mean().backward()
    with pytest.raises(RuntimeError, match="outer step failed"):
        outer.step()
    assert calls == []  # deferred to the outer step, which never finished
    Outer.fail = False
    outer.step()
    assert len(calls) == 1  # the next outer step runs it once (not once per attempt)
    inner.step()  # stepped by the loop itself: at once
    assert len(calls) == 2


def test_clones_and_state_dicts_carry_no_hooks():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    pcopt.PCState(model).attach(opt)
    _train(model, opt, 1)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        # the PC state belongs to the model: a clone carries no attach hooks (attach the model's state to it)
        assert not clone._optimizer_step_pre_hooks and not clone._optimizer_step_post_hooks
        assert clone.param_groups[0]["lr"] == 0.01
    fresh = torch.optim.AdamW(model.parameters(), lr=0.01)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_errors():
    with pytest.raises(ValueError, match=r"num_power_iterations must be an integer >= 1, got 0"):
        pcopt.PCState(_model(), num_power_iterations=0)
