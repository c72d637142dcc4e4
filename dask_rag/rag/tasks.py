"""The RAG tasks of a query graph, after the index's search tasks: the final merge, fusion,
rerank and generation, as *one* task that takes the shards' results.

Every level of a Dask graph costs a scheduling round trip (measured here: ~3-4 ms a level on
a 2-worker LocalCluster, ~6 ms for a one-level graph end to end), so the stages after the
shard searches are not tasks of their own: :func:`retrieve_task` (search) and
:func:`answer_task` / :func:`stream_task` (ask) run them in one task, on the worker that holds
the models.  Models (cross-encoder, generator) come from the worker's model cache.
"""

from __future__ import annotations

import asyncio
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
    "GenerationPlan",
    "RerankPlan",
    "RetrievalPlan",
    "Retrieved",
    "answer_batch",
    "answer_task",
    "fused_candidates",
    "local_generator",
    "prompt_batch",
    "prompt_task",
    "rerank",
    "retrieve",
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
    #: the queries' texts and total BM25 term weights (the adaptive fusion reads them)
    texts: tuple[str, ...] = ()
    idf_sums: tuple[float, ...] = ()
    #: wall-clock time the client submitted the graph: the search tasks' start, less this,
    #: is the embedding stage (plus scheduling), measured without a round trip
    submitted_at: float = 0.0


def _ranked(I: npt.NDArray[np.int64], S: npt.NDArray[np.float32], recs: Sequence[Any]
            ) -> tuple[list[tuple[int, float]], list[Any]]:
    """One query row's ``(id, score)`` pairs and their records (if any), padding dropped."""
    keep = I >= 0
    kept = [rec for rec, k in zip(recs, keep.tolist(), strict=False) if k]
    return list(zip(I[keep].tolist(), S[keep].tolist(), strict=True)), kept


def _record(cid: int, *lists: tuple[list[tuple[int, float]], Sequence[Any]]) -> Any:
    """The record of ``cid``: its first place in the dense list, else in the BM25 list (a
    record is looked up only for the hits kept, not for every candidate)."""
    for ranked, recs in lists:
        if not len(recs):
            continue
        for pos, (c, _) in enumerate(ranked):
            if c == cid:
                return recs[pos]
    return None


def fused_candidates(res: ShardResult, plan: RetrievalPlan) -> list[list[Hit]]:
    """Fuse dense and sparse hits of a merged result into ``plan.keep`` hits per query.

    Fusion works on ``(id, score)`` pairs; :class:`Hit` objects (whose records' metadata is
    JSON to parse) are built only for the kept ones.
    """
    nq = plan.nq
    empty: tuple[list[tuple[int, float]], list[Any]] = ([], [])
    dense = [empty] * nq
    sparse = [empty] * nq
    for j, row in enumerate(res.rows.tolist()):
        dense[row] = _ranked(res.I[j], res.D[j],
                             res.payload[j] if res.payload is not None else [])
    if res.sparse is not None:
        sp = res.sparse
        for local, row in enumerate(sp.rows.tolist()):
            sparse[row] = _ranked(sp.I[local], sp.S[local], sp.payload[local])
    out = []
    texts = plan.texts or ("",) * nq
    sums: Sequence[float | None] = plan.idf_sums or (None,) * nq
    for d, s_, text, idf_sum in zip(dense, sparse, texts, sums, strict=True):
        ranked = fuse(plan.mode, d[0], s_[0], plan.fusion, text, idf_sum)
        out.append([Hit.from_record(_record(c, d, s_), c, score)
                    for c, score in ranked[:plan.keep]])
    return out


def retrieve(plan: RetrievalPlan, parts: Sequence[ShardResult]) -> Retrieved:
    """The final merge of the shards' answers and the fusion (in a task, or in the client
    for a small batch: see :data:`dask_rag.pipeline.SMALL_BATCH`)."""
    t0 = time.perf_counter()
    merged = merge_results(plan.nq, plan.depth, plan.metric, parts)
    cands = fused_candidates(merged, plan)
    timings = {"search": merged.search_ms, "fuse": (time.perf_counter() - t0) * 1e3}
    if plan.mode != "sparse" and plan.submitted_at and merged.started_at:
        timings = {"embed": max(0.0, merged.started_at - plan.submitted_at) * 1e3, **timings}
    return cands, timings


