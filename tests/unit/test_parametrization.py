import copy
import warnings

import pytest
import torch
from torch import nn

import pcopt
from pcopt.polynomials import PC_COEFFICIENTS


def _matrix_with_spectrum(m, n, singular_values, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(singular_values), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(singular_values), generator=g, dtype=torch.float64))
    return ((U * torch.tensor(singular_values, dtype=torch.float64)) @ V.T).to(dtype)


def _reference_weff(W, u, v, gamma, coeffs, eps):
    """Float64 reference of the formula with the odd power series written out term by term."""
    sigma = u @ W @ v + eps
    X = W / sigma  # gradient flows through sigma here
    gram = X.T @ X
    P = sum(a * X @ torch.linalg.matrix_power(gram, j) for j, a in enumerate(coeffs))
    return gamma * sigma.detach() * P


@pytest.mark.parametrize("degree", [3, 5, 7, 9])
@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_forward_and_gradients_match_float64_reference(degree, shape):
    torch.manual_seed(degree)
    lin = nn.Linear(shape[1], shape[0], bias=False)
    pcopt.precondition(lin, degree=degree)
    pc = lin.parametrizations.weight[0]
    with torch.no_grad():
        pc.gamma.fill_(1.3)
    W = lin.parametrizations.weight.original
    target = torch.randn(shape, dtype=torch.float64)

    W_eff = lin.weight
    (W_eff.double() * target).sum().backward()

    W64 = W.detach().double().requires_grad_()
    g64 = pc.gamma.detach().double().requires_grad_()
    ref = _reference_weff(W64, pc.u.double(), pc.v.double(), g64, PC_COEFFICIENTS[degree], 1e-7)
    (ref * target).sum().backward()

    rel = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
    assert rel(W_eff.detach(), ref.detach()) < 1e-6
    assert rel(W.grad, W64.grad) < 1e-6
    # dL/dgamma is one sum of terms of both signs: measure its error against the sum of their magnitudes
    magnitude = float(((ref / g64).detach().abs() * target.abs()).sum())
    assert abs(float(pc.gamma.grad) - float(g64.grad)) / magnitude < 1e-6


def test_gradient_has_the_closed_form_of_a_non_detached_division():
    # dL/dW = (G_X - <G_X, X> u v^T) / sigma, with G_X the gradient w.r.t. X = W / sigma (recovery detached).
    torch.manual_seed(0)
    lin = pcopt.precondition(nn.Linear(24, 40, bias=False).double(), degree=5)
    pc = lin.parametrizations.weight[0]
    W = lin.parametrizations.weight.original
    target = torch.randn(40, 24, dtype=torch.float64)
    (lin.weight * target).sum().backward()
    sigma = (pc.u @ W @ pc.v + pc.eps).detach()
    X = (W.detach() / sigma).requires_grad_()
    (sigma * pcopt.apply_polynomial(X, pcopt.polynomial(5)) * target).sum().backward()
    closed = (X.grad - (X.grad * X.detach()).sum() * torch.outer(pc.u, pc.v)) / sigma
    assert torch.allclose(W.grad, closed, rtol=1e-10, atol=1e-12)


def test_registration_keeps_raw_weight_and_global_rng():
    torch.manual_seed(0)
    lin = nn.Linear(16, 32)
    w0 = lin.weight
    copy_w0 = w0.detach().clone()
    state = torch.get_rng_state()
    pcopt.precondition(lin)
    assert torch.equal(torch.get_rng_state(), state)
    assert lin.parametrizations.weight.original is w0  # same Parameter object: optimizers keep working
    assert torch.equal(w0, copy_w0)
    assert type(lin).__name__ == "ParametrizedLinear"
    assert [n for n, _ in lin.named_parameters()] == [
        "bias",
        "parametrizations.weight.original",
        "parametrizations.weight.0.gamma",
    ]


