"""Dask plugins that make small search graphs cheap and keep shards where they are.

distributed batches messages on every link with hard-coded intervals (client → scheduler 10 ms,
scheduler → worker 5 ms, scheduler → client 2 ms, worker → scheduler 2 ms).  For a graph of a few
millisecond-long tasks those waits dominate the round trip, so dask-rag lowers them:

* :class:`CommTuningSchedulerPlugin` sets the interval of each scheduler → worker stream when the
  worker registers and of each scheduler → client stream when the client connects;
* :class:`CommTuningWorkerPlugin` sets the worker → scheduler stream on every (re)started worker;
* :func:`tune_comms` installs both and sets the client's own stream.

The scheduler plugin also tells the work stealer never to move shard searches (their data
dependency is a whole shard, which must not travel).
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from distributed import Client
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

from dask_rag.config import CommConfig

__all__ = [
    "MEMBERSHIP_TOPIC",
    "NEVER_STEAL_PREFIXES",
    "CommTuningSchedulerPlugin",
    "CommTuningWorkerPlugin",
    "MembershipPlugin",
    "ModelCachePlugin",
    "ensure_model_cache",
    "off_membership_change",
    "on_membership_change",
    "scheduler_id",
    "tune_comms",
    "worker_model_cache",
    "worker_plugin",
]

logger = logging.getLogger(__name__)

#: task-name prefixes whose tasks must run next to a shard
NEVER_STEAL_PREFIXES = ("dask-rag-search", "dask-rag-apply", "dask-rag-fetch", "dask-rag-write")


class CommTuningSchedulerPlugin(SchedulerPlugin):
    """Lower the scheduler's batched-send intervals to workers and clients."""

    name = "dask-rag-comms"

    def __init__(self, config: CommConfig) -> None:
        self.to_worker_s = config.scheduler_to_worker_ms / 1000.0
        self.to_client_s = config.scheduler_to_client_ms / 1000.0
        self.connect_s = config.worker_connect_timeout_s

    async def start(self, scheduler: Any) -> None:
        if self.connect_s > 0:  # its connections to workers (see CommConfig)
            scheduler.rpc.timeout = self.connect_s
        for bcomm in scheduler.stream_comms.values():
            bcomm.interval = self.to_worker_s
        for bcomm in scheduler.client_comms.values():
            bcomm.interval = self.to_client_s
        try:
            from distributed import stealing

            stealing.fast_tasks.update(NEVER_STEAL_PREFIXES)
        except (ImportError, AttributeError):  # pragma: no cover - distributed internals moved
            logger.warning("could not exempt shard searches from work stealing")

    def add_worker(self, scheduler: Any, worker: str) -> None:
        bcomm = scheduler.stream_comms.get(worker)
        if bcomm is not None:
            bcomm.interval = self.to_worker_s

    def add_client(self, scheduler: Any, client: str) -> None:
        # the client's stream is created right after this hook runs
        def _set() -> None:
            bcomm = scheduler.client_comms.get(client)
            if bcomm is not None:
                bcomm.interval = self.to_client_s

        scheduler.loop.add_callback(_set)


class CommTuningWorkerPlugin(WorkerPlugin):
    """Lower a worker's batched-send interval to the scheduler, and how long it retries a
    connection to a peer: fetching a dependency from a worker that was just SIGKILLed
    otherwise retries the refused port for distributed's 30 s (a search waited that long)."""

    name = "dask-rag-comms"

    def __init__(self, config: CommConfig) -> None:
        self.interval_s = config.worker_to_scheduler_ms / 1000.0
        self.connect_s = config.worker_connect_timeout_s

    def setup(self, worker: Any) -> None:
        worker.batched_stream.interval = self.interval_s
        if self.connect_s > 0:
            worker.rpc.timeout = self.connect_s


def tune_comms(client: Client, config: CommConfig | None = None) -> None:
    """Apply ``config`` (default: dask-rag's tuned intervals) to the whole cluster.

    Idempotent: the plugins are registered under fixed names, so calling it again replaces
    them.  ``CommConfig.distributed_defaults()`` restores distributed's own values.
    """
    config = config or CommConfig()
    applied = (config, scheduler_id(client))
    if getattr(client, "_dask_rag_comms", None) == applied:
        return  # already applied through this client
    client.register_plugin(CommTuningSchedulerPlugin(config))
    client.register_plugin(CommTuningWorkerPlugin(config))
    client._dask_rag_comms = applied  # type: ignore[attr-defined]
    if client.scheduler_comm is not None:
        client.scheduler_comm.interval = config.client_to_scheduler_ms / 1000.0
    if config.worker_connect_timeout_s > 0:  # this client's connections (to workers, direct)
        client.rpc.timeout = config.worker_connect_timeout_s


