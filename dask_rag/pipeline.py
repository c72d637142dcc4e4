"""`RagPipeline`: questions in, hits and grounded answers out — one Dask graph per batch.

A batch of questions flows::

    embed (encoder on a worker)  ─►  route (coarse quantizer, here)
      ─►  search + fetch text  (one task per shard that can hold an answer; dense and BM25
                                in the same task, next to the shard)
      ─►  retrieve  (merge the shards' top-k, fuse dense + sparse by RRF)
      ─►  [rerank]  (cross-encoder on a worker, all pairs of the batch in one call)
      ─►  generate  (build each prompt under the token budget, generate the batch)

Everything after the embedding is submitted at once, as one graph; the client waits twice (for
the query vectors, which routing needs, and for the answers).  Successive batches overlap when
driven from asyncio (``aask`` through the micro-batcher keeps two batches in flight).  Every
:class:`Answer` carries per-stage timings in milliseconds.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from distributed import Client, Future

from dask_rag.batching import MicroBatcher
from dask_rag.config import BatchConfig, EmbedConfig, RagConfig
from dask_rag.embed.encoder import recorded_config
from dask_rag.embed.service import EmbeddingService
from dask_rag.errors import InvalidInput
from dask_rag.index.distributed import DistributedIndex, await_future, merge_results_task
from dask_rag.index.shard import SearchFilter, ShardResult
from dask_rag.rag.fusion import fuse
from dask_rag.rag.generate.base import GeneratorSpec, SamplingParams, parse_generator_spec

__all__ = ["Answer", "Hit", "RagPipeline"]


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk."""

    id: int
    score: float
    text: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": self.score, "text": self.text, "source": self.source,
                "metadata": self.metadata}

    @classmethod
    def from_record(cls, rec: dict[str, Any] | None, cid: int, score: float) -> Hit:
        rec = rec or {}
        meta = rec.get("metadata")
        if isinstance(meta, str):
            try:
                meta = json.loads(meta)
            except json.JSONDecodeError:
                meta = {"raw": meta}
        return cls(id=int(cid), score=float(score), text=rec.get("text") or "",
                   source=rec.get("source") or "", metadata=meta or {})


@dataclass
class Answer:
    """A generated answer; ``citations[n - 1]`` is the passage cited as ``[n]``."""

    question: str
    text: str
    citations: list[Hit]
    timings_ms: dict[str, float]
    hits: list[Hit] = field(default_factory=list)
    prompt_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.text,
                "citations": [dict(h.to_dict(), n=i + 1) for i, h in enumerate(self.citations)],
                "prompt_tokens": self.prompt_tokens,
                "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()}}


# ------------------------------------------------------------------------------------------------
# tasks
# ------------------------------------------------------------------------------------------------


def _ranked(I: npt.NDArray[np.int64], S: npt.NDArray[np.float32], recs: Sequence[Any],
            into: dict[int, Any]) -> list[tuple[int, float]]:
    """One query row's ``(id, score)`` pairs, padding dropped; records go into ``into``."""
    keep = I >= 0
    ids = I[keep].tolist()
    if len(recs):
        for cid, rec in zip(ids, itertools.compress(recs, keep.tolist()), strict=True):
            into.setdefault(cid, rec)
    return list(zip(ids, S[keep].tolist(), strict=True))


def fused_candidates(res: ShardResult, nq: int, cfg: RagConfig, mode: str, n: int
                     ) -> list[list[Hit]]:
    """Fuse dense and sparse hits of a merged result into ``n`` candidates per query.

    Fusion works on ``(id, score)`` pairs; :class:`Hit` objects (whose records' metadata is
    JSON to parse) are built only for the ``n`` kept — on the serving path that was most of
    the client's CPU per request.
    """
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
        ranked = fuse(mode, d, s_, cfg.fusion, cfg.rrf_k, cfg.dense_weight)
        out.append([Hit.from_record(recs.get(c), c, score) for c, score in ranked[:n]])
    return out


def retrieve_task(nq: int, k: int, metric: str, cfg: RagConfig, mode: str, n: int,
                  *parts: ShardResult) -> tuple[list[list[Hit]], dict[str, float]]:
    """Final merge of the shards' answers + fusion, as one task of the graph."""
    t0 = time.perf_counter()
    merged = merge_results_task(nq, k, metric, *parts)
    cands = fused_candidates(merged, nq, cfg, mode, n)
    return cands, {"search": merged.search_ms, "fuse": (time.perf_counter() - t0) * 1e3}


