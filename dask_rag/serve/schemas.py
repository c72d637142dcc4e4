"""The HTTP API's bodies, defined once as pydantic models: request bodies are parsed into them
(the search and ask requests are the pipeline's own request objects), and the OpenAPI document
(:mod:`dask_rag.serve.openapi`) is generated from them, responses included.

A body that breaks a rule gets a 4xx whose message names the field (``request.k: ...``) —
never a 500.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from dask_rag.config import MAX_K, MAX_TEXT_CHARS
from dask_rag.errors import InvalidInput, MalformedRequest, PayloadTooLarge
from dask_rag.rag.requests import (
    AskRequest,
    DeleteRequest,
    SearchRequest,
    Text,
    UpsertRequest,
    parse_request,
)

__all__ = ["AskRequest", "ChatRequest", "CollectionCreate", "DeleteRequest",
           "EmbeddingsRequest", "Out", "SearchRequest", "UpsertRequest", "parse_body",
           "parse_json_body"]


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


#: a token id of the cl100k_base encoding (what OpenAI clients such as LangChain send)
TokenId = Annotated[StrictInt, Field(ge=0, le=1 << 20)]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=8192)]


class EmbeddingsRequest(BaseModel):
    """``POST /v1/embeddings`` (and ``/v1/embed``): OpenAI's embeddings body — one text, a
    list of texts, or token-id arrays of OpenAI's ``cl100k_base`` encoding (what LangChain's
    ``OpenAIEmbeddings`` sends), decoded to text before the encoder reads it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1)]
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: StrictStr | None = None

    def items(self, max_inputs: int) -> list[str] | list[list[int]]:
        """The inputs as a list (texts, or token-id arrays)."""
        value = self.input
        items: list[Any] = [value] if isinstance(value, str) or (
            value and isinstance(value[0], int)) else list(value)
        if len(items) > max_inputs:
            raise PayloadTooLarge(f"request.input has {len(items)} items; the limit is "
                                  f"{max_inputs}")
        return items


class TextPart(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    """One message of a chat; ``content`` is a string or a list of text parts."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[StrictStr, Field(max_length=MAX_TEXT_CHARS)] | \
        Annotated[list[TextPart], Field(min_length=1, max_length=64)] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    include_usage: StrictBool = False


class ChatRequest(BaseModel):
    """``POST /v1/chat/completions``: the last message (a user's) is the question, the earlier
    ones are the conversation the answer may draw on.  ``model`` picks the collection
    (``dask-rag`` for the default one, ``dask-rag/<name>``).  Sampling fields are OpenAI's;
    ``k``, ``filter``, ``mode`` and ``fusion`` are this server's retrieval options (as in
    ``/v1/ask``).  Fields OpenAI defines that do not apply here (penalties, logit bias,
    ``user``) are accepted and ignored; ``n`` must be 1; tools are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: StrictStr
    messages: list[ChatMessage] = Field(min_length=1, max_length=65)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1, le=32_768)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=32_768)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    seed: Annotated[StrictInt, Field(ge=0)] | None = None
    stop: StrictStr | list[Annotated[StrictStr, Field(min_length=1)]] | None = Field(
        None, max_length=16)
    n: Literal[1] = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: StrictStr | None = None
    # retrieval options (this server's extension)
    k: Annotated[StrictInt, Field(ge=1, le=MAX_K)] | None = None
    mode: StrictStr | None = None
    filter: dict[str, Any] | None = None
    fusion: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _ends_with_user(self) -> ChatRequest:
        if self.messages[-1].role != "user" or not self.messages[-1].text().strip():
            raise ValueError("the last message must be a user's, with text: it is the "
                             "question")
        return self

    def ask(self) -> AskRequest:
        """The equivalent ``/v1/ask`` request (validated like one)."""
        history = [{"role": "system" if m.role == "developer" else m.role,
                    "content": m.text()} for m in self.messages[:-1] if m.text().strip()]
        fields: dict[str, Any] = {
            "question": self.messages[-1].text(), "stream": self.stream,
            "history": history or None,
            "max_tokens": self.max_completion_tokens or self.max_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
            "stop": self.stop, "k": self.k, "mode": self.mode, "filter": self.filter,
            "fusion": self.fusion}
        return parse_request(AskRequest, {k: v for k, v in fields.items() if v is not None})


