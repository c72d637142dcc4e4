#!/usr/bin/env python
"""Reliability: a bounded mixed load against a served index while a worker is killed.

A real uvicorn server (in this process, on a LocalCluster of 2 worker processes) serves a copy
of the demo index.  Clients send ``/v1/search`` and ``/v1/ask`` requests for ``--seconds``; a
writer adds small batches of chunks through the index (acknowledged writes); at
``--kill-at`` seconds a worker holding shards is SIGKILLed (its nanny restarts it and the
server re-spreads the shards).  Counted: requests sent, succeeded, failed (by status and by
time relative to the kill), answers that differ from a no-fault reference run (wrong), writes
acknowledged and writes lost (checked after the run), recovery time (kill → /readyz ready and
search results correct again), and memory (RSS of this process and the workers, start vs end).
Writes benchmarks/results/reliability.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, write_result
from dask_rag.cluster import start_local_cluster

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["How do I sort a list?", "How do I parse JSON?", "How do I read a CSV file?",
             "How do I run a subprocess?", "How do I create a temporary file?",
             "How do I compute a hash of a file?", "What is a named tuple?",
             "How do I join paths?", "How do I copy a directory tree?",
             "What does functools.lru_cache do?"]


def rss_mb(client: Any) -> dict[str, float]:
    import psutil

    workers = client.run(lambda: psutil.Process().memory_info().rss / 2**20)
    return {"server": round(psutil.Process().memory_info().rss / 2**20, 1),
            "workers": round(float(sum(workers.values())), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--index", type=Path, default=ROOT / ".demo-index")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--kill-at", type=float, default=15.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)

    import aiohttp
    from distributed import Client

    from dask_rag.config import RagConfig, ServeConfig
    from dask_rag.pipeline import RagPipeline
    from dask_rag.serve import ServerThread, create_app
    from dask_rag.serve.server import free_port

    if not (args.index / "manifest.json").exists():
        sys.exit(f"{args.index}: no index; run `make demo` (or dask-rag demo --no-serve) first")
    work = Path(tempfile.mkdtemp(prefix="dask-rag-reliability-"))
    index_dir = work / "index"
    shutil.copytree(args.index, index_dir)
    cluster = start_local_cluster(2, dashboard_address=None)
    client = Client(cluster)
    pipe = RagPipeline.from_index_dir(client, index_dir, RagConfig(k=5))
    pipe.warmup()
    reference = {q: [h.id for h in pipe.search(q, k=5)] for q in QUESTIONS}
    ref_answers = {q: pipe.ask(q).text for q in QUESTIONS}
    config = ServeConfig(port=free_port(), max_inflight=1024, request_timeout_s=60)
    server = ServerThread(create_app(pipe, config), config).start()
    mem_start = rss_mb(client)

    log: list[dict[str, Any]] = []
    acked: list[int] = []
    kill_time: list[float] = []
    t0 = time.monotonic()
    stop_at = t0 + args.seconds
    dim = pipe.index.dim

    def writer() -> None:
        rng = np.random.default_rng(0)
        next_id = 10**15
        while time.monotonic() < stop_at:
            ids = np.arange(next_id, next_id + 4, dtype=np.int64)
            vecs = rng.standard_normal((4, dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            try:
                # no text: the writes must not change BM25 statistics, so that any answer that
                # differs from the no-fault reference is a real error
                pipe.index.add(vecs, ids, [{"source": "reliability",
                                            "metadata": {"write": int(i)}} for i in ids])
                acked.extend(int(i) for i in ids)
            except Exception as exc:  # an unacknowledged write may fail; it must not be lost
                log.append({"t": time.monotonic() - t0, "kind": "write", "ok": False,
                            "error": type(exc).__name__})
            next_id += 4
            time.sleep(1.0)

    def killer() -> None:
        time.sleep(args.kill_at)
        locations = pipe.index.shard_locations()
        victim = next(iter(locations.values()))[0]
        pids = client.run(os.getpid)
        kill_time.append(time.monotonic() - t0)
        os.kill(pids[victim], signal.SIGKILL)
        # the nanny restarts the worker; spread the shards again once it is back
        deadline = time.monotonic() + 60
        while len(client.scheduler_info()["workers"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        pipe.index.rebalance()

    readiness: list[tuple[float, bool]] = []

    async def load() -> None:
        async with aiohttp.ClientSession(server.url) as http:
            async def probe() -> None:
                while time.monotonic() < stop_at:
                    try:
                        async with http.get("/readyz") as r:
                            readiness.append((time.monotonic() - t0, r.status == 200))
                    except aiohttp.ClientError:
                        readiness.append((time.monotonic() - t0, False))
                    await asyncio.sleep(0.25)

            async def one(i: int) -> None:
                n = 0
                while time.monotonic() < stop_at:
                    q = QUESTIONS[(i + n) % len(QUESTIONS)]
                    ask = n % 5 == 4
                    t = time.monotonic() - t0
                    try:
                        path, body = (("/v1/ask", {"question": q}) if ask else
                                      ("/v1/search", {"query": q, "k": 5}))
                        async with http.post(path, json=body,
                                             timeout=aiohttp.ClientTimeout(total=90)) as r:
                            data = await r.json()
                            status = r.status
                    except Exception as exc:
                        log.append({"t": t, "kind": "ask" if ask else "search", "status": 0,
                                    "error": type(exc).__name__})
                        n += 1
                        continue
                    wrong = False
                    if status == 200:
                        if ask:
                            wrong = data["answer"] != ref_answers[q]
                        else:
                            wrong = [h["id"] for h in data["hits"]] != reference[q]
                    log.append({"t": t, "kind": "ask" if ask else "search", "status": status,
                                "wrong": wrong})
                    n += 1

            await asyncio.gather(probe(), *(one(i) for i in range(args.concurrency)))

    threads = [threading.Thread(target=writer), threading.Thread(target=killer)]
    for th in threads:
        th.start()
    asyncio.run(load())
    for th in threads:
        th.join()
    # recovery: /readyz green and results right again
    import httpx

    t_kill = kill_time[0] if kill_time else float("nan")
    not_ready = [t for t, ok in readiness if not ok and t >= t_kill]
    ready_after = [t for t, ok in readiness if ok and t > (max(not_ready) if not_ready else t_kill)]
    ready_at = min(ready_after) if ready_after else None
    while ready_at is None and time.monotonic() - t0 < args.seconds + 60:
        if httpx.get(server.url + "/readyz", timeout=10).status_code == 200:
            ready_at = time.monotonic() - t0
        else:
            time.sleep(0.2)
    after = [r for r in log if r.get("status") == 200 and r["t"] > t_kill]
    first_ok_after = min((r["t"] for r in after), default=float("nan"))
    mem_end = rss_mb(client)
    server.stop()
    present = pipe.index.fetch(np.array(acked, dtype=np.int64)) if acked else []
    lost = sum(1 for rec in present if rec is None)
    requests = [r for r in log if r["kind"] in ("search", "ask")]
    failed = [r for r in requests if r.get("status") != 200]
    window = (t_kill, (ready_at or t_kill) + 5.0)
    result = {
        "config": {"seconds": args.seconds, "kill_at": args.kill_at,
                   "concurrency": args.concurrency, "workers": 2, "mix": "80% search, 20% ask",
                   "writes": "4 chunks per second through DistributedIndex.add"},
        "requests": {"sent": len(requests),
                     "succeeded": sum(1 for r in requests if r.get("status") == 200),
                     "failed": len(failed),
                     "failed_by_status": {str(s): sum(1 for r in failed if r.get("status") == s)
                                          for s in sorted({r.get("status") for r in failed})},
                     "failed_outside_recovery_window": sum(
                         1 for r in failed if not window[0] <= r["t"] <= window[1]),
                     "wrong_answers": sum(1 for r in requests if r.get("wrong"))},
        "retries_by_server": "retry-once on transient errors (dask_rag.cluster.futures.retry_once)",
        "writes": {"acknowledged": len(acked), "lost": lost,
                   "failed_unacknowledged": sum(1 for r in log if r["kind"] == "write")},
        "recovery": {"kill_at_s": round(t_kill, 2),
                     "not_ready_probes_after_kill": len(not_ready),
                     "recovery_time_s": None if ready_at is None else round(ready_at - t_kill,
                                                                              2),
                     "ready_again_at_s": None if ready_at is None else round(ready_at, 2),
                     "first_success_after_kill_s": round(first_ok_after - t_kill, 3),
                     "recovery_window_s": [round(w, 2) for w in window]},
        "memory_mb": {"start": mem_start, "end": mem_end,
                      "growth_server": round(mem_end["server"] - mem_start["server"], 1),
                      "growth_workers": round(mem_end["workers"] - mem_start["workers"], 1)},
    }
    print(result)
    path = write_result("reliability", result, args.out)
    print(f"wrote {path}")
    pipe.close()
    client.close()
    cluster.close()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
