"""Scale the cluster's workers on the serving shim's queue depth, not on CPU.

Dask's own adaptive target comes from the scheduler's task backlog and CPU occupancy, which a
query service does not show well: a search graph is a few milliseconds of tasks, so the backlog
stays near zero while requests pile up in the HTTP shim's micro-batchers and the latency users
see climbs.  :class:`QueueAdaptive` keeps Dask's adaptive machinery — the periodic check, the
``wait_count`` hysteresis before a scale-down, the cluster's own ``scale`` and retirement — and
replaces only the *target*: ``ceil(load() / per_worker)`` workers, where ``load()`` is the
number of requests in flight at the shim (admitted and not answered: queued in a batcher or
running as a graph).  Scaling down hands shards over first: ``before_retire(addresses)`` (e.g.
:meth:`~dask_rag.index.distributed.DistributedIndex.rebalance` with ``exclude``) loads the
leaving workers' replicas elsewhere before Dask retires them, so no search waits for a reload.

Use ``dask-rag serve --adaptive MIN:MAX`` or, from Python, :func:`adapt_to_queue`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from distributed.deploy.adaptive import Adaptive

from dask_rag.config import DEFAULT_PER_WORKER
from dask_rag.errors import InvalidInput

__all__ = ["DEFAULT_PER_WORKER", "QueueAdaptive", "adapt_to_queue", "parse_adaptive"]



class QueueAdaptive(Adaptive):
    """Dask ``Adaptive`` with its target taken from a queue-depth signal (module docstring).

    ``history`` records ``(time, load, target, workers)`` at every check, for benchmarks and
    the dashboard's story of a ramp."""

    def __init__(self, cluster: Any, load: Callable[[], float], *,
                 per_worker: float = DEFAULT_PER_WORKER,
                 before_retire: Callable[[list[str]], Any] | None = None,
                 **kwargs: Any) -> None:
        if not per_worker > 0:
            raise InvalidInput(f"per_worker={per_worker!r} must be > 0")
        kwargs.setdefault("interval", "1s")
        kwargs.setdefault("wait_count", 5)  # 5 checks in a row below target before retiring
        self.load = load
        self.per_worker = float(per_worker)
        self.before_retire = before_retire
        self.history: list[tuple[float, float, int, int]] = []
        super().__init__(cluster, **kwargs)

    async def target(self) -> int:
        load = float(self.load())
        target = max(1, math.ceil(load / self.per_worker))
        self.history.append((time.time(), load, target, len(self.observed)))
        del self.history[:-10_000]
        return target

    async def scale_down(self, workers: Sequence[str]) -> None:  # type: ignore[override]
        """Hand the leaving workers' shards over, then let Dask retire them (``Adaptive``
        passes worker names here; ``AdaptiveCore`` declares an int)."""
        if workers and self.before_retire is not None:
            names = set(map(str, workers))
            info = self.cluster.scheduler_info.get("workers", {})
            addresses = [a for a, d in info.items()
                         if str(d.get("name")) in names or a in names]
            # the hand-over is synchronous client code: never on this event loop
            await asyncio.get_running_loop().run_in_executor(None, self.before_retire,
                                                             addresses)
        await super().scale_down(workers)


def adapt_to_queue(cluster: Any, load: Callable[[], float], minimum: int, maximum: int, *,
                   per_worker: float = DEFAULT_PER_WORKER,
                   before_retire: Callable[[list[str]], Any] | None = None,
                   **kwargs: Any) -> QueueAdaptive:
    """Start scaling ``cluster`` between ``minimum`` and ``maximum`` workers on ``load()``
    (requests in flight); returns the running :class:`QueueAdaptive` (``.stop()`` ends it).

    ``cluster`` must be one this process started (a LocalCluster, or any SpecCluster):
    scaling starts and retires its worker processes."""
    if not 1 <= minimum <= maximum:
        raise InvalidInput(f"adaptive bounds {minimum}:{maximum} are invalid: need "
                           "1 <= MIN <= MAX")
    if not hasattr(cluster, "adapt"):
        raise InvalidInput("adaptive scaling needs a cluster this process started "
                           "(not --scheduler ADDRESS)")
    adaptive: QueueAdaptive = cluster.adapt(Adaptive=QueueAdaptive, minimum=minimum,
                                            maximum=maximum, load=load,
                                            per_worker=per_worker,
                                            before_retire=before_retire, **kwargs)
    return adaptive


def parse_adaptive(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` -> (MIN, MAX), with a message naming the problem otherwise."""
    lo, sep, hi = text.partition(":")
    try:
        bounds = (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError:
        raise InvalidInput(f"--adaptive {text!r}: expected MIN:MAX, e.g. 1:4") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise InvalidInput(f"--adaptive {text!r}: need 1 <= MIN <= MAX")
    return bounds
