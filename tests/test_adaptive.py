"""Adaptive scaling on the serving shim's queue depth: a load ramp through real HTTP scales a
LocalCluster from 1 worker up to MAX and back to 1, with no failed and no wrong answer, and
the leaving workers' shards handed over before they retire."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from distributed import Client

from dask_rag.cluster import start_local_cluster
from dask_rag.cluster.adaptive import QueueAdaptive, adapt_to_queue, parse_adaptive
from dask_rag.config import RagConfig, ServeConfig
from dask_rag.errors import InvalidInput
from dask_rag.pipeline import RagPipeline
from dask_rag.serve import ServerThread, create_app

QUESTIONS = ["How do I parse JSON?", "How do I sort a list?", "read a CSV file",
             "run a subprocess", "compute a hash of a file", "create a temporary file"]


@pytest.mark.parametrize("text, bounds", [("1:4", (1, 4)), ("2", (2, 2)), ("3:3", (3, 3))])
def test_parse_adaptive(text, bounds):
    assert parse_adaptive(text) == bounds


@pytest.mark.parametrize("text", ["", "a:b", "0:2", "3:1", "1:x"])
def test_parse_adaptive_refuses_bad_bounds(text):
    with pytest.raises(InvalidInput, match="adaptive"):
        parse_adaptive(text)


@pytest.mark.slow
def test_load_ramp_scales_1_to_max_and_back_with_no_failed_or_wrong_answer(demo_index):
    maximum = 3
    with start_local_cluster(1, dashboard_address=None, memory_limit="3GiB") as cluster, \
            Client(cluster) as client:
        pipe = RagPipeline.from_index_dir(client, demo_index, RagConfig(k=3))
        pipe.warmup()
        reference = {q: [h.id for h in pipe.search(q)] for q in QUESTIONS}
        app = create_app(pipe, ServeConfig(port=0, max_inflight=1024))
        handed_over: list[list[str]] = []

        def hand_over(workers: list[str]) -> None:
            handed_over.append(list(workers))
            pipe.index.rebalance(exclude=workers)

        guard = app.state.guard
        adaptive = adapt_to_queue(cluster, lambda: guard.inflight, 1, maximum, per_worker=2,
                                  before_retire=hand_over, interval="300ms", wait_count=4)
        assert isinstance(adaptive, QueueAdaptive)
        n_workers = lambda: len(client.scheduler_info(n_workers=-1)["workers"])  # noqa: E731
        seen: list[int] = []
        outcomes: list[str] = []
        server = ServerThread(app).start()
        try:
            async def clients(n: int, until) -> None:
                async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
                    async def one(i: int) -> None:
                        j = i
                        while not until():
                            q = QUESTIONS[j % len(QUESTIONS)]
                            j += 1
                            try:
                                r = await http.post("/v1/search", json={"query": q, "k": 3})
                            except httpx.HTTPError as exc:
                                outcomes.append(f"failed: {type(exc).__name__}")
                                continue
                            if r.status_code != 200:
                                outcomes.append(f"failed: {r.status_code}")
                            elif [h["id"] for h in r.json()["hits"]] != reference[q]:
                                outcomes.append("wrong")
                            else:
                                outcomes.append("ok")
                            seen.append(n_workers())

                    await asyncio.gather(*(one(i) for i in range(n)))

            # ramp up: 12 clients until the cluster reached MAX workers (and a while at MAX)
            deadline = time.monotonic() + 180
            at_max: list[float] = []

            def up_done() -> bool:
                if n_workers() >= maximum and not at_max:
                    at_max.append(time.monotonic())
                return bool(at_max and time.monotonic() > at_max[0] + 3) or \
                    time.monotonic() > deadline

            asyncio.run(clients(12, up_done))
            assert max(seen) == maximum, f"never scaled to {maximum}: {sorted(set(seen))}"
            # ramp down: one client until the cluster is back at 1 worker
            deadline = time.monotonic() + 180
            asyncio.run(clients(1, lambda: n_workers() == 1 or time.monotonic() > deadline))
            assert n_workers() == 1
        finally:
            adaptive.stop()
            server.stop()
        assert outcomes.count("ok") == len(outcomes), \
            {o: outcomes.count(o) for o in set(outcomes)}
        # every retirement handed its workers' shards over first; they are all on the survivor
        assert handed_over and sum(len(w) for w in handed_over) == maximum - 1
        (survivor,) = client.scheduler_info(n_workers=-1)["workers"]
        assert all(where == [survivor] for where in pipe.index.shard_locations().values())
        targets = [t for _, _, t, _ in adaptive.history]
        assert max(targets) > maximum and targets[-1] == 1  # the signal drove it both ways
        pipe.close()
