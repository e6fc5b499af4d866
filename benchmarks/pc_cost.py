"""PC's cost per training step in what predicts GPU time: host syncs, aten ops (launches), FLOPs by dtype.

    python -m benchmarks.pc_cost [--device cpu|cuda] [--layers 4,16] [--dim 256 --hidden 704 --tokens 2048]
        [--compute-dtype auto|fp32|bf16] [--curve STEPS] [--smoke]

For each strategy (per forward, once per step) and optimizer (fused AdamW; Muon + fused AdamW via
``pcopt.build_optimizer``), one training step (forward, backward, ``PCState.after_backward``, clip,
step, attached ``after_step``) of ``pcopt.demo.TinyLlama`` is counted with :class:`pcopt.profiling.StepProfile`
against the same model without PC. Printed per row: host syncs (plain / PC), PC's aten ops at each depth and
their ratio (same-shape batching makes the once-per-step count independent of depth), and PC's FLOPs by dtype
against the cost model of ``docs/scale.md`` (``2n/T + (k-2)n^2/(mT)`` of the PC'd linears per micro-batch;
``2n/T + 4(k-2)n^2/(3mT)`` once per step).

``--curve STEPS`` trains the once-per-step strategy with the map in fp32 and in bf16 from the same start on the
embedded sample text (``pcopt.demo``) and prints both loss curves and their largest gap.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

import pcopt
from pcopt.demo import TinyLlama
from pcopt.hardware import describe
from pcopt.profiling import StepProfile

STRATEGIES = ("per_forward", "once_per_step")
OPTIMIZERS = ("adamw", "muon")
_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}


def build(
    pc: bool,
    strategy: str,
    n_layers: int,
    optimizer: str,
    *,
    dim: int = 32,
    hidden: int = 48,
    vocab: int = 64,
    n_heads: int = 2,
    degree: int = 5,
    device: str = "cpu",
    compute_dtype: torch.dtype | None = None,
):
    """``(model, optimizer)``: a seeded TinyLlama, PC'd in ``strategy`` if ``pc``, with fused AdamW (as on a GPU:
    unfused AdamW reads its host-side step counters with ``.item()`` per parameter, PC or not)."""
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it trains (a 1B model's init on the host takes a while)
        model = TinyLlama(vocab=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, hidden=hidden)
    if pc:
        pcopt.precondition_model(model, degree=degree, strategy="per_forward")
        if strategy == "once_per_step":
            pcopt.set_strategy(model, "once_per_step", compute_dtype=compute_dtype)
    if optimizer == "muon":
        opt = pcopt.build_optimizer(model, lr=1e-2, adamw_kwargs={"fused": True})
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        if pc:
            pcopt.PCState(model).attach(opt)
    return model, opt


def training_step(
    model: nn.Module,
    opt,
    tokens: torch.Tensor,
    pc: bool,
    *,
    accumulation: int = 1,
    autocast: torch.dtype | None = None,
) -> torch.Tensor:
    """Forward and backward of ``accumulation`` micro-batches (``tokens`` split along the batch), then
    ``after_backward``, clip, step (+ the attached ``after_step``), zero_grad. ``autocast`` (e.g. bf16) covers
    the forward only, as in mixed-precision training with fp32 master weights. Returns the mean loss (no sync)."""
    total = torch.zeros((), device=tokens.device)
    for micro in tokens.chunk(accumulation):
        cast = torch.autocast(tokens.device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        with cast:
            logits = model(micro[:, :-1])
        loss = (
            nn.functional.cross_entropy(logits.flatten(0, 1).float(), micro[:, 1:].flatten()) / accumulation
        )
        loss.backward()
        total += loss.detach()
    if pc:
        pcopt.PCState(model).after_backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    return total


def profile_step(
    pc: bool, strategy: str, n_layers: int, optimizer: str, tokens: torch.Tensor, **kw
) -> StepProfile:
    """The :class:`StepProfile` of the second training step (the first creates the optimizer state)."""
    model, opt = build(pc, strategy, n_layers, optimizer, **kw)
    tokens = tokens.to(kw.get("device", "cpu"))
    training_step(model, opt, tokens, pc)
    with StepProfile() as prof:
        training_step(model, opt, tokens, pc)
    return prof


def formula(strategy: str, shapes: list[tuple[int, int]], tokens: int, degree: int) -> float:
    """PC FLOPs / the PC'd linears' fwd+bwd FLOPs (``docs/scale.md``), one micro-batch of ``tokens`` per step."""
    k = len(pcopt.polynomial(degree))
    pc = lin = 0.0
    for a, b in shapes:
        m, n = max(a, b), min(a, b)
        lin += 6 * m * n * tokens
        pc += 12 * m * n * n + (6 if strategy == "per_forward" else 8) * (k - 2) * n**3
    return pc / lin


def pc_shapes(model: nn.Module) -> list[tuple[int, int]]:
    return [tuple(pc.raw_weight.shape) for _, pc in pcopt.preconditioners(model)]


def _rows(args) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(
        0, args.vocab, (args.batch, args.tokens // args.batch + 1), generator=g
    )  # +1: targets
    kw = dict(
        dim=args.dim, hidden=args.hidden, vocab=args.vocab, n_heads=args.n_heads, degree=args.degree,
        device=args.device, compute_dtype=_DTYPES[args.compute_dtype],
    )  # fmt: skip
    rows = []
    for optimizer in OPTIMIZERS:
        for strategy in STRATEGIES:
            row = {"optimizer": optimizer, "strategy": strategy}
            for n_layers in args.layers:
                plain = profile_step(False, strategy, n_layers, optimizer, tokens, **kw)
                pc = profile_step(True, strategy, n_layers, optimizer, tokens, **kw)
                row[f"syncs@{n_layers}"] = (plain.total_syncs, pc.total_syncs)
                row[f"pc_ops@{n_layers}"] = pc.total_ops - plain.total_ops
                flops = {
                    str(d): pc.flops_by_dtype[d] - plain.flops_by_dtype.get(d, 0) for d in pc.flops_by_dtype
                }
                row[f"pc_flops@{n_layers}"] = {d: f for d, f in flops.items() if f}
                if n_layers == args.layers[0]:
                    shapes = pc_shapes(build(True, "per_forward", n_layers, "adamw", **kw)[0])
                    T = tokens[:, 1:].numel()
                    lin = sum(6 * a * b * T for a, b in shapes)  # the PC'd linears' own fwd+bwd
                    iters = pcopt.PCOptions().num_power_iterations  # the refresh, left out of the formula
                    power = sum(4 * iters * a * b for a, b in shapes)
                    row["pc_flops_x_linear"] = (sum(flops.values()) - power) / lin
                    row["formula"] = formula(strategy, shapes, T, args.degree)
            first, last = args.layers[0], args.layers[-1]
            row["ops_ratio"] = row[f"pc_ops@{last}"] / max(1, row[f"pc_ops@{first}"])
            rows.append(row)
            print(_line(row, args), flush=True)
    return rows


def _line(row: dict, args) -> str:
    first, last = args.layers[0], args.layers[-1]
    syncs = " ".join(f"{p}/{q}" for p, q in (row[f"syncs@{n}"] for n in args.layers))
    dtypes = ", ".join(f"{d.removeprefix('torch.')} {f:.3g}" for d, f in row[f"pc_flops@{first}"].items())
    return (
        f"| {row['optimizer']} | {row['strategy']} | {syncs} | {row[f'pc_ops@{first}']} | {row[f'pc_ops@{last}']} "
        f"| {row['ops_ratio']:.2f} | {dtypes} | {row['pc_flops_x_linear']:.3f} | {row['formula']:.3f} |"
    )


def _curve(args) -> dict:
    from pcopt.demo import load_sample_bytes

    data = load_sample_bytes()
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, data.numel() - 65, (args.curve, 8), generator=g)
    curves = {}
    for name in ("fp32", "bf16"):
        model, opt = build(
            True, "once_per_step", 2, "adamw", dim=args.dim, hidden=args.hidden, vocab=256,
            n_heads=args.n_heads, degree=args.degree, device=args.device, compute_dtype=_DTYPES[name],
        )  # fmt: skip
        losses = []
        for step in range(args.curve):
            batch = torch.stack([data[s : s + 65] for s in starts[step].tolist()]).long().to(args.device)
            losses.append(float(training_step(model, opt, batch, True)))
        curves[name] = losses
    gap = max(abs(a - b) for a, b in zip(curves["fp32"], curves["bf16"]))
    print(f"fp32 vs bf16 map, {args.curve} steps: final {curves['fp32'][-1]:.4f} vs {curves['bf16'][-1]:.4f}, "
          f"largest gap {gap:.4f}")  # fmt: skip
    return {"curves": curves, "max_gap": gap}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pc_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", default="4,16", help="comma-separated depths; the ops ratio is last / first")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=704)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per step (one micro-batch)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--degree", type=int, default=5)
    p.add_argument("--compute-dtype", default="auto", choices=sorted(_DTYPES))
    p.add_argument("--curve", type=int, default=0, help="also train fp32 vs bf16 map for this many steps")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: every code path in seconds")
    p.add_argument("--out", default="outputs/pc_cost")
    args = p.parse_args(argv)
    try:
        args.layers = sorted(int(x) for x in args.layers.split(","))
    except ValueError:
        p.error(f"--layers expects comma-separated integers, got {args.layers!r}")
    if args.smoke:
        args.layers, args.dim, args.hidden, args.n_heads, args.vocab = [1, 2], 32, 48, 2, 64
        args.tokens, args.batch, args.curve = 32, 2, min(args.curve, 3)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    print(f"# PC cost per step on {describe(args.device)}, torch {torch.__version__}")
    print(f"TinyLlama dim {args.dim}, hidden {args.hidden}, {args.tokens} tokens/step, degree {args.degree}, "
          f"map dtype {args.compute_dtype}")  # fmt: skip
    print(
        f"| optimizer | strategy | syncs plain/PC at {args.layers} | PC ops @{args.layers[0]} | PC ops "
        f"@{args.layers[-1]} | ratio | PC FLOPs by dtype @{args.layers[0]} | PC FLOPs / linear | formula |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    t0 = time.perf_counter()
    result = {
        "device": describe(args.device),
        "torch": torch.__version__,
        "args": vars(args),
        "rows": _rows(args),
    }
    if args.curve:
        result["curve"] = _curve(args)
    result["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pc_cost.json").write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
