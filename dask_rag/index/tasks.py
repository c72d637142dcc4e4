"""Every function the index submits to workers, in one place.

Shard tasks take the shard future as their first argument, so the scheduler runs them where the
shard lives (and :data:`~dask_rag.cluster.plugins.NEVER_STEAL_PREFIXES` keeps the work stealer
from moving them): only query rows, ids and results cross the network, never a shard.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import numpy.typing as npt

from dask_rag.faults import fault_point
from dask_rag.index.build import load_router
from dask_rag.index.manifest import ShardEntry
from dask_rag.index.merge import empty_result, merge_results
from dask_rag.index.query import IndexQuery, ShardResult
from dask_rag.index.routing import RoutedBatch, RoutedRows, Router
from dask_rag.index.shard import Shard, load_shard
from dask_rag.index.sparse import CorpusStats, search_sparse, text_stats
from dask_rag.index.vectors import EmbeddedPieces, EmbedInTask, NoVectors

__all__ = [
    "ShardInput",
    "apply_add_task",
    "apply_remove_task",
    "bm25_stats_task",
    "doc_index_task",
    "fetch_task",
    "held_task",
    "load_router",
    "load_shard",
    "merge_group_task",
    "route_batch",
    "route_task",
    "search_shard_task",
    "shard_count_task",
    "sources_task",
    "write_shard_task",
]

# ---- search ------------------------------------------------------------------------------------


def route_batch(xq: npt.NDArray[np.float32], router: Router | None, query: IndexQuery
                ) -> RoutedBatch:
    """A batch's matrix, routed here when there is a coarse quantizer."""
    return router.route(xq, query.nprobe) if router is not None else RoutedBatch(xq)


def route_task(router: Router, nprobe: int | None, vectors: EmbeddedPieces) -> RoutedBatch:
    """Coarse-quantize a batch where the router lives (IVF factories)."""
    return router.route(vectors.matrix(), nprobe)


#: what a shard's search task is handed: the batch routed (whole, or this shard's rows), or
#: the batch's vectors still to be assembled or embedded here, or none (BM25 only)
ShardInput = RoutedBatch | RoutedRows | EmbeddedPieces | EmbedInTask | NoVectors


def search_shard_task(shard: Shard, source: ShardInput, query: IndexQuery, nq: int,
                      router: Router | None = None) -> ShardResult:
    """One shard's answer to a batch of ``nq`` queries: its dense top-k of the rows routed to
    it, BM25 over every row when the query has texts, and the hits' records.

    ``source`` (:data:`ShardInput`): with :class:`~dask_rag.index.vectors.EmbedInTask` the
    batch is embedded here (a small batch is embedded on every shard's worker rather than in
    a task of its own, a scheduling round trip less) and, given a ``router``, routed here.
    """
    fault_point("search.shard")
    shard.catch_up(query.min_seq)
    no = shard.ref.shard_no
    all_rows = np.arange(nq, dtype=np.int64)
    match source:
        case RoutedBatch():
            part = source.for_shard(no)
        case RoutedRows():
            part = source
        case NoVectors():
            part = RoutedRows(no, all_rows, None, None, None)
        case EmbedInTask():
            part = route_batch(source.matrix(), router, query).for_shard(no)
        case EmbeddedPieces():
            part = RoutedRows(no, all_rows, source.matrix(), None, None)
    started_at = time.time()
    t0 = time.perf_counter()
    metric = shard.spec.metric
    # the filter is a pass over the shard's records: evaluate it once for dense and BM25
    allowed = shard.filter_ids(query.filter) if query.filter is not None else None
    if query.dense and part.xq is not None and len(part.rows):
        D, I = shard.search(part.xq, query.k, Iq=part.Iq, Dq=part.Dq, nprobe=query.nprobe,
                            ef_search=query.ef_search, allowed=allowed)
    else:
        D, I = empty_result(len(part.rows), query.k, metric)
    sparse = None
    if query.texts is not None:  # BM25 has no quantizer to route by: every row, every shard
        sparse = search_sparse(shard, all_rows, list(query.texts), query.sparse_k, allowed,
                               with_records=not query.with_records, weights=query.bm25)
    payload = None
    if query.with_records:  # dense and BM25 hits' records in one lookup
        if sparse is None:
            (payload,) = shard.fetch_rows(I)
        else:
            payload, sparse.payload = shard.fetch_rows(I, sparse.I)
    return ShardResult(rows=part.rows, D=D, I=I, payload=payload, sparse=sparse,
                       search_ms=(time.perf_counter() - t0) * 1e3, started_at=started_at)


