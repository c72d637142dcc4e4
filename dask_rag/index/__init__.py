"""The sharded vector index: shards, routing, merging, the on-disk format, GPU paths."""

from dask_rag.index.distributed import DistributedIndex
from dask_rag.index.merge import merge_topk
from dask_rag.index.query import IndexQuery, SearchFilter

__all__ = ["DistributedIndex", "IndexQuery", "SearchFilter", "merge_topk"]
