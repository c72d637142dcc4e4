"""vLLM generator (GPU + the 'vllm' extra; skipped elsewhere): a tiny random model through the
real engine, batched and streamed."""

from __future__ import annotations

import asyncio

import pytest

from dask_rag.rag.generate import SamplingParams
from tests.tiny_models import save_tiny_gpt2

pytestmark = pytest.mark.vllm


def test_vllm_generate_and_stream(tmp_path):
    from dask_rag.rag.generate.vllm_engine import VLLMGenerator

    path = save_tiny_gpt2(tmp_path / "gpt2")
    gen = VLLMGenerator(str(path), gpu_memory_utilization=0.2, max_model_len=512)
    params = SamplingParams(max_tokens=16)
    out = gen.generate(["How do I serialize JSON?", "The quick brown fox"], params)
    assert out == gen.generate(["How do I serialize JSON?", "The quick brown fox"], params)

    async def collect():
        return [p async for p in gen.stream("How do I serialize JSON?",
                                            SamplingParams(max_tokens=16, stream_chunk_tokens=2))]

    assert "".join(asyncio.run(collect())) == out[0]