def rerank_task(model: str, top_k: int, questions: list[str],
                retrieved: tuple[list[list[Hit]], dict[str, float]]
                ) -> tuple[list[list[Hit]], dict[str, float]]:
    from dask_rag.rag.rerank import rerank_scores_task

    t0 = time.perf_counter()
    cands, timings = retrieved
    scores = rerank_scores_task(model, questions, [[h.text for h in c] for c in cands])
    out = []
    for c, s in zip(cands, scores, strict=True):
        order = sorted(range(len(c)), key=lambda i: (-s[i], i))[:top_k]
        out.append([Hit(c[i].id, s[i], c[i].text, c[i].source, c[i].metadata) for i in order])
    return out, {**timings, "rerank": (time.perf_counter() - t0) * 1e3}


def worker_generator(spec: GeneratorSpec, max_sentences: int) -> Any:
    from dask_rag.plugins import worker_model_cache
    from dask_rag.rag.generate import load_generator

    opts = {"max_sentences": max_sentences} if spec.kind == "extractive" else {}
    return worker_model_cache().get(("generator", str(spec), max_sentences),
                                    lambda: load_generator(spec, **opts))


def _prompts(gen: Any, cfg: RagConfig, questions: list[str], cands: list[list[Hit]]) -> list[Any]:
    from dask_rag.rag.prompt import build_prompt

    return [build_prompt(q, c, gen.count_tokens, cfg.token_budget,
                         dedup_threshold=cfg.dedup_threshold)
            for q, c in zip(questions, cands, strict=True)]


def generate_task(spec: GeneratorSpec, cfg: RagConfig, params: SamplingParams,
                  questions: list[str], k: int,
                  retrieved: tuple[list[list[Hit]], dict[str, float]]) -> list[dict[str, Any]]:
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
                hits: list[Hit], queue_name: str) -> int:
    """Generate one answer on a worker, pushing events to a Dask Queue as they come."""
    from distributed import Queue

    queue = Queue(queue_name)
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


# ------------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------------

_TRANSIENT = ("KilledWorker", "FutureCancelledError", "CancelledError", "CommClosedError",
              "ShardUnavailable", "OSError", "TimeoutError", "ConnectionRefusedError")


def _transient(exc: BaseException) -> bool:
    """A failure that a retry can fix: a worker or connection lost mid-request."""
    from dask_rag.errors import DaskRagError, ShardUnavailable

    if isinstance(exc, ShardUnavailable):
        return True
    if isinstance(exc, DaskRagError):
        return False  # bad input, overload, ...: retrying would not help
    return type(exc).__name__ in _TRANSIENT


def _gave_up(first: BaseException, second: BaseException) -> Exception:
    from dask_rag.errors import ShardUnavailable

    return ShardUnavailable(f"request failed twice while the cluster was changing: "
                            f"{type(first).__name__}, then {type(second).__name__}: {second}")


def retry_once(fn: Any) -> Any:
    """Run ``fn``; if a worker or connection was lost under it, run it once more, then report
    :class:`~dask_rag.errors.ShardUnavailable` (HTTP 503)."""
    try:
        return fn()
    except Exception as exc:
        if not _transient(exc):
            raise
        first = exc
    try:
        return fn()
    except Exception as exc:
        if not _transient(exc):
            raise
        raise _gave_up(first, exc) from exc


async def aretry_once(fn: Any) -> Any:
    """:func:`retry_once` for a coroutine function."""
    try:
        return await fn()
    except Exception as exc:
        if not _transient(exc):
            raise
        first = exc
    try:
        return await fn()
    except Exception as exc:
        if not _transient(exc):
            raise
        raise _gave_up(first, exc) from exc



