"""Retrieval evaluation: recall@k, MRR@k and nDCG@k over a set of queries with known answers.

A query set is JSONL, one object per line::

    {"query": "...", "relevant_ids": [123, 456]}          # chunk ids, or
    {"query": "...", "relevant_sources": ["json.dumps"]}  # any chunk of these sources counts

Relevance is binary.  ``known_item_queries`` builds such a set from documents themselves: the
first sentence of a docstring that is unique in the corpus must retrieve a chunk of that object.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dask_rag.corpus.chunking import split_sentences
from dask_rag.corpus.loaders import Document, iter_jsonl_objects
from dask_rag.errors import InvalidInput

__all__ = ["EvalQuery", "evaluate", "format_table", "known_item_queries", "load_queries",
           "mrr_at_k", "ndcg_at_k", "recall_at_k"]


@dataclass(frozen=True)
class EvalQuery:
    query: str
    relevant_ids: frozenset[int] = frozenset()
    relevant_sources: frozenset[str] = frozenset()

    def relevant(self, hit_id: int, source: str) -> bool:
        return hit_id in self.relevant_ids or source in self.relevant_sources

    @property
    def n_relevant(self) -> int:
        return len(self.relevant_ids) + len(self.relevant_sources)


def _flags(ranked: Sequence[bool], k: int) -> list[bool]:
    return list(ranked[:k])


def recall_at_k(ranked: Sequence[bool], n_relevant: int, k: int) -> float:
    """Fraction of the relevant items found in the top ``k`` (``ranked[i]``: hit i relevant)."""
    if n_relevant <= 0:
        return 0.0
    return min(1.0, sum(_flags(ranked, k)) / n_relevant)


def mrr_at_k(ranked: Sequence[bool], k: int) -> float:
    """1 / rank of the first relevant hit within the top ``k``, else 0."""
    for i, rel in enumerate(_flags(ranked, k), start=1):
        if rel:
            return 1.0 / i
    return 0.0


def ndcg_at_k(ranked: Sequence[bool], n_relevant: int, k: int) -> float:
    """Binary-relevance nDCG: sum rel_i / log2(i + 1), over the ideal ordering's value."""
    dcg = sum(1.0 / math.log2(i + 1) for i, rel in enumerate(_flags(ranked, k), start=1) if rel)
    ideal = sum(1.0 / math.log2(i + 1) for i in range(1, min(n_relevant, k) + 1))
    return dcg / ideal if ideal > 0 else 0.0


def load_queries(path: str | Path) -> list[EvalQuery]:
    out = []
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidInput(f"{p}: cannot read the query file ({exc})") from None
    for lineno, obj in iter_jsonl_objects(p, "\n".join(lines)):
        if not isinstance(obj.get("query"), str):
            raise InvalidInput(f"{p}:{lineno}: needs a string field 'query'")
        ids = obj.get("relevant_ids", [])
        srcs = obj.get("relevant_sources", [])
        if not ids and not srcs:
            raise InvalidInput(f"{p}:{lineno}: needs 'relevant_ids' or 'relevant_sources'")
        out.append(EvalQuery(obj["query"], frozenset(int(i) for i in ids),
                             frozenset(str(s) for s in srcs)))
    if not out:
        raise InvalidInput(f"{p}: no queries")
    return out


def known_item_queries(docs: Sequence[Document], n: int = 200, min_words: int = 6,
                       sources: set[str] | None = None) -> list[EvalQuery]:
    """Queries made of docstrings' first sentences that are unique in the corpus."""
    firsts: dict[str, list[str]] = {}
    for d in docs:
        if sources is not None and d.source not in sources:
            continue
        body = d.text.split("\n\n", 1)[-1]
        sents = split_sentences(" ".join(body.split()))
        if sents and len(sents[0].split()) >= min_words:
            firsts.setdefault(sents[0], []).append(d.source)
    unique = sorted((s, srcs[0]) for s, srcs in firsts.items() if len(srcs) == 1)
    step = max(1, len(unique) // n)
    return [EvalQuery(q, relevant_sources=frozenset([src])) for q, src in unique[::step][:n]]


def evaluate(pipe: Any, queries: Sequence[EvalQuery], k: int = 10,
             modes: Sequence[str] = ("dense", "sparse", "hybrid"), batch: int = 64,
             rerank: bool = False) -> dict[str, dict[str, float]]:
    """recall@k / MRR@k / nDCG@k of ``pipe`` for each retrieval mode (and reranked hybrid)."""
    results: dict[str, dict[str, float]] = {}
    runs = [(m, m, False) for m in modes]
    if rerank:
        runs.append(("hybrid+rerank", "hybrid", True))
    for name, mode, use_rerank in runs:
        tot = {"recall": 0.0, "mrr": 0.0, "ndcg": 0.0}
        for i in range(0, len(queries), batch):
            part = queries[i:i + batch]
            hits = (pipe.rerank_many if use_rerank else pipe.search_many)(
                [q.query for q in part], k=k, mode=mode)
            for q, hs in zip(part, hits, strict=True):
                flags = [q.relevant(h.id, h.source) for h in hs]
                # a source counts once however many of its chunks are retrieved
                seen: set[str] = set()
                dedup = []
                for h, f in zip(hs, flags, strict=True):
                    if f and h.source in q.relevant_sources:
                        dedup.append(h.source not in seen)
                        seen.add(h.source)
                    else:
                        dedup.append(f)
                tot["recall"] += recall_at_k(dedup, q.n_relevant, k)
                tot["mrr"] += mrr_at_k(dedup, k)
                tot["ndcg"] += ndcg_at_k(dedup, q.n_relevant, k)
        results[name] = {f"{m}@{k}": round(v / len(queries), 4) for m, v in tot.items()}
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    cols = list(next(iter(results.values())))
    lines = ["| retrieval | " + " | ".join(cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)
