"""Running the app under uvicorn: in the foreground (``dask-rag serve``) or in a thread."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from typing import Any

from dask_rag.config import ServeConfig
from dask_rag.errors import DaskRagError

__all__ = ["ServerThread", "free_port", "run_server", "wait_ready"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None = None,
               timeout: float = 240.0) -> None:
    """Poll ``url``'s ``/readyz`` until it answers 200 (a ``dask-rag serve`` started elsewhere:
    model loading and the cluster take a while); fail early if ``proc`` exits first."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DaskRagError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise DaskRagError(f"server at {url} did not become ready within {timeout:.0f} s")


def _uvicorn_config(app: Any, config: ServeConfig, log_level: str) -> Any:
    import uvicorn

    return uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                          lifespan="on", timeout_graceful_shutdown=int(
                              max(5, config.request_timeout_s)),
                          timeout_keep_alive=30, access_log=False)


def run_server(pipeline: Any, config: ServeConfig, log_level: str = "info") -> None:
    """Serve until interrupted; SIGINT/SIGTERM drain in-flight requests before exiting."""
    from dask_rag.serve.app import create_app

    run_app(create_app(pipeline, config), config, log_level)


def run_app(app: Any, config: ServeConfig, log_level: str = "info") -> None:
    """:func:`run_server` for an app already made (its state read by the caller: e.g. the
    in-flight requests an adaptive cluster scales on)."""
    import uvicorn

    uvicorn.Server(_uvicorn_config(app, config, log_level)).run()


class ServerThread:
    """A real uvicorn server on a background thread (tests, notebooks, benchmarks)."""

    def __init__(self, app: Any, config: ServeConfig | None = None,
                 log_level: str = "warning") -> None:
        import uvicorn

        config = config or ServeConfig(port=free_port())
        if config.port == 0:
            from dataclasses import replace

            config = replace(config, port=free_port(config.host))
        self.config = config
        self.server = uvicorn.Server(_uvicorn_config(app, config, log_level))
        self.thread = threading.Thread(target=self.server.run, name="dask-rag-uvicorn",
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise DaskRagError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
