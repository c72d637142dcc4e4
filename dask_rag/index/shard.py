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

They are guards, not guarantees: the scheduler does copy a shard when it places a dependent
task on another worker (a busy holder, a dependency elsewhere), and from then on the key has
two copies and each later write lands on *one* of them — reads on the other missed
acknowledged writes.  So every copy is kept honest by sequence numbers instead: a read or
write task carries the last write-ahead-log entry it must see (``min_seq``) and
:meth:`Shard.catch_up` replays what that copy lacks from the log (or reloads it, when a save
has folded the log) before answering.  Whatever the scheduler does with copies, a read is at
least as new as every write acknowledged before it was submitted.

Why one module of ~650 lines: a shard's faiss index, records table, tombstones, BM25 index and
flat view change together under one read/write lock; split, that lock would span modules.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from dask.sizeof import sizeof

from dask_rag.config import IndexSpec
from dask_rag.errors import CorruptIndex, InvalidInput, ShardUnavailable
from dask_rag.faults import fault_point
from dask_rag.index import store
from dask_rag.index.backends import add_to_index, all_vectors, configure_faiss, new_shard_index
from dask_rag.index.exact import FlatVectors
from dask_rag.index.filters import MetadataColumns, SearchFilter
from dask_rag.index.kinds import shard_kind
from dask_rag.index.manifest import ShardEntry
from dask_rag.index.merge import empty_result
from dask_rag.index.wal import WalEntry, read_wal

__all__ = ["HIT_COLUMNS", "Shard", "ShardRef", "load_shard", "make_records_table"]


@dataclass(frozen=True)
class ShardRef:
    """Where a shard comes from: enough to (re)load it on any worker."""

    index_dir: str
    shard_no: int
    index_uuid: str


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


