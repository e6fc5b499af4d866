"""Everything to measure on a CUDA GPU in one run (under 8 minutes on one H200), printed as markdown tables.

    python -m benchmarks.gpu [--data outputs/corpora/python-docs.jsonl] [--only step,linear,ns,muon,readme,probe]
    python -m benchmarks.gpu --smoke      # the same code paths on the CPU with tiny shapes, in seconds (CI)

Needs only torch and the repository (no torchtitan, no datasets): GPU images carry torch 2.11 and no network.
Six sections, each a table with the device named:

* ``step``: one training step of ``pcopt.demo.TinyLlama`` at the Llama-1B shape (dim 2048, 18 layers, FFN
  5632, vocab 32000), 4 x 4096 tokens per micro-batch, bf16 autocast with fp32 master weights, for fused
  AdamW and Muon (+ fused AdamW, ``pcopt.build_optimizer``), without PC and with PC in both strategies,
  at gradient accumulation 1 and 4: median step time, peak memory, ratio to the same optimizer without PC.
* ``linear``: one PC'd Linear at 1B and 8B shapes, 8192 tokens per micro-batch: fwd+bwd plain, per-forward
  PC, once-per-step PC over 1 and 4 micro-batches (pull-back and map included), the pull-back
  (``after_backward``) and refresh + map (``after_step``) alone, and the FLOP model of ``docs/scale.md``.
* ``ns``: Newton-Schulz throughput against the same GPU's bf16 matmul (``benchmarks/newton_schulz.py``), for
  single shapes, and for the Llama-1B shape groups in torch's iteration and in build_optimizer's (Gram,
  block-triangular symmetric products); one symmetric product blocked against full, by size.
* ``muon``: one Muon optimizer step over the 126 Llama-1B hidden matrices: torch.optim.Muon, pcopt with
  torch's arguments, build_optimizer's Muon; time, FLOPs and share of bf16 matmul throughput.
* ``readme``: one step of the README's loop as printed (``precondition_model`` + ``build_optimizer``, a plain
  ``backward()`` / ``step()`` / ``zero_grad()`` / scheduler loop, no pcopt call in it, fp32, no autocast) with the
  model built on ``--device`` (the snippet's ``.cuda()``): the snippet's own demo model and batch (8 x 64 bytes),
  and a Llama-1B-shaped TinyLlama at ``--readme-batch`` x ``--seq`` tokens. No PC, the default (once per step,
  pull-back at the end of ``backward()``) and ``pcopt.set_strategy(model, "per_forward")``: median step time and
  the ratio to no PC, all measured in one run.
* ``probe``: token efficiency at 25M parameters (dim 512, 8 layers, byte-level), about one epoch of
  ``--data`` (a ``.jsonl``/``.txt`` corpus; the embedded sample if absent), AdamW / AdamW+PC / Muon / Muon+PC
  at the same learning rate per optimizer, PC in the once-per-step strategy: validation loss and step time.

The device machine receives only the repository: build the corpus into the git-ignored ``outputs/corpora``
(``python -m benchmarks.corpora python-docs outputs/corpora/python-docs.jsonl``) and carry that folder.
Results go to ``--out`` (``gpu.json`` and ``gpu.md``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import pcopt
from benchmarks.muon_step import matrix_shapes, single_process
from benchmarks.newton_schulz import GPU_SHAPES, symmetric_products
from benchmarks.newton_schulz import run as newton_schulz_run
from benchmarks.pc_cost import build, formula, training_step
from pcopt import recipes
from pcopt.hardware import describe, preferred_dtype

SECTIONS = ("step", "linear", "ns", "muon", "readme", "probe")
ARMS_PROBED = ("adamw", "adamw_pc", "muon", "muon_pc")
STRATEGIES = ("none", "per_forward", "once_per_step")
OPTIMIZERS = ("adamw", "muon")
# Llama-1B (the table) and its smoke-sized stand-in
STEP_MODEL = dict(vocab=32000, dim=2048, n_layers=18, n_heads=16, hidden=5632)
SMOKE_STEP_MODEL = dict(vocab=128, dim=64, n_layers=2, n_heads=2, hidden=176)
# the README loop's arms: no PC, precondition_model's default, set_strategy(model, "per_forward")
README_ARMS = ("none", "once_per_step", "per_forward")
# (name, TinyLlama kwargs, batch or None for --readme-batch, sequence or None for --seq) of the README table:
# the snippet's own model and x = randint(0, 256, (8, 65)); the Llama-1B shape; under --smoke, a tiny model
README_MODELS = [("snippet (demo TinyLlama)", {}, 8, 64), ("Llama-1B shape", STEP_MODEL, None, None)]
SMOKE_README_MODELS = [("smoke TinyLlama", SMOKE_STEP_MODEL, 2, 16)]
# (out, in) of the PC'd matrices at 1B (dim 2048, FFN 5632) and 8B (dim 4096, FFN 14336)
LINEAR_SHAPES = [(2048, 2048), (5632, 2048), (4096, 4096), (14336, 4096)]
SMOKE_LINEAR_SHAPES = [(48, 32), (32, 96)]
PROBE_MODEL = dict(vocab=256, dim=512, n_layers=8, n_heads=8, hidden=1408)  # 25.2M parameters
SMOKE_PROBE_MODEL = dict(vocab=256, dim=32, n_layers=1, n_heads=2, hidden=64)
# (batch, rows, cols) of the Llama-1B hidden matrices per shape group (18 layers): wq wk wv wo, w1 w3, w2
NS_GROUPS_1B = [(72, 2048, 2048), (36, 5632, 2048), (18, 2048, 5632)]
SMOKE_NS_GROUPS = [(4, 32, 32), (2, 88, 32)]
# the Muon-step arms (benchmarks/muon_step.py): torch, pcopt with torch's arguments, build_optimizer's Muon
MUON_ARMS = ("torch", "pcopt", "build_optimizer")


class _Report:
    """Prints markdown and keeps it for ``gpu.md``."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def table(self, header: list[str], rows: list[list]) -> None:
        self("| " + " | ".join(header) + " |")
        self("|" + "---|" * len(header))
        for r in rows:
            self("| " + " | ".join(str(c) for c in r) + " |")
        self()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device: torch.device, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _guarded(strict: bool, fn, *args):
    """``fn(*args)``, or (on a GPU run) the error as text so one failing row does not lose the others."""
    if strict:
        return fn(*args)
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported in the table, run continues
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


