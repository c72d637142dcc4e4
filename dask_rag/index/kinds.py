"""How a shard of each kind searches: one strategy per index kind and backend, picked at load.

A :class:`~dask_rag.index.shard.Shard` keeps what changes together under its lock (the faiss
index, records, tombstones); *how* it searches depends only on its :class:`IndexSpec` — flat
shards re-score their backend's candidates exactly (faiss, a faiss-gpu copy or torch tensors),
IVF shards search their lists (preassigned by the global router, or probed), HNSW walks its
graph, ScaNN its tree — and on nothing that changes while it is loaded.  So the choice is made
once (:func:`shard_kind`), and the shard asks its strategy three things:

``view(shard)``
    the search structure derived from the stored index (a GPU copy, torch tensors, a ScaNN
    searcher, or None), rebuilt after every mutation;
``search(shard, xq, k, ...)``
    the top-``k`` by score, ties by id, each query's answer independent of its batch;
``vector_bytes(shard)``
    the memory one stored vector costs (for ``dask.sizeof``).

``tombstones`` says whether removals only mark ids (HNSW graphs cannot drop nodes; they are
compacted at the next save).  A new kind or backend is one class here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from dask_rag.config import IndexSpec
from dask_rag.index.backends import GpuGuard, ScannView, all_vectors
from dask_rag.index.exact import ExactRescorer, exact_scores, topk_ties_by_id
from dask_rag.index.merge import empty_result, merge_topk

if TYPE_CHECKING:  # pragma: no cover
    from dask_rag.index.shard import Shard

__all__ = ["ShardKind", "shard_kind"]

Result = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


class ShardKind:
    """The faiss flat strategy, and the base of the others (see the module docstring)."""

    tombstones = False

    def view(self, shard: Shard) -> Any:
        if shard.spec.backend == "faiss-gpu":
            from dask_rag.index.gpu import to_faiss_gpu

            return to_faiss_gpu(shard.index)
        return None

    def vector_bytes(self, shard: Shard) -> int:
        return shard.dim * 4

    def search(self, shard: Shard, xq: npt.NDArray[np.float32], k: int, *, Iq: Any, Dq: Any,
               nprobe: int | None, ef_search: int | None,
               allowed: npt.NDArray[np.int64] | None, n_live: int) -> Result:
        """Exact re-scoring of the candidates the backend proposes (:mod:`.exact`)."""
        vectors = shard.flat_view()

        def allowed_rows() -> npt.NDArray[np.int64]:
            if allowed is None:
                return np.arange(len(vectors.ids), dtype=np.int64)
            rows = vectors.rows_of(allowed)
            return rows[rows >= 0]

        return ExactRescorer(vectors, shard.spec.metric, self._proposer(shard, allowed), n_live,
                             allowed_rows).search(xq, k)

    def _proposer(self, shard: Shard, allowed: npt.NDArray[np.int64] | None) -> Any:
        import faiss

        sel = shard.selector(allowed)
        params = faiss.SearchParameters(sel=sel) if sel is not None else None
        view = shard.view
        index = view if view is not None else shard.index

        def propose(q: npt.NDArray[np.float32], m: int) -> Result:
            with GpuGuard(view):
                D, I = index.search(q, m, params=params)
            return D, I

        return propose


class _TorchFlat(ShardKind):
    """Flat shards searched as torch tensors (GPU or CPU), re-scored exactly."""

    def view(self, shard: Shard) -> Any:
        from dask_rag.index.gpu import TorchFlatIndex

        ids, vecs = all_vectors(shard.index)
        return TorchFlatIndex(vecs, ids, shard.spec.metric)

    def _proposer(self, shard: Shard, allowed: npt.NDArray[np.int64] | None) -> Any:
        view = shard.view

        def propose(q: npt.NDArray[np.float32], m: int) -> Result:
            return view.search(q, m, shard, sel_ids=allowed)

        return propose


class _Scann(ShardKind):
    """A ScaNN searcher over the shard's vectors, rebuilt after mutations."""

    def view(self, shard: Shard) -> Any:
        return ScannView.build(shard)

    def search(self, shard: Shard, xq: npt.NDArray[np.float32], k: int, *, Iq: Any, Dq: Any,
               nprobe: int | None, ef_search: int | None,
               allowed: npt.NDArray[np.int64] | None, n_live: int) -> Result:
        view = shard.view
        return topk_ties_by_id(lambda rows, m: view.search(xq[rows], m, shard, sel_ids=allowed),
                               xq.shape[0], k, shard.spec.metric, n_live)


