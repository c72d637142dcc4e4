"""Shards as worker-local futures: they stay put, survive worker death, and re-spread."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from distributed import Client

from dask_rag import DistributedIndex, IndexSpec
from dask_rag.cluster import start_local_cluster
from dask_rag.datasets import clustered_vectors, exact_search
from dask_rag.index.merge import merge_results


def _transferred_keys(client):
    logs = client.run(lambda dask_worker: [
        list(entry.get("keys", {})) for entry in
        list(dask_worker.transfer_incoming_log) + list(dask_worker.transfer_outgoing_log)])
    return [str(k) for entries in logs.values() for keys in entries for k in keys]


def test_no_shard_moves_over_100_search_batches(client):
    x = clustered_vectors(20_064, 64, seed=3)
    xb, xq = x[:20_000], x[20_000:]
    spec = IndexSpec(factory="IVF64,Flat", n_shards=4, nprobe=8)
    with DistributedIndex.build(client, xb, spec=spec) as index:
        before = index.shard_locations()
        assert all(len(w) == 1 for w in before.values())
        # shards are spread over both workers
        assert len({w[0] for w in before.values()}) == 2
        shard_keys = {str(f.key) for f in index.shard_futures}
        already = set(_transferred_keys(client))
        rng = np.random.default_rng(0)
        first = None
        for i in range(100):
            q = xq[rng.integers(0, len(xq), size=16)] if i else xq
            _, I = index.search(q, k=10)
            if first is None:
                first = I
        moved = [k for k in _transferred_keys(client) if k not in already]
        assert not [k for k in moved if k in shard_keys], "a shard was copied between workers"
        assert index.shard_locations() == before
        # search results did travel (small): the log is live, not empty by accident
        assert any("dask-rag-search" in k for k in moved)
        np.testing.assert_array_equal(index.search(xq, k=10)[1], first)


def test_sizeof_reports_real_shard_size(client):
    x = clustered_vectors(10_000, 64, seed=1)
    with DistributedIndex.build(client, x, spec=IndexSpec(n_shards=2)):
        sizes = client.run(lambda dask_worker: {
            str(k): dask_worker.state.tasks[k].nbytes for k in dask_worker.data
            if "dask-rag-shard" in str(k)})
        total = sum(v for d in sizes.values() for v in d.values())
        assert total >= x.nbytes  # 10k x 64 float32 = 2.56 MB of vectors


def _times_computed(client, key) -> int:
    """How often ``key`` reached memory by a finished task (the scheduler's own record)."""
    def story(dask_scheduler, key=key):
        return sum(1 for t in dask_scheduler.story(key)
                   if t[2] == "memory" and str(t[-2]).startswith("task-finished"))

    return int(client.run_on_scheduler(story))


@pytest.mark.slow
def test_worker_killed_during_searches_shards_reload_from_disk(tmp_path):
    """A worker dies inside a shard's search task while five batches are in flight (the fault
    point reports it); every batch still returns the exact answer, and the scheduler's record
    shows the dead worker's shards computed again — loaded from disk — on the survivor."""
    from dask_rag.faults import ArmFaults, read_report

    x = clustered_vectors(30_064, 48, seed=5)
    xb, xq = x[:30_000], x[30_000:]
    report = tmp_path / "faults.log"
    with start_local_cluster(2, dashboard_address=None, memory_limit="4GiB") as cluster, \
            Client(cluster) as client:
        # not elastic: this test counts recomputations and calls rebalance() itself (the
        # membership-driven rebalance is tested in test_multihost)
        index = DistributedIndex.build(client, xb, spec=IndexSpec(factory="Flat", n_shards=4),
                                       path=tmp_path / "idx", elastic=False)
        expected = exact_search(xb, xq, 10)[1]
        np.testing.assert_array_equal(index.search(xq, k=10)[1], expected)
        before = index.shard_locations()
        pids = client.run(os.getpid)
        client.register_plugin(ArmFaults({"search.shard": "kill@2"}, report=str(report)))
        batches = [index.submit_search(index.query(10), xq) for _ in range(5)]
        for parts in batches:  # submitted before, during and after the kill
            merged = merge_results(len(xq), 10, index.metric, client.gather(parts))
            np.testing.assert_array_equal(merged.I, expected)
        client.register_plugin(ArmFaults({}))
        killed = [(pid, n) for point, pid, n, action in read_report(report)
                  if point == "search.shard" and action == "kill"]
        assert len(killed) == 1
        victim = next(w for w, pid in pids.items() if pid == killed[0][0])
        assert sum(r[0] == "search.shard" for r in read_report(report)) >= 2  # in flight
        lost = [s for s, where in before.items() if where == [victim]]
        assert lost
        now = index.shard_locations()
        for s in lost:  # computed a second time — loaded from disk — on the survivor
            assert _times_computed(client, index.shard_futures[s].key) == 2
            assert now[s] and now[s][0] != victim
        assert all(_times_computed(client, index.shard_futures[s].key) == 1
                   for s in before if s not in lost)
        for _ in range(5):
            np.testing.assert_array_equal(index.search(xq, k=10)[1], expected)
        # the nanny restarts the worker: shards are spread again, results unchanged
        client.wait_for_workers(2, timeout=60)
        moved = index.rebalance()
        assert moved == 2
        spread = index.shard_locations()
        assert len({w[0] for w in spread.values()}) == 2
        np.testing.assert_array_equal(index.search(xq, k=10)[1], expected)
        index.close()


@pytest.mark.parametrize("client_merge", [False, True])
def test_fanout_overhead_probe_runs_its_graphs(client, client_merge):
    """The benchmark's empty fan-out probe: one map of pinned no-ops (+ a merge task or a
    direct gather) per iteration, and it releases what it pinned."""
    from benchmarks.common import measure_fanout_overhead

    before = len(client.who_has())
    stats = measure_fanout_overhead(client, n_parts=3, iterations=5, warmup=1,
                                    client_merge=client_merge)
    assert stats.n == 5 and 0 < stats.p50_ms <= stats.p99_ms
    deadline = time.monotonic() + 10
    while len(client.who_has()) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(client.who_has()) == before


def test_local_cluster_with_the_scheduler_in_its_own_process():
    """`dask-rag serve`'s topology: scheduler and workers are subprocesses; the workers still get
    the malloc settings and a sharded search is still exact."""
    from dask_rag.cluster import WORKER_MALLOC_ENV

    with start_local_cluster(2, dashboard_address=None, scheduler_process=True) as cluster, \
            Client(cluster) as c:
        assert len(c.nthreads()) == 2 and set(c.nthreads().values()) == {1}
        assert c.run_on_scheduler(os.getpid) != os.getpid()
        envs = c.run(lambda: os.environ.get("MALLOC_MMAP_THRESHOLD_"))
        assert set(envs.values()) == {str(WORKER_MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"])}
        xb = clustered_vectors(3000, 32, n_clusters=20, seed=3)
        xq = xb[:50] + 0.01
        index = DistributedIndex.build(c, xb, spec=IndexSpec(factory="Flat", n_shards=2,
                                                              metric="l2"))
        try:
            _, I = index.search(xq, 5)
            np.testing.assert_array_equal(I, exact_search(xb, xq, 5, metric="l2")[1])
        finally:
            index.close()