class Shard:
    """A searchable, mutable shard.  Created by :func:`load_shard` on a worker.

    Why ~30 methods in one class: the faiss index, the records table, the deleted ids and
    the applied log position change together under one read-write lock (searches, writes,
    catch-up, saves must each see one consistent state).  How it searches (faiss / ScaNN /
    torch, flat / IVF / HNSW) is a strategy picked once at load (:mod:`dask_rag.index.kinds`).
    """

    def __init__(self, ref: ShardRef, spec: IndexSpec, dim: int, index: Any, records: Any,
                 refine: Any | None = None, nbytes_on_disk: int = 0) -> None:
        self.ref = ref
        self.spec = spec
        self.dim = dim
        self.strategy = shard_kind(spec)
        self.index = index
        self.refine = refine
        self._ids: npt.NDArray[np.int64] | None = None
        self.records = records
        self.deleted: set[int] = set()
        #: sequence number of the last write-ahead-log entry reflected in memory
        self.applied_seq = 0
        self._lock = _RWLock()
        self._nbytes_disk = nbytes_on_disk
        #: the strategy's search structure (torch / ScaNN / faiss-gpu), rebuilt after mutation
        self.view: Any = None
        self._flat: FlatVectors | None = None  # flat shards' vectors by id, rebuilt likewise
        #: BM25 over the records' text: built when first needed, then updated by each write
        self._sparse: Any = None
        self._sparse_lock = threading.Lock()
        #: serialises catching up and applying log entries (searches keep running meanwhile)
        self._seq_lock = threading.RLock()
        self._prepare()

    @property
    def records(self) -> Any:
        """The shard's chunk records (a pyarrow Table sorted by ``id``)."""
        return self._records

    @records.setter
    def records(self, table: Any) -> None:
        self._records = table
        self._ids = None  # the id column's numpy copy, rebuilt on first use
        self._columns: MetadataColumns | None = None  # what filters test, rebuilt likewise

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
        total = n * self.strategy.vector_bytes(self) + int(self.records.nbytes) + 1024
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
        self.view = self.strategy.view(self)

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
        from dask_rag.index.sparse import SparseIndex

        with self._sparse_lock:
            if self._sparse is None:
                # built and kept under the read lock: a write waits for it and then updates
                # it (else a write in between was lost for BM25 until the next one)
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

    def selector(self, allowed: npt.NDArray[np.int64] | None) -> Any | None:
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
        ``add``/``remove`` swaps the records table and the tombstones.  The metadata columns
        are parsed on the first filtered search and kept until the records change.
        """
        with self._lock.read():
            if self._columns is None:
                self._columns = MetadataColumns(self.records.column("source").to_pylist(),
                                                self.records.column("metadata").to_pylist())
            mask = flt.mask(self._columns)
            return self._live(self._table_ids()[mask])

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
        # (tombstones need no allowed list: the selector leaves them out, and building one
        # of every live id cost each unfiltered search O(shard) — 6 ms per 100k ids)
        n_live = self.ntotal if allowed is None else int(allowed.size)
        return self.strategy.search(self, xq, k, Iq=Iq, Dq=Dq, nprobe=nprobe,
                                    ef_search=ef_search, allowed=allowed, n_live=n_live)

    def flat_view(self) -> FlatVectors:
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

    def ids_of_sources(self, sources: Sequence[str]) -> npt.NDArray[np.int64]:
        """Ids of this shard's live chunks whose source is one of ``sources``."""
        import pyarrow as pa
        import pyarrow.compute as pc

        with self._lock.read():
            mask = pc.is_in(self.records.column("source"),
                            value_set=pa.array(list(sources), type=pa.string()))
            ids = self._table_ids()[np.asarray(pc.fill_null(mask, False), dtype=bool)]
            return self._live(ids)

    def doc_index(self) -> list[tuple[int, str | None, str | None]]:
        """(id, source, doc_hash) of every live chunk: what incremental ingestion diffs against."""
        with self._lock.read():
            ids = self.records.column("id").to_pylist()
            src = self.records.column("source").to_pylist()
            dh = self.records.column("doc_hash").to_pylist()
            return [(i, s, h) for i, s, h in zip(ids, src, dh, strict=True)
                    if i not in self.deleted]

    # ---- the write-ahead log ------------------------------------------------------------

    def catch_up(self, min_seq: int) -> None:
        """Make this copy reflect every log entry up to ``min_seq`` (at least) before it
        answers: replay the entries it lacks, or reload it from the saved files when a save
        has folded them; a no-op (one comparison) when it is current.

        Why: the scheduler may hold a shard under one key on several workers, and a write task
        runs on only one of them (see the module docstring).  Raises
        :class:`~dask_rag.errors.ShardUnavailable` when the log does not reach ``min_seq``.
        """
        if min_seq <= self.applied_seq:
            return
        with self._seq_lock:
            for _ in range(5):
                if min_seq <= self.applied_seq:
                    return
                fault_point("shard.catch_up")
                manifest = store.read_manifest(self.ref.index_dir)
                if manifest.index_uuid != self.ref.index_uuid:
                    raise CorruptIndex(f"{self.ref.index_dir}/{store.MANIFEST}: the directory "
                                       "now holds a different index")
                if manifest.wal_seq > self.applied_seq:
                    self._adopt(load_shard(self.ref))  # a save folded entries this copy lacks
                    continue
                root = str(store.local_index_dir(self.ref.index_dir, manifest,
                                                 shard_no=self.ref.shard_no, wal=True))
                try:
                    _replay_wal(self, root, self.applied_seq)
                except WalGap:
                    continue  # a save deleted entries meanwhile: read the manifest again
            if min_seq > self.applied_seq:
                raise ShardUnavailable(
                    f"shard {self.ref.shard_no} of {self.ref.index_dir}: the write-ahead log "
                    f"ends at entry {self.applied_seq}, a write acknowledged entry {min_seq}")

    def apply_entry(self, seq: int, apply: Any) -> None:
        """Run ``apply()`` (log entry ``seq``, already durable) unless this copy reflects
        it; entries before it are caught up first, so a copy never skips one."""
        with self._seq_lock:
            self.catch_up(seq - 1)
            if seq > self.applied_seq:
                apply()
                self.applied_seq = seq

    def _adopt(self, fresh: Shard) -> None:
        """Take over a freshly loaded copy's state (in place: the key's value is this
        object)."""
        with self._lock.write():
            self.index, self.refine, self.records = fresh.index, fresh.refine, fresh.records
            self.deleted = fresh.deleted
            self._nbytes_disk = fresh._nbytes_disk
            self._sparse = fresh._sparse
            self.view, self._flat = fresh.view, fresh._flat
            self.applied_seq = fresh.applied_seq

    # ---- mutation ---------------------------------------------------------------------------

    def add(self, xb: npt.NDArray[np.float32], ids: npt.NDArray[np.int64],
            records: list[dict[str, Any]] | None = None,
            lists: npt.NDArray[np.int64] | None = None) -> int:
        """Add vectors (with their records); ``lists`` are precomputed IVF assignments."""
        import pyarrow as pa

        if len(ids) == 0:
            return 0
        with self._lock.write():
            if self.deleted:
                self._bury(ids)
            add_to_index(self.index, xb, ids, lists)
            if self.refine is not None:
                self.refine.add_with_ids(xb, ids)
            added = make_records_table(ids, records)
            self.records = pa.concat_tables([self._drop_records(ids), added]).sort_by("id")
            self._prepare()
            if self._sparse is not None:  # (else built from the records when first needed)
                self._sparse = self._sparse.changed(ids, added.column("id").to_numpy(),
                                                    added.column("text").to_pylist())
        return len(ids)

    def _bury(self, ids: npt.NDArray[np.int64]) -> None:
        """Before tombstoned ``ids`` are added again: their old graph nodes get labels of
        their own, tombstoned in their place, so that only the new nodes answer to the ids.

        Why: an HNSW graph cannot drop a node, and faiss's id map labels a node by the id it
        was added with — an upsert left the old node (the old vector) answering to the id
        beside the new one, in searches and after the next save's compaction.  The labels
        are negative (-2 - the node's position), which no user id can be (ids are >= 0 and
        -1 marks a missing hit); the save's compaction drops them with the other tombstones.
        """
        import faiss

        back = [int(i) for i in ids if int(i) in self.deleted]
        if not back:
            return
        labels = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        nodes = np.flatnonzero(np.isin(labels, np.asarray(back, dtype=np.int64)))
        labels[nodes] = -2 - nodes
        faiss.copy_array_to_vector(labels, self.index.id_map)
        self.index.construct_rev_map()
        self.deleted.difference_update(back)
        self.deleted.update(int(x) for x in labels[nodes])

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
            if self.strategy.tombstones:
                # HNSW graphs cannot drop nodes: tombstone now, compact on the next save
                self.deleted.update(int(i) for i in mine)
            else:
                self.index.remove_ids(faiss.IDSelectorBatch(mine))
                self.records = self._drop_records(mine)
            if self.refine is not None:
                self.refine.remove_ids(faiss.IDSelectorBatch(mine))
            self._prepare()
            if self._sparse is not None:
                self._sparse = self._sparse.changed(mine, np.zeros(0, np.int64), [])
            return int(mine.size)

    def compact(self) -> None:
        """Rebuild a tombstoned HNSW shard without its deleted nodes."""
        if not self.deleted:
            return
        with self._lock.write():
            ids, vecs = all_vectors(self.index)
            gone = self._deleted_ids()
            keep = ~np.isin(ids, gone)
            fresh = new_shard_index(self.spec, self.dim, None)
            fresh.add_with_ids(vecs[keep], ids[keep])
            self.index = fresh
            self.records = self._drop_records(gone)
            self.deleted.clear()
            self._prepare()

    # ---- persistence ------------------------------------------------------------------------

    def write(self, index_dir: str, generation: int, index_uuid: str) -> ShardEntry:
        """Write this shard's files for ``generation``; returns its manifest entry."""
        self.compact()
        has_text = self.records.column("text").null_count < self.records.num_rows
        sparse = self.sparse_index() if has_text else None
        with self._lock.read():
            return store.write_shard_files(index_dir, self.ref.shard_no, generation,
                                           index_uuid, self.index, self.records, self.refine,
                                           sparse)