def test_refresh_converges_to_float64_sigma_max():
    W = _matrix_with_spectrum(64, 48, [3.0, 2.0, 1.0, 0.5], seed=1, dtype=torch.float32)
    lin = nn.Linear(48, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    pcopt.precondition(lin)
    pc = lin.parametrizations.weight[0]
    pcopt.refresh(lin, num_iterations=30)
    sigma = float(pc.u @ W @ pc.v)
    assert abs(sigma - 3.0) / 3.0 < 1e-6
    assert pcopt.refresh(nn.Linear(2, 2)) == 0
    with pytest.raises(TypeError, match=r"pcopt.refresh expects an nn.Module or a list of them"):
        pcopt.refresh([lin.parametrizations.weight.original])


def test_forward_does_not_update_state_and_eval_no_grad_work():
    torch.manual_seed(0)
    lin = pcopt.precondition(nn.Linear(8, 12))
    pc = lin.parametrizations.weight[0]
    u, v = pc.u.clone(), pc.v.clone()
    x = torch.randn(3, 8)
    y_train = lin(x)
    lin.eval()
    with torch.no_grad():
        y_eval = lin(x)
    assert torch.equal(y_train.detach(), y_eval)
    assert torch.equal(pc.u, u) and torch.equal(pc.v, v)


def test_bf16_weight_computes_in_fp32_and_stays_close():
    W = _matrix_with_spectrum(
        64, 32, torch.logspace(0, -4, 32).tolist(), seed=2, dtype=torch.float32
    )  # cond 1e4
    lin = nn.Linear(32, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    pcopt.precondition(lin)
    ref = lin.weight.detach()
    pc = lin.parametrizations.weight[0]
    bf = pc(W.bfloat16())
    assert bf.dtype == torch.bfloat16 and torch.isfinite(bf).all()
    assert float((bf.float() - ref).norm() / ref.norm()) < 2e-2


def test_state_dict_round_trip_and_deepcopy():
    torch.manual_seed(0)
    a = pcopt.precondition(nn.Linear(10, 20))
    with torch.no_grad():
        a.parametrizations.weight[0].gamma.fill_(0.7)
    x = torch.randn(4, 10)
    b = pcopt.precondition(nn.Linear(10, 20))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))
    assert set(a.state_dict()) == {
        "bias",
        "parametrizations.weight.original",
        "parametrizations.weight.0.gamma",
        "parametrizations.weight.0.u",
        "parametrizations.weight.0.v",
        "parametrizations.weight.0.pc_meta",
    }
    c = copy.deepcopy(a)
    assert torch.equal(a(x), c(x))
    pc_c = c.parametrizations.weight[0]
    assert pc_c.raw_weight is c.parametrizations.weight.original  # the copy points at its own raw weight
    assert pcopt.refresh(c) == 1


def test_merge_gives_plain_linear_with_same_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    pcopt.precondition(model[0], degree=9)
    pcopt.precondition(model[2], degree=5)
    x = torch.randn(5, 16)
    y = model(x)
    raw = model[0].parametrizations.weight.original
    assert pcopt.merge(model) == ["0.weight", "2.weight"]
    assert type(model[0]) is nn.Linear and model[0].weight is raw
    assert float((model(x) - y).norm() / y.norm()) < 1e-5
    with pytest.warns(UserWarning, match="nothing to merge"):
        pcopt.merge(model)


def test_merged_state_dict_loads_into_plain_model():
    torch.manual_seed(0)
    pc_model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    pcopt.precondition(pc_model[0])
    plain = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    plain.load_state_dict(pcopt.merged_state_dict(pc_model))
    x = torch.randn(3, 16)
    assert float((plain(x) - pc_model(x)).norm() / pc_model(x).norm()) < 1e-6


