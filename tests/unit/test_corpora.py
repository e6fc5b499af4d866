"""benchmarks.corpora: the corpus builders (on small stand-ins for the Debian packages) and --data loading."""

from __future__ import annotations

import json
import sys
import types

import pytest

from benchmarks import corpora


def test_jsonl_corpus(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "text": "first doc"}\n\n{"id": "b", "text": ""}\n{"text": "second"}\n')
    assert corpora.load_texts(path) == ["first doc", "second"]  # blank lines and empty texts skipped


def test_txt_corpus_splits_on_blank_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("one line\nsame doc\n\n\n  \nsecond doc\n\nthird\n")
    assert corpora.load_texts(path) == ["one line\nsame doc", "second doc", "third"]


@pytest.mark.parametrize(
    "content,message",
    [
        (
            '{"body": "x"}\n{"body": "y"}\n',
            r"c\.jsonl:1 has no field 'text' \(got: \['body'\]\).*--text-field",
        ),
        ("not json\n", r"c\.jsonl:1 is not JSON"),
        ('{"text": "only one"}\n', r"holds 1 non-empty documents; need at least 2"),
    ],
)
def test_bad_jsonl_is_explained(tmp_path, content, message):
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        corpora.load_texts(path)


def test_missing_file_names_the_builder(tmp_path):
    with pytest.raises(ValueError, match=r"no file at .*kjv\.jsonl.*python -m benchmarks\.corpora kjv "):
        corpora.load_texts(tmp_path / "kjv.jsonl")
    with pytest.raises(ValueError, match=r"no file at .*other\.txt.*a \.jsonl file"):
        corpora.load_texts(tmp_path / "other.txt")


def test_unknown_suffix_is_refused(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unknown file kind '\.csv'.*Expected a \.jsonl file"):
        corpora.load_texts(path)


def test_dataset_name_goes_to_hugging_face(monkeypatch):
    calls = []

    def load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return _FakeDataset()

    class _FakeDataset:
        column_names = ["text", "meta"]

        def __getitem__(self, key):
            return {"text": ["a", "", "b"]}[key]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert corpora.load_texts("someone/tiny:en") == ["a", "b"]
    assert corpora.load_texts("tiny") == ["a", "b"]
    assert calls == [("someone/tiny", "en", "train"), ("tiny", None, "train")]
    with pytest.raises(ValueError, match=r"dataset 'tiny' has no column 'body'"):
        corpora.load_texts("tiny", field="body")


BIBLE_OUTPUT = """\
Ge1:1 In the beginning God created the heaven and the earth.
Ge1:2 And the earth was without form, and void.
Ge2:1 Thus the heavens and the earth were finished.
Ex1:1 Now these are the names.

Le1:1 And the LORD called unto Moses.
"""


def test_kjv_groups_verses_by_chapter_and_names_books_in_order():
    docs = list(corpora.kjv_documents(BIBLE_OUTPUT.splitlines()))
    assert docs == [
        {
            "id": "Genesis 1",
            "text": "In the beginning God created the heaven and the earth. And the earth was without form, "
            "and void.",
        },
        {"id": "Genesis 2", "text": "Thus the heavens and the earth were finished."},
        {"id": "Exodus 1", "text": "Now these are the names."},
        {"id": "Leviticus 1", "text": "And the LORD called unto Moses."},
    ]
    # Books whose abbreviation starts with a digit ("1Sa") are matched too.
    assert list(corpora.kjv_documents(["1Sa3:4 That the LORD called Samuel."])) == [
        {"id": "Genesis 3", "text": "That the LORD called Samuel."}
    ]
    assert len(corpora.KJV_BOOKS) == 66 and corpora.KJV_BOOKS[-1] == "Revelation"


def test_kjv_rejects_unexpected_output():
    with pytest.raises(ValueError, match=r"line 1 is not 'BookC:V text'"):
        list(corpora.kjv_documents(["Usage: bible [options]"]))


def test_python_docs_reads_rst_sources_sorted(tmp_path):
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "os.rst.txt").write_text("\n:mod:`os`\n=========\n\nText.\n\n")
    (tmp_path / "about.rst.txt").write_text("About\n")
    (tmp_path / "library" / "skip.html").write_text("<p>no</p>")
    docs = list(corpora.python_docs_documents(tmp_path))
    assert docs == [
        {"id": "about", "text": "About"},
        {"id": "library/os", "text": ":mod:`os`\n=========\n\nText."},
    ]


def test_builder_names_the_missing_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpora.shutil, "which", lambda name: None)
    out = tmp_path / "kjv.jsonl"
    assert corpora.main(["kjv", str(out)]) == 2
    assert "apt-get install -y bible-kjv-text" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.setattr(corpora, "PYTHON_DOCS_SOURCES", tmp_path / "nothing")
    assert corpora.main(["python-docs", str(tmp_path / "pd.jsonl")]) == 2
    assert "apt-get install -y python3.11-doc" in capsys.readouterr().err


def test_builder_writes_jsonl_that_load_texts_reads(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("b", "a"):
        (src / f"{name}.rst.txt").write_text(f"doc {name} \u00e9\n")
    monkeypatch.setattr(corpora, "PYTHON_DOCS_SOURCES", src)
    out = tmp_path / "out" / "pd.jsonl"
    assert corpora.main(["python-docs", str(out)]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a", "b"]
    assert "\u00e9" in lines[0]  # UTF-8 as is, not \\u escapes
    assert corpora.load_texts(out) == ["doc a \u00e9", "doc b \u00e9"]
