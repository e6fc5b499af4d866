"""Shared pieces of the benchmark scripts: a CPU-sized torchtitan Llama, data, the paper's recipe.

The model is torchtitan's Llama3 definition (``torchtitan.models.llama3``) configured Llama-2 style:
multi-head attention (no GQA), separate ``wq``/``wk``/``wv``, RoPE theta 10000 without scaling, untied
embedding and LM head, SwiGLU FFN, RMSNorm, torchtitan's initialisation (std 0.02, depth-scaled
``wo``/``w2``/``w3``). FlexAttention has no backward on the CPU, so the inner attention is torchtitan's
``ScaledDotProductAttention`` with a causal mask; training windows are non-overlapping chunks of the
concatenated documents without per-document masking, as in the paper's data pipeline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

import pcopt
from pcopt import recipes
from pcopt.hardware import describe, preferred_dtype
from pcopt.names import ATTENTION_FFN_MODULES

# Every attention and FFN matrix of a torchtitan 0.3 Llama (q/k/v live under ``attention.qkv_linear``).
TORCHTITAN_MATRICES = ATTENTION_FFN_MODULES

# The paper's degrees: 9 with AdamW, 5 with Muon.
PC_DEGREE = recipes.PC_DEGREE
ARMS = ("adamw", "adamw_pc", "muon", "muon_pc")


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSize:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    ffn_multiple_of: int = 256
    seq_len: int = 256


def build_llama(vocab_size: int, size: ModelSize, seed: int) -> nn.Module:
    """torchtitan Llama3Model, Llama-2 style, on the CPU, initialised with ``seed``."""
    import torchtitan.models.llama3 as llama3
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm, compute_ffn_hidden_dim
    from torchtitan.models.common.attention import ScaledDotProductAttention

    if size.dim % size.n_heads:
        raise ValueError(f"dim ({size.dim}) must be divisible by n_heads ({size.n_heads}).")
    layers = llama3._build_llama3_layers(
        n_layers=size.n_layers,
        dim=size.dim,
        n_heads=size.n_heads,
        hidden_dim=compute_ffn_hidden_dim(size.dim, multiple_of=size.ffn_multiple_of),
        rope=ComplexRoPE.Config(
            dim=size.dim // size.n_heads, max_seq_len=size.seq_len, theta=10000.0, scaling="none"
        ),
        fuse_qkv=False,
        attn_backend="flex",
    )
    for layer in layers:  # causal SDPA: FlexAttention has no CPU backward
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    config = llama3.Llama3Model.Config(
        dim=size.dim,
        vocab_size=vocab_size,
        tok_embeddings=Embedding.Config(
            num_embeddings=vocab_size, embedding_dim=size.dim, param_init=llama3._EMBEDDING_INIT
        ),
        norm=RMSNorm.Config(normalized_shape=size.dim, param_init=llama3._NORM_INIT),
        lm_head=Linear.Config(
            in_features=size.dim, out_features=vocab_size, param_init=llama3._output_linear_init(size.dim)
        ),
        layers=layers,
    )
    torch.manual_seed(seed)
    model = config.build()
    model.init_states()
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def precondition(model: nn.Module, optimizer: str) -> list[str]:
    """The paper's PC placement (attention output + FFN) with its degree for ``optimizer``."""
    return pcopt.precondition_model(model, degree=PC_DEGREE[optimizer])


def gmcn(model: nn.Module) -> float:
    """GMCN over all attention and FFN matrices of the torchtitan Llama (``W_eff`` where preconditioned)."""
    return pcopt.gmcn(model, targets=TORCHTITAN_MATRICES)


# ----------------------------------------------------------------------------------------------------
# Optimizers and schedule (the paper's recipe)
# ----------------------------------------------------------------------------------------------------
def build_optimizers(
    model: nn.Module, optimizer: str, lr: float, weight_decay: float = 0.1
) -> tuple[list[torch.optim.Optimizer], bool]:
    """The paper's optimizer for ``optimizer`` in {"adamw", "muon"}, from :mod:`pcopt.optim`.

    Returns the optimizers and whether they refresh the PC power-iteration state themselves (always
    True for ``pcopt.optim``; callers fall back to ``pcopt.refresh`` otherwise). AdamW: one group, betas
    (0.9, 0.95), weight decay on every parameter (the paper's single group). Muon: momentum 0.95 Nesterov,
    5 Newton-Schulz steps in bf16, ``match_rms_adamw`` lr scaling (0.2 sqrt(max(A, B))) on the hidden
    matrices (raw PC weights included); embedding, LM head, norms and gammas go to AdamW with the same peak
    lr, all with weight decay 0.1.
    """
    import pcopt.optim

    if optimizer == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, **{**recipes.ADAMW, "weight_decay": weight_decay})
        if pcopt.preconditioners(model):
            pcopt.PCState(model).attach(opt)
        return [opt], True
    if optimizer == "muon":
        return [pcopt.build_optimizer(model, lr=lr, weight_decay=weight_decay)], True
    raise ValueError(f"optimizer must be 'adamw' or 'muon', got {optimizer!r}.")


