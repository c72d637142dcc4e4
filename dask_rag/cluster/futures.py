"""Getting results out of Dask futures, and what to do when the cluster changes under them.

* :func:`gather_direct` — results straight from the workers holding them;
* :func:`await_future` — await a (synchronous client's) future from any asyncio loop;
* :data:`TRANSIENT_ERRORS` — the one table of failures that a retry can fix (a worker or a
  connection lost mid-request), :func:`aretry_once` — the one retry policy: run again once,
  then report :class:`~dask_rag.errors.ShardUnavailable` (HTTP 503);
* :func:`await_hedged` — a second copy of a request when a worker is lost under it (or it is
  slow), the first copy to finish wins.

Each is written once, for asyncio; the blocking API runs them on its own loop
(:mod:`dask_rag.cluster.sync`).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from distributed import Client, Future
from distributed.actor import Actor
from distributed.core import ConnectionPool, Status
from distributed.protocol.serialize import to_serialize

from dask_rag.batching import wait_at_most
from dask_rag.errors import DaskRagError, ShardUnavailable

__all__ = ["DIRECT_TIMEOUT_S", "TRANSIENT_ERRORS", "ActorCall", "actor_on", "aretry_once",
           "await_actor_calls", "await_future", "await_futures", "await_hedged",
           "close_actor_connections", "falls_back", "gather_direct", "is_transient",
           "release_placement"]

T = TypeVar("T")

#: names of the exceptions raised when a worker, a connection or the scheduler went away while
#: a request was in flight (by name: several live in modules that move between releases)
TRANSIENT_ERRORS = frozenset({"KilledWorker", "FutureCancelledError", "CancelledError",
                              "CommClosedError", "OSError", "TimeoutError",
                              "ConnectionRefusedError", "FutureLostError"})


def gather_direct(client: Client, futures: Any) -> Any:
    """``client.gather`` straight from the workers holding the results.

    distributed's default for a client outside the cluster relays every result through the
    scheduler — a second hop, and CPU on the one process every request shares (on the serving
    path that relay was ~half of the scheduler's work).  A client created with
    ``direct_to_workers=False`` (workers unreachable from it, e.g. behind a gateway) keeps
    the relay.
    """
    return client.gather(futures, direct=client.direct_to_workers is not False)


def release_placement(client: Client, futures: list[Future]) -> None:
    """Drop the worker restrictions of finished tasks that were placed on a chosen worker.

    A placement (``workers=[w], allow_other_workers=True``) stays on the scheduler's record of
    the task, and counts again when the task is recomputed after its result is lost.  If every
    worker it names is gone by then, distributed parks the task as ``no-worker`` and does not
    reconsider it when new workers join (``bulk_schedule_unrunnable_after_adding_worker``
    ignores loose restrictions): measured here, SIGKILL both workers of a LocalCluster and
    every shard stayed unrunnable on the restarted ones.  Once placed, a shard may be
    recomputed anywhere, so the restriction goes.
    """
    keys = [f.key for f in futures]

    def release(dask_scheduler: Any) -> None:
        for key in keys:
            ts = dask_scheduler.tasks.get(key)
            if ts is not None:
                ts.worker_restrictions = None
                ts.loose_restrictions = False

    client.run_on_scheduler(release)


#: a direct (actor) call that has not answered by then is given up for the task-graph path
DIRECT_TIMEOUT_S = 30.0


def actor_on(client: Client, cls: type, worker: str, key: str) -> Any:
    """An actor of ``cls`` on ``worker``, its proxy bound to ``client``.

    ``future.result()`` would bind the actor's proxy to whatever client is current in the
    process (the last one created), and calls through another cluster's scheduler never
    return; so the proxy is made here, with this client current."""
    from distributed import wait

    fut = client.submit(cls, actor=True, workers=[worker], allow_other_workers=False,
                        pure=False, key=key)
    wait(fut, timeout=60)
    if fut.status != "finished":
        raise ShardUnavailable(f"no {cls.__name__} actor on {worker}: {fut.status}")
    with client.as_current():
        return Actor(cls, worker, fut.key)


@dataclass(frozen=True)
class ActorCall:
    """One call of ``method(*args)`` on an actor (an :func:`actor_on` proxy), not yet sent:
    :func:`await_actor_calls` sends it from the loop that awaits it."""

    actor: Any
    method: str
    args: tuple[Any, ...]


#: per client, per event loop: the connections that loop's actor calls go through
_POOLS: weakref.WeakKeyDictionary[Client, weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, ConnectionPool]] = weakref.WeakKeyDictionary()
_POOLS_LOCK = threading.Lock()


async def _pool_here(client: Client) -> ConnectionPool:
    """Connections to the workers owned by the running loop (with ``client``'s security)."""
    loop = asyncio.get_running_loop()
    with _POOLS_LOCK:
        pools = _POOLS.setdefault(client, weakref.WeakKeyDictionary())
        pool = pools.get(loop)
        if pool is None:
            pool = pools[loop] = ConnectionPool(limit=512, deserialize=True,
                                                connection_args=client.connection_args)
    if pool.status != Status.running:
        await pool.start()
    return pool


async def close_actor_connections(client: Client) -> None:
    """Close the running loop's connections for ``client``'s actor calls (a server's
    shutdown: else they stay open until the loop is gone)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(client, {}).pop(asyncio.get_running_loop(), None)  # type: ignore[call-overload]
    if pool is not None:
        await pool.close()


async def _execute(pool: ConnectionPool, call: ActorCall) -> Any:
    """``call`` sent straight to its actor's worker — what distributed's proxy sends, from
    this loop (the worker's ``actor_execute`` handler; a method that is not a coroutine
    runs in the worker's actor thread, as with the proxy)."""
    actor = call.actor
    reply = await pool(actor._address).actor_execute(
        function=call.method, actor=actor.key, args=[to_serialize(a) for a in call.args],
        kwargs={})
    if reply["status"] == "OK":
        return reply["result"]
    raise reply["exception"]


async def await_actor_calls(client: Client, calls: list[ActorCall], timeout: float,
                            on_done: Callable[[int], None] | None = None) -> list[Any]:
    """The results of actor calls of ``client``'s actors, at most ``timeout`` seconds;
    ``on_done(i)`` is called as soon as call ``i`` has finished, failed or not — e.g. to
    stop counting its work against its worker while the other calls still run.

    The calls go from the loop that awaits them straight to the workers (by the rule of
    :func:`gather_direct`: unless the client was created with ``direct_to_workers=False``).
    Why not through the proxy: a synchronous client's proxy runs each call on the client's
    own event loop thread, two thread hand-offs per call in the caller's process. Measured
    on 2 cores (a trivial actor method, p50 of 1,200 calls): 2.28 ms through the proxy and
    the client's loop, 1.54 ms from the caller's loop."""
    async def one(i: int, result: Awaitable[Any]) -> Any:
        try:
            return await result
        finally:
            if on_done is not None:
                on_done(i)

    if client.direct_to_workers is not False:
        pool = await _pool_here(client)
        return list(await wait_at_most(
            asyncio.gather(*(one(i, _execute(pool, c)) for i, c in enumerate(calls))), timeout))

    async def relayed() -> list[Any]:  # the proxy's path, on the client's loop
        return list(await asyncio.gather(*(
            one(i, getattr(c.actor, c.method)(*c.args)) for i, c in enumerate(calls))))

    loop = client.loop.asyncio_loop  # type: ignore[union-attr]
    done = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(relayed(), loop))
    return await asyncio.wait_for(done, timeout)


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


async def await_futures(futures: list[Future]) -> list[Any]:
    """Await several futures of one client: one gather from their workers once all are done
    (not one per future)."""
    if not futures:
        return []
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()
    remaining = [len(futures)]

    def _deliver(ok: bool, value: Any) -> None:
        if not done.done():
            done.set_result(value) if ok else done.set_exception(value)

    def _on_done(_: Future) -> None:
        remaining[0] -= 1  # callbacks run one at a time, in distributed's callback thread
        if remaining[0]:
            return
        try:
            value, ok = gather_direct(futures[0].client, futures), True
        except BaseException as exc:
            value, ok = exc, False
        loop.call_soon_threadsafe(_deliver, ok, value)

    for f in futures:
        f.add_done_callback(_on_done)
    result: list[Any] = await done
    return result


def is_transient(exc: BaseException) -> bool:
    """A failure that a retry can fix: a worker or connection lost mid-request."""
    if isinstance(exc, ShardUnavailable):
        return True
    if isinstance(exc, DaskRagError):
        return False  # bad input, overload, ...: retrying would not help
    return type(exc).__name__ in TRANSIENT_ERRORS


def falls_back(exc: BaseException) -> bool:
    """The rule of every direct (actor) path: whether ``exc`` sends the work to tasks or a
    graph instead — a worker lost under the call, an actor that cannot start on it, anything
    not the project's own verdict — rather than being the caller's answer (bad input, a
    mismatched encoder: the same on any path)."""
    return not isinstance(exc, DaskRagError) or is_transient(exc)


def _gave_up(first: BaseException, second: BaseException) -> ShardUnavailable:
    return ShardUnavailable(f"request failed twice while the cluster was changing: "
                            f"{type(first).__name__}, then {type(second).__name__}: {second}")


async def aretry_once(fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn()``; if a worker or connection was lost under it, run it once more, then
    report :class:`~dask_rag.errors.ShardUnavailable` (HTTP 503)."""
    try:
        return await fn()
    except Exception as exc:
        if not is_transient(exc):
            raise
        first = exc
    try:
        return await fn()
    except Exception as exc:
        if not is_transient(exc):
            raise
        raise _gave_up(first, exc) from exc


# ---- hedged requests: a second copy of a request when its first copy may be stuck -----------

#: how often a request in flight looks for a lost worker (only requests slower than this look)
HEDGE_POLL_S = 0.1


def _flat(futures: Any) -> list[Future]:
    return list(futures) if isinstance(futures, (list, tuple)) else [futures]


def _gather_on_loop(client: Client, futures: Any) -> Any:
    """``gather_direct(client, futures)`` running on the client's event loop: a
    ``concurrent.futures.Future`` of the result, which the caller may stop waiting for."""
    coro = client.gather(futures, direct=client.direct_to_workers is not False,
                         asynchronous=True)
    loop = client.loop.asyncio_loop  # type: ignore[union-attr]
    return asyncio.run_coroutine_threadsafe(_awaited(coro), loop)


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


async def await_hedged(submit: Callable[[], Any], losses: Callable[[], int] | None,
                       hedge_after_s: float | None = None) -> Any:
    """Submit a request (``submit()``: a future or a list of futures) and gather it; if a
    worker is lost before its result is here (``losses()`` changes: the cluster's membership
    counter) — or, with ``hedge_after_s``, it is still not here after that long — submit it
    a second time and return whichever copy's result arrives first.

    Why: a search whose replica dies waits for the scheduler to reload that replica (seconds,
    a download from an object store) although another replica is live; and a search whose
    finished result sat on the worker that died is *rescheduled* by the gather — the same
    reload.  ``submit`` picks live, least-loaded replicas, so the second copy runs on the
    survivors; the results are the same bits whichever copy answers.  ``losses=None``: no
    hedging (one replica: the second copy would wait for the same reload).  A delay-based
    hedge doubles the work of every request slower than the delay — under overload, all of
    them — so callers here hedge on loss only.  Works from any event loop: the gathers run
    on the client's, only their outcomes come here; the loss counter is read every
    :data:`HEDGE_POLL_S`.
    """
    import time

    def start(copy: Any) -> asyncio.Future[Any]:
        flat = _flat(copy)
        return asyncio.wrap_future(_gather_on_loop(flat[0].client, copy))

    first = start(submit())
    if losses is None:
        return await first
    seen = losses()
    give_up = None if hedge_after_s is None else time.monotonic() + hedge_after_s
    while True:
        done, _ = await asyncio.wait({first}, timeout=HEDGE_POLL_S)
        if done:
            return first.result()
        if losses() != seen or (give_up is not None and time.monotonic() > give_up):
            break
    pending = {first, start(submit())}
    while True:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            exc = task.exception()
            if exc is None:
                for other in pending:
                    other.cancel()
                return task.result()
            if not pending or not is_transient(exc):
                raise exc
