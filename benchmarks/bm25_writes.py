#!/usr/bin/env python
"""What a write costs the BM25 searches that follow it, on one shard.

A write used to drop the shard's BM25 index; the next search rebuilt it from the records,
tokenizing every chunk — on every search that followed a write.  Now a write updates the
index in place (``SparseIndex.changed``: only the new chunks are tokenized).  This loads one
shard of ``--n`` text chunks (the Debian package descriptions of ``benchmarks/datasets``,
repeated as needed), times BM25 searches of one query with no write in between (p50), then
``--writes`` times: add one chunk (or remove one), time that write and the first search after
it.

    python -m benchmarks.bm25_writes [--n 50000] [--writes 20] [--out NAME]

Writes ``benchmarks/results/bm25_writes.json``; run from another checkout (the commit before
a change, ``--out``) to compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS_DIR, write_result

CORPUS = Path(__file__).resolve().parent / "datasets" / "debian-packages" / "corpus.jsonl"
QUERIES = ["library for parsing xml documents", "command line tool to convert images",
           "python bindings", "network monitoring daemon", "fonts"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--writes", type=int, default=20)
    p.add_argument("--out", default="bm25_writes")
    args = p.parse_args(argv)

    from distributed import Client

    from dask_rag import DistributedIndex, IndexSpec
    from dask_rag.cluster.workers import start_local_cluster
    from dask_rag.index.shard import ShardRef, load_shard
    from dask_rag.index.sparse import search_sparse
    from dask_rag.index.store import read_manifest

    base = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines()]
    texts = [f"{base[i % len(base)]} ({i // len(base)})" for i in range(args.n)]
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((args.n, 8)).astype(np.float32)

    def search(shard: object) -> float:
        t0 = time.perf_counter()
        search_sparse(shard, np.arange(1, dtype=np.int64),  # type: ignore[arg-type]
                      QUERIES[:1], 10, None)
        return (time.perf_counter() - t0) * 1e3

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "idx"
        print(f"building a shard of {args.n} chunks ...", file=sys.stderr)
        with start_local_cluster(1, dashboard_address=None) as cluster, Client(cluster) as c:
            DistributedIndex.build(c, xb, spec=IndexSpec(factory="Flat", n_shards=1),
                                   path=path, records=[{"text": t} for t in texts]).close()
        shard = load_shard(ShardRef(str(path), 0, read_manifest(str(path)).index_uuid))
        search(shard)
        steady = [search(shard) for _ in range(30)]
        write_ms, after_ms = [], []
        for w in range(args.writes):
            t0 = time.perf_counter()
            if w % 2 == 0:
                shard.add(rng.standard_normal((1, 8)).astype(np.float32),
                          np.array([10_000_000 + w], np.int64), [{"text": texts[w]}])
            else:
                shard.remove(np.array([w], np.int64))
            write_ms.append((time.perf_counter() - t0) * 1e3)
            after_ms.append(search(shard))
    payload = {"n": args.n, "writes": args.writes,
               "search_p50_ms_without_writes": round(statistics.median(steady), 3),
               "write_p50_ms": round(statistics.median(write_ms), 3),
               "first_search_after_a_write_p50_ms": round(statistics.median(after_ms), 3),
               "first_search_after_a_write_ms": [round(x, 2) for x in after_ms]}
    out = write_result(args.out, payload, out_dir=RESULTS_DIR)
    print(json.dumps({k: v for k, v in payload.items() if not isinstance(v, list)}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
