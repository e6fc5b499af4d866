"""The once-per-step kernels (pcopt/kernel.py): chunking by shape, the power-iteration vectors of a shard and the
reduced sums, pinned down exactly enough that every one-token mutant of the map and its pull-back fails here or in
test_strategy.py / test_accumulation.py (tools/mutation.py).

The shard bookkeeping (chunk sizes, a rank's index, the flattened all-reduce buffer) is re-derived by hand on a
single process: the index of a shard is set on real slots, the all-reduce is replaced by a recording identity.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

import pcopt
import pcopt.kernel as kernel
import pcopt.strategy as strategy


def _once(n_layers: int, shape=(3, 4), dtype=torch.float64):
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(shape[1], shape[0], bias=False, dtype=dtype) for _ in range(n_layers)])
    pcopt.precondition_model(m, degree=5, targets=lambda name, mod: isinstance(mod, nn.Linear))
    pcopt.set_strategy(m, "once_per_step")
    return strategy.slots(m)


def test_chunks_cut_a_group_at_stack_elements(monkeypatch):
    all_slots = _once(5)  # five 3 x 4 matrices: 12 elements each
    monkeypatch.setattr(kernel, "STACK_ELEMENTS", 30)  # 30 // 12 = 2 per chunk
    assert [len(c) for c in kernel.chunks(all_slots)] == [2, 2, 1]
    monkeypatch.setattr(kernel, "STACK_ELEMENTS", 10)  # one matrix exceeds it: still one per chunk
    assert [len(c) for c in kernel.chunks(all_slots)] == [1] * 5


def test_chunks_of_one_element_matrices(monkeypatch):
    all_slots = _once(3, shape=(1, 1))
    monkeypatch.setattr(kernel, "STACK_ELEMENTS", 2)  # 2 // 1 = 2 per chunk
    assert [len(c) for c in kernel.chunks(all_slots)] == [2, 1]


def test_vectors_gather_this_ranks_index():
    chunk = _once(2, shape=(4, 3))  # the larger dim is 0: the rows of u are sharded
    assert all(s.dim == 0 for s in chunk)
    idx = torch.tensor([0, 2])  # an interleaved shard of the 4 rows
    for s in chunk:
        s.index = idx.clone()
    along, other = kernel._vectors(chunk, torch.float64)
    assert torch.equal(along, torch.stack([s[0].u[idx] for s in chunk]).double())
    assert torch.equal(other, torch.stack([s[0].v for s in chunk]).double())


def test_reduced_flattens_every_part_into_one_buffer(monkeypatch):
    calls = []

    def fake_all_reduce(buf, mesh, dims):  # one rank: the sum is the buffer itself
        calls.append((buf.clone(), dims))

    monkeypatch.setattr(kernel, "all_reduce_", fake_all_reduce)
    parts = [torch.randn(2, 3, 3), torch.randn(2)]
    slot = SimpleNamespace(mesh=None, mesh_dims=(0,))
    out = kernel._reduced(slot, parts, torch.float64)
    assert len(calls) == 1 and calls[0][1] == (0,)
    assert torch.equal(calls[0][0], torch.cat([p.double().reshape(-1) for p in parts]))
    assert [o.shape for o in out] == [p.shape for p in parts]
    assert all(torch.equal(o, p.double()) for o, p in zip(out, parts))
