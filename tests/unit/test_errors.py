"""Bad input -> clear errors, as a table: each row is (description, call, exception type, message regex).

Messages say what was expected, what was received and how to fix it; they are API, so the regexes are
part of the contract. Construction-time problems are ValueError, step/forward-time ones RuntimeError.
The FSDP2-only case (preconditioning after fully_shard) is in tests/distributed/test_fsdp_pc.py.
"""

import re
import warnings

import pytest
import torch
from torch import nn

import pcopt
from pcopt.optim import Muon


def _pc_linear():
    return pcopt.precondition(nn.Linear(4, 4))


def _step_with_grad(grad):
    p = nn.Parameter(torch.zeros(3, 3, dtype=grad.dtype))
    opt = Muon([p])
    p.grad = grad
    opt.step()


class _TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(5, 4)
        self.hidden = nn.Linear(4, 4)
        self.adapter = nn.Linear(4, 4, bias=False)


ERRORS = [
    (
        "unsupported degree",
        lambda: pcopt.precondition(nn.Linear(4, 4), degree=4),
        ValueError,
        r"Unsupported PC polynomial degree: expected one of \[3, 5, 7, 9\], got 4\. Pass degree=3, 5, 7 or 9",
    ),
    (
        "coefficients not finite",
        lambda: pcopt.precondition(nn.Linear(4, 4), coefficients=(1.0, float("nan"))),
        ValueError,
        r"PC coefficients must be finite, got \(1\.0, nan\)\. Remove the inf/nan entries",
    ),
    (
        "coefficients empty",
        lambda: pcopt.precondition(nn.Linear(4, 4), coefficients=[]),
        ValueError,
        r"PC coefficients are empty: expected at least one coefficient",
    ),
    (
        "coefficients not a sequence",
        lambda: pcopt.precondition(nn.Linear(4, 4), coefficients="1,0"),
        ValueError,
        r"must be a sequence of floats .* got str",
    ),
    (
        "coefficients not real numbers",
        lambda: pcopt.precondition(nn.Linear(4, 4), coefficients=("a", 1.0)),
        ValueError,
        r"PC coefficients must all be real numbers \(coefficients of x, x\^3, x\^5, \.\.\.\), got \('a', 1\.0\)",
    ),
    (
        "precondition on a non-module",
        lambda: pcopt.precondition("wo"),
        TypeError,
        r"precondition expects an nn\.Module, got str",
    ),
    (
        "non-matrix parameter",
        lambda: pcopt.precondition(nn.Linear(4, 4), "bias"),
        ValueError,
        r"expects a matrix \(out x in\) or a batch of matrices for 'bias', got a tensor of 1 dimension\(s\) "
        r"with shape \(4,\)\. Precondition only 2-D/3-D weights",
    ),
    (
        "missing parameter name",
        lambda: pcopt.precondition(nn.Linear(4, 4), "kernel"),
        ValueError,
        r"Linear has no parameter named 'kernel'; expected one of \['weight', 'bias'\]",
    ),
    (
        "preconditioning twice",
        lambda: pcopt.precondition(_pc_linear()),
        ValueError,
        r"Linear\.weight is already preconditioned\. Call precondition once per weight",
    ),
    (
        "zero power iterations",
        lambda: pcopt.precondition(nn.Linear(4, 4), num_power_iterations=0),
        ValueError,
        r"num_power_iterations must be an integer >= 1, got 0",
    ),
    (
        "negative eps",
        lambda: pcopt.precondition(nn.Linear(4, 4), eps=-1e-7),
        ValueError,
        r"eps must be a positive finite float, got -1e-07",
    ),
    (
        "targets of a wrong type",
        lambda: pcopt.precondition_model(nn.Linear(4, 4), targets=1),
        TypeError,
        r"targets must be a regex \(str or re\.Pattern\) or a callable",
    ),
    (
        "dense checkpoint into a PC model",
        lambda: _pc_linear().load_state_dict(nn.Linear(4, 4).state_dict()),
        RuntimeError,
        r"holds a dense 'weight' but the model is preconditioned .* pcopt\.load_dense_state_dict",
    ),
    (
        "dense checkpoint missing a PC weight",
        lambda: pcopt.load_dense_state_dict(_pc_linear(), {"bias": torch.zeros(4)}),
        RuntimeError,
        r"the dense state_dict has no 'weight' for the preconditioned weight",
    ),
    (
        "gmcn without attention/FFN matrices",
        lambda: pcopt.gmcn(nn.Sequential(nn.Linear(3, 3))),
        ValueError,
        r"gmcn found no attention/FFN matrices in the model; pass targets=",
    ),
    (
        "Muon with a 1-D parameter",
        lambda: Muon([nn.Parameter(torch.zeros(3))]),
        ValueError,
        r"Muon only supports 2D parameters whereas we found a parameter with size: torch\.Size\(\[3\]\)\. "
        r"Route embeddings, the LM head, norms, biases and gamma to AdamW",
    ),
    (
        "Muon with a 3-D parameter",
        lambda: Muon([nn.Parameter(torch.zeros(2, 3, 3))]),
        ValueError,
        r"Muon only supports 2D parameters",
    ),
    (
        "Muon negative lr",
        lambda: Muon([nn.Parameter(torch.zeros(3, 3))], lr=-1.0),
        ValueError,
        r"Invalid learning rate: -1\.0\. Expected lr >= 0",
    ),
    (
        "Muon momentum = 1",
        lambda: Muon([nn.Parameter(torch.zeros(3, 3))], momentum=1.0),
        ValueError,
        r"Invalid momentum value: 1\.0\. Expected 0 <= momentum < 1",
    ),
    (
        "Muon negative momentum",
        lambda: Muon([nn.Parameter(torch.zeros(3, 3))], momentum=-0.1),
        ValueError,
        r"Invalid momentum value: -0\.1\. Expected 0 <= momentum < 1",
    ),
    (
        "Muon NaN lr",
        lambda: Muon([nn.Parameter(torch.zeros(3, 3))], lr=float("nan")),
        ValueError,
        r"Invalid learning rate: nan\. Expected lr >= 0",
    ),
    (
        "Muon ns_steps < 1",
        lambda: Muon([nn.Parameter(torch.zeros(3, 3))], ns_steps=0),
        ValueError,
        r"Invalid ns_steps: 0\. Expected an integer in \[1, 99\]",
    ),
    (
        "Muon eps <= 0",
        lambda: Muon([nn.Parameter(torch.zeros(3, 3))], eps=0.0),
        ValueError,
        r"Invalid epsilon value: 0\.0\. Expected a float > 0",
    ),
    (
        "Muon unknown coefficient set",
        lambda: Muon([nn.Parameter(torch.zeros(3, 3))], ns_coefficient_set="chebyshev"),
        ValueError,
        r"Unknown ns_coefficient_set: 'chebyshev'\. Expected one of \[.*'keller'.*'polar_express'.*\]",
    ),
    (
        "Muon unknown adjust_lr_fn",
        lambda: Muon([nn.Parameter(torch.zeros(3, 3))], adjust_lr_fn="moonlight"),
        ValueError,
        r"Adjust learning rate function moonlight is not supported\. Expected None, 'original'",
    ),
    (
        "Muon unknown ns_algorithm",
        lambda: Muon([nn.Parameter(torch.zeros(3, 3))], ns_algorithm="svd"),
        ValueError,
        r"Invalid ns_algorithm: 'svd'\. Expected 'standard' .* or 'gram'",
    ),
    (
        "Muon batched_weights not a bool",
        lambda: Muon([nn.Parameter(torch.zeros(3, 3))], batched_weights="yes"),
        ValueError,
        r"Invalid batched_weights: 'yes'\. Expected True .* or False",
    ),
    (
        "Muon foreach not a bool",
        lambda: Muon([nn.Parameter(torch.zeros(3, 3))], foreach="cuda"),
        ValueError,
        r"Invalid foreach: 'cuda'\. Expected None .* True .* or False",
    ),
    (
        "Muon complex gradient",
        lambda: _step_with_grad(torch.zeros(3, 3, dtype=torch.complex64)),
        RuntimeError,
        r"Muon does not support complex parameters or gradients",
    ),
    (
        "Muon sparse gradient",
        lambda: _step_with_grad(torch.zeros(3, 3).to_sparse()),
        RuntimeError,
        r"Muon does not support sparse gradients",
    ),
    (
        "parameter claimed by no group",
        lambda: pcopt.param_groups(_TwoLinear(), muon_pattern=r"^hidden\.weight$"),
        ValueError,
        r"1 trainable 2-D parameter\(s\) match neither muon_pattern .* adapter\.weight \(4, 4\)\. Every trainable parameter "
        r"must land in exactly one group",
    ),
    (
        "parameter claimed by two optimizers",
        lambda: pcopt.optim.CombinedOptimizer(
            {
                "a": torch.optim.SGD([p := nn.Parameter(torch.zeros(2))], lr=0.1),
                "b": torch.optim.SGD([p], lr=0.1),
            }
        ),
        ValueError,
        r"is in both 'a' and 'b'; every parameter must belong to exactly one child optimizer",
    ),
    (
        "invalid pattern",
        lambda: pcopt.param_groups(_TwoLinear(), muon_pattern="("),
        ValueError,
        r"muon_pattern is not a valid regular expression: '\('",
    ),
]


