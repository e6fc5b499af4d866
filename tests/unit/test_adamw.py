"""pcopt.optim.AdamW: torch.optim.AdamW's updates bit for bit, plus the PC state refresh after each step."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import pcopt
from pcopt.optim import AdamW
from pcopt.state import take_attached


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
def test_updates_equal_torch_adamw_bitwise(kwargs):
    a, b = _model(), _model()
    opt_a = AdamW(a.parameters(), **kwargs, pc_state=a)
    opt_b = torch.optim.AdamW(b.parameters(), **kwargs)
    assert opt_a.defaults == opt_b.defaults
    _train(a, opt_a, 4)
    _train(b, opt_b, 4, manual_refresh=True)  # torch AdamW + pcopt.refresh by hand = pcopt AdamW
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
        assert opt_a.state[pa].keys() == opt_b.state[pb].keys()
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), _model().parameters()))


def _sigma_error(pc) -> float:
    W = pc.raw_weight.detach().double()
    exact = torch.linalg.matrix_norm(W, 2)
    return (abs(pc.u.double() @ W @ pc.v.double() - exact) / exact).item()


@pytest.mark.parametrize("refresh", [True, False])
def test_step_refreshes_owned_pc_weights(refresh):
    model = _model()
    pc = model[0].parametrizations.weight[0]
    with torch.no_grad():
        pc.reset_state()
    u0 = pc.u.clone()
    opt = AdamW(model.parameters(), lr=0.05, pc_state=pcopt.PCState(model) if refresh else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stale-state warning is tested in test_muon
        _train(model, opt, 3)
    if refresh:
        assert _sigma_error(pc) < 1e-4
    else:
        assert torch.equal(pc.u, u0) and _sigma_error(pc) > 1e-2


def test_refresh_runs_through_lr_scheduler_and_attach_serves_any_optimizer():
    model = _model()
    pc = model[0].parametrizations.weight[0]
    with torch.no_grad():
        pc.reset_state()
    opt = AdamW(model.parameters(), lr=0.05, pc_state=pcopt.PCState(model, num_power_iterations=50))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, 2, sched=sched)
    assert _sigma_error(pc) < 1e-4
    # the stock optimizer, with the state attached as a step post-hook
    other = _model(1)
    pc2 = other[0].parametrizations.weight[0]
    with torch.no_grad():
        pc2.reset_state()
    sgd = torch.optim.SGD(other.parameters(), lr=0.05)
    handle = pcopt.PCState(other, num_power_iterations=50).attach(sgd)
    _train(other, sgd, 2)
    assert _sigma_error(pc2) < 1e-4
    handle.remove()
    with pytest.raises(TypeError, match=r"PCState.attach expects a torch.optim.Optimizer, got list"):
        pcopt.PCState(other).attach([sgd])


def test_step_hooks_run_once_per_step():
    model = _model()
    opt = AdamW(model.parameters())
    calls = {"pre": 0, "post": 0}
    opt.register_step_pre_hook(lambda *a: calls.__setitem__("pre", calls["pre"] + 1))
    opt.register_step_post_hook(lambda *a: calls.__setitem__("post", calls["post"] + 1))
    _train(model, opt, 3)
    assert calls == {"pre": 3, "post": 3}


def test_deepcopy_pickle_and_state_dict_keep_behaviour():
    model = _model()
    opt = AdamW(model.parameters(), lr=0.01, pc_state=model)
    _train(model, opt, 1)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        # the PC state belongs to the model: a clone carries no attach hooks (attach the model's state to it)
        assert take_attached(clone) == []
        assert clone.param_groups[0]["lr"] == 0.01
    fresh = AdamW(model.parameters(), lr=0.01)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_errors():
    with pytest.raises(
        TypeError, match=r"AdamW: pc_state must be a pcopt.PCState \(or the preconditioned model\), got int"
    ):
        AdamW(_model().parameters(), pc_state=3)
    with pytest.raises(ValueError, match=r"num_power_iterations must be an integer >= 1, got 0"):
        pcopt.PCState(_model(), num_power_iterations=0)
    with pytest.raises(ValueError, match=r"Invalid learning rate: -1\.0"):  # torch's own validation
        AdamW(_model().parameters(), lr=-1.0)
