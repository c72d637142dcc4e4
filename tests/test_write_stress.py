"""No acknowledged write is lost: writes interleaved with worker kills at every phase that
matters, driven by fault points (deterministic: each phase waits for its fault to be reported
before it acts), checked after each phase on the live index — ``fetch``, search, and *every
copy* of every shard the scheduler holds — and at the end on a fresh load from storage.

Phases (each a kill or a block at a named fault point, then writes, then the check):

* ``copied``: the scheduler holds a shard under one key on two workers (a dependent task was
  placed on a worker that did not hold it); writes land on one copy — then the up-to-date
  holder is killed.  This is the loss the reliability benchmark saw.
* ``wal_appended``: a write blocked just after its log append while a worker holding a target
  shard is killed.
* ``apply``: a worker dies inside a write's apply task.
* ``reload``: a shard reload blocked between reading the manifest and replaying the log while
  a write is acknowledged.
* ``save_during_reload``: as ``reload``, and a save compacts the log meanwhile (the reload
  finds its log entries deleted).
* ``auto_rebalance``: the membership-driven rebalance blocked after loading new replicas
  while writes go on (and are acknowledged: no write lock across the reload).
* ``manual_rebalance``: the same for ``rebalance()`` called by hand after a worker joins,
  then the worker is retired (its shards handed over by Dask's retirement).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
from distributed import Client

from dask_rag import DistributedIndex, IndexSpec
from dask_rag.cluster import start_local_cluster
from dask_rag.faults import FAULTS_ENV, RELEASE_ENV, REPORT_ENV, ArmFaults, read_report
from dask_rag.index.tasks import fetch_task

pytestmark = pytest.mark.slow

DIM = 16
N_WORKERS = 3


class Writer:
    """Acknowledged writes and what they wrote."""

    def __init__(self, index: DistributedIndex, start: int) -> None:
        self.index = index
        self.next_id = start
        self.rng = np.random.default_rng(start)
        self.vectors: dict[int, np.ndarray] = {}
        self.failed: list[str] = []

    def write(self, n: int = 4) -> bool:
        ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
        self.next_id += n
        vecs = self.rng.standard_normal((n, DIM)).astype(np.float32)
        try:
            self.index.add(vecs, ids, [{"text": f"chunk {i}", "source": "stress"} for i in ids])
        except Exception as exc:  # unacknowledged: it may or may not be there, never checked
            self.failed.append(f"{type(exc).__name__}: {exc}")
            return False
        self.vectors.update(zip(ids.tolist(), vecs, strict=True))
        return True

    def write_in_thread(self, n: int = 4) -> threading.Thread:
        t = threading.Thread(target=self.write, args=(n,), daemon=True)
        t.start()
        return t


def check_acknowledged(client: Client, index: DistributedIndex, writer: Writer,
                       phase: str) -> None:
    """Every acknowledged id: fetched, found by search (itself is its nearest neighbour, L2),
    and present in every in-memory copy of its shard — each copy the scheduler holds asked
    directly, at the index's read token, as any task placed there would."""
    ids = np.array(sorted(writer.vectors), dtype=np.int64)
    assert len(ids), phase
    records = index.fetch(ids)
    missing = [int(i) for i, r in zip(ids, records, strict=True) if r is None]
    assert not missing, f"{phase}: fetch lost acknowledged ids {missing[:8]}"
    assert all(r["text"] == f"chunk {i}" for i, r in zip(ids, records, strict=True)), phase
    _, found = index.search(np.stack([writer.vectors[int(i)] for i in ids]), k=1)
    assert np.array_equal(found[:, 0], ids), \
        f"{phase}: search lost acknowledged ids {ids[found[:, 0] != ids][:8].tolist()}"
    reps = index.replica_futures()
    who = client.who_has([f for r in reps for f in r])
    held: set[int] = set()
    for s, shard_reps in enumerate(reps):
        copies: dict[str, frozenset[int]] = {}
        for f in shard_reps:
            for worker in who.get(f.key, ()):
                recs = client.submit(fetch_task, f, ids, index.acked_seq, workers=[worker],
                                     allow_other_workers=False, pure=False).result(timeout=60)
                copies[f"{f.key}@{worker}"] = frozenset(
                    int(i) for i, r in zip(ids, recs, strict=True) if r is not None)
        assert copies, f"{phase}: shard {s} has no copy in memory"
        assert len(set(copies.values())) == 1, \
            f"{phase}: copies of shard {s} differ: { {k: len(v) for k, v in copies.items()} }"
        held |= next(iter(copies.values()))
    assert held == set(ids.tolist()), f"{phase}: no copy holds {sorted(set(ids) - held)[:8]}"


