#!/usr/bin/env python
"""Server CPU per ``POST /v1/search``: this checkout against another (the commit before a
change), both served by ``dask-rag serve`` at once and loaded in alternating rounds.

The figure is the server process's own CPU time (user + system, from ``psutil``; its
scheduler and workers run in other processes) divided by the requests it answered: what the
HTTP shim, the request models, the micro-batcher and the Dask client cost per request.  The
same is recorded for the whole serving tree by role (scheduler, nannies, worker processes):
on 2 shared cores, throughput follows the tree's total CPU per request.

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


def role(proc: Any) -> str:
    """What a process of a ``dask-rag serve`` tree is, from its command line."""
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:  # exited meanwhile
        return "other"
    for name, marker in (("scheduler", "distributed.Scheduler"), ("nanny", "distributed.Nanny"),
                         ("workers", "spawn_main")):
        if marker in cmd:
            return name
    return "other"


def tree_cpu(root: Any) -> dict[str, float]:
    """CPU seconds (user + system) so far of a server process and of its descendants by role:
    the server itself (HTTP, request models, micro-batcher, Dask client), its scheduler, the
    nannies and the worker processes."""
    out = {"server": 0.0, "scheduler": 0.0, "nanny": 0.0, "workers": 0.0, "other": 0.0}
    for i, proc in enumerate([root, *root.children(recursive=True)]):
        try:
            t = proc.cpu_times()
        except Exception:
            continue
        out["server" if i == 0 else role(proc)] += t.user + t.system
    return out


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
                t0 = tree_cpu(procs[name])
                row = await closed_loop(senders[name], qs, concurrency, seconds)
                t1 = tree_cpu(procs[name])
                per = {k: round(1e3 * (t1[k] - t0[k]) / max(1, row["n"]), 4) for k in t0}
                row["server_cpu_ms_per_request"] = per["server"]
                row["cpu_ms_per_request"] = per
                out[name].append(row)
                print(f"  round {r + 1} {name:>9}: {row['qps']:7.1f} q/s, CPU ms/request "
                      + ", ".join(f"{k} {v:.3f}" for k, v in per.items())
                      + f", errors {row['errors']}", flush=True)
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
                      "tree_cpu_ms_per_request_median": {
                          role: float(np.median([r["cpu_ms_per_request"][role] for r in rs]))
                          for role in rs[0]["cpu_ms_per_request"]},
                      "total_cpu_ms_per_request_median": float(np.median(
                          [sum(r["cpu_ms_per_request"].values()) for r in rs])),
                      "qps_median": float(np.median([r["qps"] for r in rs]))}
               for name, rs in rows.items()}
    total_ratio = [sum(c["cpu_ms_per_request"].values()) / sum(b["cpu_ms_per_request"].values())
                   for c, b in zip(rows["current"], rows["baseline"], strict=True)]
    qps_ratio = [c["qps"] / b["qps"] for c, b in zip(rows["current"], rows["baseline"],
                                                       strict=True)]
    result = {"config": {"endpoint": "POST /v1/search k=5 hybrid", "index": str(index),
                         "concurrency": args.concurrency, "seconds": args.seconds,
                         "rounds": args.rounds, "baseline_tree": str(args.baseline_tree)},
              "rounds": rows, "summary": summary,
              "cpu_ratio_per_round": [round(x, 4) for x in per_round],
              "cpu_ratio_median": round(float(np.median(per_round)), 4),
              "total_cpu_ratio_per_round": [round(x, 4) for x in total_ratio],
              "total_cpu_ratio_median": round(float(np.median(total_ratio)), 4),
              "qps_ratio_per_round": [round(x, 4) for x in qps_ratio],
              "qps_ratio_median": round(float(np.median(qps_ratio)), 4)}
    write_result(args.name, result)
    print(f"server CPU per request, current / baseline: median {result['cpu_ratio_median']:.3f}"
          f" (rounds {result['cpu_ratio_per_round']}); whole tree (server, scheduler, nannies, "
          f"workers): median {result['total_cpu_ratio_median']:.3f} (rounds "
          f"{result['total_cpu_ratio_per_round']}); q/s median {result['qps_ratio_median']:.3f}"
          f" (rounds {result['qps_ratio_per_round']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
