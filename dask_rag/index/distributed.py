"""`DistributedIndex`: a faiss index sharded across a Dask cluster as worker-local futures.

Each shard is the result of a *load task* (:func:`~dask_rag.index.shard.load_shard`) that reads
the index directory, so it is recomputed from disk on another worker if its worker dies.  A query
batch becomes a small graph (:meth:`DistributedIndex.submit_search`, the one way to submit
one): an optional route task (IVF factories: coarse quantization where the router future
lives), one search task per shard that must be visited (it takes the shard future as a
dependency, so it runs where the shard lives and only the query rows travel), then a tree of
merge tasks (fan-in 4).  Callers chain their own tasks onto the parts (fusion, rerank,
generation) or merge them with :func:`~dask_rag.index.merge.merge_results`.

The index location is a directory readable by every worker (a local disk on a LocalCluster, a
shared filesystem) or an object-store URL (``s3://``, ``gs://``, any fsspec protocol), from
which each worker copies just its own shards' files (:mod:`dask_rag.index.objstore`).  Only one
process should mutate an index at a time.
This module holds the driver only: worker code is in :mod:`~dask_rag.index.tasks`, the on-disk
format in :mod:`~dask_rag.index.store`, building in :mod:`~dask_rag.index.build`.

The index is a facade over three parts with one job each: a
:class:`~dask_rag.index.replicas.ReplicaSet` (where shard replicas live: placement, epochs,
the holder map, rebalance), an :class:`~dask_rag.index.writes.IndexWriter` (the log, applying
to every replica, the manifest, the read token) and the search paths of
:mod:`dask_rag.index.fanout` (direct actor calls; the task graph).  This
module builds and opens indexes and wires the parts together.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from distributed import Client, Future

from dask_rag.cluster.futures import await_hedged, is_transient
from dask_rag.cluster.plugins import tune_comms
from dask_rag.cluster.sync import synchronous
from dask_rag.config import CommConfig, IndexSpec
from dask_rag.errors import CorruptIndex, DaskRagError, InvalidInput, ShardUnavailable
from dask_rag.faults import fault_point
from dask_rag.index import store
from dask_rag.index.backends import configure_faiss
from dask_rag.index.build import (
    new_manifest,
    plan_shards,
    read_template,
    router_from_manifest,
    train_template,
    write_shards,
)
from dask_rag.index.fanout import MERGE_FAN_IN, DirectSearch, SearchGraph
from dask_rag.index.location import open_location
from dask_rag.index.manifest import Manifest
from dask_rag.index.merge import empty_result, merge_results
from dask_rag.index.query import (
    IndexQuery,
    SearchFilter,
    ShardResult,
    check_ids,
    check_k,
    check_vectors,
    parse_filter,
)
from dask_rag.index.replicas import ReplicaSet
from dask_rag.index.routing import Router
from dask_rag.index.sparse import CorpusStats
from dask_rag.index.tasks import (
    doc_index_task,
    fetch_task,
    sources_task,
)
from dask_rag.index.vectors import QueryMatrix, QueryVectors, as_query_vectors
from dask_rag.index.writes import IndexWriter, put_quantizer, write_index

__all__ = ["HEDGE_AFTER_S", "MERGE_FAN_IN", "DistributedIndex"]

#: with replicas, a search in flight when a worker is lost is submitted a second time (on the
#: least-loaded live replicas; the first copy to finish wins).  No delay-based hedge (None):
#: under overload every search is slower than any fixed delay, and hedging them all halved
#: throughput at 64 clients (benchmarks/replication.py: 14 vs 28 q/s)
HEDGE_AFTER_S: float | None = None


class DistributedIndex:
    """A vector index whose shards are persisted futures on a Dask cluster.

    Build one with :meth:`build` (from vectors) or :meth:`load` (from an index directory);
    search with :meth:`search` (``(nq, k)`` scores and ids, ``-1`` padding, faiss
    conventions).  The results of ``ivf`` sharding equal those of a single faiss IVF index with
    the same quantizer and ``nprobe``; sharded ``Flat`` equals exact search.  A query's hits
    never depend on the other queries of its batch (see :mod:`dask_rag.index.exact`).

    Why ~40 members: this is the facade users hold; each operation is a few lines handing
    over to one of its parts (:attr:`replica_set`, :attr:`writer`, :attr:`graph`,
    :attr:`direct`), which hold the state.
    """

    def __init__(self, client: Client, path: str | Path, manifest: Manifest,
                 router: Router, owns_dir: bool = False, comms: CommConfig | None = None
                 ) -> None:
        self.client = client
        loc = open_location(path)
        #: where the index lives: an absolute directory, or an object-store URL
        self.location = loc.url
        #: the directory as a Path, or the URL string for an index in an object store
        self.path: Path | str = loc.where
        self.spec = IndexSpec.from_dict(manifest.spec)
        self.router = router
        self._owns_dir = owns_dir
        routed = router.quantizer is not None
        self.replica_set = ReplicaSet(client, self.location, manifest.index_uuid,
                                      manifest.n_shards, self.spec.replicas, routed, comms)
        self.writer = IndexWriter(client, self.location, manifest, self.replica_set, router)
        self.graph = SearchGraph(client, self.replica_set, router, self.dim,
                                 manifest.metric, self.spec.nprobe)
        self.direct = DirectSearch(client, self.replica_set, self.location, self.index_uuid,
                                   routed)

    # ---- properties ---------------------------------------------------------------------------

    @property
    def manifest(self) -> Manifest:
        """The committed manifest (as of the last save or metadata change)."""
        return self.writer.manifest

    @property
    def dim(self) -> int:
        return self.writer.dim

    @property
    def metric(self) -> str:
        return self.graph.metric

    @property
    def n_shards(self) -> int:
        return self.writer.n_shards

    @property
    def ntotal(self) -> int:
        return int(sum(self.writer.counts))

    @property
    def index_uuid(self) -> str:
        return self.writer.index_uuid

    @property
    def acked_seq(self) -> int:
        """The write-ahead-log entry of the last acknowledged write: a shard task that
        catches up to it (``Shard.catch_up``) sees every write acknowledged so far — the
        index's read-your-writes token, as Milvus's guarantee timestamp."""
        return self.writer.acked_seq

    @property
    def bm25_stats(self) -> CorpusStats | None:
        """The index's BM25 statistics (:class:`~dask_rag.index.sparse.CorpusStats`) at
        :attr:`acked_seq`: the sum of the shards' at load, kept current by every write."""
        return self.writer.bm25_stats

    @property
    def last_write_ms(self) -> dict[str, float]:
        """Where the last ``add`` spent its time (ms): lock, check, log, apply."""
        return self.writer.last_write_ms

    @property
    def replicas(self) -> int:
        """How many copies of each shard the cluster holds (``IndexSpec.replicas``)."""
        return self.spec.replicas

    @property
    def shard_futures(self) -> list[Future]:
        """One future per shard, for reads that any replica answers: a loaded replica on a
        live worker, the least busy (a replica being reloaded after a kill would make the
        read wait for it)."""
        return self.replica_set.shard_futures()

    def replica_futures(self) -> list[list[Future]]:
        """Every replica of every shard (writes are applied to all of them)."""
        return self.replica_set.replica_futures()

    @property
    def rebalance_log(self) -> list[tuple[float, int]]:
        """(time, moved) of each automatic rebalance."""
        return self.replica_set.rebalance_log

    @property
    def warm_new_workers(self) -> Callable[[list[str]], Any] | None:
        """Run with the workers a rebalance loaded replicas onto, before they serve."""
        return self.replica_set.warm_new_workers

    @warm_new_workers.setter
    def warm_new_workers(self, fn: Callable[[list[str]], Any] | None) -> None:
        self.replica_set.warm_new_workers = fn

    def __repr__(self) -> str:
        return (f"<DistributedIndex {self.spec.factory} {self.spec.resolved_sharding} x"
                f"{self.n_shards} dim={self.dim} metric={self.metric} ntotal={self.ntotal} "
                f"path={str(self.path)!r}>")

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def build(cls, client: Client, xb: Any, ids: Any = None, spec: IndexSpec | None = None, *,
              path: str | Path | None = None, records: Sequence[dict[str, Any]] | None = None,
              embed: dict[str, Any] | None = None, overwrite: bool = False,
              comms: CommConfig | None = CommConfig(), progress: bool = False,
              elastic: bool = True) -> DistributedIndex:
        """Train, shard and write an index of ``xb`` to ``path`` (a temp dir if None, or an
        object-store URL), then load it (``elastic``: see :meth:`load`).

        ``records`` (one dict per vector: text, source, metadata, doc_hash) are stored beside
        the vectors of each shard.  ``embed`` describes the encoder that produced ``xb`` and is
        recorded in the manifest.  An existing index at ``path`` is replaced only with
        ``overwrite=True``, and only after the new one is completely written.
        """
        spec = spec or IndexSpec()
        if isinstance(xb, np.ndarray) and xb.ndim == 2 and xb.shape[0] == 0 and \
                spec.info.kind in ("flat", "hnsw"):
            xb = np.zeros((0, xb.shape[1]), dtype=np.float32)  # an empty index (create())
        else:
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
        target = tempfile.mkdtemp(prefix="dask-rag-index-") if path is None \
            else store.location_str(path)
        exists = False
        if not owns_dir:
            exists = store.check_fresh_target(target)
            if exists and not overwrite:
                raise InvalidInput(f"an index already exists at {target!r}; load it, or "
                                   "pass overwrite=True to replace it")
        if comms is not None:
            tune_comms(client, comms)

        template, template_bytes = train_template(spec, xb)
        router, shard_of, lists = plan_shards(spec, sharding, template, xb, ids)
        index_uuid = store.new_index_uuid()

        def write(directory: str | Path, generation: int, wal_seq: int) -> Manifest:
            entries = write_shards(client, directory, index_uuid, spec, dim, template_bytes,
                                    xb, ids, shard_of, lists, records, progress, generation)
            fault_point("build.shards_written")
            quantizer = None if template_bytes is None else put_quantizer(
                directory, generation, template_bytes)
            manifest = new_manifest(index_uuid, spec, dim, router, entries, embed, quantizer,
                                    generation, wal_seq)
            store.commit_manifest(directory, manifest)
            return manifest

        write_index(target, spec.n_shards, exists, write, direct=owns_dir)
        index = cls.load(client, target, comms=None, progress=progress, elastic=elastic)
        index._owns_dir = owns_dir
        index.replica_set.comms = comms
        return index

    @classmethod
    def create(cls, client: Client, dim: int, spec: IndexSpec | None = None, *,
               path: str | Path, embed: dict[str, Any] | None = None,
               comms: CommConfig | None = CommConfig()) -> DistributedIndex:
        """An empty index of ``dim``-dimensional vectors at ``path``, to be filled by
        :meth:`add` (flat and HNSW factories: IVF needs vectors to train on)."""
        spec = spec or IndexSpec()
        if spec.info.kind not in ("flat", "hnsw"):
            raise InvalidInput(f"an empty index cannot be {spec.factory!r}: IVF factories need "
                               "vectors to train their quantizer; build() one from vectors")
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= 65_536:
            raise InvalidInput(f"dim={dim!r} is invalid: must be an integer in [1, 65536]")
        return cls.build(client, np.zeros((0, dim), dtype=np.float32), None, spec, path=path,
                         records=[], embed=embed, comms=comms)

    @classmethod
    def load(cls, client: Client, path: str | Path, *, comms: CommConfig | None = CommConfig(),
             progress: bool = False, replicas: int | None = None, elastic: bool = True
             ) -> DistributedIndex:
        """Open the index at ``path`` (a directory or an object-store URL): one load task per
        shard replica, spread over the workers (``replicas`` overrides the spec's).

        ``elastic``: follow the cluster's membership (:class:`~dask_rag.cluster.plugins.
        MembershipPlugin`): when workers join or leave, :meth:`rebalance` runs in the
        background a moment later, so new workers get shards and lost replicas are spread
        again — no call by hand."""
        configure_faiss()
        location = store.location_str(path)
        store.recover_interrupted_swap(location)
        manifest = store.read_manifest(location)
        where = f"{location}/{store.MANIFEST}"
        try:
            spec = IndexSpec.from_dict(manifest.spec)
        except (InvalidInput, TypeError) as exc:
            raise CorruptIndex(f"{where}: invalid index spec ({exc})") from None
        template = None
        if manifest.quantizer is not None:
            template = read_template(store.local_index_dir(location, manifest, quantizer=True),
                                     manifest.quantizer)
        router = router_from_manifest(manifest, spec, template, where)
        if comms is not None:
            tune_comms(client, comms)
        if replicas is not None:
            manifest = manifest.replace(spec={**manifest.spec, "replicas": replicas})
            IndexSpec.from_dict(manifest.spec)  # validates the override
        index = cls(client, location, manifest, router, comms=comms)
        index._start(progress=progress)
        index.set_elastic(elastic)
        return index

    def _start(self, progress: bool = False) -> None:
        self.replica_set.start(progress)
        self.writer.start()

    def set_elastic(self, elastic: bool) -> None:
        """Follow the cluster's membership (rebalance a moment after workers join or leave)
        or stop following it — e.g. while an operator moves shards by hand with
        :meth:`rebalance`.  After ``set_elastic(False)`` returns no automatic rebalance runs."""
        self.replica_set.set_elastic(elastic)

    # ---- search -------------------------------------------------------------------------------

    def query(self, k: int = 10, nprobe: int | None = None, *, ef_search: int | None = None,
              filter: SearchFilter | dict[str, Any] | None = None, with_records: bool = False,
              texts: Sequence[str] | None = None, sparse_k: int | None = None,
              dense: bool = True) -> IndexQuery:
        """A validated :class:`~dask_rag.index.query.IndexQuery` for :meth:`submit_search`."""
        return IndexQuery(k=check_k(k), nprobe=nprobe, ef_search=ef_search,
                          filter=parse_filter(filter),
                          with_records=with_records,
                          texts=None if texts is None else tuple(texts),
                          sparse_k=sparse_k or k, dense=dense)

    def hedge_trigger(self) -> Callable[[], int] | None:
        """For :func:`~dask_rag.cluster.futures.await_hedged`: the counter of lost workers,
        or None with one replica per shard."""
        return self.replica_set.hedge_trigger()

    def submit_search(self, query: IndexQuery, vectors: QueryVectors | Any = None
                      ) -> list[Future]:
        """Submit the whole search graph of one batch; returns the futures of at most
        :data:`~dask_rag.index.fanout.MERGE_FAN_IN` partial
        :class:`~dask_rag.index.query.ShardResult` s covering it (merge them with
        :func:`~dask_rag.index.merge.merge_results`, in a task of your own or here).

        ``vectors``: a :data:`~dask_rag.index.vectors.QueryVectors` — the query matrix
        (validated here; a bare ``(nq, d)`` array is taken as one), embedding tasks' pieces
        (which then never come back to this process), texts to embed in each search task,
        or none for a BM25-only query (``query.texts``; None is taken as that).
        """
        self.replica_set.check_open()
        self.replica_set.reattach()
        nq = None if query.texts is None else len(query.texts)
        return self.graph.submit(self.writer.stamp(query), as_query_vectors(vectors, nq))

    async def asearch_direct(self, query: IndexQuery, vectors: QueryVectors
                             ) -> list[ShardResult] | None:
        """The shards' answers through the per-worker searcher actors (no scheduler): for a
        query matrix (validated here), texts each actor embeds (a small batch) or none;
        None if that path failed — run :meth:`submit_search` instead."""
        if isinstance(vectors, QueryMatrix):
            vectors = QueryMatrix(check_vectors(vectors.xq, self.dim, "xq"))
        return await self.direct.asearch(self.writer.stamp(query), vectors)

    async def asearch(self, xq: Any, k: int = 10, nprobe: int | None = None, *,
                      ef_search: int | None = None,
                      filter: SearchFilter | dict[str, Any] | None = None
                      ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Search a batch of query vectors: ``(D, I)`` of shape ``(nq, k)``.

        The last (<= 4-way) merge runs here rather than in a task: the parts come straight
        from the workers, which saves one scheduling round trip per batch.
        """
        query = self.query(k, nprobe, ef_search=ef_search, filter=filter)
        xq = QueryMatrix(check_vectors(xq, self.dim, "xq"))
        try:
            results = await await_hedged(lambda: self.submit_search(query, xq),
                                         self.hedge_trigger(), HEDGE_AFTER_S)
        except Exception as exc:
            _raise_shard_error(exc)
            raise
        return _full_rows(merge_results(xq.nq, query.k, self.metric, list(results)),
                          xq.nq, query.k, self.metric)

    search = synchronous(asearch)

    # ---- reads of stored records ----------------------------------------------------------------

    def fetch(self, ids: Any) -> list[dict[str, Any] | None]:
        """The stored records of ``ids`` (None for unknown ids), fetched from their shards."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        parts = self.writer.on_each_shard(fetch_task, arr)
        out: list[dict[str, Any] | None] = [None] * len(arr)
        for part in parts:
            for i, rec in enumerate(part):
                if rec is not None:
                    out[i] = rec
        return out

    def ids_of_sources(self, sources: Sequence[str]) -> npt.NDArray[np.int64]:
        """Ids of the live chunks whose source is one of ``sources`` (one task per shard, a
        vectorised pass over its source column)."""
        self.replica_set.check_open()
        wanted = sorted(set(sources))
        if not wanted:
            return np.zeros(0, dtype=np.int64)
        parts = self.writer.on_each_shard(sources_task, wanted)
        return np.unique(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]))

    def doc_index(self) -> list[tuple[int, str | None, str | None]]:
        """(id, source, doc_hash) of every live chunk, from all shards."""
        parts = self.writer.on_each_shard(doc_index_task)
        return [row for part in parts for row in part]

    # ---- writes (see dask_rag.index.writes) -----------------------------------------------------

    def add(self, xb: Any, ids: Any, records: Sequence[dict[str, Any]] | None = None, *,
            replace: Any = None) -> int:
        """Add vectors with ids (and records); durable when it returns (see
        :meth:`IndexWriter.add <dask_rag.index.writes.IndexWriter.add>`: ``replace`` removes
        ids in the same acknowledged write)."""
        return self.writer.add(xb, ids, records, replace=replace)

    def remove(self, ids: Any) -> int:
        """Remove ids from whichever shards hold them; returns how many were removed."""
        return self.writer.remove(ids)

    def save(self, path: str | Path | None = None) -> Path | str:
        """Write the current state durably and atomically (in place, compacting the log, or
        an export to ``path``); returns where (see :meth:`IndexWriter.save
        <dask_rag.index.writes.IndexWriter.save>`)."""
        return self.writer.save(path)

    def set_metadata(self, name: str, value: Any) -> None:
        """Record ``value`` (JSON) under ``name`` in the manifest, atomically — e.g. the
        hybrid fusion ``dask-rag eval --tune-fusion`` chose for this index."""
        self.writer.set_metadata(name, value)

    # ---- placement ----------------------------------------------------------------------------

    def shard_locations(self) -> dict[int, list[str]]:
        """Worker address(es) holding each shard (any of its replicas)."""
        return self.replica_set.locations()

    def rebalance(self, exclude: Sequence[str] = ()) -> int:
        """Spread shard replicas evenly over the current workers (the replicas of a shard on
        different workers, and hosts when the scheduler knows them); returns how many moved.

        ``exclude``: workers about to leave (a scale-down): their replicas are loaded on the
        others first, so retiring them moves nothing and no search waits for a reload.

        After a worker dies its shards are reloaded on the survivors; when workers come back
        (or new ones join) this moves replicas onto them: load on the new worker first, then
        release the old copy, so the shard is searchable throughout.  Writes go on while it
        runs: a write acknowledged after a new replica read the log is applied to the old
        one, and the new one replays it from the log before it answers anything
        (:meth:`Shard.catch_up <dask_rag.index.shard.Shard.catch_up>`).
        """
        return self.replica_set.rebalance(exclude)

    def ensure_loaded(self) -> int:
        """Resubmit the load of shard replicas whose futures were lost (after a scheduler
        restart); returns how many."""
        return self.replica_set.ensure_loaded()

    # ---- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Release the shard futures (and delete the directory if the index made it).

        A write in progress finishes first (up to 60 s), so nothing writes into the index's
        location after ``close`` returns; later writes fail as "closed"."""
        if self.replica_set.closed:
            return
        self.writer.close()
        self.replica_set.close()
        self.direct.forget()
        if self._owns_dir:
            shutil.rmtree(self.location, ignore_errors=True)

    def __enter__(self) -> DistributedIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _raise_shard_error(exc: BaseException) -> None:
    """Re-raise a search's failure: a lost worker or connection (the one table,
    :data:`~dask_rag.cluster.futures.TRANSIENT_ERRORS`) as ShardUnavailable."""
    if isinstance(exc, DaskRagError):
        raise exc
    if is_transient(exc):
        raise ShardUnavailable(f"a shard could not be searched: {type(exc).__name__}: "
                               f"{exc}") from exc
    raise exc


def _full_rows(res: ShardResult, nq: int, k: int, metric: str
               ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    D, I = empty_result(nq, k, metric)
    D[res.rows] = res.D
    I[res.rows] = res.I
    return D, I
