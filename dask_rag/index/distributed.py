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

Why one module of ~860 lines: building, loading, replica placement (with the membership-driven
rebalance) and both search paths (graph and direct actor calls) share the replica futures and
their lock; writes and saves live in :mod:`dask_rag.index.writes`, tasks in
:mod:`dask_rag.index.tasks`.  Placement is the next candidate for a mixin of its own.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from distributed import Client, Future, wait

from dask_rag.cluster import current_workers, resource_request
from dask_rag.cluster.futures import (
    await_hedged,
    gather_hedged,
    is_transient,
    release_placement,
)
from dask_rag.cluster.plugins import off_membership_change, on_membership_change, tune_comms
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
from dask_rag.index.routing import Router, plan_placement
from dask_rag.index.searcher import ShardSearcher
from dask_rag.index.shard import ShardRef
from dask_rag.index.sparse import CorpusStats
from dask_rag.index.tasks import (
    bm25_stats_task,
    doc_index_task,
    fetch_task,
    load_router,
    load_shard,
    merge_group_task,
    route_task,
    search_shard_task,
    shard_count_task,
    sources_task,
)
from dask_rag.index.writes import IndexWrites, put_quantizer, write_index

__all__ = ["HEDGE_AFTER_S", "MERGE_FAN_IN", "DistributedIndex"]

#: merge tasks take at most this many parts; submit_search returns at most this many
MERGE_FAN_IN = 4
#: a direct (actor) search that has not answered by then is given up for the graph path
DIRECT_TIMEOUT_S = 30.0
#: with replicas, a search in flight when a worker is lost is submitted a second time (on the
#: least-loaded live replicas; the first copy to finish wins).  No delay-based hedge (None):
#: under overload every search is slower than any fixed delay, and hedging them all halved
#: throughput at 64 clients (benchmarks/replication.py: 14 vs 28 q/s)
HEDGE_AFTER_S: float | None = None


