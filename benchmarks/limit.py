#!/usr/bin/env python
"""How close each serving path comes to the encoder-only ceiling of this machine (#30).

The encoder is the one cost a query cannot avoid on CPU; everything a request adds on top
(HTTP, the micro-batcher, Dask scheduling and transfers, BM25, merge, fusion, JSON) is
overhead this project owns.  One run, in alternated rounds (this VM's speed drifts):

* **ceiling**: the index's own encoder (the settings its manifest records) in as many
  single-threaded processes as there are cores, no Dask, no HTTP, each encoding the same short
  queries one at a time for ``--seconds``: the sum of their rates is the ceiling, and one
  process's p50 is the encoder's latency;
* **serving paths** of one ``dask-rag serve`` (2 local workers, the default micro-batcher):
  ``POST /v1/embeddings``, ``/v1/search`` dense k 5, hybrid k 5, ``/v1/ask`` (extractive), each
  at concurrency 1 (p50) and 64 closed-loop clients (q/s).

* with ``--before TREE``: the same serving paths of a ``dask-rag serve`` started from another
  checkout (the commit before a change), and the per-round ratios;
* **peers** (``benchmarks/peer_server.py``): the same job written the obvious way — one
  Starlette process with the index's encoder and ``faiss.IndexFlatIP`` — without and with a
  simple asyncio micro-batcher; ``/v1/embeddings`` and dense ``/v1/search`` the same way.

The servers take turns within a round, in an order that alternates between rounds.
The load comes from aiohttp clients in this process, separate from the server's processes;
its CPU share during each cell is measured and reported (on 2 cores, the load generator's CPU
comes out of the server's).  Writes ``benchmarks/results/limit.json`` with every round, the
medians and each path's fraction of the ceiling.

    python -m benchmarks.limit [--rounds 3] [--seconds 8]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, write_result
from benchmarks.http_load import (
    closed_loop,
    ensure_index,
    one_at_a_time,
    queries,
    run_loop,
    start_server,
)
from dask_rag.serve.server import free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent

#: (path name, route, request body for a query)
PATHS = (
    ("embeddings", "/v1/embeddings", lambda q: {"input": q}),
    ("search_dense", "/v1/search", lambda q: {"query": q, "k": 5, "mode": "dense"}),
    ("search_hybrid", "/v1/search", lambda q: {"query": q, "k": 5, "mode": "hybrid"}),
    ("ask", "/v1/ask", lambda q: {"question": q, "k": 5}),
)


def _encode_loop(index: str, qs: list[str], seconds: float, start: Any, out: Any) -> None:
    """One ceiling process: the index's encoder, one thread, one query at a time."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from dask_rag.embed.encoder import SentenceEncoder, recorded_config
    from dask_rag.index import store

    enc = SentenceEncoder(recorded_config(store.read_manifest(index).embed or {}))
    for q in qs[:16]:  # warm-up
        enc.encode([q])
    start.wait()
    lat: list[float] = []
    stop = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        enc.encode([qs[i % len(qs)]])
        lat.append(time.perf_counter() - t0)
        i += 1
    out.put(lat)


