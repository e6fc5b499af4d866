"""Newton-Schulz variants against float64 references: Gram == standard, singular-value quality, FLOPs.

References are independent of the code under test: a float64 SVD (polar factor and the odd polynomials
applied to its singular values in closed form), torch.optim.Muon, and FLOPs counted by
torch.utils.flop_counter.FlopCounterMode on the ops actually run.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.optim._muon import _zeropower_via_newtonschulz
from torch.utils.flop_counter import FlopCounterMode

from pcopt.optim import Muon, newton_schulz, newton_schulz_flops
from pcopt.optim._newton_schulz import (
    GRAM_RESTART,
    KELLER_COEFFICIENTS,
    NS_COEFFICIENT_SETS,
    SYMMETRIC_MIN_SIZE,
    resolve_coefficients,
    resolve_dtype,
)

# The reference coefficient sets, written out from their publications (not read from the code under test):
# Keller Jordan's quintic (https://kellerjordan.github.io/posts/muon/), the same at each of the 5 steps, input
# divided by its Frobenius norm; Polar Express (Amsel, Persson, Musco, Gower, arXiv:2505.16932), the first 5
# of the paper's per-step quintics (all 8 in PUBLISHED_POLAR_EXPRESS), each p(x) -> p(x / 1.01) (a / 1.01,
# b / 1.01^3, c / 1.01^5), input divided by 1.01 times its Frobenius norm.
PUBLISHED_POLAR_EXPRESS = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
_PAPER_POLAR_EXPRESS = PUBLISHED_POLAR_EXPRESS[:5]
KELLER = (((3.4445, -4.775, 2.0315),) * 5, 1.0)
POLAR_EXPRESS = (tuple((a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _PAPER_POLAR_EXPRESS), 1.01)
SETS = {"keller": KELLER, "polar_express": POLAR_EXPRESS}


def test_coefficient_sets_are_the_published_ones():
    """pcopt's tables against the literal published values above (a typo in either fails here)."""
    assert KELLER_COEFFICIENTS == KELLER[0][0]
    assert resolve_coefficients(KELLER_COEFFICIENTS, None, 5) == KELLER
    triples, factor = resolve_coefficients(KELLER_COEFFICIENTS, "polar_express", 5)
    assert factor == 1.01
    # The code may divide in another order (a / 1.01**3 vs (a / 1.01) / 1.01**2): 1 ulp of float64 per term.
    for got, want in zip(triples, POLAR_EXPRESS[0], strict=True):
        assert got == pytest.approx(want, rel=4 * 2**-52, abs=0)


def _spectrum_matrix(m: int, n: int, sigmas: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``U diag(sigmas) V^T`` with random orthonormal ``U`` (m x k), ``V`` (n x k), in float64."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return U @ torch.diag(sigmas.double()) @ V.T


def _polynomial_image(G: torch.Tensor, triples, norm_factor: float) -> torch.Tensor:
    """The composed odd quintics on the normalized singular values of G, in float64 (closed form)."""
    s = torch.linalg.svdvals(G.double())
    s = s / (norm_factor * s.norm())
    for a, b, c in triples:
        s = a * s + b * s**3 + c * s**5
    return s


# ---------------------------------------------------------------------------------------------------
# Gram Newton-Schulz is the standard iteration's polynomial
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(48, 132), (132, 48), (40, 41)])
@pytest.mark.parametrize("name", ["keller", "polar_express"])
@pytest.mark.parametrize("restart", [(), (3,), (1, 2, 4)])
def test_gram_equals_standard_in_float64(shape, name, restart):
    triples, f = SETS[name]
    G = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    std = newton_schulz(G, triples, dtype=torch.float64, norm_factor=f)
    gram = newton_schulz(
        G, triples, dtype=torch.float64, norm_factor=f, algorithm="gram", gram_restart=restart
    )
    # Same polynomial in X: they differ by float64 rounding only. Every product's entries are dot products of
    # length <= 132 of vectors of norm <= sigma_max (<= 1.3 after the first step), so each rounds by at most
    # 132 * 2^-53 * 1.3^2 ~ 2.5e-14; 5 steps of |p'| <= 3.5 (Keller; Polar Express's first step: <= 8.3, then
    # <= 4.2) amplify that by < 8.3 * 4.2^4 ~ 2.6e3, over <= 17 products: < 1.1e-9. 1e-8 leaves margin.
    torch.testing.assert_close(gram, std, rtol=0, atol=1e-8)
    if newton_schulz_flops(shape, 5, "gram", restart) >= newton_schulz_flops(shape, 5):
        assert torch.equal(gram, std)  # (nearly) square: Gram needs more FLOPs, so the standard one runs
    else:  # and the comparison is not vacuous: the Gram path ran other ops (not bitwise the same)
        assert not torch.equal(gram, std)


