#!/usr/bin/env python
"""A/B of two checkouts of dask-rag over HTTP: one server at a time, rounds in ABBA order.

Why another A/B script: ``http_load.py`` keeps its servers up side by side and measured ~0.9x
for the server started first *with identical code in both slots* (its A/A run), and
``latency.py`` runs the arms in one process.  Here each arm is a fresh ``dask-rag serve`` (its
own LocalCluster of 2 worker processes) started from its tree, measured alone, and stopped
before the other starts; the order alternates A B B A ... so a drift of the machine's speed
during the run falls on both arms alike.  Each round measures, on the same index:

* concurrency 1: p50 of ``POST /v1/search`` dense k 5, hybrid k 5 and ``/v1/ask``
  (one request at a time, the same questions);
* 64 closed-loop clients: q/s of ``POST /v1/search`` hybrid k 5;
* with ``--in-process``: p50 of the blocking Python API that ``latency.py`` measures
  (``RagPipeline.search`` dense and hybrid k 10, ``ask``; one call at a time) in a process of
  its own started from the arm's tree, on its own LocalCluster of 2 worker processes.

The report gives each round's per-arm figures and the per-round ratios (``new / before`` for
q/s, ``before / new`` for latency: above 1 means the new tree is faster), and their medians.

    python -m benchmarks.tree_ab --before /path/to/other/checkout [--rounds 6]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, write_result
from benchmarks.http_load import closed_loop, one_at_a_time, queries, run_loop, start_server
from dask_rag.serve.server import free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent

#: (name, path, body of one request given the query)
CONCURRENCY_1 = (
    ("dense", "/v1/search", lambda q: {"query": q, "k": 5, "mode": "dense"}),
    ("hybrid", "/v1/search", lambda q: {"query": q, "k": 5, "mode": "hybrid"}),
    ("ask", "/v1/ask", lambda q: {"question": q, "k": 5}),
)


async def measure_arm(url: str, qs: list[str], n: int, seconds: float) -> dict[str, Any]:
    import aiohttp

    out: dict[str, Any] = {}
    timeout = aiohttp.ClientTimeout(total=120)
    conn = aiohttp.TCPConnector(limit=128)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as http:
        async def post(path: str, body: dict[str, Any]) -> int:
            async with http.post(url + path, json=body) as r:
                await r.read()
                return r.status

        for _, path, body in CONCURRENCY_1:  # warm-up: models loaded, connections open
            for q in qs[:8]:
                await post(path, body(q))
        for name, path, body in CONCURRENCY_1:
            async def send(q: str, path: str = path, body: Any = body) -> int:
                return await post(path, body(q))

            out[f"{name}_c1_p50_ms"] = (await one_at_a_time(send, qs[:n])).p50_ms

        async def hybrid(q: str) -> int:
            return await post("/v1/search", {"query": q, "k": 5, "mode": "hybrid"})

        row = await closed_loop(hybrid, qs, 64, seconds)
        out["hybrid_c64_qps"] = row["qps"]
        out["hybrid_c64_p50_ms"] = row["p50_ms"]
        out["errors"] = row["errors"]
    return out


def run_arm(tree: Path | None, index: Path, workers: int, qs: list[str], n: int,
            seconds: float) -> dict[str, Any]:
    port = free_port()
    proc = start_server(index, port, True, workers, tree)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, timeout=300)
        return dict(run_loop(measure_arm(url, qs, n, seconds)))
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except Exception:
            proc.kill()
        time.sleep(2)  # the cluster's processes gone before the next arm starts


#: the in-process arm: run by ``python -c`` with the arm's tree first on the path, so it may use
#: only what both trees have (start_local_cluster, RagPipeline.search/ask)
IN_PROCESS = """
import json, statistics, sys, time
from distributed import Client
from dask_rag.cluster import start_local_cluster
from dask_rag.config import RagConfig
from dask_rag.pipeline import RagPipeline
index, qs = sys.argv[1], json.loads(sys.argv[2])
with start_local_cluster(2, dashboard_address=None) as cluster, Client(cluster) as client, \\
        RagPipeline.from_index_dir(client, index, RagConfig(k=10)) as pipe:
    pipe.warmup()
    arms = {"py_dense": lambda q: pipe.search(q, k=10, mode="dense"),
            "py_hybrid": lambda q: pipe.search(q, k=10, mode="hybrid"),
            "py_ask": lambda q: pipe.ask(q)}
    out = {}
    for name, fn in arms.items():
        for q in qs[:8]:
            fn(q)
        ms = []
        for q in qs:
            t0 = time.perf_counter()
            fn(q)
            ms.append((time.perf_counter() - t0) * 1e3)
        out[name + "_c1_p50_ms"] = statistics.median(ms)
print("RESULT " + json.dumps(out))
"""


def run_in_process(tree: Path | None, index: Path, qs: list[str]) -> dict[str, Any]:
    """The blocking API's p50s from ``tree`` (None: this checkout), see :data:`IN_PROCESS`."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str((tree or ROOT).resolve()))
    done = subprocess.run([sys.executable, "-c", IN_PROCESS, str(index), json.dumps(qs)],
                          cwd=tree or ROOT, env=env, capture_output=True, text=True,
                          timeout=900, check=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", type=Path, required=True, help="the other checkout")
    p.add_argument("--index", type=Path, default=ROOT / ".demo-index")
    p.add_argument("--rounds", type=int, default=6, help="rounds (pairs), ABBA order")
    p.add_argument("--n", type=int, default=60, help="requests per concurrency-1 arm")
    p.add_argument("--seconds", type=float, default=10.0, help="per 64-client measurement")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="tree_ab")
    p.add_argument("--in-process", action="store_true",
                   help="also the blocking Python API (latency.py's dense/hybrid/ask arms)")
    args = p.parse_args(argv)
    qs = queries(256)
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = ("new", "before") if r % 2 == 0 else ("before", "new")
        row: dict[str, Any] = {"order": list(order)}
        for arm in order:
            tree = None if arm == "new" else args.before
            row[arm] = run_arm(tree, args.index, args.workers, qs, args.n, args.seconds)
            if args.in_process:
                row[arm].update(run_in_process(tree, args.index, qs[:args.n]))
            print(f"round {r + 1} {arm:>6}: {row[arm]}", flush=True)
        rounds.append(row)
    metrics = [k for k in rounds[0]["new"] if k != "errors"]
    ratios: dict[str, Any] = {}
    for m in metrics:
        # > 1: the new tree is faster (higher q/s, lower latency)
        per = [(x["new"][m] / x["before"][m]) if m.endswith("qps")
               else (x["before"][m] / x["new"][m]) for x in rounds]
        ratios[m] = {"per_round": [round(v, 3) for v in per],
                     "median": round(statistics.median(per), 3)}
    payload = {"trees": {"new": str(ROOT), "before": str(args.before.resolve())},
               "how": __doc__.split("\n\n")[1].replace("\n", " "),
               "rounds": rounds, "ratios_new_faster_above_1": ratios}
    path = write_result(args.out, payload, out_dir=RESULTS_DIR)
    print(f"wrote {path}")
    for m, v in ratios.items():
        print(f"{m:>20}: median {v['median']}  per round {v['per_round']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
