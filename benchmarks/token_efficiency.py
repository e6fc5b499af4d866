"""Token efficiency of the PC layer: the same Llama trained with and without PC, AdamW and Muon.

    python -m benchmarks.token_efficiency --data PATH.jsonl|PATH.txt|HF_DATASET [--arms adamw,adamw_pc,muon,muon_pc]
        [--steps N] [--out DIR] [--seed S] [--sweep-adamw 1e-3,2e-3,4e-3] [--sweep-muon ...]

Every arm trains torchtitan's Llama3 model (Llama-2 style, a few million parameters, see
``benchmarks/_common.py``) on the ``text`` field of a JSON-lines file with a byte-level BPE trained on the
training split (or ``--tokenizer``), a held-out validation split (every 20th document), and the paper's
recipe: warmup 1% of the steps, cosine decay to 10%, gradient clipping 1.0, weight decay 0.1, PC degree 9
with AdamW and 5 with Muon, the same peak lr for the baseline and the PC arm. The lr of each optimizer is
either given (``--lr-adamw`` / ``--lr-muon``) or chosen by a sweep over the baseline (``--sweep-*``):
the lr with the lowest final validation loss wins, and that sweep run *is* the baseline arm.

Outputs in ``--out``: ``summary.json`` (per arm: final validation loss, tokens seen, GMCN at start and
end, and for PC arms the token-efficiency ratio ``tokens(baseline reaches its final val loss) /
tokens(PC arm reaches it)``), the curves, ``val_loss.png``, ``gmcn.png``, ``spectra.png``. Each finished
run is also stored in ``--out/runs/`` and reused by a later invocation with identical settings, so a
long experiment can be run in pieces.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

import pcopt
from benchmarks import _common as C
from benchmarks.corpora import data_id, load_texts

# SPECTRA arms (docs/spectra.md): the arm without the suffix, its updates post-clipped by pcopt.optim.Spectra.
SPECTRA_ARMS = ("adamw_spectra", "adamw_pc_spectra", "muon_spectra")
ALL_ARMS = C.ARMS + SPECTRA_ARMS


def split_arm(arm: str) -> tuple[str, bool, bool]:
    """``arm`` -> (optimizer, PC?, SPECTRA?), e.g. ``"adamw_pc_spectra"`` -> ``("adamw", True, True)``."""
    core = arm.removesuffix("_spectra")
    return core.removesuffix("_pc"), core.endswith("_pc"), arm.endswith("_spectra")


# Matrices whose spectra are plotted (layer index -1 = last layer).
SPECTRA = (("0", "feed_forward.w1"), ("mid", "attention.wo"), ("-1", "feed_forward.w2"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.token_efficiency", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--data",
        required=True,
        help="corpus: a .jsonl file (a 'text' field per document), a .txt file (documents separated by blank "
        "lines) or a Hugging Face dataset name (NAME or NAME:CONFIG, split train); "
        "python -m benchmarks.corpora builds the KJV and python-docs corpora",
    )
    p.add_argument("--arms", default=",".join(C.ARMS), help=f"comma-separated subset of {','.join(ALL_ARMS)}")
    p.add_argument(
        "--spectra-c",
        type=float,
        default=10.0,
        help="post-clip threshold c of the *_spectra arms (published: 10)",
    )
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per arm")
    p.add_argument("--out", default="outputs/token_efficiency", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="model init and data order seed (same for all arms)")
    p.add_argument("--lr-adamw", type=float, default=2e-3, help="peak lr of both AdamW arms (no sweep)")
    p.add_argument("--lr-muon", type=float, default=1e-2, help="peak lr of both Muon arms (no sweep)")
    p.add_argument("--sweep-adamw", default="", help="comma-separated lrs: sweep the AdamW baseline")
    p.add_argument("--sweep-muon", default="", help="comma-separated lrs: sweep the Muon baseline")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=6)
    p.add_argument("--ffn-multiple-of", type=int, default=256)
    p.add_argument(
        "--vocab-size", type=int, default=4096, help="BPE vocabulary size (ignored with --tokenizer)"
    )
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer.json (or its directory) instead of training one"
    )
    p.add_argument("--text-field", default="text")
    p.add_argument("--val-every-doc", type=int, default=20, help="every N-th document goes to validation")
    p.add_argument("--val-windows", type=int, default=192, help="validation windows evaluated (fixed set)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: steps // 25)")
    p.add_argument(
        "--dtype",
        default=C.default_dtype(),
        choices=("bf16", "fp32"),
        help="autocast dtype of the matmuls (default: bf16 where the CPU has native bf16, else fp32)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--no-reuse", action="store_true", help="rerun arms even if a matching run is stored")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--variant",
        default="",
        help="arm variant of benchmarks/_variants.py for the PC arms (e.g. deg3, merge25)",
    )
    args = p.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ALL_ARMS]
    if bad or not arms:
        p.error(
            f"--arms: unknown arm(s) {bad or arms}; expected a comma-separated subset of {','.join(ALL_ARMS)}"
        )
    args.arms = arms
    for name in ("sweep_adamw", "sweep_muon"):
        try:
            setattr(args, name, [float(x) for x in getattr(args, name).split(",") if x.strip()])
        except ValueError:
            p.error(f"--{name.replace('_', '-')} expects comma-separated floats, got {getattr(args, name)!r}")
    if args.steps < 2:
        p.error(f"--steps must be >= 2, got {args.steps}")
    return args


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
def prepare_data(args, out: Path) -> dict:
    texts = load_texts(args.data, args.text_field)
    train_docs, val_docs = C.split_documents(texts, args.val_every_doc)
    if args.tokenizer:
        tok = C.load_tokenizer(args.tokenizer)
        tok_source = str(args.tokenizer)
    else:
        tok_path = out / "tokenizer.json"
        digest = hashlib.sha256("\n\x00".join(train_docs).encode()).hexdigest()[:16]
        meta_path = out / "tokenizer.meta.json"
        meta = {"train_sha256": digest, "vocab_size": args.vocab_size}
        if tok_path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
            tok = C.load_tokenizer(tok_path)
        else:
            tok = C.train_bpe(train_docs, args.vocab_size)
            tok.save(str(tok_path))
            meta_path.write_text(json.dumps(meta))
        tok_source = f"byte-level BPE trained on the training split (vocab {args.vocab_size})"
    train = C.tokenize_windows(tok, train_docs, args.seq_len)
    val = C.tokenize_windows(tok, val_docs, args.seq_len)
    # A fixed, evenly spaced subset of the validation windows (the same for every arm).
    if len(val) > args.val_windows:
        val = val[torch.linspace(0, len(val) - 1, args.val_windows).round().long()]
    return {
        "tokenizer": tok,
        "tokenizer_source": tok_source,
        "vocab_size": tok.get_vocab_size(),
        "train": train,
        "val": val,
        "stats": {
            "documents_train": len(train_docs),
            "documents_val": len(val_docs),
            "train_tokens": int(train.numel()),
            "train_windows": len(train),
            "val_windows_used": len(val),
            "val_tokens_used": int(val[:, 1:].numel()),
        },
    }


# ----------------------------------------------------------------------------------------------------
# One training run
# ----------------------------------------------------------------------------------------------------
def _layer_index(tag: str, n_layers: int) -> int:
    return {"mid": n_layers // 2, "-1": n_layers - 1}.get(tag, int(tag) if tag.lstrip("-").isdigit() else 0)


@torch.no_grad()
def spectra(model: nn.Module, n_layers: int) -> dict[str, dict[str, list[float]]]:
    """Singular values of a few matrices: W_eff (without gamma) and, for PC weights, the raw W."""
    out = {}
    for tag, path in SPECTRA:
        fqn = f"layers.{_layer_index(tag, n_layers)}.{path}"
        mod = model.get_submodule(fqn)
        entry = {}
        if pcopt.is_preconditioned(mod):
            entry["effective"] = pcopt.effective_weight(mod, include_gamma=False)
            entry["raw"] = mod.parametrizations.weight.original.detach()
        else:
            entry["effective"] = mod.weight.detach()
        out[fqn] = {k: torch.linalg.svdvals(v.double()).tolist() for k, v in entry.items()}
    return out


def run_config(args, arm: str, lr: float, data: dict) -> dict:
    """Everything that determines a run's result (used to reuse stored runs)."""
    return {
        "arm": arm,
        "lr": lr,
        "steps": args.steps,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "model": asdict(model_size(args)),
        "dtype": args.dtype,
        "eval_every": eval_every(args),
        "data": data_id(args.data),
        "data_stats": data["stats"],
        "tokenizer": data["tokenizer_source"],
        "vocab_size": data["vocab_size"],
        "val_every_doc": args.val_every_doc,
        "val_sha": hashlib.sha256(data["val"].numpy().tobytes()).hexdigest()[:16],
        "version": 1,
        **({"variant": args.variant} if getattr(args, "variant", "") and split_arm(arm)[1] else {}),
        **({"spectra_c": args.spectra_c} if split_arm(arm)[2] else {}),
    }