@dataclass(frozen=True)
class RerankPlan:
    """Re-order each question's candidates by a cross-encoder, keeping the best ``k``."""

    model: str
    k: int
    questions: tuple[str, ...]


def rerank(plan: RerankPlan, retrieved: Retrieved) -> Retrieved:
    from dask_rag.rag.rerank import rerank_scores_task

    t0 = time.perf_counter()
    cands, timings = retrieved
    scores = rerank_scores_task(plan.model, list(plan.questions),
                                [[h.text for h in c] for c in cands])
    out = [reorder_hits(c, s, plan.k) for c, s in zip(cands, scores, strict=True)]
    return out, {**timings, "rerank": (time.perf_counter() - t0) * 1e3}


def retrieve_task(plan: RetrievalPlan, rerank_plan: RerankPlan | None, *parts: ShardResult
                  ) -> Retrieved:
    """The last task of a search graph: merge, fuse, [rerank]."""
    retrieved = retrieve(plan, parts)
    return retrieved if rerank_plan is None else rerank(rerank_plan, retrieved)


def local_generator(spec: GeneratorSpec, max_sentences: int) -> Any | None:
    """The generator ``spec`` names if it needs no model, so that any process may run it —
    the extractive one (term scoring), or an ``openai:`` upstream's prompt side (the
    upstream is called from the client: here only its prompts are built, counted in words
    and marks — the upstream's tokenizer is not here, and a budget under its context length
    leaves room for the difference); None for a model (``hf:`` / ``vllm:``)."""
    from dask_rag.rag.generate.extractive import ExtractiveGenerator

    if spec.kind == "openai":
        return ExtractiveGenerator()
    if spec.kind == "extractive":
        return ExtractiveGenerator(max_sentences=max_sentences)
    return None


def worker_generator(spec: GeneratorSpec, max_sentences: int) -> Any:
    """The generator ``spec`` names, loaded once per worker."""
    local = local_generator(spec, max_sentences)
    if local is not None:
        return local
    return worker_model_cache().get(("generator", str(spec), max_sentences),
                                    lambda: load_generator(spec))


def _prompts(gen: Any, cfg: RagConfig, questions: list[str], cands: list[list[Hit]],
             history: tuple[tuple[str, str], ...] = ()) -> list[Any]:
    from dask_rag.rag.prompt import build_prompt

    return [build_prompt(q, c, gen.count_tokens, cfg.token_budget,
                         dedup_threshold=cfg.dedup_threshold, history=history)
            for q, c in zip(questions, cands, strict=True)]


@dataclass(frozen=True)
class GenerationPlan:
    """How the last task of an ask graph answers: which generator, with what settings."""

    spec: GeneratorSpec
    config: RagConfig
    params: SamplingParams
    questions: tuple[str, ...]
    k: int
    #: earlier chat turns ``(role, text)`` (requests with equal options share them)
    history: tuple[tuple[str, str], ...] = ()


def _prepare(plan: RetrievalPlan, rerank_plan: RerankPlan | None, gen: GenerationPlan,
             parts: Sequence[ShardResult], generator: Any
             ) -> tuple[list[list[Hit]], list[Any], dict[str, float], float]:
    """Merge, fuse, [rerank], keep ``gen.k`` passages per question and build the prompts
    under the budget (``generator`` counts their tokens): the passages, the prompts, the
    retrieval's stage timings and the milliseconds the prompts took."""
    cands, timings = retrieve_task(plan, rerank_plan, *parts)
    t0 = time.perf_counter()
    cands = [c[:gen.k] for c in cands]
    prompts = _prompts(generator, gen.config, list(gen.questions), cands, gen.history)
    return cands, prompts, timings, (time.perf_counter() - t0) * 1e3


def _fields(hits: list[Hit], prompt: Any, timings: dict[str, float]) -> dict[str, Any]:
    """An answer's fields that come from its retrieval and prompt."""
    by_id = {h.id: h for h in hits}
    return {"citations": [by_id[i] for i in prompt.citations], "hits": hits,
            "prompt_tokens": prompt.tokens, "timings": timings}


