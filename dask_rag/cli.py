"""`dask-rag` command line: ingest, search, ask, serve, eval, bench, demo.

Every command connects to ``--scheduler ADDR`` or ``--cluster SPEC`` when given; otherwise it
starts a LocalCluster of single-threaded worker processes and prints the dashboard link.
Errors the user can fix (bad paths, bad input) print one line and exit with status 2.

Why one module of ~500 lines: each subcommand is a short function plus its argparse block, and
the shared cluster/serve options are defined once here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dask_rag.config import (
    DASHBOARD_ADDRESS,
    DEFAULT_PER_WORKER,
    ENCODER_BACKENDS,
    MODES,
    PRECISIONS,
    BatchConfig,
    ChunkConfig,
    EmbedConfig,
    IndexSpec,
    RagConfig,
    ServeConfig,
)
from dask_rag.errors import DaskRagError, InvalidInput
from dask_rag.rag.generate.base import SamplingParams

#: every default below comes from these (config.py is where defaults live)
_RAG, _EMBED, _SERVE, _BATCH = RagConfig(), EmbedConfig(), ServeConfig(), BatchConfig()

__all__ = ["main"]

DEMO_INDEX = ".demo-index"


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--scheduler", help="address of a running Dask scheduler")
    g.add_argument("--cluster", help="cluster spec YAML (see clusters/)")
    g.add_argument("--workers", type=int, default=None,
                   help="local worker processes when starting a LocalCluster (default: cores)")
    g.add_argument("--dashboard", default=DASHBOARD_ADDRESS,
                   help="dashboard address of a LocalCluster")


@contextlib.contextmanager
def _client(args: argparse.Namespace, quiet: bool = False,
            scheduler_process: bool = False) -> Iterator[Any]:
    from dask_rag.cluster import connect

    client, cluster = connect(args.scheduler, spec=getattr(args, "cluster", None),
                              n_workers=args.workers, dashboard_address=args.dashboard,
                              scheduler_process=scheduler_process)
    try:
        if not quiet:
            print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr, flush=True)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# ------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------


def cmd_ingest(args: argparse.Namespace) -> int:
    from dask_rag.config import ChunkConfig, EmbedConfig, IndexSpec
    from dask_rag.ingest import ingest

    spec = None
    if args.factory or args.shards:
        spec = IndexSpec(factory=args.factory or "Flat", n_shards=args.shards or 2,
                         nprobe=args.nprobe)
    embed = EmbedConfig(model=args.model, precision=args.precision, backend=args.backend)
    chunk = ChunkConfig(max_tokens=args.chunk_tokens, overlap_tokens=args.overlap_tokens)
    tables = [p for p in args.paths if _is_table(p)]
    if tables and len(tables) != len(args.paths):
        raise InvalidInput("ingest either Parquet/CSV tables or document files, not a mix")
    if tables and not (args.text_column and args.id_column):
        raise InvalidInput("a table needs --text-column and --id-column")
    if not tables and (args.text_column or args.id_column):
        raise InvalidInput("--text-column / --id-column apply to Parquet or CSV tables")
    # the scheduler in a process of its own: its record of every chunk and embedding task
    # would otherwise count against this process, which only drives the run
    with _client(args, scheduler_process=True) as client:
        if tables:
            import dask.dataframe as dd

            from dask_rag.ingest import ingest_dataframe

            meta = [c for c in (args.metadata_columns or "").split(",") if c]
            read = dd.read_csv if tables[0].lower().endswith(".csv") else dd.read_parquet
            df = read(tables if len(tables) > 1 else tables[0])
            report = ingest_dataframe(client, df, args.index, text=args.text_column,
                                      id=args.id_column, metadata=meta, spec=spec,
                                      embed=embed, chunk=chunk, progress=not args.quiet)
        else:
            report = ingest(client, args.paths, args.index, spec=spec, embed=embed,
                            chunk=chunk, progress=not args.quiet)
        print(report.summary())
        if args.tune_fusion == "auto":
            from dask_rag.pipeline import RagPipeline

            with RagPipeline.from_index_dir(client, args.index) as pipe:
                _autotune(pipe)
    # 3: partial success (some files were skipped; the summary names them and why)
    return 3 if report.skipped else 0


def _has_index(location: str | Path) -> bool:
    """Whether an index is at ``location`` (a directory or an object-store URL; the manifest
    is read by the store module, the one place that knows where it lives)."""
    from dask_rag.errors import CorruptIndex, IndexNotFound
    from dask_rag.index import store

    try:
        store.read_manifest(location)
    except CorruptIndex:
        return True  # there is one, unreadable: loading it says what is wrong
    except IndexNotFound:
        return False
    return True


def _autotune(pipe: Any) -> None:
    """``--tune-fusion auto``: tune on the index's own pseudo-queries; record the evidence,
    and the fusion when it is adopted."""
    from dask_rag import evaluate as ev
    from dask_rag.rag.fusion import default_fusion

    best, evidence = ev.autotune_fusion(pipe, default_fusion(pipe.config))
    pipe.index.set_metadata("fusion_auto", evidence)
    if best is not None:
        pipe.index.set_metadata("fusion", {**best.model_dump(), "tuned_on": "auto",
                                           "rule": "pseudo-queries; adopted when it beats the "
                                                   "default on their held-out half"})
    check = evidence.get("check", {})
    print(f"fusion auto-tuning on {evidence['pseudo_queries']} pseudo-queries: "
          + ("adopted " + json.dumps(best.model_dump()) if best is not None
             else f"kept the default ({evidence.get('reason')})")
          + (f"; held-out half: default {check['default']}, chosen {check['chosen']}"
             if check else ""), file=sys.stderr)


def _is_table(path: str) -> bool:
    """A Parquet / CSV table (a local path or an fsspec URL such as s3://bucket/data.parquet;
    a directory of Parquet files ends with .parquet or holds _metadata)."""
    lower = path.lower().rstrip("/")
    return lower.endswith((".parquet", ".pq", ".csv")) or (
        "://" not in path and Path(path).is_dir() and (Path(path) / "_metadata").exists())


def _print_hits(hits: Sequence[Any], as_json: bool, timings: dict[str, float]) -> None:
    if as_json:
        print(json.dumps({"hits": [h.to_dict() for h in hits],
                          "timings_ms": {k: round(v, 3) for k, v in timings.items()}}, indent=2))
        return
    for rank, h in enumerate(hits, 1):
        first = " ".join(h.text.split())[:160]
        print(f"{rank:>2}. {h.score:7.4f}  {h.source}\n      {first}")
    print("timings: " + ", ".join(f"{k} {v:.1f} ms" for k, v in timings.items()))


def cmd_search(args: argparse.Namespace) -> int:
    from dask_rag.pipeline import RagPipeline

    with _client(args, quiet=args.json) as client, \
            RagPipeline.from_index_dir(client, args.index) as pipe:
        timings: dict[str, float] = {}
        flt = _json_option("--filter", args.filter)
        hits = pipe.search_many([args.query], k=args.k, filter=flt, timings=timings,
                                mode=args.mode, fusion=_json_option("--fusion", args.fusion))[0]
        _print_hits(hits, args.json, timings)
    return 0


def _json_option(name: str, value: str | None) -> Any:
    """A JSON-valued option, or None; InvalidInput naming the option when it is not JSON."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{name} is not valid JSON: {exc}") from None


