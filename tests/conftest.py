"""Shared test fixtures: tiny models with the parameter names of real Llamas, and a seeded generator.

Models are plain classes (import them: ``from tests.conftest import TinyLlama``); fixtures build seeded
instances. Nothing here is autouse.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

SEED = 0


class Block(nn.Module):
    """Parameter names of a torchtitan 0.3 Llama block."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.attention = nn.Module()
        self.attention.qkv_linear = nn.Module()
        for n in ("wq", "wk", "wv"):
            setattr(self.attention.qkv_linear, n, nn.Linear(dim, dim, bias=False))
        self.attention.wo = nn.Linear(dim, dim, bias=False)
        self.feed_forward = nn.Module()
        self.feed_forward.w1 = nn.Linear(dim, hidden, bias=False)
        self.feed_forward.w2 = nn.Linear(hidden, dim, bias=False)
        self.feed_forward.w3 = nn.Linear(dim, hidden, bias=False)
        self.attention_norm = nn.RMSNorm(dim)
        self.ffn_norm = nn.RMSNorm(dim)

    def forward(self, x):
        a = self.attention
        h = self.attention_norm(x)
        x = x + a.wo(torch.tanh(a.qkv_linear.wq(h) + a.qkv_linear.wk(h) + a.qkv_linear.wv(h)))
        h = self.ffn_norm(x)
        f = self.feed_forward
        return x + f.w2(nn.functional.silu(f.w1(h)) * f.w3(h))


class TinyLlama(nn.Module):
    """Embeddings, blocks and head with torchtitan Llama parameter names (``layers.<i>....``)."""

    def __init__(self, vocab: int = 32, dim: int = 8, hidden: int = 12, layers: int = 2) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleDict({str(i): Block(dim, hidden) for i in range(layers)})
        self.norm = nn.RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h)
        return self.output(self.norm(h))


class FeedForward(nn.Module):
    """A SwiGLU FFN with torchtitan's names ``w1``, ``w2``, ``w3`` (no biases)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class TwoMatrices(nn.Module):
    """``w2(relu(w1 x))``: the smallest model with two PC-able matrices of different shapes."""

    def __init__(self, dim: int = 16, hidden: int = 24) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(torch.relu(self.w1(x)))


@pytest.fixture
def generator() -> torch.Generator:
    """A CPU generator seeded with ``SEED`` (tests draw from it, not from the global RNG)."""
    return torch.Generator().manual_seed(SEED)


@pytest.fixture
def tiny_llama() -> TinyLlama:
    """A seeded, unpreconditioned :class:`TinyLlama`."""
    torch.manual_seed(SEED)
    return TinyLlama()