def ceiling(index: Path, qs: list[str], procs: int, seconds: float) -> dict[str, Any]:
    """``procs`` encoder processes at once: total q/s and the p50 of one encode."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(procs + 1), ctx.Queue()
    ps = [ctx.Process(target=_encode_loop, args=(str(index), qs, seconds, start, out))
          for _ in range(procs)]
    for p in ps:
        p.start()
    start.wait()
    lats = [out.get(timeout=600) for _ in ps]
    for p in ps:
        p.join()
    every = [x for lat in lats for x in lat]
    return {"qps": round(sum(len(lat) for lat in lats) / seconds, 1),
            "p50_ms": round(statistics.median(every) * 1e3, 3), "processes": procs}


#: the peers (name, --batch) and the paths they serve
PEERS = (("peer", "off"), ("peer_batched", "on"))
PEER_PATHS = PATHS[:2]


def start_peer(index: Path, port: int, batch: str) -> Any:
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "benchmarks.peer_server", "--index",
                             str(index), "--port", str(port), "--batch", batch], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def serve_cells(url: str, qs: list[str], seconds: float, n1: int,
                      paths: tuple[Any, ...] = PATHS, pid: int | None = None
                      ) -> dict[str, Any]:
    """Every path at concurrency 1 (p50 of ``n1`` requests) and 64 (q/s), with the load
    generator's CPU share of the machine during each cell, and (``pid``: the server's
    process) the serving tree's CPU per request at 64 clients by role: the server process
    (HTTP, request models, batchers, Dask client, final fusion), the scheduler, the nannies,
    the worker processes (embedding, search, BM25, records)."""
    import aiohttp
    import psutil

    from benchmarks.server_cpu import tree_cpu

    root = psutil.Process(pid) if pid is not None else None

    cores = os.cpu_count() or 1
    out: dict[str, Any] = {}
    conn = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=120)) as http:
        for name, route, body in paths:
            async def send(q: str, route: str = route, body: Any = body) -> int:
                async with http.post(url + route, json=body(q)) as r:
                    await r.read()
                    return r.status

            for q in qs[:8]:
                await send(q)
            c1 = await one_at_a_time(send, qs[:n1])
            tree0 = tree_cpu(root) if root is not None else {}
            cpu0, t0 = time.process_time(), time.perf_counter()
            row = await closed_loop(send, qs, 64, seconds)
            share = (time.process_time() - cpu0) / ((time.perf_counter() - t0) * cores)
            tree1 = tree_cpu(root) if root is not None else {}
            per = {k: round(1e3 * (tree1[k] - tree0[k]) / max(1, row["n"]), 3) for k in tree0}
            out[name] = {"c1_p50_ms": round(c1.p50_ms, 3), "c64_qps": round(row["qps"], 1),
                         "c64_p50_ms": round(row["p50_ms"], 2), "errors": row["errors"],
                         "load_generator_cpu_share": round(share, 3),
                         "c64_cpu_ms_per_request": per}
            print(f"    {name:>14}: c1 p50 {c1.p50_ms:7.2f} ms   c64 {row['qps']:7.1f} q/s  "
                  f"(load generator {share:.0%} of the CPUs; CPU ms/request {per})",
                  flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--index", type=Path, default=ROOT / ".demo-index")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--n1", type=int, default=60, help="requests per concurrency-1 cell")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="limit")
    p.add_argument("--no-peers", action="store_true", help="dask-rag and the ceiling only")
    p.add_argument("--serve-args", default="", help="more options of dask-rag serve")
    p.add_argument("--before", type=Path, default=None,
                   help="also serve from this checkout (the commit before a change), measured "
                        "in the same rounds as 'dask-rag-before'")
    args = p.parse_args(argv)
    index = ensure_index(args.index, args.workers)
    qs = queries(300)
    procs = os.cpu_count() or 1
    port = free_port()
    servers: dict[str, tuple[Any, int, tuple[Any, ...]]] = {
        "dask-rag": (start_server(index, port, True, args.workers,
                                  extra=tuple(args.serve_args.split())), port, PATHS)}
    if args.before is not None:
        before_port = free_port()
        servers["dask-rag-before"] = (start_server(index, before_port, True, args.workers,
                                                   tree=args.before), before_port, PATHS)
    if not args.no_peers:
        for name, batch in PEERS:
            peer_port = free_port()
            servers[name] = (start_peer(index, peer_port, batch), peer_port, PEER_PATHS)
    rounds: list[dict[str, Any]] = []
    try:
        for proc, p_port, _ in servers.values():
            wait_ready(f"http://127.0.0.1:{p_port}", proc, timeout=300)
        for r in range(args.rounds):
            print(f"round {r + 1}", flush=True)
            row: dict[str, Any] = {}
            # alternate the order: the ceiling first, then the servers, and reversed
            order = ["ceiling", *servers] if r % 2 == 0 else [*reversed(servers), "ceiling"]
            for what in order:
                if what == "ceiling":
                    row["ceiling"] = ceiling(index, qs, procs, args.seconds)
                    print(f"    ceiling: {row['ceiling']}", flush=True)
                    continue
                proc, p_port, paths = servers[what]
                print(f"  {what}", flush=True)
                cells = run_loop(serve_cells(f"http://127.0.0.1:{p_port}", qs, args.seconds,
                                             args.n1, paths, proc.pid))
                if what == "dask-rag":
                    row["paths"] = cells
                elif what == "dask-rag-before":
                    row["before"] = cells
                else:
                    row.setdefault("peers", {})[what] = cells
            rounds.append(row)
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
            proc.wait(60)
    summary: dict[str, Any] = {}
    ceil_qps = [x["ceiling"]["qps"] for x in rounds]
    enc_p50 = [x["ceiling"]["p50_ms"] for x in rounds]
    summary["ceiling"] = {"qps_median": statistics.median(ceil_qps), "qps_rounds": ceil_qps,
                          "encoder_p50_ms_median": statistics.median(enc_p50),
                          # each ceiling process runs flat out: its CPU per query
                          "cpu_ms_per_query_median": round(statistics.median(
                              1e3 * x["ceiling"]["processes"] / x["ceiling"]["qps"]
                              for x in rounds), 3)}
    for name, _, _ in PATHS:
        frac = [x["paths"][name]["c64_qps"] / x["ceiling"]["qps"] for x in rounds]
        over = [x["paths"][name]["c1_p50_ms"] - x["ceiling"]["p50_ms"] for x in rounds]
        summary[name] = {
            "c64_qps_median": statistics.median(x["paths"][name]["c64_qps"] for x in rounds),
            "fraction_of_ceiling_median": round(statistics.median(frac), 3),
            "fraction_of_ceiling_rounds": [round(f, 3) for f in frac],
            "c1_p50_ms_median": statistics.median(x["paths"][name]["c1_p50_ms"]
                                                  for x in rounds),
            "c1_p50_over_encoder_ms_median": round(statistics.median(over), 2),
            "load_generator_cpu_share_median": statistics.median(
                x["paths"][name]["load_generator_cpu_share"] for x in rounds),
            "c64_cpu_ms_per_request_median": {
                role: statistics.median(x["paths"][name]["c64_cpu_ms_per_request"][role]
                                        for x in rounds)
                for role in rounds[0]["paths"][name]["c64_cpu_ms_per_request"]}}
    for peer, _ in PEERS if not args.no_peers else ():
        for name, _, _ in PEER_PATHS:
            cell = [x["peers"][peer][name] for x in rounds]
            ahead = [x["paths"][name]["c64_qps"] / x["peers"][peer][name]["c64_qps"]
                     for x in rounds]
            behind = [x["paths"][name]["c1_p50_ms"] - x["peers"][peer][name]["c1_p50_ms"]
                      for x in rounds]
            summary[f"{peer}/{name}"] = {
                "c64_qps_median": statistics.median(c["c64_qps"] for c in cell),
                "c1_p50_ms_median": statistics.median(c["c1_p50_ms"] for c in cell),
                "dask_rag_c64_qps_over_peer_median": round(statistics.median(ahead), 3),
                "dask_rag_c64_qps_over_peer_rounds": [round(a, 3) for a in ahead],
                "dask_rag_c1_p50_minus_peer_ms_median": round(statistics.median(behind), 2)}
    if args.before is not None:
        for name, _, _ in PATHS:
            qps = [x["paths"][name]["c64_qps"] / x["before"][name]["c64_qps"] for x in rounds]
            c1 = [x["before"][name]["c1_p50_ms"] / x["paths"][name]["c1_p50_ms"] for x in rounds]
            summary[f"vs_before/{name}"] = {
                "c64_qps_ratio_median": round(statistics.median(qps), 3),
                "c64_qps_ratio_rounds": [round(v, 3) for v in qps],
                "c1_p50_ratio_median_faster_above_1": round(statistics.median(c1), 3),
                "c1_p50_ratio_rounds": [round(v, 3) for v in c1]}
    path = write_result(args.out, {"how": __doc__.split("\n\n")[1].replace("\n", " "),
                                   "rounds": rounds, "summary": summary}, out_dir=RESULTS_DIR)
    print(f"wrote {path}")
    for name, row in summary.items():
        print(f"{name:>14}: {row}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
