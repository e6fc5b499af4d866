"""Train a small byte-level Llama-style model with and without the PC layer and print the comparison.

Runs on CPU in a few minutes with the embedded public-domain text sample (King James Bible, Genesis to
Leviticus); no downloads. ``python -m pcopt.demo --help`` lists the options.

Each arm (AdamW, AdamW + PC, Muon, Muon + PC) shows a progress bar with its running training loss, then one
summary line: validation loss (next-byte cross-entropy, nats per byte), GMCN before -> after training (lower
= flatter singular-value spectrum) and its wall time per step. Muon's Newton-Schulz dtype is
:func:`pcopt.hardware.preferred_dtype` (bf16 only where the CPU computes it natively). The PC step-time
ratios come from steps of the arms timed in turn after training (:func:`interleaved_step_ms`), since arms
trained one after the other see different load from other processes.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time
from importlib import resources
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F
from torch import nn

import pcopt
from pcopt import recipes
from pcopt.hardware import describe, preferred_dtype

ARMS = ("adamw", "adamw_pc", "muon", "muon_pc")


class _Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (w(x).view(b, t, self.n_heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = _rotate(q, rope), _rotate(k, rope)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, d))


def _rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rope[: x.shape[-2]]).flatten(-2).type_as(x)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, hidden: int):
        super().__init__()
        self.attention_norm = nn.RMSNorm(dim, eps=1e-5)
        self.attention = _Attention(dim, n_heads)
        self.ffn_norm = nn.RMSNorm(dim, eps=1e-5)
        self.feed_forward = _FeedForward(dim, hidden)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope)
        return x + self.feed_forward(self.ffn_norm(x))


class TinyLlama(nn.Module):
    """Llama-2-style decoder (RMSNorm, RoPE, SwiGLU, untied head) with torchtitan's module names."""

    def __init__(
        self, vocab: int = 256, dim: int = 128, n_layers: int = 4, n_heads: int = 4, hidden: int = 352
    ):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([_Block(dim, n_heads, hidden) for _ in range(n_layers)])
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.output = nn.Linear(dim, vocab, bias=False)
        head_dim = dim // n_heads
        freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(4096).float(), freqs)
        self.register_buffer("rope", torch.polar(torch.ones_like(angles), angles), persistent=False)
        nn.init.normal_(self.tok_embeddings.weight)
        for i, layer in enumerate(self.layers):  # depth-scaled init as in the paper's Llama
            for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.feed_forward.w1):
                nn.init.trunc_normal_(lin.weight, std=0.02)
            for lin in (layer.attention.wo, layer.feed_forward.w2, layer.feed_forward.w3):
                nn.init.trunc_normal_(lin.weight, std=0.02 / math.sqrt(2 * (i + 1)))
        nn.init.trunc_normal_(self.output.weight, std=dim**-0.5, a=-3 * dim**-0.5, b=3 * dim**-0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, self.rope)
        return self.output(self.norm(h))


