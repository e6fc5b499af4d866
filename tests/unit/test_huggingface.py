"""pcopt.huggingface with a tiny transformers LlamaForCausalLM built from a config (no downloads)."""

import copy
import os

import pytest
import torch

import pcopt
from pcopt import huggingface as hf

transformers = pytest.importorskip("transformers")


def _config():
    return transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def _tokens(seed=0):
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))


def _step(model, opt, seed):
    x = _tokens(seed)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.fixture
def trained():
    """A preconditioned tiny Llama after 3 Muon/AdamW steps (raw != W_eff, u/v and gamma moved), and its
    optimizer."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config()).eval()
    pcopt.precondition_model(model, degree=5)
    opt = pcopt.build_optimizer(model, lr=1e-2, ns_dtype=torch.float32)
    for i in range(3):
        _step(model, opt, i)
    return model, opt


def _logits(model, seed=7):
    with torch.no_grad():
        return model(input_ids=_tokens(seed)).logits


def test_merged_save_loads_in_transformers_with_equal_logits(trained, tmp_path):
    model, _ = trained
    assert len(pcopt.preconditioners(model)) == 2 * 4  # o_proj + gate/up/down per layer
    hf.save_pretrained(model, tmp_path)
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not pcopt.preconditioners(loaded)
    torch.testing.assert_close(_logits(loaded.eval()), _logits(model), rtol=1e-5, atol=1e-6)
    # the saved weight is W_eff, which differs from the raw weight the optimizer trains
    o_proj = model.model.layers[0].self_attn.o_proj
    w = loaded.model.layers[0].self_attn.o_proj.weight
    torch.testing.assert_close(w, pcopt.effective_weight(o_proj).float())
    assert not torch.allclose(w, o_proj.parametrizations.weight.original)
    assert pcopt.preconditioners(model)  # the saved model is still preconditioned


def test_guard_refuses_the_stock_save_that_cannot_load(trained, tmp_path):
    model, _ = trained
    hf.guard_save_pretrained(model)
    with pytest.raises(RuntimeError, match=r"would write the PC entries of 8 preconditioned weights.*"
                       r"pcopt\.huggingface\.save_pretrained\(model, path\)"):  # fmt: skip
        model.save_pretrained(tmp_path / "stock")
    assert not (tmp_path / "stock").exists()
    with pytest.raises(ValueError, match=r"the state_dict holds 40 PC entries .*merged_state_dict"):
        model.save_pretrained(tmp_path / "stock", state_dict=model.state_dict())
    model.save_pretrained(tmp_path / "merged", state_dict=pcopt.merged_state_dict(model))  # allowed
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(loaded.eval()), _logits(model), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"holds 40 PC entries"):
        hf.save_pretrained(model, tmp_path / "x", state_dict=model.state_dict())
    pcopt.merge(model)
    model.save_pretrained(tmp_path / "after_merge")  # nothing left to refuse
    assert (tmp_path / "after_merge" / "config.json").is_file()


def test_precondition_model_guards_the_stock_save_without_a_call(tmp_path):
    """The plain ``model.save_pretrained(dir)`` after ``pcopt.precondition_model`` alone, in both strategies:
    it refuses (the unguarded save writes PC keys, and from_pretrained would load random weights); the
    merged state_dict it allows loads with the preconditioned model's logits; a deep copy keeps a guard
    of its own; a model without PC (and a non-transformers model) is untouched."""
    for strategy in ("once_per_step", "per_forward"):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(_config()).eval()
        pcopt.precondition_model(model, degree=5, strategy=strategy)
        opt = pcopt.build_optimizer(model, lr=1e-2, ns_dtype=torch.float32)
        _step(model, opt, 0)  # raw != W_eff, so a save of raw weights would not give these logits
        out = tmp_path / strategy
        with pytest.raises(RuntimeError, match=r"LlamaForCausalLM\.save_pretrained would write the PC entries of "
                           r"8 preconditioned weights.*pcopt\.huggingface\.save_pretrained\(model, path\)"):  # fmt: skip
            model.save_pretrained(out / "stock")
        assert not (out / "stock").exists()
        with pytest.raises(ValueError, match=r"the state_dict holds 40 PC entries"):
            model.save_pretrained(out / "stock", state_dict=model.state_dict())
        model.save_pretrained(out / "merged", state_dict=pcopt.merged_state_dict(model))
        loaded, info = transformers.LlamaForCausalLM.from_pretrained(out / "merged", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        # W_eff is written in float32 and the loaded model computes in float32: equal up to the order of the
        # float32 sums in its matmuls (a few ulp of logits of size ~1), the bound of the other saves here
        torch.testing.assert_close(_logits(loaded.eval()), _logits(model), rtol=1e-5, atol=1e-6)

        twin = copy.deepcopy(model)  # the copy's guard checks the copy, not the original
        pcopt.merge(twin)
        twin.save_pretrained(out / "twin")  # merged: nothing to refuse
        torch.testing.assert_close(
            _logits(transformers.LlamaForCausalLM.from_pretrained(out / "twin").eval()), _logits(model),
            rtol=1e-5, atol=1e-6,
        )  # fmt: skip
        with pytest.raises(RuntimeError, match=r"would write the PC entries of 8"):
            model.save_pretrained(out / "stock")  # the original is still preconditioned and guarded

    dense = transformers.LlamaForCausalLM(_config())
    assert "save_pretrained" not in vars(dense)
    dense.save_pretrained(tmp_path / "dense")  # a model without PC saves as transformers does
    assert (tmp_path / "dense" / "config.json").is_file()
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8))
    pcopt.precondition_model(plain, targets=r"^0$")
    assert not hasattr(plain, "save_pretrained")  # only transformers models get a save_pretrained guard


def test_training_state_resumes_bit_for_bit(trained, tmp_path):
    model, opt = trained
    hf.save_training_state(model, tmp_path)
    assert (tmp_path / hf.TRAINING_STATE_FILE).is_file()
    # the same folder is a plain checkpoint ...
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(plain), _logits(model), rtol=1e-5, atol=1e-6)
    # ... and, preconditioned the same way, takes the PC state back exactly
    resumed = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    pcopt.precondition_model(resumed, degree=5)
    loaded = hf.load_training_state(resumed, tmp_path)
    assert loaded == sorted(fqn for fqn, _ in pcopt.preconditioners(model))
    ours, theirs = model.state_dict(), resumed.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    # training goes on identically (the optimizer state comes from the original's state_dict)
    opt2 = pcopt.build_optimizer(resumed, lr=1e-2, ns_dtype=torch.float32)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # a copy, as torch.save/torch.load gives
    _step(model, opt, 10)
    _step(resumed, opt2, 10)
    torch.testing.assert_close(_logits(resumed), _logits(model), rtol=0, atol=0)


def test_training_state_refuses_what_does_not_match(trained, tmp_path):
    model, _ = trained
    hf.save_training_state(model, tmp_path)
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match=r"saved but not preconditioned here .*\(8\).*Precondition the "
                       r"model first"):  # fmt: skip
        hf.load_training_state(plain, tmp_path)
    pcopt.precondition_model(plain, degree=9)
    with pytest.raises(RuntimeError, match=r"trained with degree 5.*preconditioned with degree 9"):
        hf.load_training_state(plain, tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"no pcopt_training_state.safetensors in .*save_training_state"
    ):
        hf.load_training_state(plain, tmp_path / "nowhere")
    dense = transformers.LlamaForCausalLM(_config())
    with pytest.raises(ValueError, match=r"has no preconditioned weights, so there is no PC state to save"):
        hf.save_training_state(dense, tmp_path / "dense")
    with pytest.raises(TypeError, match=r"expects a transformers PreTrainedModel .* got Linear"):
        hf.save_pretrained(torch.nn.Linear(2, 2), tmp_path)
    assert not os.path.exists(tmp_path / "dense")
