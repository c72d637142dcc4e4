"""Retrieval evaluation on question sets: recall@k, MRR@k and nDCG@k at document level, for
dense, sparse, hybrid and tuned hybrid retrieval; and tuning of the hybrid fusion.

An evaluation set (:class:`EvalSet`) maps query ids to texts and to graded judgements of
*documents* (a document counts once however many of its chunks are retrieved).  Sets come
from the standard BEIR layout (:func:`load_beir`: ``corpus.jsonl``, ``queries.jsonl``,
``qrels/<split>.tsv``), from JSONL (:func:`load_queries`), or from a corpus itself
(:func:`known_item_set`: queries that are verbatim sentences of their document — easy by
construction, kept only as a labelled reference).

Hits are chunks; a chunk's document is its ``source`` (ingestion sets it to the document's
id).  Rankings go ``k * CHUNKS_PER_DOC`` chunks deep and keep each document's first chunk, so
that ``k`` distinct documents are scored.  :func:`tune_fusion` fuses the dense and BM25
candidate lists offline — the same lists, and the same :func:`~dask_rag.rag.fusion.fuse`, the
pipeline uses — for every method and weight of a grid, and picks the best on a tuning split.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dask_rag.config import FUSIONS, MODES
from dask_rag.corpus.chunking import split_sentences
from dask_rag.corpus.loaders import Document, iter_jsonl_objects
from dask_rag.errors import InvalidInput
from dask_rag.rag.fusion import Fusion, fuse
from dask_rag.rag.hits import Hit

__all__ = ["CHUNKS_PER_DOC", "EvalSet", "doc_ranking", "evaluate", "format_table",
           "known_item_set", "load_beir", "load_queries", "mrr_at_k", "ndcg_at_k",
           "recall_at_k", "tune_fusion"]

#: chunks retrieved per document scored: rankings go this many times k chunks deep
CHUNKS_PER_DOC = 3


@dataclass
class EvalSet:
    """Queries and their judgements (``qrels[qid][doc] = grade``, grade > 0 relevant)."""

    name: str
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    #: queries in ``queries.jsonl`` without a judgement in this split (counted, not scored)
    unjudged: list[str] = field(default_factory=list)
    corpus: list[Document] | None = None
    split: str = "test"

    @property
    def judged(self) -> list[str]:
        return [q for q in self.queries if q in self.qrels]


# ---- metrics (document level, graded) -------------------------------------------------------


def recall_at_k(ranked: Sequence[str], relevant: dict[str, int], k: int) -> float:
    """Fraction of the relevant documents in the top ``k``."""
    rel = {d for d, g in relevant.items() if g > 0}
    return len(rel & set(ranked[:k])) / len(rel) if rel else 0.0


def mrr_at_k(ranked: Sequence[str], relevant: dict[str, int], k: int) -> float:
    """1 / rank of the first relevant document within the top ``k``, else 0."""
    for i, d in enumerate(ranked[:k], start=1):
        if relevant.get(d, 0) > 0:
            return 1.0 / i
    return 0.0


def ndcg_at_k(ranked: Sequence[str], relevant: dict[str, int], k: int) -> float:
    """``sum grade_i / log2(i + 1)`` over the top ``k``, over the ideal ordering's value
    (linear gains, as trec_eval and ranx's ``ndcg``)."""
    dcg = sum(relevant.get(d, 0) / math.log2(i + 1) for i, d in enumerate(ranked[:k], start=1))
    grades = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    ideal = sum(g / math.log2(i + 1) for i, g in enumerate(grades, start=1))
    return dcg / ideal if ideal > 0 else 0.0


METRICS: dict[str, Callable[[Sequence[str], dict[str, int], int], float]] = {
    "recall": recall_at_k, "mrr": mrr_at_k, "ndcg": ndcg_at_k}


def doc_ranking(hits: Iterable[Hit]) -> list[str]:
    """Documents in the order of their best chunk (a document counts once)."""
    seen: dict[str, None] = {}
    for h in hits:
        seen.setdefault(h.source, None)
    return list(seen)


# ---- sets ---------------------------------------------------------------------------------------


def _jsonl(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read ({exc.strerror})") from None
    return iter_jsonl_objects(path, text)


def load_beir(directory: str | Path, split: str = "test", with_corpus: bool = True) -> EvalSet:
    """A BEIR-layout set: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl``
    (``_id``, ``text``), ``qrels/<split>.tsv`` (header, then query-id, corpus-id, score).

    A malformed line is an InvalidInput naming the file and the line; judgements of unknown
    queries or documents are errors; queries without judgements are counted in ``unjudged``.
    """
    d = Path(directory)
    if not d.is_dir():
        raise InvalidInput(f"{d}: no such dataset directory")
    queries: dict[str, str] = {}
    for lineno, obj in _jsonl(d / "queries.jsonl"):
        qid, text = obj.get("_id"), obj.get("text")
        if not isinstance(qid, (str, int)) or not isinstance(text, str) or not text.strip():
            raise InvalidInput(f"{d / 'queries.jsonl'}:{lineno}: needs '_id' and a non-empty "
                               "'text'")
        queries[str(qid)] = text
    doc_ids: set[str] = set()
    docs = []
    for lineno, obj in _jsonl(d / "corpus.jsonl"):
        did, text = obj.get("_id"), obj.get("text")
        if not isinstance(did, (str, int)) or not isinstance(text, str):
            raise InvalidInput(f"{d / 'corpus.jsonl'}:{lineno}: needs '_id' and 'text'")
        title = obj.get("title") or ""
        doc_ids.add(str(did))
        if with_corpus:
            docs.append(Document(source=str(did), text=f"{title}\n\n{text}" if title else text,
                                 metadata={"title": title} if title else {}))
    corpus = docs if with_corpus else None
    qrels_path = d / "qrels" / f"{split}.tsv"
    qrels: dict[str, dict[str, int]] = {}
    try:
        lines = qrels_path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidInput(f"{qrels_path}: cannot read ({exc.strerror})") from None
    rows = list(csv.reader(lines, delimiter="\t"))
    for lineno, row in enumerate(rows, start=1):
        if lineno == 1 and row and not row[-1].strip().lstrip("-").isdigit():
            continue  # the header
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != 3 or not row[2].strip().lstrip("-").isdigit():
            raise InvalidInput(f"{qrels_path}:{lineno}: expected 'query-id<TAB>corpus-id"
                               f"<TAB>integer score', got {chr(9).join(row)!r}")
        qid, did, grade = row[0].strip(), row[1].strip(), int(row[2])
        if qid not in queries:
            raise InvalidInput(f"{qrels_path}:{lineno}: query {qid!r} is not in queries.jsonl")
        if did not in doc_ids:
            raise InvalidInput(f"{qrels_path}:{lineno}: document {did!r} is not in "
                               "corpus.jsonl")
        qrels.setdefault(qid, {})[did] = grade
    qrels = {q: r for q, r in qrels.items() if any(g > 0 for g in r.values())}
    if not qrels:
        raise InvalidInput(f"{qrels_path}: no positive judgements")
    in_split = set(qrels)
    other_splits = set()
    for other in (d / "qrels").glob("*.tsv"):
        if other != qrels_path:
            for row in csv.reader(other.read_text(encoding="utf-8").splitlines(),
                                  delimiter="\t"):
                if row:
                    other_splits.add(row[0].strip())
    # queries of this split without judgements (not those that belong to another split)
    unjudged = [q for q in queries if q not in in_split and q not in other_splits]
    return EvalSet(name=d.name, queries={q: queries[q] for q in queries
                                         if q in in_split or q in unjudged},
                   qrels=qrels, unjudged=unjudged, corpus=corpus, split=split)


def load_queries(path: str | Path) -> EvalSet:
    """JSONL, one query a line: ``{"query": ..., "relevant_sources": [...]}`` (documents,
    by source) — the form :func:`known_item_set` writes."""
    p = Path(path)
    queries, qrels = {}, {}
    for lineno, obj in _jsonl(p):
        srcs = obj.get("relevant_sources")
        if not isinstance(obj.get("query"), str) or not isinstance(srcs, list) or not srcs:
            raise InvalidInput(f"{p}:{lineno}: needs a string 'query' and a non-empty list "
                               "'relevant_sources'")
        qid = str(obj.get("id", lineno))
        queries[qid] = obj["query"]
        qrels[qid] = {str(s): 1 for s in srcs}
    if not queries:
        raise InvalidInput(f"{p}: no queries")
    return EvalSet(name=p.stem, queries=queries, qrels=qrels)


def known_item_set(docs: Sequence[Document], n: int = 200, min_words: int = 6,
                   sources: set[str] | None = None) -> EvalSet:
    """Queries made of documents' first sentences that are unique in the corpus (known-item:
    the query is text of its answer — a reference, not a measure of real questions)."""
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
    picked = unique[::step][:n]
    return EvalSet(name="known-item", queries={str(i): q for i, (q, _) in enumerate(picked)},
                   qrels={str(i): {src: 1} for i, (_, src) in enumerate(picked)})


# ---- running ------------------------------------------------------------------------------------


def _score(run: dict[str, list[str]], evalset: EvalSet, k: int) -> dict[str, float]:
    out = {}
    for name, metric in METRICS.items():
        vals = [metric(run.get(q, []), evalset.qrels[q], k) for q in evalset.judged]
        out[f"{name}@{k}"] = round(sum(vals) / len(vals), 6) if vals else 0.0
    return out


def _search(pipe: Any, evalset: EvalSet, depth: int, mode: str, fusion: Fusion | None,
            rerank: bool, batch: int) -> dict[str, list[Hit]]:
    qids = evalset.judged
    out: dict[str, list[Hit]] = {}
    for i in range(0, len(qids), batch):
        part = qids[i:i + batch]
        texts = [evalset.queries[q] for q in part]
        if rerank:
            hits = pipe.rerank_many(texts, k=depth, mode=mode)
        else:
            hits = pipe.search_many(texts, k=depth, mode=mode, fusion=fusion)
        out.update(zip(part, hits, strict=True))
    return out


def evaluate(pipe: Any, evalset: EvalSet, k: int = 10,
             runs: dict[str, tuple[str, Fusion | None, bool]] | None = None, batch: int = 64
             ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[str]]]]:
    """Metrics of each run ``name -> (mode, fusion or None for the pipeline's default,
    rerank)``, and each run's document rankings (``run[qid] = [doc, ...]``)."""
    runs = runs or {m: (m, None, False) for m in MODES}
    depth = k * CHUNKS_PER_DOC
    results, rankings = {}, {}
    for name, (mode, fusion, rerank) in runs.items():
        hits = _search(pipe, evalset, depth, mode, fusion, rerank, batch)
        rankings[name] = {q: doc_ranking(hs)[:k] for q, hs in hits.items()}
        results[name] = _score(rankings[name], evalset, k)
    return results, rankings