def wait_for(cond: Any, what: str, limit_s: float = 90.0) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def reported(report: Path, point: str, action: str) -> bool:
    return any(p == point and a == action for p, _, _, a in read_report(report))


def kill(client: Client, worker: str) -> None:
    """SIGKILL ``worker`` and wait until its nanny's replacement has joined."""
    pid = client.run(os.getpid, workers=[worker])[worker]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: worker not in client.scheduler_info(n_workers=-1)["workers"],
             f"{worker} to leave")
    client.wait_for_workers(N_WORKERS, timeout=90)


def holder(index: DistributedIndex, shard: int = 0) -> str:
    return index.shard_locations()[shard][0]


class Faults:
    """Arm fault points in this process (client-side points) or on the workers, with a fresh
    report and release file per phase."""

    def __init__(self, client: Client, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.client, self.tmp, self.mp = client, tmp, monkeypatch
        self.n = 0

    def arm(self, faults: dict[str, str], here: bool = False) -> tuple[Path, Path]:
        self.n += 1
        report, release = self.tmp / f"faults{self.n}.log", self.tmp / f"release{self.n}"
        if here:
            self.mp.setenv(FAULTS_ENV, ",".join(f"{k}={v}" for k, v in faults.items()))
            self.mp.setenv(REPORT_ENV, str(report))
            self.mp.setenv(RELEASE_ENV, str(release))
        else:
            self.client.register_plugin(ArmFaults(faults, str(report), str(release)))
        return report, release

    def disarm(self) -> None:
        self.mp.delenv(FAULTS_ENV, raising=False)
        self.client.register_plugin(ArmFaults({}))


@pytest.mark.parametrize("replicas", [1, 2])
def test_no_acknowledged_write_is_lost_across_kills(tmp_path, monkeypatch, replicas):
    rng = np.random.default_rng(replicas)
    xb = rng.standard_normal((600, DIM)).astype(np.float32)
    spec = IndexSpec(factory="Flat", n_shards=4, sharding="hash", replicas=replicas,
                     metric="l2")
    # two threads a worker: a reload held at a fault point occupies one of them (a real reload
    # occupies it for its duration too); the other serves the worker's other shards
    # no active memory manager: its ReduceReplicas policy drops the copy the "copied" step
    # makes within ~2 s (a CI run lost it between the task's result and the check), and a
    # copy that stays is the harder case for writes
    with dask.config.set({"distributed.scheduler.active-memory-manager.start": False}), \
            start_local_cluster(N_WORKERS, 2, dashboard_address=None, memory_limit="2GiB"
                                ) as cluster, Client(cluster) as client:
        index = DistributedIndex.build(client, xb, spec=spec, path=tmp_path / "idx",
                                       records=[{"text": f"base {i}"} for i in range(len(xb))])
        writer = Writer(index, 10_000)
        faults = Faults(client, tmp_path, monkeypatch)
        for _ in range(3):
            assert writer.write()
        check_acknowledged(client, index, writer, "before any fault")

        # copied: a dependent task placed on a worker without the shard copies it there
        f = index.replica_futures()[0][0]
        first = holder(index)
        other = next(w for w in client.scheduler_info()["workers"] if w != first)
        client.submit(lambda shard: shard.ntotal, f, workers=[other],
                      allow_other_workers=False, pure=False).result()
        assert sorted(client.who_has([f])[f.key]) == sorted([first, other])
        for _ in range(4):
            assert writer.write()
        check_acknowledged(client, index, writer, "copied")
        kill(client, first)
        check_acknowledged(client, index, writer, "copied, first holder killed")

        # wal_appended: the write is in the log, a target shard's holder dies, it goes on
        report, release = faults.arm({"wal.appended": "block"}, here=True)
        t = writer.write_in_thread()
        wait_for(lambda: reported(report, "wal.appended", "block"), "the write to block")
        kill(client, holder(index, 0))
        release.touch()
        t.join(120)
        assert not t.is_alive()
        faults.disarm()
        check_acknowledged(client, index, writer, "wal_appended")

        # apply: a worker dies inside an apply task
        pids = {pid: w for w, pid in client.run(os.getpid).items()}
        report, _ = faults.arm({"apply.shard": "kill@1"})
        writer.write()
        victim = next(pids[pid] for p, pid, _, a in read_report(report)
                      if p == "apply.shard" and a == "kill")
        wait_for(lambda: victim not in client.scheduler_info(n_workers=-1)["workers"],
                 "the killed worker to leave")
        client.wait_for_workers(N_WORKERS, timeout=90)
        faults.disarm()
        writer.write()
        check_acknowledged(client, index, writer, "apply")

        # reload: a reloading shard holds between manifest and log while writes are acknowledged
        if replicas > 1:  # the phase needs a live copy: the kills above may have left both
            # copies of a shard on one worker (the scheduler recomputes lost replicas anywhere)
            # until the automatic rebalance, a second after the last join, spreads them again
            wait_for(lambda: all(len(ws) >= replicas for ws in index.shard_locations().values()),
                     "the automatic rebalance to spread the replicas")
        report, release = faults.arm({"shard.load": "block"})
        kill(client, holder(index, 1))
        wait_for(lambda: reported(report, "shard.load", "block"), "a reload to block")
        threads = [writer.write_in_thread()]
        if replicas > 1:  # a live replica answers the write's reads: it is acknowledged now
            threads[0].join(60)
            assert not threads[0].is_alive()
            threads.append(writer.write_in_thread())
            threads[1].join(60)
        release.touch()
        for t in threads:
            t.join(120)
        faults.disarm()
        check_acknowledged(client, index, writer, "reload")

        if replicas > 1:
            # save_during_reload: the save folds (and deletes) log entries the reload lacks
            report, release = faults.arm({"shard.load": "block"})
            kill(client, holder(index, 2))
            wait_for(lambda: reported(report, "shard.load", "block"), "a reload to block")
            assert writer.write()
            index.save()
            assert writer.write()
            release.touch()
            faults.disarm()
            check_acknowledged(client, index, writer, "save_during_reload")

        # auto_rebalance: the membership-driven rebalance holds after loading; writes go on
        report, release = faults.arm({"rebalance.loaded": "block"}, here=True)
        rebalances = len(index.rebalance_log)
        kill(client, holder(index, 3))
        wait_for(lambda: reported(report, "rebalance.loaded", "block"),
                 "the automatic rebalance to block")
        t = writer.write_in_thread()
        t.join(60)
        assert not t.is_alive(), "a write waited for the rebalance"
        assert writer.write()
        release.touch()
        wait_for(lambda: len(index.rebalance_log) > rebalances, "the rebalance to finish")
        faults.disarm()
        check_acknowledged(client, index, writer, "auto_rebalance")

        # manual_rebalance: a worker joins; rebalance() by hand holds after loading
        index.set_elastic(False)
        before = set(client.scheduler_info(n_workers=-1)["workers"])
        cluster.scale(N_WORKERS + 1)
        client.wait_for_workers(N_WORKERS + 1, timeout=90)
        report, release = faults.arm({"rebalance.loaded": "block"}, here=True)
        moved: list[int] = []
        rb = threading.Thread(target=lambda: moved.append(index.rebalance()), daemon=True)
        rb.start()
        wait_for(lambda: reported(report, "rebalance.loaded", "block"), "rebalance() to block")
        assert writer.write()
        assert writer.write()
        release.touch()
        rb.join(120)
        assert moved and moved[0] > 0
        faults.disarm()
        check_acknowledged(client, index, writer, "manual_rebalance")
        # and Dask's own retirement hands the new worker's shards over
        (newest,) = set(client.scheduler_info(n_workers=-1)["workers"]) - before
        client.retire_workers([newest])
        assert writer.write()
        check_acknowledged(client, index, writer, "retired")

        # only the write whose apply task was killed may fail (unacknowledged)
        assert len(writer.failed) <= 1, writer.failed
        index.close()
        # a fresh load from storage holds every acknowledged write too
        fresh = DistributedIndex.load(client, tmp_path / "idx", elastic=False)
        check_acknowledged(client, fresh, writer, "fresh load")
        fresh.close()