def _rag_config(args: argparse.Namespace) -> Any:
    return RagConfig(k=args.k, mode=args.mode, generator=args.generator,
                     rerank_model=getattr(args, "rerank_model", None),
                     token_budget=getattr(args, "token_budget", 1024))


def cmd_ask(args: argparse.Namespace) -> int:
    import asyncio

    from dask_rag.pipeline import RagPipeline
    from dask_rag.rag.generate import SamplingParams

    cfg = _rag_config(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            stream_chunk_tokens=args.stream_chunk_tokens)
    with _client(args, quiet=args.json) as client, \
            RagPipeline.from_index_dir(client, args.index, cfg) as pipe:
        if args.stream:
            async def run() -> None:
                cites: list[dict[str, Any]] = []
                async for event in pipe.astream(args.question, params=params):
                    if event["event"] == "text":
                        print(event["text"], end="", flush=True)
                    elif event["event"] == "citations":
                        cites = event["citations"]
                    elif event["event"] == "done":
                        print()
                        for c in cites:
                            print(f"[{c['n']}] {c['source']}")
                        print("timings: " + ", ".join(
                            f"{k} {v:.1f} ms" for k, v in event["timings_ms"].items()))

            asyncio.run(run())
            return 0
        answer = pipe.ask(args.question, params=params)
        if args.json:
            print(json.dumps(answer.to_dict(), indent=2))
            return 0
        print(answer.text)
        for n, hit in enumerate(answer.citations, 1):
            print(f"[{n}] {hit.source}")
        print("timings: " + ", ".join(f"{k} {v:.1f} ms" for k, v in answer.timings_ms.items()))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dask_rag import evaluate as ev
    from dask_rag.pipeline import RagPipeline
    from dask_rag.rag.fusion import Fusion, default_fusion

    cfg = _rag_config(args)
    evalset: ev.EvalSet
    if args.dataset:
        evalset = ev.load_beir(args.dataset, args.split)
        index = args.index or str(Path(args.dataset) / ".dask-rag-index")
    elif args.index:
        index = args.index
    else:
        print("dask-rag eval: give --dataset DIR (BEIR layout) or --index DIR",
              file=sys.stderr)
        return 2
    with _client(args, quiet=True) as client:
        if args.dataset and not _has_index(index):
            from dask_rag.ingest import ingest

            assert evalset.corpus is not None
            report = ingest(client, evalset.corpus, index, progress=not args.quiet)
            print(f"indexed {evalset.name}: {report.summary()}", file=sys.stderr)
        with RagPipeline.from_index_dir(client, index, cfg) as pipe:
            if not args.dataset:
                if args.queries:
                    evalset = ev.load_queries(args.queries)
                else:
                    from dask_rag.corpus.demo import stdlib_documents

                    indexed = {src for _, src, _ in pipe.index.doc_index() if src}
                    evalset = ev.known_item_set(stdlib_documents(), n=args.known_items,
                                                sources=indexed)
            tuned_table = None
            if args.tune_fusion == "auto":
                _autotune(pipe)
            elif args.tune_fusion:
                tuning = ev.load_beir(args.dataset, "tune", with_corpus=False) \
                    if args.dataset else evalset
                best, tuned_table = ev.tune_fusion(pipe, tuning, default_fusion(cfg), k=args.k)
                pipe.index.set_metadata("fusion", {
                    **best.model_dump(), "tuned_on": f"{tuning.name}/{tuning.split}",
                    "rule": f"the largest smaller gain of recall@{args.k} and mrr@{args.k} "
                            f"over the default, if >= {ev.MIN_GAIN}"})
                print(f"tuned fusion on {tuning.name}/{tuning.split}: {best.model_dump()}",
                      file=sys.stderr)
            default = default_fusion(cfg)
            runs: dict[str, tuple[str, Fusion | None, bool]] = {
                m: (m, default if m == "hybrid" else None, False)
                for m in (x.strip() for x in args.modes.split(","))}
            manifest = pipe.index.manifest  # as tuning left it
            tuned = manifest.fusion
            if tuned:
                runs["hybrid (tuned)"] = ("hybrid", Fusion.model_validate(
                    {k: tuned[k] for k in Fusion.model_fields if k in tuned}), False)
            if args.rerank_model:
                runs["hybrid + rerank"] = ("hybrid", None, True)
            results, _ = ev.evaluate(pipe, evalset, k=args.k, runs=runs)
            answers = None
            if args.answers:
                # as many passages as an ask gets by default (not the retrieval cutoff -k)
                passages = RagConfig().k
                answers, per_question = ev.answer_quality(pipe, evalset, k=passages)
    judged = len(evalset.judged)
    print(f"{evalset.name} ({evalset.split}): {judged} queries with judgements"
          + (f", {len(evalset.unjudged)} without (not scored)" if evalset.unjudged else "")
          + f", k={args.k}, document level\n{ev.format_table(results)}")
    if answers is not None:
        print(f"answers ({cfg.generator}, {passages} passages each; "
              f"supported = >= {ev.SUPPORT_OVERLAP:.0%} of a sentence's words in the passage "
              f"it cites):\n{ev.format_table({'answers': answers})}")
    if args.out:
        ev.write_results(args.out, {
            "dataset": evalset.name, "split": evalset.split, "queries": judged,
            "unjudged_queries": len(evalset.unjudged), "k": args.k, "level": "document",
            "encoder": {k: v for k, v in (manifest.embed or {}).items()
                        if k != "canaries"},
            "index": manifest.spec,
            "default_fusion": default.model_dump(), "tuned_fusion": manifest.fusion,
            "results": results, "tuning": tuned_table,
            **({"answers": {"generator": cfg.generator, "passages": passages,
                            "support_overlap": ev.SUPPORT_OVERLAP, "summary": answers,
                            "per_question": per_question}} if answers is not None else {})})
        print(f"wrote {args.out}")
    return 0


