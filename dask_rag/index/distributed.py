"""`DistributedIndex`: a faiss index sharded across a Dask cluster as worker-local futures.

Each shard is the result of a *load task* (:func:`~dask_rag.index.shard.load_shard`) that reads
the index directory, so it is recomputed from disk on another worker if its worker dies.  A query
batch becomes a small graph: one search task per shard that must be visited (it takes the shard
future as a dependency, so it runs where the shard lives and only the query rows travel), then a
tree of merge tasks (fan-in 4) producing the global top-k.

The index directory must be readable by every worker (a local disk on a LocalCluster, a shared
filesystem on a real cluster).  Only one process should mutate an index directory at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from distributed import Client, Future, wait

from dask_rag.config import CommConfig, IndexSpec
from dask_rag.errors import CorruptIndex, DaskRagError, InvalidInput, ShardUnavailable
from dask_rag.index import store
from dask_rag.index.merge import empty_result, merge_topk, topk_positions
from dask_rag.index.routing import Router, balance_lists, coarse_assign, range_boundaries
from dask_rag.index.shard import (
    SearchFilter,
    Shard,
    ShardRef,
    ShardResult,
    build_shard_files,
    configure_faiss,
    load_shard,
)
from dask_rag.plugins import tune_comms

__all__ = ["DistributedIndex", "SearchOptions", "await_future"]

MERGE_FAN_IN = 4


# ------------------------------------------------------------------------------------------------
# input validation (before any work is scheduled)
# ------------------------------------------------------------------------------------------------


def check_vectors(x: Any, dim: int | None, name: str = "vectors") -> npt.NDArray[np.float32]:
    """A C-contiguous float32 ``(n, dim)`` array, or InvalidInput saying what is wrong."""
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{name} is not an array: {exc}") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)
                                    and not np.issubdtype(arr.dtype, np.complexfloating)):
        raise InvalidInput(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise InvalidInput(f"{name} must be a 2-D array of shape (n, d), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise InvalidInput(f"{name} is empty (shape {arr.shape})")
    if dim is not None and arr.shape[1] != dim:
        raise InvalidInput(f"{name} has dimension {arr.shape[1]}, the index has dimension {dim}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = int(np.flatnonzero(~finite.all(axis=1))[0])
        raise InvalidInput(f"{name} row {bad} contains NaN or infinite values")
    return arr


def check_ids(ids: Any, n: int, name: str = "ids") -> npt.NDArray[np.int64]:
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise InvalidInput(f"{name} must be a 1-D array of {n} integers, got shape {arr.shape}")
    if n and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInput(f"{name} must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if n and arr.min() < 0:
        raise InvalidInput(f"{name} must be >= 0 (-1 marks a missing hit)")
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise InvalidInput(f"{name} contains duplicates, e.g. {int(uniq[counts > 1][0])}")
    return arr


def check_k(k: Any, max_k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InvalidInput(f"k={k!r} is invalid: must be an integer")
    if k <= 0:
        raise InvalidInput(f"k={k} is invalid: must be >= 1")
    if k > max_k:
        raise InvalidInput(f"k={k} is invalid: the maximum is {max_k} (IndexSpec.max_k)")
    return int(k)


# ------------------------------------------------------------------------------------------------
# tasks (run on workers)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchOptions:
    """Per-batch search parameters sent with each search task."""

    k: int
    nprobe: int | None = None
    ef_search: int | None = None
    flt: SearchFilter | None = None
    with_records: bool = False
    sparse_queries: tuple[str, ...] | None = None
    sparse_k: int = 0
    dense: bool = True


def search_shard_task(shard: Shard, rows: npt.NDArray[np.int64], xq: npt.NDArray[np.float32],
                      Iq: npt.NDArray[np.int64] | None, Dq: npt.NDArray[np.float32] | None,
                      opts: SearchOptions) -> ShardResult:
    t0 = time.perf_counter()
    # the filter is a pass over the shard's records: evaluate it once for dense and BM25
    allowed = shard.filter_ids(opts.flt) if opts.flt is not None else None
    if opts.dense:
        D, I = shard.search(xq, opts.k, Iq=Iq, Dq=Dq, nprobe=opts.nprobe,
                            ef_search=opts.ef_search, allowed=allowed)
    else:
        D, I = empty_result(len(rows), opts.k, shard.spec.metric)
    sparse = None
    if opts.sparse_queries is not None:
        from dask_rag.rag.fusion import search_sparse

        sparse = search_sparse(shard, rows, [opts.sparse_queries[r] for r in rows],
                               opts.sparse_k, allowed, with_records=not opts.with_records)
    payload = None
    if opts.with_records:  # dense and BM25 hits' records in one lookup
        if sparse is None:
            (payload,) = shard.fetch_rows(I)
        else:
            payload, sparse.payload = shard.fetch_rows(I, sparse.I)
    return ShardResult(rows=rows, D=D, I=I, payload=payload, sparse=sparse,
                       shards=(shard.ref.shard_no,),
                       search_ms=(time.perf_counter() - t0) * 1e3)


def merge_results_task(nq: int, k: int, metric: str, *parts: ShardResult) -> ShardResult:
    """Merge partial results (each covering some rows) into one result over their rows."""
    rows = np.unique(np.concatenate([p.rows for p in parts])) if parts else np.zeros(0, np.int64)
    D_full, I_full = [], []
    payload_cols: list[list[list[dict[str, Any] | None]]] = []
    with_payload = any(p.payload is not None for p in parts)
    for p in parts:
        D, I = empty_result(nq, p.D.shape[1], metric)
        D[p.rows] = p.D
        I[p.rows] = p.I
        D_full.append(D)
        I_full.append(I)
        if with_payload:
            cols: list[list[dict[str, Any] | None]] = [[None] * p.D.shape[1] for _ in range(nq)]
            for r, recs in zip(p.rows, p.payload or [], strict=False):
                cols[int(r)] = list(recs)
            payload_cols.append(cols)
    D_cat = np.concatenate(D_full, axis=1)
    I_cat = np.concatenate(I_full, axis=1)
    D_m, I_m = merge_topk([D_cat], [I_cat], k, metric)
    payload = None
    if with_payload:
        pos = topk_positions(D_cat, I_cat, k, metric)
        flat_rows = [[rec for c in payload_cols for rec in c[r]] for r in range(nq)]
        payload = [[flat_rows[r][int(p)] if I_m[r, j] >= 0 else None
                    for j, p in enumerate(pos[r])] for r in range(nq)]
        payload = [row + [None] * (k - len(row)) for row in payload]
    sparse = None
    if any(p.sparse is not None for p in parts):
        from dask_rag.rag.fusion import merge_sparse

        sparse = merge_sparse(nq, [p for p in parts if p.sparse is not None])
    shards = tuple(sorted({s for p in parts for s in p.shards}))
    return ShardResult(rows=rows, D=D_m[rows], I=I_m[rows],
                       payload=None if payload is None else [payload[int(r)] for r in rows],
                       sparse=sparse, shards=shards,
                       search_ms=max((p.search_ms for p in parts), default=0.0))


def _merge_group(parts: list[ShardResult], nq: int, k: int, metric: str) -> ShardResult:
    """One node of the merge tree (``client.map`` passes its group of parts as one list)."""
    return merge_results_task(nq, k, metric, *parts)


def apply_add_task(shard: Shard, seq: int, xb: npt.NDArray[np.float32],
                   ids: npt.NDArray[np.int64], records: list[dict[str, Any]] | None,
                   lists: npt.NDArray[np.int64] | None) -> int:
    if seq <= shard.applied_seq:  # already replayed from the WAL by a reload
        return 0
    n = shard.add(xb, ids, records, lists)
    shard.applied_seq = seq
    return n


def apply_remove_task(shard: Shard, seq: int, ids: npt.NDArray[np.int64]) -> int:
    if seq <= shard.applied_seq:
        return 0
    n = shard.remove(ids)
    shard.applied_seq = seq
    return n


def shard_count_task(shard: Shard) -> int:
    return shard.ntotal


def contains_task(shard: Shard, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    return shard.contains(ids)


def fetch_task(shard: Shard, ids: npt.NDArray[np.int64]) -> list[dict[str, Any] | None]:
    return shard.fetch(ids)


def doc_index_task(shard: Shard) -> list[tuple[int, str | None, str | None]]:
    return shard.doc_index()


def write_shard_task(shard: Shard, index_dir: str, generation: int, index_uuid: str
                     ) -> dict[str, Any]:
    return shard.write(index_dir, generation, index_uuid)


def gather_direct(client: Client, futures: Any) -> Any:
    """``client.gather`` straight from the workers holding the results.

    distributed's default for a client outside the cluster relays every result through the
    scheduler — a second hop, and CPU on the one process every request shares (on the serving
    path that relay was ~half of the scheduler's work).  A client created with
    ``direct_to_workers=False`` (workers unreachable from it, e.g. behind a gateway) keeps
    the relay.
    """
    return client.gather(futures, direct=client.direct_to_workers is not False)


async def await_future(fut: Future) -> Any:
    """Await a Dask future of a synchronous client from any asyncio loop without blocking it.

    distributed runs done-callbacks in a helper thread, so the (possibly blocking) ``result()``
    call happens there and only the outcome is handed to the event loop.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def _deliver(ok: bool, value: Any) -> None:
        if done.done():
            return
        if ok:
            done.set_result(value)
        else:
            done.set_exception(value)

    def _on_done(f: Future) -> None:
        try:
            value, ok = gather_direct(f.client, f), True
        except BaseException as exc:
            value, ok = exc, False
        loop.call_soon_threadsafe(_deliver, ok, value)

    fut.add_done_callback(_on_done)
    return await done


def _raise_shard_error(exc: BaseException) -> None:
    if isinstance(exc, DaskRagError):
        raise exc
    name = type(exc).__name__
    if name in ("KilledWorker", "CancelledError", "FutureCancelledError", "CommClosedError"):
        raise ShardUnavailable(f"a shard could not be searched: {name}: {exc}") from exc
    raise exc


# ------------------------------------------------------------------------------------------------
# the index
# ------------------------------------------------------------------------------------------------


class DistributedIndex:
    """A vector index whose shards are persisted futures on a Dask cluster.

    Build one with :meth:`build` (from vectors) or :meth:`load` (from an index directory);
    search with :meth:`search` (``(nq, k)`` distances and ids, ``-1`` padding, faiss
    conventions).  The results of ``ivf`` sharding equal those of a single faiss IVF index with
    the same quantizer and ``nprobe``; sharded ``Flat`` equals exact search.
    """

    def __init__(self, client: Client, path: Path, manifest: dict[str, Any], router: Router,
                 template: Any, owns_dir: bool = False) -> None:
        self.client = client
        self.path = path
        self.manifest = manifest
        self.spec = IndexSpec.from_dict(manifest["spec"])
        self.router = router
        self._template = template
        self._owns_dir = owns_dir
        self._shards: list[Future] = []
        self._counts: list[int] = []
        self._lock = threading.RLock()
        self._write_lock = threading.Lock()
        self._epoch = 0
        # unique per open index: two loads of one directory (or of copies of it, which share
        # an index uuid) must never share shard keys on the scheduler
        self._token = uuid.uuid4().hex[:8]
        self._closed = False

    # ---- properties ---------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def metric(self) -> str:
        return str(self.manifest["metric"])

    @property
    def n_shards(self) -> int:
        return int(self.manifest["n_shards"])

    @property
    def ntotal(self) -> int:
        return int(sum(self._counts))

    @property
    def index_uuid(self) -> str:
        return str(self.manifest["index_uuid"])

    @property
    def shard_futures(self) -> list[Future]:
        with self._lock:
            return list(self._shards)

    def __repr__(self) -> str:
        return (f"<DistributedIndex {self.spec.factory} {self.spec.resolved_sharding} x"
                f"{self.n_shards} dim={self.dim} metric={self.metric} ntotal={self.ntotal} "
                f"path={str(self.path)!r}>")

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def build(cls, client: Client, xb: Any, ids: Any = None, spec: IndexSpec | None = None, *,
              path: str | Path | None = None, records: Sequence[dict[str, Any]] | None = None,
              embed: dict[str, Any] | None = None, overwrite: bool = False,
              comms: CommConfig | None = CommConfig(), progress: bool = False
              ) -> DistributedIndex:
        """Train, shard and write an index of ``xb`` to ``path`` (a temp dir if None), then load it.

        ``records`` (one dict per vector: text, source, metadata, doc_hash) are stored beside
        the vectors of each shard.  ``embed`` describes the encoder that produced ``xb`` and is
        recorded in the manifest.  An existing index at ``path`` is replaced only with
        ``overwrite=True``, and only after the new one is completely written.
        """
        spec = spec or IndexSpec()
        xb = check_vectors(xb, None, "xb")
        n, dim = xb.shape
        ids = np.arange(n, dtype=np.int64) if ids is None else check_ids(ids, n)
        if records is not None and len(records) != n:
            raise InvalidInput(f"records has {len(records)} entries for {n} vectors")
        info = spec.info
        sharding = spec.resolved_sharding
        if info.kind == "ivf" and n < info.nlist:
            raise InvalidInput(f"{spec.factory!r} needs at least {info.nlist} training vectors, "
                               f"got {n}")
        if info.pq_m and dim % info.pq_m:
            raise InvalidInput(f"{spec.factory!r}: PQ{info.pq_m} needs a dimension divisible by "
                               f"{info.pq_m}, got {dim}")
        owns_dir = path is None
        target = Path(tempfile.mkdtemp(prefix="dask-rag-index-")) if path is None else Path(path)
        if not owns_dir:
            store.check_fresh_target(target)
            if (target / store.MANIFEST).exists() and not overwrite:
                raise InvalidInput(f"an index already exists at {str(target)!r}; load it, or "
                                   "pass overwrite=True to replace it")
        if comms is not None:
            tune_comms(client, comms)

        template, template_bytes = _train_template(spec, xb)
        router, shard_of, lists = _plan_shards(spec, sharding, template, xb, ids)
        index_uuid = store.new_index_uuid()
        staging = target if owns_dir else _staging_dir(target)
        try:
            entries = _write_shards(client, staging, index_uuid, spec, dim, template_bytes, xb,
                                    ids, shard_of, lists, records, progress)
            manifest = _new_manifest(index_uuid, spec, dim, router, entries, embed)
            if template_bytes is not None:
                store.atomic_write_bytes(staging / store.QUANTIZER, template_bytes)
                manifest["quantizer"] = {"file": store.QUANTIZER,
                                         "checksum": store.file_checksum(staging / store.QUANTIZER)}
            store.atomic_write_json(staging / store.MANIFEST, manifest)
            if not owns_dir:
                _swap_into_place(staging, target)
        except BaseException:  # the staging dir (or the index's own temp dir) is incomplete
            shutil.rmtree(staging, ignore_errors=True)
            raise
        index = cls.load(client, target, comms=None, progress=progress)
        index._owns_dir = owns_dir
        return index

    @classmethod
    def load(cls, client: Client, path: str | Path, *, comms: CommConfig | None = CommConfig(),
             progress: bool = False) -> DistributedIndex:
        """Open the index at ``path``: one load task per shard, spread over the workers."""
        configure_faiss()
        path = Path(path).resolve()
        store.recover_interrupted_swap(path)
        manifest = store.read_manifest(path)
        where = str(path / store.MANIFEST)
        try:
            spec = IndexSpec.from_dict(manifest["spec"])
        except (InvalidInput, TypeError) as exc:
            raise CorruptIndex(f"{where}: invalid index spec ({exc})") from None
        template = None
        if manifest["quantizer"] is not None:
            template = _read_template(path, manifest["quantizer"])
        router = _router_from_manifest(manifest, spec, template, where)
        if comms is not None:
            tune_comms(client, comms)
        index = cls(client, path, manifest, router, template)
        index._start_shards(progress=progress)
        return index

    def _shard_key(self, shard_no: int) -> tuple[str, int]:
        return (f"dask-rag-shard-{self.index_uuid[:8]}{self._token}-{self._epoch}", shard_no)

    def _start_shards(self, progress: bool = False) -> None:
        from dask_rag.cluster import resource_request

        workers = _current_workers(self.client)
        resources = resource_request(self.client, "shard")
        if resources:  # only workers declaring a 'shard' resource may hold shards
            info = self.client.scheduler_info(n_workers=-1)["workers"]
            workers = [w for w in workers if "shard" in (info[w].get("resources") or {})]
        futures = []
        for s in range(self.n_shards):
            ref = ShardRef(str(self.path), s, self.index_uuid)
            target = [workers[s % len(workers)]] if workers else None
            futures.append(self.client.submit(load_shard, ref, key=self._shard_key(s),
                                              workers=target,
                                              allow_other_workers=target is not None,
                                              resources=resources, pure=False))
        _wait_with_progress(futures, "loading shards", progress)
        for f in futures:
            if f.status == "error":
                raise f.exception()
        self._shards = futures
        self._counts = [int(c) for c in self.client.gather(
            [self.client.submit(shard_count_task, f, pure=False) for f in futures])]

    # ---- search -------------------------------------------------------------------------------

    def _submit_parts(self, xq: npt.NDArray[np.float32], k: int, nprobe: int | None, *,
                      ef_search: int | None, filter: SearchFilter | dict[str, Any] | None,
                      with_records: bool, sparse_queries: Sequence[str] | None,
                      sparse_k: int | None, dense: bool = True) -> tuple[list[Future], str]:
        """Route a validated batch and submit its search tasks, tree-reduced to <= 4 parts."""
        self._check_open()
        nq = xq.shape[0]
        if nprobe is not None and (isinstance(nprobe, bool) or not isinstance(nprobe, int)
                                   or nprobe < 1):
            raise InvalidInput(f"nprobe={nprobe!r} is invalid: must be an integer >= 1")
        flt = SearchFilter.from_dict(filter) if isinstance(filter, dict) else filter
        if sparse_queries is not None and len(sparse_queries) != nq:
            raise InvalidInput("sparse_queries must have one string per query row")
        nprobe_eff = nprobe or self.spec.nprobe
        # sparse-only batches visit every shard: BM25 has no coarse quantizer to route by
        routed = self.router.route(xq, nprobe_eff if dense and self.spec.info.kind == "ivf"
                                   else None)
        opts = SearchOptions(k=k, nprobe=nprobe_eff, ef_search=ef_search, flt=flt,
                             with_records=with_records,
                             sparse_queries=None if sparse_queries is None else tuple(
                                 sparse_queries),
                             sparse_k=sparse_k or k, dense=dense)
        token = uuid.uuid4().hex
        with self._lock:
            shards = list(self._shards)
        # one map call = one update_graph message for the whole fan-out (a submit per shard
        # costs the client and the scheduler one graph each)
        parts: list[Future] = self.client.map(
            search_shard_task, [shards[r.shard] for r in routed], [r.rows for r in routed],
            [xq[r.rows] for r in routed], [r.Iq for r in routed], [r.Dq for r in routed],
            opts=opts, key=[(f"dask-rag-search-{token}", r.shard) for r in routed], pure=False,
            priority=10)
        level = 0
        while len(parts) > MERGE_FAN_IN:
            groups = [parts[i:i + MERGE_FAN_IN] for i in range(0, len(parts), MERGE_FAN_IN)]
            parts = self.client.map(
                _merge_group, groups, nq=nq, k=k, metric=self.metric,
                key=[(f"dask-rag-merge-{token}", level, g) for g in range(len(groups))],
                pure=False, priority=10)
            level += 1
        return parts, f"{token}:{level}"

    def submit_search(self, xq: Any, k: int = 10, nprobe: int | None = None, *,
                      ef_search: int | None = None,
                      filter: SearchFilter | dict[str, Any] | None = None,
                      with_records: bool = False, sparse_queries: Sequence[str] | None = None,
                      sparse_k: int | None = None) -> Future:
        """Submit the whole search graph of one batch, merge included; returns the future of
        a ShardResult — for chaining further tasks (fusion, rerank, generation) onto it."""
        xq = check_vectors(xq, self.dim, "xq")
        k = check_k(k, self.spec.max_k)
        parts, tag = self._submit_parts(xq, k, nprobe, ef_search=ef_search, filter=filter,
                                        with_records=with_records,
                                        sparse_queries=sparse_queries, sparse_k=sparse_k)
        token, level = tag.split(":")
        return self.client.submit(merge_results_task, xq.shape[0], k, self.metric, *parts,
                                  key=(f"dask-rag-merge-{token}", int(level), 0), pure=False,
                                  priority=10)

    def search(self, xq: Any, k: int = 10, nprobe: int | None = None, *,
               ef_search: int | None = None, filter: SearchFilter | dict[str, Any] | None = None
               ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Search a batch of query vectors: ``(D, I)`` of shape ``(nq, k)``.

        The last (<= 4-way) merge runs here rather than in a task: the parts come straight
        from the workers, which saves one scheduling round trip per batch.
        """
        return _full_rows(self.search_result(xq, k, nprobe, ef_search=ef_search, filter=filter),
                          np.asarray(xq).shape[0], int(k), self.metric)

    def search_result(self, xq: Any, k: int = 10, nprobe: int | None = None, *,
                      ef_search: int | None = None,
                      filter: SearchFilter | dict[str, Any] | None = None,
                      with_records: bool = False, sparse_queries: Sequence[str] | None = None,
                      sparse_k: int | None = None, dense: bool = True) -> ShardResult:
        """:meth:`search` returning the merged :class:`ShardResult` (records, sparse hits)."""
        xq = check_vectors(xq, self.dim, "xq")
        k = check_k(k, self.spec.max_k)
        parts, _ = self._submit_parts(xq, k, nprobe, ef_search=ef_search, filter=filter,
                                      with_records=with_records, sparse_queries=sparse_queries,
                                      sparse_k=sparse_k, dense=dense)
        try:
            results = gather_direct(self.client, parts)
        except Exception as exc:
            _raise_shard_error(exc)
            raise
        return merge_results_task(xq.shape[0], k, self.metric, *results)

    async def asearch_result(self, xq: Any, k: int = 10, nprobe: int | None = None, **kw: Any
                             ) -> ShardResult:
        """:meth:`search_result` for asyncio code (never blocks the event loop)."""
        xq = check_vectors(xq, self.dim, "xq")
        k = check_k(k, self.spec.max_k)
        parts, _ = self._submit_parts(xq, k, nprobe, ef_search=kw.get("ef_search"),
                                      filter=kw.get("filter"),
                                      with_records=kw.get("with_records", False),
                                      sparse_queries=kw.get("sparse_queries"),
                                      sparse_k=kw.get("sparse_k"), dense=kw.get("dense", True))
        try:
            results = await asyncio.gather(*(await_future(p) for p in parts))
        except Exception as exc:
            _raise_shard_error(exc)
            raise
        return merge_results_task(xq.shape[0], k, self.metric, *results)

    async def asearch(self, xq: Any, k: int = 10, nprobe: int | None = None, **kw: Any
                      ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """:meth:`search` for asyncio code (does not block the event loop)."""
        res = await self.asearch_result(xq, k, nprobe, **kw)
        return _full_rows(res, np.asarray(xq).shape[0], int(k), self.metric)

    def fetch(self, ids: Any) -> list[dict[str, Any] | None]:
        """The stored records of ``ids`` (None for unknown ids), fetched from their shards."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        parts = self.client.gather([
            self.client.submit(fetch_task, f, arr, key=(f"dask-rag-fetch-{uuid.uuid4().hex}", s),
                               pure=False)
            for s, f in enumerate(self.shard_futures)])
        out: list[dict[str, Any] | None] = [None] * len(arr)
        for part in parts:
            for i, rec in enumerate(part):
                if rec is not None:
                    out[i] = rec
        return out

    def doc_index(self) -> list[tuple[int, str | None, str | None]]:
        """(id, source, doc_hash) of every live chunk, from all shards."""
        parts = self.client.gather([self.client.submit(doc_index_task, f, pure=False)
                                    for f in self.shard_futures])
        return [row for part in parts for row in part]

    # ---- mutation -----------------------------------------------------------------------------

    def _next_seq(self) -> int:
        files = store.wal_files(self.path)
        last = files[-1][0] if files else 0
        return max(last, int(self.manifest["wal_seq"])) + 1

    def add(self, xb: Any, ids: Any, records: Sequence[dict[str, Any]] | None = None) -> int:
        """Add vectors with ids (and records) to their owning shards; durable when it returns."""
        self._check_open()
        xb = check_vectors(xb, self.dim, "xb")
        ids = check_ids(ids, xb.shape[0])
        if records is not None and len(records) != len(ids):
            raise InvalidInput(f"records has {len(records)} entries for {len(ids)} vectors")
        recs_json = None if records is None else json.dumps(
            [_jsonable_record(r) for r in records]).encode()
        with self._write_lock:
            present = np.concatenate(self.client.gather([
                self.client.submit(contains_task, f, ids, pure=False) for f in self.shard_futures]))
            if present.size:
                raise InvalidInput(f"ids already in the index, e.g. {int(present[0])}; "
                                   "remove them first")
            shard_of, lists = self.router.assign(xb, ids)
            seq = self._next_seq()
            store.append_wal(self.path, store.WalEntry(seq, "add", ids, shard_of, xb, lists,
                                                       recs_json))
            futs = {}
            for s in np.unique(shard_of):
                m = shard_of == s
                recs = None if records is None else [dict(r) for r, keep in
                                                     zip(records, m, strict=True) if keep]
                futs[int(s)] = self.client.submit(
                    apply_add_task, self.shard_futures[int(s)], seq, xb[m], ids[m], recs,
                    None if lists is None else lists[m],
                    key=(f"dask-rag-apply-{uuid.uuid4().hex}", int(s)), pure=False)
            wait(list(futs.values()))
            for s, f in futs.items():
                f.result()
                self._counts[s] += int((shard_of == s).sum())
            return len(ids)

    def remove(self, ids: Any) -> int:
        """Remove ids from whichever shards hold them; returns how many were removed."""
        self._check_open()
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise InvalidInput(f"ids must be a 1-D array of integers, got shape {arr.shape}")
        arr = np.unique(arr.astype(np.int64))
        if arr.size == 0:
            return 0
        with self._write_lock:
            seq = self._next_seq()
            store.append_wal(self.path, store.WalEntry(seq, "remove", arr))
            futs = [self.client.submit(apply_remove_task, f, seq, arr,
                                       key=(f"dask-rag-apply-{uuid.uuid4().hex}", s), pure=False)
                    for s, f in enumerate(self.shard_futures)]
            removed = [int(x) for x in self.client.gather(futs)]
            for s, n in enumerate(removed):
                self._counts[s] -= n
            return int(sum(removed))

    def save(self, path: str | Path | None = None) -> Path:
        """Write the current state durably and atomically.

        ``save()`` compacts in place: new shard files, then the manifest is replaced atomically,
        then old files and the write-ahead log are deleted.  ``save(other)`` exports a copy to
        another directory (staged, then renamed into place).  A failure at any point leaves
        the previous index at the target loadable and unchanged.
        """
        self._check_open()
        target = self.path if path is None else Path(path).resolve()
        with self._write_lock:
            if target == self.path:
                self._save_in_place()
            else:
                self._export(target)
        return target

    def _write_all(self, directory: Path, generation: int, index_uuid: str) -> list[dict[str, Any]]:
        futs = [self.client.submit(write_shard_task, f, str(directory), generation, index_uuid,
                                   key=(f"dask-rag-write-{uuid.uuid4().hex}", s), pure=False)
                for s, f in enumerate(self.shard_futures)]
        entries: list[dict[str, Any]] = self.client.gather(futs)
        return entries

    def _save_in_place(self) -> None:
        old = store.read_manifest(self.path)
        generation = int(old["generation"]) + 1
        files = store.wal_files(self.path)
        wal_seq = max([int(old["wal_seq"])] + [seq for seq, _ in files])
        entries = self._write_all(self.path, generation, self.index_uuid)
        manifest = dict(old)
        manifest.update(shards=entries, generation=generation, wal_seq=wal_seq,
                        updated_at=store.now(), ntotal=sum(e["count"] for e in entries))
        commit_manifest(self.path, manifest)
        self.manifest = manifest
        # the new manifest is committed: old shard files and folded WAL entries can go
        keep = {e[key] for e in entries for key in ("file", "meta", "refine_file", "bm25")
                if key in e}
        for p in (self.path / "shards").iterdir():
            if f"shards/{p.name}" not in keep:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        for seq, p in files:
            if seq <= wal_seq:
                p.unlink(missing_ok=True)

    def _export(self, target: Path) -> None:
        store.check_fresh_target(target)
        staging = _staging_dir(target)
        try:
            index_uuid = store.new_index_uuid()
            entries = self._write_all(staging, 0, index_uuid)
            manifest = dict(self.manifest)
            manifest.update(index_uuid=index_uuid, shards=entries, generation=0, wal_seq=0,
                            created_at=store.now(), ntotal=sum(e["count"] for e in entries))
            if manifest["quantizer"] is not None:
                shutil.copyfile(self.path / store.QUANTIZER, staging / store.QUANTIZER)
            store.atomic_write_json(staging / store.MANIFEST, manifest)
            _swap_into_place(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    # ---- placement ----------------------------------------------------------------------------

    def shard_locations(self) -> dict[int, list[str]]:
        """Worker address(es) holding each shard."""
        futs = self.shard_futures
        who = self.client.who_has(futs)
        return {s: sorted(who.get(f.key, ())) for s, f in enumerate(futs)}

    def rebalance(self) -> int:
        """Spread shards evenly over the current workers; returns how many shards moved.

        After a worker dies its shards are reloaded on the survivors; when workers come back
        this moves shards onto them: load on the new worker first, then release the old copy,
        so the shard is searchable throughout.
        """
        workers = sorted(self.client.scheduler_info(n_workers=-1)["workers"])
        if not workers:
            return 0
        locations = self.shard_locations()
        load = {w: [] for w in workers}  # type: dict[str, list[int]]
        for s, where in locations.items():
            if where and where[0] in load:
                load[where[0]].append(s)
        cap = -(-self.n_shards // len(workers))
        floor = self.n_shards // len(workers)
        moves = []
        donors = sorted(load, key=lambda w: -len(load[w]))
        for w in sorted(load, key=lambda w: len(load[w])):
            while len(load[w]) < floor:
                donor = next((d for d in donors if len(load[d]) > cap or (
                    len(load[d]) > floor and len(load[d]) - len(load[w]) > 1)), None)
                if donor is None:
                    break
                s = load[donor].pop()
                load[w].append(s)
                moves.append((s, w))
        if not moves:
            return 0
        self._epoch += 1
        new = {}
        for s, w in moves:
            ref = ShardRef(str(self.path), s, self.index_uuid)
            new[s] = self.client.submit(load_shard, ref, key=self._shard_key(s), workers=[w],
                                        allow_other_workers=True, pure=False)
        wait(list(new.values()))
        with self._lock:
            for s, f in new.items():
                if f.status == "finished":
                    self._shards[s] = f
        return sum(1 for f in new.values() if f.status == "finished")

    def ensure_loaded(self) -> int:
        """Resubmit the load of shards whose futures were lost; returns how many.

        A worker's death is handled by the scheduler itself (it recomputes the shard from
        disk); losing the *scheduler* loses every future.  When the client reconnects to a
        restarted scheduler, this brings the shards back.
        """
        lost = [s for s, f in enumerate(self.shard_futures)
                if f.status in ("cancelled", "lost", "error")]
        if not lost:
            return 0
        self._epoch += 1
        with self._lock:
            for s in lost:
                ref = ShardRef(str(self.path), s, self.index_uuid)
                self._shards[s] = self.client.submit(load_shard, ref, key=self._shard_key(s),
                                                     pure=False)
        return len(lost)

    # ---- lifecycle ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidInput("this DistributedIndex is closed")

    def close(self) -> None:
        """Release the shard futures (and delete the directory if the index made it)."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for f in self._shards:
                with contextlib.suppress(Exception):
                    f.release()
            self._shards = []
        if self._owns_dir:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> DistributedIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _full_rows(res: ShardResult, nq: int, k: int, metric: str
               ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    D, I = empty_result(nq, k, metric)
    D[res.rows] = res.D
    I[res.rows] = res.I
    return D, I


def _jsonable_record(r: dict[str, Any]) -> dict[str, Any]:
    out = {key: r.get(key) for key in ("text", "source", "metadata", "doc_hash")}
    if out["metadata"] is not None and not isinstance(out["metadata"], str):
        out["metadata"] = json.dumps(out["metadata"], sort_keys=True)
    return out


def _train_template(spec: IndexSpec, xb: npt.NDArray[np.float32]) -> tuple[Any, bytes | None]:
    import faiss

    info = spec.info
    if info.kind != "ivf":
        return None, None
    metric = faiss.METRIC_INNER_PRODUCT if spec.metric == "ip" else faiss.METRIC_L2
    try:
        template = faiss.index_factory(xb.shape[1], info.base_factory, metric)
    except RuntimeError as exc:
        raise InvalidInput(f"faiss rejected factory {spec.factory!r}: "
                           f"{str(exc).splitlines()[0]}") from None
    rng = np.random.default_rng(spec.seed)
    n_train = min(xb.shape[0], max(spec.train_size, info.nlist * 39))
    sample = xb if n_train >= xb.shape[0] else xb[np.sort(rng.choice(xb.shape[0], n_train,
                                                                        replace=False))]
    template.train(sample)
    return template, faiss.serialize_index(template).tobytes()


def _plan_shards(spec: IndexSpec, sharding: str, template: Any, xb: npt.NDArray[np.float32],
                 ids: npt.NDArray[np.int64]
                 ) -> tuple[Router, npt.NDArray[np.int32], npt.NDArray[np.int64] | None]:
    S = spec.n_shards
    quantizer = None if template is None else template.quantizer
    if sharding == "ivf":
        # the list sizes decide the list -> shard map, so assign first (once)
        lists = coarse_assign(quantizer, xb)
        sizes = np.bincount(lists, minlength=spec.info.nlist).astype(np.int64)
        list_to_shard = balance_lists(sizes, S)
        router = Router("ivf", S, quantizer=quantizer, list_to_shard=list_to_shard)
        return router, list_to_shard[lists], lists
    if sharding == "hash":
        router = Router("hash", S, quantizer=quantizer)
    else:
        router = Router("range", S, quantizer=quantizer, boundaries=range_boundaries(ids, S))
    shard_of, assigned = router.assign(xb, ids)
    return router, shard_of, assigned


def _current_workers(client: Client, timeout: float = 60.0) -> list[str]:
    """Addresses of the workers now (waiting for at least one, e.g. during a restart)."""
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    if not workers:
        client.wait_for_workers(1, timeout=timeout)
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    return workers


def _write_shards(client: Client, directory: Path, index_uuid: str, spec: IndexSpec, dim: int,
                  template_bytes: bytes | None, xb: npt.NDArray[np.float32],
                  ids: npt.NDArray[np.int64], shard_of: npt.NDArray[np.int32],
                  lists: npt.NDArray[np.int64] | None,
                  records: Sequence[dict[str, Any]] | None, progress: bool
                  ) -> list[dict[str, Any]]:
    """Build and write every shard in parallel on the workers."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "shards").mkdir(exist_ok=True)
    workers = _current_workers(client)
    futures = []
    for s in range(spec.n_shards):
        m = shard_of == s
        recs = None if records is None else [dict(r) for r, keep in zip(records, m, strict=True)
                                             if keep]
        target = [workers[s % len(workers)]] if workers else None
        # one scattered object per shard: its vectors go straight to the worker that builds it
        [part] = client.scatter([(xb[m], ids[m], None if lists is None else lists[m], recs)],
                                workers=target, direct=True, hash=False)
        futures.append(client.submit(_build_shard_from_part, str(directory), s, index_uuid, spec,
                                     dim, template_bytes, part, workers=target,
                                     allow_other_workers=target is not None, pure=False,
                                     key=(f"dask-rag-build-{index_uuid[:12]}", s)))
    _wait_with_progress(futures, "building shards", progress)
    entries: list[dict[str, Any]] = client.gather(futures)
    return entries


def _build_shard_from_part(directory: str, shard_no: int, index_uuid: str, spec: IndexSpec,
                           dim: int, template_bytes: bytes | None, part: tuple[Any, ...]
                           ) -> dict[str, Any]:
    xb, ids, lists, recs = part
    return build_shard_files(directory, shard_no, 0, index_uuid, spec, dim, template_bytes, xb,
                             ids, lists, recs)


def _new_manifest(index_uuid: str, spec: IndexSpec, dim: int, router: Router,
                  entries: list[dict[str, Any]], embed: dict[str, Any] | None) -> dict[str, Any]:
    now = store.now()
    return {
        "format_version": store.FORMAT_VERSION,
        "index_uuid": index_uuid,
        "dim": dim,
        "metric": spec.metric,
        "factory": spec.factory,
        "sharding": router.sharding,
        "spec": spec.to_dict(),
        "routing": router.to_manifest(),
        "n_shards": spec.n_shards,
        "shards": entries,
        "ntotal": sum(e["count"] for e in entries),
        "quantizer": None,
        "embed": embed,
        "generation": 0,
        "wal_seq": 0,
        "created_at": now,
        "updated_at": now,
    }


def commit_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """The commit point of a save: atomically replace ``manifest.json``."""
    store.atomic_write_json(path / store.MANIFEST, manifest)


def _read_template(path: Path, entry: dict[str, Any]) -> Any:
    import faiss

    qpath = store.resolve_index_file(path, entry.get("file", ""))
    if not qpath.is_file():
        raise CorruptIndex(f"{qpath}: quantizer file is missing")
    if store.file_checksum(qpath) != entry.get("checksum"):
        raise CorruptIndex(f"{qpath}: quantizer checksum mismatch (truncated or from another "
                           "index)")
    try:
        template = faiss.read_index(str(qpath))
    except RuntimeError as exc:
        raise CorruptIndex(f"{qpath}: not a readable faiss index ({str(exc).splitlines()[0]})"
                           ) from None
    # faiss's python layer already returns the concrete class (IndexIVFFlat, IndexIVFPQ, ...)
    return template


def _router_from_manifest(manifest: dict[str, Any], spec: IndexSpec, template: Any,
                          where: str) -> Router:
    routing = manifest["routing"]
    quantizer = None if template is None else template.quantizer
    try:
        if routing["sharding"] == "ivf":
            l2s = np.asarray(routing["list_to_shard"], dtype=np.int32)
            if quantizer is None or l2s.shape[0] != quantizer.ntotal or (
                    l2s.size and (l2s.min() < 0 or l2s.max() >= manifest["n_shards"])):
                raise CorruptIndex(f"{where}: routing.list_to_shard does not match the quantizer")
            return Router("ivf", manifest["n_shards"], quantizer=quantizer, list_to_shard=l2s)
        if routing["sharding"] == "range":
            return Router("range", manifest["n_shards"], quantizer=quantizer,
                          boundaries=np.asarray(routing["boundaries"], dtype=np.int64))
        return Router("hash", manifest["n_shards"], quantizer=quantizer)
    except (KeyError, TypeError, ValueError, InvalidInput) as exc:
        raise CorruptIndex(f"{where}: invalid routing ({exc})") from None


def _staging_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))


def _swap_into_place(staging: Path, target: Path) -> None:
    """Move a completely written index directory to ``target`` (replacing an old index)."""
    if not target.exists():
        staging.rename(target)
        return
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
        staging.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _wait_with_progress(futures: list[Future], desc: str, progress: bool) -> None:
    if not progress:
        wait(futures)
        return
    from distributed import as_completed
    from tqdm.auto import tqdm

    with tqdm(total=len(futures), desc=desc, unit="shard") as bar:
        for _ in as_completed(futures):
            bar.update(1)