def merge_group_task(parts: list[ShardResult], nq: int, k: int, metric: str) -> ShardResult:
    """One node of the merge tree (``client.map`` passes its group of parts as one list)."""
    return merge_results(nq, k, metric, parts)


# ---- mutation and inspection --------------------------------------------------------------------


def apply_add_task(shard: Shard, seq: int, xb: npt.NDArray[np.float32],
                   ids: npt.NDArray[np.int64], records: list[dict[str, Any]] | None,
                   lists: npt.NDArray[np.int64] | None,
                   removed: npt.NDArray[np.int64] | None = None) -> int:
    """Apply WAL entry ``seq`` to this copy of the shard (unless it already reflects it:
    a reload or a catch-up replayed it); returns the shard's vector count after it."""
    fault_point("apply.shard")

    def apply() -> None:
        if removed is not None and removed.size:
            shard.remove(removed)
        if len(ids):
            shard.add(xb, ids, records, lists)

    shard.apply_entry(seq, apply)
    return shard.ntotal


def apply_remove_task(shard: Shard, seq: int, ids: npt.NDArray[np.int64]) -> int:
    """Apply a ``remove`` WAL entry to this copy of the shard (unless it already reflects
    it); returns the shard's vector count after it."""
    fault_point("apply.shard")
    shard.apply_entry(seq, lambda: shard.remove(ids))
    return shard.ntotal


def shard_count_task(shard: Shard, min_seq: int = 0) -> int:
    shard.catch_up(min_seq)
    return shard.ntotal


def held_task(shard: Shard, ids: npt.NDArray[np.int64], removed: npt.NDArray[np.int64],
              min_seq: int = 0) -> tuple[npt.NDArray[np.int64], CorpusStats]:
    """Which of ``ids`` this shard holds, and the BM25 statistics of the held ones among
    ``removed`` (what a write that removes them takes from the index's)."""
    shard.catch_up(min_seq)
    held = shard.contains(ids)
    gone = held[np.isin(held, removed)]
    texts = [r.get("text") if r else None for r in shard.fetch(gone)] if gone.size else []
    return held, text_stats(texts)


def bm25_stats_task(shard: Shard, min_seq: int = 0) -> CorpusStats:
    """This shard's part of the index's BM25 statistics."""
    shard.catch_up(min_seq)
    return shard.sparse_index().stats()


def fetch_task(shard: Shard, ids: npt.NDArray[np.int64], min_seq: int = 0
               ) -> list[dict[str, Any] | None]:
    shard.catch_up(min_seq)
    return shard.fetch(ids)


def sources_task(shard: Shard, sources: list[str], min_seq: int = 0) -> npt.NDArray[np.int64]:
    shard.catch_up(min_seq)
    return shard.ids_of_sources(sources)


def doc_index_task(shard: Shard, min_seq: int = 0) -> list[tuple[int, str | None, str | None]]:
    shard.catch_up(min_seq)
    return shard.doc_index()


def write_shard_task(shard: Shard, index_dir: str, generation: int, index_uuid: str,
                     min_seq: int = 0) -> ShardEntry:
    """Write this shard's files; ``min_seq``: the log entry the files fold up to (a save
    deletes the log after them, so this copy must reflect every entry up to it)."""
    shard.catch_up(min_seq)
    return shard.write(index_dir, generation, index_uuid)
