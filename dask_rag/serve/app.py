"""The HTTP shim: ``create_app(pipeline, config)`` → a Starlette app.

Handlers are thin: parse + validate the body, call the pipeline's async entry points (which
coalesce concurrent requests into one Dask graph per batch via the micro-batcher), shape JSON.
Cross-cutting concerns live in one middleware: API keys, body-size limit, in-flight bound and
rate limit (429 + Retry-After), per-request timeout (504), metrics and tracing.  Nothing here
knows about faiss or torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dask_rag.batching import wait_at_most
from dask_rag.config import ServeConfig
from dask_rag.errors import (
    DaskRagError,
    InvalidInput,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    http_status,
)
from dask_rag.serve.openapi import openapi_document
from dask_rag.serve.schemas import AskRequest, EmbedRequest, SearchRequest, parse_body
from dask_rag.telemetry import Telemetry

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})


def error_response(exc: BaseException) -> JSONResponse:
    status = http_status(exc)
    if isinstance(exc, DaskRagError):
        body = {"error": {"type": exc.type_name, "message": str(exc)}}
    else:  # unexpected: log it, do not leak internals
        logger.exception("unhandled error", exc_info=exc)
        body = {"error": {"type": "internal_error", "message": "internal server error"}}
    headers = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers=headers)


class TokenBucket:
    """Per-key rate limit: ``rate`` requests per second, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._state: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """0 if a token was taken, else the seconds until one is available."""
        now = time.monotonic()
        tokens, last = self._state.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._state[key] = (tokens - 1.0, now)
            return 0.0
        self._state[key] = (tokens, now)
        return (1.0 - tokens) / self.rate