@pytest.mark.parametrize("degree", [3, 5, 9])
def test_dense_checkpoint_function_preserving_conversion(degree):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    pc_model = copy.deepcopy(dense)
    pcopt.precondition(pc_model[0], degree=degree)
    pcopt.precondition(pc_model[2], degree=degree)
    pcopt.load_dense_state_dict(pc_model, dense.state_dict(), preserve_function=True)
    for i in (0, 2):
        assert float((pc_model[i].weight - dense[i].weight).norm() / dense[i].weight.norm()) < 1e-5
    # and back: merging gives the dense weights again
    back = pcopt.merged_state_dict(pc_model)
    assert torch.allclose(
        back["0.weight"], dense[0].weight, rtol=0, atol=1e-5 * float(dense[0].weight.abs().max())
    )


def test_dense_checkpoint_as_raw_weights():
    torch.manual_seed(0)
    dense = nn.Linear(16, 32)
    pc = pcopt.precondition(nn.Linear(16, 32))
    pcopt.load_dense_state_dict(pc, dense.state_dict())
    assert torch.equal(pc.parametrizations.weight.original, dense.weight)
    assert torch.equal(pc.parametrizations.weight[0].gamma, torch.ones(1))
    with pytest.raises(
        RuntimeError, match=r"dense 'weight' but the model is preconditioned.*load_dense_state_dict"
    ):
        pc.load_state_dict(dense.state_dict())


def test_batched_weights_match_per_matrix_preconditioning():
    torch.manual_seed(0)
    holder = nn.Module()
    holder.w = nn.Parameter(torch.randn(3, 12, 20) * 0.02)
    pcopt.precondition(holder, "w", degree=7)
    pc = holder.parametrizations.w[0]
    assert pc.gamma.shape == (3,) and pc.u.shape == (3, 12) and pc.v.shape == (3, 20)
    for i in range(3):
        lin = nn.Linear(20, 12, bias=False)
        with torch.no_grad():
            lin.weight.copy_(holder.parametrizations.w.original[i])
        pcopt.precondition(lin, degree=7)
        sub = lin.parametrizations.weight[0]
        sub.u.copy_(pc.u[i])
        sub.v.copy_(pc.v[i])
        assert torch.allclose(holder.w[i], lin.weight, rtol=1e-5, atol=1e-7)


def test_non_finite_weight_self_heals_and_warns_once():
    lin = pcopt.precondition(nn.Linear(8, 8))
    pc = lin.parametrizations.weight[0]
    with torch.no_grad():
        lin.parametrizations.weight.original[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"Linear.weight of shape \(8, 8\).*re-initialised u and v"):
        pcopt.refresh(lin)
    assert torch.isfinite(pc.u).all() and torch.isfinite(pc.v).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pcopt.refresh(lin)  # warned once per weight


def test_zero_weight_gives_sigma_eps_without_nan():
    lin = nn.Linear(6, 4, bias=False)
    nn.init.zeros_(lin.weight)
    with pytest.warns(RuntimeWarning, match="re-initialised"):
        pcopt.precondition(lin)
    assert torch.isfinite(lin.weight).all() and torch.equal(lin.weight, torch.zeros(4, 6))


def test_construction_errors():
    with pytest.raises(ValueError, match="Unsupported PC polynomial degree"):
        pcopt.precondition(nn.Linear(4, 4), degree=4)
    with pytest.raises(ValueError, match=r"expects a matrix .* got a tensor of 1 dimension"):
        pcopt.precondition(nn.Linear(4, 4), "bias")
    with pytest.raises(
        ValueError, match=r"has no parameter named 'weights'; expected one of \['weight', 'bias'\]"
    ):
        pcopt.precondition(nn.Linear(4, 4), "weights")
    lin = pcopt.precondition(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="already preconditioned"):
        pcopt.precondition(lin)
    with pytest.raises(ValueError, match="num_power_iterations must be an integer >= 1, got 0"):
        pcopt.precondition(nn.Linear(4, 4), num_power_iterations=0)
    with pytest.raises(ValueError, match="eps must be a positive finite float"):
        pcopt.precondition(nn.Linear(4, 4), eps=-1.0)
    with pytest.raises(ValueError, match="must be finite"):
        pcopt.precondition(nn.Linear(4, 4), coefficients=(1.0, float("inf")))


