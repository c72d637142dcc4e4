"""Loaders (bad input named precisely), demo corpus, token chunking."""

from __future__ import annotations

import itertools
import json
import os

import pytest

from dask_rag.config import ChunkConfig
from dask_rag.corpus.chunking import chunk_documents, chunk_id, chunk_text
from dask_rag.corpus.demo import stdlib_documents
from dask_rag.corpus.loaders import Document, discover_files, load_file, load_paths
from dask_rag.errors import InvalidInput


def words(texts):
    """A deterministic stand-in tokenizer count for pure chunking logic: 1 token per word + 2
    special tokens.  (The real encoder tokenizer is exercised in test_embed.py.)"""
    return [len(t.split()) + 2 for t in texts]


def test_loaders_read_each_format(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.md").write_text("# Title\n\nSome *markdown*.")
    (tmp_path / "c.rst").write_text("Heading\n=======\n\nBody.")
    (tmp_path / "d.html").write_text("<html><head><title>T</title><script>x=1</script></head>"
                                     "<body><p>Hello <b>world</b></p><p>Second</p></body></html>")
    (tmp_path / "e.jsonl").write_text(
        json.dumps({"text": "first", "id": "x1", "metadata": {"lang": "en"}}) + "\n\n" +
        json.dumps({"text": "second"}) + "\n")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    docs = {d.source: d for d in load_paths([tmp_path])}
    assert len(docs) == 6
    html = docs[str((tmp_path / "d.html").absolute())]
    assert html.text == "Hello world\n\nSecond" and html.metadata["title"] == "T"
    jl = [d for d in docs.values() if "e.jsonl" in d.source]
    assert {d.text for d in jl} == {"first", "second"}
    assert any(d.source.endswith("#x1") and d.metadata == {"lang": "en"} for d in jl)


def test_doc_hash_changes_with_content():
    a = Document("s", "text")
    assert a.doc_hash == Document("s", "text").doc_hash
    assert a.doc_hash != Document("s", "text!").doc_hash
    assert a.doc_hash != Document("t", "text").doc_hash


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(InvalidInput, match="no such file"):
        discover_files([tmp_path / "missing"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInput, match="no supported files"):
        discover_files([empty])
    binary = tmp_path / "x.txt"
    binary.write_bytes(b"abc\x00def")
    with pytest.raises(InvalidInput, match="x.txt.*binary"):
        load_file(binary)
    latin = tmp_path / "l.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(InvalidInput, match="UTF-8"):
        load_file(latin)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(InvalidInput, match=r"bad.jsonl:2: invalid JSON"):
        load_file(bad)
    missing = tmp_path / "m.jsonl"
    missing.write_text('{"body": "no text field"}\n')
    with pytest.raises(InvalidInput, match=r"m.jsonl:1: missing string field 'text'"):
        load_file(missing)
    with pytest.raises(InvalidInput, match="unsupported file type"):
        discover_files([tmp_path / "bad.jsonl", *[(tmp_path / "y.pptx")]] if
                       (tmp_path / "y.pptx").write_text("x") else [])


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read files without permission")
def test_unreadable_file(tmp_path):
    p = tmp_path / "secret.txt"
    p.write_text("x")
    p.chmod(0)
    with pytest.raises(InvalidInput, match="permission"):
        load_file(p)


def test_demo_corpus_is_stdlib_docstrings():
    docs = stdlib_documents(["json", "functools"])
    sources = {d.source for d in docs}
    assert {"json", "json.dumps", "functools.lru_cache"} <= sources
    d = next(d for d in docs if d.source == "json.dumps")
    assert d.text.startswith("json.dumps\n\n") and "JSON" in d.text
    assert d.metadata["module"] == "json"
    assert stdlib_documents(["json", "functools"]) == docs  # deterministic


def test_chunks_respect_budget_and_overlap():
    para = " ".join(f"Sentence number {i} is here." for i in range(60))
    text = "Intro paragraph.\n\n" + para + "\n\nOutro."
    cfg = ChunkConfig(max_tokens=40, overlap_tokens=10)
    chunks = chunk_text(text, words, cfg)
    assert len(chunks) > 5
    for c in chunks:
        assert words([c])[0] - 2 <= 40
    # consecutive chunks share a sentence (overlap) and together cover every sentence
    assert any(c1.split(". ")[-1] in c2 for c1, c2 in itertools.pairwise(chunks))
    for i in range(60):
        assert any(f"number {i} is" in c for c in chunks)


def test_huge_sentence_is_split_on_words():
    text = " ".join(["word"] * 500)
    chunks = chunk_text(text, words, ChunkConfig(max_tokens=50, overlap_tokens=0))
    assert all(len(c.split()) <= 50 for c in chunks) and sum(len(c.split()) for c in chunks) == 500


def test_chunk_ids_stable_and_unique():
    docs = [Document("a", "Same text.\n\nOther."), Document("b", "Same text.\n\nOther.")]
    c1 = chunk_documents(docs, words, ChunkConfig(max_tokens=8, overlap_tokens=0))
    c2 = chunk_documents(docs, words, ChunkConfig(max_tokens=8, overlap_tokens=0))
    assert [c.id for c in c1] == [c.id for c in c2]
    assert len({c.id for c in c1}) == len(c1)
    assert c1[0].id == chunk_id("a", c1[0].text) and 0 <= c1[0].id < 2**63


def test_unreadable_paths_are_named(tmp_path):
    # works as root too: a directory where a file is expected, a dangling symlink
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(InvalidInput, match=r"dir.txt: cannot read"):
        load_file(tmp_path / "dir.txt")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(InvalidInput, match=r"gone.txt: cannot read"):
        load_file(tmp_path / "gone.txt")
