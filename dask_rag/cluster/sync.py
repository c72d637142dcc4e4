"""The blocking API, derived from the asynchronous one — each operation is written once.

distributed writes its client's operations as coroutines and gives the blocking forms by running
them on the client's event loop thread (``SyncMethodMixin`` / ``client.sync``).  dask-rag does
the same with a loop of its own: :func:`synchronous` turns ``async def asearch_many`` into
``search_many``, whose call runs the coroutine on one daemon thread's event loop and waits.

Why not the Dask client's loop: the async code calls blocking client methods in places
(``client.run_on_scheduler`` when shards move, ``client.submit``) that must not run on that
loop, and CPU work there (fusion of a batch, rendering records) would stall every comm of the
client.  The HTTP server runs the same coroutines on uvicorn's loop, another thread than the
client's: the blocking API puts them in the same situation, so there is one code path.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

__all__ = ["run_sync", "synchronous"]

T = TypeVar("T")
S = TypeVar("S")
P = ParamSpec("P")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _sync_loop() -> asyncio.AbstractEventLoop:
    """The process's loop for blocking calls, started on first use (a daemon thread)."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="dask-rag-sync",
                             daemon=True).start()
            _loop = loop
        return _loop


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end on the blocking API's loop and return its result (or raise its
    exception).  Works from any thread, including one that runs an event loop of its own (a
    notebook): that loop is blocked meanwhile, as a distributed client's blocking calls block
    it.  An interrupted caller (Ctrl-C) cancels the coroutine."""
    loop = _sync_loop()
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coro.close()
        raise RuntimeError("a blocking dask-rag method was called from a coroutine running on "
                           "dask-rag's own loop: await its async form instead")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


def synchronous(method: Callable[Concatenate[S, P], Coroutine[Any, Any, T]]
                ) -> Callable[Concatenate[S, P], T]:
    """The blocking form of an ``async def a<name>`` method, named ``<name>``, with its
    signature and docstring: ``search_many = synchronous(asearch_many)`` in a class body."""
    @functools.wraps(method)
    def blocking(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return run_sync(method(self, *args, **kwargs))

    name = method.__name__.removeprefix("a")
    blocking.__name__ = name
    blocking.__qualname__ = method.__qualname__.rsplit(".", 1)[0] + "." + name
    blocking.__doc__ = (f"Blocking form of :meth:`{method.__name__}` (see "
                        f":mod:`dask_rag.cluster.sync`).\n\n{method.__doc__ or ''}")
    return blocking
