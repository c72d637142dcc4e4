"""The A/B pipeline benchmark (``dask-rag bench``, ``python -m benchmarks.ab_pipeline``).

Same corpus (the built-in stdlib docs), same queries (short, medium and long), same machine:

* **baseline** — fp32 encoder, one request at a time, exact ``IndexFlatIP`` search in this
  process, extractive generation one prompt at a time;
* **optimized** — the default (fp32 on ONNX Runtime, batch-invariant) encoder,
  micro-batching (concurrent requests share one graph per batch), IVF-PQ with exact refine
  sharded on the Dask cluster, the async batched pipeline (``RagPipeline.aask`` with 128
  closed-loop clients);
* one **ablation** row per optimization applied alone to the baseline.

Every row runs once per round, the rows' order rotating from round to round, and the
extractive generator's caches (here and on the workers) are cleared before every row: no row
gains from one that ran before it.  A row's figures are its median round; its speedup is the
median of its per-round ratios to the baseline *of the same round* (this VM drifts by
+-20 % between minutes), with every round's ratio reported.  Columns: embed / search /
generate p50 and p99 (ms), end-to-end QPS, recall@10 of the retrieved chunks against exact
search with fp32 query vectors.  Writes JSON (config, versions, machine, every round), a
Markdown table and a PNG under ``benchmarks/results/``; ``--cost`` adds $/1M queries.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, machine_info, versions

__all__ = ["main", "run_ab"]


def _pct(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan")}
    arr = np.asarray(values, dtype=np.float64)
    return {"p50": round(float(np.percentile(arr, 50)), 3),
            "p99": round(float(np.percentile(arr, 99)), 3)}


def _recall(found: Sequence[Sequence[int]], truth: Sequence[Sequence[int]], k: int = 10) -> float:
    hits = [len(set(f[:k]) & set(t[:k])) / max(1, min(k, len(t))) for f, t in
            zip(found, truth, strict=True)]
    return round(float(np.mean(hits)), 4)


def query_sets(docs: Sequence[Any], n_per: int) -> dict[str, list[str]]:
    """Short (<= 8 words), medium (9-20) and long (> 20) queries from the corpus itself."""
    from dask_rag.corpus.chunking import split_sentences
    from dask_rag.corpus.demo import DEMO_QUESTIONS

    short, medium, long_ = list(DEMO_QUESTIONS), [], []
    for d in docs:
        body = " ".join(d.text.split("\n\n", 1)[-1].split())
        sents = split_sentences(body)
        if not sents:
            continue
        first = sents[0]
        words = len(first.split())
        if 4 <= words <= 8:
            short.append(first)
        elif 9 <= words <= 20:
            medium.append(first)
        if len(body.split()) > 40:
            long_.append(" ".join(body.split()[:60]))
    rng = np.random.default_rng(0)

    def pick(xs: list[str]) -> list[str]:
        xs = sorted(set(xs))
        idx = rng.choice(len(xs), size=min(n_per, len(xs)), replace=False)
        return [xs[i] for i in sorted(idx)]

    return {"short": pick(short), "medium": pick(medium), "long": pick(long_)}


class _Corpus:
    """Chunks + fp32 vectors + the in-process exact index (shared by every row)."""

    def __init__(self, docs: Sequence[Any]) -> None:
        import faiss

        from dask_rag.config import EmbedConfig
        from dask_rag.corpus.chunking import chunk_documents
        from dask_rag.embed.encoder import SentenceEncoder

        # the naive baseline: sentence-transformers as a user would call it (torch fp32)
        self.enc32 = SentenceEncoder(EmbedConfig(precision="fp32", backend="torch"))
        self.chunks = chunk_documents(docs, self.enc32.count_tokens)
        t0 = time.perf_counter()
        self.xb = self.enc32.encode([c.text for c in self.chunks])
        self.ingest_s = time.perf_counter() - t0
        self.ids = np.array([c.id for c in self.chunks], dtype=np.int64)
        self.flat = faiss.IndexIDMap2(faiss.IndexFlatIP(self.xb.shape[1]))
        self.flat.add_with_ids(self.xb, self.ids)
        self.by_id = {c.id: c for c in self.chunks}


def _hits_for(corpus: _Corpus, I: np.ndarray, D: np.ndarray) -> list[Any]:
    from dask_rag.pipeline import Hit

    return [Hit(int(i), float(d), corpus.by_id[int(i)].text, corpus.by_id[int(i)].source)
            for i, d in zip(I, D, strict=True) if i >= 0]


def _sequential_row(name: str, corpus: _Corpus, queries: list[str], encoder: Any,
                    index: Any, gen: Any, batch: int = 1) -> dict[str, Any]:
    """One process, ``batch`` requests at a time (1 = the naive baseline)."""
    from dask_rag.rag.generate import SamplingParams
    from dask_rag.rag.prompt import build_prompt

    params = SamplingParams()
    embed_ms, search_ms, gen_ms, found = [], [], [], []
    t_start = time.perf_counter()
    for i in range(0, len(queries), batch):
        qs = queries[i:i + batch]
        t0 = time.perf_counter()
        xq = encoder.encode(qs)
        t1 = time.perf_counter()
        D, I = index.search(xq, 10)
        t2 = time.perf_counter()
        prompts = [build_prompt(q, _hits_for(corpus, I[j][:5], D[j][:5]), gen.count_tokens,
                                1024).text for j, q in enumerate(qs)]
        gen.generate(prompts, params)
        t3 = time.perf_counter()
        for _ in qs:  # per-request latency of each stage (a batch's time, as its caller sees)
            embed_ms.append((t1 - t0) * 1e3)
            search_ms.append((t2 - t1) * 1e3)
            gen_ms.append((t3 - t2) * 1e3)
        found.extend(I.tolist())
    total = time.perf_counter() - t_start
    return {"name": name, "embed_ms": _pct(embed_ms), "search_ms": _pct(search_ms),
            "generate_ms": _pct(gen_ms), "qps": round(len(queries) / total, 2),
            "_found": found}


def _pipeline_row(name: str, pipe: Any, queries: list[str], concurrency: int,
                  id_of: Callable[[Any], int], passes: int = 1) -> dict[str, Any]:
    """The Dask pipeline driven by ``concurrency`` closed-loop clients (1 = no batching),
    through the query set ``passes`` times so that the throughput is the steady state's, not
    the ramp-up's (the generator's caches warm up within a row's passes; the last pass's
    answers are scored)."""
    answers: list[Any] = [None] * len(queries)

    async def main() -> float:
        order = iter(range(len(queries) * passes))

        async def client() -> None:
            for j in order:
                i = j % len(queries)
                answers[i] = await pipe.aask(queries[i], k=10, mode="dense")

        pipe.batchers()["ask"].reopen()
        await pipe.aask(queries[0], k=10, mode="dense")  # warm the batchers and models
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        await pipe.aclose()
        return elapsed

    total = asyncio.run(main())
    t = {s: [a.timings_ms.get(s, 0.0) for a in answers] for s in ("embed", "search",
                                                                    "generate", "total")}
    return {"name": name, "embed_ms": _pct(t["embed"]), "search_ms": _pct(t["search"]),
            "generate_ms": _pct(t["generate"]), "qps": round(len(queries) * passes / total, 2),
            "passes": passes, "_found": [[id_of(h) for h in a.hits] for a in answers],
            "mean_batch": round(pipe.batchers()["ask"].stats.mean_batch, 1)}


def clear_generation_caches() -> None:
    """The extractive generator's memoised terms, stems and token counts (they make a later
    row that answers the same questions cheaper than the first)."""
    from dask_rag.rag.generate import extractive

    for cached in (extractive._terms, extractive._stem, extractive._count_tokens):
        cached.cache_clear()


def _summarise(name: str, rounds: list[dict[str, Any]], base_rounds: list[dict[str, Any]]
               ) -> dict[str, Any]:
    """A row's median round (its own figures kept together), and its per-round ratios."""
    ranked = sorted(rounds, key=lambda r: r["qps"])
    median = dict(ranked[(len(ranked) - 1) // 2])
    ratios = [round(r["qps"] / b["qps"], 3) for r, b in zip(rounds, base_rounds, strict=True)]
    median.update(name=name, qps_rounds=[r["qps"] for r in rounds],
                  speedup=round(float(np.median(ratios)), 2), speedup_rounds=ratios)
    return median


def run_ab(quick: bool = False, out_dir: Path | None = None, concurrency: int = 128,
           report: bool = False, passes: int = 3, rounds: int = 3) -> dict[str, Any]:
    import faiss
    from distributed import Client, performance_report

    from dask_rag.cluster import start_local_cluster
    from dask_rag.config import BatchConfig, EmbedConfig, IndexSpec, RagConfig
    from dask_rag.corpus.demo import stdlib_documents
    from dask_rag.embed.encoder import SentenceEncoder
    from dask_rag.embed.service import EmbeddingService
    from dask_rag.index.distributed import DistributedIndex
    from dask_rag.pipeline import RagPipeline
    from dask_rag.rag.generate.extractive import ExtractiveGenerator

    out_dir = Path(out_dir or RESULTS_DIR)
    docs = stdlib_documents(limit=1200 if quick else None)
    n_per = 40 if quick else 120
    qsets = query_sets(docs, n_per)
    queries = [q for qs in qsets.values() for q in qs]
    print(f"corpus: {len(docs)} docstrings; queries: "
          + ", ".join(f"{k} {len(v)}" for k, v in qsets.items()), flush=True)
    corpus = _Corpus(docs)
    print(f"chunks: {len(corpus.chunks)} (embedded in {corpus.ingest_s:.1f} s)", flush=True)
    truth = corpus.flat.search(corpus.enc32.encode(queries), 10)[1].tolist()
    gen = ExtractiveGenerator()
    n = len(corpus.chunks)
    nlist = int(2 ** max(4, round(np.log2(4 * np.sqrt(n)))))
    factory = f"IVF{nlist},PQ48,RFlat"
    nprobe = max(8, nlist // 8)
    default_encoder = SentenceEncoder(EmbedConfig())

    ivfpq = faiss.index_factory(corpus.xb.shape[1], factory.rsplit(",", 1)[0],
                                faiss.METRIC_INNER_PRODUCT)
    ivfpq.train(corpus.xb)
    refined = faiss.IndexRefineFlat(ivfpq)
    refined.add(corpus.xb)
    refined.k_factor = 4
    ivfpq.nprobe = nprobe

    class _Remap:  # IndexRefineFlat has no ids: map positions back to chunk ids
        def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            D, I = refined.search(xq, k)
            return D, np.where(I >= 0, corpus.ids[np.maximum(I, 0)], -1)

    def score(row: dict[str, Any]) -> dict[str, Any]:
        found = row.pop("_found")
        row["recall_at_10"] = _recall(found, truth)
        by_len, i = {}, 0
        for name, qs in qsets.items():
            by_len[name] = _recall(found[i:i + len(qs)], truth[i:i + len(qs)])
            i += len(qs)
        row["recall_by_length"] = by_len
        return row

    records = [c.record() for c in corpus.chunks]
    with start_local_cluster(2, dashboard_address=None) as cluster, Client(cluster) as client:
        pipes: dict[str, Any] = {}
        for name, spec, embed in (
                ("sharding", IndexSpec(factory="Flat", n_shards=2),
                 EmbedConfig(precision="fp32", backend="torch")),
                ("optimized", IndexSpec(factory=factory, n_shards=2, nprobe=nprobe,
                                        refine_k_factor=4), EmbedConfig())):
            index = DistributedIndex.build(client, corpus.xb, corpus.ids, spec,
                                           records=records,
                                           embed={"model": "default", "dim": 384})
            embedder = EmbeddingService(client, embed,
                                        BatchConfig(max_batch=64))
            pipes[name] = RagPipeline(client, index, embedder, RagConfig(k=10, mode="dense"),
                                      BatchConfig(max_batch=64))
            pipes[name].warmup()
        rows: dict[str, Callable[[], dict[str, Any]]] = {
            "baseline": lambda: _sequential_row("baseline", corpus, queries, corpus.enc32,
                                                corpus.flat, gen),
            "+ ONNX Runtime encoder only (default fp32)": lambda: _sequential_row(
                "", corpus, queries, default_encoder, corpus.flat, gen),
            "+ micro-batching only (64)": lambda: _sequential_row(
                "", corpus, queries, corpus.enc32, corpus.flat, gen, batch=64),
            f"+ {factory} only": lambda: _sequential_row("", corpus, queries, corpus.enc32,
                                                          _Remap(), gen),
            "+ Dask sharding only (Flat, 1 client)": lambda: _pipeline_row(
                "", pipes["sharding"], queries, 1, lambda h: h.id),
            "optimized": lambda: _pipeline_row("", pipes["optimized"], queries, concurrency,
                                               lambda h: h.id, passes=passes),
        }
        names = list(rows)
        measured: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        report_ctx = (performance_report(filename=str(out_dir / "ab_pipeline-report.html"))
                      if report else contextlib.nullcontext())
        with report_ctx:
            for r in range(rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    clear_generation_caches()
                    client.run(clear_generation_caches)
                    row = score(rows[name]())
                    measured[name].append(row)
                    print(f"  round {r + 1}  {name:<40} {row['qps']:>8.1f} q/s  recall@10 "
                          f"{row['recall_at_10']:.3f}  embed p50 {row['embed_ms']['p50']:.1f} "
                          "ms", flush=True)
        for pipe in pipes.values():
            pipe.close()
    summary = [_summarise(name, measured[name], measured["baseline"]) for name in names]
    result = {
        "benchmark": "ab_pipeline",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(), "versions": versions(),
        "config": {"quick": quick, "docs": len(docs), "chunks": n, "queries": {
            k: len(v) for k, v in qsets.items()}, "k": 10, "optimized_factory": factory,
            "nprobe": nprobe, "refine_k_factor": 4,
            "optimized_encoder": f"{default_encoder.precision} on {default_encoder.backend}, "
                                 "batch-invariant",
            "concurrency": concurrency, "passes": passes, "rounds": rounds, "workers": 2,
            "generator": "extractive", "mode": "dense",
            "method": "rows in rotated order every round; generator caches cleared before "
                      "every row; speedup = median of per-round ratios to that round's "
                      "baseline"},
        "rows": summary,
        "rounds": {name: rs for name, rs in measured.items()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "ab_pipeline_quick" if quick else "ab_pipeline"
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown_table(result) + "\n")
    plot(result, out_dir / f"{name}.png")
    return result


def markdown_table(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"A/B on {m['cpu']} ({m['cores']} cores, GPU: {m['gpu'] or 'none'}); "
             f"{result['config']['chunks']} chunks, "
             f"{sum(result['config']['queries'].values())} queries (short/medium/long).", "",
             "| configuration | embed p50 / p99 ms | search p50 / p99 ms | "
             "generate p50 / p99 ms | QPS (median round) | x baseline (median; rounds) | "
             "recall@10 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        rounds = ", ".join(f"{x:.2f}" for x in r["speedup_rounds"])
        lines.append(
            f"| {r['name']} | {r['embed_ms']['p50']:.1f} / {r['embed_ms']['p99']:.1f} | "
            f"{r['search_ms']['p50']:.1f} / {r['search_ms']['p99']:.1f} | "
            f"{r['generate_ms']['p50']:.1f} / {r['generate_ms']['p99']:.1f} | "
            f"{r['qps']:.1f} | {r['speedup']:.2f} ({rounds}) | {r['recall_at_10']:.3f} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["name"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    ax1.barh(names, [r["qps"] for r in rows], color=["#999"] + ["#6a9"] * (len(rows) - 2)
             + ["#2a7"])
    ax1.invert_yaxis()
    ax1.set_xlabel("end-to-end queries / s")
    ax1.set_title("A/B: throughput")
    for i, r in enumerate(rows):
        ax1.text(r["qps"], i, f" {r['speedup']:.1f}x, R@10 {r['recall_at_10']:.2f}",
                 va="center", fontsize=7)
    x = np.arange(len(rows))
    for j, stage in enumerate(("embed_ms", "search_ms", "generate_ms")):
        ax2.bar(x + (j - 1) * 0.27, [r[stage]["p50"] for r in rows], width=0.27,
                label=stage.replace("_ms", " p50"))
    ax2.set_xticks(x, [n.replace(" only", "").replace("+ ", "+") for n in names], rotation=30,
                   ha="right", fontsize=7)
    ax2.set_yscale("log")
    ax2.set_ylabel("ms per request")
    ax2.set_title("per-stage latency (p50)")
    ax2.legend(fontsize=7)
    fig.suptitle(f"{result['machine']['cpu']}, {result['machine']['cores']} cores", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options (``dask-rag bench`` hands its own to it)."""
    p = argparse.ArgumentParser(description="A/B: naive baseline vs optimized dask-rag",
                                allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="1,200 docstrings, 120 queries")
    p.add_argument("--rounds", type=int, default=3, help="rounds (rows alternate within each)")
    p.add_argument("--concurrency", type=int, default=128,
                   help="closed-loop clients of the optimized row (2 batches of 64 in flight)")
    p.add_argument("--passes", type=int, default=3,
                   help="times the optimized row goes through the query set")
    p.add_argument("--report", action="store_true", help="save a Dask performance_report")
    p.add_argument("--cost", action="store_true", help="also print $/hour and $/1M queries")
    p.add_argument("--gpu-price", type=float, default=2.50, help="$/hour of a GPU instance")
    p.add_argument("--cpu-price", type=float, default=0.10, help="$/hour of a CPU instance")
    p.add_argument("--egress-price", type=float, default=0.09, help="$/GB of egress")
    p.add_argument("--response-bytes", type=float, default=4096.0,
                   help="bytes per response, for egress")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run_ab(args.quick, args.out, args.concurrency, args.report, args.passes,
                    args.rounds)
    print(markdown_table(result))
    if args.cost:
        from benchmarks.cost import PriceTable, cost_rows, format_cost_table

        prices = PriceTable(args.gpu_price, args.cpu_price, args.egress_price)
        kind = "gpu" if result["machine"]["gpu"] else "cpu"
        rows = cost_rows([{"name": r["name"], "qps": r["qps"], "instance": kind,
                           "instances": 1, "response_bytes": args.response_bytes}
                          for r in result["rows"]], prices)
        print("\n" + format_cost_table(rows))
        name = "ab_pipeline_quick" if args.quick else "ab_pipeline"
        (Path(args.out) / f"{name}_cost.json").write_text(json.dumps(
            {"prices": prices.__dict__, "rows": [r.to_dict() for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
