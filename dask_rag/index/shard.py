"""One shard of a distributed index: a faiss (or ScaNN / torch) index plus its chunk records.

A :class:`Shard` is the *value of a Dask future* that lives on one worker.  It is created by
:func:`load_shard` — a re-runnable task that reads the index directory — so if its worker dies the
scheduler simply runs the load again elsewhere.  Search and mutation tasks take the shard future
as a dependency and therefore run where the shard is.

Two guards keep shards from travelling between workers:

* ``dask.sizeof`` reports a shard's real size, so the scheduler's cost model never prefers
  moving one over running next to it;
* pickling a shard yields a *reload handle* (``load_shard(ref)``), never its bytes: if Dask ever
  did move or spill one, the receiver reloads it from disk (with the write-ahead log), which is
  both consistent and cheap on the wire.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from dask.sizeof import sizeof

from dask_rag.config import IndexSpec
from dask_rag.errors import CorruptIndex, InvalidInput
from dask_rag.index import store
from dask_rag.index.exact import ExactRescorer, FlatVectors, exact_scores, topk_ties_by_id
from dask_rag.index.merge import empty_result, merge_topk

__all__ = [
    "SearchFilter",
    "Shard",
    "ShardRef",
    "ShardResult",
    "build_shard_files",
    "load_shard",
    "make_records_table",
]


@dataclass(frozen=True)
class ShardRef:
    """Where a shard comes from: enough to (re)load it on any worker."""

    index_dir: str
    shard_no: int
    index_uuid: str


@dataclass(frozen=True)
class SearchFilter:
    """Metadata filter applied inside each shard *during* the search.

    ``source_prefix`` keeps chunks whose source starts with it; ``metadata`` keeps chunks whose
    metadata contains every given key with the given value.  Because the filter becomes a faiss
    ID selector, a filtered search still returns ``k`` hits when ``k`` matching chunks exist.
    """

    source_prefix: str | None = None
    metadata: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SearchFilter | None:
        if data is None:
            return None
        if not isinstance(data, dict):
            raise InvalidInput("filter must be an object with 'source_prefix' and/or 'metadata'")
        unknown = set(data) - {"source_prefix", "metadata"}
        if unknown:
            raise InvalidInput(f"filter has unknown field(s) {sorted(unknown)}; "
                               "allowed: 'source_prefix', 'metadata'")
        prefix = data.get("source_prefix")
        if prefix is not None and not isinstance(prefix, str):
            raise InvalidInput("filter.source_prefix must be a string")
        meta = data.get("metadata") or {}
        if not isinstance(meta, dict):
            raise InvalidInput("filter.metadata must be an object of key: value")
        for key, value in meta.items():
            if not isinstance(value, (str, int, float, bool)) or value is None:
                raise InvalidInput(f"filter.metadata[{key!r}] must be a string, number or bool")
        return cls(source_prefix=prefix, metadata=tuple(sorted(meta.items())))

    def matches(self, source: str | None, metadata_json: str | None) -> bool:
        if self.source_prefix is not None and not (source or "").startswith(self.source_prefix):
            return False
        if self.metadata:
            meta = json.loads(metadata_json) if metadata_json else {}
            return all(meta.get(key) == value for key, value in self.metadata)
        return True


@dataclass
class ShardResult:
    """A (partial) search answer: rows of the query batch and their top-k.

    ``payload`` optionally carries one record dict (or None) per hit, aligned with ``I``, so
    that chunk text travels with the hits from the worker that found them.
    """

    rows: npt.NDArray[np.int64]
    D: npt.NDArray[np.float32]
    I: npt.NDArray[np.int64]
    payload: list[list[dict[str, Any] | None]] | None = None
    sparse: Any = None
    shards: tuple[int, ...] = field(default_factory=tuple)
    #: slowest search task of the parts merged here, in milliseconds
    search_ms: float = 0.0


def make_records_table(ids: npt.NDArray[np.int64],
                       records: Sequence[dict[str, Any]] | None = None) -> Any:
    """A records table (sorted by id) for ``ids``; ``records`` hold text/source/metadata."""
    import pyarrow as pa

    n = len(ids)
    if records is not None and len(records) != n:
        raise InvalidInput(f"records has {len(records)} entries for {n} ids")

    def col(name: str) -> list[Any]:
        if records is None:
            return [None] * n
        values = []
        for r in records:
            v = r.get(name)
            if name == "metadata" and v is not None and not isinstance(v, str):
                v = json.dumps(v, sort_keys=True)
            values.append(v)
        return values

    table = pa.table({
        "id": pa.array(np.asarray(ids, dtype=np.int64), type=pa.int64()),
        "text": pa.array(col("text"), type=pa.string()),
        "source": pa.array(col("source"), type=pa.string()),
        "metadata": pa.array(col("metadata"), type=pa.string()),
        "doc_hash": pa.array(col("doc_hash"), type=pa.string()),
    })
    return table.sort_by("id")


#: the record fields a search hit carries (``doc_hash`` is for incremental ingestion only)
HIT_COLUMNS = ("id", "text", "source", "metadata")


class _RWLock:
    """Many concurrent searches, exclusive mutations (faiss indexes are not safe to mutate
    while being searched)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


