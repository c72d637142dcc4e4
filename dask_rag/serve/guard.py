"""What every route shares: API keys and their scopes, admission (in-flight bound, rate limit →
429 + Retry-After), the body read under its size limit, the timeout, metrics and tracing, and
the one mapping from errors to JSON responses.

API keys carry their scope in the configured string, so a deployment needs no key database::

    secret                  full access (read and write, every collection)
    secret:read             read-only, every collection
    secret:write:docs+faq   read and write, only the collections ``docs`` and ``faq``
    secret:read:docs        read-only, only ``docs``

The collection list names collections (``default`` is the default collection).  A key limited
to collections cannot create new ones.  Checks run before a handler touches a pipeline, so a
refused request changes nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from dask_rag.batching import wait_at_most
from dask_rag.config import ServeConfig
from dask_rag.errors import (
    DaskRagError,
    Forbidden,
    InvalidInput,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    http_status,
)
from dask_rag.serve.schemas import ErrorBody, ErrorResponse, Out
from dask_rag.telemetry import Telemetry

__all__ = [
    "OPEN_PATHS",
    "Guard",
    "KeyScope",
    "TokenBucket",
    "allowed_collections",
    "error_response",
    "guarded",
    "json_response",
    "parse_key",
    "pipeline_for",
    "require_unrestricted_write",
    "sse_response",
]

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})
_ACCESS = ("read", "write")
#: where the guard leaves the request's key scope (in the ASGI scope: cheaper than .state)
SCOPE_KEY = "dask_rag.key_scope"


@dataclass(frozen=True)
class KeyScope:
    """What a key may do: write or only read; every collection (None) or the named ones."""

    write: bool = True
    collections: frozenset[str] | None = None

    def check(self, collection: str, write: bool) -> None:
        if self.collections is not None and collection not in self.collections:
            raise Forbidden(f"this API key may not use collection {collection!r}")
        if write and not self.write:
            raise Forbidden("this API key is read-only: it cannot write")


FULL_ACCESS = KeyScope()


def parse_key(configured: str) -> tuple[str, KeyScope]:
    """``secret[:read|write[:c1+c2]]`` → (secret, scope); scopes are read from the right so a
    secret may itself hold ``:``."""
    parts = configured.rsplit(":", 2)
    if len(parts) == 3 and parts[1] in _ACCESS and parts[0]:
        names = frozenset(n for n in parts[2].split("+") if n)
        if not names:
            raise InvalidInput("an API key's collection list is empty (secret:read:c1+c2)")
        return parts[0], KeyScope(parts[1] == "write", names)
    head, _, tail = configured.rpartition(":")
    if head and tail in _ACCESS:
        return head, KeyScope(tail == "write")
    return configured, FULL_ACCESS


def error_response(exc: BaseException) -> ModelResponse:
    """The one error shape, ``{"error": {"type", "message"}}``, with the status from the
    error table; unexpected errors are logged and not leaked."""
    status = http_status(exc)
    if isinstance(exc, DaskRagError):
        body = ErrorBody(type=exc.type_name, message=str(exc))
    else:
        logger.exception("unhandled error", exc_info=exc)
        body = ErrorBody(type="internal_error", message="internal server error")
    headers = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return json_response(ErrorResponse(error=body), status_code=status, headers=headers)


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
        self._keys = [(secret.encode(), scope)
                      for secret, scope in map(parse_key, config.api_keys)]

    def _client_key(self, request: Request) -> str:
        auth = request.headers.get("authorization", "")
        if self._keys and auth.lower().startswith("bearer "):
            return "key:" + auth[7:].strip()[:12]
        return "ip:" + (request.client.host if request.client else "?")

    def authorize(self, request: Request) -> KeyScope:
        """The scope of the request's key (full access when keys are off); 401 otherwise."""
        if not self._keys or request.scope["path"] in OPEN_PATHS:
            return FULL_ACCESS
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        given = auth[7:].strip().encode()
        # compare against every key, always, in constant time per key
        found: KeyScope | None = None
        for secret, scope in self._keys:
            if hmac.compare_digest(given, secret) and found is None:
                found = scope
        if found is None:
            raise Unauthorized("invalid API key")
        return found

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

    async def body(self, request: Request, limit: int) -> bytes:
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
            needs_body: bool = True, large_body: bool = False) -> Handler:
    """Wrap a handler with auth, admission, the body (read under its size limit: the write
    limit for ``large_body`` routes), timeout, metrics and tracing; the handler parses the body
    into its request model."""

    async def endpoint(request: Request) -> Response:
        state = request.app.state
        guard: Guard = state.guard
        telemetry: Telemetry = state.telemetry
        status = 500
        with telemetry.request_span(f"{request.method} {request.scope['path']}",
                                    request.headers) as span:
            try:
                request.scope[SCOPE_KEY] = guard.authorize(request)
                guard.admit(request)
                guard.inflight += 1
                telemetry.inflight.inc()
                try:
                    limit = (guard.config.max_write_body_bytes if large_body
                             else guard.config.max_body_bytes)
                    body = await guard.body(request, limit) if needs_body else b""
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