def model_size(args) -> C.ModelSize:
    return C.ModelSize(args.dim, args.n_layers, args.n_heads, args.ffn_multiple_of, args.seq_len)


def eval_every(args) -> int:
    return args.eval_every or max(1, args.steps // 25)


def train_arm(args, arm: str, lr: float, data: dict) -> dict:
    optimizer, use_pc, use_spectra = split_arm(arm)
    variant = _variant(args) if use_pc else None  # benchmarks/_variants.py; None for the default arms
    model = C.build_llama(data["vocab_size"], model_size(args), args.seed)
    n_params = C.count_params(model)
    pc_fqns = (
        (variant.precondition(model, optimizer) if variant else C.precondition(model, optimizer))
        if use_pc
        else []
    )
    n_params_pc = C.count_params(model)
    opts, self_refresh = (variant or C).build_optimizers(model, optimizer, lr)
    if use_spectra:  # post-clip the hidden matrices' updates; c * lr constant during the 1% warmup
        warmup = max(1, round(0.01 * args.steps))
        opts = [pcopt.optim.Spectra(o, c=args.spectra_c, model=model, warmup_steps=warmup) for o in opts]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: C.lr_factor(s, args.steps)) for o in opts]
    sampler = C.WindowSampler(data["train"], args.batch_size, args.seed)
    tokens_per_step = args.batch_size * args.seq_len
    every = eval_every(args)

    curve = {"step": [0], "tokens": [0], "val_loss": [], "gmcn": [C.gmcn(model)], "train_loss": [None]}
    curve["val_loss"].append(C.evaluate(model, data["val"], args.batch_size * 2, args.dtype))
    window: list[float] = []
    diverged = False
    t0 = time.perf_counter()
    bar = C.progress(range(args.steps), args.steps, f"{arm} lr={lr:g}", not args.no_progress)
    steps_done = 0
    for step in bar:
        steps_done = step + 1
        batch = sampler.next()
        if variant is not None:
            variant.before_step(model, step, args.steps)  # e.g. merges PC after K% of the steps
        with C.autocast(args.dtype):
            loss = C.lm_loss(model, batch)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for o in opts:
            o.step()
        if use_pc and not self_refresh:
            pcopt.refresh(model)
        for o in opts:
            o.zero_grad(set_to_none=True)
        for s in scheds:
            s.step()
        window.append(float(loss.detach()))
        if not math.isfinite(window[-1]):
            diverged = True
            break
        if (step + 1) % every == 0 or step + 1 == args.steps:
            val = C.evaluate(model, data["val"], args.batch_size * 2, args.dtype)
            curve["step"].append(step + 1)
            curve["tokens"].append((step + 1) * tokens_per_step)
            curve["val_loss"].append(val)
            curve["gmcn"].append(C.gmcn(model))
            curve["train_loss"].append(sum(window) / len(window))
            window = []
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(train=f"{curve['train_loss'][-1]:.3f}", val=f"{val:.3f}")
    wall = time.perf_counter() - t0
    if hasattr(bar, "close"):
        bar.close()
    final = curve["val_loss"][-1] if not diverged else float("nan")
    return {
        "arm": arm,
        "optimizer": optimizer,
        "pc": use_pc,
        "spectra_c": args.spectra_c if use_spectra else None,
        "pc_degree": (variant.pc_degree(optimizer) if variant else C.PC_DEGREE[optimizer])
        if use_pc
        else None,
        **({"variant": variant.name} if variant else {}),
        "pc_weights": len(pc_fqns),
        "lr": lr,
        "diverged": diverged,
        "final_val_loss": final,
        "tokens_seen": steps_done * tokens_per_step,
        "gmcn_start": curve["gmcn"][0],
        "gmcn_end": curve["gmcn"][-1],
        "params": n_params,
        "params_with_pc": n_params_pc,
        "wall_s": wall,
        "s_per_step": wall / max(1, steps_done),
        "optimizer_impl": "pcopt.optim" if self_refresh else "torch.optim (+ pcopt.refresh after each step)",
        "curve": curve,
        "spectra": spectra(model, args.n_layers) if not diverged else {},
    }


