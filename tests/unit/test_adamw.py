"""pcopt.optim.AdamW: torch.optim.AdamW's updates bit for bit, plus the PC state refresh after each step."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import pcopt
from pcopt.optim import AdamW


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
    opt_a = AdamW(a.parameters(), **kwargs)
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
    opt = AdamW(model.parameters(), lr=0.05, refresh_preconditioners=refresh)
    _train(model, opt, 3)
    if refresh:
        assert _sigma_error(pc) < 1e-4
    else:
        assert torch.equal(pc.u, u0) and _sigma_error(pc) > 1e-2


def test_refresh_runs_through_lr_scheduler_and_only_for_owned_raw_weights():
    model = _model()
    pc = model[0].parametrizations.weight[0]
    with torch.no_grad():
        pc.reset_state()
    u0 = pc.u.clone()
    # owns only gamma and the second layer: the raw PC weight is not its own, so u stays as it was
    owned = [pc.gamma, *model[2].parameters()]
    opt = AdamW(owned, lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, 2, sched=sched)
    assert torch.equal(pc.u, u0)
    opt2 = AdamW([model[0].parametrizations.weight.original], lr=0.05)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    _train(model, opt2, 2, sched=sched2)
    assert _sigma_error(pc) < 1e-4


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
    opt = AdamW(model.parameters(), lr=0.01, refresh_preconditioners=False, num_power_iterations=4)
    _train(model, opt, 1)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.refresh_preconditioners is False and clone.num_power_iterations == 4
        assert len(clone._optimizer_step_post_hooks) == 1
    fresh = AdamW(model.parameters(), lr=0.01)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_errors():
    with pytest.raises(ValueError, match=r"Invalid num_power_iterations: 0\. Expected None"):
        AdamW(_model().parameters(), num_power_iterations=0)
    with pytest.raises(ValueError, match=r"Invalid learning rate: -1\.0"):  # torch's own validation
        AdamW(_model().parameters(), lr=-1.0)