@pytest.mark.parametrize("call,exc,regex", [row[1:] for row in ERRORS], ids=[row[0] for row in ERRORS])
def test_bad_input_raises_clear_error(call, exc, regex):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc, match=regex):
            call()


def _pc_state_dict(**kw):
    return pcopt.precondition(nn.Linear(4, 6, bias=False), **kw).state_dict()


WARNINGS = [
    (
        "PCState of a model without PC",
        lambda: pcopt.PCState(nn.Linear(4, 4)),
        UserWarning,
        r"PCState: the model has no preconditioned weights, so its moments do nothing",
    ),
    (
        "build_optimizer num_power_iterations without PC",
        lambda: pcopt.build_optimizer(_TwoLinear(), lr=1e-3, num_power_iterations=3),
        UserWarning,
        r"num_power_iterations has no effect, the model has no preconditioned weights",
    ),
    (
        "coefficients not mapping 1 to 1",
        lambda: pcopt.precondition(nn.Linear(4, 4), coefficients=(1.0, 0.5)),
        UserWarning,
        r"sum to 1\.5, so p\(1\) != 1.*Normalise them to sum to 1",
    ),
    (
        "merge without PC weights",
        lambda: pcopt.merge(nn.Linear(4, 4)),
        UserWarning,
        r"the model has no preconditioned weights; nothing to merge",
    ),
    (
        "coefficient list longer than ns_steps",
        lambda: Muon(
            [nn.Parameter(torch.zeros(3, 3))], ns_steps=2, ns_coefficient_set=[(3.4445, -4.775, 2.0315)] * 4
        ),
        UserWarning,
        r"ns_coefficient_set has 4 triples but ns_steps=2; the last 2 are unused\. Pass ns_steps=4",
    ),
    (
        "param-group pattern matching nothing",
        lambda: pcopt.param_groups(_TwoLinear(), adamw_pattern=r"^nothing$"),
        UserWarning,
        r"param_groups: adamw_pattern='\^nothing\$' matched no trainable parameter",
    ),
    (
        "precondition_model matching nothing",
        lambda: pcopt.precondition_model(nn.Linear(4, 4), targets="^nope$"),
        UserWarning,
        r"no module matched targets='\^nope\$'.*nothing was preconditioned",
    ),
]


