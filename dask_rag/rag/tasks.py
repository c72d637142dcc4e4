"""The RAG tasks of a query graph, after the index's search tasks: fuse, rerank, generate.

Each takes the previous stage's future, so a whole batch — embed, route, shard searches,
merge, fuse, rerank, generate — is one graph submitted once, and nothing comes back to the
client between stages.  Models (cross-encoder, generator) come from the worker's model cache.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from dask_rag.cluster.plugins import worker_model_cache
from dask_rag.config import RagConfig
from dask_rag.index.merge import merge_results
from dask_rag.index.query import ShardResult
from dask_rag.rag.fusion import Fusion, fuse
from dask_rag.rag.generate import load_generator
from dask_rag.rag.generate.base import GeneratorSpec, SamplingParams
from dask_rag.rag.hits import Hit, reorder_hits

__all__ = [
    "RetrievalPlan",
    "Retrieved",
    "fused_candidates",
    "generate_task",
    "rerank_task",
    "retrieve_task",
    "stream_task",
    "worker_generator",
]

#: per query, its hits (best first), and the batch's stage timings in milliseconds
Retrieved = tuple[list[list[Hit]], dict[str, float]]


@dataclass(frozen=True)
class RetrievalPlan:
    """How the retrieve task turns the shards' answers into each query's hits."""

    nq: int
    depth: int  # hits per retriever (dense, BM25) that the shards returned
    metric: str
    mode: str
    fusion: Fusion
    keep: int  # fused hits kept per query
    #: wall-clock time the client submitted the graph: the search tasks' start, less this,
    #: is the embedding stage (plus scheduling), measured without a round trip
    submitted_at: float = 0.0


def _ranked(I: npt.NDArray[np.int64], S: npt.NDArray[np.float32], recs: Sequence[Any],
            into: dict[int, Any]) -> list[tuple[int, float]]:
    """One query row's ``(id, score)`` pairs, padding dropped; records go into ``into``."""
    keep = I >= 0
    ids = I[keep].tolist()
    if len(recs):
        for cid, rec in zip(ids, itertools.compress(recs, keep.tolist()), strict=True):
            into.setdefault(cid, rec)
    return list(zip(ids, S[keep].tolist(), strict=True))


def fused_candidates(res: ShardResult, plan: RetrievalPlan) -> list[list[Hit]]:
    """Fuse dense and sparse hits of a merged result into ``plan.keep`` hits per query.

    Fusion works on ``(id, score)`` pairs; :class:`Hit` objects (whose records' metadata is
    JSON to parse) are built only for the kept ones.
    """
    nq = plan.nq
    dense: list[list[tuple[int, float]]] = [[] for _ in range(nq)]
    sparse: list[list[tuple[int, float]]] = [[] for _ in range(nq)]
    records: list[dict[int, Any]] = [{} for _ in range(nq)]
    for j, row in enumerate(res.rows):
        r = int(row)
        dense[r] = _ranked(res.I[j], res.D[j],
                           res.payload[j] if res.payload is not None else [], records[r])
    if res.sparse is not None:
        sp = res.sparse
        for local, row in enumerate(sp.rows):
            r = int(row)
            sparse[r] = _ranked(sp.I[local], sp.S[local], sp.payload[local], records[r])
    out = []
    for d, s_, recs in zip(dense, sparse, records, strict=True):
        ranked = fuse(plan.mode, d, s_, plan.fusion)
        out.append([Hit.from_record(recs.get(c), c, score) for c, score in ranked[:plan.keep]])
    return out


def retrieve_task(plan: RetrievalPlan, *parts: ShardResult) -> Retrieved:
    """The final merge of the shards' answers and the fusion, as one task of the graph."""
    t0 = time.perf_counter()
    merged = merge_results(plan.nq, plan.depth, plan.metric, parts)
    cands = fused_candidates(merged, plan)
    timings = {"search": merged.search_ms, "fuse": (time.perf_counter() - t0) * 1e3}
    if plan.mode != "sparse" and plan.submitted_at and merged.started_at:
        timings = {"embed": max(0.0, merged.started_at - plan.submitted_at) * 1e3, **timings}
    return cands, timings


def rerank_task(model: str, k: int, questions: list[str], retrieved: Retrieved) -> Retrieved:
    """Re-order each question's candidates by the cross-encoder, keeping the best ``k``."""
    from dask_rag.rag.rerank import rerank_scores_task

    t0 = time.perf_counter()
    cands, timings = retrieved
    scores = rerank_scores_task(model, questions, [[h.text for h in c] for c in cands])
    out = [reorder_hits(c, s, k) for c, s in zip(cands, scores, strict=True)]
    return out, {**timings, "rerank": (time.perf_counter() - t0) * 1e3}


def worker_generator(spec: GeneratorSpec, max_sentences: int) -> Any:
    """The generator ``spec`` names, loaded once per worker."""
    opts = {"max_sentences": max_sentences} if spec.kind == "extractive" else {}
    return worker_model_cache().get(("generator", str(spec), max_sentences),
                                    lambda: load_generator(spec, **opts))


def _prompts(gen: Any, cfg: RagConfig, questions: list[str], cands: list[list[Hit]]) -> list[Any]:
    from dask_rag.rag.prompt import build_prompt

    return [build_prompt(q, c, gen.count_tokens, cfg.token_budget,
                         dedup_threshold=cfg.dedup_threshold)
            for q, c in zip(questions, cands, strict=True)]


def generate_task(spec: GeneratorSpec, cfg: RagConfig, params: SamplingParams,
                  questions: list[str], k: int, retrieved: Retrieved) -> list[dict[str, Any]]:
    """Build the prompts and generate the whole batch on the worker holding the generator."""
    t0 = time.perf_counter()
    cands, timings = retrieved
    cands = [c[:k] for c in cands]
    gen = worker_generator(spec, cfg.max_answer_sentences)
    prompts = _prompts(gen, cfg, questions, cands)
    texts = gen.generate([p.text for p in prompts], params)
    gen_ms = (time.perf_counter() - t0) * 1e3
    out = []
    for c, p, text in zip(cands, prompts, texts, strict=True):
        by_id = {h.id: h for h in c}
        out.append({"text": text, "citations": [by_id[i] for i in p.citations], "hits": c,
                    "prompt_tokens": p.tokens, "timings": {**timings, "generate": gen_ms}})
    return out


def stream_task(spec: GeneratorSpec, cfg: RagConfig, params: SamplingParams, question: str,
                k: int, queue_name: str, retrieved: Retrieved) -> int:
    """Generate one answer on a worker, pushing events to a Dask Queue as they come:
    ``retrieved`` (its stage timings), ``citations``, ``text`` pieces, then ``end``."""
    from distributed import Queue

    queue = Queue(queue_name)
    cands, timings = retrieved
    hits = cands[0][:k]
    queue.put({"event": "retrieved", "timings_ms": timings})
    gen = worker_generator(spec, cfg.max_answer_sentences)
    prompt = _prompts(gen, cfg, [question], [hits])[0]
    by_id = {h.id: h for h in hits}
    queue.put({"event": "citations", "citations": [
        dict(by_id[i].to_dict(), n=n + 1) for n, i in enumerate(prompt.citations)],
        "prompt_tokens": prompt.tokens})

    async def run() -> int:
        count = 0
        async for piece in gen.stream(prompt.text, params):
            queue.put({"event": "text", "text": piece})
            count += 1
        return count

    try:
        n = asyncio.run(run())
    except BaseException as exc:
        queue.put({"event": "error", "type": type(exc).__name__, "message": str(exc)})
        raise
    queue.put({"event": "end"})
    return n
