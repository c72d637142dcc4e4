"""The generator protocol, sampling parameters, and generator specs (``extractive``,
``hf:PATH``, ``vllm:PATH``).

Every generator offers batched ``generate(prompts, params)`` and async ``stream(prompt,
params)``; streamed text arrives in blocks of ``stream_chunk_tokens`` tokens (1 = token by token)
and always concatenates to exactly what ``generate`` returns for the same prompt and params.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from dask_rag.errors import InvalidInput, ModelLoadError

__all__ = ["Generator", "GeneratorSpec", "SamplingParams", "parse_generator_spec"]


@dataclass(frozen=True)
class SamplingParams:
    """How to decode.  ``temperature == 0`` (the default) is greedy decoding.

    ``top_k == 0`` and ``top_p == 1`` disable those filters; ``stop`` strings end the answer
    (the stop string itself is not returned); ``seed`` makes sampling reproducible.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream_chunk_tokens: int = 32

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> InvalidInput:
            return InvalidInput(f"SamplingParams.{name}={getattr(self, name)!r} is invalid: "
                                f"{allowed}")

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or \
                not 1 <= self.max_tokens <= 32_768:
            raise bad("max_tokens", "must be an integer between 1 and 32768")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or math.isnan(self.temperature) or not 0.0 <= self.temperature <= 10.0:
            raise bad("temperature", "must be a number between 0 and 10 (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 disables top-k)")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or \
                math.isnan(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be a number in (0, 1]")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s
                                                       for s in self.stop):
            raise bad("stop", "must be a tuple of non-empty strings")
        if len(self.stop) > 16:
            raise bad("stop", "at most 16 stop strings")
        if self.seed is not None and (isinstance(self.seed, bool) or
                                      not isinstance(self.seed, int) or self.seed < 0):
            raise bad("seed", "must be a non-negative integer or None")
        if isinstance(self.stream_chunk_tokens, bool) or \
                not isinstance(self.stream_chunk_tokens, int) or self.stream_chunk_tokens < 1:
            raise bad("stream_chunk_tokens", "must be an integer >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_dict(cls, data: dict[str, object] | None) -> SamplingParams:
        data = dict(data or {})
        if "stop" in data:
            stop = data["stop"]
            if isinstance(stop, str):
                data["stop"] = (stop,)
            elif isinstance(stop, list):
                data["stop"] = tuple(stop)
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise InvalidInput(f"unknown sampling parameter(s) {sorted(unknown)}")
        return cls(**data)  # type: ignore[arg-type]


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string (exclusive), and whether one was found."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut], cut < len(text)


async def drain_events(queue: asyncio.Queue[tuple[str, Any]]) -> AsyncIterator[str]:
    """Yield ``("text", piece)`` events from a producer thread's queue until ``("end", _)``;
    re-raise an ``("error", exc)`` event in the consumer."""
    while True:
        kind, value = await queue.get()
        if kind == "text":
            yield value
        elif kind == "error":
            raise value
        else:
            return


@runtime_checkable
class Generator(Protocol):
    """Text generation over prompts built by :func:`dask_rag.rag.prompt.build_prompt`."""

    name: str

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[str]: ...

    def stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[str]: ...


@dataclass(frozen=True)
class GeneratorSpec:
    """A parsed generator spec: ``extractive``, ``hf:PATH``, ``vllm:PATH`` or
    ``openai:URL[#MODEL]`` (``path`` holds the URL, ``options`` the model)."""

    kind: str
    path: str | None = None
    options: tuple[tuple[str, object], ...] = field(default=())

    def __str__(self) -> str:
        if self.path is None:
            return self.kind
        model = dict(self.options).get("model")
        return f"{self.kind}:{self.path}" + (f"#{model}" if model else "")


_SPECS = "'extractive', 'hf:PATH', 'vllm:PATH' or 'openai:http://HOST:PORT/v1[#MODEL]'"


def parse_generator_spec(spec: str) -> GeneratorSpec:
    """Validate a generator spec before any work is scheduled."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidInput(f"generator spec must be {_SPECS}")
    spec = spec.strip()
    if spec == "extractive":
        return GeneratorSpec("extractive")
    kind, sep, path = spec.partition(":")
    if kind == "openai" and sep:
        from urllib.parse import urlsplit

        url, _, model = path.partition("#")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidInput(f"generator {spec!r}: the upstream must be an http(s) URL, "
                               "e.g. openai:http://127.0.0.1:8000/v1#my-model")
        return GeneratorSpec("openai", url.rstrip("/"),
                             (("model", model),) if model else ())
    if not sep or kind not in ("hf", "vllm"):
        raise InvalidInput(f"unknown generator {spec!r}: use {_SPECS}")
    p = Path(path).expanduser()
    if not path or not p.is_dir():
        raise ModelLoadError(f"generator path {path!r} is not a directory (models are loaded "
                             "from local directories only)")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"generator path {path!r} is not a model directory (no "
                             "config.json)")
    return GeneratorSpec(kind, str(p.resolve()))
