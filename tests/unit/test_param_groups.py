"""Name-based Muon/AdamW routing and the one-call paper optimizer (schedulers, checkpoints, closures)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import pcopt
from pcopt import build_optimizer, param_groups
from pcopt.optim import CombinedOptimizer
from tests.conftest import TinyLlama


def _pc_llama(seed: int = 0) -> TinyLlama:
    torch.manual_seed(seed)
    model = TinyLlama()
    pcopt.precondition_model(model, degree=5, strategy="per_forward")
    return model


def _routes(groups) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for g in groups:
        key = g["algorithm"] + ("-gamma" if any(n.endswith(".gamma") for n in g["param_names"]) else "")
        out.setdefault(key, set()).update(g["param_names"])
    return out


def _check_partition(model, groups) -> None:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = [n for g in groups for n in g["param_names"]]
    assert len(names) == len(set(names)) and set(names) == trainable
    by_name = dict(model.named_parameters())
    for g in groups:
        assert all(p is by_name[n] for n, p in zip(g["param_names"], g["params"]))


def test_torchtitan_names_with_pc_layers():
    model = _pc_llama()
    groups = param_groups(model)
    _check_partition(model, groups)
    routes = _routes(groups)
    muon = routes["muon"]
    assert {n for n in muon if ".qkv_linear." in n} == {
        f"layers.{i}.attention.qkv_linear.w{x}.weight" for i in "01" for x in "qkv"
    }
    raw = {f"layers.{i}.{m}.parametrizations.weight.original" for i in "01"
           for m in ("attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}  # fmt: skip
    assert raw <= muon and len(muon) == 14
    assert routes["adamw"] == {"tok_embeddings.weight", "output.weight", "norm.weight"} | {
        f"layers.{i}.{n}.weight" for i in "01" for n in ("attention_norm", "ffn_norm")
    }
    assert routes["adamw-gamma"] == {r.replace("weight.original", "weight.0.gamma") for r in raw}


def test_hugging_face_names_biases_and_preconditioned_head():
    torch.manual_seed(0)
    model = nn.Module()
    model.model = nn.Module()
    model.model.embed_tokens = nn.Embedding(20, 8)
    model.model.q_proj = nn.Linear(8, 8, bias=True)
    model.model.mlp = nn.Module()
    model.model.mlp.gate_proj = nn.Linear(8, 16, bias=False)
    model.model.input_layernorm = nn.LayerNorm(8)
    model.lm_head = nn.Linear(8, 20, bias=False)
    pcopt.precondition(model.lm_head)  # a preconditioned head still goes to AdamW
    groups = param_groups(model)
    _check_partition(model, groups)
    routes = _routes(groups)
    assert routes["muon"] == {"model.q_proj.weight", "model.mlp.gate_proj.weight"}
    assert routes["adamw"] == {"model.embed_tokens.weight", "model.q_proj.bias", "model.input_layernorm.weight",
                               "model.input_layernorm.bias", "lm_head.parametrizations.weight.original"}  # fmt: skip
    assert routes["adamw-gamma"] == {"lm_head.parametrizations.weight.0.gamma"}


def test_unrouted_matrix_is_an_error_and_patterns_fix_it():
    model = nn.Module()
    model.emb = nn.Embedding(10, 4)  # unusual name: routed to AdamW because it is an nn.Embedding
    model.proj = nn.Linear(4, 4)
    model.pos_emb = nn.Parameter(torch.zeros(6, 4))
    with pytest.raises(
        ValueError,
        match=r"1 trainable 2-D parameter\(s\) match neither .*: pos_emb \(6, 4\)\. .*adamw_pattern",
    ):
        param_groups(model)
    groups = param_groups(model, adamw_pattern=pcopt.training.DEFAULT_ADAMW_PATTERN + r"|(^|\.)pos_emb$")
    _check_partition(model, groups)
    assert _routes(groups)["adamw"] == {"emb.weight", "pos_emb", "proj.bias"}
    groups = param_groups(model, muon_pattern=r"(proj\.weight|pos_emb)$")
    assert _routes(groups)["muon"] == {"proj.weight", "pos_emb"}


def test_frozen_parameters_and_pattern_problems():
    model = _pc_llama()
    model.output.weight.requires_grad_(False)
    for _, pc in pcopt.preconditioners(model):
        pc.gamma.requires_grad_(False)
    groups = param_groups(model)
    _check_partition(model, groups)
    assert "adamw-gamma" not in _routes(groups) and "output.weight" not in _routes(groups)["adamw"]
    with pytest.warns(UserWarning, match=r"muon_pattern='nothing_here\$' matched no trainable parameter"):
        with pytest.raises(ValueError, match="match neither"):
            param_groups(model, muon_pattern=r"nothing_here$")
    with pytest.raises(ValueError, match=r"adamw_pattern is not a valid regular expression: '\('"):
        param_groups(model, adamw_pattern="(")
    with pytest.raises(ValueError, match=r"Invalid gamma_weight_decay: -1"):
        param_groups(model, gamma_weight_decay=-1)
    with pytest.raises(ValueError, match=r"no trainable parameters"):
        param_groups(nn.Linear(2, 2).requires_grad_(False))


def test_weight_decay_defaults_and_gamma_override():
    model = _pc_llama()
    opt = build_optimizer(model, lr=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.1]  # paper: 0.1 on everything
    opt = build_optimizer(model, lr=1e-3, gamma_weight_decay=0.0, adamw_weight_decay=0.05)
    wd = {
        ("gamma" if "gamma" in g["param_names"][0] else g["algorithm"]): g["weight_decay"]
        for g in opt.param_groups
    }
    assert wd == {"muon": 0.1, "adamw": 0.05, "gamma": 0.0}
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)  # same peak lr for Muon and AdamW


def _batches(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 32, (4, 6), generator=gen) for _ in range(n)]


def _loss(model, tokens):
    logits = model(tokens)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), tokens[:, 1:].reshape(-1))


@pytest.mark.filterwarnings("ignore::pcopt.hardware.SlowBF16Warning")
def test_build_optimizer_equals_torch_muon_plus_adamw_plus_refresh():
    model, ref = _pc_llama(), _pc_llama()
    # torch.optim.Muon runs Newton-Schulz in bf16; build_optimizer's default is the hardware's preferred dtype
    # (fp32 without native bf16, e.g. under ATEN_CPU_CAPABILITY=avx2), so pin bf16 for a bitwise comparison.
    opt = build_optimizer(model, lr=2e-3, ns_dtype=torch.bfloat16)  # slow-bf16 warning silenced by the mark
    groups = param_groups(ref, muon_weight_decay=0.1, adamw_weight_decay=0.1)
    t_muon = torch.optim.Muon(
        [g for g in groups if g["algorithm"] == "muon"], lr=2e-3, adjust_lr_fn="match_rms_adamw"
    )
    t_adamw = torch.optim.AdamW([g for g in groups if g["algorithm"] == "adamw"], lr=2e-3, betas=(0.9, 0.95))
    for tokens in _batches(3, 0):
        _loss(model, tokens).backward()
        opt.step()
        opt.zero_grad()
        _loss(ref, tokens).backward()
        t_muon.step()
        t_adamw.step()
        pcopt.refresh(ref)
        t_muon.zero_grad()
        t_adamw.zero_grad()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
    for (name, b), c in zip(model.named_buffers(), ref.buffers()):
        assert torch.equal(b, c), name


def test_scheduler_state_dict_resume_closure_and_zero_grad():
    data = _batches(4, 1)
    model = _pc_llama()
    opt = build_optimizer(model, lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** min(s, 3))
    for tokens in data[:2]:
        loss = opt.step(lambda tokens=tokens: (opt.zero_grad(), _loss(model, tokens).backward())[0] or 0.0)
        sched.step()
    opt.zero_grad()
    assert loss == 0.0  # the closure's return value comes back
    assert all(g["lr"] == pytest.approx(3e-3 * 0.25) for g in opt.param_groups)
    assert opt.optimizers["muon"].param_groups[0]["lr"] == pytest.approx(3e-3 * 0.25)

    checkpoint = copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    )
    resumed = _pc_llama(seed=5)
    resumed.load_state_dict(checkpoint["model"])
    opt2 = build_optimizer(resumed, lr=3e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5 ** min(s, 3))
    opt2.load_state_dict(checkpoint["opt"])
    sched2.load_state_dict(checkpoint["sched"])
    assert opt2.optimizers["adamw"].state is opt2.state
    assert opt2.optimizers["adamw"].param_groups[0] is opt2.param_groups[1]
    for m, o, s in ((model, opt, sched), (resumed, opt2, sched2)):
        for tokens in data[2:]:
            _loss(m, tokens).backward()
            o.step()
            s.step()
            o.zero_grad()
            assert all(p.grad is None for p in m.parameters())
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    state = opt.state_dict()
    assert {g["algorithm"] for g in state["param_groups"]} == {"muon", "adamw"}
    assert (
        "momentum_buffer" in state["state"][0]
        and "exp_avg" in state["state"][len(opt.param_groups[0]["params"])]
    )


def test_add_param_group_routes_by_algorithm_and_load_checks_layout():
    model = _pc_llama()
    opt = build_optimizer(model, lr=1e-3)
    extra_matrix, extra_vector = nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(5))
    opt.add_param_group({"params": [extra_matrix], "param_names": ["extra.weight"], "algorithm": "muon"})
    opt.add_param_group({"params": [extra_vector], "param_names": ["extra.bias"], "algorithm": "adamw"})
    assert [g["algorithm"] for g in opt.param_groups] == ["muon", "muon", "adamw", "adamw", "adamw"]
    assert opt.optimizers["muon"].param_groups[-1]["params"] == [extra_matrix]
    with pytest.raises(
        ValueError,
        match=r"needs param_group\['algorithm'\] naming a child optimizer, one of \['adamw', 'muon'\]; got None",
    ):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2, 2))], "param_names": ["x"]})
    with pytest.raises(ValueError, match=r"Muon only supports 2D parameters"):
        opt.add_param_group(
            {"params": [nn.Parameter(torch.randn(2))], "param_names": ["y"], "algorithm": "muon"}
        )
    other = build_optimizer(_pc_llama(), lr=1e-3)
    with pytest.raises(
        ValueError, match=r"Loaded state dict has param groups .* Build the optimizer with the same model"
    ):
        other.load_state_dict(opt.state_dict())


def test_combined_optimizer_rejects_shared_parameters():
    p = nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match=re.escape("is in both 'a' and 'b'")):
        CombinedOptimizer({"a": torch.optim.SGD([p], lr=0.1), "b": torch.optim.SGD([p], lr=0.1)})
    with pytest.raises(ValueError, match="non-empty mapping"):
        CombinedOptimizer({})