def _serve_config(args: argparse.Namespace) -> Any:
    from dask_rag.config import BatchConfig, ServeConfig

    keys = tuple(k.strip() for k in os.environ.get(args.api_keys_env, "").split(",")
                 if k.strip())
    return ServeConfig(host=args.host, port=args.port, batching=not args.no_batching,
                       batch=BatchConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                                         busy_wait_ms=args.busy_wait_ms),
                       max_inflight=args.max_inflight, rate_limit_per_s=args.rate_limit,
                       request_timeout_s=args.timeout, api_keys=keys)


def _start_adaptive(args: argparse.Namespace, client: Any, app: Any, served: Any) -> Any:
    """Scale the local cluster on the app's requests in flight (``--adaptive MIN:MAX``);
    a leaving worker's shards (of every served collection) are handed over first."""
    from dask_rag.cluster.adaptive import adapt_to_queue, parse_adaptive
    from dask_rag.collections import Collections

    lo, hi = parse_adaptive(args.adaptive)
    cluster = getattr(client, "cluster", None)
    if cluster is None:
        raise InvalidInput("--adaptive needs a cluster this command starts (not --scheduler)")
    guard = app.state.guard

    def hand_over(workers: list[str]) -> None:
        pipes = ([served.get(n) for n in served.names()] if isinstance(served, Collections)
                 else [served])
        for pipe in pipes:
            pipe.index.rebalance(exclude=workers)

    print(f"adaptive: {lo} to {hi} workers, {args.adaptive_per_worker:g} requests in flight "
          "per worker", flush=True)
    return adapt_to_queue(cluster, lambda: guard.inflight, lo, hi,
                          per_worker=args.adaptive_per_worker, before_retire=hand_over)


