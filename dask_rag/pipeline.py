"""`RagPipeline`: questions in, hits and grounded answers out — one Dask graph per batch.

A batch of requests with equal options becomes one graph, submitted once::

    embed (one task per worker's share of the texts)
      ─►  [route]   (IVF factories: coarse quantization where the router future lives)
      ─►  search    (one task per shard, where the shard lives; dense and BM25 together,
                     each hit's record fetched next to it)
      ─►  [merge]   (a tree of fan-in 4 beyond four shards)
      ─►  retrieve  (final merge, fusion of dense and BM25)
      ─►  [rerank]  (cross-encoder on a worker)
      ─►  generate  (prompts under the token budget, the batch's answers)

The client submits the graph and awaits its last future; no intermediate result comes back to
it.  Requests are validated once, where they enter (:mod:`dask_rag.rag.requests`), and carried
through the micro-batchers (``asearch``/``aask``: concurrent callers share graphs, two batches
in flight).  Every answer carries per-stage timings in milliseconds.

Why one module of ~700 lines: :class:`RagPipeline` is where the query path is assembled (the
entry points, the micro-batchers, HTTP writes); its methods are thin and the work lives in
``rag/`` and ``index/``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from distributed import Client, Future
from pydantic import BaseModel

from dask_rag.batching import MicroBatcher
from dask_rag.cluster import resource_request
from dask_rag.cluster.futures import aretry_once, await_future, await_hedged
from dask_rag.cluster.sync import run_sync, synchronous
from dask_rag.config import BatchConfig, EmbedConfig, RagConfig
from dask_rag.embed.encoder import recorded_config
from dask_rag.embed.service import EmbeddingService
from dask_rag.errors import InvalidInput
from dask_rag.index.distributed import HEDGE_AFTER_S, DistributedIndex
from dask_rag.index.query import IndexQuery, ShardResult
from dask_rag.index.vectors import (
    EmbeddedPieces,
    EmbedInTask,
    NoVectors,
    QueryMatrix,
    QueryVectors,
)
from dask_rag.rag.fusion import Fusion, default_fusion
from dask_rag.rag.generate.base import SamplingParams, parse_generator_spec
from dask_rag.rag.generate.openai_upstream import OpenAIUpstream
from dask_rag.rag.hits import Answer, Hit
from dask_rag.rag.requests import (
    AskRequest,
    DeleteRequest,
    SearchRequest,
    UpsertRequest,
    parse_request,
)
from dask_rag.rag.tasks import (
    GenerationPlan,
    RerankPlan,
    RetrievalPlan,
    Retrieved,
    answer_batch,
    answer_task,
    local_generator,
    prompt_batch,
    prompt_task,
    retrieve,
    retrieve_task,
    stream_task,
)

__all__ = ["SMALL_BATCH", "Answer", "Hit", "RagPipeline"]

#: batches of at most this many requests are embedded on every shard's worker (by each searcher
#: actor, or in each search task of a graph) while no other search or ask is running: a
#: second actor call costs ~1-2 ms here, a trip through the scheduler ~4-7 ms, most of a lone
#: request's latency, while repeating a few short texts' embedding on each idle worker costs
#: a few milliseconds of parallel compute.  Under load that repetition is work taken from
#: other requests (6 % of the workers' time at 64 clients), so small batches are then
#: embedded once, like bigger ones: by the encoder actors, split across the workers (by
#: embedding tasks in a graph).  Searches and asks of any size go to the workers' searcher
#: actors directly and are merged, fused (and answered, by a generator that needs no model)
#: in the client (dask_rag.index.searcher).
SMALL_BATCH = 4

Req = TypeVar("Req", SearchRequest, AskRequest)


class RagPipeline:
    """Embedder + sharded index + generator wired together on one Dask client.

    Each operation is written once, as a coroutine (``asearch_many``, ``aask_many``, the
    micro-batched ``asearch``/``aask``, ``astream``, the writes); the blocking forms are
    derived from them (:func:`~dask_rag.cluster.sync.synchronous`), and the naive baseline is
    the same batchers with batches of one (:meth:`~dask_rag.config.BatchConfig.one_at_a_time`).
    Why ~45 methods: this is the user's entry point — request validation, the graph builders,
    the batchers' work, writes and lifecycle; each is a few lines over the tasks in ``rag/``
    and ``index/``.
    """

    def __init__(self, client: Client, index: DistributedIndex, embedder: EmbeddingService,
                 config: RagConfig | None = None, batch: BatchConfig | None = None) -> None:
        if embedder.dim != index.dim:
            raise InvalidInput(f"encoder dimension {embedder.dim} does not match the index "
                               f"dimension {index.dim}")
        self.client = client
        self.index = index
        self.embedder = embedder
        # a worker that receives shards loads (and checks) the encoder before they serve:
        # a small batch embeds inside the shard's own task
        index.warm_new_workers = lambda workers: embedder.warmup()
        self.config = config or RagConfig()
        self.generator_spec = parse_generator_spec(self.config.generator)
        # an upstream server (openai:URL) is called from this process; other LLM generators
        # run on workers declaring a 'generator' resource, when there are any
        self._upstream: OpenAIUpstream | None = None
        if self.generator_spec.kind == "openai":
            model = dict(self.generator_spec.options).get("model")
            self._upstream = OpenAIUpstream(self.generator_spec.path or "",
                                            str(model) if model else None)
        self._generator_resources = (resource_request(client, "generator")
                                     if self.generator_spec.kind not in ("extractive", "openai")
                                     else None)
        if self.config.rerank_model:
            from dask_rag.rag.rerank import resolve_reranker_path

            resolve_reranker_path(self.config.rerank_model)
        self._write_lock = threading.Lock()
        #: searches and asks running now (see SMALL_BATCH)
        self._running = 0
        #: the generator when it needs no model: asks are then answered here, after a direct
        #: search, instead of by a graph's last task
        self._local_generator = (None if self.config.rerank_model else local_generator(
            self.generator_spec, self.config.max_answer_sentences))
        # with an upstream generator the ask batcher batches retrieval and prompts only (see
        # aask): an answer (an Answer) or a prompt (the graph's fields) per request.  An ask
        # batch that is one Dask graph (its last task generates on a worker) is not split in
        # waves (BatchConfig.split_wave_min): that doubles the scheduler's work for little
        # overlap — 0.98x at 64 clients (benchmarks/results/limit_ab_direct_split.json)
        ask_batch = batch or BatchConfig(max_batch=64)
        if self._local_generator is None:
            ask_batch = dataclasses.replace(ask_batch, split_wave_min=0)
        self._ask_batcher: MicroBatcher[AskRequest, Any] = MicroBatcher(
            self._ask_batch if self._upstream is None else self._prompt_batch, ask_batch,
            name="ask")
        self._search_batcher: MicroBatcher[SearchRequest, tuple[list[Hit], dict[str, float]]] \
            = MicroBatcher(self._search_batch, batch or BatchConfig(max_batch=128),
                           name="search")

    @classmethod
    def from_index_dir(cls, client: Client, path: str | Path, config: RagConfig | None = None,
                       embed: EmbedConfig | None = None, batch: BatchConfig | None = None,
                       replicas: int | None = None) -> RagPipeline:
        """Open an ingested index (a directory or an object-store URL) with the encoder
        recorded in its manifest; ``replicas`` overrides the index's replication factor."""
        config = config or RagConfig()
        parse_generator_spec(config.generator)  # bad specs fail before anything loads
        index = DistributedIndex.load(client, path, replicas=replicas)
        try:
            recorded = index.manifest.embed or {}
            if not recorded and embed is None:
                raise InvalidInput(f"{path}: the index records no encoder; pass embed=...")
            # the index's own encoder settings, not what "auto" means on this machine
            embed = recorded_config(recorded, embed) if recorded else embed
            embedder = EmbeddingService(client, embed, batch)
            return cls(client, index, embedder, config, batch)
        except BaseException:
            index.close()
            raise

    # ---- requests -----------------------------------------------------------------------------

    def search_request(self, query: Any, k: int | None = None, filter: Any = None,
                       mode: str | None = None, fusion: Fusion | dict[str, Any] | None = None
                       ) -> SearchRequest:
        """A validated :class:`~dask_rag.rag.requests.SearchRequest` (InvalidInput naming the
        field at fault otherwise)."""
        return parse_request(SearchRequest, _given(query=query, k=k, filter=filter, mode=mode,
                                                   fusion=fusion), "search")

    def ask_request(self, question: Any, k: int | None = None, filter: Any = None,
                    params: SamplingParams | None = None, mode: str | None = None,
                    fusion: Fusion | dict[str, Any] | None = None) -> AskRequest:
        """A validated :class:`~dask_rag.rag.requests.AskRequest`."""
        sampling: dict[str, Any] = {}
        if params is not None:
            sampling = {n: getattr(params, n) for n in (
                "max_tokens", "temperature", "top_k", "top_p", "seed", "stream_chunk_tokens")}
            sampling["stop"] = list(params.stop) or None
        return parse_request(AskRequest, _given(question=question, k=k, filter=filter,
                                                mode=mode, fusion=fusion, **sampling), "ask")

    def _fusion(self, req: SearchRequest | AskRequest) -> Fusion:
        """The request's fusion, else the index's tuned one, else the configured default."""
        if req.fusion is not None:
            return req.fusion
        tuned = self.index.manifest.fusion
        if tuned:  # the manifest also records where and how it was tuned
            return Fusion.model_validate({k: tuned[k] for k in Fusion.model_fields
                                          if k in tuned})
        return default_fusion(self.config)

    def _k(self, req: SearchRequest | AskRequest) -> int:
        return self.config.k if req.k is None else req.k

    def _rerank_depth(self, k: int) -> int:
        """How many fused candidates the cross-encoder sees (k when there is no rerank)."""
        if not self.config.rerank_model:
            return k
        return max(k, self.config.rerank_top_n)

    # ---- graphs -------------------------------------------------------------------------------

    def _plan(self, reqs: Sequence[SearchRequest | AskRequest], keep: int
              ) -> tuple[IndexQuery, RetrievalPlan]:
        """What the shards are asked (the index query) and how their answers become each
        request's hits (the retrieval plan), for requests sharing options."""
        first = reqs[0]
        texts = [r.query if isinstance(r, SearchRequest) else r.question for r in reqs]
        mode = first.mode or self.config.mode
        k = self._k(first)
        depth = k if mode == "dense" else max(k, self.config.candidates, keep)
        query = self.index.query(depth, first.nprobe or self.config.nprobe,
                                 filter=first.filter, with_records=True,
                                 texts=texts if mode != "dense" else None, sparse_k=depth,
                                 dense=mode != "sparse")
        fusion = self._fusion(first)
        stats = self.index.bm25_stats
        sums = tuple(stats.idf_sums(texts)) if (
            mode == "hybrid" and fusion.method == "adaptive" and stats is not None) else ()
        plan = RetrievalPlan(nq=len(texts), depth=depth, metric=self.index.metric, mode=mode,
                             fusion=fusion, keep=keep, submitted_at=time.time(),
                             texts=tuple(texts), idf_sums=sums)
        return query, plan

    def _vectors(self, plan: RetrievalPlan, small: bool) -> QueryVectors:
        """The query vectors of a graph: none (BM25 only), the texts to embed in the search
        tasks (``small``, see :meth:`_small`), or embedding tasks' pieces."""
        if plan.mode == "sparse":
            return NoVectors(plan.nq)
        if small:
            return EmbedInTask(self.embedder.here(plan.texts), plan.nq)
        return EmbeddedPieces(self.embedder.submit(plan.texts))

    async def _direct_vectors(self, plan: RetrievalPlan) -> QueryVectors:
        """The query vectors of a direct (actor) search: none (BM25 only), the texts for each
        searcher actor to embed (a small batch), or the matrix the encoder actors made."""
        small = self._small(plan.nq)  # decided once: the canaries' verdicts may change
        if plan.mode == "sparse" or small:
            return self._vectors(plan, small)
        return QueryMatrix(await self.embedder.aembed_now(plan.texts))

    async def _asearch_direct(self, query: IndexQuery, plan: RetrievalPlan
                              ) -> list[ShardResult] | None:
        """One batch's direct (actor) search, its embedding included — counted in
        ``_running`` while it runs (see :meth:`_small`); None when that path failed."""
        self._running += 1
        try:
            return await self.index.asearch_direct(query, await self._direct_vectors(plan))
        finally:
            self._running -= 1

    def _small(self, nq: int) -> bool:
        """Whether a batch of ``nq`` queries is embedded where its shards are (see
        SMALL_BATCH): only while nothing else runs, and every worker's encoder matches the
        index's canaries, since shards live anywhere."""
        return (nq <= SMALL_BATCH and self._running <= 1 and not self.embedder.busy()
                and self.embedder.embeds_everywhere())

    def _search_parts(self, reqs: Sequence[SearchRequest | AskRequest], keep: int
                      ) -> tuple[list[Future], RetrievalPlan, str]:
        """Submit the search stages of a batch of requests sharing options: embedding (in its
        own tasks, or in each shard's task for a small batch), [route], shard searches, merge
        tree; returns the <= 4 partial results' futures and the plan of the final merge."""
        query, plan = self._plan(reqs, keep)
        parts = self.index.submit_search(query, self._vectors(plan, self._small(plan.nq)))
        return parts, plan, uuid.uuid4().hex

    def _rerank_plan(self, questions: list[str], k: int) -> RerankPlan | None:
        if not self.config.rerank_model:
            return None
        return RerankPlan(self.config.rerank_model, k, tuple(questions))

    def submit_search(self, reqs: Sequence[SearchRequest], rerank: bool = False) -> Future:
        """The whole graph of a batch of search requests with equal options; its future holds
        ``(hits per request, stage timings)``.  ``rerank``: the cross-encoder re-orders
        ``rerank_top_n`` fused candidates."""
        if rerank and not self.config.rerank_model:
            raise InvalidInput("no rerank model configured (RagConfig.rerank_model)")
        k = self._k(reqs[0])
        parts, plan, token = self._search_parts(reqs, self._rerank_depth(k) if rerank else k)
        rerank_plan = self._rerank_plan([r.query for r in reqs], k) if rerank else None
        return self.client.submit(retrieve_task, plan, rerank_plan, *parts, pure=False,
                                  priority=10, key=f"dask-rag-retrieve-{token}")

    def submit_ask(self, reqs: Sequence[AskRequest], config: RagConfig | None = None
                   ) -> Future:
        """The whole graph of a batch of ask requests with equal options: one future of the
        answers' fields (text, citations, hits, prompt tokens, timings).  With an upstream
        generator (``openai:``) the graph ends with the prompts (``prompt`` instead of
        ``text``): :meth:`_complete` sends them."""
        k = self._k(reqs[0])
        parts, plan, token = self._search_parts(reqs, self._rerank_depth(k))
        questions = [r.question for r in reqs]
        gen = self._generation_plan(reqs, config)
        last = prompt_task if self._upstream is not None else answer_task
        return self.client.submit(last, plan, self._rerank_plan(questions, k), gen,
                                  *parts, key=f"dask-rag-generate-{token}", pure=False,
                                  priority=10, resources=self._generator_resources)

    def _generation_plan(self, reqs: Sequence[AskRequest], config: RagConfig | None
                         ) -> GenerationPlan:
        return GenerationPlan(self.generator_spec, config or self.config,
                              reqs[0].sampling(self.config.stream_chunk_tokens),
                              tuple(r.question for r in reqs), self._k(reqs[0]),
                              _history(reqs[0]))

    async def _ask_direct(self, reqs: Sequence[AskRequest], config: RagConfig
                          ) -> list[dict[str, Any]] | None:
        """A batch of asks answered here: searched through the workers' actors (as
        :meth:`_search`), then merged, fused and answered (or its prompts built, for an
        upstream) by the generator that needs no model — what the graph's last task does,
        without the graph.  None when the generator needs a worker (a model, or a rerank
        model) or the direct search failed: the caller runs the graph."""
        if self._local_generator is None:
            return None
        query, plan = self._plan(reqs, self._rerank_depth(self._k(reqs[0])))
        parts = await self._asearch_direct(query, plan)
        if parts is None:
            return None
        last = prompt_batch if self._upstream is not None else answer_batch
        return last(plan, None, self._generation_plan(reqs, config), parts,
                    self._local_generator)

    async def _asked(self, reqs: Sequence[AskRequest], config: RagConfig,
                     wait: Callable[[Callable[[], Future]], Awaitable[Any]]
                     ) -> list[dict[str, Any]]:
        """The answers' (or prompts') fields of one batch of asks: directly, else by a graph
        that ``wait`` runs (with its retry and hedging)."""
        direct = await self._ask_direct(reqs, config)
        if direct is not None:
            return direct
        results: list[dict[str, Any]] = await wait(lambda: self.submit_ask(reqs, config))
        return results

    async def _upstream_config(self, params: SamplingParams) -> RagConfig:
        """The prompt budget for an upstream generator: from the model's context length when
        the upstream reports it (less the answer's tokens, and a quarter for the difference
        between words and the model's tokens), else ``token_budget``."""
        assert self._upstream is not None
        context = await self._upstream.context_length()
        if context is None:
            return self.config
        room = int((context - params.max_tokens) * 0.75)
        return dataclasses.replace(self.config, token_budget=max(16, room))

    async def _ask_results(self, reqs: Sequence[AskRequest],
                           wait: Callable[[Callable[[], Future]], Awaitable[Any]]
                           ) -> list[dict[str, Any]]:
        """The answers' fields of one ask graph, ``wait`` running it (with its retry and
        hedging); with an upstream generator the graph builds the prompts under the
        upstream's budget and the upstream answers them."""
        if self._upstream is None:
            return await self._asked(reqs, self.config, wait)
        return await self._complete(reqs, await self._prompts(reqs, wait))

    async def _prompts(self, reqs: Sequence[AskRequest],
                       wait: Callable[[Callable[[], Future]], Awaitable[Any]]
                       ) -> list[dict[str, Any]]:
        """The prompts (and citations) of one ask graph under the upstream's budget."""
        config = await self._upstream_config(reqs[0].sampling(self.config.stream_chunk_tokens))
        return await self._asked(reqs, config, wait)

    def _await_hedged(self, submit: Callable[[], Future]) -> Awaitable[Any]:
        """Run a batch's graph, hedged against a lost replica and retried once."""
        return aretry_once(lambda: await_hedged(submit, self.index.hedge_trigger(), None))

    async def _complete(self, reqs: Sequence[AskRequest], results: list[dict[str, Any]]
                        ) -> list[dict[str, Any]]:
        """Send a batch's prompts to the upstream generator, all at once."""
        assert self._upstream is not None
        t0 = time.perf_counter()
        done = await self._upstream.complete_many(
            [r["prompt"] for r in results], reqs[0].sampling(self.config.stream_chunk_tokens))
        ms = (time.perf_counter() - t0) * 1e3
        for r, c in zip(results, done, strict=True):
            r.update(text=c.text, completion_tokens=c.completion_tokens,
                     timings={**r["timings"], "generate": ms})
            if c.prompt_tokens:
                r["prompt_tokens"] = c.prompt_tokens
        return results

    # ---- the async core: each operation once; the blocking forms are derived from it ----------

    async def asearch_many(self, queries: Sequence[str], k: int | None = None,
                           filter: Any = None, mode: str | None = None,
                           timings: dict[str, float] | None = None,
                           fusion: Fusion | dict[str, Any] | None = None) -> list[list[Hit]]:
        """Hits for a batch of queries: one call to each worker's searcher actor (a graph if
        that path fails), see :meth:`_search`."""
        reqs = self._requests(queries, lambda q: self.search_request(q, k, filter, mode,
                                                                     fusion))
        t0 = time.perf_counter()
        hits, stage = await self._search(reqs)
        if timings is not None:
            timings.update(stage, total=(time.perf_counter() - t0) * 1e3)
        return hits

    async def arerank_many(self, queries: Sequence[str], k: int | None = None,
                           filter: Any = None, mode: str | None = None) -> list[list[Hit]]:
        """:meth:`asearch_many` then the cross-encoder over ``rerank_top_n`` candidates."""
        if not self.config.rerank_model:
            raise InvalidInput("no rerank model configured (RagConfig.rerank_model)")
        reqs = self._requests(queries, lambda q: self.search_request(q, k, filter, mode))
        hits, _ = await aretry_once(lambda: await_future(self.submit_search(reqs, rerank=True)))
        return list(hits)

    async def aask_many(self, questions: Sequence[str], k: int | None = None,
                        filter: Any = None, params: SamplingParams | None = None,
                        mode: str | None = None, fusion: Fusion | dict[str, Any] | None = None
                        ) -> list[Answer]:
        """Answer a batch of questions with one graph (see the module docstring)."""
        return await self._answer(self._requests(
            questions, lambda q: self.ask_request(q, k, filter, params, mode, fusion)))

    search_many = synchronous(asearch_many)
    rerank_many = synchronous(arerank_many)
    ask_many = synchronous(aask_many)

    def search(self, query: str, k: int | None = None, filter: Any = None,
               mode: str | None = None, fusion: Fusion | dict[str, Any] | None = None
               ) -> list[Hit]:
        """Hits for one query (see :meth:`search_many`)."""
        return self.search_many([query], k, filter, mode, fusion=fusion)[0]

    def ask(self, question: str, k: int | None = None, filter: Any = None,
            params: SamplingParams | None = None, mode: str | None = None,
            fusion: Fusion | dict[str, Any] | None = None) -> Answer:
        """Answer one question (see :meth:`ask_many`)."""
        return self.ask_many([question], k, filter, params, mode, fusion)[0]

    @staticmethod
    def _requests(texts: Sequence[str], make: Callable[[str], Req]) -> list[Req]:
        if isinstance(texts, str):
            raise InvalidInput("expected a list of texts, got a single string")
        reqs = [make(t) for t in texts]
        if not reqs:
            raise InvalidInput("no queries given")
        return reqs

    async def _search(self, reqs: Sequence[SearchRequest]) -> Retrieved:
        """One batch of search requests sharing options, retried once on a lost worker:
        through the workers' actors (no scheduler) — a small batch embedded by each searcher
        actor (see SMALL_BATCH), a bigger one by the encoder actors first, split across the
        workers — and merged and fused here; one graph, hedged, if that path fails."""
        async def once() -> Retrieved:
            query, plan = self._plan(reqs, self._k(reqs[0]))
            parts = await self._asearch_direct(query, plan)
            if parts is not None:
                return retrieve(plan, parts)
            result: Retrieved = await await_hedged(lambda: self.submit_search(reqs),
                                                   self.index.hedge_trigger(), HEDGE_AFTER_S)
            return result

        return await aretry_once(once)

    async def _answer(self, reqs: Sequence[AskRequest]) -> list[Answer]:
        """The answers of one batch of ask requests sharing options (one graph)."""
        t0 = time.perf_counter()
        return _answers(reqs, await self._ask_results(reqs, self._await_hedged), t0)

    # ---- micro-batched entry points (the HTTP shim uses these) -------------------------------

    async def asearch(self, query: str | SearchRequest, k: int | None = None,
                      filter: Any = None, mode: str | None = None) -> list[Hit]:
        """Search one query; concurrent calls are batched into one graph."""
        return (await self.asearch_timed(query, k, filter, mode))[0]

    async def asearch_timed(self, query: str | SearchRequest, k: int | None = None,
                            filter: Any = None, mode: str | None = None
                            ) -> tuple[list[Hit], dict[str, float]]:
        """:meth:`asearch` plus the stage timings (ms) of the batch that served the query."""
        req = query if isinstance(query, SearchRequest) else self.search_request(
            query, k, filter, mode)
        t0 = time.perf_counter()
        hits, timings = await self._search_batcher.submit(req)
        return hits, {**timings, "total": (time.perf_counter() - t0) * 1e3}

    async def aask(self, question: str | AskRequest, k: int | None = None, filter: Any = None,
                   params: SamplingParams | None = None, mode: str | None = None) -> Answer:
        """Answer one question; concurrent calls are batched into one graph."""
        req = question if isinstance(question, AskRequest) else self.ask_request(
            question, k, filter, params, mode)
        if self._upstream is None:
            answer: Answer = await self._ask_batcher.submit(req)
            return answer
        # an upstream generator: the batch builds the prompts, then each request waits for
        # its own completion, so no batch slot is held while the upstream answers (on 2
        # cores this alone did not move benchmarks/upstream_generator.py: retrieval of a
        # 64-question wave bounds it, see the README)
        t0 = time.perf_counter()
        result = await self._ask_batcher.submit(req)
        return _answers([req], await self._complete([req], [result]), t0)[0]

    async def _search_batch(self, reqs: list[SearchRequest]
                            ) -> list[tuple[list[Hit], dict[str, float]]]:
        async def one_group(group: list[SearchRequest]) -> list[tuple[list[Hit],
                                                                      dict[str, float]]]:
            hits, timings = await self._search(group)
            return [(h, timings) for h in hits]

        return await _by_options(reqs, one_group)

    async def _prompt_batch(self, reqs: list[AskRequest]) -> list[dict[str, Any]]:
        """The ask batcher's work with an upstream generator: each group's prompts (under the
        upstream's budget) and citations, one graph per group (see :meth:`aask`)."""
        async def one_group(group: list[AskRequest]) -> list[dict[str, Any]]:
            return await self._prompts(group, self._await_hedged)

        return await _by_options(reqs, one_group)

    async def _ask_batch(self, reqs: list[AskRequest]) -> list[Answer]:
        return await _by_options(reqs, self._answer)

    async def astream(self, question: str | AskRequest, k: int | None = None,
                      filter: Any = None, params: SamplingParams | None = None,
                      mode: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Stream one answer as events: ``citations``, then ``text`` pieces (blocks of
        ``stream_chunk_tokens`` tokens), then ``done`` with the timings.

        One graph, like :meth:`ask`, whose last task pushes the events to a Dask queue."""
        from distributed import Queue

        req = question if isinstance(question, AskRequest) else self.ask_request(
            question, k, filter, params, mode)
        if self._upstream is not None:
            async for event in self._astream_upstream(req):
                yield event
            return
        t0 = time.perf_counter()
        name = f"dask-rag-stream-{uuid.uuid4().hex}"
        queue = Queue(name, client=self.client)
        k = self._k(req)
        parts, plan, token = self._search_parts([req], self._rerank_depth(k))
        gen = GenerationPlan(self.generator_spec, self.config,
                             req.sampling(self.config.stream_chunk_tokens), (req.question,), k,
                             _history(req))
        task = self.client.submit(stream_task, plan, self._rerank_plan([req.question], k), gen,
                                  name, *parts, pure=False, priority=10,
                                  key=f"dask-rag-stream-{token}",
                                  resources=self._generator_resources)
        timings: dict[str, float] = {}
        completion = 0
        try:
            while True:
                event = await _next_event(queue, task)
                kind = event["event"]
                if kind == "error":
                    await await_future(task)  # re-raises the worker's exception
                    raise RuntimeError(event["message"])
                if kind == "end":
                    completion = event.get("completion_tokens", 0)
                    break
                if kind == "retrieved":
                    timings.update(event["timings_ms"])
                    timings["retrieve"] = (time.perf_counter() - t0) * 1e3
                    continue
                if kind == "text" and "first_text" not in timings:
                    timings["first_text"] = (time.perf_counter() - t0) * 1e3
                yield event
            await await_future(task)
        finally:
            task.release()
        timings["total"] = (time.perf_counter() - t0) * 1e3
        yield {"event": "done", "completion_tokens": completion,
               "timings_ms": {k: round(v, 3) for k, v in timings.items()}}

    async def _astream_upstream(self, req: AskRequest) -> AsyncIterator[dict[str, Any]]:
        """:meth:`astream` with an upstream generator: the prompt from the graph, then the
        upstream's stream passed through (closing this closes the upstream request)."""
        assert self._upstream is not None
        t0 = time.perf_counter()
        params = req.sampling(self.config.stream_chunk_tokens)
        config = await self._upstream_config(params)
        (result,) = await aretry_once(lambda: await_future(self.submit_ask([req], config)))
        timings = {**result["timings"], "retrieve": (time.perf_counter() - t0) * 1e3}
        yield {"event": "citations", "prompt_tokens": result["prompt_tokens"],
               "citations": [dict(h.to_dict(), n=n + 1)
                             for n, h in enumerate(result["citations"])]}
        completion = 0
        async for piece, usage in self._upstream.stream(result["prompt"], params):
            if usage is not None:
                completion = usage.completion_tokens
                continue
            if "first_text" not in timings:
                timings["first_text"] = (time.perf_counter() - t0) * 1e3
            yield {"event": "text", "text": piece}
        timings["total"] = (time.perf_counter() - t0) * 1e3
        yield {"event": "done", "completion_tokens": completion,
               "timings_ms": {k: round(v, 3) for k, v in timings.items()}}

    # ---- writes ---------------------------------------------------------------------------------

    async def aupsert(self, req: UpsertRequest) -> dict[str, int]:
        """Replace documents by id: chunked on a worker, embedded through the same
        micro-batched encoder as queries, then one acknowledged write to the index (the old
        chunks of these ids go as the new ones come, in one write-ahead-log entry: durable
        when this returns)."""
        from dask_rag.config import ChunkConfig
        from dask_rag.corpus.loaders import Document
        from dask_rag.ingest import read_and_chunk_task

        recorded = (self.index.manifest.embed or {}).get("chunk") or {}
        chunk = ChunkConfig(**{k: recorded[k] for k in ("max_tokens", "overlap_tokens")
                               if k in recorded})
        docs = [Document(source=d.id, text=d.text, metadata=dict(d.metadata or {}))
                for d in req.documents]
        _, chunks, _ = await await_future(self.client.submit(
            read_and_chunk_task, self.embedder.config, chunk, docs, {}, pure=False))
        vectors = await asyncio.gather(*(self.embedder.aembed(c.text) for c in chunks))

        def write() -> int:
            # look-up and write under one lock: two upserts of one id cannot interleave
            with self._write_lock:
                old = self.index.ids_of_sources([d.source for d in docs])
                before = self.index.ntotal
                if chunks:
                    self.index.add(np.stack(vectors),
                                   np.array([c.id for c in chunks], dtype=np.int64),
                                   [c.record() for c in chunks],
                                   replace=old if old.size else None)
                elif old.size:
                    self.index.remove(old)
                return before + len(chunks) - self.index.ntotal

        removed = await asyncio.to_thread(write)
        return {"documents": len(docs), "chunks": len(chunks), "chunks_removed": removed}

    async def adelete(self, req: DeleteRequest) -> dict[str, int]:
        """Remove documents by id (every chunk of each); durable when this returns."""

        def write() -> int:
            with self._write_lock:
                old = self.index.ids_of_sources(req.ids)
                return int(self.index.remove(old)) if old.size else 0

        return {"documents": len(req.ids), "chunks_removed": await asyncio.to_thread(write)}

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
        encoders_ok, mismatched, detail = self.encoder_status()
        if not encoders_ok:
            return False, detail
        return True, f"{len(futs)} shards loaded" + (f"; {detail}" if mismatched else "")

    def encoder_status(self) -> tuple[bool, int, str]:
        """(some worker may embed for this index, how many may not, what the canaries say):
        workers whose encoder does not reproduce the index's canary vectors embed nothing."""
        mismatched = self.embedder.mismatched_workers()
        ok = self.embedder.config.canaries is None or bool(self.embedder.healthy_workers())
        return ok, len(mismatched), self.embedder.mismatch_summary()

    def warmup(self) -> None:
        """Load the encoder (and generator) on every worker before the first request."""
        self.embedder.warmup()

    async def adrain(self) -> None:
        """Stop taking requests and finish the ones taken (the encoder, which collections
        share, is left open)."""
        await self._ask_batcher.close()
        await self._search_batcher.close()

    async def aclose(self) -> None:
        await self.adrain()
        await self.embedder.aclose()
        if self._upstream is not None:
            await self._upstream.close_loop()

    def close(self) -> None:
        if self._upstream is not None:  # the blocking API's connections to it
            run_sync(self._upstream.close_loop())
        self.index.close()

    def __enter__(self) -> RagPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _given(**fields: Any) -> dict[str, Any]:
    """The fields a caller set (None means "the default")."""
    out = {k: v for k, v in fields.items() if v is not None}
    for name in ("filter", "fusion"):
        value = out.get(name)
        if isinstance(value, BaseModel):  # already a model: validate its JSON form again
            out[name] = value.model_dump(by_alias=True, exclude_none=True)
    return out


T = TypeVar("T")


async def _by_options(reqs: list[Req], run: Callable[[list[Req]], Any]) -> list[Any]:
    """Run ``run`` on each group of requests with equal options (one graph each, all in
    flight at once); results in request order."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(reqs):
        groups.setdefault(r.options(), []).append(i)
    out: list[Any] = [None] * len(reqs)

    async def one(idx: list[int]) -> None:
        for i, result in zip(idx, await run([reqs[i] for i in idx]), strict=True):
            out[i] = result

    await asyncio.gather(*(one(idx) for idx in groups.values()))
    return out


def _history(req: AskRequest) -> tuple[tuple[str, str], ...]:
    return tuple((t.role, t.content) for t in req.history or ())


def _answers(reqs: Sequence[AskRequest], results: list[dict[str, Any]], t0: float
             ) -> list[Answer]:
    total = (time.perf_counter() - t0) * 1e3
    return [Answer(question=q.question, text=r["text"], citations=r["citations"],
                   timings_ms={**r["timings"], "total": total}, hits=r["hits"],
                   prompt_tokens=r["prompt_tokens"],
                   completion_tokens=r.get("completion_tokens", 0))
            for q, r in zip(reqs, results, strict=True)]


async def _next_event(queue: Any, task: Future) -> dict[str, Any]:
    """The next event of a stream task's queue; fails if the task failed before it put one."""
    while True:
        try:
            event: dict[str, Any] = await asyncio.to_thread(queue.get, timeout=1.0)
            return event
        except (TimeoutError, asyncio.TimeoutError):
            if task.status == "error":
                await await_future(task)  # re-raises the worker's exception
            if task.status in ("cancelled", "lost"):
                raise RuntimeError(f"the stream task was {task.status}") from None