def fusion_grid() -> list[Fusion]:
    """Every method, dense weights 0.1-0.9 in steps of 0.05 (RRF also with rrf_k 10-100),
    anchoring the dense ranking's first 0-3 hits."""
    weights = [round(0.1 + 0.05 * i, 2) for i in range(17)]
    grid = []
    for anchor in (0, 1, 2, 3):
        grid += [Fusion(method=m, dense_weight=w, anchor=anchor)
                 for m in FUSIONS if m != "rrf" for w in weights]
        grid += [Fusion(method="rrf", dense_weight=w, rrf_k=rk, anchor=anchor)
                 for w in weights for rk in (10, 30, 60, 100)]
    return grid


def candidate_lists(pipe: Any, evalset: EvalSet, depth: int, batch: int = 64
                    ) -> tuple[dict[str, list[Hit]], dict[str, list[Hit]]]:
    """Each judged query's dense and BM25 candidates, ``depth`` deep (what hybrid fuses)."""
    return (_search(pipe, evalset, depth, "dense", None, False, batch),
            _search(pipe, evalset, depth, "sparse", None, False, batch))


def idf_sums(pipe: Any, evalset: EvalSet) -> dict[str, float]:
    """Each query's total BM25 term weight in the pipeline's index (what the adaptive fusion
    reads; empty when the index reports no BM25 statistics)."""
    stats = pipe.index.bm25_stats
    if stats is None:
        return {}
    qids = list(evalset.queries)
    return dict(zip(qids, stats.idf_sums([evalset.queries[q] for q in qids]), strict=True))