def _pa_ids(ids: npt.NDArray[np.int64]) -> Any:
    import pyarrow as pa

    return pa.array(np.asarray(ids, dtype=np.int64), type=pa.int64())


def load_shard(ref: ShardRef) -> Shard:
    """Load shard ``ref.shard_no`` of the index at ``ref.index_dir``, replaying its WAL.

    This is the task behind every shard future; it is pure with respect to the directory's
    committed state, so the scheduler can re-run it anywhere after a worker dies.  A save that
    commits while this reads (its log entries deleted under us) makes it start again from the
    new manifest.
    """
    for _ in range(4):
        try:
            return _load_shard_once(ref)
        except WalGap:
            continue
    return _load_shard_once(ref)


def _load_shard_once(ref: ShardRef) -> Shard:
    configure_faiss()
    manifest = store.read_manifest(ref.index_dir)
    where = f"{ref.index_dir}/{store.MANIFEST}"
    if manifest.index_uuid != ref.index_uuid:
        raise CorruptIndex(f"{where}: the directory now holds a different index")
    if not 0 <= ref.shard_no < manifest.n_shards:
        raise CorruptIndex(f"{where}: no shard {ref.shard_no}")
    # the index directory itself, or (object store) this worker's copy of this shard's files
    root = str(store.local_index_dir(ref.index_dir, manifest, shard_no=ref.shard_no, wal=True))
    spec = IndexSpec.from_dict(manifest.spec)
    dim = manifest.dim
    entry = manifest.shards[ref.shard_no]
    path = store.resolve_index_file(root, entry.file)
    index, nbytes = store.read_faiss_file(path, entry.checksum, "shard")
    if index.d != dim:
        raise CorruptIndex(f"{path}: shard dimension {index.d} != manifest dim {dim}")
    if int(index.ntotal) != entry.count:
        raise CorruptIndex(f"{path}: shard holds {index.ntotal} vectors, manifest says "
                           f"{entry.count}")
    refine = None
    if spec.info.refine:
        rpath = store.resolve_index_file(root, entry.refine_file or "")
        refine, _ = store.read_faiss_file(rpath, entry.refine_checksum, "refine store")
    meta_path = store.resolve_index_file(root, entry.meta)
    if not meta_path.is_file():
        raise CorruptIndex(f"{meta_path}: shard records file is missing")
    if store.file_checksum(meta_path) != entry.meta_checksum:
        raise CorruptIndex(f"{meta_path}: shard records checksum mismatch")
    records = store.read_records(meta_path, manifest.index_uuid, ref.shard_no)
    shard = Shard(ref, spec, dim, index, records, refine=refine, nbytes_on_disk=nbytes)
    if entry.bm25:
        shard.set_sparse_index(_load_sparse(root, entry.bm25))
    fault_point("shard.load")
    _replay_wal(shard, root, manifest.wal_seq)
    return shard