class CollectionCreate(BaseModel):
    """``POST /v1/collections``: a new, empty collection (filled through ``/documents``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: StrictStr
    factory: Annotated[StrictStr, Field(pattern=r"^(Flat|HNSW\d{1,3})$")] = "Flat"
    shards: Annotated[StrictInt, Field(ge=1, le=1024)] | None = None


# ---- responses: the handlers build these, and the OpenAPI document is generated from them ----
#
# Rendered with ``exclude_unset``: an optional field a handler does not set (a hit's ``n``
# outside ``/v1/ask``, a streamed chunk's ``usage``) is absent from the JSON, not null.


class Out(BaseModel):
    """A response body (what :func:`~dask_rag.serve.guard.json_response` renders)."""

    model_config = ConfigDict(extra="forbid")

    def render(self) -> bytes:
        """The body's JSON: the fields the handler set, compact, UTF-8."""
        return self.model_dump_json(exclude_unset=True).encode()


class HitOut(Out):
    id: int
    score: float
    text: str
    source: str
    metadata: dict[str, Any]
    #: the hit's citation number ``[n]`` (answers and chat completions only)
    n: int | None = None

    @classmethod
    def of(cls, hit: Any) -> HitOut:
        """A :class:`~dask_rag.rag.hits.Hit`."""
        return cls(**hit.to_dict())


class SearchResponse(Out):
    hits: list[HitOut]
    timings_ms: dict[str, float]

    @classmethod
    def of(cls, hits: Any, timings: dict[str, float]) -> SearchResponse:
        return cls(hits=[HitOut.of(h) for h in hits],
                   timings_ms={k: round(v, 3) for k, v in timings.items()})


class AskResponse(Out):
    question: str
    answer: str
    citations: list[HitOut]
    prompt_tokens: int
    completion_tokens: int
    timings_ms: dict[str, float]

    @classmethod
    def of(cls, answer: Any) -> AskResponse:
        """A :class:`~dask_rag.rag.hits.Answer` (its JSON form, :meth:`Answer.to_dict`)."""
        return cls(**answer.to_dict())


class EmbeddingOut(Out):
    object: Literal["embedding"]
    index: int
    embedding: list[float]


class Usage(Out):
    prompt_tokens: int
    total_tokens: int


class EmbedResponse(Out):
    object: Literal["list"]
    model: str
    data: list[EmbeddingOut]
    usage: Usage


class EmbeddingB64Out(Out):
    object: Literal["embedding"]
    index: int
    embedding: str


class EmbedResponseB64(Out):
    """With ``encoding_format="base64"``: each embedding is base64 of little-endian float32."""

    object: Literal["list"]
    model: str
    data: list[EmbeddingB64Out]
    usage: Usage


class WriteResponse(Out):
    documents: int
    chunks: int | None = None
    chunks_removed: int


class CollectionOut(Out):
    name: str
    default: bool
    chunks: int
    dim: int
    factory: str
    shards: int
    model: str


class CollectionList(Out):
    collections: list[CollectionOut]


class CollectionDeleted(Out):
    name: str
    deleted: bool
    #: chunks the collection held when it was deleted
    chunks: int


class ModelOut(Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(Out):
    object: Literal["list"]
    data: list[ModelOut]


class ChatMessageOut(Out):
    role: Literal["assistant"]
    content: str


class ChatChoice(Out):
    index: int
    message: ChatMessageOut
    finish_reason: str


class ChatUsage(Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(Out):
    """A chat completion; ``citations`` (this server's extra field) are the passages the
    answer cites as ``[n]``, in order."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
    citations: list[HitOut]


class ChunkDelta(Out):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(Out):
    index: int
    delta: ChunkDelta
    finish_reason: str | None


class ChatCompletionChunk(Out):
    """One streamed piece of a chat completion (``data:`` of an SSE event): the first carries
    the role and this server's ``citations``; with ``stream_options.include_usage`` the last
    one before ``[DONE]`` has no choices and the ``usage``."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    citations: list[HitOut] | None = None
    usage: ChatUsage | None = None


class ErrorBody(Out):
    type: str
    message: str


class ErrorResponse(Out):
    error: ErrorBody


class Status(Out):
    status: str
    detail: str | None = None