#: the event topic on which :class:`MembershipPlugin` announces workers joining and leaving
MEMBERSHIP_TOPIC = "dask-rag-membership"


class MembershipPlugin(SchedulerPlugin):
    """Announce every worker that joins or leaves on :data:`MEMBERSHIP_TOPIC`.

    Indexes subscribe to it (:func:`on_membership_change`) to re-spread their shards onto new
    workers and re-replicate after a loss, without polling the scheduler.  A worker retiring
    gracefully (``Client.retire_workers``, an adaptive cluster scaling down) first hands its
    data to the others — Dask's active memory manager copies every key it alone holds, and a
    shard copies itself by reloading from the index location on the receiver — and then
    leaves, which this announces.
    """

    name = "dask-rag-membership"

    def add_worker(self, scheduler: Any, worker: str) -> None:
        scheduler.log_event(MEMBERSHIP_TOPIC, {"action": "add", "worker": worker})

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        scheduler.log_event(MEMBERSHIP_TOPIC, {"action": "remove", "worker": worker})


def scheduler_id(client: Client) -> str:
    """The identity of the scheduler the client is connected to now (a restarted scheduler at
    the same address has a new one, and none of the old one's plugins)."""
    return str(client.scheduler_info(n_workers=0).get("id")
               or getattr(client.scheduler, "address", ""))


def on_membership_change(client: Client, handler: Any = None) -> None:
    """Call ``handler(action, worker)`` (on the client's event loop: keep it short) whenever a
    worker joins or leaves the cluster.  Installs :class:`MembershipPlugin` and subscribes
    once per scheduler: call it again after a reconnect (with or without a handler) to
    re-install both on a restarted scheduler."""
    handlers: list[Any] = client.__dict__.setdefault("_dask_rag_membership_handlers", [])
    if handler is not None and handler not in handlers:
        handlers.append(handler)
    sid = scheduler_id(client)
    if client.__dict__.get("_dask_rag_membership") == sid:
        return

    def dispatch(event: tuple[float, dict[str, Any]]) -> None:
        msg = event[1]
        for h in list(handlers):
            try:
                h(msg.get("action"), msg.get("worker"))
            except Exception:  # one index's handler must not silence the others
                logger.exception("membership handler failed")

    client.register_plugin(MembershipPlugin())
    client.subscribe_topic(MEMBERSHIP_TOPIC, dispatch)
    client.__dict__["_dask_rag_membership"] = sid


def off_membership_change(client: Client, handler: Any) -> None:
    handlers: list[Any] = getattr(client, "_dask_rag_membership_handlers", [])
    if handler in handlers:
        handlers.remove(handler)


class ModelCachePlugin(WorkerPlugin):
    """Models loaded on a worker, once, keyed by their (hashable, frozen) config.

    Encoders, cross-encoders and generators take seconds to load; tasks fetch them from here
    so a model is loaded once per worker process and never per task.
    """

    name = "dask-rag-models"

    def __init__(self) -> None:
        self._models: dict[Any, Any] = {}
        self._lock: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {}  # only the empty plugin travels; models are loaded where they are used

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def setup(self, worker: Any) -> None:
        import threading

        self._lock = threading.RLock()

    def teardown(self, worker: Any) -> None:
        self._models.clear()

    def get(self, key: Any, loader: Any) -> Any:
        """The cached model for ``key``, loading it with ``loader()`` the first time."""
        if self._lock is None:
            self.setup(None)
        with self._lock:
            model = self._models.get(key)
            if model is None:
                model = loader()
                self._models[key] = model
            return model

    def loaded(self) -> list[Any]:
        return list(self._models)


P = TypeVar("P", bound=WorkerPlugin)


def worker_plugin(cls: type[P]) -> P:
    """The ``cls`` plugin of the worker running the current task (ValueError outside a task).

    A plugin registered through the client reaches every worker; one that was not (or not
    yet) is created and set up here on first use, so tasks never depend on the order of
    registration.
    """
    from distributed import get_worker

    worker = get_worker()
    name = cls.name  # type: ignore[attr-defined]
    plugin = worker.plugins.get(name)
    if plugin is None:
        plugin = cls()
        plugin.setup(worker)
        worker.plugins[name] = plugin
    assert isinstance(plugin, cls)
    return plugin


def worker_model_cache() -> ModelCachePlugin:
    """The model cache of the worker running the current task."""
    return worker_plugin(ModelCachePlugin)


def ensure_model_cache(client: Client) -> None:
    """Register the model cache on every (current and future) worker, once per client."""
    if getattr(client, "_dask_rag_models", False):
        return
    client.register_plugin(ModelCachePlugin())
    client._dask_rag_models = True  # type: ignore[attr-defined]