def test_frozen_gamma():
    lin = pcopt.precondition(nn.Linear(4, 6), learn_gamma=False)
    assert [n for n, p in lin.named_parameters() if p.requires_grad] == [
        "bias",
        "parametrizations.weight.original",
    ]


class _Block(nn.Module):
    def __init__(self, hf: bool):
        super().__init__()
        if hf:
            self.self_attn = nn.ModuleDict(
                {k: nn.Linear(8, 8) for k in ("q_proj", "k_proj", "v_proj", "o_proj")}
            )
            self.mlp = nn.ModuleDict({k: nn.Linear(8, 8) for k in ("gate_proj", "up_proj", "down_proj")})
            self.input_layernorm = nn.LayerNorm(8)
        else:
            self.attention = nn.ModuleDict({k: nn.Linear(8, 8) for k in ("wq", "wk", "wv", "wo")})
            self.feed_forward = nn.ModuleDict({k: nn.Linear(8, 8) for k in ("w1", "w2", "w3")})
            self.attention_norm = nn.LayerNorm(8)


@pytest.mark.parametrize("hf", [False, True])
def test_precondition_model_default_targets(hf):
    model = nn.Module()
    model.tok_embeddings = nn.Embedding(10, 8)
    model.layers = nn.ModuleList([_Block(hf), _Block(hf)])
    model.output = nn.Linear(8, 10)
    touched = pcopt.precondition_model(model, degree=5)
    names = (
        ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        if hf
        else ("attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    )
    assert touched == [f"layers.{i}.{n}" for i in range(2) for n in names]
    assert [fqn for fqn, _ in pcopt.preconditioners(model)] == [f"{t}.weight" for t in touched]
    assert not pcopt.is_preconditioned(model.output) and not pcopt.is_preconditioned(
        model.layers[0].attention_norm if not hf else model.layers[0].input_layernorm
    )


def test_precondition_model_regex_predicate_and_no_match():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    assert pcopt.precondition_model(model, targets=r"^1$") == ["1"]
    assert pcopt.precondition_model(model, targets=lambda fqn, m: fqn == "0") == ["0"]
    with pytest.warns(UserWarning, match="no module matched targets='nothing'"):
        assert pcopt.precondition_model(nn.Sequential(nn.Linear(2, 2)), targets="nothing") == []
    with pytest.raises(TypeError, match="targets must be a regex"):
        pcopt.precondition_model(model, targets=3)


def test_modified_condition_number_and_gmcn():
    W = _matrix_with_spectrum(20, 20, [float(20 - i) for i in range(20)], seed=3)
    # k = ceil(0.1 * 20) = 2 bottom values: 1 and 2
    assert abs(float(pcopt.modified_condition_number(W)) - 20 / 1.5) < 1e-9
    model = nn.Module()
    model.layers = nn.ModuleList([_Block(False)])
    torch.manual_seed(0)
    mcn = pcopt.condition_numbers(model)
    assert len(mcn) == 7
    expected = torch.tensor(list(mcn.values()), dtype=torch.float64).log().mean().exp()
    assert abs(pcopt.gmcn(model) - float(expected)) < 1e-9
    before = pcopt.gmcn(model)
    pcopt.precondition_model(model, degree=9)
    assert pcopt.gmcn(model) < before  # the PC map flattens the spectra of wo, w1..w3


def test_singular_values_match_svd():
    from pcopt.diagnostics import singular_values

    for shape in [(40, 24), (24, 40), (3, 16, 20)]:
        W = torch.randn(*shape, dtype=torch.float64)
        assert torch.allclose(singular_values(W), torch.linalg.svdvals(W), rtol=1e-10, atol=1e-12)
    W = _matrix_with_spectrum(30, 30, torch.logspace(0, -5, 30).tolist(), seed=4)  # condition number 1e5
    assert torch.allclose(singular_values(W), torch.linalg.svdvals(W), rtol=1e-5, atol=0)
