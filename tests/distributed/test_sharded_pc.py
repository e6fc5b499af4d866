"""The once-per-step PC strategy on FSDP2 shards (2 gloo ranks), against the unsharded per-forward strategy."""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import pcopt
from tests._distributed import run_distributed
from tests.conftest import FeedForward

pytestmark = pytest.mark.distributed

DIM, HIDDEN = 64, 176


class _Attention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return self.wo(torch.tanh(self.wv(x)))


class _Layer(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.attention = _Attention(dim)
        self.feed_forward = FeedForward(dim, hidden)
        self.norm = nn.RMSNorm(dim)

    def forward(self, x):
        x = x + self.attention(self.norm(x))
        return x + self.feed_forward(self.norm(x))


class _Model(nn.Module):
    def __init__(self, dim=DIM, hidden=HIDDEN):
        super().__init__()
        self.layers = nn.ModuleList([_Layer(dim, hidden) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _model(seed=0, degree=5, **kw):
    torch.manual_seed(seed)
    model = _Model(**kw)
    pcopt.precondition_model(model, degree=degree, strategy="per_forward")  # the reference; _once switches
    return model


def _shard_fn(tp_mesh=None, fsdp=True, **kwargs):
    """FSDP2 over every layer and the root; with ``tp_mesh``, Llama's tensor-parallel plan first (wv, w1, w3
    column-wise, wo, w2 row-wise), as torchtitan applies it before FSDP2; ``fsdp=False``: tensor parallel only."""

    def shard(model, placement_fn):
        from torch.distributed.fsdp import fully_shard

        if tp_mesh is not None:
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            plan = {"attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel(),
                    "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
                    "feed_forward.w2": RowwiseParallel()}  # fmt: skip
            for layer in model.layers:
                parallelize_module(layer, tp_mesh, plan)
        if not fsdp:
            return
        for layer in model.layers:
            fully_shard(layer, shard_placement_fn=placement_fn, **kwargs)
        fully_shard(model, shard_placement_fn=placement_fn, **kwargs)

    return shard


def _once(model, shard=None):
    pcopt.set_strategy(model, "once_per_step", shard=shard)
    return pcopt.PCState(model)


def _sharded(seed=0, degree=5, tp_mesh=None, **kwargs):
    model = _model(seed, degree)
    return model, _once(model, _shard_fn(tp_mesh, **kwargs))


def _trainable(model):
    """What the optimizer updates: every parameter but the W_eff ones."""
    skip = {id(p) for p in pcopt.effective_parameters(model)}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in skip]


def _names(model):
    return [f for f, _ in pcopt.preconditioners(model)]


def _parametrize_fsdp(seed=0, degree=5):
    model = _model(seed, degree)
    _shard_fn()(model, None)
    return model


def _ref_name(name):
    return name  # one key layout in both strategies


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# Adam's first step is lr * g / (|g| + eps): near |g| ~ eps it amplifies a gradient's rounding by up to
# lr / (4 eps). The sharded gradients differ from the unsharded ones by fp32 summation order (~1e-8 of ||g||), and
# the amplified difference feeds the next step's gradients. Measured on 4 HSDP ranks: eps 1e-8 moved an entry with
# g = 5.26e-8 (vs 4.92e-8 unsharded) by 9e-5 after one step (2e-5 of ||W||); eps 1e-6 left step 2's gradients
# 1.04e-5 apart; eps 1e-4 (amplification <= 25) leaves 1.2e-6, so the 1e-5 bounds below measure PC, not Adam.
ADAM_EPS = 1e-4


def _optimizers(model, named, kind):
    named = list(named)
    if kind == "adamw":
        return [torch.optim.AdamW([p for _, p in named], lr=1e-2, weight_decay=0.1, eps=ADAM_EPS)]
    mats = [p for n, p in named if n.endswith("parametrizations.weight.original")]
    rest = [p for n, p in named if not n.endswith("parametrizations.weight.original")]
    return [
        pcopt.optim.Muon(mats, lr=2e-2, ns_dtype=torch.float32, adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW(rest, lr=1e-2, weight_decay=0.1, eps=ADAM_EPS),
    ]


# -- exactness ---------------------------------------------------------------------------------------------
def _equality(rank, world, layout="fsdp"):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    kwargs, dp, dp_size = {}, rank, world  # dp: which slice of the batch this rank trains on
    if layout == "hsdp":  # 2 replicas x 2 shards: placements (Replicate(), Shard(d))
        kwargs["mesh"] = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    # FSDP 2 x TP 2: placements (_StridedShard(d), Shard(d)); a TP group shares a batch
    if layout == "fsdp_tp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        kwargs.update(mesh=mesh["dp"], tp_mesh=mesh["tp"])
        dp, dp_size = mesh["dp"].get_local_rank(), 2
    if layout == "tp":  # tensor parallel only, 1-D mesh: colwise Shard(0), rowwise Shard(1); one shared batch
        kwargs.update(tp_mesh=init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)), fsdp=False)
        dp, dp_size = 0, 1
    for accum in (1, 4):
        for kind in ("adamw", "muon"):
            ref = _model()
            model, pc = _sharded(**kwargs)
            w2 = model.layers[0].feed_forward.w2
            assert isinstance(w2.weight, DTensor) and w2.weight.placements[-1].is_shard(1)
            assert layout != "hsdp" or w2.weight.placements[0].is_replicate()
            assert layout != "fsdp_tp" or type(w2.weight.placements[0]).__name__ == "_StridedShard"
            assert layout != "tp" or len(w2.weight.placements) == 1
            assert w2.parametrizations.weight.original.placements == w2.weight.placements
            assert model.layers[0].feed_forward.w1.parametrizations.weight.original.placements[-1].is_shard(0)
            ref_opts = _optimizers(ref, ref.named_parameters(), kind)
            opts = _optimizers(model, _trainable(model), kind)
            ref_params = dict(ref.named_parameters())
            torch.manual_seed(10 + accum)
            for step in range(2):
                for _ in range(accum):
                    x = torch.randn(2 * dp_size, 6, DIM)
                    ref(x).pow(2).mean().div(accum).backward()
                    model(x[dp * 2 : (dp + 1) * 2]).pow(2).mean().div(accum).backward()
                pc.after_backward()
                assert all(w.grad is None for w in pcopt.effective_parameters(model))
                for name, p in _trainable(model):
                    r = ref_params[_ref_name(name)]
                    err = _rel(_full(p.grad), r.grad)
                    assert err <= 1e-5, (accum, kind, step, name, "grad", err)
                for o in ref_opts + opts:
                    o.step()
                pcopt.refresh(ref)
                pc.after_step()
                for o in ref_opts + opts:
                    o.zero_grad()
                for name, p in _trainable(model):
                    assert _rel(_full(p), ref_params[_ref_name(name)]) <= 1e-5, (accum, kind, step, name)
                for fqn, state in pcopt.preconditioners(model):
                    mod = ref.get_submodule(fqn[: -len(".weight")])
                    pcr = mod.parametrizations.weight[0]
                    assert _rel(state.u, pcr.u) <= 1e-4 and _rel(state.v, pcr.v) <= 1e-4, fqn
                    with torch.no_grad():
                        w_ref = mod.weight
                    assert _rel(_full(model.get_parameter(fqn)), w_ref) <= 1e-5, (accum, kind, step, fqn)


def test_sharded_matches_unsharded_parametrize_grads_and_steps():
    """Raw-weight and gamma gradients, the weights after AdamW / Muon steps, u, v and W_eff equal the
    unsharded per-micro-batch parametrize path (accumulation 1 and 4, two steps, <= 1e-5 relative)."""
    run_distributed(_equality)


@pytest.mark.slow
def test_fsdp_over_tensor_parallel_matches_unsharded_parametrize_grads_and_steps():
    """The same on 4 ranks as FSDP 2 x TP 2 with Llama's tensor-parallel plan: FSDP2 shards each PC matrix on the
    dim TP shards (w1/w3 rows, w2/wo columns: _StridedShard over Shard), so its small-side Gram is a sum of local
    Grams over both mesh dims and the polynomial applies locally."""
    run_distributed(_equality, "fsdp_tp", world_size=4)


def test_tensor_parallel_only_matches_unsharded_parametrize_grads_and_steps():
    """The same on 2 ranks with tensor parallelism alone (a 1-D mesh): column-wise weights are Shard(0), row-wise
    Shard(1), everything else a plain replicated tensor; the Grams are summed over the TP group."""
    run_distributed(_equality, "tp")


@pytest.mark.slow
def test_hsdp_matches_unsharded_parametrize_grads_and_steps():
    """The same on 4 ranks as HSDP, 2 replicas x 2 shards: the Grams are summed over the shard group only (the
    replicas hold the same shard), FSDP2 averages the gradients over all 4 ranks."""
    run_distributed(_equality, "hsdp", world_size=4)


# -- communication and memory ------------------------------------------------------------------------------
class _Comms(TorchDispatchMode):
    """Records every c10d collective dispatched: (op name, element counts of its tensor arguments)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith(("c10d::", "_c10d_functional::")) and "wait" not in name:
            sizes = [t.numel() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            self.calls.append((name, sizes))
        return func(*args, **(kwargs or {}))


def _collectives(rank, world):
    model, pc = _sharded()
    shapes = [tuple(model.get_parameter(f).shape) for f in _names(model)]
    n_sq = [min(s) ** 2 for s in shapes]
    vec_max = sum(max(s) for s in shapes)

    from torch.distributed.tensor import Shard

    torch.manual_seed(0)
    plain = _Model()
    _shard_fn()(plain, lambda p: Shard(1) if p.ndim == 2 and p.shape[0] < p.shape[1] else None)
    x = torch.randn(2, 6, DIM)
    with _Comms() as fwd:
        for _ in range(2):
            model(x).pow(2).mean().backward()
    # the model's forward and backward issue FSDP2's collectives and nothing else: those of a plain model
    # with the same parameters and placements
    with _Comms() as fwd_plain:
        for _ in range(2):
            plain(x).pow(2).mean().backward()
    assert fwd.calls and fwd.calls == fwd_plain.calls, (fwd.calls, fwd_plain.calls)

    with _Comms() as back:
        pc.after_backward()
    # same-shape matrices are stacked: one all-reduce per shape group (first-seen order), of
    # [Grams, W^T dL/dW_eff, sigmas] of all its matrices
    groups: dict[tuple, list[int]] = {}
    for shape in shapes:
        groups.setdefault(shape, []).append(min(shape) ** 2)
    assert len(groups) < len(shapes)  # the model repeats shapes, so batching is exercised
    assert [n for n, _ in back.calls] == ["c10d::allreduce_"] * len(groups), back.calls
    for (_, sizes), nns in zip(back.calls, groups.values()):
        assert sizes == [sum(2 * nn_ + 1 for nn_ in nns)], (sizes, nns)

    for p in model.parameters():
        if p.grad is not None:
            p.data.add_(p.grad, alpha=-1e-3)
    with _Comms() as step:
        pc.after_step()
    grams = [s for n, s in step.calls if s[0] > vec_max]
    vectors = [s for n, s in step.calls if s[0] <= vec_max]
    assert all(n == "c10d::allreduce_" for n, _ in step.calls), step.calls
    assert grams == [[sum(nn_ + 1 for nn_ in nns)] for nns in groups.values()], grams  # one per shape group
    iters = pcopt.preconditioners(model)[0][1].num_power_iterations
    assert len(vectors) == 2 * iters, len(vectors)  # power iteration: all matrices in one vector all-reduce
    # no all-gather / reduce-scatter of a weight: every collective above is an all-reduce of the sizes checked
    # the byte counts a benchmark reports: 4 bytes per fp32 element
    sent = sum(4 * s[0] for _, s in back.calls + step.calls)
    assert sent == 4 * (sum(3 * nn_ + 2 for nn_ in n_sq) + sum(len(s) and s[0] for s in vectors))


def test_collective_sizes_per_pc_matrix():
    """Per shape group: one all-reduce of 2n^2+1 floats per matrix in the pull-back, one of n^2+1 per matrix in
    the W_eff write,
    vector all-reduces for the power iteration, none in the model forward/backward besides FSDP2's."""
    run_distributed(_collectives)


def _saved(model, x):
    sizes = []

    def pack(t):
        sizes.append((t.dtype, tuple(t.shape), t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sizes


def _memory(rank, world):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    x = torch.randn(2, 6, DIM)
    for mp in (None, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)):
        kw = {} if mp is None else {"mp_policy": mp}
        torch.manual_seed(0)
        plain = _Model()
        _shard_fn(**kw)(plain, None)
        model, pc = _sharded(**kw)
        param = _model()
        _shard_fn(**kw)(param, None)
        xin = x if mp is None else x.bfloat16()
        s_plain, s_sharded, s_param = _saved(plain, xin), _saved(model, xin), _saved(param, xin)
        bytes_ = [sum(b for *_, b in s) for s in (s_plain, s_sharded, s_param)]
        assert bytes_[1] == bytes_[0], bytes_  # the PC'd model saves what the plain model saves
        assert bytes_[2] > 2 * bytes_[0], bytes_  # the parametrize path saves the map's intermediates
        shapes = {tuple(model.get_parameter(f).shape) for f in _names(model)}
        shapes |= {s[::-1] for s in shapes} | {(min(s), min(s)) for s in shapes}
        if mp is not None:
            fp32_full = [s for d, s, _ in s_sharded if d == torch.float32 and s in shapes]
            assert not fp32_full, fp32_full
            assert [s for d, s, _ in s_param if d == torch.float32 and s in shapes]  # the check can fail


def test_no_full_weight_fp32_saved_for_backward():
    run_distributed(_memory)


# -- checkpoints -------------------------------------------------------------------------------------------
def _train_step(model, pc, opt, x):
    model(x).pow(2).mean().backward()
    if pc is not None:
        pc.after_backward()
    opt.step()
    if pc is not None:
        pc.after_step()
    else:
        pcopt.refresh(model)
    opt.zero_grad()


def _dcp(rank, world, root):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    torch.manual_seed(3)
    x = torch.randn(2, 6, DIM)
    a, pa = _sharded(seed=1)
    oa = torch.optim.AdamW([p for _, p in _trainable(a)], lr=1e-2)
    _train_step(a, pa, oa, x)
    dcp.save(
        {"model": get_model_state_dict(a), "optim": get_optimizer_state_dict(a, oa)},
        checkpoint_id=f"{root}/s",
    )

    # sharded -> sharded, exact resume
    b, pb = _sharded(seed=2)
    ob = torch.optim.AdamW([p for _, p in _trainable(b)], lr=1e-2)
    _train_step(b, pb, ob, x)  # creates the optimizer state to load into
    sd = {"model": get_model_state_dict(b), "optim": get_optimizer_state_dict(b, ob)}
    assert not any(k.endswith(tuple(f"{f}.weight" for f in ("w1", "w2", "w3", "wo"))) for k in sd["model"])
    dcp.load(sd, checkpoint_id=f"{root}/s")
    set_model_state_dict(b, sd["model"])
    set_optimizer_state_dict(b, ob, sd["optim"])
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(_full(p), _full(q)), name
    for wa, wb in zip(pcopt.effective_parameters(a), pcopt.effective_parameters(b)):
        assert torch.equal(_full(wa), _full(wb))
    _train_step(a, pa, oa, x)
    _train_step(b, pb, ob, x)
    assert torch.equal(a(x), b(x))

    # per-forward (FSDP2) checkpoint -> once per step: the same keys, loaded as they are
    p = _parametrize_fsdp(seed=4)
    op = torch.optim.AdamW(p.parameters(), lr=1e-2)
    _train_step(p, None, op, x)
    dcp.save({"model": get_model_state_dict(p)}, checkpoint_id=f"{root}/p")
    c, pcc = _sharded(seed=5)
    sd = get_model_state_dict(c)
    dcp.load({"model": sd}, checkpoint_id=f"{root}/p")
    set_model_state_dict(c, sd)
    assert _rel(c(x), p(x)) <= 1e-5
    # and back: the once-per-step checkpoint loads into the per-forward strategy
    d = _parametrize_fsdp(seed=6)
    sd = get_model_state_dict(d)
    dcp.load({"model": sd}, checkpoint_id=f"{root}/s")
    set_model_state_dict(d, sd)
    e, pe = _sharded(seed=7)
    sd = get_model_state_dict(e)
    dcp.load({"model": sd}, checkpoint_id=f"{root}/s")
    set_model_state_dict(e, sd)
    assert _rel(d(x), e(x)) <= 1e-5


@pytest.mark.slow
def test_dcp_round_trip_and_parametrize_checkpoints(tmp_path):
    path = tmp_path / "ckpt"
    path.mkdir()
    run_distributed(_dcp, str(path))


# -- misuse ------------------------------------------------------------------------------------------------
def _misuse(rank, world):
    from torch.distributed.fsdp import fully_shard

    late = _parametrize_fsdp()
    with pytest.raises(
        ValueError, match=r"already sharded \(fully_shard was applied.*apply fully_shard inside"
    ):
        pcopt.set_strategy(late, "once_per_step", shard=_shard_fn())

    after = _model()
    pc = _once(after)  # no shard: unsharded ...
    for layer in after.layers:
        fully_shard(layer)  # ... then sharded by hand: FSDP2 now manages the raw weights too
    with pytest.raises(RuntimeError, match=r"fully_shard was applied after pcopt.set_strategy"):
        pc.after_step()

    # sharding a wide matrix on its smaller dim: a warning, and still exact
    ref = _model()

    def default_placement(model, placement_fn):
        _shard_fn()(model, None)

    model = _model()
    with pytest.warns(UserWarning, match=r"sharded on their smaller dim.*shard_placement_fn"):
        pc = _once(model, default_placement)
    x = torch.randn(2 * world, 6, DIM)
    ref(x).pow(2).mean().backward()
    model(x[rank * 2 : (rank + 1) * 2]).pow(2).mean().backward()
    pc.after_backward()
    refp = dict(ref.named_parameters())
    for name, p in _trainable(model):
        assert _rel(_full(p.grad), refp[_ref_name(name)].grad) <= 1e-5, name
    dist.barrier()


@pytest.mark.slow
def test_misuse_errors_and_smaller_dim_sharding():
    run_distributed(_misuse)


class _GroupComms(_Comms):
    """:class:`_Comms` that also records the size of each collective's process group."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("c10d::allreduce_"):
            pg = next(a for a in args if isinstance(a, torch.ScriptObject))
            sizes = [t.numel() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            self.calls.append((name, sizes, dist.ProcessGroup.unbox(pg).size()))
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


def _collectives_2d_layout(rank, world, layout):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("a", "b"))
    if layout == "hsdp":  # (Replicate(), Shard(d)): the Grams are summed over the 2 shards of a replica
        model, pc = _sharded(mesh=mesh)
        dp, dp_size, group_size = rank, world, world // 2
    else:  # FSDP 2 x TP 2, (_StridedShard(d), Shard(d)): summed over all 4 ranks, in one all-reduce
        model, pc = _sharded(mesh=mesh["a"], tp_mesh=mesh["b"])
        dp, dp_size, group_size = mesh["a"].get_local_rank(), 2, world
    weights = [model.get_parameter(f) for f in _names(model)]
    slots = [(tuple(w.shape), w.placements[-1].dim) for w in weights]
    # expected shape groups, from the placements alone: matrices of one shape sharded on the same dim
    groups: dict[tuple, list[int]] = {}
    for shape, d in slots:
        groups.setdefault((shape, d), []).append(shape[1 - d] ** 2)  # the Gram is (other side)^2
    assert len(groups) < len(slots)  # same-shape matrices exist, so batching is exercised
    torch.manual_seed(0)
    x = torch.randn(2 * dp_size, 6, DIM)[dp * 2 : (dp + 1) * 2]
    model(x).pow(2).mean().backward()

    with _GroupComms() as back:
        pc.after_backward()
    # pull-back: one all-reduce per shape group over the whole sharding group, of [Grams, W^T dL/dW_eff, sigmas]
    assert [(n, g) for n, _, g in back.calls] == [("c10d::allreduce_", group_size)] * len(groups), back.calls
    assert [s for _, s, _ in back.calls] == [[sum(2 * q + 1 for q in nns)] for nns in groups.values()], (
        back.calls
    )

    for p in model.parameters():
        if p.grad is not None:
            p.data.add_(p.grad, alpha=-1e-3)
    with _GroupComms() as step:
        pc.after_step()
    assert all(n == "c10d::allreduce_" and g == group_size for n, _, g in step.calls), step.calls
    grams = [s for _, s, _ in step.calls if s[0] > sum(max(s) for s, _ in slots)]
    vectors = [s for _, s, _ in step.calls if s[0] <= sum(max(s) for s, _ in slots)]
    # the map: one per shape group
    assert grams == [[sum(q + 1 for q in nns)] for nns in groups.values()], grams
    # the power iteration: every matrix's full-length partial vector in one all-reduce per half-step
    iters = pcopt.preconditioners(model)[0][1].num_power_iterations
    half = [[sum(s[1] for s, _ in slots)], [sum(s[0] for s, _ in slots)]]  # W^T u (length n), then W v (m)
    assert vectors == half * iters, (vectors, iters)
    return 4 * sum(s[0] for _, s, _ in back.calls + step.calls)  # bytes sent into all-reduces (fp32)


def _mesh_groups(rank, world):
    """:func:`pcopt._tensor.mesh_group` of two dims that are not the whole world, on a named mesh (flattened by
    DeviceMesh) and an unnamed one (``new_group``): the sum of each rank's number is the sum over its group."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    from pcopt._tensor import all_reduce_, mesh_group

    named = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("r", "s", "t"))
    unnamed = DeviceMesh("cpu", torch.arange(world).view(2, 1, 2))
    for mesh in (named, unnamed):
        for dims in ((0, 1), (1, 2), (0, 1, 2)):
            flat = torch.tensor([float(rank), 1.0])
            all_reduce_(flat, mesh, dims)
            coord = mesh.get_coordinate()
            peers = mesh.mesh[tuple(slice(None) if d in dims else c for d, c in enumerate(coord))].reshape(-1)
            assert flat.tolist() == [float(peers.sum()), float(peers.numel())], (dims, flat, peers)
            assert mesh_group(mesh, dims) is mesh_group(mesh, dims)  # created once
    assert mesh_group(named, (0, 1, 2)) is dist.group.WORLD
    with pytest.raises(ValueError, match="not distinct dims"):
        mesh_group(named, (0, 0))


def _collectives_2d(rank, world):
    sent = {layout: _collectives_2d_layout(rank, world, layout) for layout in ("fsdp_tp", "hsdp")}
    assert sent["fsdp_tp"] > 0 and sent["hsdp"] > 0
    _mesh_groups(rank, world)


@pytest.mark.slow
def test_collective_counts_on_2d_meshes():
    """FSDP 2 x TP 2 and HSDP 2 x 2 on 4 ranks: one Gram all-reduce per shape group in the pull-back and one in the
    map, each over the whole sharding group (4 ranks under FSDP x TP, the 2 shards under HSDP) with the exact element
    counts, plus one vector all-reduce per power-iteration half-step; the flattened groups of 2 dims are right."""
    run_distributed(_collectives_2d, world_size=4)


def _same_local_shape_other_global_shapes(rank, world):
    """An (8, 4) matrix sharded on rows and a (4, 8) one on columns both leave (4, 4) blocks; the power iteration
    must not stack them as one group (their u and v differ in length). Each sigma is checked against float64 SVD."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from pcopt.power_iteration import power_iteration_

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    full = [torch.randn(8, 4), torch.randn(4, 8)]
    weights = [distribute_tensor(full[0], mesh, [Shard(0)]), distribute_tensor(full[1], mesh, [Shard(1)])]
    us = [torch.randn(8), torch.randn(4)]
    vs = [torch.randn(4), torch.randn(8)]
    for t in (*us, *vs):
        t /= t.norm()
    power_iteration_(weights, us, vs, 50)
    for W, u, v in zip(full, us, vs):
        sigma = (u.double() @ W.double() @ v.double()).item()
        exact = torch.linalg.matrix_norm(W.double(), 2).item()
        assert abs(sigma - exact) <= 1e-5 * exact, (sigma, exact)  # fp32 iteration, 50 steps: converged
    dist.barrier()


def test_power_iteration_keeps_shards_of_different_matrices_apart():
    run_distributed(_same_local_shape_other_global_shapes)
