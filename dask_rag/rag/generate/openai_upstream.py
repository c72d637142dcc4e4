"""Any OpenAI-compatible chat server as the generator: ``openai:http://host:port/v1[#model]``.

What teams run beside a retrieval service is an LLM server they already have — vLLM's or
SGLang's OpenAI server, llama.cpp's ``llama-server``, Ollama, TGI, a hosted endpoint.  This
generator sends the prompt the pipeline built (instructions and ``<doc>`` context under the
token budget) as a chat completion and passes the answer, or its stream, through.

It runs in the *client* process, as async HTTP: a request waiting on a remote model must not
hold a Dask worker (the retrieval graph's last task builds the prompts and returns; the
completions go out from the event loop, every request of a batch at once, at most
``max_concurrency`` in flight).  The API key comes from the environment
(``DASK_RAG_OPENAI_API_KEY``, else ``OPENAI_API_KEY``): never in the spec, the manifest or a
log line.  Failures map to the project's errors: the server down, 429 or 5xx is
:class:`~dask_rag.errors.UpstreamUnavailable` (HTTP 503 + Retry-After), a refusal (401, 403,
other 4xx) or a reply that is not the protocol is :class:`~dask_rag.errors.UpstreamRejected`
(502), each naming the upstream; a connection error is retried once; a reply slower than
``timeout_s`` is a :class:`~dask_rag.errors.RequestTimeout`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from dask_rag.errors import RequestTimeout, UpstreamRejected, UpstreamUnavailable
from dask_rag.rag.generate.base import SamplingParams

__all__ = ["API_KEY_ENV", "TIMEOUT_ENV", "Completion", "OpenAIUpstream"]

#: where the upstream's API key is read from (the first that is set)
API_KEY_ENV = ("DASK_RAG_OPENAI_API_KEY", "OPENAI_API_KEY")
#: how long a completion may take (seconds; the environment variable overrides the default)
TIMEOUT_ENV = "DASK_RAG_OPENAI_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60.0
#: the fields a ``/models`` entry may report its context length in (vLLM, llama.cpp, others)
_CONTEXT_FIELDS = ("context_length", "max_model_len", "context_window", "n_ctx")


@dataclass(frozen=True)
class Completion:
    """One answer from the upstream and the token usage it reported (0 when it did not)."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class OpenAIUpstream:
    """An OpenAI-compatible chat-completions server (see the module docstring)."""

    def __init__(self, base_url: str, model: str | None = None, *,
                 timeout_s: float | None = None, max_concurrency: int = 64,
                 context_retry_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model or "default"
        self.timeout_s = timeout_s if timeout_s is not None else float(
            os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        # one bound and one connection pool per event loop (the blocking API runs on a loop
        # of its own, the server on uvicorn's; both are loop-bound).  aiohttp, not httpx: 64
        # concurrent requests to a 200 ms server took 2.0-2.2 s over httpx's reused
        # connections, 0.24 s over aiohttp's
        self._loop_state: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[asyncio.Semaphore, Any]] = \
            weakref.WeakKeyDictionary()
        self._max_concurrency = max_concurrency
        self._context: int | bool | None = False  # False: not asked yet (or not answered)
        #: an upstream that could not be asked its context length is asked again this long
        #: after (an upstream down at the first request must not fix the budget for good)
        self.context_retry_s = context_retry_s
        self._context_retry_at = 0.0

    def __repr__(self) -> str:  # never the key
        return f"OpenAIUpstream({self.base_url!r}, model={self.model!r})"

    @staticmethod
    def _headers() -> dict[str, str]:
        key = next((os.environ[v] for v in API_KEY_ENV if os.environ.get(v)), None)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _state(self) -> tuple[asyncio.Semaphore, Any]:
        import aiohttp

        loop = asyncio.get_running_loop()
        if loop not in self._loop_state:
            session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=5.0),
                connector=aiohttp.TCPConnector(limit=self._max_concurrency))
            self._loop_state[loop] = (asyncio.Semaphore(self._max_concurrency), session)
        return self._loop_state[loop]

    async def close_loop(self) -> None:
        """Close this event loop's connection pool (the pipeline is closing)."""
        state = self._loop_state.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state[1].close()

    def _body(self, prompt: str, params: SamplingParams, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "stream": stream,
                                "messages": [{"role": "user", "content": prompt}],
                                "max_tokens": params.max_tokens,
                                "temperature": params.temperature, "top_p": params.top_p}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if params.top_k:
            body["top_k"] = params.top_k  # vLLM, SGLang, llama.cpp; others ignore it
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def _fail(self, status: int, text: str, retry_after: str | None) -> Exception:
        where = f"the generator upstream {self.base_url}"
        detail = text.strip()[:300]
        if status == 429 or status >= 500:
            try:
                wait = float(retry_after) if retry_after else 1.0
            except ValueError:
                wait = 1.0
            return UpstreamUnavailable(f"{where} answered HTTP {status}: {detail}",
                                       retry_after=max(1.0, wait))
        if status in (401, 403):
            return UpstreamRejected(f"{where} refused the request (HTTP {status}: {detail}); "
                                    f"check its API key ({' or '.join(API_KEY_ENV)})")
        return UpstreamRejected(f"{where} rejected the request (HTTP {status}: {detail})")

    async def _post(self, session: Any, body: dict[str, Any]) -> Any:
        """POST the completion (one retry on a connection error); the response, open (the
        caller releases it)."""
        import aiohttp

        url = f"{self.base_url}/chat/completions"
        for attempt in (0, 1):
            try:
                return await session.post(url, json=body, headers=self._headers())
            except asyncio.TimeoutError:  # before the connection errors: aiohttp's read
                raise self._timeout() from None  # timeout is both
            except (aiohttp.ClientConnectionError, OSError) as exc:
                if attempt:
                    raise UpstreamUnavailable(f"cannot reach the generator upstream "
                                              f"{self.base_url}: {exc}", 2.0) from None
        raise AssertionError("unreachable")

    def _timeout(self) -> RequestTimeout:
        return RequestTimeout(f"the generator upstream {self.base_url} did not answer within "
                              f"{self.timeout_s:g} s")

    async def context_length(self) -> int | None:
        """The model's context length as the upstream's ``/models`` reports it, or None.

        Kept once the upstream has answered (with or without one: a server without the
        route answers 404); an upstream that could not be asked (unreachable, too slow, a
        5xx) is asked again after ``context_retry_s``, the caller's budget setting applying
        meanwhile."""
        if self._context is not False:
            return self._context if isinstance(self._context, int) else None
        if time.monotonic() < self._context_retry_at:
            return None
        import aiohttp

        found: int | None = None
        body: Any = None
        try:
            _, session = self._state()
            async with session.get(f"{self.base_url}/models", headers=self._headers(),
                                   timeout=aiohttp.ClientTimeout(total=5.0)) as response:
                if response.status >= 500:
                    raise UpstreamUnavailable(f"HTTP {response.status}", 1.0)
                if response.status == 200:
                    body = await response.json(content_type=None)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, UpstreamUnavailable):
            self._context_retry_at = time.monotonic() + self.context_retry_s
            return None
        except ValueError:  # not JSON: an answer all the same
            body = None
        data = body.get("data") if isinstance(body, dict) else None
        data = data if isinstance(data, list) else []
        for entry in data:
            if isinstance(entry, dict) and (entry.get("id") == self.model or len(data) == 1):
                found = next((int(entry[f]) for f in _CONTEXT_FIELDS
                              if isinstance(entry.get(f), int) and entry[f] > 0), None)
                if found:
                    break
        self._context = found
        return found

    async def complete(self, prompt: str, params: SamplingParams) -> Completion:
        """One chat completion of ``prompt``."""
        limit, session = self._state()
        async with limit:
            response = await self._post(session, self._body(prompt, params, False))
            try:
                text = await response.text()
            except asyncio.TimeoutError:
                raise self._timeout() from None
            finally:
                response.release()
            if response.status != 200:
                raise self._fail(response.status, text, response.headers.get("retry-after"))
            try:
                data = json.loads(text)
                answer = data["choices"][0]["message"]["content"] or ""
                usage = data.get("usage") or {}
            except (ValueError, KeyError, IndexError, TypeError):
                raise UpstreamRejected(f"the generator upstream {self.base_url} answered "
                                       "something that is not a chat completion: "
                                       f"{text[:200]!r}") from None
        return Completion(str(answer), int(usage.get("prompt_tokens") or 0),
                          int(usage.get("completion_tokens") or 0))

    async def complete_many(self, prompts: list[str], params: SamplingParams
                            ) -> list[Completion]:
        """Every prompt at once (bounded by ``max_concurrency``): a batch never serializes
        its requests."""
        return list(await asyncio.gather(*(self.complete(p, params) for p in prompts)))

    async def stream(self, prompt: str, params: SamplingParams
                     ) -> AsyncIterator[tuple[str, Completion | None]]:
        """The answer as it comes: ``(text piece, None)``, then ``("", usage)`` at the end.
        Closing the iterator early (the client went away) closes the upstream request."""
        limit, session = self._state()
        async with limit:
            response = await self._post(session, self._body(prompt, params, True))
            try:
                if response.status != 200:
                    raise self._fail(response.status, await response.text(),
                                     response.headers.get("retry-after"))
                usage: dict[str, Any] = {}
                done = False
                async for raw in response.content:
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    if not line.strip() or line.startswith(":"):
                        continue
                    if not line.startswith("data:"):
                        raise self._malformed(line)
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    try:
                        event = json.loads(data)
                        choices = event.get("choices") or []
                        piece = (choices[0].get("delta") or {}).get("content") if choices \
                            else None
                    except (ValueError, AttributeError, IndexError, TypeError):
                        raise self._malformed(line) from None
                    usage = event.get("usage") or usage
                    if piece:
                        yield str(piece), None
                if not done:
                    raise UpstreamRejected(f"the generator upstream {self.base_url} ended its "
                                           "stream without [DONE]")
                yield "", Completion("", int(usage.get("prompt_tokens") or 0),
                                     int(usage.get("completion_tokens") or 0))
            except asyncio.TimeoutError:
                raise self._timeout() from None
            finally:
                response.close()  # unread body: the connection goes, the upstream sees it

    def _malformed(self, line: str) -> UpstreamRejected:
        return UpstreamRejected(f"the generator upstream {self.base_url} sent a malformed "
                                f"server-sent event: {line[:200]!r}")