class RagPipeline:
    """Embedder + sharded index + generator wired together on one Dask client."""

    def __init__(self, client: Client, index: DistributedIndex, embedder: EmbeddingService,
                 config: RagConfig | None = None, batch: BatchConfig | None = None) -> None:
        if embedder.dim != index.dim:
            raise InvalidInput(f"encoder dimension {embedder.dim} does not match the index "
                               f"dimension {index.dim}")
        self.client = client
        self.index = index
        self.embedder = embedder
        self.config = config or RagConfig()
        self.generator_spec = parse_generator_spec(self.config.generator)
        from dask_rag.cluster import resource_request

        # LLM generators run on workers declaring a 'generator' resource, when there are any
        self._generator_resources = (resource_request(client, "generator")
                                     if self.generator_spec.kind != "extractive" else None)
        if self.config.rerank_model:
            from dask_rag.rag.rerank import resolve_reranker_path

            resolve_reranker_path(self.config.rerank_model)
        self._ask_batcher: MicroBatcher[tuple[str, dict[str, Any]], Answer] = MicroBatcher(
            self._ask_batch, batch or BatchConfig(max_batch=64), name="ask")
        self._search_batcher: MicroBatcher[tuple[str, dict[str, Any]],
                                           tuple[list[Hit], dict[str, float]]] = \
            MicroBatcher(self._search_batch, batch or BatchConfig(max_batch=128), name="search")

    @classmethod
    def from_index_dir(cls, client: Client, path: str | Path, config: RagConfig | None = None,
                       embed: EmbedConfig | None = None, batch: BatchConfig | None = None
                       ) -> RagPipeline:
        """Open an ingested index with the encoder recorded in its manifest."""
        config = config or RagConfig()
        parse_generator_spec(config.generator)  # bad specs fail before anything loads
        index = DistributedIndex.load(client, path)
        try:
            recorded = index.manifest.get("embed") or {}
            if not recorded and embed is None:
                raise InvalidInput(f"{path}: the index records no encoder; pass embed=...")
            # the index's own encoder settings, not what "auto" means on this machine
            embed = recorded_config(recorded, embed) if recorded else embed
            embedder = EmbeddingService(client, embed, batch)
            return cls(client, index, embedder, config, batch)
        except BaseException:
            index.close()
            raise

    # ---- validation ---------------------------------------------------------------------------

    def check_query(self, query: Any, what: str = "question") -> str:
        if not isinstance(query, str):
            raise InvalidInput(f"{what} must be a string, got {type(query).__name__}")
        if not query.strip():
            raise InvalidInput(f"{what} is empty")
        if len(query) > self.config.max_question_chars:
            raise InvalidInput(f"{what} is {len(query)} characters long; the limit is "
                               f"{self.config.max_question_chars} (RagConfig.max_question_chars)")
        return query

    def _check_k(self, k: int | None) -> int:
        from dask_rag.index.distributed import check_k

        return check_k(self.config.k if k is None else k, self.index.spec.max_k)

    def _mode(self, mode: str | None) -> str:
        mode = mode or self.config.mode
        if mode not in ("dense", "sparse", "hybrid"):
            raise InvalidInput(f"mode={mode!r} is invalid: must be 'dense', 'sparse' or "
                               "'hybrid'")
        return mode

    def _n_candidates(self, k: int) -> int:
        """How deep each retriever (dense, BM25) goes before fusion."""
        return min(max(k, self.config.candidates, self._n_rerank(k)), self.index.spec.max_k)

    def _n_rerank(self, k: int) -> int:
        """How many fused candidates the cross-encoder sees (k when there is no rerank)."""
        if not self.config.rerank_model:
            return k
        return min(max(k, self.config.rerank_top_n), self.index.spec.max_k)

    # ---- retrieval ----------------------------------------------------------------------------

    def _embed(self, queries: list[str], mode: str) -> np.ndarray:
        if mode == "sparse":  # BM25 only: no query vectors needed
            return np.zeros((len(queries), self.index.dim), dtype=np.float32)
        return self.embedder.embed_now(queries)

    def search_many(self, queries: Sequence[str], k: int | None = None,
                    filter: dict[str, Any] | SearchFilter | None = None,
                    mode: str | None = None, timings: dict[str, float] | None = None
                    ) -> list[list[Hit]]:
        """Hits for a batch of queries: one embed task, one search graph, fused here."""
        queries = [self.check_query(q, "query") for q in queries]
        if not queries:
            raise InvalidInput("no queries given")
        k = self._check_k(k)
        mode = self._mode(mode)
        flt = SearchFilter.from_dict(filter) if isinstance(filter, dict) else filter
        n = self._n_candidates(k) if mode != "dense" else k
        t0 = time.perf_counter()
        xq = retry_once(lambda: self._embed(queries, mode))
        t1 = time.perf_counter()
        res = retry_once(lambda: self.index.search_result(
            xq, n, self.config.nprobe, filter=flt, with_records=True,
            sparse_queries=queries if mode != "dense" else None, sparse_k=n,
            dense=mode != "sparse"))
        hits = fused_candidates(res, len(queries), self.config, mode, k)
        t2 = time.perf_counter()
        if timings is not None:
            timings.update(embed=(t1 - t0) * 1e3, search=(t2 - t1) * 1e3,
                           total=(t2 - t0) * 1e3)
        return hits

    def search(self, query: str, k: int | None = None,
               filter: dict[str, Any] | SearchFilter | None = None,
               mode: str | None = None) -> list[Hit]:
        """Hits for one query (see :meth:`search_many`)."""
        return self.search_many([query], k, filter, mode)[0]

    def rerank_many(self, queries: Sequence[str], k: int | None = None,
                    filter: dict[str, Any] | SearchFilter | None = None,
                    mode: str | None = None) -> list[list[Hit]]:
        """:meth:`search_many` then the cross-encoder over ``rerank_top_n`` candidates."""
        if not self.config.rerank_model:
            raise InvalidInput("no rerank model configured (RagConfig.rerank_model)")
        from dask_rag.rag.rerank import rerank_scores_task

        k = self._check_k(k)
        cands = self.search_many(queries, self._n_rerank(k), filter, mode)
        scores = self.client.submit(rerank_scores_task, self.config.rerank_model, list(queries),
                                    [[h.text for h in c] for c in cands], pure=False).result()
        out = []
        for c, s in zip(cands, scores, strict=True):
            order = sorted(range(len(c)), key=lambda i: (-s[i], i))[:k]
            out.append([Hit(c[i].id, s[i], c[i].text, c[i].source, c[i].metadata)
                        for i in order])
        return out

    # ---- answers ------------------------------------------------------------------------------

    def submit_ask(self, questions: Sequence[str], k: int | None = None,
                   filter: dict[str, Any] | SearchFilter | None = None,
                   params: SamplingParams | None = None, mode: str | None = None,
                   xq: np.ndarray | None = None) -> Future:
        """Submit the answer graph of a batch (after its embedding); returns one future."""
        questions = [self.check_query(q) for q in questions]
        if not questions:
            raise InvalidInput("no questions given")
        k = self._check_k(k)
        mode = self._mode(mode)
        params = params or SamplingParams(stream_chunk_tokens=self.config.stream_chunk_tokens)
        flt = SearchFilter.from_dict(filter) if isinstance(filter, dict) else filter
        n = self._n_candidates(k)
        if xq is None:
            xq = self._embed(questions, mode)
        parts, tag = self.index._submit_parts(
            np.ascontiguousarray(xq, dtype=np.float32), n, self.config.nprobe, ef_search=None,
            filter=flt, with_records=True,
            sparse_queries=questions if mode != "dense" else None, sparse_k=n,
            dense=mode != "sparse")
        token = tag.split(":")[0]
        client = self.client
        retrieved = client.submit(retrieve_task, len(questions), n, self.index.metric,
                                  self.config, mode, self._n_rerank(k), *parts,
                                  key=f"dask-rag-retrieve-{token}", pure=False, priority=10)
        if self.config.rerank_model:
            retrieved = client.submit(rerank_task, self.config.rerank_model, k, questions,
                                      retrieved, key=f"dask-rag-rerank-{token}", pure=False,
                                      priority=10)
        return client.submit(generate_task, self.generator_spec, self.config, params,
                             questions, k, retrieved, key=f"dask-rag-generate-{token}",
                             pure=False, priority=10, resources=self._generator_resources)

    def _answers(self, questions: list[str], results: list[dict[str, Any]], t_start: float,
                 embed_ms: float) -> list[Answer]:
        total = (time.perf_counter() - t_start) * 1e3
        out = []
        for q, r in zip(questions, results, strict=True):
            timings = {"embed": embed_ms, **r["timings"], "total": total}
            out.append(Answer(question=q, text=r["text"], citations=r["citations"],
                              timings_ms=timings, hits=r["hits"],
                              prompt_tokens=r["prompt_tokens"]))
        return out

    def ask_many(self, questions: Sequence[str], k: int | None = None,
                 filter: dict[str, Any] | SearchFilter | None = None,
                 params: SamplingParams | None = None, mode: str | None = None) -> list[Answer]:
        """Answer a batch of questions with one graph (see the module docstring)."""
        questions = [self.check_query(q) for q in questions]
        if not questions:
            raise InvalidInput("no questions given")
        self._check_k(k)  # everything is validated before the first task is submitted
        mode = self._mode(mode)
        if isinstance(filter, dict):
            filter = SearchFilter.from_dict(filter)
        t0 = time.perf_counter()
        xq = retry_once(lambda: self._embed(questions, mode))
        embed_ms = (time.perf_counter() - t0) * 1e3
        results = retry_once(lambda: self.submit_ask(questions, k, filter, params, mode,
                                                     xq=xq).result())
        return self._answers(questions, results, t0, embed_ms)

    def ask(self, question: str, k: int | None = None,
            filter: dict[str, Any] | SearchFilter | None = None,
            params: SamplingParams | None = None, mode: str | None = None) -> Answer:
        """Answer one question (see :meth:`ask_many`)."""
        return self.ask_many([question], k, filter, params, mode)[0]

    # ---- asyncio: micro-batched entry points (the HTTP shim uses these) ----------------------

    async def asearch(self, query: str, k: int | None = None,
                      filter: dict[str, Any] | None = None, mode: str | None = None
                      ) -> list[Hit]:
        """Search one query; concurrent calls are batched into one graph."""
        return (await self.asearch_timed(query, k, filter, mode))[0]

    async def asearch_timed(self, query: str, k: int | None = None,
                            filter: dict[str, Any] | None = None, mode: str | None = None
                            ) -> tuple[list[Hit], dict[str, float]]:
        """:meth:`asearch` plus the stage timings (ms) of the batch that served the query."""
        self.check_query(query, "query")
        self._check_k(k)
        self._mode(mode)
        SearchFilter.from_dict(filter)
        t0 = time.perf_counter()
        hits, timings = await self._search_batcher.submit((query, {"k": k, "filter": filter,
                                                                   "mode": mode}))
        return hits, {**timings, "total": (time.perf_counter() - t0) * 1e3}

    async def aask(self, question: str, k: int | None = None,
                   filter: dict[str, Any] | None = None, params: SamplingParams | None = None,
                   mode: str | None = None) -> Answer:
        """Answer one question; concurrent calls are batched into one graph."""
        self.check_query(question)
        self._check_k(k)
        self._mode(mode)
        SearchFilter.from_dict(filter)
        return await self._ask_batcher.submit((question, {"k": k, "filter": filter,
                                                          "params": params, "mode": mode}))

    @staticmethod
    def _groups(items: list[tuple[str, dict[str, Any]]]) -> dict[str, list[int]]:
        """Requests with equal options share a graph (options differ rarely)."""
        groups: dict[str, list[int]] = {}
        for i, (_, opts) in enumerate(items):
            key = repr(sorted((k, repr(v)) for k, v in opts.items()))
            groups.setdefault(key, []).append(i)
        return groups

    async def _search_batch(self, items: list[tuple[str, dict[str, Any]]]
                            ) -> list[tuple[list[Hit], dict[str, float]]]:
        out: list[tuple[list[Hit], dict[str, float]]] = [([], {}) for _ in items]

        async def one_group(idx: list[int]) -> None:
            opts = items[idx[0]][1]
            timings: dict[str, float] = {}
            hits = await asyncio.to_thread(self.search_many, [items[i][0] for i in idx],
                                           opts["k"], opts["filter"], opts["mode"], timings)
            for i, h in zip(idx, hits, strict=True):
                out[i] = (h, timings)

        await asyncio.gather(*(one_group(idx) for idx in self._groups(items).values()))
        return out

    async def _ask_batch(self, items: list[tuple[str, dict[str, Any]]]) -> list[Answer]:
        out: list[Answer | None] = [None] * len(items)

        async def one_group(idx: list[int]) -> None:
            opts = items[idx[0]][1]
            questions = [items[i][0] for i in idx]
            mode = self._mode(opts["mode"])

            async def attempt() -> list[Answer]:
                t0 = time.perf_counter()
                if mode == "sparse":
                    xq = np.zeros((len(questions), self.index.dim), dtype=np.float32)
                else:
                    xq = await self.embedder.aembed_now(questions)
                embed_ms = (time.perf_counter() - t0) * 1e3
                fut = self.submit_ask(questions, opts["k"], opts["filter"], opts["params"],
                                      mode, xq=xq)
                results = await await_future(fut)
                return self._answers(questions, results, t0, embed_ms)

            answers = await aretry_once(attempt)
            for i, a in zip(idx, answers, strict=True):
                out[i] = a

        await asyncio.gather(*(one_group(idx) for idx in self._groups(items).values()))
        return [a for a in out if a is not None]

    async def astream(self, question: str, k: int | None = None,
                      filter: dict[str, Any] | None = None,
                      params: SamplingParams | None = None, mode: str | None = None
                      ) -> AsyncIterator[dict[str, Any]]:
        """Stream one answer as events: ``citations``, then ``text`` pieces (blocks of
        ``stream_chunk_tokens`` tokens), then ``done`` with the timings."""
        from distributed import Queue

        question = self.check_query(question)
        k = self._check_k(k)
        mode = self._mode(mode)
        params = params or SamplingParams(stream_chunk_tokens=self.config.stream_chunk_tokens)
        t0 = time.perf_counter()
        hits = await self.asearch(question, self._n_rerank(k), filter, mode)
        t1 = time.perf_counter()
        timings = {"retrieve": (t1 - t0) * 1e3}
        if self.config.rerank_model:
            from dask_rag.rag.rerank import rerank_scores_task

            fut = self.client.submit(rerank_scores_task, self.config.rerank_model, [question],
                                     [[h.text for h in hits]], pure=False, priority=10)
            scores = (await await_future(fut))[0]
            order = sorted(range(len(hits)), key=lambda i: (-scores[i], i))
            hits = [Hit(hits[i].id, scores[i], hits[i].text, hits[i].source, hits[i].metadata)
                    for i in order]
            timings["rerank"] = (time.perf_counter() - t1) * 1e3
        hits = hits[:k]
        name = f"dask-rag-stream-{uuid.uuid4().hex}"
        queue = Queue(name, client=self.client)
        task = self.client.submit(stream_task, self.generator_spec, self.config, params,
                                  question, hits, name, pure=False, priority=10,
                                  resources=self._generator_resources)
        t2 = time.perf_counter()
        try:
            while True:
                event = await asyncio.to_thread(queue.get, timeout=600)
                kind = event["event"]
                if kind == "error":
                    await await_future(task)  # re-raises the worker's exception
                    raise RuntimeError(event["message"])
                if kind == "end":
                    break
                if kind == "text" and "first_text" not in timings:
                    timings["first_text"] = (time.perf_counter() - t0) * 1e3
                yield event
            await await_future(task)
        finally:
            task.release()
        timings["generate"] = (time.perf_counter() - t2) * 1e3
        timings["total"] = (time.perf_counter() - t0) * 1e3
        yield {"event": "done", "timings_ms": {k: round(v, 3) for k, v in timings.items()}}

    # ---- lifecycle ----------------------------------------------------------------------------

    def batchers(self) -> dict[str, MicroBatcher[Any, Any]]:
        """The micro-batchers of this pipeline, by name (for metrics)."""
        return {"search": self._search_batcher, "ask": self._ask_batcher,
                "embed": self.embedder.batcher}

    def shards_ready(self) -> tuple[bool, str]:
        """Whether the cluster is reachable and every shard is loaded (for ``/readyz``)."""
        if self.client.status != "running":
            return False, f"Dask client is {self.client.status}"
        reloading = self.index.ensure_loaded()  # after a scheduler restart: bring shards back
        if reloading:
            return False, f"reloading {reloading} shards lost with the scheduler"
        futs = self.index.shard_futures
        bad = [f for f in futs if f.status != "finished"]
        if bad:
            return False, f"{len(bad)} of {len(futs)} shards are not loaded ({bad[0].status})"
        return True, f"{len(futs)} shards loaded"

    def warmup(self) -> None:
        """Load the encoder (and generator) on every worker before the first request."""
        self.embedder.warmup()

    async def aclose(self) -> None:
        await self._ask_batcher.close()
        await self._search_batcher.close()
        await self.embedder.aclose()

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> RagPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
