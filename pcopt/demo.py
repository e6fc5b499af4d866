"""Train a small byte-level Llama-style model with and without the PC layer and print the comparison.

Runs on CPU in a few minutes with the embedded public-domain text sample (King James Bible, Genesis to
Leviticus); no downloads. ``python -m pcopt.demo --help`` lists the options.
"""

from __future__ import annotations

import argparse
import math
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import pcopt

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


def _lr_factor(step: int, steps: int) -> float:
    """Paper schedule: linear warmup over 1% of steps, cosine decay to 10% of peak."""
    warmup = max(1, steps // 100)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, arm: str, lr: float) -> torch.optim.Optimizer:
    """The paper's optimizers: AdamW on everything, or Muon on hidden matrices + AdamW on the rest (same lr)."""
    if arm.startswith("adamw"):
        return pcopt.optim.AdamW(
            model.parameters(), lr=lr, **pcopt.recipes.ADAMW, pc_state=model if pcopt.preconditioners(model) else None
        )
    return pcopt.optim.build_optimizer(model, lr=lr, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, seq: int, batches: int = 8) -> float:
    model.eval()
    g = torch.Generator().manual_seed(1234)
    it = _batches(data, 16, seq, g)
    losses = []
    for _ in range(batches):
        x, y = next(it)
        losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def train_arm(
    arm: str, data: torch.Tensor, *, steps: int, seq: int, batch: int, lr: float, seed: int
) -> dict:
    torch.manual_seed(seed)
    model = TinyLlama()
    if arm.endswith("_pc"):
        pcopt.precondition_model(model, degree=9 if arm.startswith("adamw") else 5)
    gmcn_start = pcopt.gmcn(model)
    optimizer = build_optimizer(model, arm, lr)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    it = _batches(train, batch, seq, torch.Generator().manual_seed(seed))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps))
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = next(it)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()  # also refreshes u, v of the PC weights (the optimizer was given the PC state)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    elapsed = time.perf_counter() - t0
    return {
        "arm": arm,
        "train_loss": loss.item(),
        "val_loss": evaluate(model, val, seq),
        "gmcn_start": gmcn_start,
        "gmcn_end": pcopt.gmcn(model),
        "ms_per_step": 1000 * elapsed / steps,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {ARMS}")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--adamw-lr", type=float, default=3e-3)
    parser.add_argument("--muon-lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
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
    data = (
        load_sample_bytes()
        if args.text is None
        else torch.tensor(list(args.text.read_bytes()), dtype=torch.long)
    )
    torch.set_num_threads(max(1, args.threads))
    print(
        f"pcopt {pcopt.__version__} demo: byte-level Llama (4 layers, dim 128), {args.steps} steps x "
        f"{args.batch} x {args.seq} tokens, torch {torch.__version__}"
    )
    results = []
    for arm in arms:
        lr = args.adamw_lr if arm.startswith("adamw") else args.muon_lr
        r = train_arm(arm, data, steps=args.steps, seq=args.seq, batch=args.batch, lr=lr, seed=args.seed)
        results.append(r)
        print(
            f"  {arm:<9} val loss {r['val_loss']:.4f}  train loss {r['train_loss']:.4f}  "
            f"GMCN {r['gmcn_start']:7.2f} -> {r['gmcn_end']:7.2f}  {r['ms_per_step']:6.1f} ms/step",
            flush=True,
        )
    by_arm = {r["arm"]: r for r in results}
    print("\nPC vs baseline (same lr, same data order):")
    for base in ("adamw", "muon"):
        if base in by_arm and f"{base}_pc" in by_arm:
            b, p = by_arm[base], by_arm[f"{base}_pc"]
            print(
                f"  {base:<6} val loss {b['val_loss']:.4f} -> {p['val_loss']:.4f} with PC "
                f"({p['val_loss'] - b['val_loss']:+.4f}); GMCN {b['gmcn_end']:.2f} -> {p['gmcn_end']:.2f}; "
                f"step time x{p['ms_per_step'] / b['ms_per_step']:.2f}"
            )
    return results


if __name__ == "__main__":
    main()
