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
           403: "The API key's scope does not allow this (read-only, or another collection)",
           404: "Unknown collection or model", 413: "Body too large",
           422: "Invalid field (the message names it)",
           429: "Overloaded or rate limited; see Retry-After", 503: "Cluster or shards unavailable",
           504: "Request timed out"}
_COMMON = (400, 401, 403, 404, 413, 422, 429, 503, 504)

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
                                        schemas.EmbeddingsRequest, schemas.ChatRequest,
                                        schemas.UpsertRequest, schemas.DeleteRequest,
                                        schemas.CollectionCreate]
    responses: list[type[BaseModel]] = [schemas.SearchResponse, schemas.AskResponse,
                                         schemas.EmbedResponse, schemas.EmbedResponseB64,
                                         schemas.WriteResponse, schemas.CollectionOut,
                                         schemas.CollectionList, schemas.CollectionDeleted,
                                         schemas.ModelList,
                                         schemas.ChatCompletion, schemas.ChatCompletionChunk,
                                         schemas.ErrorResponse,
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

    def get(summary: str, ok_: dict[str, Any], *codes: int) -> dict[str, Any]:
        return {"get": {"summary": summary, "security": security,
                        "responses": {"200": ok_, **_errors(*codes)}}}

    def in_collection(op: dict[str, Any]) -> dict[str, Any]:
        method, body = next(iter(op.items()))
        return {method: {**body, "parameters": [{"name": "name", "in": "path",
                                                  "required": True,
                                                  "schema": {"type": "string"}}]}}

    status = ok("status", schemas.Status)
    search = post("Retrieve the chunks most relevant to a query", schemas.SearchRequest,
                  ok("Hits, best first", schemas.SearchResponse))
    ask = post("Answer a question with citations (JSON, or SSE with stream=true)",
               schemas.AskRequest, {
                   "description": "The answer; with stream=true a text/event-stream of "
                                  "citations, text and done events",
                   "content": {"application/json": {"schema": _ref(schemas.AskResponse)},
                               "text/event-stream": {"schema": SSE_EVENT}}})
    embed = post("Embed text or cl100k_base token-id arrays (OpenAI's embeddings API)",
                 schemas.EmbeddingsRequest, {
                     "description": "One embedding per input: float lists, or base64 of "
                                    "little-endian float32 with encoding_format=base64",
                     "content": {"application/json": {"schema": {"anyOf": [
                         _ref(schemas.EmbedResponse), _ref(schemas.EmbedResponseB64)]}}}})
    upsert = post("Upsert documents by id (200 once the write-ahead log entry is on disk)",
                  schemas.UpsertRequest, ok("What was written", schemas.WriteResponse))
    delete = post("Delete documents by id (every chunk of each)", schemas.DeleteRequest,
                  ok("What was removed", schemas.WriteResponse))
    return {
        "openapi": "3.1.0",
        "info": {"title": "dask-rag", "version": "0.3.0",
                 "description": "Retrieval-augmented generation over a faiss index sharded on "
                                "a Dask cluster. Errors are {\"error\": {\"type\", \"message\"}}. "
                                "The plain routes address the default collection; "
                                "/v1/collections/{name}/... a named one."},
        "paths": {
            "/v1/search": search,
            "/v1/ask": ask,
            "/v1/embed": embed,
            "/v1/embeddings": embed,
            "/v1/models": get("The models served (one per collection, and the encoders)",
                              ok("OpenAI's model list", schemas.ModelList), 401, 429, 504),
            "/v1/chat/completions": post(
                "The RAG answer to the last user message as a chat completion (or, with "
                "stream=true, chat.completion.chunk objects over SSE ending with [DONE])",
                schemas.ChatRequest, {
                    "description": "A chat completion with the cited passages in 'citations'",
                    "content": {"application/json": {"schema": _ref(schemas.ChatCompletion)},
                                "text/event-stream": {"schema": {
                                    "type": "string", "description": "'data: ' + a "
                                    "ChatCompletionChunk per event, then 'data: [DONE]'"}}}}),
            "/v1/documents": upsert,
            "/v1/documents/delete": delete,
            "/v1/collections": {
                **get("The collections this key may use",
                      ok("Collections", schemas.CollectionList), 401, 429, 504),
                **post("Create an empty collection (needs an unrestricted write key)",
                       schemas.CollectionCreate, ok("The new collection",
                                                    schemas.CollectionOut))},
            "/v1/collections/{name}": {
                **in_collection(get("One collection", ok("The collection",
                                                         schemas.CollectionOut),
                                    401, 403, 404, 429, 504)),
                **in_collection({"delete": {
                    "summary": "Delete a named collection and its files (needs an "
                               "unrestricted write key; the default collection is never "
                               "deleted)",
                    "security": security,
                    "responses": {"200": ok("What was deleted", schemas.CollectionDeleted),
                                  **_errors(401, 403, 404, 422, 429, 503, 504)}}})},
            "/v1/collections/{name}/search": in_collection(search),
            "/v1/collections/{name}/ask": in_collection(ask),
            "/v1/collections/{name}/documents": in_collection(upsert),
            "/v1/collections/{name}/documents/delete": in_collection(delete),
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