def _variant(args):
    name = getattr(args, "variant", "")
    if not name:
        return None
    from benchmarks import _variants

    return _variants.resolve(name)


def get_run(args, arm: str, lr: float, data: dict, out: Path) -> dict:
    cfg = run_config(args, arm, lr, data)
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    path = out / "runs" / f"{arm}_lr{lr:g}_{key}.json"
    if path.is_file() and not args.no_reuse:
        rec = json.loads(path.read_text())
        if rec.get("config") == cfg:
            print(f"[token_efficiency] reusing {path}", flush=True)
            return rec
    rec = train_arm(args, arm, lr, data)
    rec["config"] = cfg
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    print(
        f"[token_efficiency] {arm} lr={lr:g}: final val loss {rec['final_val_loss']:.4f}, "
        f"GMCN {rec['gmcn_start']:.2f} -> {rec['gmcn_end']:.2f}, {rec['wall_s']:.0f} s",
        flush=True,
    )
    return rec


# ----------------------------------------------------------------------------------------------------
# Token-efficiency ratio
# ----------------------------------------------------------------------------------------------------
def tokens_to_reach(tokens: list[float], losses: list[float], target: float) -> float | None:
    """Tokens at which the curve first reaches ``target`` (linear interpolation between evaluations)."""
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return float(tokens[0])
            t0, t1, l0, l1 = tokens[i - 1], tokens[i], losses[i - 1], losses[i]
            return float(t0 + (t1 - t0) * (l0 - target) / (l0 - l1))
    return None


