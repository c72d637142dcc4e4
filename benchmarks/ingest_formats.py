#!/usr/bin/env python
"""Ingestion throughput per format, and a 100k-row Parquet file through the DataFrame path.

1. **Formats**: the same stdlib documentation text written as ``.txt``, ``.md`` (with
   headings), ``.html`` (with navigation and footer), ``.pdf`` (fpdf2, one section per page)
   and ``.docx`` (python-docx, with headings); each set is ingested into a fresh index on one
   LocalCluster of 2 workers.  chunks/s = chunks embedded / wall time of ``ingest()``
   (reading, chunking, embedding, building, saving).
2. **Parquet**: ``--rows`` (default 100,000) rows of synthetic text ingested by
   ``dask-rag ingest rows.parquet --text-column body --id-column id`` in a process of its own;
   its peak RSS (the client: the workers are other processes) is sampled every 50 ms.  The same
   rows as JSONL go through ``dask-rag ingest rows.jsonl`` and the two indexes are compared
   chunk for chunk (document id, text, metadata, vector bits).

    python -m benchmarks.ingest_formats [--rows 100000] [--docs 120]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import write_result
from dask_rag.cluster import start_local_cluster


def _documents(n: int) -> list[tuple[str, list[tuple[str, str]]]]:
    """(title, [(heading, paragraph), ...]) from the stdlib's docstrings."""
    from dask_rag.corpus.demo import stdlib_documents

    docs = [d for d in stdlib_documents() if len(d.text) > 600][:n]
    out = []
    for d in docs:
        paras = [p.strip() for p in d.text.split("\n\n") if p.strip()]
        out.append((d.source, [(f"Part {i + 1}", p) for i, p in enumerate(paras)]))
    return out


def _latin1(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")


def write_corpus(root: Path, fmt: str, docs: list[tuple[str, list[tuple[str, str]]]]) -> None:
    root.mkdir(parents=True)
    for i, (title, parts) in enumerate(docs):
        path = root / f"doc{i:04d}.{fmt}"
        if fmt == "txt":
            path.write_text(f"{title}\n\n" + "\n\n".join(p for _, p in parts))
        elif fmt == "md":
            path.write_text(f"# {title}\n\n" + "".join(f"## {h}\n\n{p}\n\n" for h, p in parts))
        elif fmt == "html":
            body = "".join(f"<h2>{h}</h2><p>{p}</p>" for h, p in parts)
            path.write_text(f"<html><head><title>{title}</title></head><body><nav><a href='/'>"
                            f"Home</a> | <a href='/docs'>Docs</a></nav><article><h1>{title}</h1>"
                            f"{body}</article><footer>Copyright 2026</footer></body></html>")
        elif fmt == "pdf":
            from fpdf import FPDF

            pdf = FPDF()
            pdf.set_font("helvetica", size=10)
            for h, p in parts:
                pdf.add_page()
                pdf.multi_cell(0, 6, _latin1(f"{h}\n{p}"))
            pdf.output(str(path))
        elif fmt == "docx":
            import docx

            d = docx.Document()
            d.add_heading(title, level=1)
            for h, p in parts:
                d.add_heading(h, level=2)
                d.add_paragraph(p)
            d.save(str(path))


def format_throughput(n_docs: int) -> dict[str, Any]:
    from distributed import Client

    from dask_rag.config import IndexSpec
    from dask_rag.ingest import ingest

    docs = _documents(n_docs)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, \
            start_local_cluster(2, dashboard_address=None) as cluster, Client(cluster) as client:
        warm = Path(tmp) / "warm"
        write_corpus(warm, "txt", docs[:4])  # models loaded on the workers before timing
        ingest(client, [warm], Path(tmp) / "warm-index", progress=False)
        for fmt in ("txt", "md", "html", "pdf", "docx"):
            src = Path(tmp) / fmt
            write_corpus(src, fmt, docs)
            t0 = time.perf_counter()
            report = ingest(client, [src], Path(tmp) / f"{fmt}-index",
                            spec=IndexSpec(n_shards=2), progress=False)
            wall = time.perf_counter() - t0
            out[fmt] = {"files": n_docs, "chunks": report.chunks_embedded,
                        "seconds": round(wall, 2),
                        "chunks_per_s": round(report.chunks_embedded / wall, 1),
                        "skipped": len(report.skipped)}
            print(f"  {fmt:>5}: {report.chunks_embedded} chunks in {wall:.1f} s = "
                  f"{out[fmt]['chunks_per_s']:.1f} chunks/s", flush=True)
    return out


def _rows(n: int) -> Any:
    import pandas as pd

    rng = np.random.default_rng(0)
    words = np.array(["river", "harbour", "ferry", "tide", "lantern", "meadow", "orchard",
                      "quarry", "glacier", "canyon", "beacon", "market", "bridge", "tunnel",
                      "valley", "summit", "archive", "compiler", "kernel", "socket"])
    picks = rng.integers(0, len(words), size=(n, 14))
    bodies = [" ".join(words[row]) + f" item {i}." for i, row in enumerate(picks)]
    return pd.DataFrame({"id": [f"r{i}" for i in range(n)], "body": bodies,
                         "lang": np.where(np.arange(n) % 2 == 0, "en", "fr"),
                         "year": 2000 + np.arange(n) % 25})


def _run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd``; (wall seconds, peak RSS in MB of that process alone, stderr tail)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], p.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-2000:]}")
    return time.perf_counter() - t0, peak[0] / 2**20, err[-500:]


