"""torchtitan_ext components in one process, against independent references.

Optimizers container vs stock ``torch.optim.Muon``/``AdamW`` plus a float64 power iteration; HF key
mapping vs torchtitan's own adapter; dense-mask attention vs ``flex_attention``; the dataset loaders;
PC metrics vs ``pcopt.gmcn``; the ``set_timeout`` shim.
"""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch

pytestmark = pytest.mark.torchtitan

pytest.importorskip("torchtitan")

import pcopt  # noqa: E402
from tests.torchtitan._models import build_optimizers, debug_model  # noqa: E402
from torchtitan_ext.config_registry import llama2_model  # noqa: E402
from torchtitan_ext.pc import PCConverter  # noqa: E402


def _warm_power_iteration(W, u, v, iterations=10):
    W, u = W.detach().double(), u.double()
    for _ in range(iterations):
        v = W.T @ u
        v = v / v.norm()
        u = W @ v
        u = u / u.norm()
    return u, v


def test_container_matches_stock_muon_and_adamw_and_refreshes_pc():
    from torchtitan_ext.optimizer import PCOptimizersContainer, muon_config

    model = debug_model(pc=True, n_layers=2)
    ref = copy.deepcopy(model)
    cfg = muon_config(1e-2)
    # torch.optim.Muon (the reference) iterates in bf16 with the standard iteration only; the config picks
    # the dtype by hardware and Gram Newton-Schulz for rectangular matrices (test_muon.py holds that to float64).
    cfg.param_groups[0].optimizer_kwargs["ns_dtype"] = torch.bfloat16
    cfg.param_groups[0].optimizer_kwargs["ns_algorithm"] = "standard"
    cfg.implementation = "for-loop"
    container = build_optimizers(cfg, model)
    assert isinstance(container, PCOptimizersContainer)
    assert [type(o).__name__ for o in container.optimizers] == ["Muon", "AdamW"]

    # Reference: torch's own Muon on the same matrices, torch AdamW on the rest, then 10 warm power iterations.
    muon_re = re.compile(cfg.param_groups[0].pattern)
    ref_named = dict(ref.named_parameters())
    matrices = [p for n, p in ref_named.items() if muon_re.search(n)]
    rest = [p for n, p in ref_named.items() if not muon_re.search(n)]
    assert (
        len(matrices) == 2 * 7 and len(rest) == 2 * (2 + 4) + 3
    )  # norms + gammas per layer; emb, norm, head
    mk = {
        k: v for k, v in cfg.param_groups[0].optimizer_kwargs.items() if k not in ("ns_dtype", "ns_algorithm")
    }
    ref_opts = [
        torch.optim.Muon(matrices, **mk),
        torch.optim.AdamW(rest, **cfg.param_groups[1].optimizer_kwargs, foreach=False),
    ]
    g = torch.Generator().manual_seed(1)
    for (n, p), (rn, rp) in zip(model.named_parameters(), ref.named_parameters()):
        assert n == rn
        p.grad = torch.randn(p.shape, generator=g) * 0.01
        rp.grad = p.grad.clone()
    before = {fqn: pc.u.clone() for fqn, pc in pcopt.preconditioners(model)}

    container.step()
    for o in ref_opts:
        o.step()

    for (n, p), rp in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p, rp, atol=1e-6, rtol=0), (n, (p - rp).abs().max().item(), p.grad is rp.grad)
    ref_pcs = dict(pcopt.preconditioners(ref))
    for fqn, pc in pcopt.preconditioners(model):
        rpc = ref_pcs[fqn]
        u, v = _warm_power_iteration(pc.raw_weight, rpc.u, rpc.v)
        assert not torch.equal(pc.u, before[fqn]), f"{fqn}: u was not refreshed after the step"
        assert torch.allclose(pc.u.double(), u, atol=1e-5) and torch.allclose(pc.v.double(), v, atol=1e-5), (
            fqn
        )


def test_container_refuses_non_matrix_params_for_muon():
    from torchtitan.components.optimizer import ParamGroupConfig

    from torchtitan_ext.optimizer import muon_config

    model = debug_model(pc=True)
    cfg = muon_config(1e-3)
    cfg.param_groups[0] = ParamGroupConfig(
        pattern=r"gamma$|" + cfg.param_groups[0].pattern, optimizer_name="Muon", optimizer_kwargs={"lr": 1e-3}
    )
    with pytest.raises(
        ValueError, match=r"Muon optimizes matrices only.*24 parameter\(s\) that are not 2-D.*gamma"
    ):
        cfg.build(model_parts=[model])
    cfg = muon_config(1e-3)
    cfg.param_groups[1] = ParamGroupConfig(pattern=".*", optimizer_name="Lion", optimizer_kwargs={"lr": 1e-3})
    with pytest.raises(ValueError, match=r"Unknown optimizer_name 'Lion'"):
        cfg.build(model_parts=[model])