def load_sample_bytes() -> torch.Tensor:
    """The embedded text sample as a uint8 tensor (byte-level tokens)."""
    data = resources.files("pcopt").joinpath("data/kjv_sample.txt").read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def _batches(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
        chunk = torch.stack([data[s : s + seq + 1] for s in starts])
        yield chunk[:, :-1], chunk[:, 1:]


def make_arm_optimizer(
    model: nn.Module, arm: str, lr: float, *, ns_dtype: torch.dtype | None = None
) -> torch.optim.Optimizer:
    """The paper's optimizer of one demo arm: AdamW on everything ("adamw*"), or Muon on the hidden matrices
    and AdamW on the rest with the same lr ("muon*", :func:`pcopt.build_optimizer`).

    ``ns_dtype`` is Muon's Newton-Schulz dtype; None picks :func:`pcopt.hardware.preferred_dtype` of the CPU
    (bf16 only where the CPU computes it natively).
    """
    if arm.startswith("adamw"):
        opt = torch.optim.AdamW(model.parameters(), lr=lr, **recipes.ADAMW)
        if pcopt.preconditioners(model):
            pcopt.PCState(model).attach(opt)  # refresh u, v after every step
        return opt
    return pcopt.build_optimizer(
        model,
        lr=lr,
        weight_decay=recipes.WEIGHT_DECAY,
        adjust_lr_fn="match_rms_adamw",
        ns_dtype=preferred_dtype("cpu") if ns_dtype is None else ns_dtype,
    )


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, seq: int, batches: int = 8) -> float:
    """Mean next-byte cross-entropy (nats per byte) on ``batches`` fixed batches of 16 sequences."""
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(1234)
    it = _batches(data, 16, seq, g)
    losses = []
    for _ in range(batches):
        x, y = (t.to(device) for t in next(it))
        losses.append(F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


class Arm:
    """One arm: its model, optimizer, lr schedule and batch stream; :meth:`step` is one training step."""

    def __init__(
        self,
        arm: str,
        train: torch.Tensor,
        *,
        steps,
        seq,
        batch,
        lr,
        seed,
        ns_dtype,
        device="cpu",
        **model_kw,
    ):
        torch.manual_seed(seed)
        self.arm = arm
        self.device = torch.device(device)
        with self.device:
            self.model = TinyLlama(**model_kw)
        self.pc_state = None
        if arm.endswith("_pc"):
            pcopt.precondition_model(self.model, degree=recipes.pc_degree(arm.removesuffix("_pc")))
            # one device: the once-per-step strategy is exact (equal to the per-forward map up to rounding)
            # and computes the map once per step instead of in every forward and backward
            pcopt.set_strategy(self.model, "once_per_step")
            self.pc_state = pcopt.PCState(self.model)
        self.gmcn_start = pcopt.gmcn(self.model)
        self.optimizer = make_arm_optimizer(self.model, arm, lr, ns_dtype=ns_dtype)
        self.batches = _batches(train, batch, seq, torch.Generator().manual_seed(seed))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: recipes.lr_factor(s, steps)
        )

    def step(self) -> float:
        x, y = (t.to(self.device, non_blocking=True) for t in next(self.batches))
        # bf16 autocast on a GPU (fp32 master weights); the CPU demo computes in fp32
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        if self.pc_state is not None:
            self.pc_state.after_backward()  # dL/dW_eff -> dL/dW, dL/dgamma, before clipping
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), recipes.GRAD_CLIP)
        self.optimizer.step()  # + the attached PCState.after_step(): refresh u, v and write W_eff
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss.item()


