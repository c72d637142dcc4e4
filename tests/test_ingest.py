"""Ingestion: incremental updates, bad input leaves the index alone, known-item retrieval."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from dask_rag.config import EmbedConfig
from dask_rag.corpus.chunking import split_sentences
from dask_rag.embed.service import encoder_counters
from dask_rag.errors import InvalidInput, ModelLoadError
from dask_rag.ingest import ingest
from dask_rag.pipeline import RagPipeline


def _snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _texts_encoded(client) -> int:
    return encoder_counters(client, EmbedConfig())[1]


@pytest.fixture()
def corpus_dir(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "cats.md").write_text("# Cats\n\nCats are small domesticated carnivorous mammals. "
                               "They purr when content.\n")
    (d / "dogs.txt").write_text("Dogs are loyal companions that bark at strangers.\n")
    (d / "sub").mkdir()
    (d / "sub" / "fish.rst").write_text("Fish\n====\n\nFish breathe through gills under water.")
    (d / "notes.jsonl").write_text(
        json.dumps({"id": "n1", "text": "Parrots can imitate human speech.",
                    "metadata": {"lang": "en"}}) + "\n" +
        json.dumps({"id": "n2", "text": "Les escargots sont lents.",
                    "metadata": {"lang": "fr"}}) + "\n")
    return d


def test_ingest_twice_then_edit_and_delete(client, corpus_dir, tmp_path):
    index = tmp_path / "idx"
    first = ingest(client, [corpus_dir], index, progress=False)
    assert first.built and first.documents == 5 and first.chunks_total == 5
    before = _texts_encoded(client)
    second = ingest(client, [corpus_dir], index, progress=False)
    assert second.chunks_embedded == 0 and second.unchanged_documents == 5
    assert _texts_encoded(client) == before  # nothing went through the encoder
    (corpus_dir / "dogs.txt").write_text("Dogs are loyal companions. Wolves howl at the moon.\n")
    (corpus_dir / "sub" / "fish.rst").unlink()
    third = ingest(client, [corpus_dir], index, progress=False)
    assert (third.changed_documents, third.deleted_documents, third.new_documents) == (1, 1, 0)
    assert third.chunks_embedded == 1 and third.chunks_removed == 2
    assert _texts_encoded(client) == before + 1
    with RagPipeline.from_index_dir(client, index) as pipe:
        assert pipe.index.ntotal == 4
        hits = pipe.search("which animal howls at the moon?", k=2, mode="dense")
        assert "Wolves" in hits[0].text
        assert all("gills" not in h.text for h in pipe.search("gills under water", k=4))


def test_bad_input_leaves_existing_index_unchanged(client, corpus_dir, tmp_path):
    """Unreadable files are reported and skipped (the rest is ingested, here: nothing new);
    other bad input fails the run before anything is written."""
    index = tmp_path / "idx"
    ingest(client, [corpus_dir], index, progress=False)
    snap = _snapshot(index)
    (corpus_dir / "bad.jsonl").write_text('{"text": "fine"}\nnot json at all\n')
    (corpus_dir / "blob.txt").write_bytes(b"\x89PNG\x00\x00binary")
    # unreadable (a dangling link; chmod 000 would not stop root)
    (corpus_dir / "gone.txt").symlink_to(corpus_dir / "nowhere.txt")
    report = ingest(client, [corpus_dir], index, progress=False)
    reasons = dict(report.skipped)
    assert [Path(n).name for n in reasons] == ["bad.jsonl", "blob.txt", "gone.txt"]
    assert re.search(r"bad.jsonl:2: invalid JSON", reasons[str(corpus_dir / "bad.jsonl")])
    assert "binary" in reasons[str(corpus_dir / "blob.txt")]
    assert "cannot read" in reasons[str(corpus_dir / "gone.txt")]
    assert report.chunks_embedded == 0 and report.deleted_documents == 0
    assert _snapshot(index) == snap
    for name in ("bad.jsonl", "blob.txt", "gone.txt"):
        (corpus_dir / name).unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInput, match="no supported files"):
        ingest(client, [empty], index, progress=False)
    with pytest.raises(ModelLoadError, match="does not exist"):
        ingest(client, [corpus_dir], index, embed=EmbedConfig(model=str(tmp_path / "nomodel")),
               progress=False)
    assert _snapshot(index) == snap


def test_known_item_retrieval_on_demo_corpus(client, demo_docs, demo_index):
    """For 200 docstrings with a unique first sentence, that sentence finds its object in the
    top 5 for >= 90% of them."""
    firsts: dict[str, list[str]] = {}
    for d in demo_docs:
        body = d.text.split("\n\n", 1)[-1]
        sents = split_sentences(" ".join(body.split()))
        if sents and len(sents[0].split()) >= 6:
            firsts.setdefault(sents[0], []).append(d.source)
    unique = sorted((s, src[0]) for s, src in firsts.items() if len(src) == 1)
    step = max(1, len(unique) // 200)
    sample = unique[::step][:200]
    assert len(sample) == 200
    with RagPipeline.from_index_dir(client, demo_index) as pipe:
        found = 0
        for i in range(0, len(sample), 50):
            batch = sample[i:i + 50]
            hits = pipe.search_many([q for q, _ in batch], k=5)
            found += sum(src in {h.source for h in hs} for (_, src), hs in zip(batch, hits,
                                                                                strict=True))
    assert found / len(sample) >= 0.90, f"known-item top-5 hit rate {found / len(sample):.3f}"


def test_chunk_ids_are_stable_across_runs(client, corpus_dir, tmp_path):
    a = ingest(client, [corpus_dir], tmp_path / "a", progress=False)
    b = ingest(client, [corpus_dir], tmp_path / "b", progress=False)
    assert a.chunks_total == b.chunks_total
    ids = []
    for p in (tmp_path / "a", tmp_path / "b"):
        with RagPipeline.from_index_dir(client, p) as pipe:
            ids.append(sorted(i for i, _, _ in pipe.index.doc_index()))
    assert ids[0] == ids[1]
    assert all(re.fullmatch(r"\d+", str(i)) for i in ids[0])
