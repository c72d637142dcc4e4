"""The Dask runtime dask-rag runs on: starting and connecting to clusters, worker plugins,
future helpers and the retry policy.  Nothing here knows about faiss or RAG.

* :mod:`~dask_rag.cluster.workers` — malloc settings, local clusters, resources, discovery;
* :mod:`~dask_rag.cluster.spec` — cluster specs (``clusters/*.yaml``);
* :mod:`~dask_rag.cluster.plugins` — comm tuning, the per-worker model cache;
* :mod:`~dask_rag.cluster.futures` — gathering and awaiting futures, transient errors, retry.
"""

from __future__ import annotations

import logging
from typing import Any

from distributed import Client

from dask_rag.cluster.plugins import tune_comms
from dask_rag.cluster.workers import (
    WORKER_MALLOC_ENV,
    current_workers,
    resource_request,
    start_local_cluster,
    tune_worker_malloc,
)
from dask_rag.config import CommConfig
from dask_rag.errors import InvalidInput

__all__ = ["WORKER_MALLOC_ENV", "connect", "current_workers", "resource_request",
           "start_local_cluster", "tune_worker_malloc"]

logger = logging.getLogger(__name__)


def connect(scheduler: str | None = None, *, spec: str | None = None,
            comms: CommConfig | None = CommConfig(), **cluster_kwargs: Any
            ) -> tuple[Client, Any]:
    """A client for ``scheduler`` (an address), a cluster spec file, or a new local cluster.

    Returns ``(client, cluster)``; ``cluster`` is None when connecting to an existing scheduler
    (the caller owns the cluster it started and must close it).
    """
    cluster = None
    if scheduler and spec:
        raise InvalidInput("give either a scheduler address or a cluster spec, not both")
    if scheduler:
        client = Client(scheduler)
    elif spec:
        from dask_rag.cluster.spec import start_from_spec

        client, cluster = start_from_spec(spec)  # applies the spec's own comm intervals
        logger.info("Dask dashboard: %s", client.dashboard_link)
        return client, cluster
    else:
        kwargs = {k: v for k, v in cluster_kwargs.items() if v is not None}
        cluster = start_local_cluster(**kwargs)
        client = Client(cluster)
    if comms is not None:
        tune_comms(client, comms)
    logger.info("Dask dashboard: %s", client.dashboard_link)
    return client, cluster