def test_gram_runs_only_where_cheaper_and_counts_match_flop_counter():
    triples, f = KELLER
    for shape in [(64, 176), (176, 64), (64, 64), (64, 80)]:
        G = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        for algorithm in ("standard", "gram"):
            with FlopCounterMode(display=False) as counter:
                newton_schulz(G, triples, dtype=torch.float32, algorithm=algorithm, gram_restart=GRAM_RESTART)
            assert counter.get_total_flops() == newton_schulz_flops(shape, 5, algorithm, GRAM_RESTART)
    # closed form for a wide n x m with n = 64, m = 176, 5 steps and one restart: 2 phases of (first Gram +
    # final Q X) = 4 products of 2 n^2 m FLOPs; n x n products: 5 squares, 3 Z Q, 2 x 3 for R = Z (R Z)
    n, m = 64, 176
    assert newton_schulz_flops((n, m), 5, "gram", (3,)) == 4 * 2 * n * n * m + 14 * 2 * n**3
    assert newton_schulz_flops((n, m), 5, "gram", ()) == 2 * 2 * n * n * m + 17 * 2 * n**3
    assert newton_schulz_flops((n, m), 5) == 5 * (4 * n * n * m + 2 * n**3)
    assert newton_schulz_flops((n, n), 5, "gram") == newton_schulz_flops((n, n), 5)