def index_content(path: Path) -> list[tuple[str, str, str, bytes]]:
    """Every chunk of an index on disk as (document id, text, metadata, vector bytes): a
    JSONL record's source is ``FILE#id``, a row's is its id (so the two compare equal)."""
    from dask_rag.index import store
    from dask_rag.index.shard import ShardRef, load_shard

    manifest = store.read_manifest(path)
    out = []
    for s in range(manifest["n_shards"]):
        shard = load_shard(ShardRef(str(path), s, manifest["index_uuid"]))
        flat = shard.flat_view()
        vectors = dict(zip(flat.ids.tolist(), flat.vectors, strict=True))
        for rec in shard.records.to_pylist():
            meta = {k: v for k, v in json.loads(rec["metadata"]).items() if k != "format"}
            out.append((rec["source"].split("#")[-1], rec["text"],
                        json.dumps(meta, sort_keys=True), vectors[rec["id"]].tobytes()))
    return sorted(out)


def parquet_vs_jsonl(n_rows: int) -> dict[str, Any]:
    df = _rows(n_rows)
    base = [sys.executable, "-m", "dask_rag.cli", "ingest"]
    opts = ["--shards", "2", "--factory", "Flat", "--workers", "2", "--dashboard", ":0", "-q"]
    with tempfile.TemporaryDirectory() as tmp:
        parquet = Path(tmp) / "rows.parquet"
        df.to_parquet(parquet, row_group_size=10_000)
        jsonl = Path(tmp) / "rows.jsonl"
        with jsonl.open("w") as f:
            for r in df.itertuples(index=False):
                f.write(json.dumps({"id": r.id, "text": r.body, "metadata": {
                    "lang": r.lang, "year": int(r.year)}}) + "\n")
        wall_p, rss_p, _ = _run_measured([*base, parquet.as_uri(), "--index",
                                          f"{tmp}/from-parquet", "--text-column", "body",
                                          "--id-column", "id", "--metadata-columns",
                                          "lang,year", *opts])
        print(f"  parquet: {n_rows} rows in {wall_p:.1f} s, client peak RSS {rss_p:.0f} MB",
              flush=True)
        wall_j, rss_j, _ = _run_measured([*base, str(jsonl), "--index",
                                          f"{tmp}/from-jsonl", *opts])
        print(f"  jsonl:   {n_rows} rows in {wall_j:.1f} s, client peak RSS {rss_j:.0f} MB",
              flush=True)
        a, b = index_content(Path(tmp) / "from-parquet"), index_content(Path(tmp) / "from-jsonl")
        return {"rows": n_rows, "parquet": {"seconds": round(wall_p, 1),
                                            "rows_per_s": round(n_rows / wall_p, 1),
                                            "client_peak_rss_mb": round(rss_p, 1)},
                "jsonl": {"seconds": round(wall_j, 1), "rows_per_s": round(n_rows / wall_j, 1),
                          "client_peak_rss_mb": round(rss_j, 1)},
                "chunks": len(a), "indexes_equal": a == b}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=120, help="files per format")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--skip-formats", action="store_true")
    args = p.parse_args(argv)
    result: dict[str, Any] = {"config": {"docs_per_format": args.docs, "rows": args.rows,
                                         "workers": 2}}
    if not args.skip_formats:
        print("formats:", flush=True)
        result["formats"] = format_throughput(args.docs)
    print("parquet vs jsonl:", flush=True)
    result["parquet"] = parquet_vs_jsonl(args.rows)
    write_result("ingest_formats", result)
    print(json.dumps(result["parquet"]))
    return 0 if result["parquet"]["indexes_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