# ---------------------------------------------------------------------------------------------- model step
def _step_row(optimizer, strategy, accumulation, args, device) -> dict:
    model_kw = SMOKE_STEP_MODEL if args.smoke else STEP_MODEL
    degree = recipes.pc_degree(optimizer)
    pc = strategy != "none"
    model, opt = build(pc, strategy if pc else "per_forward", optimizer=optimizer, degree=degree,
                       device=str(device), **model_kw)  # fmt: skip
    g = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(
        0, model_kw["vocab"], (args.batch * accumulation, args.seq + 1), generator=g, device=device
    )
    autocast = torch.bfloat16 if device.type == "cuda" else None

    def step():
        training_step(model, opt, tokens, pc, accumulation=accumulation, autocast=autocast)

    step()  # optimizer state
    _peak_reset(device)
    ms = _median_ms(step, device, args.reps)
    return {"ms": ms, "peak_gib": _peak_gib(device)}


def section_step(args, device, report) -> list[dict]:
    report(f"## Model step: TinyLlama {'smoke' if args.smoke else 'Llama-1B shape'}, {args.batch} x {args.seq} "
           f"tokens per micro-batch, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, median of {args.reps} steps")  # fmt: skip
    rows, table = [], []
    for optimizer in OPTIMIZERS:
        for accumulation in (1, 4):
            base = None
            for strategy in STRATEGIES:
                r = _guarded(args.smoke, _step_row, optimizer, strategy, accumulation, args, device)
                if isinstance(r, str):
                    rows.append({"optimizer": optimizer, "strategy": strategy, "accumulation": accumulation,
                                 "error": r})  # fmt: skip
                    table.append([optimizer, accumulation, strategy, r, "", ""])
                    continue
                base = r["ms"] if strategy == "none" else base
                ratio = r["ms"] / base if base else float("nan")
                rows.append({"optimizer": optimizer, "strategy": strategy, "accumulation": accumulation,
                             **r, "ratio": ratio})  # fmt: skip
                mem = "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
                table.append([optimizer, accumulation, strategy, f"{r['ms']:.1f}", mem, f"{ratio:.3f}"])
    report.table(["optimizer", "accumulation", "PC", "step ms", "peak GiB", "x no PC"], table)
    return rows


