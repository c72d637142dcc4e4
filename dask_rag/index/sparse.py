"""BM25 per shard, scored with the *index's* statistics: built with the shard, persisted
beside its faiss file, and searched *in the same task* as the dense search, so hybrid
retrieval costs no extra fan-out.

Each shard keeps its chunks' term frequencies and token counts (a sparse ``chunks x terms``
matrix), not precomputed scores: a score needs the corpus's document frequencies and average
length, and those belong to the whole index, not to a shard.  The index keeps them
(:class:`CorpusStats`: document count, total length, each term's document frequency; built
from the shards at load and kept current by every write, as Elasticsearch's
``dfs_query_then_fetch`` asks the shards), and every search carries the batch's weights
(:class:`Bm25Weights`: each query term's IDF and the average length).  So a chunk's score is
the one a single unsharded index would give, bit for bit whatever the shard count; it equals
``bm25s``'s Lucene variant (k1 1.5, b 0.75, the same tokenizer and English stop words) to
float32 rounding.  Without weights (a shard used on its own) the shard's own statistics
stand in.  Per query, the scores over all of a shard's chunks are computed on their own and
cut with ties broken by id: a query's hits never depend on the other queries of its batch.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from dask_rag.index.query import Bm25Weights, ShardResult, SparseHits

if TYPE_CHECKING:  # pragma: no cover
    from dask_rag.index.shard import Shard

__all__ = ["BM25_B", "BM25_K1", "CorpusStats", "SparseIndex", "merge_sparse", "search_sparse",
           "text_stats", "tokenize", "top_scores"]

#: BM25's parameters (Lucene's and bm25s's defaults)
BM25_K1 = 1.5
BM25_B = 0.75
#: the on-disk layout of a shard's BM25 folder (older folders are rebuilt from the records)
FORMAT = "dask-rag-bm25-1"


def tokenize(texts: Sequence[str]) -> list[list[str]]:
    """Each text's BM25 terms: lower-cased words of 2+ characters, English stop words
    dropped (``bm25s.tokenize``: chunks and queries alike)."""
    import bm25s

    if not texts:
        return []
    return [list(t) for t in bm25s.tokenize(list(texts), stopwords="en", return_ids=False,
                                             show_progress=False)]


@dataclass
class CorpusStats:
    """What BM25's IDF and length normalisation need of a corpus: its chunk count, their
    total length in terms, and each term's document frequency.  Additive: the index's are the
    sum of its shards', and a write adds or subtracts its chunks'."""

    n_docs: int = 0
    total_len: int = 0
    df: dict[str, int] = field(default_factory=dict)

    def __add__(self, other: CorpusStats) -> CorpusStats:
        df = dict(self.df)
        for term, n in other.df.items():
            df[term] = df.get(term, 0) + n
        return CorpusStats(self.n_docs + other.n_docs, self.total_len + other.total_len, df)

    def __sub__(self, other: CorpusStats) -> CorpusStats:
        df = dict(self.df)
        for term, n in other.df.items():
            left = df.get(term, 0) - n
            if left > 0:
                df[term] = left
            else:
                df.pop(term, None)
        return CorpusStats(self.n_docs - other.n_docs, self.total_len - other.total_len, df)

    def weights(self, queries: Sequence[str]) -> Bm25Weights:
        """The batch's BM25 weights: Lucene's IDF ``log(1 + (N - df + 0.5) / (df + 0.5))`` of
        every query term the corpus holds, and the average chunk length."""
        n = self.n_docs
        idf = {}
        for terms in tokenize(queries):
            for t in terms:
                df = self.df.get(t, 0)
                if df and t not in idf:
                    idf[t] = math.log(1 + (n - df + 0.5) / (df + 0.5))
        return Bm25Weights(avgdl=self.total_len / n if n else 1.0, idf=idf)

    def idf_sums(self, queries: Sequence[str]) -> list[float]:
        """Each query's total term weight: the sum of its terms' IDF, a term the corpus lacks
        counted at the IDF of a term in no chunk (the most it could weigh).  A chunk's BM25
        score over this is the share of the query it matches (the adaptive fusion reads it)."""
        n = self.n_docs
        if not n:
            return [0.0] * len(queries)
        return [sum(math.log(1 + (n - self.df.get(t, 0) + 0.5) / (self.df.get(t, 0) + 0.5))
                    for t in terms) for terms in tokenize(queries)]


def text_stats(texts: Iterable[str | None]) -> CorpusStats:
    """:class:`CorpusStats` of some chunks' texts (chunks without text are not in BM25)."""
    kept = [t for t in texts if t]
    df: Counter[str] = Counter()
    total = 0
    for terms in tokenize(kept):
        total += len(terms)
        df.update(set(terms))
    return CorpusStats(len(kept), total, dict(df))


