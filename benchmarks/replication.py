#!/usr/bin/env python
"""Replicas: search throughput at 64 clients and recovery after a worker kill, R = 1 vs R = 2.

One Flat index (``--n`` Gaussian vectors, ``--shards`` shards) stored in an S3-compatible
server (moto, on loopback) and served by ``--workers`` single-threaded worker processes, each
on its own loopback address with a private directory (:mod:`benchmarks.hosts`: no shared
filesystem, no nanny — a killed worker stays dead, as a lost machine would).  It is loaded
with ``replicas=1`` and ``replicas=2`` in alternated rounds:

* **QPS**: ``--clients`` threads each searching one query at a time for ``--seconds``;
  the median round per R, and the ratio R2/R1 round by round (same minute, same VM drift).
* **Recovery**: searches stream from 8 threads; one worker holding shards is SIGKILLed.
  ``complete_again_s`` is the time from the kill until the first search *started after the
  kill* returns complete results (every shard answered) — with R = 1 it waits for the lost
  shards to be downloaded and loaded again on a survivor; also the slowest search around the
  kill, failures, and wrong answers (checked against exact search).  A replacement worker
  joins before the next trial.

Writes benchmarks/results/replication.json and replication.png.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, median_round, round_ratios, time_concurrent, write_result
from benchmarks.hosts import Hosts, MotoS3


def _qps(index: Any, xq: np.ndarray, clients: int, seconds: float) -> dict[str, Any]:
    stats = time_concurrent(lambda i: index.search(xq[i % len(xq): i % len(xq) + 1], 10),
                            n_calls=clients, items_per_call=1, concurrency=clients,
                            min_seconds=seconds)
    return stats.to_dict()


def _kill_trial(client: Any, hosts: Hosts, index: Any, xq: np.ndarray, expected: np.ndarray,
                before_s: float = 2.0, after_s: float = 8.0) -> dict[str, Any]:
    timeline: list[tuple[float, float, str]] = []
    stop = threading.Event()

    def stream(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            i = int(rng.integers(len(xq)))
            t0 = time.monotonic()
            try:
                ids = index.search(xq[i:i + 1], 10)[1]
                outcome = "ok" if np.array_equal(ids[0], expected[i]) else "wrong"
            except Exception as exc:  # counted, never expected
                outcome = f"failed: {type(exc).__name__}"
            timeline.append((t0, time.monotonic(), outcome))

    threads = [threading.Thread(target=stream, args=(s,), daemon=True) for s in range(8)]
    for t in threads:
        t.start()
    time.sleep(before_s)
    holder = index.shard_locations()[0][0]
    host_no = int(holder.split("//")[1].split(":")[0].rsplit(".", 1)[1])
    t_kill = time.monotonic()
    hosts.kill_worker(host_no)
    time.sleep(after_s)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    after = [(a, b, o) for a, b, o in timeline if a >= t_kill]
    around = [b - a for a, b, _ in timeline if b >= t_kill and a <= t_kill + 2.0]
    normal = [b - a for a, b, _ in timeline if b < t_kill]
    first_after = min(after, key=lambda r: r[1]) if after else None
    return {
        "searches": len(timeline),
        "failed": sum(o.startswith("failed") for *_, o in timeline),
        "wrong": sum(o == "wrong" for *_, o in timeline),
        "in_flight_at_kill": sum(1 for a, b, _ in timeline if a < t_kill < b),
        "complete_again_s": None if first_after is None else round(first_after[1] - t_kill, 3),
        "slowest_around_kill_ms": round(1000 * max(around), 1) if around else None,
        "searches_over_5s": sum(1 for a, b, _ in timeline if b - a > 5.0),
        "slowest_search_ms": round(1000 * max(b - a for a, b, _ in timeline), 1)
        if timeline else None,
        "p50_before_kill_ms": round(1000 * float(np.median(normal)), 2) if normal else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=600_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--replicas", default="1,2",
                   help="replication factors to compare, alternated per round (e.g. '2' for "
                        "kill trials with replicas only)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)

    from distributed import Client

    from dask_rag import DistributedIndex, IndexSpec
    from dask_rag.datasets import exact_search

    rng = np.random.default_rng(0)
    xb = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    xq = rng.standard_normal((256, args.dim)).astype(np.float32)
    expected = exact_search(xb, xq, 10)[1]
    factors = [int(r) for r in args.replicas.split(",")]
    qps: dict[int, list[dict[str, Any]]] = {r: [] for r in factors}
    kills: dict[int, list[dict[str, Any]]] = {r: [] for r in factors}
    url = "s3://dask-rag-bench/replication"
    with MotoS3() as s3, Hosts(args.workers, env=s3.env) as hosts, \
            Client(hosts.address, timeout=60) as client:
        s3.filesystem().mkdir("dask-rag-bench")
        client.wait_for_workers(args.workers, timeout=120)
        DistributedIndex.build(client, xb, spec=IndexSpec(n_shards=args.shards), path=url,
                               progress=True).close()
        for rnd in range(args.rounds):
            for r in (factors if rnd % 2 == 0 else factors[::-1]):
                with DistributedIndex.load(client, url, replicas=r) as index:
                    index.search(xq[:8], 10)
                    qps[r].append(_qps(index, xq, args.clients, args.seconds))
                    print(f"round {rnd} R={r}: {qps[r][-1]['qps']:.1f} q/s", flush=True)
                    kills[r].append(_kill_trial(client, hosts, index, xq, expected))
                    print(f"round {rnd} R={r} kill: {kills[r][-1]}", flush=True)
                hosts.add_worker()  # a replacement machine for the next trial
                client.wait_for_workers(args.workers, timeout=120)

    def med(rows: list[dict[str, Any]], key: str) -> float | None:
        vals = [row[key] for row in rows if row[key] is not None]
        return float(np.median(vals)) if vals else None

    payload = {
        "config": vars(args) | {"out": str(args.out), "factory": "Flat",
                                "storage": "moto S3 server on 127.0.0.1",
                                "workers": f"{args.workers} processes, own loopback "
                                           "address and private directory, no nanny"},
        "qps": {f"R{r}": median_round(rows) for r, rows in qps.items()},
        "qps_ratio_R2_over_R1_rounds": round_ratios(qps[2], qps[1])
        if 1 in qps and 2 in qps else None,
        "kill": {f"R{r}": {"trials": rows,
                           "complete_again_s_median": med(rows, "complete_again_s"),
                           "slowest_around_kill_ms_median": med(rows, "slowest_around_kill_ms"),
                           "slowest_around_kill_ms_max": max(
                               (row["slowest_around_kill_ms"] or 0 for row in rows), default=None),
                           "searches_over_5s": sum(row["searches_over_5s"] for row in rows),
                           "failed": sum(row["failed"] for row in rows),
                           "wrong": sum(row["wrong"] for row in rows)}
                 for r, rows in kills.items()},
    }
    path = write_result("replication", payload, args.out)
    _plot(payload, args.out / "replication.png")
    print(f"wrote {path}")
    return 0


def _plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    keys = sorted(payload["kill"])
    labels = [k.replace("R", "R=") for k in keys]
    colors = ["#888", "#36c", "#6a3"][:len(keys)]
    a.bar(labels, [payload["qps"][k]["qps"] for k in keys], color=colors)
    a.set_title("search q/s, 64 clients")
    for i, k in enumerate(keys):  # every trial's slowest search around its kill
        slowest = [t["slowest_around_kill_ms"] or 0 for t in payload["kill"][k]["trials"]]
        b.plot([i] * len(slowest), [v / 1000 for v in slowest], "o", color=colors[i])
    b.set_xticks(range(len(keys)), labels)
    b.set_ylabel("s")
    b.set_title("slowest search around each worker kill")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