def test_hf_key_mapping_of_pc_raw_weights():
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    from pcopt.names import STATE_SUFFIXES
    from torchtitan_ext.state_dict_adapter import PCLlamaStateDictAdapter

    pc_spec = llama2_model("debug", pc=PCConverter.Config())
    base = debug_model(pc=False)
    pc = debug_model(pc=True, degree=9)
    stock = Llama3StateDictAdapter(llama2_model("debug").model, None).to_hf(base.state_dict())
    ours = PCLlamaStateDictAdapter(pc_spec.model, None)
    hf = ours.to_hf(pc.state_dict())
    assert hf.keys() == stock.keys()  # PC raw weights map to the dense names; gamma/u/v are not HF tensors
    for key in stock:  # same init, so same tensors, including the permuted q/k
        assert torch.equal(hf[key], stock[key]), key
    back = ours.from_hf(hf)
    sd = pc.state_dict()
    assert set(back) == {k for k in sd if not k.endswith(STATE_SUFFIXES)}  # PC state is not in HF files
    assert all(torch.equal(back[k], sd[k]) for k in back)


def test_dense_mask_attention_matches_flex_attention():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from torchtitan_ext.cpu_attention import DenseMaskAttention

    B, H, L, D = 2, 4, 48, 16
    doc = torch.tensor([0] * 17 + [1] * 31)

    def mask_mod(b, h, q, kv):
        return (q >= kv) & (doc[q] == doc[kv])

    bm = create_block_mask(mask_mod, B, None, L, L, device="cpu")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, L, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    attn = DenseMaskAttention.Config().build()
    got = attn(q, k, v, attention_masks=bm)
    ref = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm).transpose(
        1, 2
    )
    assert torch.allclose(got, ref, atol=1e-10)
    with pytest.raises(RuntimeError, match="mask_mod-only"):
        attn(q, k, v, attention_masks=bm, score_mod=lambda s, b, h, qi, ki: s)


def test_text_dataset_loaders(tmp_path):
    import datasets

    from torchtitan_ext.data import SAMPLE_DATASET, TOKENIZER_DIR, load_text_dataset, register_datasets

    rows = [{"text": f"line {i}"} for i in range(5)]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "b.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "part.jsonl").write_text(jsonl.read_text())
    for path in (jsonl, parquet, folder):
        ds = load_text_dataset(str(path))
        assert [r["text"] for r in ds] == [r["text"] for r in rows], path
    with pytest.raises(ValueError, match=r"Unsupported dataset file .*\.csv.*JSON lines"):
        (tmp_path / "c.csv").write_text("text\nx\n")
        load_text_dataset(str(tmp_path / "c.csv"))
    with pytest.raises(ValueError, match="does not exist"):
        load_text_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match=r"The 'text' dataset needs a path: pass --dataloader.dataset_path"):
        load_text_dataset("")

    # The embedded default: public-domain English text and a 2048-token BPE with bos/eos.
    sample = load_text_dataset(str(SAMPLE_DATASET))
    assert len(sample) > 300 and "God" in sample[0]["text"]
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from torchtitan.hf_datasets.text_datasets import DATASETS

    tok = HuggingFaceTokenizer.Config().build(tokenizer_path=str(TOKENIZER_DIR))
    assert tok.get_vocab_size() == 2048
    ids = tok.encode("In the beginning", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.decode(ids) == "In the beginning"
    register_datasets()
    assert {"kjv_sample", "text"} <= set(DATASETS)


def test_pc_metrics_match_pcopt_on_an_unsharded_model():
    from torchtitan_ext.metrics import pc_metrics

    model = debug_model(pc=True, n_layers=2)
    with torch.no_grad():
        for _, pc in pcopt.preconditioners(model):
            pc.gamma.fill_(1.5)
    m = pc_metrics([model])
    assert math.isclose(m["pc/gmcn"], pcopt.gmcn(model), rel_tol=1e-9)
    for fqn, pc in pcopt.preconditioners(model):
        W = pc.raw_weight.detach().double()
        assert math.isclose(
            m[f"pc/sigma/{fqn}"], float(pc.u.double() @ W @ pc.v.double()) + pc.eps, rel_tol=1e-5
        )
        assert m[f"pc/gamma/{fqn}"] == 1.5
    assert math.isclose(m["pc/gamma_mean"], 1.5)


def test_set_timeout_shim(monkeypatch):
    import torch.distributed as dist

    from torchtitan_ext.compat import install_set_timeout_shim

    monkeypatch.delattr(dist, "set_timeout", raising=False)
    calls = []
    monkeypatch.setattr(dist.distributed_c10d, "_set_pg_timeout", lambda t, g: calls.append((t, g)))
    assert install_set_timeout_shim() is True
    dist.set_timeout("T", "G")
    assert calls == [("T", "G")]
    assert install_set_timeout_shim() is False  # present now: left alone
