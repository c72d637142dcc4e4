"""What a search asks of the index and what comes back: the query and result types, and the
input checks every entry point applies before any task is submitted.

The field's names (faiss's): ``xb`` database vectors, ``xq`` query vectors, ``D`` scores,
``I`` ids, ``k`` hits per query; results are ``(nq, k)`` and ``-1`` pads missing hits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from dask_rag.config import MAX_K
from dask_rag.errors import InvalidInput
from dask_rag.index.filters import SearchFilter, parse_filter

__all__ = [
    "Bm25Weights",
    "IndexQuery",
    "SearchFilter",
    "ShardResult",
    "SparseHits",
    "check_ids",
    "check_k",
    "check_vectors",
    "parse_filter",
]


def check_vectors(x: Any, dim: int | None, name: str = "vectors") -> npt.NDArray[np.float32]:
    """A C-contiguous float32 ``(n, dim)`` array, or InvalidInput saying what is wrong."""
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{name} is not an array: {exc}") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)
                                    and not np.issubdtype(arr.dtype, np.complexfloating)):
        raise InvalidInput(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise InvalidInput(f"{name} must be a 2-D array of shape (n, d), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise InvalidInput(f"{name} is empty (shape {arr.shape})")
    if dim is not None and arr.shape[1] != dim:
        raise InvalidInput(f"{name} has dimension {arr.shape[1]}, the index has dimension {dim}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = int(np.flatnonzero(~finite.all(axis=1))[0])
        raise InvalidInput(f"{name} row {bad} contains NaN or infinite values")
    return arr


def check_ids(ids: Any, n: int, name: str = "ids") -> npt.NDArray[np.int64]:
    """A 1-D int64 array of ``n`` distinct non-negative ids, or InvalidInput."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise InvalidInput(f"{name} must be a 1-D array of {n} integers, got shape {arr.shape}")
    if n and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInput(f"{name} must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if n and arr.min() < 0:
        raise InvalidInput(f"{name} must be >= 0 (-1 marks a missing hit)")
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise InvalidInput(f"{name} contains duplicates, e.g. {int(uniq[counts > 1][0])}")
    return arr


def check_k(k: Any, name: str = "k") -> int:
    """``k`` as an int in ``[1, MAX_K]`` (the one limit, :data:`dask_rag.config.MAX_K`)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InvalidInput(f"{name}={k!r} is invalid: must be an integer")
    if k <= 0:
        raise InvalidInput(f"{name}={k} is invalid: must be >= 1")
    if k > MAX_K:
        raise InvalidInput(f"{name}={k} is invalid: the maximum is {MAX_K}")
    return int(k)


@dataclass(frozen=True)
class Bm25Weights:
    """The index-wide BM25 statistics a batch's scores need (see :mod:`dask_rag.index.sparse`):
    the IDF of each query term the index holds and the average chunk length."""

    avgdl: float
    idf: dict[str, float]


@dataclass(frozen=True)
class IndexQuery:
    """What one search graph asks of every shard it visits (validated before submission).

    ``dense`` searches the vectors; ``texts`` (one per query row) also runs BM25 over the
    shard's chunks, ``sparse_k`` deep; ``with_records`` returns each hit's stored record (text,
    source, metadata) from the worker that found it.
    """

    k: int
    nprobe: int | None = None
    ef_search: int | None = None
    filter: SearchFilter | None = None
    with_records: bool = False
    texts: tuple[str, ...] | None = None
    sparse_k: int = 0
    dense: bool = True
    #: read-your-writes: the last write-ahead-log entry every shard must reflect before it
    #: answers (stamped by ``submit_search``: the index's last acknowledged write)
    min_seq: int = 0
    #: BM25 weights from the index's statistics (stamped with ``min_seq``); None: each shard
    #: scores with its own
    bm25: Bm25Weights | None = None

    def __post_init__(self) -> None:
        check_k(self.k)
        for name in ("nprobe", "ef_search"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise InvalidInput(f"{name}={value!r} is invalid: must be an integer >= 1")
        if self.texts is not None:
            check_k(self.sparse_k, "sparse_k")
        if not self.dense and self.texts is None:
            raise InvalidInput("a search needs vectors (dense) or texts (sparse), or both")


@dataclass
class SparseHits:
    """BM25 results of some query rows: ids, scores and the hit records."""

    rows: npt.NDArray[np.int64]
    I: npt.NDArray[np.int64]
    S: npt.NDArray[np.float32]
    payload: list[list[dict[str, Any] | None]]


@dataclass
class ShardResult:
    """A (partial) search answer: rows of the query batch and their top-k.

    ``payload`` optionally carries one record dict (or None) per hit, aligned with ``I``, so
    that chunk text travels with the hits from the worker that found them; ``sparse`` the BM25
    hits of the same rows.
    """

    rows: npt.NDArray[np.int64]
    D: npt.NDArray[np.float32]
    I: npt.NDArray[np.int64]
    payload: list[list[dict[str, Any] | None]] | None = None
    sparse: SparseHits | None = None
    #: slowest search task of the parts merged here, in milliseconds
    search_ms: float = 0.0
    #: wall-clock time (``time.time()``) the first of those tasks began searching (after
    #: embedding its queries, when it did that itself)
    started_at: float = 0.0
