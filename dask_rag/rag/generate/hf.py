"""``hf:PATH``: a transformers causal LM from a local directory.

Each prompt is generated on its own, so an answer never depends on its micro-batch (see
:meth:`HFGenerator.generate`).
Streaming uses a token streamer that receives token ids as they are generated and emits the
decoded text delta every ``stream_chunk_tokens`` tokens; stop strings end both paths at the same
place, so the streamed pieces always concatenate to what :meth:`HFGenerator.generate` returns.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

from dask_rag.errors import InvalidInput, ModelLoadError
from dask_rag.rag.generate.base import SamplingParams, cut_at_stop, drain_events

__all__ = ["HFGenerator"]


class HFGenerator:
    """A causal LM generating from prompts (runs on the Dask worker that holds it)."""

    def __init__(self, path: str, device: str = "auto") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"could not load a causal LM from {path!r}: "
                                 f"{type(exc).__name__}: {exc}") from None
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.name = f"hf:{path}"
        self.path = path
        self.device = device
        self.tokenizer = tokenizer
        self.model = model.to(device).eval()  # type: ignore[arg-type]
        cfg = model.config
        self.context_length = int(getattr(cfg, "max_position_embeddings", None) or
                                  getattr(cfg, "n_positions", None) or 2048)
        self._lock = threading.Lock()  # one generate() at a time per model

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(texts))["input_ids"]]

    def _kwargs(self, params: SamplingParams) -> dict[str, Any]:
        kw: dict[str, Any] = {"max_new_tokens": params.max_tokens,
                              "pad_token_id": self.tokenizer.pad_token_id}
        if params.greedy:
            kw["do_sample"] = False
        else:
            kw.update(do_sample=True, temperature=params.temperature,
                      top_k=params.top_k or None, top_p=params.top_p)
        return kw

    def _encode(self, prompts: Sequence[str], params: SamplingParams) -> Any:
        room = self.context_length - params.max_tokens
        if room < 1:
            raise InvalidInput(f"max_tokens={params.max_tokens} leaves no room for a prompt in "
                               f"a context of {self.context_length} tokens")
        longest = max(self.count_tokens(prompts))
        if longest > room:
            raise InvalidInput(f"prompt of {longest} tokens does not fit: the model context is "
                               f"{self.context_length} tokens and max_tokens is "
                               f"{params.max_tokens}")
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True)
        return {k: v.to(self.device) for k, v in enc.items()}

    def _seed(self, params: SamplingParams) -> None:
        if params.seed is not None:
            import torch

            torch.manual_seed(params.seed)

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[str]:
        """One ``generate`` call per prompt, each seeded alike: an answer is a function of its
        prompt and the sampling parameters only.  Batched generation pads prompts on the left
        to the batch's longest, and a padded row's logits differ in their last bits from the
        unpadded ones, which is enough to change a greedy choice: an answer would depend on
        the other questions of its micro-batch."""
        import torch

        texts = []
        for prompt in prompts:
            enc = self._encode([prompt], params)
            with self._lock, torch.inference_mode():
                self._seed(params)
                out = self.model.generate(**enc, **self._kwargs(params))
            new = out[:, enc["input_ids"].shape[1]:]
            texts.append(self.tokenizer.batch_decode(new, skip_special_tokens=True)[0])
        return [cut_at_stop(t, params.stop)[0] for t in texts]

    async def stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[str]:
        """Text deltas in blocks of ``params.stream_chunk_tokens`` generated tokens."""
        import torch
        from transformers.generation.streamers import BaseStreamer

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        tokenizer = self.tokenizer
        enc = self._encode([prompt], params)
        stop_flag = threading.Event()
        hold = max((len(s) for s in params.stop), default=1) - 1

        class _Chunker(BaseStreamer):
            """Receives token ids; emits decoded deltas every N tokens, honouring stops."""

            def __init__(self) -> None:
                self.ids: list[int] = []
                self.sent = 0  # characters already emitted
                self.pending = 0
                self.first = True

            def _emit(self, final: bool) -> None:
                text = str(tokenizer.decode(self.ids, skip_special_tokens=True))
                text, stopped = cut_at_stop(text, params.stop)
                if stopped:
                    stop_flag.set()
                    final = True
                # incomplete multi-byte characters decode to U+FFFD: wait for the next token
                end = len(text) if final else max(self.sent, len(text) - hold)
                while not final and end > self.sent and text[end - 1] == "\ufffd":
                    end -= 1
                if end > self.sent:
                    loop.call_soon_threadsafe(queue.put_nowait, ("text", text[self.sent:end]))
                    self.sent = end

            def put(self, value: Any) -> None:
                if self.first:  # generate() first passes the prompt ids
                    self.first = False
                    return
                if stop_flag.is_set():
                    return
                self.ids.extend(int(v) for v in value.reshape(-1).tolist())
                self.pending += int(value.numel())
                if self.pending >= params.stream_chunk_tokens:
                    self.pending = 0
                    self._emit(final=False)

            def end(self) -> None:
                if not stop_flag.is_set():
                    self._emit(final=True)

        class _Stop:
            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> bool:
                return stop_flag.is_set()

        def run() -> None:
            try:
                from transformers import StoppingCriteriaList

                with self._lock, torch.inference_mode():
                    self._seed(params)
                    self.model.generate(**enc, **self._kwargs(params), streamer=_Chunker(),
                                        stopping_criteria=StoppingCriteriaList([_Stop()]))
                loop.call_soon_threadsafe(queue.put_nowait, ("end", None))
            except BaseException as exc:
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))

        thread = threading.Thread(target=run, name="dask-rag-hf-stream", daemon=True)
        thread.start()
        try:
            async for piece in drain_events(queue):
                yield piece
        finally:
            stop_flag.set()
            await asyncio.to_thread(thread.join)
