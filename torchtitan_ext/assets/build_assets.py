"""Regenerate the embedded text sample and tokenizer shipped in ``torchtitan_ext/assets``.

The sample is every third chapter of the King James Bible (public domain), as JSON lines with a
``text`` field; the tokenizer is a byte-level BPE (vocab 2048) trained on that sample with the
``tokenizers`` library. Both are deterministic functions of the input corpus, so rerunning this
script reproduces the committed files byte for byte.

Usage (from the repo root)::

    python -m benchmarks.corpora kjv outputs/corpora/kjv.jsonl   # from the Debian package bible-kjv-text
    python torchtitan_ext/assets/build_assets.py outputs/corpora/kjv.jsonl

The input is JSON lines with a ``text`` field, one chapter per line (the project's KJV corpus).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ASSETS = Path(__file__).resolve().parent
SAMPLE_DIR = ASSETS / "kjv_sample"
TOKENIZER_DIR = ASSETS / "tokenizer"
VOCAB_SIZE = 2048
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
EVERY_NTH_CHAPTER = 3


def build_sample(corpus: Path) -> list[str]:
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines() if line]
    texts = texts[::EVERY_NTH_CHAPTER]
    SAMPLE_DIR.mkdir(parents=True, exist_ok=True)
    with open(SAMPLE_DIR / "train.jsonl", "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return texts


def build_tokenizer(texts: list[str]) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
    tok.save(str(TOKENIZER_DIR / "tokenizer.json"))
    config = {
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "add_eos_token": True,
        "model_max_length": 1_000_000,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (TOKENIZER_DIR / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=Path, help="KJV JSON lines, one chapter per line, field 'text'")
    args = parser.parse_args()
    texts = build_sample(args.corpus)
    build_tokenizer(texts)
    size = (SAMPLE_DIR / "train.jsonl").stat().st_size
    print(f"wrote {len(texts)} documents ({size / 1e6:.2f} MB) and a {VOCAB_SIZE}-token BPE to {ASSETS}")


if __name__ == "__main__":
    main()
