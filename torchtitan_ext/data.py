"""Datasets for torchtitan's ``HuggingFaceTextDataLoader``, registered in its ``DATASETS`` table.

* ``kjv_sample`` - the embedded default: a public-domain English sample shipped in
  ``torchtitan_ext/assets/kjv_sample`` (works offline). ``--dataloader.dataset_path`` may point
  it at another local folder of JSON-lines/parquet files.
* ``text`` - any local JSON-lines (``.jsonl``/``.json``, optionally ``.gz``) or parquet file or a
  folder of them, or a Hugging Face hub dataset name (streamed; ``name:config`` selects a config,
  e.g. ``HuggingFaceFW/fineweb:sample-350BT``), given with ``--dataloader.dataset_path``. Each
  record's ``text`` field is used.

Both go through ``datasets.load_dataset``, as torchtitan's own ``c4`` entries do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from datasets import load_dataset
from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets.text_datasets import DATASETS

__all__ = ["ASSETS_DIR", "SAMPLE_DATASET", "TOKENIZER_DIR", "load_text_dataset", "register_datasets"]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
SAMPLE_DATASET = ASSETS_DIR / "kjv_sample"
TOKENIZER_DIR = ASSETS_DIR / "tokenizer"

_JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_PARQUET_SUFFIXES = (".parquet",)


def load_text_dataset(path: str):
    """Load ``path`` with ``datasets``: a local file, a local folder, or a hub dataset name.

    A hub name may carry a dataset config after a colon, e.g. ``HuggingFaceFW/fineweb:sample-350BT``.
    """
    if not path:
        raise ValueError(
            "The 'text' dataset needs a path: pass --dataloader.dataset_path with a JSON-lines or parquet "
            "file, a folder of them, or a Hugging Face hub dataset name."
        )
    if os.path.isfile(path):
        if path.endswith(_JSON_SUFFIXES):
            return load_dataset("json", data_files=path, split="train")
        if path.endswith(_PARQUET_SUFFIXES):
            return load_dataset("parquet", data_files=path, split="train")
        raise ValueError(
            f"Unsupported dataset file {path!r}: expected JSON lines ({', '.join(_JSON_SUFFIXES)}) "
            f"or parquet ({', '.join(_PARQUET_SUFFIXES)}). Convert it, or pass a folder of such files."
        )
    if os.path.isdir(path):
        return load_dataset(path, split="train")
    if path.startswith((".", "/", "~")):
        raise ValueError(f"Dataset path {path!r} does not exist. Pass an existing file or folder.")
    # A hub name: stream it, as torchtitan does for c4.
    name, _, config = path.partition(":")
    return load_dataset(name, config or None, split="train", streaming=True)


def _text_field(sample: dict[str, Any]) -> str:
    try:
        return sample["text"]
    except KeyError:
        raise RuntimeError(
            f"Dataset record has no 'text' field (fields: {sorted(sample)}). "
            "torchtitan_ext's text datasets read the 'text' field of each record."
        ) from None


def register_datasets() -> None:
    """Add ``kjv_sample`` and ``text`` to torchtitan's dataset table (idempotent)."""
    DATASETS.setdefault(
        "kjv_sample",
        DatasetConfig(path=str(SAMPLE_DATASET), loader=load_text_dataset, sample_processor=_text_field),
    )
    DATASETS.setdefault(
        "text",
        DatasetConfig(path="", loader=load_text_dataset, sample_processor=_text_field),
    )
