"""Replicas serve searches: the least-loaded live replica answers, and a search whose replica
dies mid-flight is re-issued on a live one instead of waiting for the reload.  Both proven by
events (fault-point reports, the scheduler's task graph), never by timing."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from distributed import Client

from dask_rag import DistributedIndex, IndexSpec
from dask_rag.cluster import start_local_cluster
from dask_rag.datasets import exact_search
from dask_rag.faults import ArmFaults, read_report


def _wait_for(cond, what: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _blocked(report) -> list[tuple[str, int, int, str]]:
    return [r for r in read_report(report) if r[3] == "block"]


def _replica_of(client: Client, part) -> str:
    """The replica key a search part's task depends on (its shard future), from the
    scheduler's graph."""
    key = part.key

    def deps(dask_scheduler, key=key):
        return [str(d.key) for d in dask_scheduler.tasks[key].dependencies]

    (dep,) = [d for d in client.run_on_scheduler(deps) if "dask-rag-shard" in d]
    return dep


def test_search_uses_the_least_loaded_live_replica(client, tmp_path):
    """One search holds replica X (blocked in its shard task); every search submitted
    meanwhile goes to the other replica — and returns while X is still held."""
    rng = np.random.default_rng(7)
    xb = rng.standard_normal((500, 16)).astype(np.float32)
    xq = xb[:4]
    spec = IndexSpec(factory="Flat", n_shards=1, replicas=2, metric="l2")
    report, release = tmp_path / "faults.log", tmp_path / "release"
    with DistributedIndex.build(client, xb, spec=spec, path=tmp_path / "idx",
                                elastic=False) as index:
        assert len(index.shard_locations()[0]) == 2  # on two workers
        replicas = {str(f.key) for f in index.replica_futures()[0]}
        client.register_plugin(ArmFaults({"search.shard": "block"}, str(report),
                                         str(release)))
        try:
            held = index.submit_search(index.query(3), xq)
            _wait_for(lambda: _blocked(report), "the first search to block")
            x = _replica_of(client, held[0])
            others = []
            for _ in range(3):
                parts = index.submit_search(index.query(3), xq)
                others.append(client.gather(parts)[0])  # returns while X is held
                assert _replica_of(client, parts[0]) in replicas - {x}
            assert not held[0].done()  # still held: the others did not wait for it
        finally:
            release.touch()
            client.register_plugin(ArmFaults({}))
        first = client.gather(held)[0]
        expected = exact_search(xb, xq, 3, metric="l2")[1]
        for res in [first, *others]:
            np.testing.assert_array_equal(res.I, expected)


@pytest.mark.slow
def test_search_in_flight_fails_over_when_its_replica_dies(tmp_path):
    """A search is inside its shard task on worker A when A is SIGKILLed; the reload of A's
    replica is held at a fault point the whole time — and the search still returns, right,
    from the replica on B (re-issued on the loss, not waiting for the reload)."""
    rng = np.random.default_rng(8)
    xb = rng.standard_normal((800, 16)).astype(np.float32)
    xq = xb[10:14]
    report, release = tmp_path / "faults.log", tmp_path / "release"
    # two threads a worker: B's held reload occupies one, the re-issued search takes the other
    with start_local_cluster(2, 2, dashboard_address=None, memory_limit="2GiB") as cluster, \
            Client(cluster) as client:
        spec = IndexSpec(factory="Flat", n_shards=1, replicas=2, metric="l2")
        index = DistributedIndex.build(client, xb, spec=spec, path=tmp_path / "idx")
        expected = exact_search(xb, xq, 5, metric="l2")[1]
        np.testing.assert_array_equal(index.search(xq, 5)[1], expected)
        pids = {pid: w for w, pid in client.run(os.getpid).items()}
        client.register_plugin(ArmFaults({"search.shard": "block", "shard.load": "block"},
                                         str(report), str(release)))
        out: list = []
        searcher = threading.Thread(target=lambda: out.append(index.search(xq, 5)),
                                    daemon=True)
        try:
            searcher.start()
            _wait_for(lambda: _blocked(report), "the search to block in its shard task")
            (_, pid, _, _), = _blocked(report)
            os.kill(pid, signal.SIGKILL)
            _wait_for(lambda: any(r[0] == "shard.load" for r in _blocked(report)),
                      f"{pids[pid]}'s replica to be reloaded (and held)")
            searcher.join(60)
            assert not searcher.is_alive(), "the search waited for the reload"
            assert not release.exists()  # the reload is still held: B's replica answered
        finally:
            release.touch()
            client.register_plugin(ArmFaults({}))
        np.testing.assert_array_equal(out[0][1], expected)
        index.close()
