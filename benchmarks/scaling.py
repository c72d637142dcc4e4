#!/usr/bin/env python
"""Scaling: index size 10k → 1M vectors x shards 1 → 8 on a LocalCluster of 2 workers.

For each (size, shards): build time, memory per shard (bytes the workers hold), QPS of
batched searches (batch 256) and recall@10 against exact search.  IVF-Flat with
nlist = 4 sqrt(n) (a power of two) and nprobe = nlist / 32, so each query scans ~1/32 of the
vectors and the work per query grows linearly with n; d = 128 synthetic clustered vectors
(1M x 384 would not build in minutes on 2 cores).  Writes benchmarks/results/scaling.json and .png.

    python benchmarks/scaling.py           # 10k, 100k, 1M x 1, 2, 4, 8 shards
    python benchmarks/scaling.py --quick   # 10k, 100k x 1, 2, 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, write_result
from dask_rag import DistributedIndex, IndexSpec
from dask_rag.cluster import start_local_cluster
from dask_rag.datasets import clustered_vectors, exact_search, recall_at_k


def shard_bytes(client: Any, index: DistributedIndex) -> list[int]:
    keys = {f.key for f in index.shard_futures}
    per_worker = client.run(lambda dask_worker: {
        str(k): int(dask_worker.state.tasks[k].nbytes or 0) for k in dask_worker.data
        if k in keys})
    return sorted(v for d in per_worker.values() for v in d.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--shards", default="1,2,4,8")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--nq", type=int, default=2048)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    shard_counts = [int(s) for s in args.shards.split(",")]
    if args.quick:
        sizes, shard_counts = [10_000, 100_000], [1, 2, 4]
    from distributed import Client

    rows = []
    x_all = clustered_vectors(max(sizes) + args.nq, args.dim, n_clusters=2000, seed=0)
    xq = x_all[-args.nq:]
    with start_local_cluster(2, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        for n in sizes:
            xb = x_all[:n]
            truth = exact_search(xb, xq, 10)[1]
            nlist = int(2 ** round(np.log2(4 * np.sqrt(n))))
            nprobe = max(8, nlist // 32)
            for s in shard_counts:
                spec = IndexSpec(factory=f"IVF{nlist},Flat", n_shards=s, nprobe=nprobe)
                t0 = time.perf_counter()
                index = DistributedIndex.build(client, xb, spec=spec)
                build_s = time.perf_counter() - t0
                index.search(xq[:256], 10)
                t0 = time.perf_counter()
                found = [index.search(xq[i:i + 256], 10)[1] for i in range(0, len(xq), 256)]
                search_s = time.perf_counter() - t0
                sizes_b = shard_bytes(client, index)
                row = {"n": n, "shards": s, "nlist": nlist, "nprobe": nprobe,
                       "build_s": round(build_s, 2), "qps": round(len(xq) / search_s, 1),
                       "recall_at_10": round(recall_at_k(np.concatenate(found), truth, 10), 4),
                       "shard_bytes_mean": int(np.mean(sizes_b)),
                       "shard_bytes_max": int(max(sizes_b))}
                rows.append(row)
                index.close()
                print(f"  n={n:>8} shards={s}: build {row['build_s']:>6.1f} s  "
                      f"{row['qps']:>8.1f} q/s  recall {row['recall_at_10']:.3f}  "
                      f"{row['shard_bytes_mean'] / 2**20:.1f} MiB/shard", flush=True)
    result = {"config": {"sizes": sizes, "shards": shard_counts, "dim": args.dim,
                         "nq": args.nq, "batch": 256, "workers": 2, "factory": "IVF{4 sqrt n},Flat",
                         "nprobe": "nlist / 32"}, "rows": rows}
    path = write_result("scaling_quick" if args.quick else "scaling", result, args.out)
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path}")
    return 0


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for s in sorted({r["shards"] for r in rows}):
        rs = [r for r in rows if r["shards"] == s]
        ns = [r["n"] for r in rs]
        axes[0].plot(ns, [r["qps"] for r in rs], "o-", label=f"{s} shards")
        axes[1].plot(ns, [r["build_s"] for r in rs], "o-", label=f"{s} shards")
        axes[2].plot(ns, [r["shard_bytes_mean"] / 2**20 for r in rs], "o-", label=f"{s} shards")
    for ax, title in zip(axes, ("search QPS (batch 256)", "build time (s)", "MiB per shard"),
                         strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("vectors")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