# ----------------------------------------------------------------------------------------- one PC'd Linear
def _linear_row(shape, args, device) -> dict:
    out_f, in_f = shape
    T = args.linear_tokens
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    x = torch.randn(T, in_f, device=device).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    x.requires_grad_(True)
    gy = torch.randn(T, out_f, device=device, dtype=x.dtype)

    def make():
        torch.manual_seed(0)
        with device:
            lin = nn.Sequential(nn.Linear(in_f, out_f, bias=False))
        nn.init.trunc_normal_(lin[0].weight, std=0.02)
        return lin

    def fwd_bwd(lin):
        with autocast:
            y = lin(x)
        y.backward(gy)

    plain = make()
    t_plain = _median_ms(lambda: fwd_bwd(plain), device, args.reps)
    per_forward = make()
    pcopt.precondition(per_forward[0], degree=args.degree)
    t_pf = _median_ms(lambda: fwd_bwd(per_forward), device, args.reps)
    once = make()
    pcopt.precondition(once[0], degree=args.degree)
    pcopt.set_strategy(once, "once_per_step")
    state = pcopt.PCState(once)

    def once_step(micro: int):
        for _ in range(micro):
            fwd_bwd(once)
        state.after_backward()
        state.after_step()

    row = {"plain_ms": t_plain, "per_forward_ms": t_pf}
    for micro in (1, 4):
        row[f"once_{micro}_ms"] = _median_ms(lambda m=micro: once_step(m), device, args.reps)
    fwd_bwd(once)
    row["after_backward_ms"] = _median_ms(state.after_backward, device, 1, warmup=0)
    row["after_step_ms"] = _median_ms(state.after_step, device, args.reps)
    row["formula"] = formula("per_forward", [shape], T, args.degree)
    row["formula_once"] = formula("once_per_step", [shape], T, args.degree)
    return row


def section_linear(args, device, report) -> list[dict]:
    report(f"## One PC'd Linear, {args.linear_tokens} tokens per micro-batch, fwd+bwd, degree {args.degree}")
    rows, table = [], []
    for shape in SMOKE_LINEAR_SHAPES if args.smoke else LINEAR_SHAPES:
        r = _guarded(args.smoke, _linear_row, shape, args, device)
        name = f"{shape[0]}x{shape[1]}"
        if isinstance(r, str):
            rows.append({"shape": shape, "error": r})
            table.append([name, r] + [""] * 7)
            continue
        rows.append({"shape": shape, **r})
        p = r["plain_ms"]
        table.append([
            name, f"{p:.2f}", f"{r['per_forward_ms'] / p:.2f}", f"{r['formula'] + 1:.2f}",
            f"{r['once_1_ms'] / p:.2f}", f"{r['once_4_ms'] / (4 * p):.2f}", f"{r['formula_once'] + 1:.2f}",
            f"{r['after_backward_ms']:.2f}", f"{r['after_step_ms']:.2f}",
        ])  # fmt: skip
    report.table(
        ["shape", "plain ms", "per-forward x", "formula x", "once/step x (1 mb)", "once/step x per mb (4 mb)",
         "formula x (1 mb)", "pull-back ms", "refresh+map ms"],
        table,
    )  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------ Newton-Schulz
