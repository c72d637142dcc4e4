#!/usr/bin/env python
"""Sharded search throughput: DistributedIndex on a LocalCluster vs single-process faiss.

For each index family (Flat, IVF-Flat, IVF-PQ, HNSW, ScaNN) and batch size (1, 16, 256, 1024)
it measures QPS and per-batch p50/p99 latency of

* ``single``: one faiss (or ScaNN) index in this process, using the same total number of
  threads as the cluster has (2 here), and
* ``dask-rag``: a DistributedIndex of ``--shards`` shards on ``--workers`` single-threaded
  worker processes,

plus recall@10 against exact search and whether the two return identical ids.  It also measures
the round trip of an empty fan-out + merge graph with distributed's default comm intervals and
with dask-rag's tuned ones.  Writes ``benchmarks/results/search_throughput.json`` and ``.png``.

    python benchmarks/search_throughput.py            # 200k x 384, all factories
    python benchmarks/search_throughput.py --quick    # 50k x 384, a minute or two
    python benchmarks/search_throughput.py --index-dir .demo-index   # real embeddings
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    RESULTS_DIR,
    LatencyStats,
    measure_fanout_overhead,
    median_round,
    round_ratios,
    time_calls,
    time_concurrent,
    write_result,
)
from dask_rag import CommConfig, DistributedIndex, IndexSpec
from dask_rag.cluster import start_local_cluster
from dask_rag.cluster.plugins import tune_comms
from dask_rag.datasets import clustered_vectors, exact_search, recall_at_k, same_up_to_ties

DEFAULT_FACTORIES = ["Flat", "IVF1024,Flat", "IVF1024,PQ48", "HNSW32", "ScaNN"]


def load_index_vectors(path: Path) -> np.ndarray:
    """Vectors stored in an index directory (Flat / HNSW / IVF-Flat shards)."""
    import faiss

    from dask_rag.index import store

    manifest = store.read_manifest(path)
    parts = []
    for entry in manifest["shards"]:
        index = faiss.read_index(str(path / entry["file"]))
        if isinstance(index, faiss.IndexIDMap2):
            parts.append(index.index.reconstruct_n(0, index.ntotal))
        elif isinstance(index, faiss.IndexIVFFlat):
            # IVF-Flat codes are the raw float32 vectors: read every inverted list
            inv = index.invlists
            for lst in range(index.nlist):
                size = inv.list_size(lst)
                if size:
                    codes = faiss.rev_swig_ptr(inv.get_codes(lst), size * inv.code_size)
                    parts.append(np.frombuffer(bytes(codes), dtype=np.float32)
                                 .reshape(size, index.d))
        else:
            sys.exit(f"{path}: cannot read raw vectors from {type(index).__name__} shards")
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


class SingleProcess:
    """The baseline: one index in this process."""

    def __init__(self, factory: str, xb: np.ndarray, dist: DistributedIndex, nprobe: int,
                 ef_search: int, threads: int) -> None:
        import faiss

        from dask_rag.index.shard import configure_faiss

        faiss.omp_set_num_threads(threads)
        configure_faiss()  # the same BLAS threshold as the shards: compare sharding, not knobs
        self.factory = factory
        self.scann = None
        info = IndexSpec(factory=factory).info
        d = xb.shape[1]
        if info.kind == "ivf":
            self.index = faiss.read_index(str(dist.path / "quantizer.faiss"))  # same quantizer
            self.index.add(xb)
            self.index.nprobe = nprobe
        elif info.kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(d, info.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.add(xb)
            self.index.hnsw.efSearch = ef_search
        elif info.kind == "scann":
            import scann

            n = len(xb)
            leaves = max(1, int(np.sqrt(n)))
            self.scann = (scann.scann_ops_pybind.builder(xb, 10, "dot_product")
                          .tree(num_leaves=leaves, num_leaves_to_search=min(leaves, nprobe),
                                training_sample_size=min(n, 100_000))
                          .score_ah(2, anisotropic_quantization_threshold=0.2)
                          .reorder(100).build())
            self.scann.set_num_threads(threads)
        else:
            self.index = faiss.IndexFlatIP(d)
            self.index.add(xb)

    def search_dist(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.scann is not None:
            if len(xq) == 1:
                I, D = self.scann.search_batched(xq, final_num_neighbors=k)
            else:
                I, D = self.scann.search_batched_parallel(xq, final_num_neighbors=k)
            return np.asarray(D, dtype=np.float32), np.asarray(I, dtype=np.int64)
        return self.index.search(xq, k)

    def search(self, xq: np.ndarray, k: int) -> np.ndarray:
        return self.search_dist(xq, k)[1]


def bench_factory(client: Any, factory: str, xb: np.ndarray, xq: np.ndarray,
                  truth: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    spec = IndexSpec(factory=factory, n_shards=args.shards, nprobe=args.nprobe,
                     ef_search=args.ef_search, max_k=1024)
    t0 = time.perf_counter()
    dist = DistributedIndex.build(client, xb, spec=spec, progress=args.progress)
    build_dist = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = SingleProcess(factory, xb, dist, args.nprobe, args.ef_search, args.workers)
    build_single = time.perf_counter() - t0
    out: dict[str, Any] = {"factory": factory, "sharding": spec.resolved_sharding,
                           "build_s": {"dask-rag": round(build_dist, 2),
                                       "single": round(build_single, 2)},
                           "batches": {}}
    try:
        res_d = [dist.search(xq[i:i + 256], 10) for i in range(0, len(xq), 256)]
        res_s = [single.search_dist(xq[i:i + 256], 10) for i in range(0, len(xq), 256)]
        D_dist, I_dist = (np.concatenate(p) for p in zip(*res_d, strict=True))
        D_single, I_single = (np.concatenate(p) for p in zip(*res_s, strict=True))
        out["recall_at_10"] = {"dask-rag": round(recall_at_k(I_dist, truth, 10), 4),
                               "single": round(recall_at_k(I_single, truth, 10), 4)}
        out["identical_to_single"] = bool(np.array_equal(I_dist, I_single))
        # faiss orders exactly tied distances arbitrarily, dask-rag by id: compare modulo that
        out["identical_up_to_tie_order"] = bool(same_up_to_ties(D_dist, I_dist, D_single,
                                                                I_single))
        out["rows_differing"] = int((I_dist != I_single).any(axis=1).sum())
        for bs in args.batch_sizes:
            n_batches = max(3, min(args.max_batches, args.queries_per_point // bs))
            batches = [xq[(i * bs) % len(xq):][:bs] for i in range(n_batches)]
            batches = [b if len(b) == bs else xq[:bs] for b in batches]
            # alternate the systems round by round so the VM's drift between minutes hits
            # them alike; each reports its median-QPS round, speedups are per-round medians
            calls = {"single": lambda i, b=batches: single.search(b[i % len(b)], 10),
                     "dask-rag": lambda i, b=batches: dist.search(b[i % len(b)], 10)}
            runs: dict[str, list[dict[str, Any]]] = {
                "single": [], "dask-rag": [], "dask-rag-pipelined": []}
            for _ in range(args.rounds):
                for name, fn in calls.items():
                    runs[name].append(time_calls(fn, n_batches, bs,
                                                 min_seconds=args.min_seconds).to_dict())
                # the service keeps 2 batches in flight (BatchConfig.max_concurrent_batches):
                # the next batch's scheduling overlaps this one's compute.  A single faiss
                # process already uses every core, so concurrency cannot help it.
                runs["dask-rag-pipelined"].append(time_concurrent(
                    calls["dask-rag"], n_batches, bs, concurrency=2,
                    min_seconds=args.min_seconds).to_dict())
            row: dict[str, Any] = {name: median_round(rs) for name, rs in runs.items()}
            for key, name in (("speedup", "dask-rag"), ("speedup_pipelined",
                                                          "dask-rag-pipelined")):
                ratios = round_ratios(runs[name], runs["single"])
                row[key] = float(np.median(ratios))
                row[f"{key}_rounds"] = ratios
            out["batches"][str(bs)] = row
            print(f"  {factory:>14} batch {bs:>5}: single {row['single']['qps']:>8.1f} q/s "
                  f"p50 {row['single']['p50_ms']:>7.2f} ms | dask-rag "
                  f"{row['dask-rag']['qps']:>8.1f} q/s p50 {row['dask-rag']['p50_ms']:>7.2f} ms"
                  f" x{row['speedup']:.2f} | pipelined {row['dask-rag-pipelined']['qps']:>8.1f}"
                  f" q/s x{row['speedup_pipelined']:.2f}", flush=True)
    finally:
        dist.close()
    return out


def bench_fanout(client: Any, part_counts: list[int], iterations: int, rounds: int = 3
                 ) -> dict[str, Any]:
    """Empty fan-out + merge round trips: comm intervals x parts x where the merge runs.

    Default and tuned intervals alternate for ``rounds`` rounds (this VM drifts between
    minutes); each cell reports the round with the median p50 and every round's p50.
    """
    configs = (("default", CommConfig.distributed_defaults()), ("tuned", CommConfig()))
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {name: {} for name, _ in configs}
    for r in range(rounds):
        for name, comms in configs:
            tune_comms(client, comms)
            time.sleep(0.2)
            for n_parts in part_counts:
                for where in ("merge_task", "client_merge"):
                    stats: LatencyStats = measure_fanout_overhead(
                        client, n_parts=n_parts, iterations=iterations,
                        client_merge=where == "client_merge")
                    samples[name].setdefault(f"{n_parts}_parts_{where}", []).append(
                        stats.to_dict())
                    print(f"  round {r + 1} empty fan-out {n_parts} parts + {where:<12} "
                          f"{name:>7} comms: p50 {stats.p50_ms:6.2f} ms  "
                          f"p99 {stats.p99_ms:6.2f} ms", flush=True)
    tune_comms(client, CommConfig())
    res: dict[str, Any] = {}
    for name, comms in configs:
        res[name] = {"intervals_ms": comms.__dict__}
        for cell, rows in samples[name].items():
            res[name][cell] = median_round(rows, "p50_ms")
    return res


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, fr in enumerate(result["factories"]):
        bs = sorted(int(b) for b in fr["batches"])
        for name, style in (("dask-rag-pipelined", "-"), ("dask-rag", ":"), ("single", "--")):
            qps = [fr["batches"][str(b)][name]["qps"] for b in bs]
            ax1.plot(bs, qps, style, marker="o", color=colors[i % len(colors)],
                     label=f"{fr['factory']} ({name})")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("batch size (queries)")
    ax1.set_ylabel("queries / s")
    cfg = result["config"]
    ax1.set_title(f"{cfg['n']:,} x {cfg['dim']}: {cfg['shards']} shards on {cfg['workers']} "
                  "workers (solid: 2 batches in flight, dotted: 1) vs one faiss process (dashed)",
                  fontsize=9)
    ax1.legend(fontsize=7, ncol=2)
    ax1.grid(True, which="both", alpha=0.3)
    fo = result["fanout_overhead"]
    variants = [k for k in fo["tuned"] if k != "intervals_ms"]
    xs = np.arange(len(variants))
    for j, (name, color) in enumerate((("default", "#999999"), ("tuned", "#2a7"))):
        ax2.bar(xs + (j - 0.5) * 0.4, [fo[name][v]["p50_ms"] for v in variants], width=0.4,
                color=color, label=f"{name} comm intervals")
    ax2.set_xticks(xs, [v.replace("_parts_", " parts\n").replace("_", " ") for v in variants],
                   fontsize=7)
    ax2.set_ylabel("p50 round trip (ms)")
    ax2.set_title("empty fan-out + merge")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200_000, help="database vectors")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--nq", type=int, default=2048, help="distinct query vectors")
    p.add_argument("--factories", default=";".join(DEFAULT_FACTORIES),
                   help="';'-separated factory strings (commas belong to a factory)")
    p.add_argument("--batch-sizes", default="1,16,256,1024")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--ef-search", type=int, default=64)
    p.add_argument("--queries-per-point", type=int, default=2048)
    p.add_argument("--max-batches", type=int, default=200)
    p.add_argument("--min-seconds", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3,
                   help="alternations of single-process and dask-rag per batch size")
    p.add_argument("--fanout-iterations", type=int, default=300)
    p.add_argument("--fanout-rounds", type=int, default=3)
    p.add_argument("--fanout-only", action="store_true",
                   help="only the empty fan-out + merge overhead (writes <name>_fanout.json)")
    p.add_argument("--index-dir", type=Path, help="benchmark the vectors of this index instead")
    p.add_argument("--quick", action="store_true", help="50k vectors, shorter runs")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--name", default="search_throughput")
    args = p.parse_args(argv)
    factories = _split_factories(args.factories)
    if args.fanout_only:
        return fanout_only(args)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.quick:
        args.n, args.nq, args.min_seconds, args.queries_per_point = 50_000, 1024, 1.0, 1024
        args.fanout_iterations = 150
        factories = [f.replace("IVF1024", "IVF256") for f in factories]

    from distributed import Client

    if args.index_dir:
        x = load_index_vectors(args.index_dir)
        rng = np.random.default_rng(0)
        xq = x[rng.choice(len(x), size=min(args.nq, len(x)), replace=False)]
        xq = xq + 0.05 * rng.standard_normal(xq.shape).astype(np.float32)
        xq /= np.linalg.norm(xq, axis=1, keepdims=True)
        xb = x
        source = str(args.index_dir)
    else:
        x = clustered_vectors(args.n + args.nq, args.dim, n_clusters=1000, seed=0)
        xb, xq = x[:args.n], x[args.n:]
        source = "synthetic clustered (1000 centres, unit norm)"
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    print(f"database {xb.shape}, queries {xq.shape}, source: {source}", flush=True)
    truth = exact_search(xb, xq, 10)[1]

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    results = []
    with start_local_cluster(args.workers, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        fanout = bench_fanout(client, sorted({args.workers, args.shards}),
                              args.fanout_iterations, args.fanout_rounds)
        for factory in factories:
            print(f"{factory}:", flush=True)
            results.append(bench_factory(client, factory, xb, xq, truth, args))
    result = {
        "config": {"n": len(xb), "dim": int(xb.shape[1]), "nq": len(xq),
                   "source": source, "shards": args.shards, "workers": args.workers,
                   "threads_per_worker": 1, "single_process_threads": args.workers,
                   "nprobe": args.nprobe, "ef_search": args.ef_search, "k": 10,
                   "batch_sizes": args.batch_sizes},
        "fanout_overhead": fanout,
        "factories": results,
    }
    path = write_result(args.name, result, args.out)
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def fanout_only(args: argparse.Namespace) -> int:
    from distributed import Client

    with start_local_cluster(args.workers, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        fanout = bench_fanout(client, sorted({args.workers, args.shards}),
                              args.fanout_iterations, args.fanout_rounds)
    path = write_result(f"{args.name}_fanout", {
        "config": {"workers": args.workers, "threads_per_worker": 1,
                   "iterations": args.fanout_iterations, "rounds": args.fanout_rounds},
        "fanout_overhead": fanout}, args.out)
    print(f"wrote {path}")
    return 0


def _split_factories(text: str) -> list[str]:
    """'Flat;IVF1024,Flat' style lists: ';' separates factories (commas belong to them)."""
    return [f.strip() for f in text.split(";") if f.strip()]


if __name__ == "__main__":
    sys.exit(main())
