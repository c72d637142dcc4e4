"""Batch-invariant exact scores: a Flat search whose answer does not depend on its batch.

faiss scores a batch of queries against a flat index with one BLAS matrix product once the
batch is big enough (``distance_compute_blas_threshold``) and with a per-query SIMD loop below
that, and the BLAS kernels choose their blocking by shape.  Either way a query's float32
scores change in their last bits with the batch it came in: measured here, 64 queries searched
one by one and as one batch against 5,000 vectors differ in every run, with the BLAS path
forced on or off (only the pure per-query loop is stable, at 2.5-4.5x the cost of BLAS at
batch 64).  A last-bit change swaps near-ties, so a hit list depended on its batch neighbours.

Here faiss only *proposes* candidates (fast, BLAS): ``k + max(k, 16)`` per query.  They are
re-scored with :func:`exact_scores` — float64 products of the float32 inputs (exact), summed
along the vector, rounded once to float32 — a function of the (query, vector) pair alone.
A query's answer is the best ``k`` by (exact score, id).  It is *certified* complete when the
``k``-th exact score beats anything a vector outside the candidates could reach: faiss's
score of the weakest candidate plus the worst-case float32 error of a faiss score
(:func:`score_tolerance`).  A query that is not certified (many near-equal vectors at the
cut, e.g. duplicate chunks) is answered by an exact scan of every vector instead.  Either way
the result is "top-k by exact score, ties broken by id", whatever the batch, the number of
shards, or the worker.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import numpy as np
import numpy.typing as npt

from dask_rag.index.merge import empty_result, merge_topk, worst_distance

__all__ = ["ExactRescorer", "FlatVectors", "exact_scores", "score_tolerance", "topk_ties_by_id"]

#: float32 unit roundoff
_U = 2.0 ** -24


def exact_scores(xq: npt.NDArray[np.float32], vecs: npt.NDArray[np.float32], metric: str
                 ) -> npt.NDArray[np.float32]:
    """Scores of ``xq`` ``(nq, d)`` against ``vecs`` ``(nq, m, d)``: ``(nq, m)`` float32.

    Products of float32 values are exact in float64; numpy sums each length-``d`` row the
    same way whatever the array's other dimensions, so a pair's score never depends on what
    else is scored with it (tested).
    """
    q = np.asarray(xq, dtype=np.float64)[:, None, :]
    v = np.asarray(vecs, dtype=np.float64)
    if metric == "ip":
        out = (q * v).sum(axis=-1)
    else:
        diff = q - v
        out = (diff * diff).sum(axis=-1)
    return out.astype(np.float32)


def score_tolerance(xq: npt.NDArray[np.float32], max_norm: float, metric: str
                    ) -> npt.NDArray[np.float64]:
    """Per query, a bound on ``|faiss score - exact score|`` for any stored vector.

    A float32 dot product of length ``d`` errs by at most ``~d * u * |q| * |y|`` (``u`` the
    float32 unit roundoff), whatever the summation order; faiss computes L2 through the
    expansion ``|q|^2 + |y|^2 - 2 q.y``, which errs by at most ``~d * u * (|q| + |y|)^2``.
    Two more ``u`` cover the rounding of the exact score itself; 1.25x for slack.
    """
    d = xq.shape[1]
    qn = np.linalg.norm(np.asarray(xq, dtype=np.float64), axis=1)
    scale = qn * max_norm if metric == "ip" else (qn + max_norm) ** 2
    return 1.25 * (d + 4) * _U * scale + 1e-30


class FlatVectors:
    """The stored vectors of a flat index, addressable by id (a read-only view, rebuilt after
    every mutation; the id order and the largest norm are computed on first use)."""

    def __init__(self, ids: npt.NDArray[np.int64], vectors: npt.NDArray[np.float32]) -> None:
        self.ids = ids
        self.vectors = vectors

    @cached_property
    def _by_id(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        order = np.argsort(self.ids, kind="stable")
        return order, self.ids[order]

    @cached_property
    def max_norm(self) -> float:
        if not len(self.ids):
            return 0.0
        # float32 norms are off by ~1e-7 relative; the tolerance has more slack than that
        return float(np.linalg.norm(self.vectors, axis=1).max()) * (1 + 1e-5)

    def rows_of(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Row of each id in :attr:`vectors` (-1 for padding or unknown ids)."""
        order, srt = self._by_id
        if not len(srt):
            return np.full(ids.shape, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(srt, ids), len(srt) - 1)
        found = (srt[pos] == ids) & (ids >= 0)
        return np.where(found, order[pos], -1).astype(np.int64)

    def gather(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """Vectors of an id matrix ``(nq, m)`` as ``(nq, m, d)`` (zeros for padding)."""
        rows = self.rows_of(ids)
        out = self.vectors[np.maximum(rows, 0)]
        out[rows < 0] = 0.0
        return out


class ExactRescorer:
    """Top-k by exact score over a set of stored vectors, from faiss's candidates.

    ``propose(xq, m)`` is faiss's (fast, batch-dependent) top-``m`` search over the allowed
    vectors; ``store`` holds the vectors by id; ``allowed_rows()`` the rows of
    ``store.vectors`` a query may match (for the exact scan of a query that is not certified).
    """

    def __init__(self, store: FlatVectors, metric: str,
                 propose: Callable[[npt.NDArray[np.float32], int],
                                   tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]],
                 n_allowed: int, allowed_rows: Callable[[], npt.NDArray[np.int64]]) -> None:
        self.store = store
        self.metric = metric
        self.propose = propose
        self.n_allowed = n_allowed
        self.allowed_rows = allowed_rows
        #: queries answered by a full exact scan (not certified by their candidates)
        self.scanned = 0

    def search(self, xq: npt.NDArray[np.float32], k: int
               ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        nq = xq.shape[0]
        if nq == 0 or self.n_allowed == 0:
            return empty_result(nq, k, self.metric)
        m = min(self.n_allowed, k + max(k, 16))
        D0, I0 = self.propose(xq, m)
        exact = exact_scores(xq, self.store.gather(I0), self.metric)
        exact = np.where(I0 >= 0, exact, np.float32(worst_distance(self.metric)))
        D, I = merge_topk([exact], [I0], k, self.metric)
        if m >= self.n_allowed:  # every allowed vector is a candidate
            return D, I
        kth = D[:, k - 1].astype(np.float64)
        weakest = D0[:, m - 1].astype(np.float64)
        tol = score_tolerance(xq, self.store.max_norm, self.metric)
        if self.metric == "ip":
            certified = (I[:, k - 1] >= 0) & (kth > weakest + tol)
        else:
            certified = (I[:, k - 1] >= 0) & (kth < weakest - tol)
        for r in np.flatnonzero(~certified):
            D[r], I[r] = self._scan(xq[r], k)
        return D, I

    def _scan(self, q: npt.NDArray[np.float32], k: int
              ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Exact scores of ``q`` against every allowed vector (rare: see the module doc)."""
        self.scanned += 1
        rows = self.allowed_rows()
        scores = exact_scores(q[None, :], self.store.vectors[rows][None], self.metric)
        D, I = merge_topk([scores], [self.store.ids[rows][None]], k, self.metric)
        return D[0], I[0]


def topk_ties_by_id(search: Callable[[npt.NDArray[np.int64], int],
                                     tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]],
                    nq: int, k: int, metric: str, limit: int
                    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Top-``k`` of a per-query-deterministic search, ties at the cut broken by id.

    faiss keeps the first of equal scores it meets at the ``k``-th place, and which comes first
    depends on the scan order (which shard holds which list).  ``search(rows, m)`` answers
    batch rows ``rows`` with ``m`` results; a row whose ``m``-th result still ties with its
    ``k``-th is searched again with twice the depth, until the tie is inside the results.
    """
    D_out, I_out = empty_result(nq, k, metric)
    if nq == 0 or limit <= 0:
        return D_out, I_out
    rows = np.arange(nq, dtype=np.int64)
    m = min(k + 1, limit)
    while rows.size:
        D, I = search(rows, m)
        D, I = merge_topk([D], [I], m, metric)
        width = min(k, m)
        D_out[rows, :width], I_out[rows, :width] = D[:, :width], I[:, :width]
        if m <= k or m >= limit:
            break
        tied = (I[:, m - 1] >= 0) & (D[:, m - 1] == D[:, k - 1])
        rows = rows[tied]
        m = min(limit, 2 * m)
    return D_out, I_out