def section_ns(args, device, report) -> dict:
    report("## Newton-Schulz (5 Keller steps) against the same device's matmul")
    shapes = [(1, 64, 64), (2, 64, 32)] if args.smoke else GPU_SHAPES
    mm_sizes = (64,) if args.smoke else (4096, 8192)
    rounds = 1 if args.smoke else 10
    dtype = "bf16" if device.type == "cuda" or preferred_dtype(device) == torch.bfloat16 else "fp32"
    rows = newton_schulz_run(device, dtype, shapes, mm_sizes, rounds)
    report.table(
        ["batch x rows x cols", "NS ms", "share of matmul throughput"],
        [[" x ".join(map(str, r["shape"])), f"{r['ns_ms']:.2f}", f"{r['fraction']:.0%}"] for r in rows],
    )
    report()
    report("Llama-1B shape groups, stacked as pcopt stacks them: torch's iteration against build_optimizer's "
           "(Gram on rectangular matrices, block-triangular symmetric products from 512 on); share = the "
           "variant's own FLOPs per second over the matmul's")  # fmt: skip
    groups = SMOKE_NS_GROUPS if args.smoke else NS_GROUPS_1B
    standard = newton_schulz_run(device, dtype, groups, mm_sizes, rounds)
    lean = newton_schulz_run(device, dtype, groups, mm_sizes, rounds, "gram", None)
    report.table(
        ["group", "standard ms", "share", "build_optimizer's ms", "share", "time ratio", "FLOP ratio"],
        [[" x ".join(map(str, a["shape"])), f"{a['ns_ms']:.2f}", f"{a['fraction']:.0%}", f"{b['ns_ms']:.2f}",
          f"{b['fraction']:.0%}", f"{b['ns_ms'] / a['ns_ms']:.2f}", f"{b['flops'] / a['flops']:.3f}"]
         for a, b in zip(standard, lean)],
    )  # fmt: skip
    report()
    report(
        "One symmetric n x n product, 2 x 2 block-triangular against full (pcopt.optim's SYMMETRIC_MIN_SIZE)"
    )
    sizes = [16, 32] if args.smoke else [256, 512, 1024, 2048, 4096, 8192]
    sym = symmetric_products(device, dtype, sizes, rounds)
    report.table(
        ["n", "full ms", "blocked ms", "time ratio", "FLOP ratio"],
        [[r["n"], f"{r['full_ms']:.3f}", f"{r['blocked_ms']:.3f}", f"{r['time_ratio']:.2f}",
          f"{r['flop_ratio']:.2f}"] for r in sym],
    )  # fmt: skip
    return {"shapes": rows, "groups_standard": standard, "groups_build_optimizer": lean, "symmetric": sym}


# ------------------------------------------------------------------------------------------------ Muon step
def section_muon(args, device, report) -> list[dict]:
    dim, hidden, layers = (16, 44, 1) if args.smoke else (2048, 5632, 18)
    shapes = matrix_shapes(dim, hidden, layers)
    report(f"## Muon optimizer step: {len(shapes)} hidden matrices of Llama-1B (dim {dim}, FFN {hidden}, "
           f"{layers} layers), bf16 Newton-Schulz, 5 Keller steps, median of {args.reps} interleaved steps")  # fmt: skip
    kwargs = {"lr": 0.02, "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw"}
    t = single_process(shapes, args.reps, kwargs, MUON_ARMS, device=device)
    n_ref = 64 if args.smoke else 8192
    a, b = (torch.randn(n_ref, n_ref, device=device, dtype=torch.bfloat16) for _ in range(2))
    peak = 2 * n_ref**3 / (_median_ms(lambda: torch.mm(a, b), device, reps=5) / 1e3)
    rows = []
    for arm in MUON_ARMS:
        rows.append({"arm": arm, "ms": t[arm] * 1e3, "ratio": t[arm] / t["torch"], "flops": t[arm + " flops"],
                     "flop_ratio": t[arm + " flops"] / t["torch flops"],
                     "share": t[arm + " flops"] / t[arm] / peak})  # fmt: skip
    report.table(
        ["arm", "step ms", "x torch.optim.Muon", "GFLOP", "FLOPs x torch", "share of bf16 matmul throughput"],
        [[r["arm"], f"{r['ms']:.1f}", f"{r['ratio']:.2f}", f"{r['flops'] / 1e9:.0f}", f"{r['flop_ratio']:.3f}",
          f"{r['share']:.0%}"] for r in rows],
    )  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------ the README loop