def answer_task(plan: RetrievalPlan, rerank_plan: RerankPlan | None, gen: GenerationPlan,
                *parts: ShardResult) -> list[dict[str, Any]]:
    """The last task of an ask graph: merge, fuse, [rerank], build the prompts under the token
    budget and generate the batch, on the worker holding the generator — one task, so a
    question costs one scheduling round trip after the shards answer."""
    generator = worker_generator(gen.spec, gen.config.max_answer_sentences)
    return answer_batch(plan, rerank_plan, gen, parts, generator)


def answer_batch(plan: RetrievalPlan, rerank_plan: RerankPlan | None, gen: GenerationPlan,
                 parts: Sequence[ShardResult], generator: Any) -> list[dict[str, Any]]:
    """What :func:`answer_task` does, with ``generator`` — on a worker, or in the client for
    a generator that needs no model (:func:`local_generator`): the same answers."""
    cands, prompts, timings, prompt_ms = _prepare(plan, rerank_plan, gen, parts, generator)
    t0 = time.perf_counter()
    texts = generator.generate([p.text for p in prompts], gen.params)
    gen_ms = prompt_ms + (time.perf_counter() - t0) * 1e3  # prompts and generation
    completion = generator.count_tokens(texts) if texts else []
    return [{**_fields(c, p, {**timings, "generate": gen_ms}), "text": text,
             "completion_tokens": n_out}
            for c, p, text, n_out in zip(cands, prompts, texts, completion, strict=True)]


def prompt_task(plan: RetrievalPlan, rerank_plan: RerankPlan | None, gen: GenerationPlan,
                *parts: ShardResult) -> list[dict[str, Any]]:
    """The last task of an ask graph whose generator is an upstream server: merge, fuse,
    [rerank] and build the prompts; the client sends them (``openai:`` generators)."""
    return prompt_batch(plan, rerank_plan, gen, parts,
                        worker_generator(gen.spec, gen.config.max_answer_sentences))


def prompt_batch(plan: RetrievalPlan, rerank_plan: RerankPlan | None, gen: GenerationPlan,
                 parts: Sequence[ShardResult], generator: Any) -> list[dict[str, Any]]:
    """What :func:`prompt_task` does, with ``generator`` (see :func:`answer_batch`)."""
    cands, prompts, timings, _ = _prepare(plan, rerank_plan, gen, parts, generator)
    return [{**_fields(c, p, dict(timings)), "prompt": p.text}
            for c, p in zip(cands, prompts, strict=True)]


def stream_task(plan: RetrievalPlan, rerank_plan: RerankPlan | None, gen: GenerationPlan,
                queue_name: str, *parts: ShardResult) -> int:
    """Answer one question on a worker, pushing events to a Dask Queue as they come:
    ``retrieved`` (its stage timings), ``citations``, ``text`` pieces, then ``end``."""
    from distributed import Queue

    queue = Queue(queue_name)
    cands, timings = retrieve_task(plan, rerank_plan, *parts)
    hits = cands[0][:gen.k]
    queue.put({"event": "retrieved", "timings_ms": timings})
    generator = worker_generator(gen.spec, gen.config.max_answer_sentences)
    prompt = _prompts(generator, gen.config, [gen.questions[0]], [hits], gen.history)[0]
    by_id = {h.id: h for h in hits}
    queue.put({"event": "citations", "citations": [
        dict(by_id[i].to_dict(), n=n + 1) for n, i in enumerate(prompt.citations)],
        "prompt_tokens": prompt.tokens})

    async def run() -> list[str]:
        pieces = []
        async for piece in generator.stream(prompt.text, gen.params):
            queue.put({"event": "text", "text": piece})
            pieces.append(piece)
        return pieces

    try:
        pieces = asyncio.run(run())
    except BaseException as exc:
        queue.put({"event": "error", "type": type(exc).__name__, "message": str(exc)})
        raise
    queue.put({"event": "end",
               "completion_tokens": generator.count_tokens(["".join(pieces)])[0]})
    return len(pieces)
