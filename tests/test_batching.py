"""MicroBatcher: batch sizes, flush on time, failure isolation, back-pressure, cancellation.

Time is the behaviour here (``max_wait_ms``, ``busy_wait_ms``), so it comes from an injected
:class:`ManualClock` that only the test moves; everything else is ordered by events.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from dask_rag.batching import ManualClock, MicroBatcher
from dask_rag.config import BatchConfig
from dask_rag.errors import Overloaded


def run(coro):
    return asyncio.run(coro)


async def settle() -> None:
    """Let every task that can run, run (no time passes on the injected clock)."""
    for _ in range(50):
        await asyncio.sleep(0)


async def drive(clock: ManualClock, aw, step_s: float = 0.001):
    """Await ``aw`` while moving the clock forward a step at a time (for a batcher under
    load, whose last partial batch goes by its timer)."""
    task = asyncio.ensure_future(aw)
    while not task.done():
        await settle()
        clock.advance(step_s)
    return task.result()


def test_1000_concurrent_requests_use_few_calls():
    calls: list[int] = []

    async def process(items):
        calls.append(len(items))
        await asyncio.sleep(0)
        return [x * 2 for x in items]

    async def main():
        clock = ManualClock()
        b = MicroBatcher(process, BatchConfig(max_batch=128, max_wait_ms=5), clock=clock)
        out = await drive(clock, asyncio.gather(*(b.submit(i) for i in range(1000))))
        await b.close()
        return out

    out = run(main())
    assert out == [i * 2 for i in range(1000)]
    assert len(calls) <= math.ceil(1000 / 128) + 2
    assert max(calls) <= 128 and sum(calls) == 1000


def test_lone_request_goes_exactly_at_max_wait():
    calls: list[list[str]] = []

    async def process(items):
        calls.append(list(items))
        return items

    async def main():
        clock = ManualClock()
        b = MicroBatcher(process, BatchConfig(max_batch=64, max_wait_ms=30), clock=clock)
        lone = asyncio.ensure_future(b.submit("x"))
        await settle()
        clock.advance(0.029)
        await settle()
        assert calls == [] and not lone.done()  # 29 ms: still waiting for company
        clock.advance(0.001)
        await settle()
        assert calls == [["x"]] and lone.result() == "x"  # flushed by the timer at 30 ms
        await b.close()

    run(main())


def test_idle_batcher_with_no_max_wait_flushes_at_once():
    calls: list[list[int]] = []

    async def process(items):
        calls.append(list(items))
        return items

    async def main():
        b = MicroBatcher(process, BatchConfig(max_batch=64, max_wait_ms=0), clock=ManualClock())
        assert await b.submit(1) == 1  # no time passes on the clock: it cannot wait for any
        await b.close()

    run(main())
    assert calls == [[1]]


def test_full_batch_flushes_without_waiting():
    calls: list[int] = []

    async def process(items):
        calls.append(len(items))
        return items

    async def main():
        b = MicroBatcher(process, BatchConfig(max_batch=8, max_wait_ms=10_000),
                         clock=ManualClock())
        out = await asyncio.gather(*(b.submit(i) for i in range(8)))  # the clock never moves
        await b.close()
        return out

    assert run(main()) == list(range(8)) and calls == [8]


def test_exception_fails_only_its_batch():
    async def process(items):
        if "bad" in items:
            raise ValueError("boom")
        return [i.upper() for i in items]

    async def main():
        b = MicroBatcher(process, BatchConfig(max_batch=2, max_wait_ms=1), clock=ManualClock())
        first = await asyncio.gather(b.submit("bad"), b.submit("x"), return_exceptions=True)
        second = await asyncio.gather(b.submit("a"), b.submit("b"))
        await b.close()
        return first, second, b.stats

    first, second, stats = run(main())
    assert all(isinstance(r, ValueError) for r in first)
    assert second == ["A", "B"]
    assert stats.failed_batches == 1


def test_full_queue_raises_overloaded():
    async def main():
        gate, started = asyncio.Event(), asyncio.Event()

        async def process(items):
            started.set()
            await gate.wait()
            return items

        b = MicroBatcher(process, BatchConfig(max_batch=1, max_wait_ms=0, max_queue=5,
                                              max_concurrent_batches=1), clock=ManualClock())
        waiting = [asyncio.ensure_future(b.submit(0))]
        await started.wait()  # item 0 is in flight, blocked on the gate
        waiting += [asyncio.ensure_future(b.submit(i)) for i in range(1, 6)]
        await settle()  # five queued behind it: the queue is full
        with pytest.raises(Overloaded) as info:
            await b.submit(99)
        assert info.value.retry_after >= 1.0
        gate.set()
        results = await asyncio.gather(*waiting)
        await b.close()
        return results, b.stats.rejected

    results, rejected = run(main())
    assert results == list(range(6)) and rejected == 1


def test_cancelled_caller_is_dropped():
    seen: list[list[int]] = []

    async def main():
        gate, started = asyncio.Event(), asyncio.Event()

        async def process(items):
            seen.append(list(items))
            started.set()
            await gate.wait()
            return items

        b = MicroBatcher(process, BatchConfig(max_batch=10, max_wait_ms=0, busy_wait_ms=0,
                                              max_concurrent_batches=1), clock=ManualClock())
        first = asyncio.ensure_future(b.submit(0))
        await started.wait()  # batch [0] in flight, the next ones queue behind it
        doomed = asyncio.ensure_future(b.submit(1))
        kept = asyncio.ensure_future(b.submit(2))
        await settle()
        doomed.cancel()
        gate.set()
        await first
        assert await kept == 2
        await b.close()

    run(main())
    assert seen == [[0], [2]]


def test_close_drains_queued_work():
    async def process(items):
        await asyncio.sleep(0)
        return items

    async def main():
        b = MicroBatcher(process, BatchConfig(max_batch=4, max_wait_ms=50), clock=ManualClock())
        futs = [asyncio.ensure_future(b.submit(i)) for i in range(10)]
        await settle()
        await b.close()  # the clock never reaches 50 ms: close itself flushes what is queued
        with pytest.raises(Overloaded):
            await b.submit(1)
        return [f.result() for f in futs]

    assert run(main()) == list(range(10))


async def _trickle(clock, b, n, gap_s):
    """``n`` requests, ``gap_s`` apart on the clock."""
    tasks = []
    for i in range(n):
        tasks.append(asyncio.ensure_future(b.submit(i)))
        await settle()
        clock.advance(gap_s)
        await settle()
    return tasks


def test_busy_wait_fills_batches_while_one_is_in_flight():
    """Requests trickling in while a batch computes form one batch (not one per max_wait),
    and a lone request on an idle batcher goes after exactly max_wait."""

    async def main(busy_wait_ms):
        calls: list[int] = []
        gate = asyncio.Event()

        async def process(items):
            calls.append(len(items))
            if len(calls) == 1:
                await gate.wait()  # the first batch stays in flight while the others arrive
            return items

        clock = ManualClock()
        b = MicroBatcher(process, BatchConfig(max_batch=64, max_wait_ms=5,
                                              busy_wait_ms=busy_wait_ms), clock=clock)
        first = asyncio.ensure_future(b.submit("lone"))
        await settle()
        clock.advance(0.005)
        await settle()
        assert calls == [1]  # the lone one went at max_wait
        tasks = await _trickle(clock, b, 8, 0.006)  # one every 6 ms: longer than max_wait
        gate.set()
        clock.advance(0.1)
        await settle()
        await asyncio.gather(first, *tasks)
        await b.close()
        return calls

    assert run(main(80)) == [1, 8]
    calls = run(main(0))  # without the busy wait the trickle splits into several batches
    assert len(calls) >= 3 and sum(calls) == 9


def test_busy_wait_validated():
    with pytest.raises(Exception, match="busy_wait_ms"):
        BatchConfig(busy_wait_ms=-1)


def test_busy_wait_never_shorter_than_max_wait():
    async def main():
        calls: list[int] = []
        gate = asyncio.Event()

        async def process(items):
            calls.append(len(items))
            if len(calls) == 1:
                await gate.wait()
            return items

        clock = ManualClock()
        b = MicroBatcher(process, BatchConfig(max_batch=64, max_wait_ms=40, busy_wait_ms=0),
                         clock=clock)
        first = asyncio.ensure_future(b.submit("lone"))
        await settle()
        clock.advance(0.04)
        await settle()
        assert calls == [1]
        a = asyncio.ensure_future(b.submit(1))
        await settle()
        clock.advance(0.01)
        await settle()
        b2 = asyncio.ensure_future(b.submit(2))
        await settle()
        clock.advance(0.029)  # 39 ms after the first of them: busy_wait 0 < max_wait 40
        await settle()
        assert calls == [1]
        clock.advance(0.001)
        await settle()
        assert calls == [1, 2]
        gate.set()
        await asyncio.gather(first, a, b2)
        await b.close()

    run(main())


def test_callers_of_a_finished_batch_coming_back_form_one_batch():
    """Closed-loop clients: with nothing in flight, the callers the last batch answered are
    awaited (up to busy_wait) instead of the first of them going alone; a lone caller, whose
    batch answered only itself, still goes at once."""

    async def main():
        calls: list[int] = []

        async def process(items):
            calls.append(len(items))
            return items

        clock = ManualClock()
        b = MicroBatcher(process, BatchConfig(max_batch=64, max_wait_ms=0, busy_wait_ms=80),
                         clock=clock)
        assert await asyncio.gather(*(b.submit(i) for i in range(3))) == [0, 1, 2]
        assert calls == [3]
        back = [asyncio.ensure_future(b.submit(10))]
        await settle()
        clock.advance(0.01)
        back.append(asyncio.ensure_future(b.submit(11)))
        await settle()
        assert calls == [3]  # 2 of the 3 answered are back: waiting for the third
        back.append(asyncio.ensure_future(b.submit(12)))
        await settle()
        assert calls == [3, 3]  # the third is back: the wave goes, 10 ms < busy_wait
        assert await asyncio.gather(*back) == [10, 11, 12]
        # only one of the three comes back: it waits busy_wait, not longer
        lone = asyncio.ensure_future(b.submit(20))
        await settle()
        clock.advance(0.079)
        await settle()
        assert calls == [3, 3] and not lone.done()
        clock.advance(0.001)
        await settle()
        assert calls == [3, 3, 1] and await lone == 20
        # a lone client (its batch answered only itself) never waits: no time passes here
        for i in range(3):
            assert await b.submit(30 + i) == 30 + i
        assert calls == [3, 3, 1, 1, 1, 1]
        await b.close()

    run(main())


def test_a_big_returning_wave_goes_as_two_batches():
    """With nothing in flight, a returning wave of >= split_wave_min callers goes as two
    batches: the first half as soon as it is back (it computes while the others return), the
    rest as soon as it is back too — no busy_wait, no clock advance here.  split_wave_min 0:
    one batch per wave, as before."""

    async def main(split):
        calls: list[int] = []
        hold = asyncio.Event()
        hold.set()

        async def process(items):
            calls.append(len(items))
            await hold.wait()
            return items

        b = MicroBatcher(process, BatchConfig(max_batch=64, max_wait_ms=0, busy_wait_ms=80,
                                              split_wave_min=split), clock=ManualClock())
        assert await asyncio.gather(*(b.submit(i) for i in range(32))) == list(range(32))
        hold.clear()  # the second wave's batches stay in flight until every caller is back
        back = []
        for i in range(32):
            back.append(asyncio.ensure_future(b.submit(i)))
            await settle()
        wave = calls[1:]
        hold.set()
        assert await asyncio.wait_for(asyncio.gather(*back), 5) == list(range(32))
        # the wave does not come back (the clients left): one lone caller waits busy_wait
        # once, then callers go at once again, split or not
        lone = asyncio.ensure_future(b.submit("lone"))
        await settle()
        b.clock.advance(0.08)
        await settle()
        assert await lone == "lone"
        for i in range(3):
            assert await asyncio.wait_for(b.submit(i), 5) == i
        await b.close()
        return calls[0], wave

    assert run(main(16)) == (32, [16, 16])
    assert run(main(0)) == (32, [32])
    assert run(main(33)) == (32, [32])  # a smaller wave than split_wave_min is not split


def test_a_wave_that_comes_back_at_once_is_split_too():
    """Callers that return together (an upstream LLM answers a batch's requests at the same
    moment, so they all come back at once) still go as two batches: otherwise such a wave
    stays one wave forever, and the workers idle while it waits for the upstream."""

    async def main():
        calls: list[int] = []

        async def process(items):
            calls.append(len(items))
            return items

        b = MicroBatcher(process, BatchConfig(max_batch=64, max_wait_ms=0, busy_wait_ms=80,
                                              split_wave_min=16), clock=ManualClock())
        assert await asyncio.gather(*(b.submit(i) for i in range(32))) == list(range(32))
        assert await asyncio.gather(*(b.submit(i) for i in range(32))) == list(range(32))
        await b.close()
        return calls

    assert run(main()) == [32, 16, 16]
