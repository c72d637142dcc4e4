#!/usr/bin/env python
"""Server CPU per ``POST /v1/search``: this checkout against another (the commit before a
change), both served by ``dask-rag serve`` at once and loaded in alternating rounds.

The figure is the server process's own CPU time (user + system, from ``psutil``; its
scheduler and workers run in other processes) divided by the requests it answered: what the
HTTP shim, the request models, the micro-batcher and the Dask client cost per request.

    python -m benchmarks.server_cpu --baseline-tree /tmp/before   # a worktree of the old commit
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import write_result
from benchmarks.http_load import (
    closed_loop,
    ensure_index,
    http_sender,
    queries,
    run_loop,
    start_server,
)
from dask_rag.serve.server import free_port, wait_ready


async def measure(urls: dict[str, str], pids: dict[str, int], qs: list[str], concurrency: int,
                  seconds: float, rounds: int) -> dict[str, list[dict[str, Any]]]:
    import aiohttp
    import psutil

    procs = {name: psutil.Process(pid) for name, pid in pids.items()}
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
    conn = aiohttp.TCPConnector(limit=4 * concurrency)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=120)) as http:
        senders = {name: http_sender(http, url) for name, url in urls.items()}
        for send in senders.values():
            for q in qs[:32]:  # warm-up
                await send(q)
        names = list(urls)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = procs[name].cpu_times()
                row = await closed_loop(senders[name], qs, concurrency, seconds)
                t1 = procs[name].cpu_times()
                cpu_s = (t1.user - t0.user) + (t1.system - t0.system)
                row["server_cpu_ms_per_request"] = round(1e3 * cpu_s / max(1, row["n"]), 4)
                out[name].append(row)
                print(f"  round {r + 1} {name:>9}: {row['qps']:7.1f} q/s, server CPU "
                      f"{row['server_cpu_ms_per_request']:.3f} ms/request, errors "
                      f"{row['errors']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline-tree", type=Path, required=True,
                   help="a checkout of the commit to compare with (git worktree add ...)")
    p.add_argument("--index", type=Path, default=Path(".demo-index"))
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--name", default="server_cpu", help="results/<name>.json")
    args = p.parse_args(argv)
    index = ensure_index(args.index, args.workers).resolve()
    ports = {"current": free_port(), "baseline": free_port()}
    procs = {"current": start_server(index, ports["current"], True, args.workers),
             "baseline": start_server(index, ports["baseline"], True, args.workers,
                                      tree=args.baseline_tree)}
    try:
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        for name, url in urls.items():
            wait_ready(url, procs[name])
        rows = run_loop(measure(urls, {n: pr.pid for n, pr in procs.items()}, queries(),
                                args.concurrency, args.seconds, args.rounds))
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(60)
    per_round = [c["server_cpu_ms_per_request"] / b["server_cpu_ms_per_request"]
                 for c, b in zip(rows["current"], rows["baseline"], strict=True)]
    summary = {name: {"server_cpu_ms_per_request_median": float(np.median(
                          [r["server_cpu_ms_per_request"] for r in rs])),
                      "qps_median": float(np.median([r["qps"] for r in rs]))}
               for name, rs in rows.items()}
    result = {"config": {"endpoint": "POST /v1/search k=5 hybrid", "index": str(index),
                         "concurrency": args.concurrency, "seconds": args.seconds,
                         "rounds": args.rounds, "baseline_tree": str(args.baseline_tree)},
              "rounds": rows, "summary": summary,
              "cpu_ratio_per_round": [round(x, 4) for x in per_round],
              "cpu_ratio_median": round(float(np.median(per_round)), 4)}
    write_result(args.name, result)
    print(f"server CPU per request, current / baseline: median {result['cpu_ratio_median']:.3f}"
          f" (rounds {result['cpu_ratio_per_round']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
