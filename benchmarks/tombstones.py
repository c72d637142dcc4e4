#!/usr/bin/env python
"""What removals cost an HNSW shard's searches until the next save compacts it.

An HNSW graph cannot drop a node: a removed id is a tombstone that the search's selector
leaves out.  Searches used to also build a list of every live id on each call — O(shard):
a 200k-vector shard searched in 0.1 ms went to 8.6 ms after 3 removals.  This builds one
HNSW shard of ``--n`` random vectors, then times single-query unfiltered searches (p50 of
``--queries``) with no tombstones, after a few removals and after 1 % of the shard, and an
upsert (an id removed and written again).

    python -m benchmarks.tombstones [--n 200000] [--dim 32] [--queries 300] [--out NAME]

Writes ``benchmarks/results/tombstones.json``; run with ``PYTHONPATH=<another checkout>``
(e.g. the commit before a change) and ``--out`` to compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, write_result


def _p50_ms(shard: Any, xq: np.ndarray, k: int) -> float:
    times = []
    for row in xq:
        t0 = time.perf_counter()
        shard.search(row[None, :], k)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--out", default="tombstones")
    args = p.parse_args(argv)

    from distributed import Client

    from dask_rag import DistributedIndex, IndexSpec
    from dask_rag.cluster.workers import start_local_cluster
    from dask_rag.index.shard import ShardRef, load_shard
    from dask_rag.index.store import read_manifest

    rng = np.random.default_rng(0)
    xb = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    xq = rng.standard_normal((args.queries, args.dim)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "idx"
        print(f"building an HNSW16 shard of {args.n} x {args.dim} ...", file=sys.stderr)
        with start_local_cluster(1, dashboard_address=None) as cluster, Client(cluster) as c:
            DistributedIndex.build(c, xb, spec=IndexSpec(factory="HNSW16", n_shards=1,
                                                         metric="l2"), path=path).close()
        shard = load_shard(ShardRef(str(path), 0, read_manifest(str(path)).index_uuid))
        rows: dict[str, Any] = {"none": _p50_ms(shard, xq, args.k)}
        shard.remove(np.array([5, 6, 7], dtype=np.int64))
        rows["3 removed"] = _p50_ms(shard, xq, args.k)
        shard.remove(rng.choice(args.n, args.n // 100, replace=False).astype(np.int64))
        rows["1 % removed"] = _p50_ms(shard, xq, args.k)
        shard.add(xb[[5]] * -1, np.array([5], dtype=np.int64))  # written again
        rows["1 % removed, 1 written again"] = _p50_ms(shard, xq, args.k)
    payload = {"n": args.n, "dim": args.dim, "queries": args.queries, "k": args.k,
               "search_p50_ms": rows,
               "slowdown_vs_none": {key: round(v / rows["none"], 2) for key, v in rows.items()}}
    out = write_result(args.out, payload, out_dir=RESULTS_DIR)
    print(json.dumps(payload, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
