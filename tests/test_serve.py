"""The HTTP shim end to end: a real uvicorn server on 127.0.0.1, exercised with httpx."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest

from dask_rag.config import BatchConfig, RagConfig, ServeConfig
from dask_rag.pipeline import RagPipeline
from dask_rag.serve import ServerThread, create_app
from dask_rag.serve.server import free_port
from dask_rag.telemetry import Telemetry
from tests.servers import server_for

Q = "How do I serialize a Python object to a JSON string?"


@pytest.fixture(scope="module")
def pipe(client, demo_index):
    with RagPipeline.from_index_dir(client, demo_index, RagConfig(k=3),
                                   batch=BatchConfig(max_batch=64, max_wait_ms=5)) as p:
        p.warmup()
        yield p


_fresh = server_for


def _sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        kind = re.search(r"^event: (.*)$", block, re.M).group(1)
        data = json.loads(re.search(r"^data: (.*)$", block, re.M).group(1))
        events.append((kind, data))
    return events


def test_every_endpoint_end_to_end(pipe):
    with _fresh(pipe) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        doc = http.get("/openapi.json").json()
        assert {"/v1/search", "/v1/embed", "/v1/ask", "/healthz", "/readyz",
                "/metrics"} <= set(doc["paths"])
        r = http.post("/v1/search", json={"query": Q, "k": 4})
        assert r.status_code == 200
        hits = r.json()["hits"]
        assert len(hits) == 4 and hits[0]["source"].startswith("json")
        r = http.post("/v1/search", json={"query": "read rows", "k": 3,
                                          "filter": {"source_prefix": "csv."}})
        assert all(h["source"].startswith("csv.") for h in r.json()["hits"])
        r = http.post("/v1/embed", json={"input": "hello"})
        assert len(r.json()["data"]) == 1 and len(r.json()["data"][0]["embedding"]) == 384
        r = http.post("/v1/embed", json={"input": ["a", "b", "c"], "model": "default"})
        assert [d["index"] for d in r.json()["data"]] == [0, 1, 2]
        answer = http.post("/v1/ask", json={"question": Q}).json()
        assert answer["answer"] and answer["citations"]
        assert {"embed", "search", "generate", "total"} <= set(answer["timings_ms"])
        with http.stream("POST", "/v1/ask", json={"question": Q, "stream": True,
                                                  "stream_chunk_tokens": 2}) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            body = "".join(resp.iter_text())
        events = _sse(body)
        assert events[0][0] == "citations" and events[-1][0] == "done"
        text = "".join(d["text"] for kind, d in events if kind == "text")
        assert text == answer["answer"]
        assert sum(1 for kind, _ in events if kind == "text") > 1
        metrics = http.get("/metrics")
        assert metrics.status_code == 200 and "dask_rag_stage_latency_seconds" in metrics.text


@pytest.mark.parametrize("body,status,kind", [
    (b"{not json", 400, "malformed_request"),
    (b"\xff\xfe\x00bad utf8", 400, "malformed_request"),
    (b"", 400, "malformed_request"),
    (b"[1, 2]", 422, "invalid_input"),
    (b'{"query": 5}', 422, "invalid_input"),
    (b'{"q": "x"}', 422, "invalid_input"),
    (b"{}", 422, "invalid_input"),
    (b'{"query": ""}', 422, "invalid_input"),
    (b'{"query": "   "}', 422, "invalid_input"),
    (b'{"query": "x", "k": 0}', 422, "invalid_input"),
    (b'{"query": "x", "k": 100000}', 422, "invalid_input"),
    (b'{"query": "x", "k": true}', 422, "invalid_input"),
    (b'{"query": "x", "k": "5"}', 422, "invalid_input"),
    (b'{"query": "x", "mode": "psychic"}', 422, "invalid_input"),
    (b'{"query": "x", "filter": {"colour": 1}}', 422, "invalid_input"),
    (b'{"query": "x", "filter": "json."}', 422, "invalid_input"),
    (b'{"query": NaN}', 400, "malformed_request"),
])
def test_bad_search_bodies(pipe, body, status, kind):
    with _fresh(pipe) as srv:
        r = httpx.post(srv.url + "/v1/search", content=body,
                       headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == kind and r.json()["error"]["message"]


def test_bad_bodies_other_endpoints(pipe):
    with _fresh(pipe, max_body_bytes=32_768) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http:
        cases = [
            ("/v1/ask", {"question": "x" * 8193}, 422),
            ("/v1/ask", {"question": "ok", "temperature": -1}, 422),
            ("/v1/ask", {"question": "ok", "top_p": 0}, 422),
            ("/v1/ask", {"question": "ok", "max_tokens": 0}, 422),
            ("/v1/ask", {"question": "ok", "stream": "yes"}, 422),
            ("/v1/ask", {"question": "ok", "stop": [1]}, 422),
            ("/v1/ask", {"question": "ok\u0000"}, 422),
            ("/v1/embed", {"input": []}, 422),
            ("/v1/embed", {"input": [[1, -2]]}, 422),
            ("/v1/embed", {"input": [[]]}, 422),
            ("/v1/embed", {"input": [1.5]}, 422),
            ("/v1/embed", {"input": "x", "encoding_format": "binary"}, 422),
            ("/v1/embed", {"input": "x", "model": "gpt-4"}, 404),
        ]
        for path, body, status in cases:
            r = http.post(path, json=body)
            assert r.status_code == status, (path, body, r.text)
            assert set(r.json()["error"]) == {"type", "message"}
        r = http.post("/v1/search", content=b'{"query": "' + b"a" * 40_000 + b'"}')
        assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"
        assert http.get("/nope").status_code == 404 and "error" in http.get("/nope").json()
        r = http.get("/v1/search")
        assert r.status_code == 405 and "error" in r.json()


def test_overload_burst_gets_429_and_recovers(pipe):
    cap = 4
    with _fresh(pipe, max_inflight=cap) as srv:
        async def burst():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
                tasks = [http.post("/v1/ask", json={"question": f"{Q} {i}"})
                         for i in range(5 * cap)]
                health = []

                async def probe():
                    for _ in range(5):
                        health.append((await http.get("/healthz")).status_code)
                        await asyncio.sleep(0.01)

                results = await asyncio.gather(*tasks, probe())
                return results[:-1], health

        responses, health = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert all(c < 500 for c in codes), codes
        rejected = [r for r in responses if r.status_code == 429]
        assert rejected and all(int(r.headers["retry-after"]) >= 1 for r in rejected)
        assert all(r.json()["error"]["type"] == "overloaded" for r in rejected)
        assert 200 in codes and health == [200] * 5
        after = httpx.post(srv.url + "/v1/ask", json={"question": Q}, timeout=60)
        assert after.status_code == 200


def test_no_batching_is_the_same_path_with_batches_of_one(pipe):
    """``serve --no-batching`` (the naive baseline) runs the batched code path with batches of
    one: concurrent requests are never merged, and they get what the batched path gives."""
    queries = [f"{Q} ({i})" for i in range(8)]
    expected = [[h.id for h in hits] for hits in pipe.search_many(queries, k=3)]
    before = {name: len(b.stats.batch_sizes) for name, b in pipe.batchers().items()}
    configs = {name: b.config for name, b in pipe.batchers().items()}
    with _fresh(pipe, batching=False) as srv:
        async def burst():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
                return await asyncio.gather(
                    *(http.post("/v1/search", json={"query": q, "k": 3}) for q in queries),
                    *(http.post("/v1/ask", json={"question": q}) for q in queries[:4]),
                    http.post("/v1/embeddings", json={"input": queries[:3]}))

        responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * len(responses)
    assert [[h["id"] for h in r.json()["hits"]] for r in responses[:8]] == expected
    sizes = {name: b.stats.batch_sizes[before[name]:] for name, b in pipe.batchers().items()}
    assert len(sizes["search"]) == 8 and len(sizes["ask"]) == 4 and len(sizes["embed"]) == 3
    assert {n for s in sizes.values() for n in s} == {1}
    assert {name: b.config for name, b in pipe.batchers().items()} == configs  # restored


def test_rate_limit_and_timeout(pipe):
    with _fresh(pipe, rate_limit_per_s=0.5, rate_limit_burst=2) as srv:
        codes = [httpx.post(srv.url + "/v1/search", json={"query": "x"}, timeout=30).status_code
                 for _ in range(4)]
        assert codes[:2] == [200, 200] and 429 in codes[2:]
    with _fresh(pipe, request_timeout_s=0.001) as srv:
        r = httpx.post(srv.url + "/v1/ask", json={"question": Q}, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"


def test_api_keys(pipe):
    with _fresh(pipe, api_keys=("s3cret", "other")) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http:
        assert http.get("/healthz").status_code == 200
        r = http.post("/v1/search", json={"query": "x"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        bad = http.post("/v1/search", json={"query": "x"},
                        headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401
        assert http.get("/metrics").status_code == 401
        ok = http.post("/v1/search", json={"query": "x"},
                       headers={"Authorization": "Bearer other"})
        assert ok.status_code == 200


def _count(text: str, name: str, **labels) -> float:
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}\{{{sel}\}} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_metrics_count_the_requests(pipe):
    generate_ms = 0.0
    with _fresh(pipe, telemetry=Telemetry()) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as http:
        for i in range(5):
            assert http.post("/v1/search", json={"query": f"sort a list {i}"}).status_code == 200
        for i in range(3):
            r = http.post("/v1/ask", json={"question": f"sort a list {i}?"})
            assert r.status_code == 200
            generate_ms += r.json()["timings_ms"]["generate"]
        http.post("/v1/search", json={"query": 3})  # a 422 is counted, not timed
        text = http.get("/metrics").text
    # the histograms hold exactly the per-stage timings the responses reported
    assert _count(text, "dask_rag_stage_latency_seconds_sum", stage="generate") == \
        pytest.approx(generate_ms / 1000, rel=1e-3)
    h = "dask_rag_stage_latency_seconds_count"
    assert _count(text, h, stage="total") == 8
    assert _count(text, h, stage="embed") == 8
    assert _count(text, h, stage="search") == 8
    assert _count(text, h, stage="generate") == 3
    assert _count(text, "dask_rag_requests_total", endpoint="search", status="200") == 5
    assert _count(text, "dask_rag_requests_total", endpoint="search", status="422") == 1
    assert _count(text, "dask_rag_batch_size_count", batcher="search") >= 1


def test_traceparent_is_continued(pipe):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    with _fresh(pipe, telemetry=Telemetry(provider)) as srv:
        r = httpx.post(srv.url + "/v1/ask", json={"question": Q}, timeout=60,
                       headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
        assert r.status_code == 200
    spans = exporter.get_finished_spans()
    assert {format(s.context.trace_id, "032x") for s in spans} == {trace_id}
    names = {s.name for s in spans}
    assert "POST /v1/ask" in names and {"dask_rag.embed", "dask_rag.search",
                                        "dask_rag.generate"} <= names


def test_spans_only_built_when_a_tracer_provider_exists():
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        pytest.skip("a global tracer provider is installed in this process")
    quiet = Telemetry()
    assert not quiet.tracing()
    with quiet.request_span("GET /x", {}) as span:
        assert span is None
    traced = Telemetry(TracerProvider())
    assert traced.tracing()
    with traced.request_span("GET /x", {}) as span:
        assert span is not None and span.is_recording()


def test_graceful_shutdown_drains_inflight(pipe, client, tmp_path):
    """Shutdown starts while six asks are provably in flight — their shard searches are
    blocked at a fault point (reported), and the server counts them — and every one of them
    still gets its answer."""
    import logging

    from dask_rag.faults import ArmFaults, read_report

    report, release = tmp_path / "faults.log", tmp_path / "release"
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    config = ServeConfig(port=free_port())
    srv = ServerThread(create_app(pipe, config), config, log_level="info").start()
    uvicorn_log = logging.getLogger("uvicorn.error")  # after uvicorn configured its logging
    keep = Keep(level=logging.INFO)
    uvicorn_log.addHandler(keep)
    client.register_plugin(ArmFaults({"search.shard": "block"}, report=str(report),
                                     release=str(release)))
    try:
        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
                tasks = [asyncio.ensure_future(http.post("/v1/ask", json={
                    "question": f"{Q} {i}"})) for i in range(6)]
                guard = srv.server.config.app.state.guard
                while guard.inflight < 6 or not read_report(report):
                    await asyncio.sleep(0.01)  # polling state, not waiting out a timer
                assert not any(t.done() for t in tasks)
                stopping = asyncio.ensure_future(asyncio.to_thread(srv.stop))
                while not any("Waiting for connections to close" in m for m in said):
                    assert not stopping.done()
                    await asyncio.sleep(0.01)  # uvicorn is draining: no new connections
                assert guard.inflight == 6  # shutdown began with all six in flight
                release.touch()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                await stopping
                return results

        results = asyncio.run(run())
    finally:
        client.register_plugin(ArmFaults({}))
        release.touch()
        uvicorn_log.removeHandler(keep)
    assert all(not isinstance(r, Exception) and r.status_code == 200 for r in results), results
    assert all(r.json()["answer"] for r in results)
