"""The OpenAPI 3.1 document served at ``/openapi.json``, generated from the pydantic models of
:mod:`dask_rag.serve.schemas` (so it cannot drift from what the handlers accept)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from dask_rag.config import ServeConfig
from dask_rag.serve import schemas

__all__ = ["openapi_document"]

_ERRORS = {400: "Malformed body (not JSON / not UTF-8)", 401: "Missing or invalid API key",
           404: "Not found", 413: "Body too large", 422: "Invalid field (the message names it)",
           429: "Overloaded or rate limited; see Retry-After", 503: "Cluster or shards unavailable",
           504: "Request timed out"}
_COMMON = (400, 401, 413, 422, 429, 503, 504)

#: one Server-Sent Event of a streamed answer (its ``data`` is the event as JSON)
SSE_EVENT: dict[str, Any] = {
    "type": "object", "required": ["event", "data"],
    "properties": {"event": {"type": "string",
                             "enum": ["citations", "text", "done", "error"]},
                   "data": {"type": "string"}}}


def _ref(model: type[Any]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _errors(*codes: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for code in codes:
        resp: dict[str, Any] = {"description": _ERRORS[code], "content": {
            "application/json": {"schema": _ref(schemas.ErrorResponse)}}}
        if code == 429:
            resp["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                               "description": "seconds to wait"}}
        out[str(code)] = resp
    return out


def openapi_document(cfg: ServeConfig) -> dict[str, Any]:
    requests: list[type[BaseModel]] = [schemas.SearchRequest, schemas.AskRequest,
                                        schemas.EmbedRequest]
    responses: list[type[BaseModel]] = [schemas.SearchResponse, schemas.AskResponse,
                                         schemas.EmbedResponse, schemas.ErrorResponse,
                                         schemas.Status]
    modes: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        *((m, "validation") for m in requests), *((m, "serialization") for m in responses)]
    _, defs = models_json_schema(modes, ref_template="#/components/schemas/{model}")
    security: list[dict[str, list[str]]] = [{"bearer": []}] if cfg.api_keys else []

    def post(summary: str, body: type[Any], ok: dict[str, Any]) -> dict[str, Any]:
        return {"post": {"summary": summary, "security": security,
                         "requestBody": {"required": True, "content": {
                             "application/json": {"schema": _ref(body)}}},
                         "responses": {"200": ok, **_errors(*_COMMON)}}}

    def ok(description: str, model: type[Any]) -> dict[str, Any]:
        return {"description": description,
                "content": {"application/json": {"schema": _ref(model)}}}

    status = ok("status", schemas.Status)
    return {
        "openapi": "3.1.0",
        "info": {"title": "dask-rag", "version": "0.2.0",
                 "description": "Retrieval-augmented generation over a faiss index sharded on "
                                "a Dask cluster. Errors are {\"error\": {\"type\", \"message\"}}."},
        "paths": {
            "/v1/search": post("Retrieve the chunks most relevant to a query",
                               schemas.SearchRequest, ok("Hits, best first",
                                                         schemas.SearchResponse)),
            "/v1/embed": post("Embed text (OpenAI-style body)", schemas.EmbedRequest,
                              ok("One embedding per input", schemas.EmbedResponse)),
            "/v1/ask": post("Answer a question with citations (JSON, or SSE with stream=true)",
                            schemas.AskRequest, {
                                "description": "The answer; with stream=true a text/event-stream"
                                               " of citations, text and done events",
                                "content": {"application/json": {
                                    "schema": _ref(schemas.AskResponse)},
                                    "text/event-stream": {"schema": SSE_EVENT}}}),
            "/healthz": {"get": {"summary": "The process is up",
                                 "responses": {"200": status}}},
            "/readyz": {"get": {"summary": "Cluster reachable and every shard loaded",
                                "responses": {"200": status, "503": {
                                    **status, "description": "not ready"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": security,
                                 "responses": {"200": {"description": "text exposition format",
                                                       "content": {"text/plain": {"schema": {
                                                           "type": "string"}}}},
                                               **_errors(401, 429, 504)}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {
                "200": {"description": "OpenAPI 3.1", "content": {"application/json": {
                    "schema": {"type": "object"}}}}}}},
        },
        "components": {"schemas": defs["$defs"],
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
