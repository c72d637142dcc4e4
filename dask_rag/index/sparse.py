"""BM25 per shard (bm25s): built with the shard, persisted beside its faiss file, and searched
*in the same task* as the dense search, so hybrid retrieval costs no extra fan-out.

BM25 statistics (IDF, average length) are per shard, as in Elasticsearch's default
``query_then_fetch``: with hash sharding the shards are random samples of one corpus, so
their statistics agree closely.  Per query, the scores over all of a shard's chunks are
computed on their own and cut with ties broken by id: a query's hits never depend on the
other queries of its batch.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from dask_rag.index.query import ShardResult, SparseHits

if TYPE_CHECKING:  # pragma: no cover
    from dask_rag.index.shard import Shard

__all__ = ["SparseIndex", "merge_sparse", "search_sparse", "top_scores"]


def _tokenize(texts: Sequence[str]) -> Any:
    import bm25s

    return bm25s.tokenize(list(texts), stopwords="en", show_progress=False)


class SparseIndex:
    """BM25 over one shard's chunks (ids in index order)."""

    def __init__(self, retriever: Any, ids: npt.NDArray[np.int64]) -> None:
        self.retriever = retriever
        self.ids = ids

    @classmethod
    def build(cls, ids: npt.NDArray[np.int64], texts: Sequence[str | None]) -> SparseIndex:
        import bm25s

        keep = [i for i, t in enumerate(texts) if t]
        retriever = bm25s.BM25()
        if keep:
            retriever.index(_tokenize([texts[i] or "" for i in keep]), show_progress=False)
        return cls(retriever if keep else None, np.asarray(ids, np.int64)[keep])

    def save(self, directory: Path) -> None:
        """Write atomically: into a temporary sibling directory, then rename."""
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            np.save(tmp / "ids.npy", self.ids)
            if self.retriever is not None:
                self.retriever.save(str(tmp), show_progress=False)
            if directory.exists():
                shutil.rmtree(directory)
            tmp.rename(directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: Path) -> SparseIndex:
        import bm25s

        ids = np.load(directory / "ids.npy", allow_pickle=False)
        retriever = None
        if (directory / "params.index.json").exists():
            retriever = bm25s.BM25.load(str(directory), show_progress=False)
        return cls(retriever, ids.astype(np.int64))

    def search(self, queries: Sequence[str], k: int,
               allowed: npt.NDArray[np.int64] | None = None
               ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Top-``k`` ids and BM25 scores per query (-1 / 0 where fewer match), by score, then
        by id: a query's scores over all chunks are computed on their own (``get_scores``)
        and cut with ties broken by id, so its hits never depend on the other queries of its
        batch, nor on which equal-scoring chunk a partial sort met first."""
        nq = len(queries)
        I = np.full((nq, k), -1, dtype=np.int64)
        S = np.zeros((nq, k), dtype=np.float32)
        if self.retriever is None or nq == 0 or len(self.ids) == 0:
            return I, S
        mask = None
        if allowed is not None:
            mask = np.isin(self.ids, allowed)
            if not mask.any():
                return I, S
        for r, tokens in enumerate(_query_tokens(queries)):
            if not tokens:
                continue
            scores = np.asarray(self.retriever.get_scores(tokens), dtype=np.float32)
            if mask is not None:
                scores = np.where(mask, scores, np.float32(0))
            top = top_scores(scores, self.ids, k)
            I[r, :len(top)] = self.ids[top]
            S[r, :len(top)] = scores[top]
        return I, S


def _query_tokens(queries: Sequence[str]) -> list[list[str]]:
    """Each query's BM25 terms (stop words dropped), tokenized like the chunks."""
    import bm25s

    return [list(t) for t in bm25s.tokenize(list(queries), stopwords="en", return_ids=False,
                                             show_progress=False)]


def top_scores(scores: npt.NDArray[np.float32], ids: npt.NDArray[np.int64], k: int
               ) -> npt.NDArray[np.int64]:
    """Positions of the best ``k`` positive scores, best first, equal scores by ascending id."""
    cand = np.flatnonzero(scores > 0)
    if cand.size > k:
        kth = np.partition(scores[cand], cand.size - k)[cand.size - k]
        cand = cand[scores[cand] >= kth]  # everything tied with the k-th stays in the race
    order = np.lexsort((ids[cand], -scores[cand]))
    return cand[order[:k]]


def search_sparse(shard: Shard, rows: npt.NDArray[np.int64], queries: list[str], k: int,
                  allowed: npt.NDArray[np.int64] | None, with_records: bool = True
                  ) -> SparseHits:
    """BM25 search of one shard for batch rows ``rows`` (runs inside the shard's search task);
    ``allowed``: the ids a filter lets through, or None.  ``with_records=False`` leaves
    ``payload`` empty for the caller to fill (it fetches dense and BM25 hits together)."""
    sparse = shard.sparse_index()
    I, S = sparse.search(queries, k, allowed)
    payload = shard.fetch_rows(I)[0] if with_records else []
    return SparseHits(rows=np.asarray(rows, np.int64), I=I, S=S, payload=payload)


def merge_sparse(nq: int, parts: Sequence[ShardResult]) -> SparseHits:
    """Merge per-shard BM25 hits (rows are batch rows) into per-query top-k by score, ties by
    id; an id met twice keeps its best place.  One ``lexsort`` over all the shards' columns
    (it runs once per batch, in the batch's last task)."""
    hits = [p.sparse for p in parts if p.sparse is not None]
    k = max((sp.I.shape[1] for sp in hits), default=0)
    I = np.full((nq, k), -1, dtype=np.int64)
    S = np.zeros((nq, k), dtype=np.float32)
    payload: list[list[dict[str, Any] | None]] = [[None] * k for _ in range(nq)]
    width = sum(sp.I.shape[1] for sp in hits)
    if not k or not width:
        return SparseHits(rows=np.arange(nq, dtype=np.int64), I=I, S=S, payload=payload)
    I_all = np.full((nq, width), -1, dtype=np.int64)
    S_all = np.zeros((nq, width), dtype=np.float32)
    recs: list[list[dict[str, Any] | None]] = [[None] * width for _ in range(nq)]
    col = 0
    for sp in hits:
        w = sp.I.shape[1]
        I_all[sp.rows, col:col + w] = sp.I
        S_all[sp.rows, col:col + w] = sp.S
        for local, row in enumerate(sp.rows.tolist()):
            row_recs = list(sp.payload[local])[:w] if local < len(sp.payload) else []
            recs[row][col:col + len(row_recs)] = row_recs
        col += w
    # padding sorts last; then score descending, then id ascending
    key = np.where(I_all < 0, np.inf, -S_all.astype(np.float64))
    order = np.lexsort((I_all, key), axis=-1)
    I_sorted = np.take_along_axis(I_all, order, axis=1)
    for r in range(nq):
        taken = 0
        seen: set[int] = set()
        for pos, cid in zip(order[r].tolist(), I_sorted[r].tolist(), strict=True):
            if cid < 0 or taken == k:
                break
            if cid in seen:
                continue
            seen.add(cid)
            I[r, taken], S[r, taken], payload[r][taken] = cid, S_all[r, pos], recs[r][pos]
            taken += 1
    return SparseHits(rows=np.arange(nq, dtype=np.int64), I=I, S=S, payload=payload)
