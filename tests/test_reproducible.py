"""A query's results depend on the query, the index and its settings only: never on what else
is in its batch, on arrival order, on the number of workers (DESIGN.md, invariants)."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
from distributed import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dask_rag.cluster import start_local_cluster
from dask_rag.config import BatchConfig, EmbedConfig, RagConfig, ServeConfig
from dask_rag.corpus.chunking import chunk_documents
from dask_rag.embed.encoder import SentenceEncoder
from dask_rag.embed.service import EmbeddingService
from dask_rag.pipeline import RagPipeline
from dask_rag.serve import ServerThread, create_app
from dask_rag.serve.server import free_port

SHORT = ["sort a list", "json", "read a csv file", "what is a deque?", "regex groups", "x",
         "How do I run a shell command and capture its output?", "parse dates", "heap queue"]


@pytest.fixture(scope="module")
def pool(demo_docs):
    """Real chunks of mixed lengths (a few tokens to the 200-token cap) and short queries."""
    enc = SentenceEncoder(EmbedConfig())
    chunks = [c.text for c in chunk_documents(demo_docs[:400], enc.count_tokens)]
    rng = np.random.default_rng(3)
    picked = [chunks[i] for i in rng.choice(len(chunks), 60, replace=False)]
    lengths = enc.count_tokens(picked)
    assert min(lengths) < 40 and max(lengths) > 150  # lengths that pad very differently
    return picked + SHORT


def test_default_encoder_is_batch_invariant_through_the_service(client, pool):
    """Any batch composition of 1-64 texts through the micro-batched service on the cluster:
    every vector is bit-identical to that text encoded alone, here and on the workers."""
    cfg = EmbedConfig()
    local = SentenceEncoder(cfg)
    assert (local.precision, local.backend) == ("fp32", "onnx")  # the default, not torch
    service = EmbeddingService(client, cfg, BatchConfig(max_batch=64, max_wait_ms=20))
    alone_local = np.concatenate([local.encode([t]) for t in pool])
    alone_cluster = np.concatenate([service.embed_now([t]) for t in pool])
    np.testing.assert_array_equal(alone_cluster, alone_local)
    batches_seen: list[int] = []

    @settings(max_examples=30, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=64))
    def check(picks: list[int]) -> None:
        async def burst() -> list[np.ndarray]:
            out = await asyncio.gather(*(service.aembed(pool[i]) for i in picks))
            await service.aclose()
            service.batcher.reopen()
            return list(out)

        before = service.batcher.stats.batches
        vectors = asyncio.run(burst())
        batches_seen.append(service.batcher.stats.batches - before)
        for i, v in zip(picks, vectors, strict=True):
            assert np.array_equal(v, alone_local[i]), pool[i][:60]

    check()
    # the compositions really were batched (several texts per model call)
    assert service.batcher.stats.items > 2 * service.batcher.stats.batches


def _questions(demo_docs, n: int) -> list[str]:
    """``n`` distinct questions: natural phrasings about distinct stdlib objects."""
    templates = ["What does {} do?", "How do I use {}?", "When should I call {}?",
                 "Explain {} briefly."]
    names = sorted({d.source for d in demo_docs if "." in d.source})
    rng = np.random.default_rng(7)
    picked = rng.choice(len(names), n, replace=False)
    return [templates[j % len(templates)].format(names[i]) for j, i in enumerate(picked)]


@pytest.mark.slow
def test_http_answers_alone_equal_answers_in_concurrent_batches(client, demo_index, demo_docs):
    """200 questions, each asked alone, then all at once from 32 concurrent clients on real
    uvicorn: identical hits (ids, order, scores) on /v1/search, identical answers and
    citations on /v1/ask."""
    questions = _questions(demo_docs, 200)
    with RagPipeline.from_index_dir(client, demo_index, RagConfig(k=5),
                                    batch=BatchConfig(max_batch=64, max_wait_ms=5)) as pipe:
        pipe.warmup()
        config = ServeConfig(port=free_port())
        with ServerThread(create_app(pipe, config), config) as srv:
            def strip(path: str, body: dict) -> str:
                body.pop("timings_ms", None)
                return json.dumps(body, sort_keys=True)

            def alone(path: str, field: str, extra: dict) -> list[str]:
                with httpx.Client(base_url=srv.url, timeout=120) as http:
                    return [strip(path, http.post(path, json={field: q, **extra}).json())
                            for q in questions]

            async def together(path: str, field: str, extra: dict) -> tuple[list[str], int]:
                sem = asyncio.Semaphore(32)
                async with httpx.AsyncClient(base_url=srv.url, timeout=120,
                                             limits=httpx.Limits(max_connections=32)) as http:
                    async def one(q: str) -> str:
                        async with sem:
                            r = await http.post(path, json={field: q, **extra})
                            assert r.status_code == 200, r.text
                            return strip(path, r.json())

                    before = pipe.batchers()["search" if "search" in path else "ask"].stats
                    n0 = before.batches
                    out = await asyncio.gather(*(one(q) for q in questions))
                    return list(out), before.batches - n0

            # hybrid (the default) fuses by rank; dense mode also returns raw cosine scores,
            # which must match to the last bit
            for path, field, extra in (("/v1/search", "query", {}),
                                       ("/v1/search", "query", {"mode": "dense"}),
                                       ("/v1/ask", "question", {})):
                reference = alone(path, field, extra)
                assert len(set(reference)) > 150  # distinct questions, distinct answers
                concurrent, batches = asyncio.run(together(path, field, extra))
                assert batches < 200 / 2  # the concurrent run really shared graphs
                wrong = [q for q, a, b in zip(questions, reference, concurrent, strict=True)
                         if a != b]
                assert not wrong, f"{path}: {len(wrong)} differ, e.g. {wrong[:3]}"


@pytest.mark.slow
def test_same_index_same_results_on_1_2_and_4_workers(demo_index, demo_docs):
    """The number of workers (and so the placement of shards and embedding tasks) changes
    nothing: dense, sparse and hybrid hits are identical on 1, 2 and 4 workers."""
    queries = _questions(demo_docs, 24) + SHORT
    results = {}
    for n_workers in (1, 2, 4):
        with start_local_cluster(n_workers, dashboard_address=None,
                                 memory_limit="3GiB") as cluster, Client(cluster) as client, \
                RagPipeline.from_index_dir(client, demo_index) as pipe:
            results[n_workers] = {
                mode: [[(h.id, h.score) for h in hits]
                       for hits in pipe.search_many(queries, k=8, mode=mode)]
                for mode in ("dense", "sparse", "hybrid")}
    assert results[1] == results[2] == results[4]
    assert all(len(hits) == 8 for hits in results[1]["hybrid"])
