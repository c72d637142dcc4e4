"""A uvicorn server thread for tests."""

from __future__ import annotations


def server_for(served, telemetry=None, **cfg):
    """A uvicorn server thread on a free 127.0.0.1 port for ``served`` (a pipeline or
    Collections) with ``ServeConfig(**cfg)``."""
    from dask_rag.config import ServeConfig
    from dask_rag.serve import ServerThread, create_app
    from dask_rag.serve.server import free_port

    config = ServeConfig(port=free_port(), **cfg)
    return ServerThread(create_app(served, config, telemetry), config)