@pytest.mark.parametrize(
    "call,category,regex", [row[1:] for row in WARNINGS], ids=[row[0] for row in WARNINGS]
)
def test_ineffective_option_warns(call, category, regex):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    hits = [w for w in caught if issubclass(w.category, category) and re.search(regex, str(w.message))]
    assert len(hits) == 1, [str(w.message) for w in caught]  # once, not once per internal check


PC_LAYOUT_ERRORS = [
    (
        "PC state_dict into a plain model",
        lambda: pcopt.load_state_dict(nn.Linear(4, 6, bias=False), _pc_state_dict()),
        RuntimeError,
        r"holds preconditioned \(PC\) weights that this model does not have: \['weight'\].*"
        r"pcopt\.merged_state_dict\(pc_model\)",
    ),
    (
        "PC state saved with another degree",
        lambda: pcopt.precondition(nn.Linear(4, 6, bias=False), degree=5).load_state_dict(
            _pc_state_dict(degree=9)
        ),
        RuntimeError,
        r"trained with degree 9, eps 1e-07.*preconditioned with degree 5, eps 1e-07.*pcopt\.PCOptions",
    ),
    (
        "PCOptions wrong type",
        lambda: pcopt.PCOptions(num_power_iterations=2.5),
        TypeError,
        r"num_power_iterations must be an integer >= 1, got float 2\.5",
    ),
    (
        "PCOptions eps not a number",
        lambda: pcopt.PCOptions(eps="small"),
        TypeError,
        r"eps must be a positive finite float, got str 'small'",
    ),
    (
        "after_backward inside accumulate",
        lambda: _after_backward_inside_accumulate(),
        RuntimeError,
        r"PCState\.after_backward was called inside an accumulate\(\) block",
    ),
]


def _after_backward_inside_accumulate():
    state = pcopt.PCState(pcopt.precondition(nn.Linear(4, 6)))
    with state.accumulate():
        state.after_backward()


@pytest.mark.parametrize(
    "call,exc,regex", [row[1:] for row in PC_LAYOUT_ERRORS], ids=[row[0] for row in PC_LAYOUT_ERRORS]
)
def test_pc_state_errors(call, exc, regex):
    with pytest.raises(exc, match=regex):
        call()


def test_table_is_large_enough():
    assert len(ERRORS) + len(WARNINGS) >= 15
