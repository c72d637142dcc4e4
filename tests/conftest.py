"""Shared fixtures: one real LocalCluster of 2 single-threaded worker processes per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    from dask_rag.index.gpu import cuda_available

    has_gpu = cuda_available()
    try:
        import vllm  # noqa: F401

        has_vllm = has_gpu
    except ImportError:
        has_vllm = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_vllm = pytest.mark.skip(reason="needs vLLM and a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "vllm" in item.keywords and not has_vllm:
            item.add_marker(skip_vllm)


@pytest.fixture(scope="session")
def cluster():
    from dask_rag.cluster import start_local_cluster

    with start_local_cluster(2, dashboard_address=":0", memory_limit="6GiB") as cluster:
        yield cluster


@pytest.fixture(scope="session")
def client(cluster):
    from distributed import Client

    with Client(cluster) as client:
        yield client


#: a slice of the standard library big enough for retrieval tests, small enough to embed fast
DEMO_MODULES = (
    "json", "csv", "functools", "itertools", "collections", "subprocess", "pathlib", "os",
    "re", "shutil", "tempfile", "argparse", "logging", "datetime", "heapq", "bisect",
    "textwrap", "string", "random", "statistics", "fractions", "decimal", "hashlib", "base64",
    "zipfile", "tarfile", "gzip", "sqlite3", "urllib.parse", "http.client", "socket", "select",
    "threading", "queue", "asyncio.queues", "contextlib", "dataclasses", "enum", "typing",
    "inspect",
)


@pytest.fixture(scope="session")
def demo_docs():
    from dask_rag.corpus.demo import stdlib_documents

    return stdlib_documents(DEMO_MODULES)


@pytest.fixture(scope="session")
def demo_index(client, demo_docs, tmp_path_factory):
    """An index of the demo slice, ingested through the real pipeline (model included)."""
    from dask_rag.ingest import ingest

    path = tmp_path_factory.mktemp("demo") / "index"
    report = ingest(client, demo_docs, path, progress=False)
    assert report.chunks_total > 500
    return path

