"""BM25 across shards scores as one unsharded index: the index keeps the corpus's document
frequencies and average length, every search carries them (``IndexQuery.bm25``), and every
write keeps them current.  Checked against a single ``bm25s`` index over all the chunks
(Lucene variant, the same tokenizer): the same scores to 1e-5 and the same order, for 1 to 4
shards, after adds, replacements and removals (each shard's BM25 index updated in place, not
rebuilt), and after a reload from disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dask_rag.config import IndexSpec
from dask_rag.index import DistributedIndex
from dask_rag.index.merge import merge_results

DATASET = Path(__file__).resolve().parent.parent / "benchmarks" / "datasets" / "debian-faq"
QUERIES = ["package manager dependencies", "install kernel upgrade", "mirror archive",
           "debian release stable testing", "how do I compile a program from source",
           "free software license", "bug report", "dpkg apt-get", "zzzz unknownword"]
K = 15


def _texts(n: int) -> list[str]:
    lines = (DATASET / "corpus.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines[:n]]


def _reference(texts: dict[int, str], queries: list[str], k: int
               ) -> tuple[list[list[int]], np.ndarray, dict[int, int]]:
    """bm25s over every live chunk: each query's scores over all of them (by position), the
    positions' ids, and id -> position."""
    import bm25s

    ids = sorted(texts)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([texts[i] for i in ids], stopwords="en",
                                   show_progress=False), show_progress=False)
    scores = []
    for terms in bm25s.tokenize(queries, stopwords="en", return_ids=False,
                                show_progress=False):
        terms = list(terms)
        scores.append(np.asarray(retriever.get_scores(terms), np.float64) if terms
                      else np.zeros(len(ids)))
    return ids, np.asarray(scores), {i: p for p, i in enumerate(ids)}


def _bm25(index: DistributedIndex, queries: list[str], k: int):
    query = index.query(k=k, texts=queries, sparse_k=k, dense=False)
    parts = index.client.gather(index.submit_search(query, None))
    sparse = merge_results(len(queries), k, index.metric, parts).sparse
    return sparse.I, sparse.S


def _check(index: DistributedIndex, texts: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
    I, S = _bm25(index, QUERIES, K)
    ids, ref, pos = _reference(texts, QUERIES, K)
    for q in range(len(QUERIES)):
        positive = int((ref[q] > 0).sum())
        got = [i for i in I[q].tolist() if i >= 0]
        assert len(got) == min(K, positive), QUERIES[q]
        for cid, score in zip(got, S[q][:len(got)].tolist(), strict=True):
            assert abs(score - ref[q][pos[cid]]) <= 1e-5, (QUERIES[q], cid)
        # the same order: by bm25s's score (ties, to 1e-5, by id), and nothing better left out
        expect = sorted(range(len(ids)), key=lambda p: (-round(ref[q][p], 5), ids[p]))
        assert got == [ids[p] for p in expect[:len(got)]], QUERIES[q]
    return I, S


@pytest.mark.parametrize(("n_shards", "factory"),
                         [(1, "Flat"), (2, "Flat"), (3, "Flat"), (4, "Flat"),
                          (2, "HNSW16")])  # (HNSW: removals are tombstones)
def test_sharded_bm25_scores_like_one_index(client, tmp_path, n_shards, factory):
    texts = _texts(120)
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((len(texts), 8)).astype(np.float32)
    ids = np.arange(len(texts), dtype=np.int64) * 3 + 5
    spec = IndexSpec(factory=factory, n_shards=n_shards, sharding="hash")
    live = dict(zip(ids.tolist(), texts, strict=True))
    path = tmp_path / "idx"
    with DistributedIndex.build(client, xb, ids, spec, path=path,
                                records=[{"text": t, "source": str(i)}
                                         for i, t in zip(ids.tolist(), texts, strict=True)]
                                ) as index:
        first = _check(index, live)
        stats = index.bm25_stats
        assert stats is not None and stats.n_docs == len(texts)
        # writes: new chunks, a replacement (upsert) and removals move the statistics
        more = _texts(160)[120:]
        new_ids = np.arange(1000, 1000 + len(more), dtype=np.int64)
        index.add(rng.standard_normal((len(more), 8)).astype(np.float32), new_ids,
                  [{"text": t} for t in more])
        live.update(zip(new_ids.tolist(), more, strict=True))
        index.add(rng.standard_normal((1, 8)).astype(np.float32), ids[:1],
                  [{"text": "apt-get dpkg mirror mirror kernel"}], replace=ids[:1])
        live[int(ids[0])] = "apt-get dpkg mirror mirror kernel"
        index.remove(ids[1:30])
        for i in ids[1:30].tolist():
            live.pop(i)
        after = _check(index, live)
        assert index.bm25_stats.n_docs == len(live)
        assert not np.array_equal(first[1], after[1])  # the writes changed the scores
        index.save()
    with DistributedIndex.load(client, path) as index:
        reloaded = _bm25(index, QUERIES, K)
        np.testing.assert_array_equal(reloaded[0], after[0])
        np.testing.assert_array_equal(reloaded[1], after[1])


def test_a_bm25_index_changed_in_place_scores_like_one_built_afresh():
    """``SparseIndex.changed`` (what a write does to a shard's BM25 index) gives the same
    hits and the same score bits as building the index again over the chunks left, through
    a series of additions, replacements and removals."""
    from dask_rag.index.sparse import SparseIndex

    pool = _texts(200)
    rng = np.random.default_rng(3)
    live = {int(i): pool[i] for i in range(60)}
    index = SparseIndex.build(np.array(sorted(live), np.int64), [live[i] for i in sorted(live)])
    for step in range(12):
        gone = rng.choice(sorted(live), size=int(rng.integers(0, 8)), replace=False)
        for i in gone.tolist():
            live.pop(i)
        new_ids = rng.choice(np.arange(1000), size=int(rng.integers(0, 10)), replace=False)
        new_ids = np.array([i for i in new_ids.tolist() if i not in live] + list(
            sorted(live)[:1] if step % 3 == 0 else []), np.int64)  # and now and then a replacement
        texts = [pool[int(rng.integers(0, len(pool)))] if j % 5 else None
                 for j in range(len(new_ids))]  # some chunks have no text
        index = index.changed(np.concatenate([gone, new_ids]).astype(np.int64), new_ids, texts)
        for i, t in zip(new_ids.tolist(), texts, strict=True):
            if t:
                live[i] = t
            else:
                live.pop(i, None)
        fresh = SparseIndex.build(np.array(sorted(live), np.int64),
                                  [live[i] for i in sorted(live)])
        got = index.search(QUERIES, K)
        want = fresh.search(QUERIES, K)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert index.stats().n_docs == fresh.stats().n_docs == len(live)
        assert index.stats().df == fresh.stats().df
