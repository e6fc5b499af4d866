"""Build the two text corpora of the benchmarks from Debian packages, and load any corpus for ``--data``.

    python -m benchmarks.corpora kjv outputs/corpora/kjv.jsonl
    python -m benchmarks.corpora python-docs outputs/corpora/python-docs.jsonl

Both write JSON lines, one document per line: ``{"id": ..., "text": ...}``.

* ``kjv``: the King James Bible from ``bible-kjv-text`` (read with the ``bible`` program of ``bible-kjv``,
  which ``bible-kjv-text`` pulls in). One document per chapter (1,189), verses joined by single spaces, ids
  like ``"Genesis 1"``. Public domain text.
* ``python-docs``: the reStructuredText sources (``*.rst.txt``) of the Python 3.11 manual from
  ``python3.11-doc``, one document per file (497), sorted by path, text as is (markup included; leading and
  trailing blank lines stripped), ids like ``"library/os"``. PSF License. The manual changes a little between
  Debian revisions of the package: ``3.11.2-6+deb12u8`` and ``+deb12u9`` differ in 4 of the 497 documents.

When a package is missing, the builder says which one to install (``apt-get install -y PACKAGE``).

:func:`load_texts` is what ``--data`` of the benchmarks reads: a ``.jsonl`` file (field ``text``), a ``.txt``
file (documents separated by blank lines), or a Hugging Face dataset name (``NAME`` or ``NAME:CONFIG``,
split ``train``, column ``text``; needs the ``data`` extra).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

# The 66 books in the order `bible -f` prints them; the document ids use these names.
KJV_BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1 Samuel",
    "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
    "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel",
    "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai",
    "Zechariah", "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
    "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians",
    "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter",
    "1 John", "2 John", "3 John", "Jude", "Revelation",
)  # fmt: skip
KJV_RANGE = "gen1:1-rev22:21"
PYTHON_DOCS_PACKAGE = "python3.11-doc"
PYTHON_DOCS_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")

# "Ge1:1 In the beginning ...": a book abbreviation (may start with a digit: "1Sa"), chapter:verse, the text.
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")


class MissingPackage(RuntimeError):
    """A Debian package the builder reads from is not installed."""


def _need(package: str, what: str) -> MissingPackage:
    return MissingPackage(
        f"{what} not found: install the Debian package with `apt-get install -y {package}` "
        f"(as root, after `apt-get update`), then run this command again."
    )


def kjv_documents(verse_lines: Iterable[str]) -> Iterator[dict[str, str]]:
    """Group ``bible -f`` output (one verse per line, with its reference) into one document per chapter.

    A book ends where the abbreviation changes; books are named from :data:`KJV_BOOKS` in order.
    """
    book_index, abbrev, chapter, verses = -1, None, None, []
    for n, line in enumerate(verse_lines, 1):
        line = line.strip()
        if not line:
            continue
        m = _VERSE.match(line)
        if m is None:
            raise ValueError(f"bible output line {n} is not 'BookC:V text': {line[:80]!r}")
        ab, ch, text = m.group(1), int(m.group(2)), m.group(4).strip()
        if (ab, ch) != (abbrev, chapter):
            if verses:
                yield {"id": f"{KJV_BOOKS[book_index]} {chapter}", "text": " ".join(verses)}
            if ab != abbrev:
                book_index += 1
                if book_index >= len(KJV_BOOKS):
                    raise ValueError(
                        f"line {n}: more than {len(KJV_BOOKS)} books in the bible output ({ab!r})"
                    )
            abbrev, chapter, verses = ab, ch, []
        verses.append(text)
    if verses:
        yield {"id": f"{KJV_BOOKS[book_index]} {chapter}", "text": " ".join(verses)}


def build_kjv() -> Iterator[dict[str, str]]:
    exe = shutil.which("bible")
    if exe is None:
        raise _need("bible-kjv-text", "the `bible` program (package bible-kjv, pulled in by bible-kjv-text)")
    proc = subprocess.run(
        [exe, "-f", KJV_RANGE], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise _need(
            "bible-kjv-text", f"the KJV text (`bible -f {KJV_RANGE}` said: {proc.stderr.strip()[:200]!r})"
        )
    return kjv_documents(proc.stdout.splitlines())


def python_docs_documents(sources: Path) -> Iterator[dict[str, str]]:
    """Every ``*.rst.txt`` under ``sources``, sorted by path; id: the relative path without ``.rst.txt``."""
    files = sorted(p for p in sources.rglob("*.rst.txt") if p.is_file())
    if not files:
        raise _need(PYTHON_DOCS_PACKAGE, f"reST sources (*.rst.txt) under {sources}")
    for p in files:
        rel = p.relative_to(sources).as_posix()
        yield {"id": rel[: -len(".rst.txt")], "text": p.read_text(encoding="utf-8").strip()}


def build_python_docs(sources: Path | None = None) -> Iterator[dict[str, str]]:
    return python_docs_documents(sources or PYTHON_DOCS_SOURCES)


BUILDERS = {"kjv": build_kjv, "python-docs": build_python_docs}


def write_jsonl(docs: Iterable[dict[str, str]], out: Path) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(out)
    return n


# ----------------------------------------------------------------------------------------------------
# Loading a corpus for --data
# ----------------------------------------------------------------------------------------------------
def _read_jsonl(path: Path, field: str) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{i} is not JSON ({e.msg}). A .jsonl corpus holds one JSON object per line."
                ) from None
            if not isinstance(rec, dict) or field not in rec:
                fields = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                raise ValueError(
                    f"{path}:{i} has no field {field!r} (got: {fields}). Pass a JSON-lines file whose records "
                    f"carry the text in {field!r}, or choose the field with --text-field."
                )
            if rec[field]:
                texts.append(rec[field])
    return texts


def _read_txt(path: Path) -> list[str]:
    """Documents separated by one or more blank lines."""
    text = path.read_text(encoding="utf-8")
    return [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]


def _read_hf(name: str, field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"--data {name!r} is neither a file nor a directory here, so it is read as a Hugging Face dataset "
            "name, which needs the `datasets` package: `pip install -e .[data]`. For a local corpus pass the "
            "path of a .jsonl or .txt file."
        ) from None
    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split="train")
    except Exception as e:  # the hub's errors vary (offline, not found, gated)
        raise ValueError(
            f"--data {name!r}: no such local file, and loading it as a Hugging Face dataset failed: "
            f"{type(e).__name__}: {str(e)[:300]}. Pass a .jsonl/.txt path, or a dataset name such as "
            "'NAME' or 'NAME:CONFIG' with a 'text' column (online, or cached with HF_DATASETS_OFFLINE=1)."
        ) from None
    if field not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no column {field!r} (columns: {ds.column_names}).")
    return [t for t in ds[field] if t]


def looks_like_a_path(spec: str | Path) -> bool:
    """A ``--data`` value names a local file (rather than a Hugging Face dataset) by its suffix or prefix."""
    s = str(spec)
    return Path(s).suffix.lower() in (".jsonl", ".json", ".txt") or s.startswith((".", "/", "~"))


def how_to_get(spec: str | Path) -> str:
    """What to run to make the corpus at ``spec``: its builder for kjv/python-docs, else the accepted kinds."""
    stem = Path(str(spec)).stem
    if stem in BUILDERS:
        return f"build it with `python -m benchmarks.corpora {stem} {spec}` (from the Debian package; see docs/results.md)"
    return (
        "pass a .jsonl file (one JSON object per line with a 'text' field), a .txt file (documents separated by "
        "blank lines), or a Hugging Face dataset name; `python -m benchmarks.corpora kjv outputs/corpora/kjv.jsonl` "
        "builds the KJV corpus the docs use"
    )


def data_id(spec: str | Path) -> str:
    """How a run records its corpus: the absolute path of a local file, else the dataset name as given."""
    import os

    return os.path.abspath(spec) if Path(spec).is_file() or looks_like_a_path(spec) else str(spec)


def load_texts(spec: str | Path, field: str = "text") -> list[str]:
    """The documents of a corpus: a ``.jsonl``/``.json`` file, a ``.txt`` file, or a Hugging Face dataset name."""
    path = Path(spec)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            texts = _read_jsonl(path, field)
        elif suffix == ".txt":
            texts = _read_txt(path)
        else:
            raise ValueError(
                f"--data {str(spec)!r}: unknown file kind {suffix!r}. Expected a .jsonl file (one JSON object "
                "per line with a 'text' field) or a .txt file (documents separated by blank lines)."
            )
    elif looks_like_a_path(spec):
        raise ValueError(f"--data: no file at {str(spec)!r}; {how_to_get(spec)}.")
    else:
        texts = _read_hf(str(spec), field)
    if len(texts) < 2:
        raise ValueError(
            f"{spec} holds {len(texts)} non-empty documents; need at least 2 (train + validation)."
        )
    return texts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.corpora",
        description="Build a benchmark corpus (JSON lines) from its Debian package.",
    )
    p.add_argument(
        "corpus",
        choices=sorted(BUILDERS),
        help="kjv (package bible-kjv-text) or python-docs (python3.11-doc)",
    )
    p.add_argument("out", type=Path, help="output .jsonl path, e.g. outputs/corpora/kjv.jsonl")
    args = p.parse_args(argv)
    try:
        docs = list(
            BUILDERS[args.corpus]()
        )  # read everything first: a missing package leaves no partial file
    except MissingPackage as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = write_jsonl(docs, args.out)
    print(f"wrote {n} documents to {args.out} ({args.out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
