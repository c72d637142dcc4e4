"""The OpenAPI 3.0 document served at ``/openapi.json`` (limits taken from the ServeConfig)."""

from __future__ import annotations

from typing import Any

from dask_rag.config import ServeConfig

__all__ = ["openapi_document"]

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["type", "message"],
                             "properties": {"type": {"type": "string"},
                                            "message": {"type": "string"}}}},
}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "Malformed body (not JSON / not UTF-8)", 401: "Missing or invalid API key",
            404: "Not found", 413: "Body too large",
            422: "Invalid field (the message names it)",
            429: "Overloaded or rate limited; see Retry-After",
            500: "Internal error", 503: "Cluster or shards unavailable",
            504: "Request timed out"}
    out: dict[str, Any] = {}
    for code in codes:
        resp: dict[str, Any] = {"description": text[code],
                                "content": {"application/json": {"schema": _ERROR}}}
        if code == 429:
            resp["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                               "description": "seconds to wait"}}
        out[str(code)] = resp
    return out


def openapi_document(cfg: ServeConfig) -> dict[str, Any]:
    text = {"type": "string", "minLength": 1, "maxLength": cfg.max_text_chars}
    k = {"type": "integer", "minimum": 1, "maximum": cfg.max_k}
    flt = {"type": "object", "additionalProperties": False, "properties": {
        "source_prefix": {"type": "string"},
        "metadata": {"type": "object", "additionalProperties": {
            "oneOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}}}}
    mode = {"type": "string", "enum": ["dense", "sparse", "hybrid"]}
    hit = {"type": "object", "required": ["id", "score", "text", "source"], "properties": {
        "id": {"type": "integer"}, "score": {"type": "number"}, "text": {"type": "string"},
        "source": {"type": "string"}, "metadata": {"type": "object"},
        "n": {"type": "integer"}}}
    timings = {"type": "object", "additionalProperties": {"type": "number"}}
    common = (400, 401, 413, 422, 429, 503, 504)
    security: list[dict[str, list[str]]] = [{"bearer": []}] if cfg.api_keys else []

    def post(summary: str, schema: dict[str, Any], ok: dict[str, Any]) -> dict[str, Any]:
        return {"post": {"summary": summary, "security": security,
                         "requestBody": {"required": True, "content": {
                             "application/json": {"schema": schema}}},
                         "responses": {"200": ok, **_errors(*common)}}}

    search_req = {"type": "object", "required": ["query"], "additionalProperties": False,
                  "properties": {"query": text, "k": k, "filter": flt, "mode": mode}}
    embed_req = {"type": "object", "required": ["input"], "additionalProperties": False,
                 "properties": {
                     "input": {"oneOf": [text, {"type": "array", "items": text, "minItems": 1,
                                                "maxItems": cfg.max_batch_inputs}]},
                     "model": {"type": "string"},
                     "encoding_format": {"type": "string", "enum": ["float"]},
                     "user": {"type": "string"}}}
    ask_req = {"type": "object", "required": ["question"], "additionalProperties": False,
               "properties": {
                   "question": text, "k": k, "filter": flt, "mode": mode,
                   "stream": {"type": "boolean"},
                   "max_tokens": {"type": "integer", "minimum": 1, "maximum": 32768},
                   "temperature": {"type": "number", "minimum": 0, "maximum": 10},
                   "top_k": {"type": "integer", "minimum": 0},
                   "top_p": {"type": "number", "exclusiveMinimum": True, "minimum": 0,
                             "maximum": 1},
                   "stop": {"oneOf": [{"type": "string", "minLength": 1},
                                      {"type": "array", "maxItems": 16,
                                       "items": {"type": "string", "minLength": 1}}]},
                   "seed": {"type": "integer", "minimum": 0},
                   "stream_chunk_tokens": {"type": "integer", "minimum": 1}}}
    answer = {"type": "object", "required": ["question", "answer", "citations", "timings_ms"],
              "properties": {"question": {"type": "string"}, "answer": {"type": "string"},
                             "citations": {"type": "array", "items": hit},
                             "prompt_tokens": {"type": "integer"}, "timings_ms": timings}}
    doc: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "dask-rag", "version": "0.1.0",
                 "description": "Retrieval-augmented generation over a faiss index sharded on "
                                "a Dask cluster. Errors are {\"error\": {\"type\", \"message\"}}."},
        "paths": {
            "/v1/search": post("Retrieve the chunks most relevant to a query", search_req, {
                "description": "Hits, best first",
                "content": {"application/json": {"schema": {
                    "type": "object", "required": ["hits"],
                    "properties": {"hits": {"type": "array", "items": hit},
                                   "timings_ms": timings}}}}}),
            "/v1/embed": post("Embed text (OpenAI-style body)", embed_req, {
                "description": "One embedding per input",
                "content": {"application/json": {"schema": {
                    "type": "object", "required": ["object", "data"], "properties": {
                        "object": {"type": "string"}, "model": {"type": "string"},
                        "data": {"type": "array", "items": {"type": "object", "properties": {
                            "object": {"type": "string"}, "index": {"type": "integer"},
                            "embedding": {"type": "array", "items": {"type": "number"}}}}},
                        "usage": {"type": "object"}}}}}}),
            "/v1/ask": post("Answer a question with citations (JSON, or SSE with stream=true)",
                            ask_req, {
                                "description": "The answer; with stream=true a text/event-stream"
                                               " of citations, text and done events",
                                "content": {"application/json": {"schema": answer},
                                            "text/event-stream": {"schema": {
                                                "type": "string"}}}}),
            "/healthz": {"get": {"summary": "The process is up", "responses": {
                "200": {"description": "ok", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"status": {"type": "string"}}}}}}}}},
            "/readyz": {"get": {"summary": "Cluster reachable and every shard loaded",
                                "responses": {
                                    "200": {"description": "ready", "content": {
                                        "application/json": {"schema": {"type": "object"}}}},
                                    "503": {"description": "not ready", "content": {
                                        "application/json": {"schema": {"type": "object"}}}}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": security,
                                 "responses": {"200": {"description": "text exposition format",
                                                       "content": {"text/plain": {"schema": {
                                                           "type": "string"}}}},
                                               **_errors(401, 429, 504)}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {
                "200": {"description": "OpenAPI 3.0", "content": {"application/json": {
                    "schema": {"type": "object"}}}}}}},
        },
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
    return doc
