"""MicroBatcher: batch sizes, flush on time, failure isolation, back-pressure, cancellation."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from dask_rag.batching import MicroBatcher
from dask_rag.config import BatchConfig
from dask_rag.errors import Overloaded


def run(coro):
    return asyncio.run(coro)


def test_1000_concurrent_requests_use_few_calls():
    calls: list[int] = []

    async def process(items):
        calls.append(len(items))
        await asyncio.sleep(0.002)
        return [x * 2 for x in items]

    async def main():
        b = MicroBatcher(process, BatchConfig(max_batch=128, max_wait_ms=5))
        out = await asyncio.gather(*(b.submit(i) for i in range(1000)))
        await b.close()
        return out

    out = run(main())
    assert out == [i * 2 for i in range(1000)]
    assert len(calls) <= math.ceil(1000 / 128) + 2
    assert max(calls) <= 128 and sum(calls) == 1000


def test_lone_request_waits_about_max_wait():
    async def process(items):
        return items

    async def main():
        b = MicroBatcher(process, BatchConfig(max_batch=64, max_wait_ms=30))
        t0 = time.perf_counter()
        await b.submit("x")
        dt = time.perf_counter() - t0
        await b.close()
        return dt

    dt = run(main())
    # flushed by the timer (not by size), and not much later than max_wait_ms
    assert 0.025 <= dt < 0.5


def test_full_batch_flushes_without_waiting():
    async def process(items):
        return items

    async def main():
        b = MicroBatcher(process, BatchConfig(max_batch=8, max_wait_ms=10_000))
        t0 = time.perf_counter()
        await asyncio.gather(*(b.submit(i) for i in range(8)))
        dt = time.perf_counter() - t0
        await b.close()
        return dt

    assert run(main()) < 5.0


def test_exception_fails_only_its_batch():
    async def process(items):
        if "bad" in items:
            raise ValueError("boom")
        return [i.upper() for i in items]

    async def main():
        b = MicroBatcher(process, BatchConfig(max_batch=2, max_wait_ms=1))
        first = await asyncio.gather(b.submit("bad"), b.submit("x"), return_exceptions=True)
        second = await asyncio.gather(b.submit("a"), b.submit("b"))
        await b.close()
        return first, second, b.stats

    first, second, stats = run(main())
    assert all(isinstance(r, ValueError) for r in first)
    assert second == ["A", "B"]
    assert stats.failed_batches == 1


def test_full_queue_raises_overloaded():
    release = asyncio.Event

    async def main():
        gate = release()

        async def process(items):
            await gate.wait()
            return items

        b = MicroBatcher(process, BatchConfig(max_batch=1, max_wait_ms=0, max_queue=5,
                                              max_concurrent_batches=1))
        waiting = [asyncio.ensure_future(b.submit(0))]
        await asyncio.sleep(0.05)  # item 0 is in flight, blocked on the gate
        waiting += [asyncio.ensure_future(b.submit(i)) for i in range(1, 6)]
        await asyncio.sleep(0.05)  # five queued behind it: the queue is full
        with pytest.raises(Overloaded) as info:
            await asyncio.wait_for(b.submit(99), 5)
        assert info.value.retry_after >= 1.0
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*waiting), 10)
        await b.close()
        return results, b.stats.rejected

    results, rejected = run(main())
    assert results == list(range(6)) and rejected == 1


def test_cancelled_caller_is_dropped():
    seen: list[list[int]] = []

    async def main():
        gate = asyncio.Event()

        async def process(items):
            seen.append(list(items))
            await gate.wait()
            return items

        b = MicroBatcher(process, BatchConfig(max_batch=10, max_wait_ms=0,
                                              max_concurrent_batches=1))
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.02)  # batch [0] in flight, the next ones queue behind it
        doomed = asyncio.ensure_future(b.submit(1))
        kept = asyncio.ensure_future(b.submit(2))
        await asyncio.sleep(0.01)
        doomed.cancel()
        gate.set()
        await first
        assert await kept == 2
        await b.close()

    run(main())
    assert [1] not in seen and all(1 not in batch for batch in seen)


def test_close_drains_queued_work():
    async def process(items):
        await asyncio.sleep(0.01)
        return items

    async def main():
        b = MicroBatcher(process, BatchConfig(max_batch=4, max_wait_ms=50))
        futs = [asyncio.ensure_future(b.submit(i)) for i in range(10)]
        await asyncio.sleep(0)
        await b.close()
        with pytest.raises(Overloaded):
            await b.submit(1)
        return [f.result() for f in futs]

    assert run(main()) == list(range(10))


def test_busy_wait_fills_batches_while_one_is_in_flight():
    """Requests trickling in while a batch computes form one batch (not one per max_wait),
    and a lone request on an idle batcher still goes after about max_wait."""
    calls: list[int] = []

    async def process(items):
        calls.append(len(items))
        await asyncio.sleep(0.15)
        return items

    async def trickle(b, n, gap):
        tasks = []
        for i in range(n):
            tasks.append(asyncio.create_task(b.submit(i)))
            await asyncio.sleep(gap)
        return await asyncio.gather(*tasks)

    async def main(busy_wait_ms):
        b = MicroBatcher(process, BatchConfig(max_batch=64, max_wait_ms=5,
                                              busy_wait_ms=busy_wait_ms))
        t0 = time.perf_counter()
        first = asyncio.create_task(b.submit("lone"))
        await asyncio.sleep(0.02)  # the lone one is in flight by now
        assert calls == [1] and time.perf_counter() - t0 < 0.1
        await trickle(b, 8, 0.006)  # one every 6 ms: longer than max_wait
        await first
        await b.close()

    calls.clear()
    run(main(80))
    assert calls == [1, 8]
    calls.clear()
    run(main(0))  # without the busy wait the trickle splits into several batches
    assert len(calls) >= 3 and sum(calls) == 9


def test_busy_wait_validated():
    with pytest.raises(Exception, match="busy_wait_ms"):
        BatchConfig(busy_wait_ms=-1)


def test_busy_wait_never_shorter_than_max_wait():
    calls: list[int] = []

    async def process(items):
        calls.append(len(items))
        await asyncio.sleep(0.3)
        return items

    async def main():
        b = MicroBatcher(process, BatchConfig(max_batch=64, max_wait_ms=40, busy_wait_ms=0))
        first = asyncio.create_task(b.submit("lone"))
        await asyncio.sleep(0.06)
        a = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0.01)
        await asyncio.gather(b.submit(2), a, first)
        await b.close()

    run(main())
    assert calls == [1, 2]