def _load_sparse(index_dir: str, name: str) -> Any:
    """The persisted BM25 index, or None (then it is rebuilt from the records on first use)."""
    import logging

    from dask_rag.index.sparse import SparseIndex

    try:
        return SparseIndex.load(store.resolve_index_file(index_dir, name))
    except (OSError, ValueError, KeyError) as exc:
        logging.getLogger(__name__).warning("%s/%s unreadable (%s); rebuilding BM25 from the "
                                            "shard records", index_dir, name, exc)
        return None


class WalGap(CorruptIndex):
    """The log entries after a shard's state are not contiguous: a save deleted them while
    they were read (retried from the new manifest; persistent, it is corruption)."""


def _replay_wal(shard: Shard, index_dir: str, after_seq: int) -> None:
    """Apply the log entries after ``after_seq`` in order.  Entries are numbered without gaps
    (one writer assigns them under its lock), so a gap means a concurrent save folded and
    deleted some: :class:`WalGap`, with the shard consistent up to ``applied_seq``."""
    shard.applied_seq = after_seq
    try:
        entries = list(read_wal(index_dir, after_seq))
    except FileNotFoundError as exc:
        raise WalGap(f"{index_dir}/wal: an entry disappeared while read ({exc})") from None
    for entry in entries:
        if entry.seq != shard.applied_seq + 1:
            raise WalGap(f"{index_dir}/wal: entry {shard.applied_seq + 1} is missing "
                         f"(next is {entry.seq})")
        _apply_logged(shard, entry, index_dir)
        shard.applied_seq = entry.seq  # after the change: a concurrent reader checks this


def _apply_logged(shard: Shard, entry: WalEntry, index_dir: str) -> None:
    if entry.op == "add":
        assert entry.shards is not None and entry.vectors is not None
        if entry.removed is not None:
            shard.remove(entry.removed)
        mine = entry.shards == shard.ref.shard_no
        if not mine.any():
            return
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
