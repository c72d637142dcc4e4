#!/usr/bin/env python
"""HTTP load: closed-loop async clients against a real ``dask-rag serve`` on 127.0.0.1.

For each concurrency (1 … 256) it measures QPS and p50/p99 latency of ``POST /v1/search``
(query embedding + hybrid search over the demo index) for

* ``batched``: the shim coalescing concurrent requests into one Dask graph per batch,
* ``no-batching``: ``dask-rag serve --no-batching`` — one graph per request (naive shim),
* ``in-process``: the same pipeline driven directly from asyncio (``RagPipeline.asearch``,
  same micro-batcher), i.e. what the HTTP layer costs on top.

Each server runs in its own process (with its own LocalCluster of 2 worker processes); the load
generator and the in-process pipeline (a third LocalCluster) run here.  All three are up at once
and measured in interleaved rounds, so their ratios come from the same minutes.
Writes ``benchmarks/results/http_load.json`` and ``.png``.

    python benchmarks/http_load.py            # concurrency 1,4,16,64,256
    python benchmarks/http_load.py --quick    # 1,16,64, shorter, one round
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    RESULTS_DIR,
    LatencyStats,
    median_round,
    round_ratios,
    write_result,
)
from dask_rag.cluster import start_local_cluster
from dask_rag.serve.server import free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent


def queries(n: int = 512) -> list[str]:
    from dask_rag.corpus.demo import DEMO_QUESTIONS, stdlib_documents
    from dask_rag.evaluate import known_item_set

    docs = stdlib_documents(["json", "csv", "functools", "itertools", "collections", "os",
                             "subprocess", "pathlib", "re", "logging"])
    # short questions, like a user's (long docstring sentences are the A/B's "long" queries)
    qs = [q for q in known_item_set(docs, n=4 * n, min_words=4).queries.values()
          if len(q.split()) <= 12]
    return (list(DEMO_QUESTIONS) + qs)[:n]


async def closed_loop(send: Any, qs: list[str], concurrency: int, seconds: float
                      ) -> dict[str, Any]:
    """``concurrency`` clients, each sending its next request when the previous returns."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    stop = time.perf_counter() + seconds
    counter = iter(range(1 << 62))

    async def client() -> None:
        while time.perf_counter() < stop:
            q = qs[next(counter) % len(qs)]
            t0 = time.perf_counter()
            status = await send(q)
            if status == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    total = time.perf_counter() - t0
    stats = LatencyStats.from_samples(latencies, items=len(latencies), total_s=total)
    return {**stats.to_dict(), "errors": errors}


async def one_at_a_time(send: Any, qs: list[str]) -> LatencyStats:
    """Latency of ``send`` for each of ``qs`` in turn (concurrency 1); any status but 200
    stops the run."""
    latencies = []
    for q in qs:
        t0 = time.perf_counter()
        status = await send(q)
        if status != 200:
            raise RuntimeError(f"a request answered {status}")
        latencies.append(time.perf_counter() - t0)
    return LatencyStats.from_samples(latencies, items=len(latencies), total_s=sum(latencies))


def http_sender(http: Any, url: str) -> Any:
    async def send(q: str) -> int:
        async with http.post(f"{url}/v1/search", json={"query": q, "k": 5}) as r:
            await r.read()
            return r.status

    return send