def fused_run(dense: dict[str, list[Hit]], sparse: dict[str, list[Hit]], fusion: Fusion,
              k: int, queries: dict[str, str] | None = None,
              idf_sums: dict[str, float] | None = None) -> dict[str, list[str]]:
    """Document rankings of ``fusion`` applied to the candidate lists (as the pipeline);
    ``queries``, ``idf_sums``: their texts and total BM25 term weights (the adaptive fusion
    reads them)."""
    run = {}
    for q in dense:
        by_id = {h.id: h for h in (*dense[q], *sparse.get(q, []))}
        ranked = fuse("hybrid", [(h.id, h.score) for h in dense[q]],
                      [(h.id, h.score) for h in sparse.get(q, [])], fusion,
                      (queries or {}).get(q), (idf_sums or {}).get(q))
        run[q] = doc_ranking(by_id[c] for c, _ in ranked)[:k]
    return run


#: tuning leaves the default unless both recall@k and MRR@k gain at least this much
MIN_GAIN = 0.005


def tune_fusion(pipe: Any, evalset: EvalSet, default: Fusion, k: int = 10,
                grid: Sequence[Fusion] | None = None, min_gain: float = MIN_GAIN
                ) -> tuple[Fusion, list[dict[str, Any]]]:
    """The fusion for this index, chosen on ``evalset`` (a tuning split): the grid point whose
    *smaller* gain over ``default`` — of recall@k and of MRR@k — is largest, if that gain is
    at least ``min_gain``; else ``default``.  A fusion is adopted only when it improves both
    measures, by more than a query or two's worth of noise; every grid point's metrics are
    returned too."""
    depth = max(k * CHUNKS_PER_DOC, pipe.config.candidates)
    dense, sparse = candidate_lists(pipe, evalset, depth)
    sums = idf_sums(pipe, evalset)
    base = _score(fused_run(dense, sparse, default, k, evalset.queries, sums), evalset, k)
    table = [{"fusion": default.model_dump(), "default": True, **base}]
    scored = []
    for f in grid or fusion_grid():
        metrics = _score(fused_run(dense, sparse, f, k, evalset.queries, sums), evalset, k)
        table.append({"fusion": f.model_dump(), **metrics})
        scored.append((f, metrics))
    gain, best = _best_gain(base, scored, k)
    if best is None or gain < min_gain:
        return default, table
    return best, table


