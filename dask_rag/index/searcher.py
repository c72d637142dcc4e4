"""Searches without the scheduler: a :class:`ShardSearcher` actor on each worker that the
client calls directly.

A Dask graph, however small, costs a trip through the scheduler: measured here on a 2-worker
LocalCluster, ~4-7 ms from submitting a task until it starts and ~9 ms end to end for two
trivial tasks, against ~3 ms for a direct call to an actor on each of the two workers.  For a
lone query that trip was most of its latency (``benchmarks/latency.py``); under load, a
graph's five tasks per batch cost the scheduler and the workers CPU the encoder needs
(``benchmarks/limit.py``: dense search at 64 clients 1.15x through the actors).  So a batch
calls, on every worker holding shards, the worker's ``ShardSearcher`` — a Dask actor — with
the keys of the shard futures in that worker's memory and the query vectors: the matrix the
encoder actors made, or (a batch of a few texts) the texts, which the actor embeds once; it
routes the batch (IVF: with a router it loads from the index directory once) and runs
:func:`~dask_rag.index.tasks.search_shard_task` on each of its shards.

It is an optimisation only, never the source of truth: shards stay persisted futures (the
scheduler recomputes them from disk after a failure), an actor that does not hold a shard it is
asked for answers ``None``, and a lost actor raises; either way the caller runs the same search
as a graph (:meth:`~dask_rag.index.distributed.DistributedIndex.submit_search`) and the index
refreshes its view of where shards live.  The results are the same bits either way: it is the
same search function on the same shard objects.

The actor's searches run in a thread of their own, not in the worker's actor thread: the
encoder actor (:class:`~dask_rag.embed.service.EncoderActor`) runs there, and a batch's
search queued behind the next batch's embedding held the first batch's answers back until
both were done — a timeline of the workers at 64 clients showed every wave finishing at once
and both workers idle for 12-130 ms while its callers came back (dense search: workers busy
85 % against 94 % for ``/v1/embeddings``).  A search takes milliseconds and faiss releases
the GIL, so it runs beside an embedding instead of after it.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dask_rag.index.build import load_router
from dask_rag.index.query import IndexQuery, ShardResult
from dask_rag.index.routing import RoutedBatch, Router
from dask_rag.index.shard import Shard
from dask_rag.index.tasks import route_batch, search_shard_task
from dask_rag.index.vectors import EmbedInTask, NoVectors, QueryMatrix

__all__ = ["ShardSearcher"]

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _search_thread() -> ThreadPoolExecutor:
    """This process's one search thread (see the module docstring)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(1, thread_name_prefix="dask-rag-search")
        return _pool


class ShardSearcher:
    """The per-worker actor (see the module docstring)."""

    def __init__(self) -> None:
        self._routers: dict[tuple[str, str], Router] = {}

    async def search(self, keys: list[Any], source: QueryMatrix | EmbedInTask | NoVectors,
                     query: IndexQuery,
                     nq: int, index: tuple[str, str] | None) -> list[ShardResult] | None:
        """Search the shards with future keys ``keys`` held by this worker; None when one of
        them is not here (moved, being reloaded).  ``index`` is (directory, uuid) when the
        batch must be routed (IVF factories).  (A coroutine, so Dask runs it on the worker's
        event loop, which hands the work to the search thread.)"""
        from distributed import get_worker

        data = get_worker().data
        # in this task's context, where get_worker() finds the worker (embedding a small
        # batch reaches the worker's model cache through it)
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            _search_thread(), context.run, self._search, data, keys, source, query, nq, index)

    def _search(self, data: Any, keys: list[Any], source: QueryMatrix | EmbedInTask | NoVectors,
                query: IndexQuery, nq: int, index: tuple[str, str] | None
                ) -> list[ShardResult] | None:
        shards = []
        for key in keys:
            try:
                shard = data[key]
            except KeyError:
                return None
            if not isinstance(shard, Shard):
                return None
            shards.append(shard)
        batch: RoutedBatch | NoVectors = source if isinstance(source, NoVectors) else \
            route_batch(source.matrix(), self._router(index), query)  # once for all shards
        return [search_shard_task(shard, batch, query, nq) for shard in shards]

    def _router(self, index: tuple[str, str] | None) -> Router | None:
        if index is None:
            return None
        router = self._routers.get(index)
        if router is None:
            router = load_router(index[0])
            self._routers = {index: router}  # one index at a time is the common case
        return router