async def measure(urls: dict[str, str], pipe: Any, qs: list[str], levels: list[int],
                  seconds: float, rounds: int) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every mode at every level, ``rounds`` times, the modes interleaved level by level.

    This VM's speed drifts by +-20 % between minutes, so the modes are compared within a round
    (seconds apart, order rotated each round) rather than in three back-to-back sweeps.
    """
    # aiohttp, not httpx, generates the load: measured here, httpx's connection pool costs
    # ~8 ms of CPU per request at 64 concurrent connections (aiohttp: ~0.8 ms), and on a
    # 2-core machine the load generator's CPU comes straight out of the server's.
    import aiohttp

    async def in_process(q: str) -> int:
        await pipe.asearch(q, k=5)
        return 200

    conn = aiohttp.TCPConnector(limit=len(urls) * (max(levels) + 8))
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as http:
        senders = {name: http_sender(http, url) for name, url in urls.items()}
        senders["in-process"] = in_process
        for send in senders.values():
            for _ in range(8):  # warm-up: models loaded, connections open
                await send(qs[0])
        out: dict[str, dict[str, list[dict[str, Any]]]] = {
            m: {str(c): [] for c in levels} for m in senders}
        names = list(senders)
        for r in range(rounds):
            for c in levels:
                for m in names[r % len(names):] + names[:r % len(names)]:
                    row = await closed_loop(senders[m], qs, c, seconds)
                    out[m][str(c)].append(row)
                    print(f"  round {r + 1} {m:>11} concurrency {c:>4}: {row['qps']:>8.1f} q/s"
                          f"  p50 {row['p50_ms']:>8.1f} ms  p99 {row['p99_ms']:>8.1f} ms"
                          f"  errors {row['errors']}", flush=True)
    await pipe.aclose()
    return out


def run_loop(coro: Any) -> Any:
    """Run the load generator (and the in-process pipeline) on uvloop when installed, as the
    server does: on 2 shared cores the client's own CPU cost is part of what is measured."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def start_server(index: Path, port: int, batching: bool, workers: int,
                 tree: Path | None = None, extra: tuple[str, ...] = ()
                 ) -> subprocess.Popen[bytes]:
    """``dask-rag serve`` in a process of its own; from ``tree`` (another checkout of
    dask-rag, e.g. the commit before a change) instead of this one when given; ``extra``:
    more command-line options (``--generator ...``)."""
    cmd = [sys.executable, "-m", "dask_rag.cli", "serve", "--index", str(index), "--port",
           str(port), "--workers", str(workers), "--dashboard", ":0", "--max-inflight", "4096",
           *extra]
    if not batching:
        cmd.append("--no-batching")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if tree is not None:  # its scheduler and workers inherit the path, and import it too
        env["PYTHONPATH"] = str(tree.resolve())
    return subprocess.Popen(cmd, cwd=tree or ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def ensure_index(path: Path, workers: int) -> Path:
    if (path / "manifest.json").exists():
        return path
    from distributed import Client

    from dask_rag.corpus.demo import stdlib_documents
    from dask_rag.ingest import ingest

    print(f"building the demo index at {path} ...", flush=True)
    with start_local_cluster(workers, dashboard_address=None) as c, \
            Client(c) as client:
        ingest(client, stdlib_documents(), path, progress=True)
    return path


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, style in (("batched", "-o"), ("no-batching", "--s"), ("in-process", ":^"),
                        ("baseline", "-.x")):
        if name not in result["modes"]:
            continue
        rows = result["modes"][name]
        cs = sorted(int(c) for c in rows)
        ax1.plot(cs, [rows[str(c)]["qps"] for c in cs], style, label=name)
        ax2.plot(cs, [rows[str(c)]["p50_ms"] for c in cs], style, label=f"{name} p50")
        ax2.plot(cs, [rows[str(c)]["p99_ms"] for c in cs], style, alpha=0.35,
                 label=f"{name} p99")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    ax1.set_ylabel("requests / s")
    ax1.set_title("POST /v1/search throughput")
    ax2.set_yscale("log")
    ax2.set_ylabel("latency (ms)")
    ax2.set_title("latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--index", type=Path, default=ROOT / ".demo-index")
    p.add_argument("--levels", default="1,4,16,64,256")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved repetitions (median QPS and median ratio reported)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--baseline-tree", type=Path, default=None,
                   help="another checkout of dask-rag: its batched server runs as a mode of "
                        "its own ('baseline'), in the same interleaved rounds")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    if args.quick:
        levels, args.seconds, args.rounds = [1, 16, 64], 4.0, 1
    index = ensure_index(args.index, args.workers)
    qs = queries()
    from distributed import Client

    from dask_rag.pipeline import RagPipeline

    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    try:
        servers: list[tuple[str, bool, Path | None]] = [("batched", True, None),
                                                         ("no-batching", False, None)]
        if args.baseline_tree is not None:
            servers.append(("baseline", True, args.baseline_tree))
        for name, batching, tree in servers:
            port = free_port()
            procs[name] = start_server(index, port, batching, args.workers, tree)
            urls[name] = f"http://127.0.0.1:{port}"
        for name, proc in procs.items():
            wait_ready(urls[name], proc)
        # the same topology as `dask-rag serve`: the scheduler in a process of its own
        with start_local_cluster(args.workers, dashboard_address=None,
                                 scheduler_process=True) as c, \
                Client(c) as client, RagPipeline.from_index_dir(client, index) as pipe:
            pipe.warmup()
            samples = run_loop(measure(urls, pipe, qs, levels, args.seconds, args.rounds))
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(60)
    modes = {m: {c: median_round(rows) for c, rows in per.items()} for m, per in samples.items()}
    c64 = "64" if "64" in modes["batched"] else str(max(levels))
    vs_in = round_ratios(samples["batched"][c64], samples["in-process"][c64])
    vs_nb = round_ratios(samples["batched"][c64], samples["no-batching"][c64])
    summary: dict[str, Any] = {
        "concurrency": int(c64),
        "batched_vs_in_process": float(np.median(vs_in)),
        "batched_vs_in_process_rounds": vs_in,
        "batched_vs_no_batching": float(np.median(vs_nb)),
        "batched_vs_no_batching_rounds": vs_nb,
    }
    if "baseline" in samples:
        vs_base = round_ratios(samples["batched"][c64], samples["baseline"][c64])
        summary.update(batched_vs_baseline=float(np.median(vs_base)),
                       batched_vs_baseline_rounds=vs_base,
                       baseline_tree=str(args.baseline_tree))
        print(f"batched = {summary['batched_vs_baseline']:.2f} x baseline {vs_base}")
    print(f"at concurrency {c64} (median of {args.rounds} rounds): batched = "
          f"{summary['batched_vs_in_process']:.2f} x in-process {vs_in}, "
          f"{summary['batched_vs_no_batching']:.2f} x no-batching {vs_nb}")
    result = {"config": {"index": str(index), "levels": levels, "seconds": args.seconds,
                         "rounds": args.rounds, "workers": args.workers,
                         "endpoint": "POST /v1/search k=5 hybrid",
                         "queries": len(qs), "query_words_mean": float(np.mean(
                             [len(q.split()) for q in qs]))},
              "modes": modes, "summary": summary}
    path = write_result("http_load", result, args.out)
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