class ModelResponse(JSONResponse):
    """A JSON response whose body is a response model (:class:`~dask_rag.serve.schemas.Out`),
    rendered by pydantic; ``timings_ms`` are the stage timings the guard records."""

    timings_ms: dict[str, float] | None = None

    def render(self, content: Any) -> bytes:
        return content.render() if isinstance(content, Out) else super().render(content)


def json_response(body: Out, timings: dict[str, float] | None = None,
                  status_code: int = 200, headers: dict[str, str] | None = None
                  ) -> ModelResponse:
    """The response of a handler: ``body`` with the stage timings the guard records as metrics
    and spans."""
    resp = ModelResponse(body, status_code=status_code, headers=headers)
    resp.timings_ms = timings
    return resp


async def sse_response(request: Request, events: AsyncIterator[dict[str, Any]],
                       render: Callable[[dict[str, Any]], Iterable[bytes]],
                       render_error: Callable[[bytes], bytes]) -> StreamingResponse:
    """A streamed answer (``RagPipeline.astream`` events) as Server-Sent Events, each event
    rendered by ``render``.  The first event is awaited before the 200, so a failure of
    retrieval itself (a bad filter, a lost shard) is an error status; a later failure ends
    the stream with ``render_error`` of the error's JSON body.  The ``done`` event's stage
    timings go to the metrics, as a JSON answer's do."""
    telemetry: Telemetry = request.app.state.telemetry
    first = await events.__anext__()

    async def body() -> AsyncIterator[bytes]:
        event = first
        try:
            while True:
                for piece in render(event):
                    yield piece
                if event["event"] == "done":
                    telemetry.observe_stages(event["timings_ms"])
                event = await events.__anext__()
        except StopAsyncIteration:
            return
        except Exception as exc:
            yield render_error(bytes(error_response(exc).body))

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _scope(request: Request) -> KeyScope:
    scope: KeyScope = request.scope.get(SCOPE_KEY, FULL_ACCESS)
    return scope


def pipeline_for(request: Request, name: str | None, write: bool = False) -> Any:
    """The pipeline of collection ``name`` (None: the default) if the key may use it: the
    scope is checked first (403), then existence (404), so a key learns nothing about
    collections it may not use."""
    collections = request.app.state.collections
    cname = name or collections.default_name
    _scope(request).check(cname, write)
    return collections.get(cname)


def allowed_collections(request: Request) -> list[str]:
    """The collections the request's key may use (all of them when keys are off)."""
    scope = _scope(request)
    return [n for n in request.app.state.collections.names()
            if scope.collections is None or n in scope.collections]


def require_unrestricted_write(request: Request, action: str = "creating a collection"
                               ) -> None:
    """Creating or deleting collections needs a key with write access to every collection."""
    scope = _scope(request)
    if not scope.write or scope.collections is not None:
        raise Forbidden(f"{action} needs an API key with write access to every collection")
