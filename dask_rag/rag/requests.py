"""The request objects: one per call, validated once where it enters (HTTP, CLI or Python)
and carried through the micro-batcher into the graph.

Limits and choices come from :mod:`dask_rag.config` (``MAX_K``, ``MAX_TEXT_CHARS``, ``MODES``,
``FUSIONS``); the HTTP schemas and the OpenAPI document are generated from these models.
Unset options (``None``) take the pipeline's defaults: the index's tuned fusion, then
:class:`~dask_rag.config.RagConfig`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from dask_rag.config import MAX_K, MAX_TEXT_CHARS, MODES
from dask_rag.errors import InvalidInput
from dask_rag.index.filters import SearchFilter, describe_validation_error
from dask_rag.rag.fusion import Fusion
from dask_rag.rag.generate.base import SamplingParams

__all__ = ["MAX_WRITE_BATCH", "AskRequest", "DeleteRequest", "DocumentIn", "SearchRequest",
           "Text", "Turn", "UpsertRequest", "parse_request"]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty")
    if "\x00" in value:
        raise ValueError("contains a NUL character")
    return value


#: a query, a question or a text to embed
Text = Annotated[StrictStr, Field(min_length=1, max_length=MAX_TEXT_CHARS),
                 AfterValidator(_not_blank)]


class _Options(BaseModel):
    """What a search asks besides its text (requests with equal options share one graph)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    k: Annotated[StrictInt, Field(ge=1, le=MAX_K)] | None = None
    mode: str | None = Field(None, json_schema_extra={"enum": list(MODES)})
    filter: SearchFilter | None = None
    fusion: Fusion | None = None
    nprobe: Annotated[StrictInt, Field(ge=1, le=65_536)] | None = None

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, value: str | None) -> str | None:
        if value is not None and value not in MODES:
            raise ValueError(f"must be one of {', '.join(map(repr, MODES))}")
        return value

    def options(self) -> str:
        """A key equal for requests that differ only in their text (they share one graph)."""
        return repr(self.model_dump(exclude={"query", "question", "stream"}))


class SearchRequest(_Options):
    """``POST /v1/search``, ``RagPipeline.search``, ``dask-rag search``."""

    query: Text


class Turn(BaseModel):
    """One earlier message of a chat (context for the answer)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: str = Field(json_schema_extra={"enum": ["system", "user", "assistant"]})
    content: Annotated[StrictStr, Field(max_length=MAX_TEXT_CHARS)]

    @field_validator("role")
    @classmethod
    def _known_role(cls, value: str) -> str:
        if value not in ("system", "user", "assistant"):
            raise ValueError("must be 'system', 'user' or 'assistant'")
        return value


class AskRequest(_Options):
    """``POST /v1/ask``, ``RagPipeline.ask``, ``dask-rag ask``: a question, the retrieval
    options, and how to generate (:class:`~dask_rag.rag.generate.SamplingParams` fields)."""

    question: Text
    stream: StrictBool = False
    history: list[Turn] | None = Field(None, max_length=64)
    max_tokens: Annotated[StrictInt, Field(ge=1, le=32_768)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=10.0, allow_inf_nan=False)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    stop: StrictStr | list[Annotated[StrictStr, Field(min_length=1)]] | None = Field(
        None, max_length=16)
    seed: Annotated[StrictInt, Field(ge=0)] | None = None
    stream_chunk_tokens: Annotated[StrictInt, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _sampling_is_valid(self) -> AskRequest:
        self.sampling(32)  # SamplingParams' own checks, before any work
        return self

    def sampling(self, stream_chunk_tokens: int) -> SamplingParams:
        """The sampling parameters (``stream_chunk_tokens`` when the request sets none)."""
        fields = {name: getattr(self, name) for name in (
            "max_tokens", "temperature", "top_k", "top_p", "seed", "stream_chunk_tokens")
            if getattr(self, name) is not None}
        fields.setdefault("stream_chunk_tokens", stream_chunk_tokens)
        if self.stop is not None:
            fields["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if "temperature" in fields:
            fields["temperature"] = float(fields["temperature"])
        if "top_p" in fields:
            fields["top_p"] = float(fields["top_p"])
        return SamplingParams(**fields)


#: at most this many documents in one upsert, ids in one delete
MAX_WRITE_BATCH = 1024
DocId = Annotated[StrictStr, Field(min_length=1, max_length=512)]
MetaValue = StrictBool | StrictInt | Annotated[float, Field(allow_inf_nan=False)] | \
    Annotated[StrictStr, Field(max_length=4096)]


class DocumentIn(BaseModel):
    """A document to upsert: its id (the source of its chunks), text and metadata (what
    filters test)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: DocId
    text: Annotated[StrictStr, Field(min_length=1, max_length=1 << 20),
                    AfterValidator(_not_blank)]
    metadata: dict[Annotated[str, Field(max_length=256)], MetaValue] | None = None


class UpsertRequest(BaseModel):
    """``POST /v1/documents``: documents replaced by id (one acknowledged write)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    documents: list[DocumentIn] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> UpsertRequest:
        ids = [d.id for d in self.documents]
        if len(set(ids)) != len(ids):
            raise ValueError("document ids must be distinct within one request")
        return self


class DeleteRequest(BaseModel):
    """``POST /v1/documents/delete``: documents removed by id."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ids: list[DocId] = Field(min_length=1)


def parse_request(model: type[Any], data: Any, where: str = "request") -> Any:
    """``model`` validated from ``data`` (a dict, or raw JSON bytes); InvalidInput naming the
    fields at fault otherwise."""
    try:
        if isinstance(data, (bytes, str)):
            return model.model_validate_json(data)
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(describe_validation_error(exc, where)) from None
