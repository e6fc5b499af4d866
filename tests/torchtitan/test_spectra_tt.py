"""SPECTRA in torchtitan_ext: the optimizer config's ``spectral_clip``, the ``*_spectra`` configs, checkpoints.

Reference: the same container without the clip, one step from the same state, then the closed form
``(1 - lr wd) X - lr alpha H_c(U)`` with ``H_c`` from a float64 SVD.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytestmark = pytest.mark.torchtitan

pytest.importorskip("torchtitan")

import pcopt  # noqa: E402
import pcopt.hardware  # noqa: E402
from tests.torchtitan._models import build_optimizers, debug_model  # noqa: E402

LR, WD = 1e-2, 0.1


def _container(model, c):
    from torchtitan_ext.optimizer import adamw_config

    cfg = adamw_config(LR, weight_decay=WD)
    cfg.implementation = "for-loop"
    cfg.spectral_clip = c
    return build_optimizers(cfg, model)


def _grads(*models, seed=1):
    g = torch.Generator().manual_seed(seed)
    named = [list(m.named_parameters()) for m in models]
    for row in zip(*named):
        grad = torch.randn(row[0][1].shape, generator=g) * 0.01
        for _, p in row:
            p.grad = grad.clone()


def _soft_clip(U, c):
    u, s, vh = torch.linalg.svd(U.double(), full_matrices=False)
    return (u * (s / torch.sqrt(1 + s**2 / c**2))) @ vh


@pytest.mark.parametrize("pc", [False, True], ids=["plain", "pc"])
def test_spectral_clip_option_clips_hidden_matrices_as_the_svd_reference(pc):
    model = debug_model(pc, n_layers=2)
    ref = copy.deepcopy(model)
    c = 5.0  # AdamW first-step updates are sign-like: sigma_max ~ 30 here, so sigma_max / c ~ 6 (converged)
    opt, ref_opt = _container(model, c), _container(ref, None)
    assert [type(o).__name__ for o in opt.optimizers] == ["Spectra"]
    assert [type(o).__name__ for o in ref_opt.optimizers] == ["AdamW"]
    # the clip runs in pcopt.hardware.preferred_dtype: bf16 where the CPU has it natively, else fp32
    tol = 3e-2 if pcopt.hardware.preferred_dtype("cpu") == torch.bfloat16 else 1e-4
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    u_before = {fqn: m.u.detach().double().clone() for fqn, m in pcopt.preconditioners(model)}
    assert bool(u_before) == pc
    _grads(model, ref)
    opt.step()
    ref_opt.step()
    hidden = {n for g in pcopt.param_groups(model) if g["algorithm"] == "muon" for n in g["param_names"]}
    assert len(hidden) == 2 * 7
    assert all(("parametrizations.weight.original" in n) == pc for n in hidden if "feed_forward" in n)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if n not in hidden:  # embeddings, head, norms, gamma: the base update, exactly
            assert torch.equal(p, q), n
            continue
        x0 = before[n].double()
        U = (x0 - q.double()) / LR - WD * x0
        alpha = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
        got_step = ((1 - LR * WD) * x0 - p.double()) / LR
        want_step = alpha * _soft_clip(U, c)
        err = ((got_step - want_step).norm() / want_step.norm()).item()
        assert err < tol, (
            n,
            err,
        )  # bf16: a few units of roundoff 2^-8 (see tests/unit/test_spectral_clip.py)
    # the container refreshed u, v after the clip: 10 warm power iterations on the *clipped* raw weight
    for fqn, module in pcopt.preconditioners(model):
        W, u = module.raw_weight.detach().double(), u_before[fqn]
        for _ in range(10):
            v = W.T @ u
            v = v / v.norm()
            u = W @ v
            u = u / u.norm()
        assert torch.allclose(module.u.double(), u, atol=1e-5) and torch.allclose(
            module.v.double(), v, atol=1e-5
        )


def test_flat_state_dict_carries_the_step_and_resumes_exactly():
    model = debug_model(pc=True, n_layers=2)
    opt = _container(model, 0.5)
    for seed in (1, 2):
        _grads(model, seed=seed)
        opt.step()
        opt.zero_grad()
    sd = copy.deepcopy(opt.state_dict())
    steps = {k: v for k, v in sd.items() if k.endswith(".spectra_step")}
    assert steps and set(steps.values()) == {2}
    resumed_model = copy.deepcopy(model)
    resumed = _container(resumed_model, 0.5)
    resumed.load_state_dict(sd)
    assert resumed.optimizers[0].param_groups[0]["spectra_step"] == 2
    for m, o in ((model, opt), (resumed_model, resumed)):
        _grads(m, seed=3)
        o.step()
    for (n, p), q in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), n


def test_spectra_configs_and_bad_threshold():
    from torchtitan_ext.config_registry import debug_adamw_pc_spectra, debug_adamw_spectra

    plain, pc = debug_adamw_spectra(), debug_adamw_pc_spectra()
    for cfg in (plain, pc):
        assert cfg.optimizer.spectral_clip == 10.0
        assert cfg.optimizer.spectral_clip_warmup_steps == cfg.lr_scheduler.warmup_steps > 0
    with pytest.raises(ValueError, match=r"threshold c must be finite and > 0, got 0\.0"):
        _container(debug_model(pc=False, n_layers=2), 0.0)
