"""`ReplicaSet`: where the copies of an index's shards live, and keeping them there.

Each shard replica is a persisted future: the result of a load task that reads the index
location, so the scheduler recomputes it from storage on another worker when its worker dies.
This part of a :class:`~dask_rag.index.distributed.DistributedIndex` owns those futures and
every fact about them: placement (replicas of a shard on different workers and hosts), the
epoch and token that keep two opens of one index from sharing scheduler keys, the one map of
which worker holds which replica, the workers announced gone, which replica a search uses
(the least busy live one), the membership-driven rebalance and the reload after a scheduler
restart.  Searches (:mod:`dask_rag.index.fanout`) and writes (:mod:`dask_rag.index.writes`) ask
it for futures; neither keeps its own view of where shards are.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from distributed import Client, Future, wait

from dask_rag.cluster import current_workers, resource_request
from dask_rag.cluster.futures import release_placement
from dask_rag.cluster.plugins import off_membership_change, on_membership_change, tune_comms
from dask_rag.config import CommConfig
from dask_rag.errors import InvalidInput, ShardUnavailable
from dask_rag.faults import fault_point
from dask_rag.index.routing import plan_placement
from dask_rag.index.shard import ShardRef
from dask_rag.index.tasks import load_router, load_shard

__all__ = ["WRITE_PRIORITY", "ReplicaSet"]

#: writes' tasks go before queued searches: a write holds the write lock while they run
WRITE_PRIORITY = 20

log = logging.getLogger(__name__)


class ReplicaSet:
    """The replica futures of an index's shards (see the module docstring).

    Why ~27 methods in one class: placement, the holder map and the rebalance read and swap
    the same replica futures under one lock; split further, each half would need the other's
    lock.
    """

    #: seconds to wait after a membership change before re-spreading (workers come in bursts)
    REBALANCE_DELAY_S = 1.0

    def __init__(self, client: Client, location: str, index_uuid: str, n_shards: int,
                 replicas: int, with_router: bool, comms: CommConfig | None = None) -> None:
        self.client = client
        self.location = location
        self.index_uuid = index_uuid
        self.n_shards = n_shards
        self.replicas = replicas
        self._with_router = with_router
        #: re-applied after a scheduler restart (a new scheduler has none of the old plugins)
        self.comms = comms
        #: the futures of each shard's replicas: ``_futures[shard][replica]``
        self._futures: list[list[Future]] = []
        #: the coarse quantizer, where routes of batches whose vectors are futures run
        self.router_future: Future | None = None
        #: searches submitted and not finished, per replica key (replica choice: least loaded)
        self._inflight: collections.Counter[Any] = collections.Counter()
        self._turn = itertools.count()
        #: replica key -> the worker holding it (the one map: placement sets it, a rebalance
        #: moves it, a scheduler query refreshes it), and workers announced gone (membership
        #: events): a search avoids a replica on a departed worker at once — the future's own
        #: status does not change while the scheduler reloads it elsewhere
        self._holder: dict[Any, str] = {}
        self._holders_stale = True
        self._down: set[str] = set()
        #: workers lost so far (membership events): a search in flight re-issues when it moves
        self.losses = 0
        self.lock = threading.RLock()
        self._rebalance_lock = threading.RLock()  # re-entered by the automatic one
        self._elastic = False
        self._timer: threading.Timer | None = None
        #: (time, moved) of each automatic rebalance, for tests and the dashboard's story
        self.rebalance_log: list[tuple[float, int]] = []
        self._failures = 0
        #: run with the workers a rebalance loaded replicas onto, before those replicas serve
        #: (a pipeline loads its encoder there: the first searches must not wait for it)
        self.warm_new_workers: Callable[[list[str]], Any] | None = None
        self._epoch = 0
        #: unique per open index: two loads of one directory (or of copies of it, which share
        #: an index uuid) must never share keys on the scheduler
        self.token = uuid.uuid4().hex[:8]
        self.closed = False

    # ---- the futures ------------------------------------------------------------------------

    def check_open(self) -> None:
        if self.closed:
            raise InvalidInput("this DistributedIndex is closed")

    def shard_futures(self) -> list[Future]:
        """One future per shard, for reads that any replica answers (see :meth:`pick`)."""
        with self.lock:
            return [self.pick(s) for s in range(len(self._futures))]

    def replica_futures(self) -> list[list[Future]]:
        """Every replica of every shard (a snapshot: a rebalance may swap futures meanwhile)."""
        with self.lock:
            return [list(reps) for reps in self._futures]

    def pick(self, shard_no: int) -> Future:
        """The replica of ``shard_no`` a search uses: a loaded one (one whose worker died is
        being reloaded elsewhere) with the fewest searches from this index in flight."""
        reps = self._futures[shard_no]
        if len(reps) == 1:
            return reps[0]
        loaded = [f for f in reps if f.status == "finished"]
        live = [f for f in loaded if self._holder.get(f.key) not in self._down] or loaded or reps
        turn = next(self._turn)
        return min(live, key=lambda f: (self._inflight[f.key],
                                        (reps.index(f) + turn) % len(reps)))

    def track(self, replica: Future, part: Future) -> None:
        """Count ``part`` (a search task on ``replica``) in flight until it ends."""
        key = replica.key
        self._inflight[key] += 1

        def done(_: Future) -> None:
            self._inflight[key] -= 1

        part.add_done_callback(done)

    def hedge_trigger(self) -> Callable[[], int] | None:
        """For :func:`~dask_rag.cluster.futures.await_hedged`: the counter of lost workers,
        or None with one replica per shard (a second copy of a search would wait for the same
        reload)."""
        if self.replicas < 2:
            return None
        return lambda: self.losses

    def holders(self, futures: Sequence[Future] | None = None) -> dict[Any, list[str]]:
        """Replica key -> the workers holding it now (sorted; [] while it is being loaded),
        from one scheduler query; for ``futures`` (every replica when not given)."""
        every = list(futures) if futures is not None else \
            [f for r in self.replica_futures() for f in r]
        who = self.client.who_has(every)
        return {f.key: sorted(who.get(f.key, ())) for f in every}

    def where_searchable(self) -> dict[str, list[Any]] | None:
        """Worker -> the keys of the replicas a search there would use (one per shard, see
        :meth:`pick`), or None when one of them has no known live holder (being reloaded):
        the direct search path (:class:`~dask_rag.index.fanout.DirectSearch`) needs this."""
        with self.lock:
            if self._holders_stale:
                self._refresh_holders()
            plan: dict[str, list[Any]] = {}
            for s in range(self.n_shards):
                f = self.pick(s)
                worker = self._holder.get(f.key)
                if worker is None or worker in self._down:
                    self._holders_stale = True
                    return None
                plan.setdefault(worker, []).append(f.key)
            return plan

    def forget_holders(self) -> None:
        """Ask the scheduler again before the next direct search (shards moved or failed)."""
        self._holders_stale = True

    def _refresh_holders(self) -> None:
        """Ask the scheduler where every replica is now (after reloads it placed itself); a
        replica still being reloaded keeps its old (departed) holder: still avoided."""
        self._holder = {**self._holder, **{k: ws[0] for k, ws in self.holders().items()
                                           if ws}}
        self._holders_stale = False

    def locations(self) -> dict[int, list[str]]:
        """Worker address(es) holding each shard (any of its replicas)."""
        self.reattach()
        reps = self.replica_futures()
        holders = self.holders([f for r in reps for f in r])
        return {s: sorted({w for f in r for w in holders[f.key]}) for s, r in enumerate(reps)}

    def on_each_shard(self, task: Callable[..., Any], *args: Any, pin: bool = False) -> list[Any]:
        """``task(shard, *args)`` on one replica of every shard (see :meth:`shard_futures`);
        the results in shard order.  ``pin``: run each where its replica is held, ahead of
        queued searches (a write waits on these).  Left to itself the scheduler may run a
        task next to an idle worker instead (a worker that just joined), which copies the
        shard there — a reload from storage on a cold process, seconds."""
        futs = self.shard_futures()
        where = self.holders(futs) if pin else {}
        return list(self.client.gather([
            self.client.submit(task, f, *args, pure=False,
                               key=(f"dask-rag-fetch-{uuid.uuid4().hex}", s),
                               priority=WRITE_PRIORITY if pin else 0,
                               workers=where.get(f.key) or None,
                               allow_other_workers=bool(where.get(f.key)))
            for s, f in enumerate(futs)]))

    # ---- loading ------------------------------------------------------------------------------

    def _key(self, kind: str, tag: str = "") -> str:
        return f"dask-rag-{kind}-{self.index_uuid[:8]}{self.token}-{self._epoch}{tag}"

    def _load_replica(self, shard_no: int, replica: int, worker: str | None,
                      resources: dict[str, float] | None = None) -> Future:
        """Submit the load of one replica on ``worker`` — there and nowhere else (a loose
        placement lets the scheduler or the work stealer put two replicas of a shard on one
        worker); see :meth:`_settle_loads` for a worker that leaves meanwhile."""
        ref = ShardRef(self.location, shard_no, self.index_uuid)
        key = (self._key("shard", "" if replica == 0 else f"-r{replica}"), shard_no)
        return self.client.submit(load_shard, ref, key=key,
                                  workers=None if worker is None else [worker],
                                  allow_other_workers=False, resources=resources, pure=False)

    def _load_router(self) -> None:
        """Routes of batches whose vectors are futures run where this lives (re-runnable from
        storage, like a shard)."""
        self.router_future = self.client.submit(load_router, self.location, pure=False,
                                                key=self._key("router"))

    def _settle_loads(self, loads: dict[tuple[int, int], Future],
                      targets: dict[tuple[int, int], str], progress: bool = False,
                      replace: bool = True) -> dict[tuple[int, int], Future]:
        """Wait for placed loads.  One whose worker left the cluster meanwhile is submitted
        again anywhere (``replace``) or dropped (a rebalance keeps the old copy); then the
        placements are lifted, so that a replica lost later is recomputed on any worker."""
        loads = dict(loads)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(loads), desc="loading shards", unit="shard")
        while True:
            pending = [f for f in loads.values() if f.status == "pending"]
            if bar is not None:
                bar.update(len(loads) - len(pending) - bar.n)
            if not pending:
                break
            with contextlib.suppress(TimeoutError):
                wait(pending, timeout=2.0)
            live = set(self.client.scheduler_info(n_workers=-1)["workers"])
            for slot, f in list(loads.items()):
                if f.status == "pending" and slot in targets and targets[slot] not in live:
                    f.cancel()
                    del loads[slot]
                    if replace:
                        self._epoch += 1
                        loads[slot] = self._load_replica(*slot, None)
        if bar is not None:
            bar.close()
        for slot, f in list(loads.items()):
            if f.status == "finished":
                continue
            if not replace and f.status != "error":
                del loads[slot]  # its worker died after loading it: a rebalance keeps the old
                continue
            raise f.exception() if f.status == "error" else ShardUnavailable(
                f"shard load {f.key} ended {f.status}")
        release_placement(self.client, list(loads.values()))
        return loads

    def _shard_workers(self) -> list[str]:
        workers = current_workers(self.client)
        if resource_request(self.client, "shard"):
            # only workers declaring a 'shard' resource may hold shards
            info = self.client.scheduler_info(n_workers=-1)["workers"]
            workers = [w for w in workers if "shard" in (info[w].get("resources") or {})]
        return workers

    def _hosts(self) -> dict[str, str]:
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        return {w: str(d.get("host") or w) for w, d in info.items()}

    def start(self, progress: bool = False) -> None:
        """Load every replica, spread over the workers (and the router, for IVF)."""
        workers = self._shard_workers()
        resources = resource_request(self.client, "shard")
        slots: dict[tuple[int, int], str | None] = {
            (s, r): None for s in range(self.n_shards) for r in range(self.replicas)}
        where = plan_placement(slots, workers, self._hosts()) if workers else {}
        loads = self._settle_loads({slot: self._load_replica(*slot, where.get(slot), resources)
                                    for slot in slots}, where, progress)
        self._futures = [[loads[(s, r)] for r in range(self.replicas)]
                         for s in range(self.n_shards)]
        self._holder = {loads[slot].key: w for slot, w in where.items() if w is not None}
        if self._with_router:
            self._load_router()

    def reattach(self) -> None:
        """After a scheduler restart every future is cancelled: load the shards again (from
        the index location) before anything uses them.  A status check per replica."""
        if any(f.status == "cancelled" for reps in self._futures for f in reps):
            self.ensure_loaded()

    def ensure_loaded(self) -> int:
        """Resubmit the load of shard replicas whose futures were lost; returns how many.

        A worker's death is handled by the scheduler itself (it recomputes the shard from
        storage); losing the *scheduler* loses every future.  When the client reconnects to a
        restarted scheduler, this brings the shards back.
        """
        with self.lock:
            lost = [(s, r) for s, reps in enumerate(self._futures) for r, f in enumerate(reps)
                    if f.status in ("cancelled", "lost", "error")]
            if not lost:
                return 0
            if self.comms is not None:
                tune_comms(self.client, self.comms)
            if self._elastic:
                on_membership_change(self.client)
                self._on_membership(None, None)  # then spread the reloaded replicas
            self._epoch += 1
            self.forget_holders()
            for s, r in lost:
                self._futures[s][r] = self._load_replica(s, r, None)
            if self.router_future is not None and self.router_future.status in (
                    "cancelled", "lost", "error"):
                self._load_router()
        return len(lost)

    # ---- rebalance ----------------------------------------------------------------------------

    def set_elastic(self, elastic: bool) -> None:
        """Follow the cluster's membership (rebalance a moment after workers join or leave)
        or stop following it.  After ``set_elastic(False)`` returns no automatic rebalance
        runs."""
        if elastic and not self._elastic:
            self._elastic = True
            on_membership_change(self.client, self._on_membership)
        elif not elastic and self._elastic:
            self._elastic = False
            off_membership_change(self.client, self._on_membership)
            if self._timer is not None:
                self._timer.cancel()
            with self._rebalance_lock:  # an automatic rebalance already running ends first
                pass

    def rebalance(self, exclude: Sequence[str] = ()) -> int:
        """Spread replicas evenly over the current workers, loading on the new worker before
        releasing the old copy; returns how many moved (see
        :meth:`DistributedIndex.rebalance <dask_rag.index.distributed.DistributedIndex.
        rebalance>`)."""
        self.check_open()
        with self._rebalance_lock:
            workers = [] if self.closed else [w for w in self._shard_workers()
                                              if w not in set(exclude)]
            if not workers:
                return 0
            reps = self.replica_futures()
            holders = self.holders([f for r in reps for f in r])
            current: dict[tuple[int, int], str | None] = {
                (s, r): holders[f.key][0] if holders[f.key] else None
                for s, r_futs in enumerate(reps) for r, f in enumerate(r_futs)}
            moves = plan_placement(current, workers, self._hosts())
            if not moves:
                return 0
            self._epoch += 1
            new = self._settle_loads({slot: self._load_replica(*slot, w)
                                      for slot, w in moves.items()}, moves, replace=False)
            receiving = sorted({moves[slot] for slot, f in new.items()
                                if f.status == "finished"})
            if receiving and self.warm_new_workers is not None:
                try:
                    self.warm_new_workers(receiving)
                except Exception as exc:  # serve anyway: a cold worker is slow, not wrong
                    log.warning("warming %s failed: %s", receiving, exc)
            fault_point("rebalance.loaded")
            with self.lock:
                if self.closed:  # closed while this loaded: drop the new copies
                    for f in new.values():
                        f.release()
                    return 0
                for (s, r), f in new.items():
                    if f.status == "finished":
                        self._futures[s][r] = f
                        self._holder[f.key] = moves[(s, r)]
                self.forget_holders()
            return sum(1 for f in new.values() if f.status == "finished")

    def _on_membership(self, action: str | None, worker: str | None) -> None:
        """Runs on the client's event loop: only (re)arm a timer; the work runs in its thread."""
        if self.closed:
            return
        if action == "remove" and worker:
            self._down.add(worker)
            self.losses += 1
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(self.REBALANCE_DELAY_S, self._auto_rebalance)
        self._timer.daemon = True
        self._timer.start()

    def _auto_rebalance(self) -> None:
        if self.closed or self.client.status != "running":
            return
        try:
            with self._rebalance_lock:  # set_elastic(False) waits for this, then none starts
                if not self._elastic:
                    return
                moved = self.rebalance()
            with self.lock:
                self._refresh_holders()
        except Exception as exc:  # the cluster changed under us: try again in a moment
            self._failures += 1
            log.warning("automatic rebalance failed (%d): %s", self._failures, exc)
            if self._failures < 5 and self._elastic:
                self._on_membership(None, None)
            return
        self._failures = 0
        self.rebalance_log.append((time.time(), moved))

    # ---- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop following the cluster and release every future (``closed`` is set first, by
        the index, under its write lock)."""
        self.closed = True
        off_membership_change(self.client, self._on_membership)
        if self._timer is not None:
            self._timer.cancel()
        with self.lock:
            for f in [*(f for reps in self._futures for f in reps), self.router_future]:
                if f is not None:
                    with contextlib.suppress(Exception):
                        f.release()
            self._futures = []
            self.router_future = None
