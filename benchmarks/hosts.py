"""Several "hosts" on one machine, and an S3-compatible store, for multi-machine tests and
benchmarks.

:class:`MotoS3` runs moto's S3 server (the one s3fs's own tests use; ``moto[s3]`` + flask,
not ``moto[server]``, whose other services pull in hundreds of MB) on a loopback port and
points this process (fsspec config) and the host processes (environment) at it.
:class:`Hosts` runs a Dask scheduler and workers as separate processes: each worker binds
its own loopback address (127.0.0.2, 127.0.0.3, ...), runs in its own private working
directory with its own ``local_directory`` and ``$HOME``, and sees the index only through
its URL — nothing of the client's disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class MotoS3:
    """moto's S3 server on 127.0.0.1, with credentials that it accepts (any)."""

    CREDENTIALS: ClassVar[dict[str, str]] = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        # never ask the EC2 metadata address (169.254.169.254) for credentials
        "AWS_EC2_METADATA_DISABLED": "true"}

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._saved_env: dict[str, str | None] = {}
        self._saved_conf: object = None

    @property
    def env(self) -> dict[str, str]:
        """What a host process needs to reach the store (fsspec reads FSSPEC_S3_*)."""
        return {**self.CREDENTIALS, "FSSPEC_S3_ENDPOINT_URL": self.endpoint}

    def filesystem(self):
        import fsspec

        return fsspec.filesystem("s3", skip_instance_cache=True)

    def __enter__(self) -> MotoS3:
        import fsspec.config

        self._server.start()
        for k, v in self.CREDENTIALS.items():
            self._saved_env[k] = os.environ.get(k)
            os.environ[k] = v
        self._saved_conf = fsspec.config.conf.get("s3")
        fsspec.config.conf["s3"] = {"endpoint_url": self.endpoint}
        _clear_s3_instances()
        return self

    def __exit__(self, *exc: object) -> None:
        import fsspec.config

        if self._saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = self._saved_conf
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _clear_s3_instances()
        self._server.stop()


def _clear_s3_instances() -> None:
    with contextlib.suppress(ImportError):
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


class Hosts:
    """A scheduler and N workers, each a separate process on its own loopback address."""

    def __init__(self, n_workers: int, env: dict[str, str] | None = None,
                 scheduler_port: int | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="dask-rag-hosts-"))
        self.port = scheduler_port or free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        # what a nanny sets for its worker (these workers run without one): one OpenMP/BLAS
        # thread per single-threaded worker, or faiss oversubscribes the cores
        single = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        self.env = {**os.environ, **single, **(env or {}),
                    "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.workers: dict[int, subprocess.Popen[bytes]] = {}
        self._n = n_workers
        self._next_host = 2

    def __enter__(self) -> Hosts:
        self.start_scheduler()
        for _ in range(self._n):
            self.add_worker()
        return self

    def __exit__(self, *exc: object) -> None:
        for p in [*self.workers.values(), self.scheduler]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)

    def _log(self, name: str):
        return open(self.root / f"{name}.log", "ab")

    def start_scheduler(self) -> None:
        self.scheduler = subprocess.Popen(
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
             "--no-dashboard"], env=self.env, stdout=subprocess.DEVNULL,
            stderr=self._log("scheduler"))

    def kill_scheduler(self) -> None:
        assert self.scheduler is not None
        self.scheduler.send_signal(signal.SIGKILL)
        self.scheduler.wait(timeout=30)

    def add_worker(self, host_no: int | None = None) -> int:
        """Start a worker on 127.0.0.<host_no> (the next unused one by default), in a private
        working directory that is also its HOME and its Dask local directory."""
        if host_no is None:
            host_no = self._next_host
            self._next_host += 1
        home = self.root / f"host-{host_no}"
        home.mkdir(exist_ok=True)
        env = {**self.env, "HOME": str(home), "TMPDIR": str(home)}
        self.workers[host_no] = subprocess.Popen(
            [str(BIN / "dask"), "worker", self.address, "--host", f"127.0.0.{host_no}",
             "--nthreads", "1", "--no-nanny", "--no-dashboard", "--local-directory",
             str(home / "dask"), "--death-timeout", "60", "--memory-limit", "3GiB"],
            cwd=home, env=env, stdout=subprocess.DEVNULL, stderr=self._log(f"worker-{host_no}"))
        return host_no

    def kill_worker(self, host_no: int) -> None:
        """SIGKILL: the host is gone, no goodbye to the scheduler."""
        p = self.workers[host_no]
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)

    def restart_exited_workers(self) -> list[int]:
        """What a supervisor (systemd, Kubernetes) does: start again the workers that exited
        (a Dask worker exits when it loses its scheduler)."""
        restarted = [h for h, p in self.workers.items() if p.poll() is not None]
        for h in restarted:
            self.add_worker(h)
        return restarted

    def wait_exited(self, host_nos: list[int], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while any(self.workers[h].poll() is None for h in host_nos):
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {host_nos} still running")
            time.sleep(0.1)

    def host_dir(self, host_no: int) -> Path:
        return self.root / f"host-{host_no}"
