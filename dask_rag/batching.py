"""The async micro-batcher used everywhere: embedding, search and the HTTP shim.

Callers ``await batcher.submit(item)`` one item at a time; the batcher groups waiting items and
calls ``process(items)`` once per batch.  A batch is flushed when ``max_batch`` items wait or the
oldest waiting item has waited ``max_wait_ms`` — so a lone request pays at most
``max_wait_ms`` extra, and under load each model call / Dask graph serves up to ``max_batch``
requests.  While another batch is being processed the oldest may wait ``busy_wait_ms`` instead
(see :class:`~dask_rag.config.BatchConfig`): under load, batches fill instead of splitting.
When nothing is in flight but the last batches just answered more callers than are waiting,
those callers are likely coming back (closed-loop clients): the batcher then waits for that many,
at most ``busy_wait_ms``, instead of flushing the first one alone.
Up to ``max_concurrent_batches`` batches run at once, so the next batch is formed and submitted
while the previous one computes (stages of successive batches overlap).

Guarantees:

* a full queue (``max_queue`` waiting items) raises :class:`~dask_rag.errors.Overloaded` at once,
  with a ``retry_after`` estimate — back-pressure instead of unbounded latency;
* an exception in ``process`` fails only the callers of that batch;
* a caller that is cancelled while waiting is dropped from its batch;
* ``close()`` stops accepting work and, by default, drains what is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from dask_rag.config import BatchConfig
from dask_rag.errors import InvalidInput, Overloaded

__all__ = ["BatcherStats", "Clock", "ManualClock", "MicroBatcher", "wait_at_most"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class BatcherStats:
    """Counters of a batcher (read them, do not write them)."""

    submitted: int = 0
    rejected: int = 0
    batches: int = 0
    items: int = 0
    failed_batches: int = 0
    cancelled: int = 0
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def mean_batch(self) -> float:
        return self.items / self.batches if self.batches else 0.0


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    enqueued: float


async def wait_at_most(aw: Awaitable[R], seconds: float) -> R:
    """``await aw`` with a timeout (``asyncio.TimeoutError``), without the extra task that
    ``asyncio.wait_for`` creates before Python 3.12 — this runs once per request."""
    timeout = getattr(asyncio, "timeout", None)
    if timeout is None:  # Python 3.10
        return await asyncio.wait_for(aw, seconds)
    async with timeout(seconds):
        return await aw


class Clock:
    """The batcher's time: ``now()`` in seconds, and ``wait(event, timeout)`` — until the event
    is set or ``timeout`` seconds have passed on this clock.  The default is the monotonic
    clock; tests inject a :class:`ManualClock` and move time themselves."""

    def now(self) -> float:
        return time.monotonic()

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await wait_at_most(event.wait(), timeout)


class ManualClock(Clock):
    """A clock that moves only when told to (:meth:`advance`): what the batcher does at
    ``max_wait_ms`` is then a fact about events, not a race against the machine's speed."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self._now + timeout, wake)
        self._sleepers.append(entry)
        waiter: asyncio.Future[Any] = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait([waiter, wake], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if entry in self._sleepers:
                self._sleepers.remove(entry)

    def advance(self, seconds: float) -> None:
        """Move time forward, waking every wait whose deadline has come."""
        self._now += seconds
        for deadline, wake in list(self._sleepers):
            if deadline <= self._now + 1e-12 and not wake.done():
                wake.set_result(None)


class MicroBatcher(Generic[T, R]):
    """Coalesce concurrent single-item requests into batched calls of ``process``."""

    def __init__(self, process: Callable[[list[T]], Awaitable[Sequence[R]]],
                 config: BatchConfig | None = None, name: str = "batcher",
                 clock: Clock | None = None) -> None:
        self.process = process
        self.config = config or BatchConfig()
        self.name = name
        self.clock = clock or Clock()
        self.stats = BatcherStats()
        #: called with (batch size, seconds) after every batch, e.g. to feed a histogram
        self.observer: Callable[[int, float], None] | None = None
        self._queue: deque[_Pending[T, R]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._runner: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._recent_batch_s = 0.05
        #: callers answered since the last flush (the second half of a wave split in two:
        #: since the flush before): how many may be about to come back
        self._answered = 0
        #: queue length at which the runner wants waking (a full batch, or the answered ones)
        self._target = self.config.max_batch

    # ---- public API ------------------------------------------------------------------------

    async def submit(self, item: T) -> R:
        """Queue one item and wait for its result."""
        if self._closing:
            raise Overloaded(f"{self.name} is shutting down", retry_after=1.0)
        self._ensure_started()
        if len(self._queue) >= self.config.max_queue:
            self.stats.rejected += 1
            raise Overloaded(f"{self.name}: {len(self._queue)} requests already queued",
                             retry_after=self._retry_after())
        assert self._loop is not None and self._wakeup is not None
        fut: asyncio.Future[R] = self._loop.create_future()
        self._queue.append(_Pending(item, fut, self.clock.now()))
        self.stats.submitted += 1
        # the runner only needs waking for a first item (it starts the max_wait clock) or a
        # full batch; waking it per item cost a task + timer each in the event loop
        if len(self._queue) == 1 or len(self._queue) >= self._target:
            self._wakeup.set()
        try:
            return await fut
        except asyncio.CancelledError:
            self.stats.cancelled += 1
            raise

    async def close(self, drain: bool = True) -> None:
        """Stop accepting work; with ``drain`` finish queued items, else fail them."""
        self._closing = True
        if not drain:
            while self._queue:
                p = self._queue.popleft()
                if not p.future.done():
                    p.future.set_exception(Overloaded(f"{self.name} was closed", 1.0))
        if self._loop is not asyncio.get_running_loop():
            # bound to an event loop that is gone (asyncio.run finished): nothing can run
            self._runner, self._inflight = None, set()
            return
        if self._wakeup is not None:
            self._wakeup.set()
        if self._runner is not None:
            await self._runner
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)

    def reopen(self) -> None:
        """Accept work again after :meth:`close` (e.g. a server restarted in one process)."""
        self._closing = False

    # ---- internals --------------------------------------------------------------------------

    def _retry_after(self) -> float:
        # time to work off the queue at the recent batch rate, at least a second
        batches = len(self._queue) / max(1, self.config.max_batch)
        est = batches * self._recent_batch_s / max(1, self.config.max_concurrent_batches)
        return max(1.0, round(est, 1))

    def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._runner is not None and self._loop is loop and not self._runner.done():
            return
        if self._loop is not None and self._loop is not loop and self._runner is not None \
                and not self._runner.done():
            raise InvalidInput(f"{self.name} is bound to another event loop")
        self._loop = loop
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.config.max_concurrent_batches)
        self._runner = loop.create_task(self._run(), name=f"{self.name}-runner")

    def _take_batch(self, limit: int) -> list[_Pending[T, R]]:
        batch: list[_Pending[T, R]] = []
        while self._queue and len(batch) < limit:
            p = self._queue.popleft()
            if p.future.done():  # cancelled caller: drop it
                continue
            batch.append(p)
        return batch

    async def _run(self) -> None:
        assert self._wakeup is not None and self._slots is not None
        max_wait = self.config.max_wait_ms / 1000.0
        busy_wait = max(max_wait, self.config.busy_wait_ms / 1000.0)
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # wait until the batch is full or the oldest item has waited max_wait (busy_wait
            # while another batch is in flight, or while the callers just answered are coming
            # back: a lone caller goes at once, the wave of a finished batch goes together)
            self._target = self.config.max_batch
            wait = busy_wait
            coming = min(self.config.max_batch, self._answered)
            halved = False
            if not self._inflight:
                split = self.config.split_wave_min
                if 0 < split <= coming and self.config.max_concurrent_batches > 1:
                    coming, halved = (coming + 1) // 2, True  # see BatchConfig.split_wave_min
                if len(self._queue) < coming:
                    self._target = coming
                else:
                    wait = max_wait
            elif coming:  # the rest of a returning wave: it goes once it is back
                self._target = coming
            deadline = self._queue[0].enqueued + wait
            while len(self._queue) < self._target and not self._closing:
                remaining = deadline - self.clock.now()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                await self.clock.wait(self._wakeup, remaining)
            self._target = self.config.max_batch
            await self._slots.acquire()
            # the first half of a split wave goes alone even when the whole wave is already
            # back (callers that return together: an upstream generator answers a batch's
            # requests at the same moment) — else such waves never spread out
            batch = self._take_batch(coming if halved else self.config.max_batch)
            # the second half of a split wave is expected next — if the first half did come
            # back (not a timeout: those callers left); otherwise a new count starts
            self._answered = (self._answered - len(batch)
                              if halved and len(batch) >= coming else 0)
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._process(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _process(self, batch: list[_Pending[T, R]]) -> None:
        assert self._slots is not None
        t0 = self.clock.now()
        try:
            results = await self.process([p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: process returned {len(results)} results for "
                                   f"{len(batch)} items")
        except BaseException as exc:
            self.stats.failed_batches += 1
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
        else:
            for p, r in zip(batch, results, strict=True):
                if not p.future.done():
                    p.future.set_result(r)
        finally:
            self._slots.release()
            self.stats.batches += 1
            self.stats.items += len(batch)
            self._answered += len(batch)
            if len(self.stats.batch_sizes) < 100_000:
                self.stats.batch_sizes.append(len(batch))
            elapsed = self.clock.now() - t0
            self._recent_batch_s = 0.8 * self._recent_batch_s + 0.2 * elapsed
            if self.observer is not None:
                self.observer(len(batch), elapsed)