class _Progress:
    """A progress bar with the running loss: redrawn in place on a terminal, a line per 10% otherwise."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, width: int = 20):
        self.label, self.total, self.width = label, total, width
        self.stream = sys.stdout if stream is None else stream
        self.tty = self.stream.isatty()
        self.every = max(1, total // 10)
        self.t0 = time.perf_counter()
        self.last_draw = 0.0

    def update(self, done: int, loss: float) -> None:
        now = time.perf_counter()
        if self.tty and done < self.total and now - self.last_draw < 0.2:
            return
        if not self.tty and done % self.every and done != self.total:
            return
        self.last_draw = now
        elapsed = now - self.t0
        eta = elapsed / done * (self.total - done)
        filled = round(self.width * done / self.total)
        line = (
            f"  {self.label:<9} [{'#' * filled}{'.' * (self.width - filled)}] {done:>{len(str(self.total))}}/"
            f"{self.total}  loss {loss:.3f}  {1000 * elapsed / done:5.0f} ms/step  ETA {eta:4.0f} s"
        )
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=self.stream, flush=True)

    def close(self, summary: str) -> None:
        if self.tty:
            print("\r\033[K", end="", file=self.stream)
        print(summary, file=self.stream, flush=True)


def train_arm(run: Arm, steps: int, val: torch.Tensor, seq: int) -> dict:
    """Train ``run`` for ``steps`` steps with a progress bar; evaluate it and print its one-line summary."""
    bar = _Progress(run.arm, steps)
    t0 = time.perf_counter()
    for i in range(steps):
        loss = run.step()
        bar.update(i + 1, loss)
    elapsed = time.perf_counter() - t0
    r = {
        "arm": run.arm,
        "train_loss": loss,
        "val_loss": evaluate(run.model, val, seq),
        "gmcn_start": run.gmcn_start,
        "gmcn_end": pcopt.gmcn(run.model),
        "ms_per_step": 1000 * elapsed / steps,
    }
    bar.close(
        f"  {run.arm:<9} val loss {r['val_loss']:.4f}  train loss {r['train_loss']:.4f}  "
        f"GMCN {r['gmcn_start']:7.2f} -> {r['gmcn_end']:7.2f}  {r['ms_per_step']:6.1f} ms/step"
    )
    return r


def interleaved_step_ms(runs: list[Arm], rounds: int) -> dict[str, list[float]]:
    """Time one step of each run in turn, ``rounds`` times (order reversed every other round).

    Adjacent steps of different arms see the same load from other processes, so ratios of these times are
    comparable where the wall times of arms trained one after the other are not.
    """
    times: dict[str, list[float]] = {run.arm: [] for run in runs}
    for i in range(rounds):
        for run in runs if i % 2 == 0 else runs[::-1]:
            t0 = time.perf_counter()
            run.step()
            times[run.arm].append(1000 * (time.perf_counter() - t0))
    return times


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="python -m pcopt.demo",
        # the module docstring without its Sphinx markup (":func:`x`" -> "x", "``x``" -> "x")
        description=re.sub(r":\w+:`([^`]+)`", r"\1", __doc__).replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {ARMS}")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per arm (default: 200)")
    parser.add_argument(
        "--seq", type=int, default=128, help="sequence length in bytes, one token per byte (default: 128)"
    )
    parser.add_argument("--batch", type=int, default=8, help="sequences per optimizer step (default: 8)")
    parser.add_argument(
        "--adamw-lr", type=float, default=3e-3, help="peak lr of both AdamW arms (default: 3e-3)"
    )
    parser.add_argument(
        "--muon-lr", type=float, default=1e-2, help="peak lr of both Muon arms (default: 1e-2)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="model init and data order seed, the same for every arm (default: 0)",
    )
    parser.add_argument(
        "--ns-dtype",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="Muon's Newton-Schulz dtype (auto: pcopt.hardware.preferred_dtype, bf16 only where native)",
    )
    parser.add_argument(
        "--timing-rounds",
        type=int,
        default=10,
        help="after training, time this many interleaved steps per arm for the PC step-time ratio (0: skip)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: robust when other jobs share the cores)"
    )
    parser.add_argument(
        "--text", type=Path, default=None, help="train on this UTF-8 text file instead of the sample"
    )
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; expected a subset of {list(ARMS)}")
    if args.steps < 1 or args.timing_rounds < 0:
        parser.error(
            f"--steps must be >= 1 and --timing-rounds >= 0, got {args.steps} and {args.timing_rounds}"
        )
    data = (
        load_sample_bytes()
        if args.text is None
        else torch.tensor(list(args.text.read_bytes()), dtype=torch.long)
    )
    torch.set_num_threads(max(1, args.threads))
    ns_dtype = {"auto": preferred_dtype("cpu"), "bf16": torch.bfloat16, "fp32": torch.float32}[args.ns_dtype]
    print(
        f"pcopt {pcopt.__version__} demo: byte-level Llama (4 layers, dim 128), {args.steps} steps x "
        f"{args.batch} x {args.seq} tokens, torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n"
        f"  model in float32; Muon's Newton-Schulz in {str(ns_dtype).removeprefix('torch.')} "
        f"({'--ns-dtype' if args.ns_dtype != 'auto' else 'pcopt.hardware: ' + describe('cpu')})\n"
        "  loss: next-byte cross-entropy in nats per byte (uniform guessing: ln 256 = 5.55). GMCN: sigma_1 over "
        "the mean of the bottom 10% singular values, geometric mean over the attention/FFN matrices; "
        "lower = flatter spectrum.",
        flush=True,
    )
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    results, runs = [], []
    for arm in arms:
        lr = args.adamw_lr if arm.startswith("adamw") else args.muon_lr
        run = Arm(
            arm,
            train,
            steps=args.steps,
            seq=args.seq,
            batch=args.batch,
            lr=lr,
            seed=args.seed,
            ns_dtype=ns_dtype,
        )
        r = train_arm(run, args.steps, val, args.seq)
        r["ns_dtype"] = str(ns_dtype).removeprefix("torch.") if arm.startswith("muon") else None
        results.append(r)
        runs.append(run)
    by_arm = {r["arm"]: r for r in results}
    pairs = [b for b in ("adamw", "muon") if b in by_arm and f"{b}_pc" in by_arm]
    if pairs and args.timing_rounds:
        print(f"\ntiming {args.timing_rounds} interleaved steps per arm (after training) ...", flush=True)
        times = interleaved_step_ms(runs, args.timing_rounds)
        for r in results:
            r["interleaved_ms"] = times[r["arm"]]
    if pairs:
        print("\nPC vs baseline (same lr, same data order):")
    for base in pairs:
        b, p = by_arm[base], by_arm[f"{base}_pc"]
        line = (  # "->" in the arm lines is before -> after training; here it is baseline vs PC
            f"  {base:<6} val loss {b['val_loss']:.4f} baseline, {p['val_loss']:.4f} with PC "
            f"({p['val_loss'] - b['val_loss']:+.4f}); GMCN at the end {b['gmcn_end']:.2f} baseline, "
            f"{p['gmcn_end']:.2f} with PC"
        )
        if "interleaved_ms" in p:
            ratios = [tp / tb for tp, tb in zip(p["interleaved_ms"], b["interleaved_ms"])]
            p["step_time_ratio"] = statistics.median(ratios)
            line += f"; step time x{p['step_time_ratio']:.2f} (median of {len(ratios)} interleaved pairs)"
        print(line, flush=True)
    return results


if __name__ == "__main__":
    main()
