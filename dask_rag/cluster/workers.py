"""Dask workers as dask-rag wants them: malloc settings, local clusters, resources, discovery."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import dask
from distributed import Client, LocalCluster

from dask_rag.config import DASHBOARD_ADDRESS
from dask_rag.errors import InvalidInput

__all__ = ["QUIET_DASK_CONFIG", "WORKER_MALLOC_ENV", "cpu_flags", "current_workers",
           "quiet_dask_config", "resource_request", "start_local_cluster", "tune_worker_malloc"]

logger = logging.getLogger(__name__)


#: glibc malloc settings for worker processes (bytes).  distributed's nanny sets
#: ``MALLOC_TRIM_THRESHOLD_=65536`` so that workers hand freed memory back to the OS, and setting
#: any malloc threshold switches off glibc's dynamic mmap threshold: every buffer over 128 KiB —
#: each activation tensor of the encoder, each distance block of a faiss scan — is then
#: mmap'ed and unmapped per use and page-faulted in again.  Measured here: MiniLM encodes 28 %
#: slower under the nanny's setting (median of 3: 1,213 vs 945 ms per 32 texts, one thread);
#: with the mmap threshold pinned at 32 MiB it is back within 8 % (1,024 ms) while memory
#: beyond 32 MiB free still goes back to the OS.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": 32 << 20, "MALLOC_TRIM_THRESHOLD_": 32 << 20}


#: the CPU features results and speed depend on (int8 and bf16 kernels differ by them)
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_flags() -> list[str]:
    """Which of :data:`CPU_FLAGS` this machine's CPU has (recorded beside every figure: the
    same CPU model name hides generations that differ in them)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return [f for f in CPU_FLAGS if f in flags]


def tune_worker_malloc() -> dict[str, int]:
    """Add :data:`WORKER_MALLOC_ENV` to ``distributed.nanny.pre-spawn-environ``.

    Call before a cluster's nannies are created (``start_local_cluster`` and the cluster specs
    do).  The setting stays in this process's Dask config so that workers added later by
    ``scale`` get it too.  Values the user configured for ``MALLOC_MMAP_THRESHOLD_`` are kept.
    Returns the environment the next nannies will use.
    """
    key = "distributed.nanny.pre-spawn-environ"
    env = dict(dask.config.get(key, default={}) or {})
    if "MALLOC_MMAP_THRESHOLD_" not in env:
        env.update(WORKER_MALLOC_ENV)
        dask.config.set({key: env})
    return env


#: Dask settings for the clusters dask-rag starts, unless the user set them: distributed's
#: defaults wake every scheduler, nanny and worker process 50 times a second (the event-loop
#: tick, 20 ms), sample each worker's stacks 100 times a second (the statistical profiler,
#: 10 ms: it takes the GIL from the running encoder) and poll memory 10 times a second.  An
#: idle 2-worker serving tree spent 87 ms of CPU per second on that (4 % of 2 cores:
#: scheduler 16, nannies 28, workers 43); with these, 21 (scheduler 7, nannies 5, workers 9).
#: The dashboard's profile page stays empty unless profiling is turned back on
#: (DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=True).
QUIET_DASK_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "500ms",
    "distributed.worker.memory.monitor-interval": "500ms",
    "distributed.admin.system-monitor.interval": "1s",
    "distributed.scheduler.work-stealing-interval": "500ms",
}


def quiet_dask_config() -> None:
    """Apply :data:`QUIET_DASK_CONFIG` here and (through the environment) in the cluster
    processes this one starts, for every key the user has not set in the environment."""
    for key, value in QUIET_DASK_CONFIG.items():
        env = "DASK_" + key.upper().replace(".", "__").replace("-", "_")
        if env in os.environ:
            continue
        os.environ[env] = str(value)
        dask.config.set({key: value})


def start_local_cluster(n_workers: int | None = None, threads_per_worker: int = 1, *,
                        gpus: bool = False, memory_limit: str | float | None = "auto",
                        dashboard_address: str | None = DASHBOARD_ADDRESS,
                        scheduler_process: bool = False, **kwargs: Any) -> Any:
    """A LocalCluster of single-threaded worker processes, or a LocalCUDACluster (one worker
    per GPU) when ``gpus`` is true.

    Single-threaded workers are the right default for dask-rag: faiss and torch already use
    vectorised kernels, and one worker process per core keeps shards' search tasks from
    contending for the GIL or for OpenMP threads.

    ``scheduler_process`` runs the scheduler in a process of its own (distributed's
    ``SubprocessCluster``) instead of on this process's event loop: a serving process then keeps
    its GIL for HTTP and the client.  Measured here with ``POST /v1/search`` at 64 clients: the
    batched shim served ~250-285 q/s with the scheduler in its own process against ~180-225 q/s
    with it in the server process.  Not on Windows (distributed does not support it there).
    """
    env = tune_worker_malloc()
    quiet_dask_config()
    if gpus:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as exc:
            raise InvalidInput("gpus=True needs dask-cuda: pip install 'dask-rag[gpu]'") from exc
        return LocalCUDACluster(threads_per_worker=threads_per_worker,
                                dashboard_address=dashboard_address, **kwargs)
    if n_workers is None:
        n_workers = max(1, (os.cpu_count() or 2) // max(1, threads_per_worker))
    if scheduler_process and not sys.platform.startswith("win"):
        from distributed.deploy.subprocess import SubprocessCluster

        # the workers' nannies run in child processes and read their Dask config from the
        # environment they inherit, not from this process's dask.config
        os.environ["DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON"] = repr(
            {k: str(v) for k, v in env.items()})
        worker_kwargs = dict(kwargs.pop("worker_kwargs", None) or {})
        if memory_limit not in (None, "auto"):
            worker_kwargs.setdefault("memory_limit", memory_limit)
        # None disables the dashboard there too (its annotation says str only)
        cluster = SubprocessCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                                    dashboard_address=dashboard_address,  # type: ignore[arg-type]
                                    worker_kwargs=worker_kwargs, **kwargs)
        try:  # its workers are processes it spawned, not yet registered: wait, as LocalCluster
            cluster.wait_for_workers(n_workers, timeout=120)
        except BaseException:
            cluster.close()
            raise
        return cluster
    return LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                        processes=True, memory_limit=memory_limit,
                        dashboard_address=dashboard_address, **kwargs)


def resource_request(client: Client, name: str) -> dict[str, float] | None:
    """``{name: 1}`` when some worker of the cluster declares resource ``name``, else None.

    Specs mark index workers with a ``shard`` resource and LLM workers with ``generator``;
    on clusters without them, work may run on any worker.
    """
    workers = client.scheduler_info(n_workers=-1)["workers"]
    if any(name in (w.get("resources") or {}) for w in workers.values()):
        return {name: 1}
    return None


def current_workers(client: Client, timeout: float = 60.0) -> list[str]:
    """Addresses of the workers now (waiting for at least one, e.g. during a restart)."""
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    if not workers:
        client.wait_for_workers(1, timeout=timeout)
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    return workers
