"""The HTTP API's bodies, defined once as pydantic models: request bodies are parsed into them
(the search and ask requests are the pipeline's own request objects), and the OpenAPI document
(:mod:`dask_rag.serve.openapi`) is generated from them, responses included.

A body that breaks a rule gets a 4xx whose message names the field (``request.k: ...``) —
never a 500.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from dask_rag.errors import InvalidInput, MalformedRequest
from dask_rag.rag.requests import AskRequest, SearchRequest, Text, parse_request

__all__ = ["AskRequest", "EmbedRequest", "SearchRequest", "parse_body", "parse_json_body"]


def parse_json_body(raw: bytes) -> Any:
    """The body's JSON value (400 for bytes that are not UTF-8 JSON)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedRequest(f"request body is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise MalformedRequest("request body is empty; expected a JSON object")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise MalformedRequest(f"request body is not valid JSON: {exc.msg} at line "
                               f"{exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise MalformedRequest("request body nests too deeply") from None


def _reject_constant(name: str) -> Any:
    raise MalformedRequest(f"request body contains {name}, which is not valid JSON")


def parse_body(model: type[Any], raw: bytes) -> Any:
    """``raw`` (a JSON object) as ``model``: 400 when it is not JSON, 422 naming the field."""
    data = parse_json_body(raw)
    if not isinstance(data, dict):
        raise InvalidInput(f"request body must be a JSON object, got {type(data).__name__}")
    return parse_request(model, data)


class EmbedRequest(BaseModel):
    """``POST /v1/embed``: OpenAI's embeddings body (one text or a list)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: Text | list[Text] = Field(min_length=1)
    model: StrictStr | None = None
    encoding_format: Literal["float"] = "float"
    user: StrictStr | None = None

    def texts(self, max_inputs: int) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if len(texts) > max_inputs:
            raise InvalidInput(f"request.input has {len(texts)} items; the limit is "
                               f"{max_inputs}")
        return texts


# ---- responses (for the OpenAPI document; handlers build them as plain dicts) --------------


class HitOut(BaseModel):
    id: int
    score: float
    text: str
    source: str
    metadata: dict[str, Any]
    n: int | None = None


class SearchResponse(BaseModel):
    hits: list[HitOut]
    timings_ms: dict[str, float]


class AskResponse(BaseModel):
    question: str
    answer: str
    citations: list[HitOut]
    prompt_tokens: int
    timings_ms: dict[str, float]


class EmbeddingOut(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float]


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbedResponse(BaseModel):
    object: Literal["list"]
    model: str
    data: list[EmbeddingOut]
    usage: Usage


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class Status(BaseModel):
    status: str
    detail: str | None = None