# ---------------------------------------------------------------------------------------------------
# Symmetric products computed as block triangles are the full products
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(45, 132), (132, 45), (41, 41)])
@pytest.mark.parametrize("algorithm", ["standard", "gram"])
@pytest.mark.parametrize("blocks", [2, 3])
def test_symmetric_blocks_equal_full_products_in_float64(shape, algorithm, blocks):
    triples, f = POLAR_EXPRESS
    G = torch.randn(3, *shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kw = dict(dtype=torch.float64, norm_factor=f, algorithm=algorithm, gram_restart=(3,))
    full = newton_schulz(G, triples, symmetric_blocks=1, **kw)
    with FlopCounterMode(display=False) as counter:
        sym = newton_schulz(G, triples, symmetric_blocks=blocks, **kw)
    # A mirrored entry (j, i) is the computed (i, j): the same dot product, summed in another order, so the two
    # differ by float64 rounding of one product (<= 132 * 2^-53 * 1.3^2, as in the Gram test above), which the
    # steps amplify by < 2.6e3 (Polar Express): < 1e-10 per product, over <= 17 products. The per-product bound is
    # the worst case of any summation order (FMA or not), so it holds for every CPU's float64 BLAS (AMX has no
    # float64 path; AVX2 and AVX-512 only reorder the sums).
    torch.testing.assert_close(sym, full, rtol=0, atol=1e-8)
    # Other kernels ran, so the comparison is not vacuous: the blocked path did fewer FLOPs than the full one.
    # (Bitwise equality is allowed: a BLAS that sums each block's dot products in the full product's order, as
    # one Intel Xeon AVX-512 did, gives the same bits.)
    sym_flops = 3 * newton_schulz_flops(shape, 5, algorithm, (3,), symmetric_blocks=blocks)  # 3 matrices
    assert counter.get_total_flops() == sym_flops
    assert sym_flops < 3 * newton_schulz_flops(shape, 5, algorithm, (3,), symmetric_blocks=1)


def test_symmetric_block_flops_closed_form_and_size_rule():
    n, m = 64, 176  # even n, 2 x 2 blocks: 3 of 4 blocks of every product but A X / Q X
    assert newton_schulz_flops((n, m), 5, symmetric_blocks=2) == 5 * (
        3 * n * n * m // 2 + 3 * n**3 // 2 + 2 * n * n * m
    )
    assert (
        newton_schulz_flops((n, m), 5, "gram", (3,), symmetric_blocks=2)
        == 2 * (3 * n * n * m // 2 + 2 * n * n * m) + 14 * 3 * n**3 // 2
    )
    # None: 2 x 2 blocks from a small side of SYMMETRIC_MIN_SIZE on (the size rule of Muon's "gram"), full below
    n = SYMMETRIC_MIN_SIZE
    assert newton_schulz_flops((3 * n, n), 5, symmetric_blocks=None) == newton_schulz_flops(
        (3 * n, n), 5, symmetric_blocks=2
    )
    assert newton_schulz_flops((3 * n, n - 1), 5, symmetric_blocks=None) == newton_schulz_flops(
        (3 * n, n - 1), 5
    )


def test_symmetric_blocks_batching_gives_the_same_bits():
    G = torch.randn(4, 40, 96, generator=torch.Generator().manual_seed(4))
    triples, _ = KELLER
    for algorithm in ("standard", "gram"):
        stacked = newton_schulz(G, triples, algorithm=algorithm, symmetric_blocks=2)
        one_by_one = newton_schulz(G, triples, algorithm=algorithm, symmetric_blocks=2, stack=False)
        assert torch.equal(stacked, one_by_one)
        assert torch.equal(
            stacked[1:3], newton_schulz(G[1:3], triples, algorithm=algorithm, symmetric_blocks=2)
        )


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_symmetric_blocks_rejects_non_positive_integers(bad):
    with pytest.raises(ValueError, match=r"Invalid symmetric_blocks: .*Expected None \(by size\), 1"):
        newton_schulz(torch.randn(8, 8), KELLER[0], symmetric_blocks=bad)


@pytest.mark.parametrize("algorithm, blocks", [("standard", 1), ("gram", 2)])
def test_muon_step_flops_follow_its_algorithm(algorithm, blocks):
    """Muon's "gram" runs Gram NS with block-triangular products on a 512 x 1024 matrix; "standard" torch's
    full products (fp32: the same routing as bf16, without the restart, and fast on CPUs without native bf16)."""
    p = nn.Parameter(
        torch.randn(SYMMETRIC_MIN_SIZE, 2 * SYMMETRIC_MIN_SIZE, generator=torch.Generator().manual_seed(5))
    )
    p.grad = torch.randn_like(p)
    opt = Muon([p], lr=0.02, ns_algorithm=algorithm, ns_dtype=torch.float32)
    opt.step()  # the first step may run one-off checks (pcopt.hardware); the second is counted
    with FlopCounterMode(display=False) as counter:
        opt.step()
    want = newton_schulz_flops(p.shape, 5, algorithm, (), symmetric_blocks=blocks)
    assert counter.get_total_flops() == want
    assert algorithm == "standard" or want < 0.75 * newton_schulz_flops(p.shape, 5)


# ---------------------------------------------------------------------------------------------------
# Quality guard: singular values of the bf16 update against the float64 SVD
# ---------------------------------------------------------------------------------------------------
VARIANTS = [
    ("keller", "standard", 1),
    ("polar_express", "standard", 1),
    ("keller", "gram", 1),
    ("polar_express", "gram", 1),
    ("keller", "standard", 2),  # block-triangular symmetric products (Muon's "gram" from 512 on)
    ("keller", "gram", 2),
    ("polar_express", "gram", 2),
]


@pytest.mark.parametrize("name, algorithm, blocks", VARIANTS)
@pytest.mark.parametrize("spectrum", ["gaussian", "logspace 1..100"])
def test_bf16_singular_values_stay_in_the_polynomials_band(name, algorithm, blocks, spectrum):
    """The update's singular vectors are the polar factor's, and its singular values lie in the band that
    the composed polynomial maps the input's normalized singular values to (exact arithmetic), widened by
    bf16 rounding.

    Allowance: one bf16 rounding of an n x m matrix with sigma_max <= 1.3 moves each singular value by at
    most ||E||_2 <= ||E||_F <= 2^-8 ||X||_F <= 2^-8 * 1.3 sqrt(n) (Weyl), 0.058 for n = 128; the last step's
    rounded inputs reach the result through |p'| <= 1.7 on the band (Keller; Polar Express's last triples
    have |p'| <= 1), so 0.058 * (1 + 1.7) = 0.16 bounds the result's deviation from the band. Measured:
    <= 0.02 (docs/muon.md).
    """
    triples, f = SETS[name]
    n, m = 128, 352
    if spectrum == "gaussian":
        G = torch.randn(n, m, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    else:
        G = _spectrum_matrix(n, m, torch.logspace(0, 2, n, dtype=torch.float64))
    out = newton_schulz(
        G.float(), triples, norm_factor=f, algorithm=algorithm, symmetric_blocks=blocks
    ).double()  # bf16, as Muon
    image = _polynomial_image(G, triples, f)
    lo, hi = image.min().item(), image.max().item()
    allowance = 2**-8 * 1.3 * math.sqrt(n) * (1 + 1.7)
    sv = torch.linalg.svdvals(out)
    assert sv.min() >= lo - allowance and sv.max() <= hi + allowance, (sv.min(), sv.max(), lo, hi)
    # singular vectors: in the polar factor's basis, out is nearly diagonal (off-diagonal mass small)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    D = U.T @ out @ Vh.T
    off = D - torch.diag(torch.diagonal(D))
    assert torch.linalg.matrix_norm(off, 2) <= 2 * allowance + (hi - lo)


def test_gram_without_restart_drifts_in_bf16_and_the_default_restart_fixes_it():
    """Why GRAM_RESTART exists: singular values 1e-3..1 (the Gram matrix spans 1e-6..1, below bf16's
    resolution). Without a restart Keller's result leaves the band by far more than bf16 rounding; with the
    default restart it stays within the quality guard's allowance."""
    triples, f = KELLER
    n, m = 128, 352
    G = _spectrum_matrix(n, m, torch.logspace(-3, 0, n, dtype=torch.float64)).float()
    image = _polynomial_image(G, triples, f)
    allowance = 2**-8 * 1.3 * math.sqrt(n) * (1 + 1.7)
    drift = torch.linalg.svdvals(newton_schulz(G, triples, algorithm="gram", gram_restart=()).double())
    fixed = torch.linalg.svdvals(newton_schulz(G, triples, algorithm="gram").double())
    assert drift.max() > image.max() + 3 * allowance
    assert fixed.max() <= image.max() + allowance


def test_fp32_gram_needs_no_restart():
    triples, f = POLAR_EXPRESS
    n, m = 128, 352
    G = _spectrum_matrix(n, m, torch.logspace(-3, 0, n, dtype=torch.float64))
    out = newton_schulz(G.float(), triples, dtype=torch.float32, norm_factor=f, algorithm="gram").double()
    image = _polynomial_image(G, triples, f)
    # fp32: the Gram matrix's eigenvalue errors are ~2^-24 ||R||, i.e. ~2^-12 on the smallest singular
    # values, which the 5 steps amplify by at most prod |p'| ~ 8.3 * 4.2^4 ~ 2.6e3 in the worst case
    # (small values, where p is nearly linear): 0.64 relative on values that end near 1e-3 * 2.6e3.
    # Over the band's top, |p'| <= 1 and 1e-2 is a loose bound.
    assert torch.linalg.svdvals(out).max() <= image.max() + 1e-2


# ---------------------------------------------------------------------------------------------------
# The optimizer options
# ---------------------------------------------------------------------------------------------------
def test_muon_gram_option_matches_standard_in_float64():
    gen = torch.Generator().manual_seed(0)
    shapes = [(24, 64), (64, 24), (32, 32)]
    a = [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    opts = [Muon(a, lr=0.02, ns_dtype="fp64"), Muon(b, lr=0.02, ns_dtype="fp64", ns_algorithm="gram")]
    for _ in range(3):
        g = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        for ps, opt in zip((a, b), opts):
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            opt.step()
    for x, y in zip(a, b):
        # 3 updates of lr * 0.2 * sqrt(64)-scaled unit-norm-ish updates, each within 1e-8 (see above)
        torch.testing.assert_close(x, y, rtol=0, atol=1e-9 * 3 * 0.02 * 8 * 10)


@pytest.mark.parametrize("foreach", [None, True, False])
def test_batched_weights_equal_torch_muon_on_each_slice(foreach):
    """A (E, m, n) weight with batched_weights=True is E matrices: torch.optim.Muon on E separate 2-D
    parameters gives the same bits (lr adjusted by (m, n))."""
    gen = torch.Generator().manual_seed(0)
    E, m, n = 3, 12, 20
    w = nn.Parameter(torch.randn(E, m, n, generator=gen))
    ref = [nn.Parameter(w.detach()[e].clone()) for e in range(E)]
    ours = Muon([w], lr=0.05, batched_weights=True, foreach=foreach, adjust_lr_fn="match_rms_adamw")
    theirs = torch.optim.Muon(ref, lr=0.05, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        g = torch.randn(E, m, n, generator=gen)
        w.grad = g.clone()
        for e, p in enumerate(ref):
            p.grad = g[e].clone()
        ours.step()
        theirs.step()
    for e in range(E):
        assert torch.equal(w.detach()[e], ref[e].detach())
    assert not torch.equal(w.detach()[0], torch.randn(E, m, n, generator=torch.Generator().manual_seed(0))[0])


@pytest.mark.parametrize("split", [(4, 8, 8), (5,) * 4])  # fused QKV with GQA-sized K/V; per head
@pytest.mark.parametrize("foreach", [None, False])
def test_split_sizes_equal_torch_muon_on_each_block(split, foreach):
    """A fused weight with split_sizes is the matrices it stacks: torch.optim.Muon on the row blocks as separate
    parameters gives the same bits (each block its own Newton-Schulz and its own lr adjustment), over steps."""
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(sum(split), 16, generator=gen))
    other = nn.Parameter(torch.randn(6, 16, generator=gen))  # a plain matrix in another group
    ref = [nn.Parameter(b.clone()) for b in w.detach().split(list(split))]
    ref_other = nn.Parameter(other.detach().clone())
    ours = Muon([{"params": [w], "split_sizes": list(split)}, {"params": [other]}], lr=0.05,
                adjust_lr_fn="match_rms_adamw", foreach=foreach)  # fmt: skip
    theirs = torch.optim.Muon([*ref, ref_other], lr=0.05, adjust_lr_fn="match_rms_adamw")
    assert ours.param_groups[0]["split_sizes"] == split and ours.param_groups[1]["split_sizes"] is None
    for _ in range(3):
        g, h = torch.randn(w.shape, generator=gen), torch.randn(other.shape, generator=gen)
        w.grad, other.grad = g.clone(), h.clone()
        for p, b in zip(ref, g.split(list(split))):
            p.grad = b.clone()
        ref_other.grad = h.clone()
        ours.step()
        theirs.step()
    assert torch.equal(w.detach(), torch.cat([p.detach() for p in ref]))
    assert torch.equal(other.detach(), ref_other.detach())
    assert ours.state[w]["momentum_buffer"].shape == w.shape  # one buffer per parameter, as checkpoints hold
    # and not the whole-matrix update: the option changes the result
    a, b = (nn.Parameter(torch.ones(sum(split), 16)) for _ in range(2))
    a.grad, b.grad = g.clone(), g.clone()
    Muon([{"params": [a], "split_sizes": split}], lr=0.05).step()
    Muon([b], lr=0.05).step()
    assert not torch.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize("shape", [(3, 2 * 6, 10), (2 * 8, 12)])  # gpt_oss's (E, 2F, D) mlp1; a 2-D one
@pytest.mark.parametrize("foreach", [None, False])
def test_row_interleave_steps_each_interleaved_matrix_as_its_own_parameter(shape, foreach):
    """A weight whose rows alternate between k = 2 matrices (gpt_oss's mlp1: gate rows 0::2, up rows 1::2) with
    row_interleave=2 is those matrices, over steps: bitwise the step of pcopt's Muon on the rows[j::2] stacks as
    separate parameters in the same mode, and, in the per-matrix reference loop (foreach=False), of
    torch.optim.Muon on every (expert, j) matrix as a separate 2-D parameter (each its own Newton-Schulz and its
    own lr adjustment by (rows / 2, cols)). The stacked mode is not compared with torch bit for bit: its fp32
    update of a stack and torch's of one matrix may round one element differently (1 ulp, measured on an AVX-512
    EPYC for plain stacks too); test_batched_weights_equal_torch_muon_on_each_slice covers that mode."""
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(shape, generator=gen))

    def stacks(t):  # rows j::2
        return [t[..., j::2, :] for j in range(2)]

    def pieces(t):  # matrix (e, j): rows j::2 of expert e
        t = t.reshape(-1, *shape[-2:])
        return [t[e, j::2] for e in range(t.shape[0]) for j in range(2)]

    sep = [nn.Parameter(x.contiguous()) for x in stacks(w.detach())]
    ref = [nn.Parameter(x.clone()) for x in pieces(w.detach())]
    ours = Muon([{"params": [w], "row_interleave": 2}], lr=0.05, batched_weights=True, foreach=foreach,
                adjust_lr_fn="original")  # fmt: skip
    separate = Muon(sep, lr=0.05, batched_weights=True, foreach=foreach, adjust_lr_fn="original")
    theirs = torch.optim.Muon(ref, lr=0.05, adjust_lr_fn="original")
    for _ in range(3):
        g = torch.randn(shape, generator=gen)
        w.grad = g.clone()
        for r, x in zip(sep, stacks(g)):
            r.grad = x.contiguous()
        for r, x in zip(ref, pieces(g)):
            r.grad = x.clone()
        ours.step()
        separate.step()
        theirs.step()
    for got, want in zip(stacks(w.detach()), sep):
        assert torch.equal(got, want.detach())
    if foreach is False:
        for got, want in zip(pieces(w.detach()), ref):
            assert torch.equal(got, want.detach())
    assert ours.state[w]["momentum_buffer"].shape == w.shape  # one buffer per parameter, as checkpoints hold
    # and not the whole-matrix update: the option changes the result
    a, b = (nn.Parameter(torch.ones(shape)) for _ in range(2))
    a.grad, b.grad = g.clone(), g.clone()
    Muon([{"params": [a], "row_interleave": 2}], lr=0.05, batched_weights=True).step()
    Muon([b], lr=0.05, batched_weights=True).step()
    assert not torch.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize(
    "group, message",
    [
        (
            {"row_interleave": 2, "shape": (2, 7, 4)},
            r"row_interleave=2\) .* divisible by 2, got shape \(2, 7, 4\)",
        ),
        ({"row_interleave": 0, "shape": (4, 4)}, r"Invalid row_interleave: 0\. Expected an int >= 1"),
        (
            {"row_interleave": 2, "split_sizes": (2, 2), "shape": (4, 4)},
            r"split_sizes=\(2, 2\) and row_interleave=2",
        ),
    ],
)
def test_row_interleave_refuses_what_it_cannot_split(group, message):
    shape = group.pop("shape")
    with pytest.raises(ValueError, match=message):
        Muon([{"params": [nn.Parameter(torch.zeros(shape))], **group}], batched_weights=True)


@pytest.mark.parametrize(
    "split, shape, message",
    [
        ((4, 4), (9, 3), r"split_sizes=\(4, 4\)\) splits the rows .* got a tensor of shape \(9, 3\)"),
        ((3, 3), (2, 3, 6), r"got a tensor of shape \(2, 3, 6\)"),
        ((0, 6), (6, 3), r"Invalid split_sizes: \(0, 6\)\. Expected None .* positive ints"),
        (3, (6, 3), r"Invalid split_sizes: 3\. Expected None"),
    ],
)
def test_split_sizes_refuse_what_they_cannot_split(split, shape, message):
    with pytest.raises(ValueError, match=message):
        Muon([{"params": [nn.Parameter(torch.zeros(shape))], "split_sizes": split}])


def test_batched_weights_off_refuses_3d_like_torch():
    with pytest.raises(ValueError, match=r"Muon only supports 2D parameters.*batched_weights=True"):
        Muon([nn.Parameter(torch.zeros(2, 3, 4))])
    with pytest.raises(ValueError, match=r"Muon only supports 2D parameters"):
        torch.optim.Muon([nn.Parameter(torch.zeros(2, 3, 4))])


def test_cpu_default_stacks_small_matrices_only():
    from pcopt.optim._muon_step import _matrices_per_call

    cpu = torch.device("cpu")
    assert _matrices_per_call((128, 352), None, cpu) >= 4  # small: stacked (per-op overhead dominates)
    assert _matrices_per_call((512, 1408), None, cpu) == 1  # large: one at a time on CPUs
    assert _matrices_per_call((512, 1408), True, cpu) > 100  # foreach=True stacks whatever the size
    assert _matrices_per_call((128, 352), False, cpu) == 1
    assert _matrices_per_call((512, 1408), None, torch.device("meta")) > 100  # off CPUs: stacked


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_foreach_modes_give_the_same_bits(ns_dtype):
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 40), (16, 40), (40, 16), (24, 24), (24, 24)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(2)]
    results = {}
    for mode in (None, True, False):
        ps = [nn.Parameter(t.clone()) for t in init]
        opt = Muon(ps, lr=0.02, foreach=mode, ns_algorithm="gram", ns_dtype=ns_dtype)
        for g in grads:
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            opt.step()
        results[mode] = ps
    # None stacks these small matrices on a CPU as True does: the same kernels, the same bits.
    assert all(torch.equal(x, y) for x, y in zip(results[None], results[True]))
    if ns_dtype == torch.float32:  # fp32 batched and single matmuls round alike on every CPU seen
        assert all(torch.equal(x, y) for x, y in zip(results[None], results[False]))
        return
    # bf16: on an AMX CPU (Intel Xeon, oneDNN) a stacked bmm rounds some batch entries otherwise than one mm (seen:
    # 3.9e-5 on the 2nd (16, 40) matrix), so stacked and one-at-a-time agree only within bf16 Newton-Schulz's own
    # spread. Each step moves a weight by adjusted_lr * O with |O|_max <= ||O||_2 <= 1.3 (Keller's coefficients
    # keep singular values in [0.68, 1.2]), so two valid bf16 updates differ by at most 2 * 1.3 per entry and step:
    # over 2 steps at adjusted lr <= 0.02 * sqrt(40 / 16) that is 2 * 0.032 * 2.6 = 0.17. What that bound catches
    # is a diverged or non-finite step; fp32 above pins the bits.
    for x, y in zip(results[None], results[False]):
        assert (x - y).abs().max().item() <= 0.17


# ----------------------------------------------------------------------------------------------------
# Tests that kill the surviving mutants of pcopt/optim/_newton_schulz.py (tools/mutation.py).
#
# References: the Polar Express paper's published coefficient listing (Amsel et al., arXiv:2505.16932,
# Algorithm 1, as released with the paper), the classical quintic (15 x - 10 x^3 + 3 x^5) / 8, and
# torch.optim's own Newton-Schulz kernel.


def test_polar_express_is_the_published_list_with_the_safety_factor():
    triples, norm_factor = NS_COEFFICIENT_SETS["polar_express"]
    assert norm_factor == 1.01
    assert len(triples) == len(PUBLISHED_POLAR_EXPRESS) == 8
    for got, (a, b, c) in zip(triples[:-1], PUBLISHED_POLAR_EXPRESS[:-1]):
        # p(x / 1.01): one division per coefficient, so 1 ulp of fp64 at most.
        assert got == pytest.approx((a / 1.01, b / 1.01**3, c / 1.01**5), rel=1e-15)
    # The last one is the classical quintic that fixes 1 with p'(1) = p''(1) = 0: (15, -10, 3) / 8.
    assert triples[-1] == (15 / 8, -10 / 8, 3 / 8) == PUBLISHED_POLAR_EXPRESS[-1]


@pytest.mark.parametrize(
    "coefficients",
    [(3.4, -4.7), (3.4, -4.7, 2.0, 0.1), [3.4, -4.7, math.nan], "abc", (3.4, True, 2.0)],
)
def test_only_three_finite_numbers_are_a_triple(coefficients):
    with pytest.raises(ValueError, match="ns_coefficients"):
        resolve_coefficients(coefficients, None, 5)
    with pytest.raises(ValueError, match="ns_coefficient_set"):
        resolve_coefficients(KELLER_COEFFICIENTS, [coefficients], 5)


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64, torch.bool])
def test_non_floating_dtypes_are_refused(dtype):
    with pytest.raises(ValueError, match="Invalid ns_dtype"):
        resolve_dtype(dtype)


@pytest.mark.parametrize("shape", [(16, 16), (12, 20), (20, 12)])
def test_bitwise_equal_to_torch_optim_muon_in_bf16(shape):
    # The module's contract: one repeated triple in bf16 gives torch.optim.Muon's bits; square matrices are
    # not transposed there (a transposed square iteration rounds differently).
    torch.manual_seed(sum(shape))
    G = torch.randn(shape)
    ours = newton_schulz(G, (KELLER_COEFFICIENTS,) * 5, eps=1e-7, dtype=torch.bfloat16)
    theirs = _zeropower_via_newtonschulz(G, KELLER_COEFFICIENTS, 5, 1e-7)
    assert torch.equal(ours, theirs)
