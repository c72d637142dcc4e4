"""Helpers shared by the benchmark scripts: machine description, latency statistics, output.

Every benchmark writes one JSON document holding its configuration, the machine (CPU model,
cores, memory, GPU), library versions and the numbers, next to a PNG plot — so a result file
is self-describing and two runs can be compared.  Benchmarks measure; tests never time.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LatencyStats", "machine_info", "time_calls", "versions", "write_result"]

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


@dataclass(frozen=True)
class LatencyStats:
    """Latency percentiles (milliseconds) and throughput of a series of timed calls."""

    n: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    total_s: float
    items: int

    @property
    def qps(self) -> float:
        return self.items / self.total_s if self.total_s > 0 else float("nan")

    @classmethod
    def from_samples(cls, seconds: Iterable[float], items: int, total_s: float | None = None
                     ) -> LatencyStats:
        arr = np.asarray(list(seconds), dtype=np.float64) * 1000.0
        if arr.size == 0:
            return cls(0, float("nan"), float("nan"), float("nan"), 0.0, 0)
        return cls(n=int(arr.size), p50_ms=float(np.percentile(arr, 50)),
                   p99_ms=float(np.percentile(arr, 99)), mean_ms=float(arr.mean()),
                   total_s=float(total_s if total_s is not None else arr.sum() / 1000.0),
                   items=int(items))

    def to_dict(self) -> dict[str, float]:
        return {"n": self.n, "p50_ms": round(self.p50_ms, 3), "p99_ms": round(self.p99_ms, 3),
                "mean_ms": round(self.mean_ms, 3), "qps": round(self.qps, 2),
                "total_s": round(self.total_s, 3), "items": self.items}


def time_calls(fn: Callable[[int], Any], n_calls: int, items_per_call: int,
               min_seconds: float = 0.0, warmup: int = 1) -> LatencyStats:
    """Call ``fn(i)`` ``n_calls`` times (at least ``min_seconds``) and summarise latencies."""
    for i in range(warmup):
        fn(i)
    samples = []
    start = time.perf_counter()
    i = 0
    while i < n_calls or (time.perf_counter() - start) < min_seconds:
        t0 = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - t0)
        i += 1
    total = time.perf_counter() - start
    return LatencyStats.from_samples(samples, items=len(samples) * items_per_call, total_s=total)


def time_concurrent(fn: Callable[[int], Any], n_calls: int, items_per_call: int,
                    concurrency: int = 2, min_seconds: float = 0.0) -> LatencyStats:
    """Like :func:`time_calls` with ``concurrency`` calls in flight at once.

    This is how a service runs batches (the micro-batcher keeps ``max_concurrent_batches`` in
    flight), and it is where a cluster hides its per-batch scheduling latency behind the
    compute of the previous batch.
    """
    from concurrent.futures import ThreadPoolExecutor

    fn(0)  # warm up
    samples: list[float] = []
    counter = iter(range(1 << 62))
    start = time.perf_counter()

    def worker() -> None:
        while True:
            i = next(counter)
            if i >= n_calls and time.perf_counter() - start >= min_seconds:
                return
            t0 = time.perf_counter()
            fn(i)
            samples.append(time.perf_counter() - t0)

    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    total = time.perf_counter() - start
    return LatencyStats.from_samples(samples, items=len(samples) * items_per_call, total_s=total)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_model() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except ImportError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """CPU model and the vector extensions the speed depends on, cores, memory and GPU.

    The same CPU model name hides different generations (an AVX2-only EPYC and one with
    AVX512-BF16 rank bf16 vs fp32 in opposite order), so the flags are recorded too.
    """
    from dask_rag.cluster.workers import cpu_flags

    mem = None
    try:
        import psutil

        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return {"cpu": _cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
            "memory_gib": mem, "gpu": _gpu_model(), "platform": platform.platform(),
            "python": platform.python_version()}


def versions() -> dict[str, str | None]:
    """Versions of the libraries whose speed the numbers depend on."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in ("dask-rag", "dask", "distributed", "faiss-cpu", "numpy", "torch",
                 "sentence-transformers", "transformers", "scann", "bm25s", "starlette",
                 "uvicorn", "onnxruntime", "uvloop"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def median_round(rows: list[dict[str, Any]], key: str = "qps") -> dict[str, Any]:
    """Of repeated runs (rounds) of one measurement, the run with the median ``key`` — its own
    latencies kept together — plus ``<key>_rounds``, every round's value in order."""
    ranked = sorted(rows, key=lambda row: row[key])
    return {**ranked[(len(ranked) - 1) // 2], f"{key}_rounds": [row[key] for row in rows]}


def round_ratios(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str = "qps"
                 ) -> list[float]:
    """``a[i][key] / b[i][key]`` round by round: two systems measured seconds apart, so the
    VM's drift between minutes cancels out of each ratio."""
    return [round(x[key] / y[key], 3) if y[key] and y[key] == y[key] else float("nan")
            for x, y in zip(a, b, strict=True)]


def write_result(name: str, payload: dict[str, Any], out_dir: str | Path | None = None) -> Path:
    """Write ``payload`` with machine + versions as ``<out_dir>/<name>.json``."""
    directory = Path(out_dir) if out_dir is not None else RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": machine_info(), "versions": versions(), **payload}
    path = directory / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    return path


def _noop(*args: Any) -> None:
    return None


def _pin() -> bytes:
    return b""


def measure_fanout_overhead(client: Any, n_parts: int = 4, iterations: int = 200,
                            warmup: int = 20, client_merge: bool = False) -> LatencyStats:
    """Round-trip latency of an *empty* fan-out + merge graph.

    ``n_parts`` no-op tasks, each placed next to a tiny pinned future on a worker (like search
    tasks next to their shard), feed one no-op merge task whose result the client awaits — or,
    with ``client_merge``, the client gathers the parts straight from the workers and merges
    itself (what ``DistributedIndex.search`` does).  What remains is pure Dask overhead: graph
    submission, scheduling, the batched comms.
    """
    import uuid

    from dask_rag.cluster.futures import gather_direct

    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    pins = [client.submit(_pin, workers=[w], pure=False, allow_other_workers=False)
            for w in workers]
    client.gather(pins)
    samples = []
    for i in range(warmup + iterations):
        token = uuid.uuid4().hex
        t0 = time.perf_counter()
        # one map call, as DistributedIndex submits a batch's search tasks
        parts = client.map(_noop, [pins[j % len(pins)] for j in range(n_parts)],
                           key=[(f"dask-rag-search-{token}", j) for j in range(n_parts)],
                           pure=False)
        if client_merge:
            gather_direct(client, parts)
        else:
            client.submit(_noop, *parts, key=(f"dask-rag-merge-{token}", 0, 0),
                          pure=False).result()
        if i >= warmup:
            samples.append(time.perf_counter() - t0)
        del parts
    for p in pins:
        p.release()
    return LatencyStats.from_samples(samples, items=len(samples))


#: questions about the demo corpus (the standard library) the serving benchmarks send
SERVE_QUESTIONS = ["How do I sort a list?", "How do I parse JSON?", "How do I read a CSV file?",
                   "How do I run a subprocess?", "How do I create a temporary file?",
                   "How do I compute a hash of a file?", "What is a named tuple?",
                   "How do I join paths?", "How do I copy a directory tree?",
                   "What does functools.lru_cache do?"]


def require_demo_index(path: Path) -> None:
    """Exit with the command that builds the demo index when ``path`` holds none."""
    import sys

    if not (Path(path) / "manifest.json").exists():
        sys.exit(f"{path}: no index; run `make demo` (or dask-rag demo --no-serve) first")
