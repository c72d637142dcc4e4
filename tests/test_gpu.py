"""GPU paths (skipped without a CUDA device): torch fp16 shards, faiss-gpu shards, GPU merge."""

from __future__ import annotations

import numpy as np
import pytest

from dask_rag.datasets import clustered_vectors, exact_search, recall_at_k

pytestmark = pytest.mark.gpu


def test_torch_fp16_scan_matches_exact():
    from dask_rag.index.gpu import TorchFlatIndex

    x = clustered_vectors(100_256, 384, seed=0)
    xb, xq = x[:100_000], x[100_000:]
    index = TorchFlatIndex(xb, np.arange(len(xb)), "ip", device="cuda")
    _, I = index.search(xq, 10)
    assert recall_at_k(I, exact_search(xb, xq, 10)[1], 10) >= 0.99


def test_torch_merge_on_gpu_matches_numpy():
    import torch

    from dask_rag.index.merge import merge_topk, merge_topk_torch

    rng = np.random.default_rng(0)
    Ds = [rng.standard_normal((32, 10)).astype(np.float32) for _ in range(4)]
    Is = [rng.permutation(10_000)[:320].reshape(32, 10).astype(np.int64) for _ in range(4)]
    _, It = merge_topk_torch([torch.as_tensor(d, device="cuda") for d in Ds],
                              [torch.as_tensor(i, device="cuda") for i in Is], 10, "ip")
    assert It.device.type == "cuda"
    np.testing.assert_array_equal(It.cpu().numpy(), merge_topk(Ds, Is, 10, "ip")[1])


def test_distributed_torch_backend_on_cuda_cluster():
    pytest.importorskip("dask_cuda")
    from distributed import Client

    from dask_rag import DistributedIndex, IndexSpec
    from dask_rag.cluster import start_local_cluster

    x = clustered_vectors(50_128, 128, seed=1)
    xb, xq = x[:50_000], x[50_000:]
    with start_local_cluster(gpus=True) as cluster, Client(cluster) as client:
        spec = IndexSpec(factory="Flat", n_shards=2, backend="torch")
        with DistributedIndex.build(client, xb, spec=spec) as index:
            _, I = index.search(xq, k=10)
            assert recall_at_k(I, exact_search(xb, xq, 10)[1], 10) >= 0.99


def test_faiss_gpu_shards(client):
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("faiss without GPU support")
    from dask_rag import DistributedIndex, IndexSpec

    x = clustered_vectors(20_064, 64, seed=2)
    xb, xq = x[:20_000], x[20_000:]
    spec = IndexSpec(factory="IVF64,Flat", n_shards=2, backend="faiss-gpu", nprobe=64)
    with DistributedIndex.build(client, xb, spec=spec) as index:
        _, I = index.search(xq, k=10)
        assert recall_at_k(I, exact_search(xb, xq, 10)[1], 10) >= 0.99


def test_fp16_encoder_on_gpu_matches_fp32(demo_docs):
    from dask_rag.config import EmbedConfig
    from dask_rag.embed.encoder import SentenceEncoder

    texts = [d.text[:1500] for d in demo_docs[:1000]]
    ref = SentenceEncoder(EmbedConfig(precision="fp32", device="cpu")).encode(texts)
    fp16 = SentenceEncoder(EmbedConfig(precision="fp16", device="cuda")).encode(texts)
    assert (ref * fp16).sum(1).mean() >= 0.99



def test_local_cuda_spec_starts():
    pytest.importorskip("dask_cuda")
    from pathlib import Path

    from dask_rag.cluster.spec import start_from_spec

    spec = Path(__file__).resolve().parent.parent / "clusters" / "local-cuda.yaml"
    client, cluster = start_from_spec(spec)
    try:
        workers = client.scheduler_info()["workers"]
        assert workers and all("generator" in w["resources"] for w in workers.values())
    finally:
        client.close()
        cluster.close()
