#!/usr/bin/env python
"""Adaptive scaling on queue depth: workers and p99 latency against offered load.

A real uvicorn server (in this process) serves the demo index from a LocalCluster that starts
with ``--min`` workers and scales with :class:`~dask_rag.cluster.adaptive.QueueAdaptive`
(target = requests in flight at the shim / ``--per-worker``, between ``--min`` and ``--max``).
Closed-loop async clients offer a stepped load (``--steps``: clients per step, ``--step-s``
each); every second the run records the offered clients, the workers the scheduler has, and the
p50/p99 latency and count of the requests that finished in that second.  Every answer is
compared with the same query's answer on the idle cluster (wrong), failures are counted.
Writes benchmarks/results/adaptive.json and adaptive.png.

On this 2-core machine more worker processes add no CPU: the figure shows the mechanism
(scale-up follows the queue, scale-down follows its end, no failed or wrong answer while
shards move), not a capacity gain — that needs cores (or machines) to grow into.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, SERVE_QUESTIONS, require_demo_index, write_result
from dask_rag.cluster import start_local_cluster
from dask_rag.cluster.workers import cpu_flags

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--index", type=Path, default=ROOT / ".demo-index")
    p.add_argument("--min", type=int, default=1)
    p.add_argument("--max", type=int, default=4)
    p.add_argument("--per-worker", type=float, default=4.0)
    p.add_argument("--steps", default="1,4,16,32,16,4,1",
                   help="clients per step of the offered load")
    p.add_argument("--step-s", type=float, default=15.0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    require_demo_index(args.index)

    import httpx
    from distributed import Client

    from dask_rag.cluster.adaptive import adapt_to_queue
    from dask_rag.config import RagConfig, ServeConfig
    from dask_rag.pipeline import RagPipeline
    from dask_rag.serve import ServerThread, create_app

    steps = [int(s) for s in args.steps.split(",")]
    cluster = start_local_cluster(args.min, dashboard_address=None)
    client = Client(cluster)
    pipe = RagPipeline.from_index_dir(client, args.index, RagConfig(k=5))
    pipe.warmup()
    reference = {q: [h.id for h in pipe.search(q, k=5)] for q in SERVE_QUESTIONS}
    app = create_app(pipe, ServeConfig(port=0, max_inflight=4096, request_timeout_s=120))
    guard = app.state.guard
    adaptive = adapt_to_queue(cluster, lambda: guard.inflight, args.min, args.max,
                              per_worker=args.per_worker,
                              before_retire=lambda ws: pipe.index.rebalance(exclude=ws))
    server = ServerThread(app).start()
    done: list[tuple[float, float, str]] = []  # (finished at, latency s, outcome)
    offered: list[tuple[float, int]] = []
    t0 = time.monotonic()

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            async def one(i: int, stop_at: float) -> None:
                j = i
                while time.monotonic() < stop_at:
                    q = SERVE_QUESTIONS[j % len(SERVE_QUESTIONS)]
                    j += 1
                    start = time.monotonic()
                    try:
                        r = await http.post("/v1/search", json={"query": q, "k": 5})
                        ok = r.status_code == 200
                        outcome = ("ok" if [h["id"] for h in r.json()["hits"]] == reference[q]
                                   else "wrong") if ok else f"failed {r.status_code}"
                    except httpx.HTTPError as exc:
                        outcome = f"failed {type(exc).__name__}"
                    done.append((time.monotonic() - t0, time.monotonic() - start, outcome))

            for n in steps:
                offered.append((time.monotonic() - t0, n))
                print(f"{time.monotonic() - t0:6.1f} s: {n} clients", flush=True)
                stop_at = time.monotonic() + args.step_s
                await asyncio.gather(*(one(i, stop_at) for i in range(n)))

    async def sample(timeline: list[dict[str, Any]], stop: asyncio.Event) -> None:
        while not stop.is_set():
            timeline.append({"t": round(time.monotonic() - t0, 2),
                             "workers": len(client.scheduler_info(n_workers=-1)["workers"]),
                             "inflight": guard.inflight})
            await asyncio.sleep(1.0)

    async def both(timeline: list[dict[str, Any]]) -> None:
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample(timeline, stop))
        await run()
        stop.set()
        await sampler

    timeline: list[dict[str, Any]] = []
    try:
        asyncio.run(both(timeline))
    finally:
        adaptive.stop()
        server.stop()
    for row in timeline:  # requests finished in the second before each sample
        lat = [lat for t, lat, _ in done if row["t"] - 1.0 < t <= row["t"]]
        row["offered_clients"] = next((n for t, n in reversed(offered) if t <= row["t"]), 0)
        row["finished"] = len(lat)
        row["p50_ms"] = round(1e3 * float(np.percentile(lat, 50)), 1) if lat else None
        row["p99_ms"] = round(1e3 * float(np.percentile(lat, 99)), 1) if lat else None
    per_step = []
    for (start, n), end in zip(offered, [t for t, _ in offered[1:]] + [float("inf")],
                               strict=True):
        lat = [lat for t, lat, _ in done if start < t <= end]
        ws = [r["workers"] for r in timeline if start < r["t"] <= end]
        per_step.append({"clients": n, "requests": len(lat),
                         "p99_ms": round(1e3 * float(np.percentile(lat, 99)), 1) if lat else None,
                         "workers_max": max(ws, default=None),
                         "workers_end": ws[-1] if ws else None})
    outcomes = [o for _, _, o in done]
    result = {
        "config": {"min": args.min, "max": args.max, "per_worker": args.per_worker,
                   "steps": steps, "step_s": args.step_s, "cpu_flags": cpu_flags(),
                   "signal": "requests in flight at the HTTP shim (admitted, not answered)"},
        "requests": len(outcomes), "failed": sum(o.startswith("failed") for o in outcomes),
        "wrong": outcomes.count("wrong"), "per_step": per_step,
        "scale_events": [{"t": round(t - (time.time() - (time.monotonic() - t0)), 2), **rec}
                         for t, rec in adaptive.log],
        "timeline": timeline,
    }
    print({k: v for k, v in result.items() if k != "timeline"})
    path = write_result("adaptive", result, args.out)
    _plot(result, args.out / "adaptive.png")
    print(f"wrote {path}")
    pipe.close()
    client.close()
    cluster.close()
    return 0


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = result["timeline"]
    t = [r["t"] for r in tl]
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    a.step(t, [r["offered_clients"] for r in tl], where="post", label="offered (clients)")
    a.step(t, [r["inflight"] for r in tl], where="post", label="in flight at the shim")
    a2 = a.twinx()
    a2.step(t, [r["workers"] for r in tl], where="post", color="k", label="workers")
    a2.set_ylabel("workers")
    a.set_ylabel("requests")
    a.legend(loc="upper left")
    a2.legend(loc="upper right")
    b.plot(t, [r["p99_ms"] for r in tl], ".-", label="p99")
    b.plot(t, [r["p50_ms"] for r in tl], ".-", label="p50")
    b.set_ylabel("latency (ms)")
    b.set_xlabel("seconds")
    b.legend()
    a.set_title(f"adaptive {result['config']['min']}..{result['config']['max']} workers on "
                f"queue depth: {result['requests']} requests, {result['failed']} failed, "
                f"{result['wrong']} wrong")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