def token_ratio(base: dict, pc: dict) -> dict:
    """``tokens(baseline reaches its final loss) / tokens(PC reaches it)``; an upper bound if it never does."""
    target = base["final_val_loss"]
    if not (math.isfinite(target) and math.isfinite(pc["final_val_loss"])):
        return {"ratio": None, "bound": None, "target_val_loss": target}
    t_base = tokens_to_reach(base["curve"]["tokens"], base["curve"]["val_loss"], target)
    t_pc = tokens_to_reach(pc["curve"]["tokens"], pc["curve"]["val_loss"], target)
    if t_pc is None:
        # Point estimate from the other side: tokens the baseline needs to reach the PC arm's final loss,
        # over the tokens the PC arm used (< 1 means PC needs more tokens for the same loss).
        t_base_at_pc = tokens_to_reach(
            base["curve"]["tokens"], base["curve"]["val_loss"], pc["final_val_loss"]
        )
        return {
            "ratio": t_base / pc["curve"]["tokens"][-1],
            "bound": "upper",  # the PC arm never reached the target within its tokens
            "target_val_loss": target,
            "tokens_baseline": t_base,
            "tokens_pc": None,
            "ratio_at_pc_final_loss": None
            if t_base_at_pc is None
            else t_base_at_pc / pc["curve"]["tokens"][-1],
        }
    return {
        "ratio": t_base / t_pc if t_pc > 0 else None,
        "bound": None,
        "target_val_loss": target,
        "tokens_baseline": t_base,
        "tokens_pc": t_pc,
    }


# ----------------------------------------------------------------------------------------------------
# Plots (matplotlib imported lazily)
# ----------------------------------------------------------------------------------------------------
_COLORS = {
    "adamw": "tab:blue",
    "adamw_pc": "tab:orange",
    "muon": "tab:green",
    "muon_pc": "tab:red",
    "adamw_spectra": "tab:purple",
    "adamw_pc_spectra": "tab:brown",
    "muon_spectra": "tab:olive",
}