#: faiss switches exhaustive search from its per-query SIMD loop to BLAS when nq * d reaches
#: this (faiss 1.15 defaults to 128000, i.e. ~334 queries at d=384).  Measured here at d=384,
#: one thread: 16 queries x 50k vectors take 81 ms without BLAS and 18 ms with it; below ~3
#: queries the SIMD loop wins.  1024 makes BLAS kick in from 3 queries at d=384.
FAISS_BLAS_THRESHOLD = 1024


def configure_faiss() -> None:
    """Process-wide faiss settings dask-rag relies on (idempotent, cheap)."""
    import faiss

    faiss.cvar.distance_compute_blas_threshold = FAISS_BLAS_THRESHOLD


def _faiss_metric(metric: str) -> int:
    import faiss

    return int(faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)


def new_shard_index(spec: IndexSpec, dim: int, template: Any | None) -> Any:
    """An empty faiss index for one shard (a clone of the trained template for IVF)."""
    import faiss

    kind = spec.info.kind
    if kind == "ivf":
        assert template is not None
        return faiss.clone_index(template)
    if kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, spec.info.hnsw_m, _faiss_metric(spec.metric))
        return faiss.IndexIDMap2(hnsw)
    # flat, and the vector store behind ScaNN / torch shards
    return faiss.IndexIDMap2(faiss.IndexFlat(dim, _faiss_metric(spec.metric)))


def _new_refine_store(dim: int, metric: str) -> Any:
    import faiss

    return faiss.IndexIDMap2(faiss.IndexFlat(dim, _faiss_metric(metric)))