class DistributedIndex(IndexWrites):
    """A vector index whose shards are persisted futures on a Dask cluster.

    Build one with :meth:`build` (from vectors) or :meth:`load` (from an index directory);
    search with :meth:`search` (``(nq, k)`` scores and ids, ``-1`` padding, faiss
    conventions).  The results of ``ivf`` sharding equal those of a single faiss IVF index with
    the same quantizer and ``nprobe``; sharded ``Flat`` equals exact search.  A query's hits
    never depend on the other queries of its batch (see :mod:`dask_rag.index.exact`).
    """

    def __init__(self, client: Client, path: str | Path, manifest: dict[str, Any],
                 router: Router, owns_dir: bool = False) -> None:
        self.client = client
        #: where the index lives: an absolute directory, or an object-store URL
        self.location = store.location_str(path)
        #: the directory as a Path, or the URL string for an index in an object store
        self.path: Path | str = self.location if store.is_url(self.location) \
            else Path(self.location)
        self.manifest = manifest
        self.spec = IndexSpec.from_dict(manifest["spec"])
        self.router = router
        self._owns_dir = owns_dir
        #: the futures of each shard's replicas: ``_replicas[shard][replica]``
        self._replicas: list[list[Future]] = []
        self._router_future: Future | None = None
        #: searches submitted and not finished, per replica key (replica choice: least loaded)
        self._inflight: collections.Counter[Any] = collections.Counter()
        self._turn = itertools.count()
        #: replica key -> the worker holding it, and workers announced gone (membership
        #: events): a search avoids a replica on a departed worker at once — the future's own
        #: status does not change while the scheduler reloads it elsewhere
        self._holder: dict[Any, str] = {}
        self._down: set[str] = set()
        #: workers lost so far (membership events): a search in flight re-issues when it moves
        self._losses = 0
        #: replica key -> the worker holding it, and the searcher actors (direct path)
        self._direct: dict[Any, str] | None = None
        self._searchers: dict[str, Any] = {}
        self._counts: list[int] = []
        #: the last write-ahead-log entry acknowledged (every read carries it, see
        #: Shard.catch_up) with the index's BM25 statistics at that entry (None until the
        #: shards report them), and apply tasks still running after their write returned
        self._read_state: tuple[int, CorpusStats | None] = (self._log_end(), None)
        self._running: set[Future] = set()
        self.last_write_ms: dict[str, float] = {}
        self._lock = threading.RLock()
        self._write_lock = threading.Lock()
        self._rebalance_lock = threading.RLock()  # re-entered by the automatic one
        self._elastic = False
        self._comms: CommConfig | None = None
        self._rebalance_timer: threading.Timer | None = None
        #: (time, moved) of each automatic rebalance, for tests and the dashboard's story
        self.rebalance_log: list[tuple[float, int]] = []
        self._rebalance_failures = 0
        #: run with the workers a rebalance loaded replicas onto, before those replicas serve
        #: (a pipeline loads its encoder there: the first searches must not wait for it)
        self.warm_new_workers: Callable[[list[str]], Any] | None = None
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
    def acked_seq(self) -> int:
        """The write-ahead-log entry of the last acknowledged write: a shard task that
        catches up to it (``Shard.catch_up``) sees every write acknowledged so far — the
        index's read-your-writes token, as Milvus's guarantee timestamp."""
        return self._read_state[0]

    @property
    def bm25_stats(self) -> CorpusStats | None:
        """The index's BM25 statistics (:class:`~dask_rag.index.sparse.CorpusStats`) at
        :attr:`acked_seq`: the sum of the shards' at load, kept current by every write."""
        return self._read_state[1]

    def _acknowledge(self, seq: int, bm25_delta: CorpusStats | None = None,
                     removed: CorpusStats | None = None) -> None:
        """Make log entry ``seq`` the read token, with the BM25 statistics it changed
        (one assignment: a search reads the position and the statistics together)."""
        stats = self._read_state[1]
        if stats is not None:
            if bm25_delta is not None:
                stats = stats + bm25_delta
            if removed is not None:
                stats = stats - removed
        self._read_state = (seq, stats)

    @property
    def replicas(self) -> int:
        """How many copies of each shard the cluster holds (``IndexSpec.replicas``)."""
        return self.spec.replicas

    @property
    def shard_futures(self) -> list[Future]:
        """One future per shard, for reads that any replica answers: a loaded replica on a
        live worker, the least busy (a replica being reloaded after a kill would make the
        read wait for it)."""
        with self._lock:
            return [self._pick(s) for s in range(len(self._replicas))]

    def replica_futures(self) -> list[list[Future]]:
        """Every replica of every shard (writes are applied to all of them)."""
        with self._lock:
            return [list(reps) for reps in self._replicas]

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

        def write(directory: str | Path, generation: int, wal_seq: int) -> dict[str, Any]:
            entries = write_shards(client, directory, index_uuid, spec, dim, template_bytes,
                                    xb, ids, shard_of, lists, records, progress, generation)
            fault_point("build.shards_written")
            manifest = new_manifest(index_uuid, spec, dim, router, entries, embed)
            manifest.update(generation=generation, wal_seq=wal_seq)
            if template_bytes is not None:
                manifest["quantizer"] = put_quantizer(directory, generation, template_bytes)
            store.commit_manifest(directory, manifest)
            return manifest

        write_index(target, spec.n_shards, exists, write, direct=owns_dir)
        index = cls.load(client, target, comms=None, progress=progress, elastic=elastic)
        index._owns_dir = owns_dir
        index._comms = comms
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
        if not store.is_url(location):
            store.recover_interrupted_swap(Path(location))
        manifest = store.read_manifest(location)
        where = f"{location}/{store.MANIFEST}"
        try:
            spec = IndexSpec.from_dict(manifest["spec"])
        except (InvalidInput, TypeError) as exc:
            raise CorruptIndex(f"{where}: invalid index spec ({exc})") from None
        template = None
        if manifest["quantizer"] is not None:
            template = read_template(store.local_index_dir(location, manifest, quantizer=True),
                                     manifest["quantizer"])
        router = router_from_manifest(manifest, spec, template, where)
        if comms is not None:
            tune_comms(client, comms)
        if replicas is not None:
            manifest = {**manifest, "spec": {**manifest["spec"], "replicas": replicas}}
            IndexSpec.from_dict(manifest["spec"])  # validates the override
        index = cls(client, location, manifest, router)
        index._comms = comms
        index._start_shards(progress=progress)
        index.set_elastic(elastic)
        return index

    def set_elastic(self, elastic: bool) -> None:
        """Follow the cluster's membership (rebalance a moment after workers join or leave)
        or stop following it — e.g. while an operator moves shards by hand with
        :meth:`rebalance`.  After ``set_elastic(False)`` returns no automatic rebalance runs."""
        if elastic and not self._elastic:
            self._elastic = True
            on_membership_change(self.client, self._on_membership)
        elif not elastic and self._elastic:
            self._elastic = False
            off_membership_change(self.client, self._on_membership)
            if self._rebalance_timer is not None:
                self._rebalance_timer.cancel()
            with self._rebalance_lock:  # an automatic rebalance already running ends first
                pass

    def _shard_key(self, shard_no: int, replica: int = 0) -> tuple[str, int]:
        tag = "" if replica == 0 else f"-r{replica}"
        return (f"dask-rag-shard-{self.index_uuid[:8]}{self._token}-{self._epoch}{tag}", shard_no)

    def _load_replica(self, shard_no: int, replica: int, worker: str | None,
                      resources: dict[str, float] | None = None) -> Future:
        """Submit the load of one replica on ``worker`` — there and nowhere else (a loose
        placement lets the scheduler or the work stealer put two replicas of a shard on one
        worker); see :meth:`_settle_loads` for a worker that leaves meanwhile."""
        ref = ShardRef(self.location, shard_no, self.index_uuid)
        return self.client.submit(load_shard, ref, key=self._shard_key(shard_no, replica),
                                  workers=None if worker is None else [worker],
                                  allow_other_workers=False,
                                  resources=resources, pure=False)

    def _settle_loads(self, loads: dict[tuple[int, int], Future],
                      targets: dict[tuple[int, int], str], progress: bool = False,
                      replace: bool = True) -> dict[tuple[int, int], Future]:
        """Wait for placed loads.  One whose worker left the cluster meanwhile is submitted
        again anywhere (``replace``) or dropped (a rebalance keeps the old copy); then the
        placements are lifted, so that a replica lost later is recomputed on any worker."""
        loads = dict(loads)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(loads), desc="loading shards", unit="shard")
        while True:
            pending = [f for f in loads.values() if f.status == "pending"]
            if bar is not None:
                bar.update(len(loads) - len(pending) - bar.n)
            if not pending:
                break
            with contextlib.suppress(TimeoutError):
                wait(pending, timeout=2.0)
            live = set(self.client.scheduler_info(n_workers=-1)["workers"])
            for slot, f in list(loads.items()):
                if f.status == "pending" and slot in targets and targets[slot] not in live:
                    f.cancel()
                    del loads[slot]
                    if replace:
                        self._epoch += 1
                        loads[slot] = self._load_replica(*slot, None)
        if bar is not None:
            bar.close()
        for slot, f in list(loads.items()):
            if f.status == "finished":
                continue
            if not replace and f.status != "error":
                del loads[slot]  # its worker died after loading it: a rebalance keeps the old
                continue
            raise f.exception() if f.status == "error" else ShardUnavailable(
                f"shard load {f.key} ended {f.status}")
        release_placement(self.client, list(loads.values()))
        return loads

    def _shard_workers(self) -> list[str]:
        workers = current_workers(self.client)
        if resource_request(self.client, "shard"):
            # only workers declaring a 'shard' resource may hold shards
            info = self.client.scheduler_info(n_workers=-1)["workers"]
            workers = [w for w in workers if "shard" in (info[w].get("resources") or {})]
        return workers

    def _hosts(self) -> dict[str, str]:
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        return {w: str(d.get("host") or w) for w, d in info.items()}

    def _start_shards(self, progress: bool = False) -> None:
        workers = self._shard_workers()
        resources = resource_request(self.client, "shard")
        slots: dict[tuple[int, int], str | None] = {
            (s, r): None for s in range(self.n_shards) for r in range(self.replicas)}
        where = plan_placement(slots, workers, self._hosts()) if workers else {}
        loads = self._settle_loads({slot: self._load_replica(*slot, where.get(slot), resources)
                                    for slot in slots}, where, progress)
        replicas = [[loads[(s, r)] for r in range(self.replicas)] for s in range(self.n_shards)]
        self._replicas = replicas
        self._holder = {loads[slot].key: w for slot, w in where.items() if w is not None}
        self._counts = [int(c) for c in self._on_each_shard(shard_count_task)]
        stats = sum(self._on_each_shard(bm25_stats_task), CorpusStats())
        self._read_state = (self._read_state[0], stats)
        if self.router.quantizer is not None:
            # routes of batches whose vectors are futures run where this lives (re-runnable
            # from disk, like a shard)
            self._router_future = self.client.submit(
                load_router, self.location, pure=False,
                key=f"dask-rag-router-{self.index_uuid[:8]}{self._token}-{self._epoch}")

    def _reattach(self) -> None:
        """After a scheduler restart every future is cancelled: load the shards again (from
        the index location) before anything uses them.  A status check per replica."""
        if any(f.status == "cancelled" for reps in self._replicas for f in reps):
            self.ensure_loaded()

    def _pick(self, shard_no: int) -> Future:
        """The replica of ``shard_no`` a search uses: a loaded one (one whose worker died is
        being reloaded elsewhere) with the fewest searches from this index in flight."""
        reps = self._replicas[shard_no]
        if len(reps) == 1:
            return reps[0]
        loaded = [f for f in reps if f.status == "finished"]
        live = [f for f in loaded if self._holder.get(f.key) not in self._down] or loaded or reps
        turn = next(self._turn)
        return min(live, key=lambda f: (self._inflight[f.key],
                                        (reps.index(f) + turn) % len(reps)))

    def hedge_trigger(self) -> Callable[[], int] | None:
        """For :func:`~dask_rag.cluster.futures.gather_hedged`: the counter of lost workers,
        or None with one replica per shard (a second copy of a search would wait for the same
        reload)."""
        if self.replicas < 2:
            return None
        return lambda: self._losses

    def _track(self, replica: Future, part: Future) -> None:
        key = replica.key
        self._inflight[key] += 1

        def done(_: Future) -> None:
            self._inflight[key] -= 1

        part.add_done_callback(done)

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

    def _consistent(self, query: IndexQuery) -> IndexQuery:
        """``query`` stamped with the last acknowledged write, which every shard copy that
        answers it must reflect (read-your-writes, whatever copies the scheduler made), and
        with the BM25 weights of the index's statistics at that write."""
        seq, stats = self._read_state
        changes: dict[str, Any] = {}
        if query.min_seq < seq:
            changes["min_seq"] = seq
        if query.texts is not None and query.bm25 is None and stats is not None:
            changes["bm25"] = stats.weights(query.texts)
        return dataclasses.replace(query, **changes) if changes else query

    def submit_search(self, query: IndexQuery, vectors: Any = None, nq: int | None = None
                      ) -> list[Future]:
        """Submit the whole search graph of one batch; returns the futures of at most
        :data:`MERGE_FAN_IN` partial :class:`~dask_rag.index.query.ShardResult` s covering it
        (merge them with :func:`~dask_rag.index.merge.merge_results`, in a task of your own
        or here).

        ``vectors``: the ``(nq, d)`` query matrix (validated here); the futures of its
        pieces as ``[(future, rows), ...]`` — embedding tasks' output, which then never comes
        back to this process; a picklable callable that returns the matrix when called in each
        search task (an encoder for a small batch; give ``nq``); or None for a BM25-only query
        (``query.texts``).
        """
        self._check_open()
        self._reattach()
        query = self._consistent(query)
        with self._lock:
            shards = [self._pick(s) for s in range(self.n_shards)]
            router_future = self._router_future
        nprobe = query.nprobe or self.spec.nprobe
        probes = self.router.quantizer is not None and query.dense
        router: Future | None = None
        if callable(vectors):  # computed in each search task (see search_shard_task)
            if nq is None:
                raise InvalidInput("submit_search: give nq with a callable vector source")
            visit = list(range(self.n_shards))
            sources: list[Any] = [vectors] * len(visit)
            router = router_future if probes else None
        elif isinstance(vectors, np.ndarray) or (vectors is not None
                                                 and not _is_pieces(vectors)):
            xq = check_vectors(vectors, self.dim, "xq")
            nq = xq.shape[0]
            routed = self.router.route(xq, nprobe if probes else None)
            visit = routed.shards(self.n_shards) if query.texts is None else \
                list(range(self.n_shards))
            sources = [routed.for_shard(s) for s in visit]
        else:
            if vectors is None:
                if query.dense or query.texts is None:
                    raise InvalidInput("submit_search: no query vectors for a dense search")
                nq = len(query.texts)
                source: Any = None
            else:
                pieces = list(vectors)
                nq = sum(len(rows) for _, rows in pieces)
                source = pieces
                if probes:  # route where the router lives; every shard takes its own part
                    assert router_future is not None
                    source = self.client.submit(route_task, router_future, nprobe, pieces,
                                                key=f"dask-rag-route-{uuid.uuid4().hex}",
                                                pure=False, priority=10)
            visit = list(range(self.n_shards))
            sources = [source] * len(visit)
        if query.texts is not None and len(query.texts) != nq:
            raise InvalidInput(f"the query has {len(query.texts)} texts for {nq} query rows")
        token = uuid.uuid4().hex
        # one map call = one update_graph message for the whole fan-out (a submit per shard
        # costs the client and the scheduler one graph each)
        parts: list[Future] = self.client.map(
            search_shard_task, [shards[s] for s in visit], sources, query=query, nq=nq,
            router=router, key=[(f"dask-rag-search-{token}", s) for s in visit], pure=False,
            priority=10)
        if self.replicas > 1:
            for s, part in zip(visit, parts, strict=True):
                self._track(shards[s], part)
        level = 0
        while len(parts) > MERGE_FAN_IN:
            groups = [parts[i:i + MERGE_FAN_IN] for i in range(0, len(parts), MERGE_FAN_IN)]
            parts = self.client.map(
                merge_group_task, groups, nq=nq, k=query.k, metric=self.metric,
                key=[(f"dask-rag-merge-{token}", level, g) for g in range(len(groups))],
                pure=False, priority=10)
            level += 1
        return parts

    # ---- direct calls for small batches (see dask_rag.index.searcher) -------------------------

    def _direct_calls(self, query: IndexQuery, source: Any, nq: int) -> list[Any] | None:
        """One actor call per worker holding shards, or None when the shards' places are not
        known (then the caller submits a graph)."""
        self._check_open()
        if source is not None and not callable(source):
            raise InvalidInput("direct searches take a callable vector source (an encoder), "
                               "or None for BM25 only")
        with self._lock:
            if self._direct is None:
                self._direct = {k: ws[0] for k, ws in self._replica_holders().items() if ws}
            where = self._direct
            plan: dict[str, list[Any]] = {}
            for s in range(self.n_shards):
                f = self._pick(s)
                if f.key not in where:
                    return None
                plan.setdefault(where[f.key], []).append(f.key)
        index = ((self.location, self.index_uuid)
                 if self.router.quantizer is not None and query.dense else None)
        query = self._consistent(query)
        calls = []
        for worker, keys in plan.items():
            actor = self._searchers.get(worker)
            if actor is None:
                actor = self._new_searcher(worker)
                self._searchers[worker] = actor
            calls.append(actor.search(keys, source, query, nq, index))
        return calls

    def _new_searcher(self, worker: str) -> Any:
        """A :class:`ShardSearcher` actor on ``worker``, bound to this index's client.

        ``future.result()`` would bind the actor's proxy to whatever client is current in
        the process (the last one created), and calls through another cluster's scheduler
        never return; so the proxy is made here, with this client current."""
        from distributed.actor import Actor

        fut = self.client.submit(ShardSearcher, actor=True, workers=[worker],
                                 allow_other_workers=False, pure=False,
                                 key=f"dask-rag-searcher-{self._token}-{worker}")
        wait(fut, timeout=60)
        if fut.status != "finished":
            raise ShardUnavailable(f"no searcher on {worker}: {fut.status}")
        with self.client.as_current():
            return Actor(ShardSearcher, worker, fut.key)

    def _direct_failed(self) -> None:
        """Forget where shards were (and the actors there): the next call asks again."""
        with self._lock:
            self._direct = None
            self._searchers = {}

    def search_direct(self, query: IndexQuery, source: Any, nq: int
                      ) -> list[ShardResult] | None:
        """The shards' answers to a small batch through the per-worker searcher actors (no
        scheduler); None if that path failed — run :meth:`submit_search` instead."""
        try:
            calls = self._direct_calls(query, source, nq)
            results = None if calls is None else [c.result(timeout=DIRECT_TIMEOUT_S)
                                                  for c in calls]
        except DaskRagError:
            raise
        except Exception:  # a worker or its actor is gone, or shards moved
            results = None
        if results is None or any(r is None for r in results):
            self._direct_failed()
            return None
        return [part for r in results for part in r]

    async def asearch_direct(self, query: IndexQuery, source: Any, nq: int
                             ) -> list[ShardResult] | None:
        """:meth:`search_direct` for asyncio code: the actor futures are awaited on the
        client's own event loop, and only the outcome comes back to this one."""
        import asyncio

        try:
            calls = self._direct_calls(query, source, nq)
            if calls is None:
                results = None
            else:
                async def all_of() -> list[Any]:
                    return [await c for c in calls]

                loop = self.client.loop.asyncio_loop  # type: ignore[union-attr]
                results = await asyncio.wait_for(asyncio.wrap_future(
                    asyncio.run_coroutine_threadsafe(all_of(), loop)), DIRECT_TIMEOUT_S)
        except DaskRagError:
            raise
        except Exception:
            results = None
        if results is None or any(r is None for r in results):
            self._direct_failed()
            return None
        return [part for r in results for part in r]

    def search(self, xq: Any, k: int = 10, nprobe: int | None = None, *,
               ef_search: int | None = None, filter: SearchFilter | dict[str, Any] | None = None
               ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Search a batch of query vectors: ``(D, I)`` of shape ``(nq, k)``.

        The last (<= 4-way) merge runs here rather than in a task: the parts come straight
        from the workers, which saves one scheduling round trip per batch.
        """
        query = self.query(k, nprobe, ef_search=ef_search, filter=filter)
        xq = check_vectors(xq, self.dim, "xq")
        try:
            results = gather_hedged(self.client, lambda: self.submit_search(query, xq),
                                    self.hedge_trigger(), HEDGE_AFTER_S)
        except Exception as exc:
            _raise_shard_error(exc)
            raise
        return _full_rows(merge_results(xq.shape[0], query.k, self.metric, results),
                          xq.shape[0], query.k, self.metric)

    async def asearch(self, xq: Any, k: int = 10, nprobe: int | None = None, *,
                      ef_search: int | None = None,
                      filter: SearchFilter | dict[str, Any] | None = None
                      ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """:meth:`search` for asyncio code (never blocks the event loop)."""
        query = self.query(k, nprobe, ef_search=ef_search, filter=filter)
        xq = check_vectors(xq, self.dim, "xq")
        try:
            results = await await_hedged(lambda: self.submit_search(query, xq),
                                         self.hedge_trigger(), HEDGE_AFTER_S)
        except Exception as exc:
            _raise_shard_error(exc)
            raise
        return _full_rows(merge_results(xq.shape[0], query.k, self.metric, list(results)),
                          xq.shape[0], query.k, self.metric)

    def fetch(self, ids: Any) -> list[dict[str, Any] | None]:
        """The stored records of ``ids`` (None for unknown ids), fetched from their shards."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        parts = self._on_each_shard(fetch_task, arr)
        out: list[dict[str, Any] | None] = [None] * len(arr)
        for part in parts:
            for i, rec in enumerate(part):
                if rec is not None:
                    out[i] = rec
        return out

    def ids_of_sources(self, sources: Sequence[str]) -> npt.NDArray[np.int64]:
        """Ids of the live chunks whose source is one of ``sources`` (one task per shard, a
        vectorised pass over its source column)."""
        self._check_open()
        wanted = sorted(set(sources))
        if not wanted:
            return np.zeros(0, dtype=np.int64)
        parts = self._on_each_shard(sources_task, wanted)
        return np.unique(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]))

    def doc_index(self) -> list[tuple[int, str | None, str | None]]:
        """(id, source, doc_hash) of every live chunk, from all shards."""
        parts = self._on_each_shard(doc_index_task)
        return [row for part in parts for row in part]

    # ---- metadata -------------------------------------------------------------------------------

    #: manifest fields that callers may set (:meth:`set_metadata`); the index itself never
    #: reads them
    METADATA_FIELDS = frozenset({"fusion", "fusion_auto"})

    def set_metadata(self, name: str, value: Any) -> None:
        """Record ``value`` (JSON) under ``name`` in the manifest, atomically — e.g. the
        hybrid fusion ``dask-rag eval --tune-fusion`` chose for this index."""
        self._check_open()
        if name not in self.METADATA_FIELDS:
            raise InvalidInput(f"metadata field {name!r} is not one of "
                               f"{sorted(self.METADATA_FIELDS)}")
        json.dumps(value)  # JSON or nothing
        with self._write_lock:
            self._check_open()  # again: close() may have run while this waited
            manifest = store.read_manifest(self.location)
            manifest[name] = value
            manifest["updated_at"] = store.now()
            store.commit_manifest(self.location, manifest)
            self.manifest = manifest

    # ---- placement ----------------------------------------------------------------------------

    def shard_locations(self) -> dict[int, list[str]]:
        """Worker address(es) holding each shard (any of its replicas)."""
        self._reattach()
        reps = self.replica_futures()  # one snapshot: a rebalance may swap futures meanwhile
        holders = self._replica_holders(reps)
        return {s: sorted({w for f in r for w in holders[f.key]}) for s, r in enumerate(reps)}

    def _replica_holders(self, reps: list[list[Future]] | None = None) -> dict[Any, list[str]]:
        """Replica key -> the workers holding it now (sorted; [] while it is being loaded),
        from one scheduler query; for the replicas ``reps`` (a snapshot of
        :meth:`replica_futures`, taken now when not given)."""
        every = [f for r in (self.replica_futures() if reps is None else reps) for f in r]
        who = self.client.who_has(every)
        return {f.key: sorted(who.get(f.key, ())) for f in every}

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
        self._check_open()
        with self._rebalance_lock:
            workers = [] if self._closed else [w for w in self._shard_workers()
                                               if w not in set(exclude)]
            if not workers:
                return 0
            reps = self.replica_futures()
            holders = self._replica_holders(reps)
            current: dict[tuple[int, int], str | None] = {
                (s, r): holders[f.key][0] if holders[f.key] else None
                for s, r_futs in enumerate(reps) for r, f in enumerate(r_futs)}
            moves = plan_placement(current, workers, self._hosts())
            if not moves:
                return 0
            self._epoch += 1
            new = self._settle_loads({slot: self._load_replica(*slot, w)
                                      for slot, w in moves.items()}, moves, replace=False)
            receiving = sorted({moves[slot] for slot, f in new.items()
                                if f.status == "finished"})
            if receiving and self.warm_new_workers is not None:
                try:
                    self.warm_new_workers(receiving)
                except Exception as exc:  # serve anyway: a cold worker is slow, not wrong
                    logging.getLogger(__name__).warning("warming %s failed: %s", receiving,
                                                        exc)
            fault_point("rebalance.loaded")
            with self._lock:
                if self._closed:  # closed while this loaded: drop the new copies
                    for f in new.values():
                        f.release()
                    return 0
                for (s, r), f in new.items():
                    if f.status == "finished":
                        self._replicas[s][r] = f
                        self._holder[f.key] = moves[(s, r)]
                self._direct_failed()
            return sum(1 for f in new.values() if f.status == "finished")

    #: seconds to wait after a membership change before re-spreading (workers come in bursts)
    REBALANCE_DELAY_S = 1.0

    def _on_membership(self, action: str | None, worker: str | None) -> None:
        """Runs on the client's event loop: only (re)arm a timer; the work runs in its thread."""
        if self._closed:
            return
        if action == "remove" and worker:
            self._down.add(worker)
            self._losses += 1
        if self._rebalance_timer is not None:
            self._rebalance_timer.cancel()
        self._rebalance_timer = threading.Timer(self.REBALANCE_DELAY_S, self._auto_rebalance)
        self._rebalance_timer.daemon = True
        self._rebalance_timer.start()

    def _auto_rebalance(self) -> None:
        import time

        if self._closed or self.client.status != "running":
            return
        try:
            with self._rebalance_lock:  # set_elastic(False) waits for this, then none starts
                if not self._elastic:
                    return
                moved = self.rebalance()
            self._refresh_holders()
        except Exception as exc:  # the cluster changed under us: try again in a moment
            self._rebalance_failures += 1
            logging.getLogger(__name__).warning("automatic rebalance failed (%d): %s",
                                                self._rebalance_failures, exc)
            if self._rebalance_failures < 5 and self._elastic:
                self._on_membership(None, None)
            return
        self._rebalance_failures = 0
        self.rebalance_log.append((time.time(), moved))

    def _refresh_holders(self) -> None:
        """Ask the scheduler where every replica is now (after reloads it placed itself)."""
        # a replica still being reloaded keeps its old (departed) holder: still avoided
        self._holder = {**self._holder, **{k: ws[0] for k, ws in
                                           self._replica_holders().items() if ws}}

    def ensure_loaded(self) -> int:
        """Resubmit the load of shard replicas whose futures were lost; returns how many.

        A worker's death is handled by the scheduler itself (it recomputes the shard from
        storage); losing the *scheduler* loses every future.  When the client reconnects to a
        restarted scheduler, this brings the shards back.
        """
        with self._lock:
            lost = [(s, r) for s, reps in enumerate(self._replicas) for r, f in enumerate(reps)
                    if f.status in ("cancelled", "lost", "error")]
            if not lost:
                return 0
            # a restarted scheduler has none of the old one's plugins
            if self._comms is not None:
                tune_comms(self.client, self._comms)
            if self._elastic:
                on_membership_change(self.client)
                self._on_membership(None, None)  # then spread the reloaded replicas
            self._epoch += 1
            self._direct_failed()
            for s, r in lost:
                self._replicas[s][r] = self._load_replica(s, r, None)
            if self._router_future is not None and self._router_future.status in (
                    "cancelled", "lost", "error"):
                self._router_future = self.client.submit(
                    load_router, self.location, pure=False,
                    key=f"dask-rag-router-{self.index_uuid[:8]}{self._token}-{self._epoch}")
        return len(lost)

    # ---- lifecycle ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidInput("this DistributedIndex is closed")

    def close(self) -> None:
        """Release the shard futures (and delete the directory if the index made it).

        A write in progress finishes first (up to 60 s), so nothing writes into the index's
        location after ``close`` returns; later writes fail as "closed"."""
        if self._closed:
            return
        locked = self._write_lock.acquire(timeout=60)
        try:
            self._closed = True
        finally:
            if locked:
                self._write_lock.release()
        off_membership_change(self.client, self._on_membership)
        if self._rebalance_timer is not None:
            self._rebalance_timer.cancel()
        with self._lock:
            for f in [*(f for reps in self._replicas for f in reps), self._router_future]:
                if f is not None:
                    with contextlib.suppress(Exception):
                        f.release()
            self._replicas = []
            self._router_future = None
            self._direct, self._searchers = None, {}
        if self._owns_dir:
            shutil.rmtree(self.location, ignore_errors=True)

    def __enter__(self) -> DistributedIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _is_pieces(vectors: Any) -> bool:
    """Whether ``vectors`` is a list of ``(future, rows)`` pieces rather than a matrix."""
    if not isinstance(vectors, (list, tuple)) or not vectors:
        return False
    first = vectors[0]
    return isinstance(first, tuple) and len(first) == 2 and isinstance(first[0], Future)


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
