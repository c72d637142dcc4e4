"""``openai:URL#MODEL``: an OpenAI-compatible chat server as the generator, tested against
real servers — the project's own ``dask-rag serve`` (uvicorn + Starlette, whose chat route the
official ``openai`` client passes) as the upstream of a second pipeline, and small hostile
upstreams for the failure cases (down, slow, bad key, malformed server-sent events, a client
that goes away mid-stream)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from dask_rag.config import RagConfig
from dask_rag.errors import InvalidInput, UpstreamRejected, UpstreamUnavailable
from dask_rag.rag.generate.base import SamplingParams, parse_generator_spec
from dask_rag.rag.generate.openai_upstream import OpenAIUpstream
from tests.servers import server_for

QUESTION = "How do I serialize an object to a JSON string?"


@pytest.fixture(scope="module")
def upstream(client, demo_index):
    """The project's own server, answering chat completions with its extractive RAG."""
    from dask_rag.pipeline import RagPipeline

    with RagPipeline.from_index_dir(client, demo_index) as pipe:
        server = server_for(pipe, api_keys=("up-key",)).start()
        try:
            yield pipe, server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def downstream(client, demo_index, upstream):
    """A pipeline whose generator is the upstream, served too."""
    import os

    from dask_rag.pipeline import RagPipeline

    os.environ["DASK_RAG_OPENAI_API_KEY"] = "up-key"
    spec = f"openai:{upstream[1].url}/v1#dask-rag"
    with RagPipeline.from_index_dir(client, demo_index, RagConfig(generator=spec)) as pipe:
        server = server_for(pipe).start()
        try:
            yield pipe, server
        finally:
            server.stop()
            os.environ.pop("DASK_RAG_OPENAI_API_KEY", None)


def _prompt(pipe, question: str) -> str:
    req = pipe.ask_request(question)
    (result,) = pipe.client.gather(pipe.submit_ask([req]))
    return str(result["prompt"])


def test_specs_parse_and_bad_ones_are_refused():
    spec = parse_generator_spec("openai:http://127.0.0.1:9/v1#llama")
    assert (spec.kind, spec.path, dict(spec.options)) == ("openai", "http://127.0.0.1:9/v1",
                                                          {"model": "llama"})
    assert str(spec) == "openai:http://127.0.0.1:9/v1#llama"
    with pytest.raises(InvalidInput, match="http"):
        parse_generator_spec("openai:ftp://x/v1")
    with pytest.raises(InvalidInput, match="openai:"):
        parse_generator_spec("gpt:whatever")


def test_answers_come_from_the_upstream(downstream, upstream):
    """/v1/chat/completions (plain and streamed, through the official client) and /v1/ask
    answer with exactly what the upstream answers for the prompt this pipeline built."""
    from openai import OpenAI

    pipe, server = downstream
    up_pipe, _ = upstream
    expected = up_pipe.ask(_prompt(pipe, QUESTION)).text
    assert expected
    api = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    plain = api.chat.completions.create(model="dask-rag",
                                        messages=[{"role": "user", "content": QUESTION}])
    assert plain.choices[0].message.content == expected
    assert plain.usage.completion_tokens > 0  # the upstream's usage, passed on
    pieces = [c.choices[0].delta.content or "" for c in api.chat.completions.create(
        model="dask-rag", messages=[{"role": "user", "content": QUESTION}], stream=True)
        if c.choices]
    assert "".join(pieces) == expected
    r = httpx.post(f"{server.url}/v1/ask", json={"question": QUESTION}, timeout=60)
    assert r.status_code == 200 and r.json()["answer"] == expected
    with httpx.stream("POST", f"{server.url}/v1/ask", json={"question": QUESTION,
                                                            "stream": True}, timeout=60) as s:
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    text = "".join(e["text"] for e in events if e["event"] == "text")
    assert events[0]["event"] == "citations" and events[-1]["event"] == "done"
    assert text == expected
    # the synchronous API and a batch (sent concurrently) answer the same
    assert pipe.ask(QUESTION).text == expected
    answers = pipe.ask_many([QUESTION, "How do I sort a list in place?"])
    assert answers[0].text == expected and answers[1].text


def test_upstream_down_is_a_clear_503(client, demo_index):
    from dask_rag.pipeline import RagPipeline
    from dask_rag.serve.server import free_port

    spec = f"openai:http://127.0.0.1:{free_port()}/v1#m"
    with RagPipeline.from_index_dir(client, demo_index, RagConfig(generator=spec)) as pipe:
        server = server_for(pipe).start()
        try:
            t0 = time.monotonic()
            r = httpx.post(f"{server.url}/v1/ask", json={"question": QUESTION}, timeout=60)
            assert r.status_code == 503 and "Retry-After" in r.headers
            assert "cannot reach the generator upstream http://127.0.0.1" in \
                r.json()["error"]["message"]
            assert time.monotonic() - t0 < 30
            with pytest.raises(UpstreamUnavailable):
                pipe.ask(QUESTION)
        finally:
            server.stop()