def plot(summary: dict, runs: dict[str, dict], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[token_efficiency] matplotlib is not installed: no plots (pip install matplotlib)", flush=True)
        return []
    files = []
    opts = [o for o in ("adamw", "muon") if any(a.startswith(o) for a in runs)]
    title = Path(summary["data"]["path"]).name

    fig, axes = plt.subplots(1, len(opts), figsize=(6 * len(opts), 4.2), squeeze=False)
    for ax, o in zip(axes[0], opts):
        for arm in (o, f"{o}_pc"):
            if arm not in runs:
                continue
            r = runs[arm]
            c = r["curve"]
            ax.plot(
                [t / 1e6 for t in c["tokens"]],
                c["val_loss"],
                "-o",
                ms=2.5,
                color=_COLORS[arm],
                label=f"{arm} (lr {r['lr']:g}): {r['final_val_loss']:.3f}",
            )
        if o in runs:
            ax.axhline(runs[o]["final_val_loss"], color="gray", lw=0.8, ls="--")
        ratio = summary["arms"].get(f"{o}_pc", {}).get("token_ratio", {})
        if ratio and ratio.get("ratio") is not None:
            text = f"{'< ' if ratio['bound'] else ''}{ratio['ratio']:.2f}"
            if ratio.get("ratio_at_pc_final_loss") is not None:
                text += f" (point estimate {ratio['ratio_at_pc_final_loss']:.2f})"
            ax.set_title(f"{title}, {o}: token ratio {text}", fontsize=9)
        else:
            ax.set_title(f"{title}, {o}", fontsize=10)
        finals = [runs[a]["final_val_loss"] for a in (o, f"{o}_pc") if a in runs]
        first_evals = [runs[a]["curve"]["val_loss"][1] for a in (o, f"{o}_pc") if a in runs]
        if finals and all(map(math.isfinite, finals + first_evals)):
            ax.set_ylim(min(finals) - 0.1, max(first_evals) + 0.1)
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(str(out / "val_loss.png"))
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for arm, r in runs.items():
        c = r["curve"]
        ax.plot([t / 1e6 for t in c["tokens"]], c["gmcn"], "-", color=_COLORS[arm], label=arm)
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("GMCN (attention + FFN matrices)")
    ax.set_title(f"{title}: GMCN over training (W_eff for PC weights)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(str(out / "gmcn.png"))
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    with_spectra = [r for r in runs.values() if r["spectra"]]
    if with_spectra:
        names = list(with_spectra[0]["spectra"])
        fig, axes = plt.subplots(
            len(opts), len(names), figsize=(4.5 * len(names), 3.4 * len(opts)), squeeze=False
        )
        for i, o in enumerate(opts):
            for j, name in enumerate(names):
                ax = axes[i][j]
                for arm in (o, f"{o}_pc"):
                    if arm not in runs or name not in runs[arm]["spectra"]:
                        continue
                    sp = runs[arm]["spectra"][name]
                    for kind, ls in (("effective", "-"), ("raw", ":")):
                        if kind not in sp:
                            continue
                        s = torch.tensor(sp[kind])
                        label = {
                            "raw": f"{arm} raw W",
                            "effective": f"{arm} W_eff" if arm.endswith("_pc") else f"{arm} W",
                        }[kind]
                        ax.plot((s / s[0]).tolist(), ls, color=_COLORS[arm], label=label)
                ax.set_yscale("log")
                ax.set_title(f"{o}: {name}", fontsize=9)
                ax.set_xlabel("index")
                ax.set_ylabel("sigma_i / sigma_1")
                ax.grid(alpha=0.3, which="both")
                ax.legend(fontsize=7)
        fig.tight_layout()
        files.append(str(out / "spectra.png"))
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
    return files


# ----------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args, out)
    print(
        f"[token_efficiency] {args.data}: {data['stats']['train_tokens']:,} training tokens, "
        f"{data['stats']['val_tokens_used']:,} validation tokens; {args.steps} steps x "
        f"{args.batch_size * args.seq_len} tokens",
        flush=True,
    )

    runs: dict[str, dict] = {}
    sweeps: dict[str, list[dict]] = {}
    lrs = {"adamw": args.lr_adamw, "muon": args.lr_muon}
    for o, grid in (("adamw", args.sweep_adamw), ("muon", args.sweep_muon)):
        if not grid or not any(a.startswith(o) for a in args.arms):
            continue
        results = [get_run(args, o, lr, data, out) for lr in grid]
        sweeps[o] = [{"lr": r["lr"], "final_val_loss": r["final_val_loss"]} for r in results]
        finite = [r for r in results if math.isfinite(r["final_val_loss"])]
        if not finite:
            raise RuntimeError(f"every lr of the {o} sweep {grid} diverged; try smaller learning rates.")
        best = min(finite, key=lambda r: r["final_val_loss"])
        lrs[o] = best["lr"]
        if o in args.arms:
            runs[o] = best
    for arm in args.arms:
        if arm not in runs:
            runs[arm] = get_run(args, arm, lrs[split_arm(arm)[0]], data, out)

    summary = {
        "data": {"path": data_id(args.data), **data["stats"], "tokenizer": data["tokenizer_source"]},
        "model": {
            "definition": "torchtitan.models.llama3.Llama3Model (Llama-2 style: MHA, untied, RoPE 10000), causal SDPA",
            **asdict(model_size(args)),
            "vocab_size": data["vocab_size"],
            "params": next(iter(runs.values()))["params"],
        },
        "recipe": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "tokens_per_step": args.batch_size * args.seq_len,
            "warmup": "1% of steps",
            "schedule": "cosine to 10% of peak",
            "clip": 1.0,
            "weight_decay": 0.1,
            "adamw_betas": [0.9, 0.95],
            "muon": "momentum 0.95 Nesterov, 5 NS steps, adjust_lr_fn=match_rms_adamw; embeddings/head/norms/gamma to AdamW at the same lr",
            "pc_degree": dict(C.PC_DEGREE),
            "dtype": args.dtype,
            "seed": args.seed,
            "eval_every": eval_every(args),
        },
        "lr": lrs,
        "lr_sweep": sweeps,
        "machine": C.machine_info(),
        "command": "python -m benchmarks.token_efficiency "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "arms": {},
    }
    for arm, r in runs.items():
        entry = {
            k: r[k]
            for k in (
                "lr",
                "final_val_loss",
                "tokens_seen",
                "gmcn_start",
                "gmcn_end",
                "wall_s",
                "s_per_step",
                "diverged",
                "optimizer_impl",
            )
        }
        base = runs.get(arm.removesuffix("_pc"))
        if arm.endswith("_pc"):
            entry["pc_degree"] = r["pc_degree"]
            entry["token_ratio"] = token_ratio(base, r) if base else None
        if arm.endswith("_spectra"):  # against the same arm without the clip
            base = runs.get(arm.removesuffix("_spectra"))
            entry["spectra_c"] = r["spectra_c"]
            entry["token_ratio"] = token_ratio(base, r) if base else None
        summary["arms"][arm] = entry
    summary["curves"] = {arm: r["curve"] for arm, r in runs.items()}
    summary["spectra"] = {arm: r["spectra"] for arm, r in runs.items()}
    if not args.no_plots:
        summary["plots"] = plot(summary, runs, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    for arm, e in summary["arms"].items():
        ratio = e.get("token_ratio") or {}
        extra = ""
        if ratio.get("ratio") is not None:
            extra = f", token ratio {'< ' if ratio['bound'] else ''}{ratio['ratio']:.3f}"
            if ratio.get("ratio_at_pc_final_loss") is not None:
                extra += f" (baseline reaches the PC arm's final loss at {ratio['ratio_at_pc_final_loss']:.3f}x its tokens)"
        print(
            f"[token_efficiency] {arm:9s} lr {e['lr']:<8g} val {e['final_val_loss']:.4f}  "
            f"GMCN {e['gmcn_start']:.2f} -> {e['gmcn_end']:.2f}{extra}",
            flush=True,
        )
    print(f"[token_efficiency] wrote {out / 'summary.json'}", flush=True)
    return summary


if __name__ == "__main__":
    main()
