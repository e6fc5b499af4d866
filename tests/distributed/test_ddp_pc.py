"""PC in its default strategy (once per step, pull-back at the end of every backward) under DDP on 2 gloo ranks:
the README loop wrapped in ``DistributedDataParallel`` equals one process on the whole batch."""

from __future__ import annotations

import pytest
import torch

from tests._distributed import run_distributed

pytestmark = pytest.mark.distributed

_SMALL = dict(vocab=64, dim=32, n_layers=2, n_heads=2, hidden=64)


def _train(model, opt, batches, accumulation, ddp_rank=None, world=1):
    for micro in batches:
        for x in micro:
            if ddp_rank is not None:  # each rank takes its half of every micro-batch
                x = x.chunk(world)[ddp_rank]
            logits = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()) / accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()


def _ddp_equals_one_process(rank, world):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import pcopt
    from pcopt.demo import TinyLlama

    accumulation = 2
    g = torch.Generator().manual_seed(1)
    batches = [[torch.randint(0, 64, (4, 17), generator=g) for _ in range(accumulation)] for _ in range(3)]

    def build():
        torch.manual_seed(0)
        model = TinyLlama(**_SMALL).double()
        pcopt.precondition_model(model, degree=5)
        return model

    ref = build()
    _train(ref, pcopt.build_optimizer(ref, lr=1e-2, ns_dtype=torch.float64), batches, accumulation)

    model = build()
    assert pcopt.strategy_of(model) == "once_per_step"
    opt = pcopt.build_optimizer(model, lr=1e-2, ns_dtype=torch.float64)
    ddp = DDP(model)
    _train(ddp, opt, batches, accumulation, ddp_rank=rank, world=world)

    # float64: DDP averages dL/dW_eff over the ranks (their halves' mean = the whole batch's mean loss), and the
    # pull-back of that average is the single process's pull-back up to rounding (~1e-15 relative); 3 Muon steps
    # at lr 1e-2 keep it far below 1e-10
    want = {k: v for k, v in ref.state_dict().items() if v.is_floating_point()}
    got = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    assert want.keys() == got.keys()
    worst = max((want[k] - got[k]).abs().max().item() for k in want)
    assert worst < 1e-10, worst
    dist.barrier()


def test_ddp_with_the_default_strategy_equals_one_process():
    run_distributed(_ddp_equals_one_process)
