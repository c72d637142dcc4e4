"""The dask-rag exception tree, and the one table that maps it to HTTP status codes.

Every error a caller can act on has its own class; everything derives from
:class:`DaskRagError` so ``except DaskRagError`` catches all of them::

    DaskRagError                  base class, never raised directly
    ├── InvalidInput              the caller sent something unusable (shape, NaN, k, JSON, ...);
    │   │                         raised before any work is scheduled, nothing stored is changed
    │   ├── MalformedRequest      the request body is not valid JSON / UTF-8 (HTTP 400)
    │   ├── PayloadTooLarge       the request body is over the configured size limit
    │   ├── Unauthorized          missing or wrong API key
    │   ├── Forbidden             a valid key whose scope does not cover the request
    │   └── UnknownModel          an OpenAI-style ``model`` this server does not serve (404)
    ├── IndexNotFound             no index at the given path (or the path is not a directory)
    │   └── CorruptIndex          an index directory exists but a file in it is unreadable,
    │                             inconsistent with the manifest or belongs to another index
    ├── Overloaded                too much work in flight; retry after ``retry_after`` seconds
    ├── RequestTimeout            the request did not finish within its deadline
    ├── ShardUnavailable          a shard could not be searched (worker lost, cluster gone)
    ├── StorageUnavailable        an index URL cannot be reached (endpoint down, credentials
    │                             missing or refused, bucket missing); the message names it
    ├── UpstreamUnavailable       the OpenAI-compatible generator server is down, overloaded
    │                             (429) or failing (5xx); retry after ``retry_after`` seconds
    ├── UpstreamRejected          that server refused the request (401/403/4xx) or answered
    │                             something that is not the protocol; the message names it
    └── ModelLoadError            a model path is not a loadable model
        └── EncoderMismatch       no worker's encoder reproduces the index's canary vectors

HTTP handlers never choose status codes themselves: they call :func:`http_status`.
"""

from __future__ import annotations

__all__ = [
    "CorruptIndex",
    "DaskRagError",
    "EncoderMismatch",
    "Forbidden",
    "IndexNotFound",
    "InvalidInput",
    "MalformedRequest",
    "ModelLoadError",
    "Overloaded",
    "PayloadTooLarge",
    "RequestTimeout",
    "ShardUnavailable",
    "StorageUnavailable",
    "Unauthorized",
    "UnknownModel",
    "UpstreamRejected",
    "UpstreamUnavailable",
    "http_status",
]


class DaskRagError(Exception):
    """Base class of every error raised on purpose by dask-rag."""

    #: short machine-readable name used in JSON error bodies
    type_name: str = "dask_rag_error"


class InvalidInput(DaskRagError, ValueError):
    """The caller's input cannot be used; the message names the field and the reason."""

    type_name = "invalid_input"


class MalformedRequest(InvalidInput):
    """A request body could not be parsed at all (invalid JSON or invalid UTF-8)."""

    type_name = "malformed_request"


class PayloadTooLarge(InvalidInput):
    """A request body is larger than the server accepts."""

    type_name = "payload_too_large"


class Unauthorized(InvalidInput):
    """A request lacks a valid API key."""

    type_name = "unauthorized"


class Forbidden(InvalidInput):
    """A valid API key whose scope does not allow this request (a write with a read-only
    key, a collection the key is not for)."""

    type_name = "forbidden"


class UnknownModel(InvalidInput):
    """The ``model`` of an OpenAI-style request names no model or collection served here."""

    type_name = "model_not_found"


class IndexNotFound(DaskRagError, FileNotFoundError):
    """There is no dask-rag index at the given location."""

    type_name = "index_not_found"


class CorruptIndex(IndexNotFound):
    """An index directory exists but cannot be used as is; the message names the file."""

    type_name = "corrupt_index"


class Overloaded(DaskRagError):
    """Too much work is in flight; the caller should retry after ``retry_after`` seconds."""

    type_name = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = float(retry_after)

    def __reduce__(self) -> tuple[type, tuple[str, float]]:
        # keep retry_after when the error crosses a process boundary (Dask pickles it)
        return (type(self), (str(self), self.retry_after))


class UpstreamUnavailable(Overloaded):
    """The generator's upstream server cannot answer now (down, 429, 5xx): HTTP 503 with
    Retry-After (an :class:`Overloaded` for every caller that already backs off on those)."""

    type_name = "upstream_unavailable"


class UpstreamRejected(DaskRagError):
    """The generator's upstream server refused the request (a bad API key: 401) or broke the
    protocol (malformed JSON or server-sent events): HTTP 502, the message names it."""

    type_name = "upstream_rejected"


class RequestTimeout(DaskRagError, TimeoutError):
    """A request did not complete within its deadline."""

    type_name = "timeout"


class ShardUnavailable(DaskRagError):
    """A shard could not be searched: its worker is gone and it could not be reloaded."""

    type_name = "shard_unavailable"


class StorageUnavailable(DaskRagError, OSError):
    """The object store behind an index URL refused or could not serve a request: the
    endpoint is unreachable, credentials are missing or refused, or the bucket does not
    exist.  The message names the URL; nothing was written."""

    type_name = "storage_unavailable"


class ModelLoadError(DaskRagError):
    """A model (encoder, cross-encoder, generator) could not be loaded from its path."""

    type_name = "model_load_error"


class EncoderMismatch(ModelLoadError):
    """An encoder does not reproduce the canary vectors recorded in the index's manifest (it
    would embed queries differently from how the index was built); the message names the
    workers and the difference."""

    type_name = "encoder_mismatch"


# Ordered most specific first: the first matching class decides the status.
_HTTP_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (PayloadTooLarge, 413),
    (Unauthorized, 401),
    (Forbidden, 403),
    (UnknownModel, 404),
    (MalformedRequest, 400),
    (InvalidInput, 422),
    (CorruptIndex, 503),
    (IndexNotFound, 404),
    (UpstreamUnavailable, 503),
    (UpstreamRejected, 502),
    (Overloaded, 429),
    (RequestTimeout, 504),
    (ShardUnavailable, 503),
    (StorageUnavailable, 503),
    (ModelLoadError, 503),
    (DaskRagError, 500),
)


def http_status(exc: BaseException) -> int:
    """Return the HTTP status code for ``exc`` (500 for anything unexpected)."""
    for cls, status in _HTTP_STATUS:
        if isinstance(exc, cls):
            return status
    return 500