def test_bad_key_names_the_upstream(client, demo_index, upstream, monkeypatch):
    from dask_rag.pipeline import RagPipeline

    monkeypatch.setenv("DASK_RAG_OPENAI_API_KEY", "wrong")
    spec = f"openai:{upstream[1].url}/v1#dask-rag"
    with RagPipeline.from_index_dir(client, demo_index, RagConfig(generator=spec)) as pipe:
        server = server_for(pipe).start()
        try:
            r = httpx.post(f"{server.url}/v1/ask", json={"question": QUESTION}, timeout=60)
            assert r.status_code == 502
            message = r.json()["error"]["message"]
            assert upstream[1].url in message and "HTTP 401" in message
            assert "wrong" not in message  # the key is never echoed
        finally:
            server.stop()


class _Hostile:
    """A raw upstream on a thread: ``mode`` slow (never answers in time), garbage (a stream of
    malformed events), 429, or drip (streams forever; records when the client hangs up)."""

    def __init__(self, mode: str) -> None:
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route

        from dask_rag.config import ServeConfig
        from dask_rag.serve import ServerThread
        from dask_rag.serve.server import free_port

        self.closed = threading.Event()

        async def chat(request):
            body = await request.json()
            if mode == "slow":
                await asyncio.sleep(10)
            if mode == "429":
                return JSONResponse({"error": "busy"}, status_code=429,
                                    headers={"Retry-After": "7"})

            async def events():
                try:
                    if mode == "garbage":
                        yield b"data: {not json\n\n"
                    for i in range(100_000):
                        chunk = {"choices": [{"delta": {"content": f"w{i} "}}]}
                        yield f"data: {json.dumps(chunk)}\n\n".encode()
                        await asyncio.sleep(0.05)
                finally:
                    self.closed.set()

            if body.get("stream"):
                return StreamingResponse(events(), media_type="text/event-stream")
            return JSONResponse({"unexpected": True})

        app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
        self.server = ServerThread(app, ServeConfig(port=free_port())).start()
        self.url = f"{self.server.url}/v1"


def test_slow_malformed_and_busy_upstreams():
    params = SamplingParams()

    async def run() -> None:
        slow = _Hostile("slow")
        try:
            with pytest.raises(Exception, match="did not answer within 0.5 s"):
                await OpenAIUpstream(slow.url, "m", timeout_s=0.5).complete("q", params)
        finally:
            slow.server.stop()
        garbage = _Hostile("garbage")
        try:
            with pytest.raises(UpstreamRejected, match="malformed server-sent event"):
                async for _ in OpenAIUpstream(garbage.url, "m").stream("q", params):
                    pass
            with pytest.raises(UpstreamRejected, match="not a chat completion"):
                await OpenAIUpstream(garbage.url, "m").complete("q", params)
        finally:
            garbage.server.stop()
        busy = _Hostile("429")
        try:
            with pytest.raises(UpstreamUnavailable) as info:
                await OpenAIUpstream(busy.url, "m").complete("q", params)
            assert info.value.retry_after == 7.0 and "HTTP 429" in str(info.value)
        finally:
            busy.server.stop()

    asyncio.run(run())


def test_a_client_that_leaves_closes_the_upstream_request(client, demo_index):
    """/v1/ask streaming through a never-ending upstream: the client reads a piece and hangs
    up; the upstream sees its request closed."""
    from dask_rag.pipeline import RagPipeline

    drip = _Hostile("drip")
    try:
        with RagPipeline.from_index_dir(client, demo_index,
                                        RagConfig(generator=f"openai:{drip.url}#m")) as pipe:
            server = server_for(pipe).start()
            try:
                with httpx.stream("POST", f"{server.url}/v1/ask",
                                  json={"question": QUESTION, "stream": True},
                                  timeout=60) as s:
                    for line in s.iter_lines():
                        if line.startswith("event: text"):
                            break
                assert drip.closed.wait(15), "the upstream request stayed open"
            finally:
                server.stop()
    finally:
        drip.server.stop()


def test_context_length_is_asked_again_after_the_upstream_was_down():
    """An upstream down when the first request asks its context length must not fix the
    prompt budget for good: it is asked again after ``context_retry_s``.  An upstream that
    answers (here a 404: no ``/models`` route) is not asked again."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from dask_rag.config import ServeConfig
    from dask_rag.serve import ServerThread
    from dask_rag.serve.server import free_port

    asked = []

    async def models(request):
        asked.append(1)
        return JSONResponse({"object": "list", "data": [
            {"id": "other", "max_model_len": 512}, {"id": "m", "max_model_len": 2048}]})

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"

    async def run() -> None:
        up = OpenAIUpstream(url, "m", context_retry_s=0.5)
        no_route = OpenAIUpstream(f"http://127.0.0.1:{port}/nothing", "m", context_retry_s=0.0)
        assert await up.context_length() is None  # nothing listens yet
        server = ServerThread(Starlette(routes=[Route("/v1/models", models)]),
                              ServeConfig(port=port)).start()
        try:
            assert await up.context_length() is None  # within context_retry_s: not asked
            assert asked == []
            await asyncio.sleep(0.6)
            assert await up.context_length() == 2048  # the model's own entry
            assert await up.context_length() == 2048 and asked == [1]  # kept
            assert await no_route.context_length() is None  # 404: an answer, kept
            assert no_route._context is None
        finally:
            await up.close_loop()
            await no_route.close_loop()
            server.stop()

    asyncio.run(run())