lr_factor = recipes.lr_factor  # the paper's schedule: 1% linear warmup, then cosine to 10% of the peak


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
SPECIALS = ("<|bos|>", "<|eos|>")


def read_jsonl_texts(path: str | Path, field: str = "text") -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            rec = json.loads(line)
            if field not in rec:
                raise ValueError(
                    f"{path}:{i + 1} has no field {field!r} (fields: {sorted(rec)}). Pass a JSON-lines file "
                    f"whose records carry the text in {field!r}."
                )
            if rec[field]:
                texts.append(rec[field])
    if len(texts) < 2:
        raise ValueError(
            f"{path} holds {len(texts)} non-empty documents; need at least 2 (train + validation)."
        )
    return texts


def split_documents(texts: Sequence[str], val_every: int = 20) -> tuple[list[str], list[str]]:
    """Every ``val_every``-th document (offset ``val_every // 2``) is held out for validation."""
    val = [t for i, t in enumerate(texts) if i % val_every == val_every // 2]
    train = [t for i, t in enumerate(texts) if i % val_every != val_every // 2]
    if not val:
        val, train = train[-1:], train[:-1]
    return train, val


def train_bpe(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE trained with the ``tokenizers`` library, with BOS/EOS specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str | Path):
    """A ``tokenizers`` tokenizer from a ``tokenizer.json`` file or a directory holding one."""
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ValueError(f"No tokenizer.json at {path}. Pass a tokenizer.json file or its directory.")
    return Tokenizer.from_file(str(p))


def special_ids(tok) -> tuple[int | None, int | None]:
    """(bos, eos) ids, looked up by the usual special-token names."""

    def first(names):
        for n in names:
            i = tok.token_to_id(n)
            if i is not None:
                return i
        return None

    bos = first(("<|bos|>", "<s>", "<|begin_of_text|>", "<|startoftext|>"))
    eos = first(("<|eos|>", "</s>", "<|end_of_text|>", "<|endoftext|>"))
    return bos, eos


def tokenize_windows(tok, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Documents as ``BOS doc EOS``, concatenated and cut into non-overlapping ``seq_len + 1`` windows."""
    bos, eos = special_ids(tok)
    ids: list[int] = []
    for enc in tok.encode_batch(list(texts), add_special_tokens=False):
        if bos is not None:
            ids.append(bos)
        ids.extend(enc.ids)
        if eos is not None:
            ids.append(eos)
    n = len(ids) // (seq_len + 1)
    if n == 0:
        raise ValueError(
            f"The text has {len(ids)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}. "
            "Use a larger file or a smaller --seq-len."
        )
    return torch.tensor(ids[: n * (seq_len + 1)], dtype=torch.long).view(n, seq_len + 1)


class WindowSampler:
    """Batches of windows in a seeded random order, reshuffled every epoch (same for every arm)."""

    def __init__(self, windows: torch.Tensor, batch_size: int, seed: int) -> None:
        if batch_size > len(windows):
            raise ValueError(
                f"batch size {batch_size} exceeds the {len(windows)} training windows; lower --batch-size."
            )
        self.windows, self.batch_size = windows, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(len(windows), generator=self.gen), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > len(self.order):
            self.order, self.pos = torch.randperm(len(self.windows), generator=self.gen), 0
        idx = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.windows[idx]


# ----------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------
def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs)
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def autocast(dtype: str):
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be 'bf16' or 'fp32', got {dtype!r}.")
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, batch_size: int, dtype: str) -> float:
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        b = windows[i : i + batch_size]
        with autocast(dtype):
            total += float(lm_loss(model, b)) * len(b)
        count += len(b)
    return total / count


def machine_info() -> dict:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dtype_choice": describe("cpu"),
    }


def default_dtype() -> str:
    """The ``--dtype`` default: "bf16" where the CPU computes bf16 natively, else "fp32" (pcopt.hardware)."""
    return "bf16" if preferred_dtype("cpu") == torch.bfloat16 else "fp32"


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self.t0


def to_jsonable(obj):
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, Mapping):  # e.g. the read-only recipe tables of pcopt.recipes
        return dict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def progress(iterable: Iterable, total: int, desc: str, enabled: bool = True):
    """tqdm when available and enabled, else the plain iterable."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, mininterval=2.0)


__all__ = [
    "ARMS",
    "PC_DEGREE",
    "TORCHTITAN_MATRICES",
    "ModelSize",
    "Timer",
    "WindowSampler",
    "autocast",
    "build_llama",
    "build_optimizers",
    "count_params",
    "evaluate",
    "gmcn",
    "lm_loss",
    "load_tokenizer",
    "lr_factor",
    "default_dtype",
    "machine_info",
    "precondition",
    "progress",
    "read_jsonl_texts",
    "split_documents",
    "tokenize_windows",
    "to_jsonable",
    "train_bpe",
]
