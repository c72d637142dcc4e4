"""The query vectors of a batch, as one tagged type shared by the driver and the search tasks.

A batch's vectors come in one of four forms, and each form travels differently:

- :class:`QueryMatrix` — the ``(nq, d)`` matrix is here, in the driver: it is validated and
  routed here, and each shard's task gets only its own rows
  (:class:`~dask_rag.index.routing.RoutedRows`).
- :class:`EmbeddedPieces` — the futures of embedding tasks' output, ``(vectors, rows)`` pieces:
  the vectors go from the embedding tasks to the search tasks (or to the route task) and never
  visit the driver.
- :class:`EmbedInTask` — texts to embed inside each search task (a picklable callable that
  returns the matrix, e.g. an encoder over a small batch: embedding it again on every shard's
  worker costs milliseconds in parallel and saves a scheduling round trip).
- :class:`NoVectors` — a BM25-only batch (the texts travel in the query).

They are NamedTuples because Dask looks inside NamedTuples for futures (and rebuilds them with
their type on the worker), not inside dataclasses: an :class:`EmbeddedPieces` arrives in the
task holding arrays where the driver held futures.  Every consumer dispatches on the type with
one ``match`` (:func:`~dask_rag.index.tasks.search_shard_task`, the searcher actor, the
driver's :class:`~dask_rag.index.fanout.SearchGraph`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from dask_rag.errors import InvalidInput

__all__ = ["EmbedInTask", "EmbeddedPieces", "NoVectors", "QueryMatrix", "QueryVectors",
           "as_query_vectors", "assemble"]


class QueryMatrix(NamedTuple):
    """The batch's ``(nq, d)`` float32 matrix, in the driver."""

    xq: npt.NDArray[np.float32]

    @property
    def nq(self) -> int:
        return int(self.xq.shape[0])

    def matrix(self) -> npt.NDArray[np.float32]:
        return self.xq


class EmbeddedPieces(NamedTuple):
    """Embedding tasks' output: ``(vectors, rows)`` pieces, each holding the batch rows
    ``rows`` (futures of the vectors in the driver, the arrays in a task)."""

    pieces: Sequence[tuple[Any, npt.NDArray[np.int64]]]

    @property
    def nq(self) -> int:
        return int(sum(len(rows) for _, rows in self.pieces))

    def matrix(self) -> npt.NDArray[np.float32]:
        """The ``(nq, d)`` matrix (in a task, where the pieces hold arrays)."""
        return assemble(self.pieces)


class EmbedInTask(NamedTuple):
    """``nq`` texts embedded by ``embed()`` in each task that needs them."""

    embed: Callable[[], npt.NDArray[np.float32]]
    nq: int

    def matrix(self) -> npt.NDArray[np.float32]:
        return np.ascontiguousarray(self.embed(), dtype=np.float32)


class NoVectors(NamedTuple):
    """A batch of ``nq`` BM25-only queries."""

    nq: int


QueryVectors = QueryMatrix | EmbeddedPieces | EmbedInTask | NoVectors


def as_query_vectors(vectors: Any, nq: int | None = None) -> QueryVectors:
    """``vectors`` as a :data:`QueryVectors`: one already is; a matrix (anything
    ``np.asarray`` takes) becomes a :class:`QueryMatrix`; None a :class:`NoVectors` of ``nq``
    rows.  The one place that tells the forms apart by their shape, for callers that pass a
    bare matrix (:meth:`DistributedIndex.submit_search
    <dask_rag.index.distributed.DistributedIndex.submit_search>`)."""
    if isinstance(vectors, (QueryMatrix, EmbeddedPieces, EmbedInTask, NoVectors)):
        return vectors
    if vectors is None:
        if nq is None:
            raise InvalidInput("no query vectors and no query texts: nothing to search for")
        return NoVectors(nq)
    if callable(vectors):
        raise InvalidInput("a callable vector source must be wrapped: EmbedInTask(fn, nq)")
    return QueryMatrix(vectors)


def assemble(parts: Sequence[tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]]
             ) -> npt.NDArray[np.float32]:
    """The ``(nq, d)`` query matrix of a batch from its embedded pieces."""
    n = sum(len(rows) for _, rows in parts)
    out = np.empty((n, parts[0][0].shape[1]), dtype=np.float32)
    for vecs, rows in parts:
        out[rows] = vecs
    return out