def cmd_serve(args: argparse.Namespace) -> int:
    from dask_rag.pipeline import RagPipeline
    from dask_rag.serve import create_app
    from dask_rag.serve.server import run_app
    from dask_rag.telemetry import configure_tracing

    cfg = _rag_config(args)
    serve_cfg = _serve_config(args)
    if args.adaptive:  # bad bounds fail before a cluster starts; it starts at MIN workers
        from dask_rag.cluster.adaptive import parse_adaptive

        args.workers = args.workers or parse_adaptive(args.adaptive)[0]
    configure_tracing()
    # a local cluster's scheduler gets a process of its own: on this process's event loop it
    # would compete with HTTP and the client for the GIL (see start_local_cluster)
    with _client(args, scheduler_process=not args.scheduler_in_process) as client, \
            RagPipeline.from_index_dir(client, args.index, cfg, batch=serve_cfg.batch,
                                       replicas=args.replicas) as pipe:
        pipe.warmup()
        served: Any = pipe
        if args.collections:
            from dask_rag.collections import Collections

            served = Collections.open(pipe, args.collections, cfg, batch=serve_cfg.batch)
        print(f"serving {args.index} on http://{args.host}:{args.port} "
              f"(batching {'on' if serve_cfg.batching else 'off'}, API keys "
              f"{'required' if serve_cfg.api_keys else 'off'}"
              + (f", collections in {args.collections}" if args.collections else "")
              + f"); Dask dashboard: {client.dashboard_link}", flush=True)
        try:
            app = create_app(served, serve_cfg)
            if args.adaptive:
                _start_adaptive(args, client, app, served)
            run_app(app, serve_cfg, log_level="info" if args.verbose else "warning")
        finally:
            if served is not pipe:  # the named collections' shards (the default's: below)
                served.close()
    return 0


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("http")
    g.add_argument("--host", default=_SERVE.host)
    g.add_argument("--port", type=int, default=_SERVE.port)
    g.add_argument("--no-batching", action="store_true",
                   help="one Dask graph per request (the benchmark's naive baseline)")
    g.add_argument("--max-batch", type=int, default=_BATCH.max_batch)
    g.add_argument("--max-wait-ms", type=float, default=_BATCH.max_wait_ms,
                   help="how long a lone request may wait for others to batch with")
    g.add_argument("--busy-wait-ms", type=float, default=_BATCH.busy_wait_ms,
                   help="the same while another batch is being processed or the callers "
                        "just answered are coming back (fills batches under load)")
    g.add_argument("--max-inflight", type=int, default=_SERVE.max_inflight)
    g.add_argument("--rate-limit", type=float, default=None, help="requests/s per API key")
    g.add_argument("--timeout", type=float, default=_SERVE.request_timeout_s,
                   help="per-request timeout (s)")
    g.add_argument("--api-keys-env", default="DASK_RAG_API_KEYS",
                   help="environment variable holding comma-separated API keys; a key may "
                        "carry a scope: 'secret:read', 'secret:write:docs+faq'")
    g.add_argument("--scheduler-in-process", action="store_true",
                   help="run a local cluster's scheduler in the server process (default: its "
                        "own process)")


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the A/B benchmark from a source checkout (``benchmarks/`` is not installed)."""
    import importlib

    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "ab_pipeline.py").is_file():
        raise DaskRagError("dask-rag bench runs benchmarks/ab_pipeline.py from a source "
                           "checkout of dask-rag (pip install -e .); it is not installed with "
                           "the package")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    bench = importlib.import_module("benchmarks.ab_pipeline")
    return int(bench.main(args.bench_args))


def cmd_demo(args: argparse.Namespace) -> int:
    from dask_rag.corpus.demo import DEMO_QUESTIONS, stdlib_documents
    from dask_rag.ingest import ingest
    from dask_rag.pipeline import RagPipeline

    index_dir = Path(args.index)
    with _client(args, scheduler_process=not args.scheduler_in_process) as client:
        if args.rebuild or not _has_index(index_dir):
            t0 = time.perf_counter()
            docs = stdlib_documents(limit=args.limit)
            print(f"demo corpus: {len(docs)} docstrings of the Python {sys.version.split()[0]} "
                  f"standard library ({time.perf_counter() - t0:.1f} s)", flush=True)
            if args.rebuild and index_dir.exists():
                import shutil

                shutil.rmtree(index_dir)
            report = ingest(client, docs, index_dir, progress=True)
            print(f"ingested: {report.summary()} in {report.seconds['total']:.1f} s", flush=True)
        else:
            print(f"using the existing demo index at {index_dir} (--rebuild to recreate)")
        with RagPipeline.from_index_dir(client, index_dir) as pipe:
            pipe.warmup()
            for q in DEMO_QUESTIONS:
                answer = pipe.ask(q, k=3)
                print(f"\nQ: {q}\nA: {answer.text}")
                for n, hit in enumerate(answer.citations, 1):
                    print(f"   [{n}] {hit.source}")
                print("   timings: " + ", ".join(f"{k} {v:.1f} ms"
                                                 for k, v in answer.timings_ms.items()))
            print(f"\nDask dashboard: {client.dashboard_link}")
            if args.no_serve:
                return 0
            from dask_rag.serve import run_server

            serve_cfg = _serve_config(args)
            print(f"serving on http://{args.host}:{args.port} — try:\n  curl -s "
                  f"http://{args.host}:{args.port}/v1/ask -d '{{\"question\": "
                  f"\"{DEMO_QUESTIONS[0]}\"}}'\n(Ctrl-C to stop)", flush=True)
            run_server(pipe, serve_cfg)
    return 0


# ------------------------------------------------------------------------------------------------
# parser
# ------------------------------------------------------------------------------------------------


class ExactParser(argparse.ArgumentParser):
    """An argument parser that takes options under their full names only (no prefixes)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    # no abbreviated options: a documented option must exist under its own name (a prefix
    # that happens to match another option is not the option the docs name)
    parser = ExactParser(
        prog="dask-rag",
        description="Retrieval-augmented generation with a faiss index sharded on Dask.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ExactParser)

    p = sub.add_parser("ingest", help="chunk, embed and index files or directories")
    p.add_argument("paths", nargs="+",
                   help="files or directories (.txt .md .rst .html .pdf .docx .jsonl), or "
                        "Parquet/CSV tables (paths or fsspec URLs) with --text-column")
    p.add_argument("--text-column", help="a table's text column")
    p.add_argument("--id-column", help="a table's document id column")
    p.add_argument("--metadata-columns", help="a table's metadata columns, comma-separated")
    p.add_argument("--index", required=True, help="index directory (created or updated)")
    p.add_argument("--shards", type=int, help="number of shards (default: one per worker)")
    p.add_argument("--factory", help="faiss factory string (default: Flat, IVF beyond 50k)")
    p.add_argument("--nprobe", type=int, default=IndexSpec.nprobe)
    p.add_argument("--model", default=_EMBED.model, help="local sentence-transformers model dir")
    p.add_argument("--precision", default=_EMBED.precision, choices=PRECISIONS,
                   help="auto: fp32 on CPU (the same vectors on every CPU generation), fp16 "
                        "on GPU; int8 is faster but its vectors depend on the CPU kind")
    p.add_argument("--backend", default=_EMBED.backend, choices=ENCODER_BACKENDS,
                   help="encoder runtime (auto: ONNX Runtime on CPU)")
    p.add_argument("--chunk-tokens", type=int, default=ChunkConfig.max_tokens)
    p.add_argument("--overlap-tokens", type=int, default=ChunkConfig.overlap_tokens)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--tune-fusion", choices=["auto"],
                   help="auto: tune the hybrid fusion on pseudo-queries made from the corpus "
                        "(titles, first sentences; no labels) and adopt it only when it beats "
                        "the default on a held-out half of them (the evidence goes into the "
                        "manifest)")
    _add_cluster_args(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("search", help="retrieve the chunks most similar to a query")
    p.add_argument("query")
    p.add_argument("--index", required=True)
    p.add_argument("-k", type=int, default=_RAG.k)
    p.add_argument("--filter", help='JSON filter, e.g. {"source_prefix": "json."}')
    p.add_argument("--mode", choices=MODES, default=None,
                   help="dense, sparse or hybrid (default: the index's configured mode)")
    p.add_argument("--fusion", help='JSON fusion, as in the HTTP API, e.g. '
                                    '{"method": "rrf", "dense_weight": 0.5}')
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_cluster_args(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("ask", help="answer a question from the index, with citations")
    p.add_argument("question")
    p.add_argument("--index", required=True)
    p.add_argument("-k", type=int, default=_RAG.k, help="passages in the prompt")
    p.add_argument("--mode", default=_RAG.mode, choices=MODES)
    p.add_argument("--generator", default=_RAG.generator,
                   help="'extractive' (default), 'hf:PATH' or 'vllm:PATH'")
    p.add_argument("--rerank-model", help="local cross-encoder directory")
    p.add_argument("--token-budget", type=int, default=_RAG.token_budget)
    p.add_argument("--max-tokens", type=int, default=SamplingParams.max_tokens)
    p.add_argument("--temperature", type=float, default=SamplingParams.temperature)
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--stream-chunk-tokens", type=int, default=_RAG.stream_chunk_tokens)
    p.add_argument("--json", action="store_true")
    _add_cluster_args(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("serve", help="serve the index over HTTP (uvicorn + Starlette)")
    p.add_argument("--index", required=True,
                   help="index directory or object-store URL (s3://bucket/prefix, gs://...)")
    p.add_argument("--replicas", type=int, default=None,
                   help="copies of each shard on different workers (default: the index's)")
    p.add_argument("-k", type=int, default=_RAG.k)
    p.add_argument("--mode", default=_RAG.mode, choices=MODES)
    p.add_argument("--generator", default=_RAG.generator)
    p.add_argument("--rerank-model")
    p.add_argument("--token-budget", type=int, default=_RAG.token_budget)
    p.add_argument("--collections", default=None, metavar="DIR",
                   help="serve every index folder under DIR as a named collection too "
                        "(POST /v1/collections creates new ones there)")
    p.add_argument("--adaptive", metavar="MIN:MAX", default=None,
                   help="scale the local cluster between MIN and MAX workers on the requests "
                        "in flight (not CPU); leaving workers hand their shards over first")
    p.add_argument("--adaptive-per-worker", type=float, default=DEFAULT_PER_WORKER,
                   metavar="N", help="requests in flight per worker the adaptive target aims "
                                     f"at (default {DEFAULT_PER_WORKER:g})")
    _add_serve_args(p)
    _add_cluster_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("eval", help="recall@k / MRR@k / nDCG@k of dense, sparse, hybrid, "
                                    "at document level; tune the hybrid fusion")
    p.add_argument("--dataset", help="a BEIR-layout folder: corpus.jsonl, queries.jsonl, "
                                     "qrels/<split>.tsv (ingested into DATASET/.dask-rag-index "
                                     "unless --index is given)")
    p.add_argument("--split", default="test", help="the qrels split to report (default test)")
    p.add_argument("--index", help="the index to evaluate (default with --dataset: "
                                   "DATASET/.dask-rag-index)")
    p.add_argument("--queries", help="JSONL: {query, relevant_sources}; default without "
                                     "--dataset: known-item queries from the demo corpus")
    p.add_argument("--known-items", type=int, default=200)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--tune-fusion", nargs="?", const="split", choices=["split", "auto"],
                   help="choose the hybrid fusion on the 'tune' split (or, 'auto', on "
                        "pseudo-queries made from the corpus, no labels) and record it in the "
                        "index manifest (then used by default)")
    p.add_argument("--mode", default=_RAG.mode, help=argparse.SUPPRESS)
    p.add_argument("--generator", default=_RAG.generator, help=argparse.SUPPRESS)
    p.add_argument("--rerank-model", help="also evaluate hybrid + this cross-encoder")
    p.add_argument("--answers", action="store_true",
                   help="also ask every question and grade the answers: citations of a "
                        "relevant document (precision / recall), the first sentence's, and "
                        "the share of sentences supported by the passage they cite")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_cluster_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="A/B benchmark: naive baseline vs optimized "
                                     "(benchmarks/ab_pipeline.py; its options follow)",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER,
                   help="options of benchmarks/ab_pipeline.py (--quick, --rounds, --cost, ...)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="ingest the built-in demo corpus and try it")
    p.add_argument("--index", default=DEMO_INDEX)
    p.add_argument("--rebuild", action="store_true", help="re-ingest even if the index exists")
    p.add_argument("--limit", type=int, default=None, help="at most this many docstrings")
    p.add_argument("--no-serve", action="store_true", help="do not start the HTTP server")
    _add_serve_args(p)
    _add_cluster_args(p)
    p.set_defaults(func=cmd_demo)
    return parser


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM, so that ``with`` blocks run on the way out."""


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


def install_sigterm_handler() -> None:
    """Turn SIGTERM into an exception instead of an immediate death.

    Python's default SIGTERM action kills the process without unwinding, so the local cluster
    a command started is never closed: with the scheduler in its own process (``serve``,
    ``demo``) its scheduler, nannies and workers outlive us as orphans, each still using CPU.
    uvicorn catches SIGTERM to drain requests and then re-raises it with the handler it
    found installed — this one — so a served command unwinds, closes its client and cluster,
    and exits 143.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line as :func:`main` reads it (SystemExit 2 with a usage message when it
    does not parse)."""
    parser = build_parser()
    # `bench` hands its options to benchmarks/ab_pipeline.py: argparse's REMAINDER after a
    # subcommand does not take a leading option (`bench --quick`), so those come back unknown
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "bench_args", None) is not None:
        args.bench_args = [*unknown, *args.bench_args]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    install_sigterm_handler()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # distributed logs every worker/client connection at INFO: keep the CLI readable
        import dask

        dask.config.set({"logging.distributed": "warning"})
        logging.getLogger("distributed").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except DaskRagError as exc:
        print(f"dask-rag {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