class Shard:
    """A searchable, mutable shard.  Created by :func:`load_shard` on a worker."""

    def __init__(self, ref: ShardRef, spec: IndexSpec, dim: int, index: Any, records: Any,
                 refine: Any | None = None, nbytes_on_disk: int = 0) -> None:
        self.ref = ref
        self.spec = spec
        self.dim = dim
        self.kind = spec.info.kind
        self.index = index
        self.refine = refine
        self._ids: npt.NDArray[np.int64] | None = None
        self.records = records
        self.deleted: set[int] = set()
        #: sequence number of the last write-ahead-log entry reflected in memory
        self.applied_seq = 0
        self._lock = _RWLock()
        self._nbytes_disk = nbytes_on_disk
        self._accelerated: Any = None  # torch / ScaNN / faiss-gpu view, rebuilt after mutation
        self._flat: FlatVectors | None = None  # flat shards' vectors by id, rebuilt likewise
        self._sparse: Any = None  # BM25 over the records' text, rebuilt lazily after mutation
        self._sparse_lock = threading.Lock()
        self._prepare()

    @property
    def records(self) -> Any:
        """The shard's chunk records (a pyarrow Table sorted by ``id``)."""
        return self._records

    @records.setter
    def records(self, table: Any) -> None:
        self._records = table
        self._ids = None  # the id column's numpy copy, rebuilt on first use

    def _table_ids(self) -> npt.NDArray[np.int64]:
        """The records' ids as numpy, cached: every fetch binary-searches them, and a chunked
        column's ``to_numpy`` copies."""
        if self._ids is None:
            ids = self._records.column("id").to_numpy()
            ids.flags.writeable = False  # shared by every caller
            self._ids = ids
        return self._ids

    # ---- size and pickling --------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal) - len(self.deleted)

    @property
    def nbytes(self) -> int:
        n = int(self.index.ntotal)
        per_vec = self.dim * 4 if self.kind != "ivf" else 8 + int(
            getattr(self.index, "code_size", self.dim * 4))
        if self.kind == "hnsw":
            per_vec += 8 * 2 * self.spec.info.hnsw_m
        total = n * per_vec + int(self.records.nbytes) + 1024
        if self.refine is not None:
            total += n * (self.dim * 4 + 8)
        return max(total, self._nbytes_disk)

    def __reduce__(self) -> tuple[Any, tuple[ShardRef]]:
        # never ship a shard's bytes: the receiver reloads it (index files + WAL) from disk
        return (load_shard, (self.ref,))

    def __repr__(self) -> str:
        return (f"<Shard {self.ref.shard_no} of {self.ref.index_dir!r}: {self.spec.factory}, "
                f"{self.ntotal} vectors>")

    # ---- accelerated views ----------------------------------------------------------------

    def _prepare(self) -> None:
        """(Re)build the search structure that is derived from the stored index."""
        self._flat = None
        if self.kind == "scann":
            self._accelerated = _ScannView.build(self)
        elif self.spec.backend == "torch":
            from dask_rag.index.gpu import TorchFlatIndex

            ids, vecs = _all_vectors(self.index)
            self._accelerated = TorchFlatIndex(vecs, ids, self.spec.metric)
        elif self.spec.backend == "faiss-gpu":
            from dask_rag.index.gpu import to_faiss_gpu

            self._accelerated = to_faiss_gpu(self.index)
        else:
            self._accelerated = None

    def _deleted_ids(self) -> npt.NDArray[np.int64]:
        return np.fromiter(self.deleted, dtype=np.int64, count=len(self.deleted))

    def _live(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """``ids`` without the tombstoned ones (HNSW removals awaiting compaction)."""
        if not self.deleted or not len(ids):
            return ids
        return ids[~np.isin(ids, self._deleted_ids())]

    # ---- sparse (BM25) ---------------------------------------------------------------------

    def sparse_index(self) -> Any:
        """This shard's BM25 index (loaded with the shard, or built from its records)."""
        from dask_rag.rag.fusion import SparseIndex

        with self._sparse_lock:
            if self._sparse is None:
                with self._lock.read():
                    ids = self.records.column("id").to_numpy()
                    texts = self.records.column("text").to_pylist()
                    if self.deleted:
                        keep = ~np.isin(ids, self._deleted_ids())
                        ids = ids[keep]
                        texts = [t for t, k in zip(texts, keep, strict=True) if k]
                self._sparse = SparseIndex.build(ids, texts)
            return self._sparse

    def set_sparse_index(self, sparse: Any) -> None:
        with self._sparse_lock:
            self._sparse = sparse

    # ---- search ---------------------------------------------------------------------------

    def _selector(self, allowed: npt.NDArray[np.int64] | None) -> Any | None:
        import faiss

        parts = []
        if self.deleted:
            parts.append(faiss.IDSelectorNot(faiss.IDSelectorBatch(self._deleted_ids())))
        if allowed is not None:
            parts.append(faiss.IDSelectorBatch(allowed))
        if not parts:
            return None
        sel = parts[0]
        for other in parts[1:]:
            sel = faiss.IDSelectorAnd(sel, other)
        # keep the python wrappers (and the arrays they point to) alive with the selector
        sel._keep = parts
        return sel

    def filter_ids(self, flt: SearchFilter) -> npt.NDArray[np.int64]:
        """Ids of this shard's live chunks that pass ``flt``.

        Takes the read lock: the search task calls it before :meth:`search`, and a concurrent
        ``add``/``remove`` swaps the records table and the tombstones.
        """
        with self._lock.read():
            ids = self.records.column("id").to_numpy()
            sources = self.records.column("source").to_pylist()
            metas = self.records.column("metadata").to_pylist()
            keep = [i for i, s, m in zip(ids, sources, metas, strict=True) if flt.matches(s, m)]
            return self._live(np.asarray(keep, dtype=np.int64))

    def search(self, xq: npt.NDArray[np.float32], k: int, *,
               Iq: npt.NDArray[np.int64] | None = None, Dq: npt.NDArray[np.float32] | None = None,
               nprobe: int | None = None, ef_search: int | None = None,
               allowed: npt.NDArray[np.int64] | None = None
               ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Top-``k`` of this shard for each query row (faiss conventions, -1 padding).

        ``allowed`` restricts the search to these ids (a filter's :meth:`filter_ids`, computed
        once per task by the caller and shared with the BM25 search).
        """
        with self._lock.read():
            return self._search_locked(xq, k, Iq=Iq, Dq=Dq, nprobe=nprobe, ef_search=ef_search,
                                       allowed=allowed)

    def _search_locked(self, xq: npt.NDArray[np.float32], k: int, *, Iq: Any, Dq: Any,
                       nprobe: int | None, ef_search: int | None,
                       allowed: npt.NDArray[np.int64] | None
                       ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Top-``k`` by score, ties by id, each query's answer independent of its batch:
        flat shards re-score faiss's candidates exactly (:mod:`dask_rag.index.exact`); IVF and
        HNSW score every vector on its own (no BLAS) and only need ties at the cut resolved."""
        nq = xq.shape[0]
        if nq == 0 or self.index.ntotal == 0 or (allowed is not None and allowed.size == 0):
            return empty_result(nq, k, self.spec.metric)
        if allowed is None and self.deleted:
            allowed = self._live(self._table_ids())
        n_live = self.ntotal if allowed is None else int(allowed.size)
        if self.kind == "flat":
            return self._flat_rescorer(allowed, n_live).search(xq, k)
        if self.kind == "scann":
            return topk_ties_by_id(
                lambda rows, m: self._accelerated.search(xq[rows], m, self, sel_ids=allowed),
                nq, k, self.spec.metric, n_live)
        sel = self._selector(allowed)

        def run(rows: npt.NDArray[np.int64], m: int
                ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
            return self._search_rows(xq[rows], m, sel, nprobe=nprobe, ef_search=ef_search,
                                     Iq=None if Iq is None else Iq[rows],
                                     Dq=None if Dq is None else Dq[rows])

        return topk_ties_by_id(run, nq, k, self.spec.metric, n_live)

    def _flat_rescorer(self, allowed: npt.NDArray[np.int64] | None, n_live: int
                       ) -> ExactRescorer:
        """Exact re-scoring of the candidates of this flat shard's own backend (faiss, a GPU
        copy or torch tensors)."""
        store = self._flat_view()
        if self.spec.backend == "torch":
            def propose(q: npt.NDArray[np.float32], m: int
                        ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
                return self._accelerated.search(q, m, self, sel_ids=allowed)
        else:
            import faiss

            sel = self._selector(allowed)
            params = faiss.SearchParameters(sel=sel) if sel is not None else None
            index = self._accelerated if self._accelerated is not None else self.index

            def propose(q: npt.NDArray[np.float32], m: int
                        ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
                with _GpuGuard(self._accelerated):
                    D, I = index.search(q, m, params=params)
                return D, I

        def allowed_rows() -> npt.NDArray[np.int64]:
            if allowed is None:
                return np.arange(len(store.ids), dtype=np.int64)
            rows = store.rows_of(allowed)
            return rows[rows >= 0]

        return ExactRescorer(store, self.spec.metric, propose, n_live, allowed_rows)

    def _flat_view(self) -> FlatVectors:
        """The flat shard's vectors by id, a view of faiss's own storage (no copy)."""
        if self._flat is None:
            import faiss

            n, d = int(self.index.ntotal), self.dim
            ids = (faiss.vector_to_array(self.index.id_map).astype(np.int64) if n
                   else np.zeros(0, np.int64))
            flat = faiss.downcast_index(self.index.index)
            vecs = (faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d) if n
                    else np.zeros((0, d), np.float32))
            self._flat = FlatVectors(ids, vecs)
        return self._flat

    def _search_rows(self, xq: npt.NDArray[np.float32], m: int, sel: Any, *,
                     nprobe: int | None, ef_search: int | None, Iq: Any, Dq: Any
                     ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """faiss's top-``m`` of IVF / HNSW shards (then the exact refine stage, if any)."""
        import faiss

        nq = xq.shape[0]
        index = self._accelerated if self._accelerated is not None else self.index
        k_base = m * self.spec.refine_k_factor if self.refine is not None else m
        if self.kind == "ivf":
            if Iq is not None:
                params = faiss.SearchParametersIVF(nprobe=int(Iq.shape[1]), sel=sel)
                D = np.empty((nq, k_base), dtype=np.float32)
                I = np.empty((nq, k_base), dtype=np.int64)
                Iq = np.ascontiguousarray(Iq, dtype=np.int64)
                Dq = np.ascontiguousarray(Dq, dtype=np.float32)
                xq = np.ascontiguousarray(xq, dtype=np.float32)
                with _GpuGuard(self._accelerated):
                    index.search_preassigned_c(
                        nq, faiss.swig_ptr(xq), k_base, faiss.swig_ptr(Iq), faiss.swig_ptr(Dq),
                        faiss.swig_ptr(D), faiss.swig_ptr(I), False, params)
            else:
                params = faiss.SearchParametersIVF(nprobe=int(nprobe or self.spec.nprobe), sel=sel)
                with _GpuGuard(self._accelerated):
                    D, I = index.search(xq, k_base, params=params)
        else:  # hnsw
            ef = max(int(ef_search or self.spec.ef_search), m)
            D, I = self.index.search(xq, m, params=faiss.SearchParametersHNSW(efSearch=ef, sel=sel))
        if self.refine is not None:
            D, I = self._refine(xq, D, I, m)
        return D, I

    def _refine(self, xq: npt.NDArray[np.float32], D: npt.NDArray[np.float32],
                I: npt.NDArray[np.int64], k: int) -> tuple[npt.NDArray[np.float32],
                                                          npt.NDArray[np.int64]]:
        """Re-score approximate candidates with exact distances (IndexRefineFlat semantics)."""
        assert self.refine is not None
        nq, kk = I.shape
        valid = I >= 0
        flat_ids = np.where(valid, I, I[valid][0] if valid.any() else 0).ravel()
        if not valid.any():
            return empty_result(nq, k, self.spec.metric)
        vecs = self.refine.reconstruct_batch(flat_ids).reshape(nq, kk, self.dim)
        exact = exact_scores(xq, vecs, self.spec.metric)
        return merge_topk([exact], [np.where(valid, I, -1)], k, self.spec.metric)

    # ---- records ----------------------------------------------------------------------------

    def fetch(self, ids: npt.NDArray[np.int64]) -> list[dict[str, Any] | None]:
        """Records of ``ids`` (None for ids this shard does not hold)."""
        with self._lock.read():
            return self._fetch_locked(ids)

    def fetch_rows(self, *matrices: npt.NDArray[np.int64]
                   ) -> list[list[list[dict[str, Any] | None]]]:
        """Records of every id of one or more ``(rows, k)`` id matrices, row by row.

        A search task's hits come as such matrices (dense, BM25); they are looked up together
        in one pass — one ``take`` + ``to_pylist`` over the unique ids instead of one per query
        row (that per-row overhead was ~60 % of a hybrid search task) — and an id found by
        both shares one dict, which pickle then sends once.
        """
        mats = [np.asarray(m, dtype=np.int64) for m in matrices]
        flat = np.concatenate([m.ravel() for m in mats]) if mats else np.zeros(0, np.int64)
        uniq, inverse = np.unique(flat, return_inverse=True)
        with self._lock.read():
            recs = self._fetch_locked(uniq, HIT_COLUMNS)
        out: list[list[list[dict[str, Any] | None]]] = []
        start = 0
        for m in mats:
            k = m.shape[1]
            picked = [recs[j] for j in inverse[start:start + m.size].tolist()]
            out.append([picked[r * k:(r + 1) * k] for r in range(m.shape[0])])
            start += m.size
        return out

    def _fetch_locked(self, ids: npt.NDArray[np.int64], columns: Sequence[str] | None = None
                      ) -> list[dict[str, Any] | None]:
        table_ids = self._table_ids()
        out: list[dict[str, Any] | None] = [None] * len(ids)
        if not len(table_ids):
            return out
        pos = np.minimum(np.searchsorted(table_ids, ids), len(table_ids) - 1)
        found = table_ids[pos] == ids
        if not found.any():
            return out
        table = self.records if columns is None else self.records.select(list(columns))
        sub = table.take(pos[found]).to_pylist()
        for slot, rec in zip(np.flatnonzero(found), sub, strict=True):
            if int(rec["id"]) not in self.deleted:
                out[slot] = rec
        return out

    def contains(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The subset of ``ids`` stored in this shard."""
        with self._lock.read():
            table_ids = self._table_ids()
            return self._live(ids[np.isin(ids, table_ids)])

    def doc_index(self) -> list[tuple[int, str | None, str | None]]:
        """(id, source, doc_hash) of every live chunk: what incremental ingestion diffs against."""
        with self._lock.read():
            ids = self.records.column("id").to_pylist()
            src = self.records.column("source").to_pylist()
            dh = self.records.column("doc_hash").to_pylist()
            return [(i, s, h) for i, s, h in zip(ids, src, dh, strict=True)
                    if i not in self.deleted]

    # ---- mutation ---------------------------------------------------------------------------

    def add(self, xb: npt.NDArray[np.float32], ids: npt.NDArray[np.int64],
            records: list[dict[str, Any]] | None = None,
            lists: npt.NDArray[np.int64] | None = None) -> int:
        """Add vectors (with their records); ``lists`` are precomputed IVF assignments."""
        import pyarrow as pa

        if len(ids) == 0:
            return 0
        with self._lock.write():
            _add_to_index(self.index, xb, ids, lists)
            if self.refine is not None:
                self.refine.add_with_ids(xb, ids)
            # an id removed earlier and added again is alive again (tombstoned kinds)
            self.deleted.difference_update(int(i) for i in ids)
            self.records = pa.concat_tables(
                [self._drop_records(ids), make_records_table(ids, records)]).sort_by("id")
            self._prepare()
            self._sparse = None
        return len(ids)

    def _drop_records(self, ids: npt.NDArray[np.int64]) -> Any:
        import pyarrow.compute as pc

        mask = pc.invert(pc.is_in(self.records.column("id"), value_set=_pa_ids(ids)))
        return self.records.filter(mask)

    def remove(self, ids: npt.NDArray[np.int64]) -> int:
        """Remove ids held by this shard; returns how many were removed."""
        import faiss

        with self._lock.write():
            table_ids = self._table_ids()
            mine = self._live(ids[np.isin(ids, table_ids)])
            if mine.size == 0:
                return 0
            if self.kind == "hnsw":
                # HNSW graphs cannot drop nodes: tombstone now, compact on the next save
                self.deleted.update(int(i) for i in mine)
            else:
                self.index.remove_ids(faiss.IDSelectorBatch(mine))
                self.records = self._drop_records(mine)
            if self.refine is not None:
                self.refine.remove_ids(faiss.IDSelectorBatch(mine))
            self._prepare()
            self._sparse = None
            return int(mine.size)

    def compact(self) -> None:
        """Rebuild a tombstoned HNSW shard without its deleted nodes."""
        if not self.deleted:
            return
        with self._lock.write():
            ids, vecs = _all_vectors(self.index)
            gone = self._deleted_ids()
            keep = ~np.isin(ids, gone)
            fresh = new_shard_index(self.spec, self.dim, None)
            fresh.add_with_ids(vecs[keep], ids[keep])
            self.index = fresh
            self.records = self._drop_records(gone)
            self.deleted.clear()
            self._prepare()

    # ---- persistence ------------------------------------------------------------------------

    def write(self, index_dir: str, generation: int, index_uuid: str) -> dict[str, Any]:
        """Write this shard's files for ``generation``; returns its manifest entry."""
        self.compact()
        has_text = self.records.column("text").null_count < self.records.num_rows
        sparse = self.sparse_index() if has_text else None
        with self._lock.read():
            return write_shard_files(Path(index_dir), self.ref.shard_no, generation, index_uuid,
                                     self.index, self.records, self.refine, sparse)


def _pa_ids(ids: npt.NDArray[np.int64]) -> Any:
    import pyarrow as pa

    return pa.array(np.asarray(ids, dtype=np.int64), type=pa.int64())


def _add_to_index(index: Any, xb: npt.NDArray[np.float32], ids: npt.NDArray[np.int64],
                  lists: npt.NDArray[np.int64] | None) -> None:
    import faiss

    xb = np.ascontiguousarray(xb, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if lists is not None and isinstance(index, faiss.IndexIVF):
        # use the central coarse assignment so each vector lands in exactly the list (and thus
        # the shard) the router expects, bit-for-bit
        lists = np.ascontiguousarray(lists, dtype=np.int64)
        index.add_core(len(ids), faiss.swig_ptr(xb), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
    else:
        index.add_with_ids(xb, ids)


def _all_vectors(index: Any) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """(ids, vectors) stored in an IndexIDMap2-wrapped flat or HNSW index."""
    import faiss

    n = int(index.ntotal)
    ids = faiss.vector_to_array(index.id_map).astype(np.int64) if n else np.zeros(0, np.int64)
    vecs = index.index.reconstruct_n(0, n) if n else np.zeros((0, index.d), np.float32)
    return ids, np.asarray(vecs, dtype=np.float32)


class _GpuGuard:
    """Serialise calls into a faiss-gpu index (they are not thread-safe)."""

    def __init__(self, accelerated: Any) -> None:
        self._lock = getattr(accelerated, "_dask_rag_lock", None)

    def __enter__(self) -> None:
        if self._lock is not None:
            self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.release()


class _ScannView:
    """A ScaNN searcher over a shard's vectors (ScaNN shards are rebuilt after mutations)."""

    def __init__(self, searcher: Any, ids: npt.NDArray[np.int64], vecs: npt.NDArray[np.float32],
                 metric: str) -> None:
        self.searcher = searcher
        self.ids = ids
        self.vecs = vecs
        self.metric = metric

    @classmethod
    def build(cls, shard: Shard) -> _ScannView:
        try:
            import scann
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise InvalidInput("ScaNN shards need the 'scann' extra: pip install dask-rag[scann]"
                               ) from exc
        ids, vecs = _all_vectors(shard.index)
        n = len(ids)
        if n == 0:
            return cls(None, ids, vecs, shard.spec.metric)
        distance = "dot_product" if shard.spec.metric == "ip" else "squared_l2"
        leaves = shard.spec.info.scann_leaves or max(1, int(np.sqrt(n)))
        leaves = min(leaves, n)
        to_search = max(1, min(leaves, shard.spec.nprobe))
        builder = scann.scann_ops_pybind.builder(vecs, 10, distance)
        if n >= 64 and leaves > 1:
            builder = builder.tree(num_leaves=leaves, num_leaves_to_search=to_search,
                                   training_sample_size=min(n, 100_000))
        if n >= 256 and vecs.shape[1] >= 2:
            builder = builder.score_ah(2, anisotropic_quantization_threshold=0.2).reorder(
                min(n, 100))
        else:
            builder = builder.score_brute_force()
        return cls(builder.build(), ids, vecs, shard.spec.metric)

    def search(self, xq: npt.NDArray[np.float32], k: int, shard: Shard,
               sel_ids: npt.NDArray[np.int64] | None = None
               ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        nq = xq.shape[0]
        if self.searcher is None:
            return empty_result(nq, k, self.metric)
        if sel_ids is not None:
            # filtered or tombstoned: exact search over the allowed subset (ScaNN has no
            # selectors); correct, and the allowed subset is usually small
            keep = np.isin(self.ids, sel_ids)
            vecs, ids = self.vecs[keep], self.ids[keep]
            scores = xq @ vecs.T if self.metric == "ip" else (
                (xq * xq).sum(1)[:, None] - 2 * xq @ vecs.T + (vecs * vecs).sum(1)[None, :])
            cand = np.broadcast_to(ids, scores.shape)
            return merge_topk([scores.astype(np.float32)], [cand], k, self.metric)
        kk = min(k, len(self.ids))
        pos, dist = self.searcher.search_batched(np.ascontiguousarray(xq), final_num_neighbors=kk)
        pos = np.asarray(pos, dtype=np.int64)
        dist = np.asarray(dist, dtype=np.float32)
        I = np.where(pos >= 0, self.ids[np.maximum(pos, 0)], -1)
        D_out, I_out = empty_result(nq, k, self.metric)
        D_out[:, :kk] = dist
        I_out[:, :kk] = I
        return D_out, I_out


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------


def shard_file_names(shard_no: int, generation: int) -> tuple[str, str, str, str]:
    """(faiss, records, refine store, BM25 directory) names of a shard's files."""
    suffix = "" if generation == 0 else f".g{generation}"
    base = f"shards/{shard_no:05d}{suffix}"
    return f"{base}.faiss", f"{base}.parquet", f"{base}.refine.faiss", f"{base}.bm25"


def write_shard_files(index_dir: Path, shard_no: int, generation: int, index_uuid: str,
                      index: Any, records: Any, refine: Any | None,
                      sparse: Any | None = None) -> dict[str, Any]:
    import faiss

    faiss_name, meta_name, refine_name, bm25_name = shard_file_names(shard_no, generation)
    data = faiss.serialize_index(index).tobytes()
    store.atomic_write_bytes(index_dir / faiss_name, data)
    store.write_records(index_dir / meta_name, records, index_uuid, shard_no)
    entry: dict[str, Any] = {
        "file": faiss_name,
        "meta": meta_name,
        "count": int(index.ntotal),
        "bytes": len(data),
        "checksum": store.file_checksum(index_dir / faiss_name),
        "meta_checksum": store.file_checksum(index_dir / meta_name),
    }
    if refine is not None:
        rdata = faiss.serialize_index(refine).tobytes()
        store.atomic_write_bytes(index_dir / refine_name, rdata)
        entry["refine_file"] = refine_name
        entry["refine_checksum"] = store.file_checksum(index_dir / refine_name)
    if sparse is not None:
        # derived from the records: no checksum; an unreadable one is rebuilt at load
        sparse.save(index_dir / bm25_name)
        entry["bm25"] = bm25_name
    return entry


def build_shard_files(index_dir: str, shard_no: int, generation: int, index_uuid: str,
                      spec: IndexSpec, dim: int, template_bytes: bytes | None,
                      xb: npt.NDArray[np.float32], ids: npt.NDArray[np.int64],
                      lists: npt.NDArray[np.int64] | None,
                      records: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Build one shard from its vectors and write its files (runs as a task on a worker)."""
    import faiss

    configure_faiss()
    template = None
    if template_bytes is not None:
        template = faiss.deserialize_index(np.frombuffer(template_bytes, dtype=np.uint8))
    index = new_shard_index(spec, dim, template)
    if len(ids):
        _add_to_index(index, xb, ids, lists)
    refine = None
    if spec.info.refine:
        refine = _new_refine_store(dim, spec.metric)
        if len(ids):
            refine.add_with_ids(np.ascontiguousarray(xb, np.float32), ids)
    table = make_records_table(ids, records)
    sparse = None
    if records is not None and any(r.get("text") for r in records):
        from dask_rag.rag.fusion import SparseIndex

        sparse = SparseIndex.build(table.column("id").to_numpy(),
                                   table.column("text").to_pylist())
    return write_shard_files(Path(index_dir), shard_no, generation, index_uuid, index, table,
                             refine, sparse)


def _read_faiss_file(path: Path, expected_checksum: str | None, what: str) -> tuple[Any, int]:
    import faiss

    if not path.is_file():
        raise CorruptIndex(f"{path}: {what} file is missing")
    data = path.read_bytes()
    if expected_checksum is not None:
        import hashlib

        got = hashlib.blake2b(data, digest_size=16).hexdigest()
        if got != expected_checksum:
            raise CorruptIndex(
                f"{path}: {what} checksum mismatch (file truncated, modified, or from another "
                "index)")
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        raise CorruptIndex(f"{path}: not a readable faiss index ({str(exc).splitlines()[0]})"
                           ) from None
    return index, len(data)


def load_shard(ref: ShardRef) -> Shard:
    """Load shard ``ref.shard_no`` of the index at ``ref.index_dir``, replaying its WAL.

    This is the task behind every shard future; it is pure with respect to the directory's
    committed state, so the scheduler can re-run it anywhere after a worker dies.
    """
    configure_faiss()
    manifest = store.read_manifest(ref.index_dir)
    where = str(Path(ref.index_dir) / store.MANIFEST)
    if manifest["index_uuid"] != ref.index_uuid:
        raise CorruptIndex(f"{where}: the directory now holds a different index")
    if not 0 <= ref.shard_no < manifest["n_shards"]:
        raise CorruptIndex(f"{where}: no shard {ref.shard_no}")
    spec = IndexSpec.from_dict(manifest["spec"])
    dim = int(manifest["dim"])
    entry = manifest["shards"][ref.shard_no]
    path = store.resolve_index_file(ref.index_dir, entry["file"])
    index, nbytes = _read_faiss_file(path, entry["checksum"], "shard")
    if index.d != dim:
        raise CorruptIndex(f"{path}: shard dimension {index.d} != manifest dim {dim}")
    if int(index.ntotal) != entry["count"]:
        raise CorruptIndex(f"{path}: shard holds {index.ntotal} vectors, manifest says "
                           f"{entry['count']}")
    refine = None
    if spec.info.refine:
        rpath = store.resolve_index_file(ref.index_dir, entry.get("refine_file", ""))
        refine, _ = _read_faiss_file(rpath, entry.get("refine_checksum"), "refine store")
    meta_path = store.resolve_index_file(ref.index_dir, entry["meta"])
    if not meta_path.is_file():
        raise CorruptIndex(f"{meta_path}: shard records file is missing")
    if store.file_checksum(meta_path) != entry["meta_checksum"]:
        raise CorruptIndex(f"{meta_path}: shard records checksum mismatch")
    records = store.read_records(meta_path, manifest["index_uuid"], ref.shard_no)
    shard = Shard(ref, spec, dim, index, records, refine=refine, nbytes_on_disk=nbytes)
    if entry.get("bm25"):
        shard.set_sparse_index(_load_sparse(ref.index_dir, entry["bm25"]))
    _replay_wal(shard, ref.index_dir, int(manifest["wal_seq"]))
    return shard


def _load_sparse(index_dir: str, name: str) -> Any:
    """The persisted BM25 index, or None (then it is rebuilt from the records on first use)."""
    import logging

    from dask_rag.rag.fusion import SparseIndex

    try:
        return SparseIndex.load(store.resolve_index_file(index_dir, name))
    except (OSError, ValueError, KeyError) as exc:
        logging.getLogger(__name__).warning("%s/%s unreadable (%s); rebuilding BM25 from the "
                                            "shard records", index_dir, name, exc)
        return None


def _replay_wal(shard: Shard, index_dir: str, after_seq: int) -> None:
    shard.applied_seq = after_seq
    for entry in store.read_wal(index_dir, after_seq):
        shard.applied_seq = entry.seq
        if entry.op == "add":
            assert entry.shards is not None and entry.vectors is not None
            mine = entry.shards == shard.ref.shard_no
            if not mine.any():
                continue
            recs = entry.records()
            lists = entry.lists[mine] if entry.lists is not None else None
            shard.add(entry.vectors[mine], entry.ids[mine],
                      None if recs is None else [r for r, m in zip(recs, mine, strict=True) if m],
                      lists)
        elif entry.op == "remove":
            shard.remove(entry.ids)
        else:
            raise CorruptIndex(f"{index_dir}/wal: unknown operation {entry.op!r}")


@sizeof.register(Shard)
def _sizeof_shard(shard: Shard) -> int:
    return shard.nbytes
