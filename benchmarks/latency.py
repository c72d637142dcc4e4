#!/usr/bin/env python
"""Latency of one request at a time: dask-rag against an in-process peer, in one run.

The peer is what a user would write without dask-rag: the same model through
sentence-transformers at fp32 in this process, and ``faiss.IndexFlatIP`` over the index's own
vectors (read from its shard files), one query at a time.  dask-rag arms, on a LocalCluster of
2 worker processes holding the same index:

* ``dense`` / ``hybrid`` / ``ask``: ``RagPipeline.search`` / ``search(mode="hybrid")`` /
  ``ask`` from Python (one graph per call);
* ``http_dense`` / ``http_hybrid``: ``POST /v1/search`` over HTTP at concurrency 1 (a real
  uvicorn server in this process, the micro-batcher on).

Every arm answers the same questions, one after another; the arms alternate in rounds (this
VM's speed drifts), and the report gives each round's p50 and p99 and the median over rounds,
and each round's ratio to the peer.  Writes ``benchmarks/results/latency.json``.

    python -m benchmarks.latency [--index .demo-index] [--rounds 5] [--n 60]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, LatencyStats, require_demo_index, write_result

ROOT = Path(__file__).resolve().parent.parent


def questions(n: int) -> list[str]:
    from dask_rag.corpus.demo import DEMO_QUESTIONS, stdlib_documents

    names = sorted({d.source for d in stdlib_documents(["json", "csv", "functools", "os",
                                                        "itertools", "collections", "re"])})
    rng = np.random.default_rng(1)
    forms = ["What does {} do?", "How do I use {}?", "When should I call {}?"]
    picked = [forms[i % 3].format(names[j]) for i, j in
              enumerate(rng.choice(len(names), n, replace=False))]
    return (list(DEMO_QUESTIONS) + picked)[:n]


class Peer:
    """sentence-transformers fp32 + faiss.IndexFlatIP in this process."""

    def __init__(self, index_dir: Path) -> None:
        import faiss
        from sentence_transformers import SentenceTransformer

        from dask_rag.embed.encoder import default_model_path
        from dask_rag.index import store

        manifest = store.read_manifest(index_dir)
        parts = []
        for entry in manifest["shards"]:
            shard = faiss.read_index(str(index_dir / entry["file"]))
            parts.append(shard.index.reconstruct_n(0, shard.ntotal))
        self.xb = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
        self.index = faiss.IndexFlatIP(self.xb.shape[1])
        self.index.add(self.xb)
        self.model = SentenceTransformer(default_model_path(), device="cpu")

    def search(self, q: str) -> Any:
        v = self.model.encode([q], normalize_embeddings=True, convert_to_numpy=True)
        return self.index.search(np.asarray(v, dtype=np.float32), 10)


def timed(fn: Callable[[str], Any], qs: list[str]) -> list[float]:
    out = []
    for q in qs:
        t0 = time.perf_counter()
        fn(q)
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--index", type=Path, default=ROOT / ".demo-index")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n", type=int, default=60, help="questions per arm and round")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)

    import httpx
    from distributed import Client

    from dask_rag.cluster import start_local_cluster
    from dask_rag.config import RagConfig, ServeConfig
    from dask_rag.pipeline import RagPipeline
    from dask_rag.serve import ServerThread, create_app
    from dask_rag.serve.server import free_port

    require_demo_index(args.index)
    qs = questions(args.n)
    peer = Peer(args.index)
    with start_local_cluster(2, dashboard_address=None) as cluster, Client(cluster) as client, \
            RagPipeline.from_index_dir(client, args.index, RagConfig(k=10)) as pipe:
        pipe.warmup()
        config = ServeConfig(port=free_port())
        with ServerThread(create_app(pipe, config), config) as srv, \
                httpx.Client(base_url=srv.url, timeout=60) as http:
            arms: dict[str, Callable[[str], Any]] = {
                "peer": peer.search,
                "dense": lambda q: pipe.search(q, k=10, mode="dense"),
                "hybrid": lambda q: pipe.search(q, k=10, mode="hybrid"),
                "ask": lambda q: pipe.ask(q),
                "http_dense": lambda q: http.post("/v1/search", json={
                    "query": q, "k": 10, "mode": "dense"}).raise_for_status(),
                "http_hybrid": lambda q: http.post("/v1/search", json={
                    "query": q, "k": 10}).raise_for_status(),
            }
            for fn in arms.values():  # warm every path (models, caches, connections)
                timed(fn, qs[:5])
            rounds: list[dict[str, Any]] = []
            for r in range(args.rounds):
                row = {name: LatencyStats.from_samples(timed(fn, qs), len(qs)).to_dict()
                       for name, fn in arms.items()}
                rounds.append(row)
                print(f"round {r}: " + ", ".join(f"{k} {v['p50_ms']:.1f}"
                                                 for k, v in row.items()), flush=True)
    summary = {}
    for name in arms:
        p50 = [rd[name]["p50_ms"] for rd in rounds]
        p99 = [rd[name]["p99_ms"] for rd in rounds]
        ratio = [rd[name]["p50_ms"] / rd["peer"]["p50_ms"] for rd in rounds]
        summary[name] = {"p50_ms": round(float(np.median(p50)), 2),
                         "p99_ms": round(float(np.median(p99)), 2),
                         "p50_vs_peer": round(float(np.median(ratio)), 3),
                         "p50_vs_peer_rounds": [round(x, 3) for x in ratio]}
    for name, s in summary.items():
        print(f"{name:12s} p50 {s['p50_ms']:7.2f} ms  p99 {s['p99_ms']:7.2f} ms  "
              f"x peer {s['p50_vs_peer']:.3f}  rounds {s['p50_vs_peer_rounds']}")
    path = write_result("latency", {
        "config": {"index": str(args.index), "questions": len(qs), "rounds": args.rounds,
                   "k": 10, "workers": 2,
                   "peer": "sentence-transformers fp32 + faiss.IndexFlatIP, this process"},
        "summary": summary, "rounds": rounds}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
