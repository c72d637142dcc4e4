#!/usr/bin/env python
"""Choose the default hybrid fusion by leave-one-out over every real-question set.

For each set (the BEIR-layout sets under ``benchmarks/datasets`` and the known-item set of the
demo index) this collects, once, every judged query's dense and BM25 candidate lists from the
set's index (the same lists, 30 chunks deep, that ``dask-rag eval`` fuses), with the BM25
statistics of the query's terms.  Then, offline and fast, it scores every fusion of a grid —
fixed methods and weights, and the query-adaptive fusions of :mod:`dask_rag.rag.fusion` — on
every set, and for each set in turn chooses a fusion on *all the other sets* by the README's
rule and reports it on the left-out set's test half.  The rule: the largest mean margin over
the choosing sets of ``min(recall@10 - best single, mrr@10 - best single)``, where "best
single" is the better of dense and sparse on that set for that measure.

    python -m benchmarks.fusion_study [--sets a,b] [--cache DIR] [--out NAME]

Writes ``benchmarks/results/fusion_study.json`` (every set's table, the leave-one-out choice
and its held-out figures) and a PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, machine_info, write_result

DATASETS = Path(__file__).resolve().parent / "datasets"
SETS = ("python-faq", "perl-faq", "debian-faq", "man-pages", "debian-packages", "known-item")
K = 10
DEPTH = 30


def _hits(hits: Sequence[Any]) -> list[list[Any]]:
    return [[int(h.id), float(h.score), h.source] for h in hits]


def collect(name: str, cache: Path, workers: int = 2) -> Path:
    """Every judged query's candidate lists of set ``name`` (ingesting it first if needed)."""
    from distributed import Client, LocalCluster

    from dask_rag import evaluate as ev
    from dask_rag.pipeline import RagPipeline

    out = cache / f"{name}.json"
    if out.exists():
        return out
    splits: dict[str, ev.EvalSet] = {}
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        index = _index_of(name)
        if name != "known-item" and not (index / "manifest.json").exists():
            from dask_rag.ingest import ingest

            full = ev.load_beir(DATASETS / name, "test")
            assert full.corpus is not None
            ingest(client, full.corpus, index, progress=True)
        with RagPipeline.from_index_dir(client, index) as pipe:
            if name == "known-item":
                from benchmarks.datasets.build_eval_sets import split_of
                from dask_rag.corpus.demo import stdlib_documents

                indexed = {src for _, src, _ in pipe.index.doc_index() if src}
                items = ev.known_item_set(stdlib_documents(), n=200, sources=indexed)
                for split in ("tune", "test"):
                    qids = [q for q in items.queries if split_of(f"ki-{q}") == split]
                    splits[split] = ev.EvalSet(
                        name="known-item", queries={q: items.queries[q] for q in qids},
                        qrels={q: items.qrels[q] for q in qids}, split=split)
            else:
                for split in ("tune", "test"):
                    splits[split] = ev.load_beir(DATASETS / name, split, with_corpus=False)
            rows = []
            for split, evalset in splits.items():
                dense, sparse = ev.candidate_lists(pipe, evalset, DEPTH)
                sums = ev.idf_sums(pipe, evalset)
                for q in dense:
                    rows.append({"qid": q, "split": split, "text": evalset.queries[q],
                                 "rel": evalset.qrels[q], "dense": _hits(dense[q]),
                                 "sparse": _hits(sparse[q]), "idf_sum": sums.get(q)})
    cache.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"set": name, "queries": rows}))
    return out


def _index_of(name: str) -> Path:
    if name == "known-item":
        return Path(__file__).resolve().parent.parent / ".demo-index"
    return DATASETS / name / ".dask-rag-index"


def autotune(name: str, cache: Path, workers: int = 2) -> dict[str, Any]:
    """``--tune-fusion auto`` on set ``name``'s index (pseudo-queries from its own corpus, no
    labels): the evidence and the fusion it would adopt (cached)."""
    from distributed import Client, LocalCluster

    from dask_rag import evaluate as ev
    from dask_rag.config import RagConfig
    from dask_rag.pipeline import RagPipeline
    from dask_rag.rag.fusion import default_fusion

    out = cache / f"{name}.auto.json"
    if out.exists():
        return dict(json.loads(out.read_text()))
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client, \
            RagPipeline.from_index_dir(client, _index_of(name)) as pipe:
        best, evidence = ev.autotune_fusion(pipe, default_fusion(RagConfig()))
    result = {"fusion": None if best is None else best.model_dump(), "evidence": evidence}
    out.write_text(json.dumps(result))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--cache", type=Path, default=Path("/tmp/dask-rag-fusion-cache"))
    p.add_argument("--collect-only", action="store_true")
    p.add_argument("--auto", action="store_true",
                   help="also run --tune-fusion auto on every set and report it held out")
    p.add_argument("--out", default="fusion_study")
    args = p.parse_args(argv)
    names = [s for s in args.sets.split(",") if s]
    t0 = time.perf_counter()
    for name in names:
        path = collect(name, args.cache)
        print(f"{name}: candidate lists in {path} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)
    if args.collect_only:
        return 0
    from benchmarks.fusion_eval import auto_table, study

    sets = {n: json.loads((args.cache / f"{n}.json").read_text())["queries"] for n in names}
    payload = study(sets)
    if args.auto:
        tuned = {n: autotune(n, args.cache) for n in names}
        payload["auto"] = auto_table(sets, tuned)
    path = write_result(args.out, {"machine": machine_info(), "k": K, "depth": DEPTH,
                                   **payload}, out_dir=RESULTS_DIR)
    print(f"wrote {path}")
    _plot(payload, path.with_suffix(".png"))
    for name, row in payload["leave_one_out"].items():
        print(f"{name:16s} chosen on the others: {row['label']:28s} held-out test "
              f"{row['held_out_test']}  dense {row['dense_test']}  sparse {row['sparse_test']}"
              f"  default {payload['tables'][name]['test']['default']}")
    return 0


def _plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(payload["leave_one_out"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, metric in zip(axes, ("recall@10", "mrr@10"), strict=True):
        width = 0.2
        for i, (label, get) in enumerate((
                ("dense", lambda n: payload["tables"][n]["test"]["dense"]),
                ("sparse", lambda n: payload["tables"][n]["test"]["sparse"]),
                ("default", lambda n: payload["tables"][n]["test"]["default"]),
                ("leave-one-out choice", lambda n: payload["leave_one_out"][n]["held_out_test"]))):
            ax.bar([x + i * width for x in range(len(names))], [get(n)[metric] for n in names],
                   width, label=label)
        ax.set_xticks([x + 1.5 * width for x in range(len(names))], names, rotation=20)
        ax.set_title(f"{metric}, test halves")
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