def _best_gain(base: dict[str, float], scored: Sequence[tuple[Fusion, dict[str, float]]],
               k: int) -> tuple[float, Fusion | None]:
    """The fusion whose *smaller* gain over ``base`` (of recall@k and MRR@k) is largest, ties
    by the larger sum of the two; and that gain."""
    best: tuple[float, float, Fusion] | None = None
    for f, metrics in scored:
        gain = min(metrics[f"recall@{k}"] - base[f"recall@{k}"],
                   metrics[f"mrr@{k}"] - base[f"mrr@{k}"])
        total = metrics[f"recall@{k}"] + metrics[f"mrr@{k}"]
        if best is None or gain > best[0] + 1e-12 or (abs(gain - best[0]) <= 1e-12
                                                     and total > best[1] + 1e-12):
            best = (gain, total, f)
    return (best[0], best[2]) if best is not None else (0.0, None)


def format_table(results: dict[str, dict[str, float]]) -> str:
    cols = list(next(iter(results.values())))
    lines = ["| retrieval | " + " | ".join(cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)


def write_results(path: str | Path, payload: dict[str, Any]) -> None:
    """``payload`` as JSON, with the machine's CPU features beside it (quality figures can
    depend on them through the encoder, see :mod:`dask_rag.embed.encoder`)."""
    import os

    from dask_rag.cluster.workers import cpu_flags

    payload = {**payload, "machine": {"cpu_flags": cpu_flags(), "cores": os.cpu_count()}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")


# ---- self-tuning without labels -----------------------------------------------------------------

#: pseudo-queries an automatic tuning makes (at most; half choose, half check)
AUTO_QUERIES = 400


def _first_sentence(text: str) -> str | None:
    for sentence in split_sentences(" ".join(text.split())):
        if 5 <= len(sentence.split()) <= 40:
            return sentence
    return None


def _title_line(text: str) -> str | None:
    """A chunk's opening line when it reads as a title or heading (short, no full stop)."""
    head = text.strip().split("\n", 1)[0].strip().lstrip("#").strip()
    if head and 2 <= len(head.split()) <= 12 and not head.endswith((".", ":", ";", ",")) \
            and head != text.strip():
        return head
    return None


def pseudo_queries(index: Any, n: int = AUTO_QUERIES
                   ) -> tuple[EvalSet, dict[str, int]]:
    """Queries made from the corpus's own structure, for tuning without labels: a document's
    title or heading line, and its first sentence, each judged relevant to its document.  The
    chunk the query was cut from is excluded from the candidates (returned: query id -> chunk
    id), so a query must find its document through the document's *other* chunks — the text
    around it, not the copy of itself; documents of one chunk are not used."""
    import hashlib

    chunks: dict[str, list[int]] = {}
    for cid, source, _ in index.doc_index():
        if source:
            chunks.setdefault(source, []).append(int(cid))
    docs = sorted((s for s, ids in chunks.items() if len(ids) >= 2),
                  key=lambda s: hashlib.sha1(s.encode()).hexdigest())[:n]
    firsts = [min(chunks[s]) for s in docs]
    records = index.fetch(np.asarray(firsts, dtype=np.int64)) if firsts else []
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    excluded: dict[str, int] = {}
    for source, cid, rec in zip(docs, firsts, records, strict=True):
        text = (rec or {}).get("text") or ""
        for kind, query in (("title", _title_line(text)), ("first", _first_sentence(text))):
            if query and len(queries) < n:
                qid = f"{kind}:{source}"
                queries[qid], qrels[qid], excluded[qid] = query, {source: 1}, cid
    return EvalSet(name="auto", queries=queries, qrels=qrels), excluded


def autotune_fusion(pipe: Any, default: Fusion, k: int = 10, n: int = AUTO_QUERIES,
                    min_gain: float = MIN_GAIN) -> tuple[Fusion | None, dict[str, Any]]:
    """Tune the fusion on :func:`pseudo_queries` of the index itself (no labels): choose on
    half of them as :func:`tune_fusion` does, adopt the choice only when it also beats
    ``default`` on the other half (both recall@k and MRR@k no worse, their sum better).
    Returns the fusion to adopt (None: keep the default) and the evidence.

    Pseudo-queries are statements (titles, sentences), so with the ``adaptive`` default
    only its statement half is tuned (``dense_weight``); question-form queries keep the
    dense-led ranking the real-question sets chose."""
    import hashlib

    evalset, excluded = pseudo_queries(pipe.index, n)
    evidence: dict[str, Any] = {"pseudo_queries": len(evalset.queries), "adopted": False,
                                "default": default.model_dump()}
    if len(evalset.queries) < 20:
        evidence["reason"] = "fewer than 20 pseudo-queries (documents of 2+ chunks)"
        return None, evidence
    depth = max(k * CHUNKS_PER_DOC, pipe.config.candidates) + 1
    dense, sparse = candidate_lists(pipe, evalset, depth)
    for q, cid in excluded.items():  # a query may not find the copy of itself
        dense[q] = [h for h in dense.get(q, []) if h.id != cid]
        sparse[q] = [h for h in sparse.get(q, []) if h.id != cid]
    sums = idf_sums(pipe, evalset)
    halves: dict[str, EvalSet] = {}
    for half in ("choose", "check"):
        ids = [q for q in evalset.queries
               if (int(hashlib.sha1(q.encode()).hexdigest(), 16) % 2 == 0) == (half == "choose")]
        halves[half] = EvalSet(name=f"auto/{half}", queries={q: evalset.queries[q] for q in ids},
                               qrels={q: evalset.qrels[q] for q in ids}, split=half)

    def run(f: Fusion, half: str) -> dict[str, float]:
        e = halves[half]
        sub_d = {q: dense[q] for q in e.queries}
        return _score(fused_run(sub_d, sparse, f, k, e.queries, sums), e, k)

    if default.method == "adaptive":
        grid = [default.model_copy(update={"dense_weight": round(0.1 + 0.05 * i, 2)})
                for i in range(17)]
    else:
        grid = fusion_grid()
    base = run(default, "choose")
    gain, best = _best_gain(base, [(f, run(f, "choose")) for f in grid], k)
    assert best is not None
    evidence.update(chosen=best.model_dump(), choose={"default": base,
                                                       "chosen": run(best, "choose")})
    check = {"default": run(default, "check"), "chosen": run(best, "check")}
    evidence["check"] = check
    d_r = check["chosen"][f"recall@{k}"] - check["default"][f"recall@{k}"]
    d_m = check["chosen"][f"mrr@{k}"] - check["default"][f"mrr@{k}"]
    if gain < min_gain:
        evidence["reason"] = f"no fusion gains >= {min_gain} on the choosing half"
        return None, evidence
    if min(d_r, d_m) < 0 or d_r + d_m <= 0:
        evidence["reason"] = "the choice does not beat the default on the checking half"
        return None, evidence
    evidence["adopted"] = True
    return best, evidence


# ---- grounded answers ---------------------------------------------------------------------------

_MARKER = re.compile(r"\s*\[(\d+)\]")
_WORDS = re.compile(r"[a-z0-9]+")
#: an answer sentence counts as supported when this share of its words are in a cited passage
SUPPORT_OVERLAP = 0.8


def _content_words(text: str) -> list[str]:
    return [w for w in _WORDS.findall(text.lower()) if len(w) > 2]


def answer_sentences(text: str) -> list[tuple[str, list[int]]]:
    """An answer's sentences with the passage numbers each cites (``... [2] ... [1]``: a
    citation marker closes the text before it)."""
    out: list[tuple[str, list[int]]] = []
    pos = 0
    for m in _MARKER.finditer(text):
        sentence = text[pos:m.start()].strip()
        if sentence:
            out.append((sentence, [int(m.group(1))]))
        elif out:
            out[-1][1].append(int(m.group(1)))
        pos = m.end()
    tail = text[pos:].strip()
    if tail:
        out.append((tail, []))
    return out


def grade_answer(text: str, citations: Sequence[Hit], relevant: dict[str, int]
                 ) -> dict[str, float]:
    """One answer's grounding: which cited passages come from a relevant document, whether the
    first sentence does, and how many sentences are supported by the passage they cite (at
    least :data:`SUPPORT_OVERLAP` of the sentence's words appear in it)."""
    rel = {d for d, g in relevant.items() if g > 0}
    sentences = answer_sentences(text)
    cited = [n for _, ns in sentences for n in ns if 1 <= n <= len(citations)]
    docs = [citations[n - 1].source for n in dict.fromkeys(cited)]
    supported = 0
    for sentence, ns in sentences:
        words = _content_words(sentence)
        passage = set()
        for n in ns:
            if 1 <= n <= len(citations):
                passage |= set(_content_words(citations[n - 1].text or ""))
        if words and sum(w in passage for w in words) >= SUPPORT_OVERLAP * len(words):
            supported += 1
    first = sentences[0][1] if sentences else []
    return {
        "citation_precision": (sum(d in rel for d in docs) / len(docs)) if docs else 0.0,
        "citation_recall": (len(rel & set(docs)) / len(rel)) if rel else 0.0,
        "first_sentence_relevant": float(any(1 <= n <= len(citations)
                                             and citations[n - 1].source in rel
                                             for n in first)),
        "supported": supported / len(sentences) if sentences else 0.0,
        "context_recall": float(bool(rel & {h.source for h in citations})),
    }


def answer_quality(pipe: Any, evalset: EvalSet, k: int = 5, batch: int = 32
                   ) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Mean :func:`grade_answer` over the judged questions (each asked through the
    pipeline's generator with ``k`` passages), and every question's answer and grades."""
    qids = evalset.judged
    per: dict[str, dict[str, Any]] = {}
    for i in range(0, len(qids), batch):
        part = qids[i:i + batch]
        answers = pipe.ask_many([evalset.queries[q] for q in part], k=k)
        for q, answer in zip(part, answers, strict=True):
            per[q] = {"answer": answer.text,
                      **grade_answer(answer.text, answer.citations, evalset.qrels[q])}
    keys = ("citation_precision", "citation_recall", "first_sentence_relevant", "supported",
            "context_recall")
    n = max(1, len(per))
    return {key: round(sum(p[key] for p in per.values()) / n, 6) for key in keys}, per