def _readme_row(model_kw: dict, batch: int, seq: int, arm: str, args, device) -> dict:
    """Median time of one step of the README's loop (the snippet with its model on ``device``) in ``arm``."""
    from pcopt.demo import TinyLlama

    torch.manual_seed(0)
    with torch.device(device):  # the snippet's .cuda(), without a 1B init on the host first
        model = TinyLlama(**model_kw)
    if arm != "none":
        pcopt.precondition_model(model, degree=5)  # the default: once per step, automatic pull-back
        if arm == "per_forward":
            pcopt.set_strategy(model, "per_forward")
        assert pcopt.strategy_of(model) == arm, (arm, pcopt.strategy_of(model))
    opt = pcopt.build_optimizer(model, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    vocab = model.output.out_features
    g = torch.Generator(device=device).manual_seed(1)

    def step():  # the snippet's loop body, printing left out
        x = torch.randint(0, vocab, (batch, seq + 1), generator=g, device=device)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()

    step()  # optimizer state, first-call kernels
    _peak_reset(device)
    ms = _median_ms(step, device, args.reps)
    return {"ms": ms, "peak_gib": _peak_gib(device)}


def section_readme(args, device, report) -> list[dict]:
    report(f"## The README loop as printed, model on {device.type} (the snippet's `.cuda()`), fp32, "
           f"build_optimizer's Muon + AdamW, median of {args.reps} steps")  # fmt: skip
    rows, table = [], []
    for name, model_kw, batch, seq in SMOKE_README_MODELS if args.smoke else README_MODELS:
        batch, seq = batch or args.readme_batch, seq or args.seq
        base = None
        for arm in README_ARMS:
            r = _guarded(args.smoke, _readme_row, model_kw, batch, seq, arm, args, device)
            if isinstance(r, str):
                rows.append({"model": name, "strategy": arm, "tokens": (batch, seq), "error": r})
                table.append([name, f"{batch} x {seq}", arm, r, "", ""])
                continue
            base = r["ms"] if arm == "none" else base
            ratio = r["ms"] / base if base else float("nan")
            rows.append({"model": name, "strategy": arm, "tokens": (batch, seq), **r, "ratio": ratio})
            mem = "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
            table.append([name, f"{batch} x {seq}", arm, f"{r['ms']:.1f}", mem, f"{ratio:.3f}"])
    report.table(["model", "tokens", "PC", "step ms", "peak GiB", "x no PC"], table)
    return rows


# ------------------------------------------------------------------------------------ token-efficiency probe
def _probe_data(args) -> tuple[torch.Tensor, torch.Tensor, str]:
    from pcopt.demo import load_sample_bytes

    path = Path(args.data)
    if path.is_file():
        from benchmarks.corpora import load_texts

        texts = load_texts(path)
        cut = max(1, len(texts) // 20)  # the last 5% of the documents validate
        as_bytes = [torch.frombuffer(bytearray("\n\n".join(t).encode()), dtype=torch.uint8).long()
                    for t in (texts[:-cut], texts[-cut:])]  # fmt: skip
        return as_bytes[0], as_bytes[1], str(path)
    data = load_sample_bytes()
    cut = len(data) * 9 // 10
    return data[:cut], data[cut:], f"the embedded sample ({args.data} not found)"


def section_probe(args, device, report) -> list[dict]:
    from pcopt.demo import Arm, evaluate

    train, val, source = _probe_data(args)
    seq, batch = (32, 4) if args.smoke else (args.probe_seq, args.probe_batch)
    epoch = max(1, len(train) // (seq * batch))
    steps = args.probe_steps or (3 if args.smoke else epoch)
    model_kw = SMOKE_PROBE_MODEL if args.smoke else PROBE_MODEL
    report(f"## Token-efficiency probe: {sum(p.numel() for p in _param_count_model(model_kw)) / 1e6:.2f}M "
           f"parameters, {steps} steps x {batch * seq} tokens ({steps / epoch:.2f} epochs of {source})")  # fmt: skip
    rows, table = [], []
    for arm in ARMS_PROBED:
        lr = args.adamw_lr if arm.startswith("adamw") else args.muon_lr
        run = Arm(arm, train, steps=steps, seq=seq, batch=batch, lr=lr, seed=0,
                   ns_dtype=preferred_dtype(device), device=device, **model_kw)  # fmt: skip
        run.step()  # compile-free warm-up: optimizer state, kernels
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps - 1):
            loss = run.step()
        _sync(device)
        ms = 1e3 * (time.perf_counter() - t0) / max(1, steps - 1)
        val_loss = evaluate(run.model, val, seq)
        rows.append(
            {"arm": arm, "lr": lr, "steps": steps, "train_loss": loss, "val_loss": val_loss, "ms": ms}
        )
        table.append([arm, lr, f"{val_loss:.4f}", f"{ms:.1f}"])
        del run
    report.table(["arm", "lr", "val loss (nats/byte)", "ms/step"], table)
    return rows


def _param_count_model(model_kw) -> list[torch.Tensor]:
    from pcopt.demo import TinyLlama

    with torch.device("meta"):
        return list(TinyLlama(**model_kw).parameters())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch of the model step")
    p.add_argument("--seq", type=int, default=4096, help="sequence length of the model step")
    p.add_argument("--readme-batch", type=int, default=1,
                   help="sequences per step of the README loop's Llama-1B row (fp32, no autocast: 4 x 4096 "
                   "would not fit an 80 GB GPU)")  # fmt: skip
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    p.add_argument("--linear-tokens", type=int, default=8192)
    p.add_argument("--degree", type=int, default=5, help="PC degree of the per-Linear table")
    p.add_argument("--data", default="outputs/corpora/python-docs.jsonl", help="probe corpus (.jsonl/.txt)")
    p.add_argument("--probe-steps", type=int, default=0, help="0: one epoch of the training split")
    p.add_argument("--probe-seq", type=int, default=512)
    p.add_argument("--probe-batch", type=int, default=32)
    p.add_argument("--adamw-lr", type=float, default=3e-3)
    p.add_argument("--muon-lr", type=float, default=1e-2)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: every code path in seconds")
    p.add_argument("--out", default="outputs/gpu")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    if unknown := sorted(set(args.only) - set(SECTIONS)):
        p.error(f"--only: unknown section(s) {unknown}; expected a subset of {list(SECTIONS)}")
    if args.smoke:
        args.device, args.batch, args.seq, args.reps, args.linear_tokens = "cpu", 2, 16, 1, 64
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    report = _Report()
    report(f"# pcopt GPU benchmarks on {describe(device)}, torch {torch.__version__}")
    report()
    result: dict = {"device": describe(device), "torch": torch.__version__, "args": vars(args)}
    sections = {"step": section_step, "linear": section_linear, "ns": section_ns, "muon": section_muon,
                "readme": section_readme, "probe": section_probe}  # fmt: skip
    t_start = time.perf_counter()
    for name in args.only:
        t0 = time.perf_counter()
        result[name] = sections[name](args, device, report)
        report(f"({name}: {time.perf_counter() - t0:.0f} s)")
        report()
    result["seconds"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "gpu.md").write_text("\n".join(report.lines) + "\n")
    return result


if __name__ == "__main__":
    main()
