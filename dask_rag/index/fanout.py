"""How a query batch reaches the shards: a task graph (:class:`SearchGraph`), or, for a small
batch, direct calls to a searcher actor on each worker (:class:`DirectSearch`).

Both take the batch's vectors as one :data:`~dask_rag.index.vectors.QueryVectors`, the query
already stamped with the index's read token (the last acknowledged write and the BM25 weights
at it), and the replicas to search from the index's
:class:`~dask_rag.index.replicas.ReplicaSet`.  Both end in the same
:func:`~dask_rag.index.tasks.search_shard_task` on the same shard objects, so they return the
same bits; the direct path is an optimisation that falls back to the graph.
"""

from __future__ import annotations

import uuid
from typing import Any

from distributed import Client, Future

from dask_rag.cluster.futures import (
    DIRECT_TIMEOUT_S,
    ActorCall,
    actor_on,
    await_actor_calls,
    falls_back,
)
from dask_rag.errors import InvalidInput
from dask_rag.index.query import IndexQuery, ShardResult, check_vectors
from dask_rag.index.replicas import ReplicaSet
from dask_rag.index.routing import Router
from dask_rag.index.searcher import ShardSearcher
from dask_rag.index.tasks import merge_group_task, route_task, search_shard_task
from dask_rag.index.vectors import (
    EmbeddedPieces,
    EmbedInTask,
    NoVectors,
    QueryMatrix,
    QueryVectors,
)

__all__ = ["MERGE_FAN_IN", "DirectSearch", "SearchGraph"]

#: merge tasks take at most this many parts; submit returns at most this many
MERGE_FAN_IN = 4

class SearchGraph:
    """Submits one batch's graph: [route], one search task per shard to visit (on the replica
    :meth:`ReplicaSet.pick <dask_rag.index.replicas.ReplicaSet.pick>` chooses, so only query
    rows travel), then a merge tree of fan-in :data:`MERGE_FAN_IN`."""

    def __init__(self, client: Client, replicas: ReplicaSet, router: Router, dim: int,
                 metric: str, default_nprobe: int | None) -> None:
        self.client = client
        self.replicas = replicas
        self.router = router
        self.dim = dim
        self.metric = metric
        self.default_nprobe = default_nprobe

    def submit(self, query: IndexQuery, vectors: QueryVectors) -> list[Future]:
        """The futures of at most :data:`MERGE_FAN_IN` partial results covering the batch."""
        reps = self.replicas
        n_shards = reps.n_shards
        with reps.lock:
            shards = [reps.pick(s) for s in range(n_shards)]
            router_future = reps.router_future
        nprobe = query.nprobe or self.default_nprobe
        probes = self.router.quantizer is not None and query.dense
        every = list(range(n_shards))
        router: Future | None = None
        match vectors:
            case QueryMatrix():  # routed here: each shard gets only its rows
                xq = check_vectors(vectors.xq, self.dim, "xq")
                routed = self.router.route(xq, nprobe if probes else None)
                visit = routed.shards(n_shards) if query.texts is None else every
                sources: list[Any] = [routed.for_shard(s) for s in visit]
            case EmbedInTask():  # embedded (and routed) in each search task
                visit, sources = every, [vectors] * n_shards
                router = router_future if probes else None
            case EmbeddedPieces():  # route where the router lives; every shard takes its part
                source: Any = vectors
                if probes:
                    assert router_future is not None
                    source = self.client.submit(route_task, router_future, nprobe, vectors,
                                                key=f"dask-rag-route-{uuid.uuid4().hex}",
                                                pure=False, priority=10)
                visit, sources = every, [source] * n_shards
            case NoVectors():
                if query.dense or query.texts is None:
                    raise InvalidInput("submit_search: no query vectors for a dense search")
                visit, sources = every, [vectors] * n_shards
        nq = vectors.nq
        if query.texts is not None and len(query.texts) != nq:
            raise InvalidInput(f"the query has {len(query.texts)} texts for {nq} query rows")
        token = uuid.uuid4().hex
        # one map call = one update_graph message for the whole fan-out (a submit per shard
        # costs the client and the scheduler one graph each)
        parts: list[Future] = self.client.map(
            search_shard_task, [shards[s] for s in visit], sources, query=query, nq=nq,
            router=router, key=[(f"dask-rag-search-{token}", s) for s in visit], pure=False,
            priority=10)
        if reps.replicas > 1:
            for s, part in zip(visit, parts, strict=True):
                reps.track(shards[s], part)
        level = 0
        while len(parts) > MERGE_FAN_IN:
            groups = [parts[i:i + MERGE_FAN_IN] for i in range(0, len(parts), MERGE_FAN_IN)]
            parts = self.client.map(
                merge_group_task, groups, nq=nq, k=query.k, metric=self.metric,
                key=[(f"dask-rag-merge-{token}", level, g) for g in range(len(groups))],
                pure=False, priority=10)
            level += 1
        return parts


class DirectSearch:
    """Searches without the scheduler: one call per worker holding shards to its
    :class:`~dask_rag.index.searcher.ShardSearcher` actor (see that module for why)."""

    def __init__(self, client: Client, replicas: ReplicaSet, location: str, index_uuid: str,
                 routed: bool) -> None:
        self.client = client
        self.replicas = replicas
        #: (location, uuid) for the actors to load the router from, when batches are routed
        self._index = (location, index_uuid) if routed else None
        self._actors: dict[str, Any] = {}

    def _calls(self, query: IndexQuery, vectors: QueryVectors) -> list[Any] | None:
        """One actor call per worker holding shards, or None when the shards' places are not
        known (then the caller submits a graph)."""
        self.replicas.check_open()
        if not isinstance(vectors, (QueryMatrix, EmbedInTask, NoVectors)):
            raise InvalidInput("direct searches take a query matrix, texts to embed in the "
                               "task (EmbedInTask), or none for BM25 only")
        plan = self.replicas.where_searchable()
        if plan is None:
            return None
        index = self._index if query.dense else None
        calls = []
        for worker, keys in plan.items():
            actor = self._actors.get(worker)
            if actor is None:
                actor = self._actors[worker] = self._new_actor(worker)
            calls.append(ActorCall(actor, "search", (keys, vectors, query, vectors.nq, index)))
        return calls

    def _new_actor(self, worker: str) -> Any:
        """A :class:`ShardSearcher` actor on ``worker``, bound to this index's client."""
        return actor_on(self.client, ShardSearcher, worker,
                        f"dask-rag-searcher-{self.replicas.token}-{worker}")

    def forget(self) -> None:
        """Drop the actors' proxies (and ask where shards are) before the next call."""
        self.replicas.forget_holders()
        self._actors = {}

    def _outcome(self, results: list[Any] | None) -> list[ShardResult] | None:
        if results is None or any(r is None for r in results):
            self.forget()
            return None
        return [part for r in results for part in r]

    async def asearch(self, query: IndexQuery, vectors: QueryVectors
                      ) -> list[ShardResult] | None:
        """The shards' answers, or None if this path failed (a worker or its actor is gone,
        or shards moved) — submit the graph instead.  The actor futures are awaited on the
        client's own event loop, and only the outcome comes back to this one."""
        try:
            calls = self._calls(query, vectors)
            results = None if calls is None else await await_actor_calls(
                self.client, calls, DIRECT_TIMEOUT_S)
        except Exception as exc:
            if not falls_back(exc):  # (else the search goes to the graph)
                raise
            results = None
        return self._outcome(results)