class Guard:
    """API keys, body limit, in-flight bound, rate limit, timeout, metrics — one place."""

    def __init__(self, config: ServeConfig, telemetry: Telemetry) -> None:
        self.config = config
        self.telemetry = telemetry
        self.inflight = 0
        self.bucket = (TokenBucket(config.rate_limit_per_s, config.rate_limit_burst)
                       if config.rate_limit_per_s else None)
        self._keys = [k.encode() for k in config.api_keys]

    def _client_key(self, request: Request) -> str:
        auth = request.headers.get("authorization", "")
        if self._keys and auth.lower().startswith("bearer "):
            return "key:" + auth[7:].strip()[:12]
        return "ip:" + (request.client.host if request.client else "?")

    def authorize(self, request: Request) -> None:
        if not self._keys or request.scope["path"] in OPEN_PATHS:
            return
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        given = auth[7:].strip().encode()
        # compare against every key, always, in constant time per key
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(given, key)
        if not ok:
            raise Unauthorized("invalid API key")

    def admit(self, request: Request) -> None:
        if self.inflight >= self.config.max_inflight:
            self.telemetry.rejected.labels(reason="inflight").inc()
            raise Overloaded(f"{self.inflight} requests in flight (limit "
                             f"{self.config.max_inflight}); retry later", retry_after=1.0)
        if self.bucket is not None:
            wait = self.bucket.take(self._client_key(request))
            if wait > 0:
                self.telemetry.rejected.labels(reason="rate_limit").inc()
                raise Overloaded("rate limit exceeded", retry_after=max(1.0, wait))

    async def body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise InvalidInput("invalid Content-Length header") from None
            if n > limit:
                raise PayloadTooLarge(f"request body is {n} bytes; the limit is {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


Handler = Callable[[Request], Awaitable[Response]]


def guarded(name: str, handler: Callable[[Request, bytes], Awaitable[Response]],
            needs_body: bool = True) -> Handler:
    """Wrap a handler with auth, admission, the body (read under its size limit), timeout,
    metrics and tracing; the handler parses the body into its request model."""

    async def endpoint(request: Request) -> Response:
        state = request.app.state
        guard: Guard = state.guard
        telemetry: Telemetry = state.telemetry
        status = 500
        with telemetry.request_span(f"{request.method} {request.scope['path']}",
                                    request.headers) as span:
            try:
                guard.authorize(request)
                guard.admit(request)
                guard.inflight += 1
                telemetry.inflight.inc()
                try:
                    body = await guard.body(request) if needs_body else b""
                    response = await wait_at_most(handler(request, body),
                                                  guard.config.request_timeout_s)
                finally:
                    guard.inflight -= 1
                    telemetry.inflight.dec()
            except asyncio.TimeoutError:
                response = error_response(RequestTimeout(
                    f"request did not finish within {guard.config.request_timeout_s} s"))
            except Exception as exc:  # mapped to a status by the one error table
                response = error_response(exc)
            status = response.status_code
            timings = getattr(response, "timings_ms", None)
            if timings:
                telemetry.observe_stages(timings)
                telemetry.stage_spans(span, timings)
            if span is not None:
                span.set_attribute("http.status_code", status)
            telemetry.count_request(name, status)
            return response

    return endpoint


def _json(data: Any, timings: dict[str, float] | None = None) -> JSONResponse:
    resp = JSONResponse(data)
    resp.timings_ms = timings  # type: ignore[attr-defined]
    return resp


# ------------------------------------------------------------------------------------------------
# handlers
# ------------------------------------------------------------------------------------------------


async def search(request: Request, body: bytes) -> Response:
    state = request.app.state
    req = parse_body(SearchRequest, body)
    pipe = state.pipeline
    if state.config.batching:
        hits, timings = await pipe.asearch_timed(req)
    else:  # naive mode: one graph per request (the benchmark's baseline)
        hits, timings = await pipe.asearch_now(req)
    return _json({"hits": [h.to_dict() for h in hits],
                  "timings_ms": {k: round(v, 3) for k, v in timings.items()}}, timings)


async def embed(request: Request, body: bytes) -> Response:
    state = request.app.state
    texts = parse_body(EmbedRequest, body).texts(state.config.max_batch_inputs)
    embedder = state.pipeline.embedder
    t0 = time.perf_counter()
    if state.config.batching:
        vectors = await asyncio.gather(*(embedder.aembed(t) for t in texts))
    else:
        vectors = list(await embedder.aembed_now(texts))
    timings = {"embed": (time.perf_counter() - t0) * 1e3}
    timings["total"] = timings["embed"]
    tokens = sum(len(t.split()) for t in texts)
    return _json({"object": "list", "model": embedder.config.model,
                  "data": [{"object": "embedding", "index": i, "embedding": v.tolist()}
                           for i, v in enumerate(vectors)],
                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, timings)


async def ask(request: Request, body: bytes) -> Response:
    state = request.app.state
    pipe = state.pipeline
    req = parse_body(AskRequest, body)
    if req.stream:
        return await _ask_stream(request, req)
    if state.config.batching:
        answer = await pipe.aask(req)
    else:
        answer = await pipe.aask_now(req)
    return _json(answer.to_dict(), answer.timings_ms)


async def _ask_stream(request: Request, req: AskRequest) -> Response:
    """Server-Sent Events: ``citations``, ``text`` pieces, then ``done`` (or ``error``)."""
    pipe = request.app.state.pipeline
    telemetry: Telemetry = request.app.state.telemetry
    events = pipe.astream(req)
    # fail before the 200 if retrieval itself fails (bad filter, shard loss, ...)
    first = await events.__anext__()

    async def sse() -> AsyncIterator[bytes]:
        event = first
        try:
            while True:
                yield f"event: {event['event']}\ndata: {json.dumps(event)}\n\n".encode()
                if event["event"] == "done":
                    telemetry.observe_stages(event["timings_ms"])
                event = await events.__anext__()
        except StopAsyncIteration:
            return
        except Exception as exc:
            err = bytes(error_response(exc).body).decode()
            yield f"event: error\ndata: {err}\n\n".encode()

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    try:
        ok, detail = await asyncio.wait_for(
            asyncio.to_thread(request.app.state.pipeline.shards_ready), 5.0)
    except Exception as exc:  # cluster unreachable, timeout
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    return JSONResponse({"status": "ready" if ok else "not ready", "detail": detail},
                        status_code=200 if ok else 503)


async def metrics(request: Request, body: bytes) -> Response:
    data, content_type = request.app.state.telemetry.exposition()
    return Response(data, media_type=content_type)


async def openapi(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


async def not_found(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    kind = "not_found" if status == 404 else "method_not_allowed"
    return JSONResponse({"error": {"type": kind, "message": f"{request.method} "
                                   f"{request.url.path}: {getattr(exc, 'detail', 'not found')}"}},
                        status_code=status)


# ------------------------------------------------------------------------------------------------
# the app
# ------------------------------------------------------------------------------------------------


def create_app(pipeline: Any, config: ServeConfig | None = None,
               telemetry: Telemetry | None = None) -> Starlette:
    """The Starlette app serving ``pipeline`` (a :class:`~dask_rag.pipeline.RagPipeline`)."""
    config = config or ServeConfig()
    telemetry = telemetry or Telemetry()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for name, batcher in pipeline.batchers().items():
            batcher.reopen()
            batcher.observer = telemetry.batch_observer(name)
        logger.info("dask-rag serving %s; Dask dashboard: %s", pipeline.index.path,
                    pipeline.client.dashboard_link)
        yield
        # graceful shutdown: uvicorn has stopped accepting and drained the open requests;
        # finish whatever is still queued in the batchers
        await pipeline.aclose()

    routes = [
        Route("/v1/search", guarded("search", search), methods=["POST"]),
        Route("/v1/embed", guarded("embed", embed), methods=["POST"]),
        Route("/v1/ask", guarded("ask", ask), methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", guarded("metrics", metrics, needs_body=False), methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: not_found, 405: not_found})
    app.state.pipeline = pipeline
    app.state.config = config
    app.state.telemetry = telemetry
    app.state.guard = Guard(config, telemetry)
    app.state.openapi = openapi_document(config)
    return app