class SparseIndex:
    """BM25 over one shard's chunks (``ids``, in the order they were added): term
    frequencies (CSC, chunks x terms), each chunk's length in terms, the vocabulary."""

    def __init__(self, ids: npt.NDArray[np.int64], lengths: npt.NDArray[np.float32],
                 tf: Any, vocab: dict[str, int]) -> None:
        self.ids = ids
        self.lengths = lengths
        self.tf = tf
        self.vocab = vocab
        self._stats: CorpusStats | None = None
        # per-batch work done once: term frequencies as float64, and the length
        # normalisation for the last average length seen (it changes only with writes)
        self._tf64: npt.NDArray[np.float64] | None = None
        self._norm: tuple[float, npt.NDArray[np.float64]] | None = None

    @classmethod
    def build(cls, ids: npt.NDArray[np.int64], texts: Sequence[str | None]) -> SparseIndex:
        """The index of chunks ``ids`` with ``texts`` (chunks without text are left out)."""
        import scipy.sparse as sp

        empty = cls(np.zeros(0, np.int64), np.zeros(0, np.float32),
                    sp.csc_matrix((0, 0), dtype=np.float32), {})
        return empty.changed(np.zeros(0, np.int64), np.asarray(ids, np.int64), texts)

    def changed(self, remove: npt.NDArray[np.int64], add_ids: npt.NDArray[np.int64],
                add_texts: Sequence[str | None]) -> SparseIndex:
        """A new index: this one without the chunks ``remove`` (ids it may not hold), with
        ``add_ids``' texts — what :meth:`build` over the shard's chunks after a write gives,
        up to the order of rows and terms, which no score depends on.

        Why: a write used to drop the shard's BM25 index, and the next search rebuilt it,
        tokenizing every chunk the shard holds — seconds for a big shard, on every search
        that followed a write.  Only the added chunks are tokenized here."""
        import scipy.sparse as sp

        tf, ids, lengths = self.tf, self.ids, self.lengths
        if len(remove) and len(ids):
            keep = ~np.isin(ids, remove)
            if not keep.all():
                tf, ids, lengths = tf[keep], ids[keep], lengths[keep]
        vocab = self.vocab
        new = [i for i, t in enumerate(add_texts) if t]
        if new:
            docs = tokenize([add_texts[i] or "" for i in new])
            vocab = dict(vocab)
            rows, cols, vals = [], [], []
            for r, terms in enumerate(docs):
                for term, n in Counter(terms).items():
                    rows.append(r)
                    cols.append(vocab.setdefault(term, len(vocab)))
                    vals.append(n)
            grown = np.concatenate([tf.indptr, np.full(len(vocab) - tf.shape[1], tf.indptr[-1],
                                                       dtype=tf.indptr.dtype)])
            tf = sp.csc_matrix((tf.data, tf.indices, grown), shape=(tf.shape[0], len(vocab)))
            added = sp.csc_matrix((np.asarray(vals, np.float32),
                                   (np.asarray(rows, np.int64), np.asarray(cols, np.int64))),
                                  shape=(len(docs), len(vocab)), dtype=np.float32)
            tf = sp.vstack([tf, added], format="csc", dtype=np.float32)
            ids = np.concatenate([ids, np.asarray(add_ids, np.int64)[new]])
            lengths = np.concatenate([lengths, np.asarray([len(d) for d in docs], np.float32)])
        elif tf is self.tf:
            return self
        tf.sort_indices()
        return SparseIndex(ids, lengths, tf, vocab)

    def stats(self) -> CorpusStats:
        """This shard's :class:`CorpusStats` (its part of the index's; computed once, the
        object does not change)."""
        if self._stats is None:
            df = np.diff(self.tf.indptr)
            self._stats = CorpusStats(len(self.ids), int(self.lengths.sum()),
                                      {t: int(df[j]) for t, j in self.vocab.items() if df[j]})
        return self._stats

    def save(self, directory: Path) -> None:
        """Write atomically: into a temporary sibling directory, then rename."""
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            np.save(tmp / "ids.npy", self.ids)
            np.save(tmp / "lengths.npy", self.lengths)
            np.savez(tmp / "tf.npz", data=self.tf.data, indices=self.tf.indices,
                     indptr=self.tf.indptr, shape=np.asarray(self.tf.shape, np.int64))
            terms = sorted(self.vocab, key=self.vocab.__getitem__)
            (tmp / "vocab.json").write_text(json.dumps({"format": FORMAT, "terms": terms}))
            if directory.exists():
                shutil.rmtree(directory)
            tmp.rename(directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: Path) -> SparseIndex:
        """Read a saved folder; ValueError for another layout (an older index's: the caller
        rebuilds from the records)."""
        import scipy.sparse as sp

        meta = json.loads((directory / "vocab.json").read_text()) \
            if (directory / "vocab.json").is_file() else {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{directory}: not a {FORMAT} folder")
        with np.load(directory / "tf.npz", allow_pickle=False) as z:
            tf = sp.csc_matrix((z["data"], z["indices"], z["indptr"]),
                               shape=tuple(int(x) for x in z["shape"]))
        ids = np.load(directory / "ids.npy", allow_pickle=False).astype(np.int64)
        lengths = np.load(directory / "lengths.npy", allow_pickle=False)
        terms = meta["terms"]
        if tf.shape != (len(ids), len(terms)) or lengths.shape != (len(ids),):
            raise ValueError(f"{directory}: shapes disagree")
        return cls(ids, lengths, tf, {t: j for j, t in enumerate(terms)})

    def _term_scores(self, terms: Iterable[str], weights: Bm25Weights
                     ) -> dict[str, tuple[npt.NDArray[np.int32], npt.NDArray[np.float64]]]:
        """Each term's (rows, BM25 contribution) over the chunks that hold it."""
        cached = self._norm
        if cached is None or cached[0] != weights.avgdl:
            cached = (weights.avgdl, BM25_K1 * (1 - BM25_B + BM25_B * self.lengths.astype(
                np.float64) / weights.avgdl))
            self._norm = cached
        norm = cached[1]
        if self._tf64 is None:
            self._tf64 = self.tf.data.astype(np.float64)
        out = {}
        for t in terms:
            j = self.vocab.get(t)
            idf = weights.idf.get(t)
            if j is None or not idf:
                continue
            lo, hi = self.tf.indptr[j], self.tf.indptr[j + 1]
            rows = self.tf.indices[lo:hi]
            tf = self._tf64[lo:hi]
            out[t] = (rows, idf * tf / (tf + norm[rows]))
        return out

    def search(self, queries: Sequence[str], k: int,
               allowed: npt.NDArray[np.int64] | None = None,
               weights: Bm25Weights | None = None
               ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Top-``k`` ids and BM25 scores per query (-1 / 0 where fewer match), by score, then
        by id.  ``weights``: the index's (see the module docstring); None: this shard's own
        statistics.  A query's scores over all chunks are computed on their own and cut with
        ties broken by id, so its hits never depend on the other queries of its batch, nor on
        which equal-scoring chunk a partial sort met first."""
        nq = len(queries)
        I = np.full((nq, k), -1, dtype=np.int64)
        S = np.zeros((nq, k), dtype=np.float32)
        n = len(self.ids)
        if nq == 0 or n == 0:
            return I, S
        mask = None
        if allowed is not None:
            mask = np.isin(self.ids, allowed)
            if not mask.any():
                return I, S
        tokens = tokenize(queries)
        if weights is None:
            weights = self.stats().weights(queries)
        contrib = self._term_scores({t for ts in tokens for t in ts}, weights)
        for r, terms in enumerate(tokens):
            parts = [contrib[t] for t in terms if t in contrib]
            if not parts:
                continue
            rows = np.concatenate([p[0] for p in parts])
            vals = np.concatenate([p[1] for p in parts])
            # sums in the query's term order: a chunk's score is the same bits whatever else
            # its shard holds
            scores = np.bincount(rows, weights=vals, minlength=n).astype(np.float32)
            if mask is not None:
                scores = np.where(mask, scores, np.float32(0))
            top = top_scores(scores, self.ids, k)
            I[r, :len(top)] = self.ids[top]
            S[r, :len(top)] = scores[top]
        return I, S


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
                  allowed: npt.NDArray[np.int64] | None, with_records: bool = True,
                  weights: Bm25Weights | None = None) -> SparseHits:
    """BM25 search of one shard for batch rows ``rows`` (runs inside the shard's search task);
    ``allowed``: the ids a filter lets through, or None.  ``with_records=False`` leaves
    ``payload`` empty for the caller to fill (it fetches dense and BM25 hits together)."""
    sparse = shard.sparse_index()
    I, S = sparse.search(queries, k, allowed, weights)
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