class _Graph(ShardKind, ABC):
    """IVF and HNSW: faiss's top-``m`` with a selector, then the exact refine stage (if any);
    ties at the cut are resolved by :func:`~dask_rag.index.exact.topk_ties_by_id`."""

    def search(self, shard: Shard, xq: npt.NDArray[np.float32], k: int, *, Iq: Any, Dq: Any,
               nprobe: int | None, ef_search: int | None,
               allowed: npt.NDArray[np.int64] | None, n_live: int) -> Result:
        sel = shard.selector(allowed)

        def run(rows: npt.NDArray[np.int64], m: int) -> Result:
            q = xq[rows]
            D, I = self._rows(shard, q, m, sel, nprobe=nprobe, ef_search=ef_search,
                              Iq=None if Iq is None else Iq[rows],
                              Dq=None if Dq is None else Dq[rows])
            return _refine(shard, q, D, I, m) if shard.refine is not None else (D, I)

        return topk_ties_by_id(run, xq.shape[0], k, shard.spec.metric, n_live)

    @abstractmethod
    def _rows(self, shard: Shard, xq: npt.NDArray[np.float32], m: int, sel: Any, *,
              nprobe: int | None, ef_search: int | None, Iq: Any, Dq: Any) -> Result:
        """faiss's top-``m`` of the rows ``xq`` (each graph kind says how)."""


class _Ivf(_Graph):
    """IVF lists: preassigned by the global coarse quantizer (``Iq``/``Dq``), or probed."""

    def vector_bytes(self, shard: Shard) -> int:
        return 8 + int(getattr(shard.index, "code_size", shard.dim * 4))

    def _rows(self, shard: Shard, xq: npt.NDArray[np.float32], m: int, sel: Any, *,
              nprobe: int | None, ef_search: int | None, Iq: Any, Dq: Any) -> Result:
        import faiss

        nq = xq.shape[0]
        view = shard.view
        index = view if view is not None else shard.index
        k_base = m * shard.spec.refine_k_factor if shard.refine is not None else m
        if Iq is None:
            params = faiss.SearchParametersIVF(nprobe=int(nprobe or shard.spec.nprobe), sel=sel)
            with GpuGuard(view):
                D, I = index.search(xq, k_base, params=params)
            return D, I
        params = faiss.SearchParametersIVF(nprobe=int(Iq.shape[1]), sel=sel)
        D = np.empty((nq, k_base), dtype=np.float32)
        I = np.empty((nq, k_base), dtype=np.int64)
        Iq = np.ascontiguousarray(Iq, dtype=np.int64)
        Dq = np.ascontiguousarray(Dq, dtype=np.float32)
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        with GpuGuard(view):
            index.search_preassigned_c(
                nq, faiss.swig_ptr(xq), k_base, faiss.swig_ptr(Iq), faiss.swig_ptr(Dq),
                faiss.swig_ptr(D), faiss.swig_ptr(I), False, params)
        return D, I


class _Hnsw(_Graph):
    """An HNSW graph; removals are tombstones until the next save compacts them."""

    tombstones = True

    def view(self, shard: Shard) -> Any:
        return None

    def vector_bytes(self, shard: Shard) -> int:
        return shard.dim * 4 + 8 * 2 * shard.spec.info.hnsw_m

    def _rows(self, shard: Shard, xq: npt.NDArray[np.float32], m: int, sel: Any, *,
              nprobe: int | None, ef_search: int | None, Iq: Any, Dq: Any) -> Result:
        import faiss

        ef = max(int(ef_search or shard.spec.ef_search), m)
        D, I = shard.index.search(xq, m, params=faiss.SearchParametersHNSW(efSearch=ef, sel=sel))
        return D, I


def _refine(shard: Shard, xq: npt.NDArray[np.float32], D: npt.NDArray[np.float32],
            I: npt.NDArray[np.int64], k: int) -> Result:
    """Re-score approximate candidates with exact distances (IndexRefineFlat semantics)."""
    nq, kk = I.shape
    valid = I >= 0
    if not valid.any():
        return empty_result(nq, k, shard.spec.metric)
    flat_ids = np.where(valid, I, I[valid][0]).ravel()
    assert shard.refine is not None
    vecs = shard.refine.reconstruct_batch(flat_ids).reshape(nq, kk, shard.dim)
    exact = exact_scores(xq, vecs, shard.spec.metric)
    return merge_topk([exact], [np.where(valid, I, -1)], k, shard.spec.metric)


def shard_kind(spec: IndexSpec) -> ShardKind:
    """The strategy for shards of ``spec`` (kind and backend were validated with the spec)."""
    kind = spec.info.kind
    if kind == "ivf":
        return _Ivf()
    if kind == "hnsw":
        return _Hnsw()
    if kind == "scann":
        return _Scann()
    return _TorchFlat() if spec.backend == "torch" else ShardKind()
