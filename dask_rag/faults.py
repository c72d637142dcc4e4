"""Named fault points: deterministic fault injection for tests, inert in production.

The real code paths call :func:`fault_point` at the places where a crash matters::

    wal.appended          a mutation is in the write-ahead log, not yet applied to any shard
    save.shards_written   a save wrote the new shard files; the manifest commit comes next
    build.shards_written  a build wrote every shard; the manifest comes next
    embed.batch           an embedding task is about to encode its texts
    embed.vectors         an encoder's output vectors (``perturb``: this encoder now embeds
                          differently, as another CPU kind or a damaged model copy would)
    search.shard          a shard's search task is about to search
    apply.shard           a write's apply task is about to change its copy of a shard
    shard.load            a shard (re)load read the manifest and the shard's files; it
                          replays the write-ahead log next
    shard.catch_up        a shard copy found itself behind the log and is about to replay it
    rebalance.loaded      a rebalance loaded the moved replicas; it swaps them in next

A test arms points through the environment (``DASK_RAG_FAULTS``), in the client process
(``monkeypatch.setenv``) or on workers (:class:`ArmFaults`, a worker plugin; a nanny's new
worker inherits the nanny's environment, the plugin re-arms it)::

    DASK_RAG_FAULTS="save.shards_written=raise,embed.batch=kill@3"

Actions: ``raise`` (raise :class:`InjectedFault`), ``perturb`` (only at value points, see
:func:`perturb_point`: return the value slightly changed), ``kill`` (SIGKILL this process: no
cleanup, no flush — a power cut for the process), ``block`` (wait until the file named by
``DASK_RAG_FAULTS_RELEASE`` exists: the test decides when the work goes on); ``@N`` fires only
on the N-th time the point is reached (counted per process).  With a report file, a point fires
at most once across all processes (a worker restarted after its kill does not kill itself
again).  Every time an armed point is reached it appends a line
``<point> <pid> <count> <action|pass>`` to ``DASK_RAG_FAULTS_REPORT`` (fsynced *before* the
action), so a test proves its fault landed in the phase it claims — never by a timer.  With
nothing armed, a fault point is one environment lookup.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["FAULTS_ENV", "RELEASE_ENV", "REPORT_ENV", "ArmFaults", "InjectedFault",
           "fault_point", "perturb_point", "read_report"]

FAULTS_ENV = "DASK_RAG_FAULTS"
REPORT_ENV = "DASK_RAG_FAULTS_REPORT"
RELEASE_ENV = "DASK_RAG_FAULTS_RELEASE"
POINTS = frozenset({"wal.appended", "save.shards_written", "build.shards_written",
                    "embed.batch", "embed.vectors", "search.shard", "apply.shard",
                    "shard.load", "shard.catch_up", "rebalance.loaded"})

_counts: dict[str, int] = {}
_lock = threading.Lock()


class InjectedFault(RuntimeError):
    """Raised by an armed ``raise`` fault point."""


def _armed(name: str) -> tuple[str, int] | None:
    spec = os.environ.get(FAULTS_ENV)
    if not spec:
        return None
    for item in spec.split(","):
        point, _, action = item.strip().partition("=")
        if point == name:
            action, _, nth = action.partition("@")
            return action or "raise", int(nth or 0)
    return None


def fault_point(name: str) -> None:
    """Fire the fault armed at ``name``, if any (see the module docstring)."""
    armed = _armed(name)
    if armed is None:
        return
    action, nth = armed
    with _lock:
        _counts[name] = count = _counts.get(name, 0) + 1
        fires = (nth == 0 or count == nth) and _claim(name)
        _report(f"{name} {os.getpid()} {count} {action if fires else 'pass'}")
    if not fires:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "block":
        _block_until_released(name)
        return
    raise InjectedFault(f"fault injected at {name} (call {count})")


def perturb_point(name: str, vectors: Any) -> Any:
    """``vectors`` (float rows), or with ``name=perturb`` armed, the rows plus a fixed pattern
    of +-0.01 per component, renormalised where they were unit rows: a deterministic stand-in
    for an encoder whose arithmetic differs (reported like every other action; ``@N`` and
    the once-across-processes claim do not apply: a perturbed encoder stays perturbed)."""
    armed = _armed(name)
    if armed is None or armed[0] != "perturb":
        return vectors
    import numpy as np

    with _lock:
        _counts[name] = count = _counts.get(name, 0) + 1
        _report(f"{name} {os.getpid()} {count} perturb")
    v = np.asarray(vectors, dtype=np.float32)
    if v.size == 0:
        return v
    sign = np.where(np.arange(v.shape[-1]) % 3 == 0, 0.01, -0.01).astype(np.float32)
    out = v + sign
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    unit = np.abs(norms - 1.0) < 1e-3
    return np.where(unit, out / np.linalg.norm(out, axis=-1, keepdims=True), out
                    ).astype(np.float32)


def _claim(name: str) -> bool:
    """With a report file, True for the one process that creates ``<report>.<name>.fired``
    first (O_EXCL: atomic across processes — two workers reaching their N-th call at the same
    moment must not both fire); without one, always True."""
    path = os.environ.get(REPORT_ENV)
    if not path:
        return True
    try:
        os.close(os.open(f"{path}.{name}.fired", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return False
    return True


def _block_until_released(name: str, limit_s: float = 300.0) -> None:
    import time

    release = os.environ.get(RELEASE_ENV)
    if not release:
        raise InjectedFault(f"{name}=block needs {RELEASE_ENV} (a file the test creates)")
    deadline = time.monotonic() + limit_s
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise InjectedFault(f"{name}: not released within {limit_s:.0f} s")
        time.sleep(0.005)


def _report(line: str) -> None:
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_report(path: str | os.PathLike[str]) -> list[tuple[str, int, int, str]]:
    """``(point, pid, count, action)`` for every time an armed point was reached."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        point, pid, count, action = line.split()
        out.append((point, int(pid), int(count), action))
    return out


class ArmFaults(WorkerPlugin):
    """Arm fault points on every worker (present and future): sets the environment of the
    worker processes.  ``ArmFaults({})`` disarms them."""

    name = "dask-rag-faults"

    def __init__(self, faults: dict[str, str], report: str | None = None,
                 release: str | None = None) -> None:
        unknown = set(faults) - POINTS
        if unknown:
            raise ValueError(f"unknown fault point(s) {sorted(unknown)}; known: {sorted(POINTS)}")
        self.spec = ",".join(f"{k}={v}" for k, v in faults.items())
        self.report = report
        self.release = release

    def setup(self, worker: Any) -> None:
        if self.spec:
            os.environ[FAULTS_ENV] = self.spec
        else:
            os.environ.pop(FAULTS_ENV, None)
        for env, value in ((REPORT_ENV, self.report), (RELEASE_ENV, self.release)):
            if value:
                os.environ[env] = value
        with _lock:
            _counts.clear()
