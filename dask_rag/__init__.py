"""dask-rag: retrieval-augmented generation with a faiss index sharded across a Dask cluster.

Importing the package is cheap: torch, faiss, sentence-transformers, bm25s, cupy and vLLM are
imported only by the code that needs them.  Public names are resolved lazily.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dask_rag.config import (
    BatchConfig,
    ChunkConfig,
    CommConfig,
    EmbedConfig,
    IndexSpec,
    RagConfig,
    ServeConfig,
)
from dask_rag.errors import (
    CorruptIndex,
    DaskRagError,
    IndexNotFound,
    InvalidInput,
    ModelLoadError,
    Overloaded,
    ShardUnavailable,
)

__version__ = "0.1.0"

_LAZY = {
    "DistributedIndex": "dask_rag.index.distributed",
    "SearchFilter": "dask_rag.index.query",
    "merge_topk": "dask_rag.index.merge",
    "tune_comms": "dask_rag.cluster.plugins",
    "RagPipeline": "dask_rag.pipeline",
    "Hit": "dask_rag.pipeline",
    "Answer": "dask_rag.pipeline",
    "MicroBatcher": "dask_rag.batching",
    "ingest": "dask_rag.ingest",
}

__all__ = [
    "Answer",
    "BatchConfig",
    "ChunkConfig",
    "CommConfig",
    "CorruptIndex",
    "DaskRagError",
    "DistributedIndex",
    "EmbedConfig",
    "Hit",
    "IndexNotFound",
    "IndexSpec",
    "InvalidInput",
    "MicroBatcher",
    "ModelLoadError",
    "Overloaded",
    "RagConfig",
    "RagPipeline",
    "SearchFilter",
    "ServeConfig",
    "ShardUnavailable",
    "__version__",
    "ingest",
    "merge_topk",
    "tune_comms",
]

if TYPE_CHECKING:  # pragma: no cover
    from dask_rag.cluster.plugins import tune_comms
    from dask_rag.index.distributed import DistributedIndex
    from dask_rag.index.merge import merge_topk
    from dask_rag.index.query import SearchFilter


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dask_rag' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
