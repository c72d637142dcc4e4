"""``vllm:PATH``: a vLLM async engine on a GPU worker (extra ``vllm``; tests marked ``vllm``).

The engine runs continuous batching inside its own event loop thread on the worker that holds
it (workers hosting vLLM must be non-daemon processes: vLLM starts processes of its own; the
``local-cuda`` cluster spec does this).  ``generate`` submits every prompt of a batch at once and
lets the engine batch them; ``stream`` yields text deltas in blocks of ``stream_chunk_tokens``.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from dask_rag.errors import InvalidInput, ModelLoadError
from dask_rag.rag.generate.base import SamplingParams, cut_at_stop, drain_events

__all__ = ["VLLMGenerator"]


class VLLMGenerator:
    """Generation with vLLM's ``AsyncLLMEngine`` (GPU)."""

    def __init__(self, path: str, gpu_memory_utilization: float = 0.5,
                 max_model_len: int | None = None) -> None:
        try:
            from vllm import AsyncEngineArgs, AsyncLLMEngine
        except ImportError as exc:
            raise InvalidInput("the vllm generator needs the 'vllm' extra and a GPU: "
                               "pip install 'dask-rag[vllm]'") from exc
        if not 0.05 <= gpu_memory_utilization <= 0.99:
            raise InvalidInput(f"gpu_memory_utilization={gpu_memory_utilization} is invalid: "
                               "must be between 0.05 and 0.99")
        self.name = f"vllm:{path}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dask-rag-vllm",
                                        daemon=True)
        self._thread.start()
        args = AsyncEngineArgs(model=path, gpu_memory_utilization=gpu_memory_utilization,
                               max_model_len=max_model_len)

        async def start() -> tuple[Any, Any]:
            engine = AsyncLLMEngine.from_engine_args(args)
            return engine, await engine.get_tokenizer()

        try:
            self.engine, self.tokenizer = self._run(start())
        except Exception as exc:
            raise ModelLoadError(f"vLLM could not load {path!r}: {type(exc).__name__}: {exc}"
                                 ) from None

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(self.tokenizer.encode(t)) for t in texts]

    @staticmethod
    def _params(params: SamplingParams) -> Any:
        from vllm import SamplingParams as VSamplingParams

        return VSamplingParams(max_tokens=params.max_tokens, temperature=params.temperature,
                               top_k=params.top_k if params.top_k else -1, top_p=params.top_p,
                               stop=list(params.stop) or None, seed=params.seed)

    async def _final_text(self, prompt: str, params: SamplingParams) -> str:
        text = ""
        async for out in self.engine.generate(prompt, self._params(params),
                                              request_id=uuid.uuid4().hex):
            text = out.outputs[0].text
        return cut_at_stop(text, params.stop)[0]

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[str]:
        async def all_of() -> list[str]:
            return list(await asyncio.gather(*(self._final_text(p, params) for p in prompts)))

        return list(self._run(all_of()))

    async def stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[str]:
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        async def produce() -> None:
            sent, tokens = 0, 0
            try:
                async for out in self.engine.generate(prompt, self._params(params),
                                                      request_id=uuid.uuid4().hex):
                    text = cut_at_stop(out.outputs[0].text, params.stop)[0]
                    now = len(out.outputs[0].token_ids)
                    if now - tokens >= params.stream_chunk_tokens or out.finished:
                        tokens = now
                        if len(text) > sent:
                            caller.call_soon_threadsafe(queue.put_nowait, ("text", text[sent:]))
                            sent = len(text)
                caller.call_soon_threadsafe(queue.put_nowait, ("end", None))
            except BaseException as exc:
                caller.call_soon_threadsafe(queue.put_nowait, ("error", exc))

        asyncio.run_coroutine_threadsafe(produce(), self._loop)
        async for piece in drain_events(queue):
            yield piece
