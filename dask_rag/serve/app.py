"""The HTTP shim: ``create_app(pipeline, config)`` → a Starlette app.

Handlers are thin: parse + validate the body, call the pipeline's async entry points (which
coalesce concurrent requests into one Dask graph per batch via the micro-batcher), and answer
with a response model of :mod:`dask_rag.serve.schemas` (the ones the OpenAPI document shows).
Cross-cutting concerns live in one middleware: API keys, body-size limit, in-flight bound and
rate limit (429 + Retry-After), per-request timeout (504), metrics and tracing.  Nothing here
knows about faiss or torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dask_rag.collections import Collections
from dask_rag.config import ServeConfig
from dask_rag.errors import PayloadTooLarge
from dask_rag.rag.requests import MAX_WRITE_BATCH
from dask_rag.serve import openai_api
from dask_rag.serve.guard import (
    Guard,
    allowed_collections,
    guarded,
    json_response,
    pipeline_for,
    require_unrestricted_write,
    sse_response,
)
from dask_rag.serve.openapi import openapi_document
from dask_rag.serve.schemas import (
    AskRequest,
    AskResponse,
    CollectionCreate,
    CollectionDeleted,
    CollectionList,
    CollectionOut,
    DeleteRequest,
    ErrorBody,
    ErrorResponse,
    SearchRequest,
    SearchResponse,
    Status,
    UpsertRequest,
    WriteResponse,
    parse_body,
)
from dask_rag.telemetry import Telemetry

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# handlers
# ------------------------------------------------------------------------------------------------


def _collection(request: Request) -> str | None:
    return request.path_params.get("name")


async def search(request: Request, body: bytes) -> Response:
    req = parse_body(SearchRequest, body)
    pipe = pipeline_for(request, _collection(request))
    hits, timings = await pipe.asearch_timed(req)
    return json_response(SearchResponse.of(hits, timings), timings)


async def ask(request: Request, body: bytes) -> Response:
    req = parse_body(AskRequest, body)
    pipe = pipeline_for(request, _collection(request))
    if req.stream:
        return await _ask_stream(request, pipe, req)
    answer = await pipe.aask(req)
    return json_response(AskResponse.of(answer), answer.timings_ms)


async def _ask_stream(request: Request, pipe: Any, req: AskRequest) -> Response:
    """Server-Sent Events: ``citations``, ``text`` pieces, then ``done`` (or ``error``)."""

    def render(event: dict[str, Any]) -> list[bytes]:
        return [f"event: {event['event']}\ndata: {json.dumps(event)}\n\n".encode()]

    return await sse_response(request, pipe.astream(req), render,
                              lambda err: b"event: error\ndata: " + err + b"\n\n")


async def _write(request: Request, req: Any, count: int, what: str,
                 run: Callable[[Any, Any], Awaitable[dict[str, int]]]) -> Response:
    """A write: 413 beyond MAX_WRITE_BATCH items, the key's write scope, then ``run``; the
    200 comes after the write-ahead log entry is on disk."""
    if count > MAX_WRITE_BATCH:
        raise PayloadTooLarge(f"request.{what} has {count} items; the limit is "
                              f"{MAX_WRITE_BATCH} per request")
    pipe = pipeline_for(request, _collection(request), write=True)
    t0 = time.perf_counter()
    out = await run(pipe, req)
    return json_response(WriteResponse(**out), {"write": (time.perf_counter() - t0) * 1e3})


async def upsert(request: Request, body: bytes) -> Response:
    """Documents replaced by id (their old chunks go as the new ones come)."""
    req = parse_body(UpsertRequest, body)
    return await _write(request, req, len(req.documents), "documents",
                        lambda pipe, r: pipe.aupsert(r))


async def delete(request: Request, body: bytes) -> Response:
    """Documents removed by id (every chunk of each)."""
    req = parse_body(DeleteRequest, body)
    return await _write(request, req, len(req.ids), "ids", lambda pipe, r: pipe.adelete(r))


async def list_collections(request: Request, body: bytes) -> Response:
    collections: Collections = request.app.state.collections
    return json_response(CollectionList(collections=[
        CollectionOut(**collections.describe(n)) for n in allowed_collections(request)]))


async def get_collection(request: Request, body: bytes) -> Response:
    pipeline_for(request, _collection(request))  # scope, then existence
    return json_response(CollectionOut(
        **request.app.state.collections.describe(_collection(request))))


async def create_collection(request: Request, body: bytes) -> Response:
    req = parse_body(CollectionCreate, body)
    require_unrestricted_write(request)
    state = request.app.state
    collections: Collections = state.collections
    pipe = await asyncio.to_thread(collections.create, req.name, req.factory, req.shards)
    for bname, batcher in pipe.batchers().items():
        if batcher.observer is None:
            batcher.observer = state.telemetry.batch_observer(f"{req.name}/{bname}")
        if not state.config.batching:
            batcher.config = state.config.batch
    return json_response(CollectionOut(**collections.describe(req.name)))


async def delete_collection(request: Request, body: bytes) -> Response:
    require_unrestricted_write(request, "deleting a collection")
    collections: Collections = request.app.state.collections
    gone = await collections.adelete(str(_collection(request)))
    return json_response(CollectionDeleted(name=gone["name"], deleted=True,
                                           chunks=gone["chunks"]))


async def healthz(request: Request) -> Response:
    return json_response(Status(status="ok"))


async def readyz(request: Request) -> Response:
    collections: Collections = request.app.state.collections

    def check() -> tuple[bool, str]:
        details: list[str] = []
        for name in collections.names():
            ok, detail = collections.get(name).shards_ready()
            if not ok:
                return False, f"collection {name!r}: {detail}"
            details.append(detail if name == collections.default_name else f"{name}: {detail}")
        return True, "; ".join(details)

    try:
        ok, detail = await asyncio.wait_for(asyncio.to_thread(check), 5.0)
    except Exception as exc:  # cluster unreachable, timeout
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    return json_response(Status(status="ready" if ok else "not ready", detail=detail),
                         status_code=200 if ok else 503)


async def metrics(request: Request, body: bytes) -> Response:
    collections: Collections = request.app.state.collections
    with contextlib.suppress(Exception):  # the cluster unreachable: the rest still reports
        _, mismatched, _ = await asyncio.to_thread(collections.default.encoder_status)
        request.app.state.telemetry.encoder_mismatch.set(mismatched)
    data, content_type = request.app.state.telemetry.exposition()
    return Response(data, media_type=content_type)


async def openapi(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


async def not_found(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    kind = "not_found" if status == 404 else "method_not_allowed"
    return json_response(ErrorResponse(error=ErrorBody(
        type=kind, message=f"{request.method} {request.url.path}: "
                           f"{getattr(exc, 'detail', 'not found')}")), status_code=status)


# ------------------------------------------------------------------------------------------------
# the app
# ------------------------------------------------------------------------------------------------


def create_app(pipeline: Any, config: ServeConfig | None = None,
               telemetry: Telemetry | None = None) -> Starlette:
    """The Starlette app serving ``pipeline``: a :class:`~dask_rag.pipeline.RagPipeline`
    (served as the default collection) or :class:`~dask_rag.collections.Collections`."""
    config = config or ServeConfig()
    telemetry = telemetry or Telemetry()
    collections = pipeline if isinstance(pipeline, Collections) else Collections(pipeline)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        configured = {}
        for name, batcher in collections.batchers().items():
            batcher.reopen()
            if not config.batching:  # the naive baseline: batches of one (see BatchConfig)
                configured[name], batcher.config = batcher.config, config.batch
            batcher.observer = telemetry.batch_observer(name)
        default = collections.default
        logger.info("dask-rag serving %s (%d collections); Dask dashboard: %s",
                    default.index.path, len(collections.names()),
                    default.client.dashboard_link)
        yield
        # graceful shutdown: uvicorn has stopped accepting and drained the open requests;
        # finish whatever is still queued in the batchers
        await collections.aclose()
        for name, batcher in collections.batchers().items():  # as they were before serving
            batcher.config = configured.get(name, batcher.config)

    embeddings = guarded("embeddings", openai_api.embeddings, large_body=True)
    routes = [
        Route("/v1/search", guarded("search", search), methods=["POST"]),
        Route("/v1/ask", guarded("ask", ask), methods=["POST"]),
        Route("/v1/embed", embeddings, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", guarded("models", openai_api.models, needs_body=False),
              methods=["GET"]),
        Route("/v1/chat/completions", guarded("chat", openai_api.chat_completions),
              methods=["POST"]),
        Route("/v1/documents", guarded("upsert", upsert, large_body=True), methods=["POST"]),
        Route("/v1/documents/delete", guarded("delete", delete, large_body=True),
              methods=["POST"]),
        Route("/v1/collections", guarded("collections", list_collections, needs_body=False),
              methods=["GET"]),
        Route("/v1/collections", guarded("create_collection", create_collection),
              methods=["POST"]),
        Route("/v1/collections/{name}", guarded("collection", get_collection,
                                                needs_body=False), methods=["GET"]),
        Route("/v1/collections/{name}", guarded("delete_collection", delete_collection,
                                                needs_body=False), methods=["DELETE"]),
        Route("/v1/collections/{name}/search", guarded("search", search), methods=["POST"]),
        Route("/v1/collections/{name}/ask", guarded("ask", ask), methods=["POST"]),
        Route("/v1/collections/{name}/documents", guarded("upsert", upsert, large_body=True),
              methods=["POST"]),
        Route("/v1/collections/{name}/documents/delete",
              guarded("delete", delete, large_body=True), methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", guarded("metrics", metrics, needs_body=False), methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: not_found, 405: not_found})
    app.state.collections = collections
    app.state.pipeline = collections.default
    app.state.config = config
    app.state.telemetry = telemetry
    app.state.guard = Guard(config, telemetry)
    app.state.openapi = openapi_document(config)
    app.state.started = time.time()
    return app
