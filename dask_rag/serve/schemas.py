"""Request bodies of the HTTP API: parsing and validation into plain, typed values.

Every rule here is mirrored in the OpenAPI document (:mod:`dask_rag.serve.openapi`); a body that
breaks one gets a 4xx with a message naming the field — never a 500.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from dask_rag.config import ServeConfig
from dask_rag.errors import InvalidInput, MalformedRequest
from dask_rag.rag.generate.base import SamplingParams

__all__ = ["AskRequest", "EmbedRequest", "SearchRequest", "parse_json_body"]

MODES = ("dense", "sparse", "hybrid")


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object (400 for bytes that are not JSON, 422 for non-objects)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedRequest(f"request body is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise MalformedRequest("request body is empty; expected a JSON object")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise MalformedRequest(f"request body is not valid JSON: {exc.msg} at line "
                               f"{exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise MalformedRequest("request body nests too deeply") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"request body must be a JSON object, got {type(data).__name__}")
    return data


def _reject_constant(name: str) -> Any:
    raise MalformedRequest(f"request body contains {name}, which is not valid JSON")


def _check_keys(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidInput(f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")


def _text(body: dict[str, Any], name: str, cfg: ServeConfig, required: bool = True) -> str:
    if name not in body:
        if required:
            raise InvalidInput(f"missing required field '{name}'")
        return ""
    value = body[name]
    if not isinstance(value, str):
        raise InvalidInput(f"field '{name}' must be a string, got {_json_type(value)}")
    if not value.strip():
        raise InvalidInput(f"field '{name}' is empty")
    if len(value) > cfg.max_text_chars:
        raise InvalidInput(f"field '{name}' is {len(value)} characters long; the limit is "
                           f"{cfg.max_text_chars}")
    if "\x00" in value:
        raise InvalidInput(f"field '{name}' contains a NUL character")
    return value


def _int(body: dict[str, Any], name: str, lo: int, hi: int, default: int | None
         ) -> int | None:
    if name not in body or body[name] is None:
        return default
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"field '{name}' must be an integer, got {_json_type(value)}")
    if not lo <= value <= hi:
        raise InvalidInput(f"field '{name}'={value} is out of range [{lo}, {hi}]")
    return value


def _json_type(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _mode(body: dict[str, Any]) -> str | None:
    mode = body.get("mode")
    if mode is None:
        return None
    if mode not in MODES:
        raise InvalidInput(f"field 'mode' must be one of {list(MODES)}, got {mode!r}")
    return str(mode)


def _filter(body: dict[str, Any]) -> dict[str, Any] | None:
    from dask_rag.index.shard import SearchFilter

    flt = body.get("filter")
    if flt is None:
        return None
    SearchFilter.from_dict(flt)  # validates, raises InvalidInput naming the problem
    return dict(flt)


@dataclass(frozen=True)
class SearchRequest:
    query: str
    k: int | None
    filter: dict[str, Any] | None
    mode: str | None

    @classmethod
    def parse(cls, body: dict[str, Any], cfg: ServeConfig) -> SearchRequest:
        _check_keys(body, {"query", "k", "filter", "mode"})
        return cls(query=_text(body, "query", cfg), k=_int(body, "k", 1, cfg.max_k, None),
                   filter=_filter(body), mode=_mode(body))


@dataclass(frozen=True)
class EmbedRequest:
    inputs: tuple[str, ...]
    single: bool

    @classmethod
    def parse(cls, body: dict[str, Any], cfg: ServeConfig) -> EmbedRequest:
        _check_keys(body, {"input", "model", "encoding_format", "user"})
        if "input" not in body:
            raise InvalidInput("missing required field 'input'")
        value = body["input"]
        fmt = body.get("encoding_format", "float")
        if fmt != "float":
            raise InvalidInput("field 'encoding_format' must be 'float'")
        if isinstance(value, str):
            return cls((_text(body, "input", cfg),), True)
        if not isinstance(value, list) or not value:
            raise InvalidInput("field 'input' must be a string or a non-empty array of strings")
        if len(value) > cfg.max_batch_inputs:
            raise InvalidInput(f"field 'input' has {len(value)} items; the limit is "
                               f"{cfg.max_batch_inputs}")
        texts = tuple(_text({"input": v}, "input", cfg) for v in value)
        return cls(texts, False)


@dataclass(frozen=True)
class AskRequest:
    question: str
    k: int | None
    filter: dict[str, Any] | None
    mode: str | None
    stream: bool
    params: SamplingParams

    @classmethod
    def parse(cls, body: dict[str, Any], cfg: ServeConfig, stream_chunk_tokens: int
              ) -> AskRequest:
        sampling = {"max_tokens", "temperature", "top_k", "top_p", "stop", "seed",
                    "stream_chunk_tokens"}
        _check_keys(body, {"question", "k", "filter", "mode", "stream"} | sampling)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidInput(f"field 'stream' must be a boolean, got {_json_type(stream)}")
        raw = {k: body[k] for k in sampling if k in body and body[k] is not None}
        for name in ("temperature", "top_p"):
            v = raw.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v)):
                raise InvalidInput(f"field '{name}' must be a number, got {_json_type(v)}")
        stop = raw.get("stop")
        if stop is not None and not (isinstance(stop, str) or (
                isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
            raise InvalidInput("field 'stop' must be a string or an array of strings")
        raw.setdefault("stream_chunk_tokens", stream_chunk_tokens)
        params = SamplingParams.from_dict(raw)
        return cls(question=_text(body, "question", cfg), k=_int(body, "k", 1, cfg.max_k, None),
                   filter=_filter(body), mode=_mode(body), stream=stream, params=params)
