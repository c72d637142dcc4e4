"""How shards search: faiss index construction and settings, ScaNN views, GPU guards.

A shard stores a faiss index (``Flat`` and ``HNSW`` wrapped in ``IndexIDMap2``; ``IVF`` indexes
are clones of the trained template, whose ids are their own).  ScaNN and torch shards keep
their vectors in an ``IndexIDMap2(IndexFlat)`` and build their searcher from it after every
mutation; faiss-gpu shards search a GPU copy.  faiss, ScaNN and torch are imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from dask_rag.config import IndexSpec
from dask_rag.errors import InvalidInput
from dask_rag.index.merge import empty_result, merge_topk

if TYPE_CHECKING:  # pragma: no cover
    from dask_rag.index.shard import Shard

__all__ = ["FAISS_BLAS_THRESHOLD", "add_to_index", "all_vectors", "configure_faiss",
           "faiss_metric", "new_refine_store", "new_shard_index"]


#: faiss switches exhaustive search from its per-query SIMD loop to BLAS when nq * d reaches
#: this (faiss 1.15 defaults to 128000, i.e. ~334 queries at d=384).  Measured here at d=384,
#: one thread: 16 queries x 50k vectors take 81 ms without BLAS and 18 ms with it; below ~3
#: queries the SIMD loop wins.  1024 makes BLAS kick in from 3 queries at d=384.
FAISS_BLAS_THRESHOLD = 1024


def configure_faiss() -> None:
    """Process-wide faiss settings dask-rag relies on (idempotent, cheap)."""
    import faiss

    faiss.cvar.distance_compute_blas_threshold = FAISS_BLAS_THRESHOLD


def faiss_metric(metric: str) -> int:
    import faiss

    return int(faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)


def new_shard_index(spec: IndexSpec, dim: int, template: Any | None) -> Any:
    """An empty faiss index for one shard (a clone of the trained template for IVF)."""
    import faiss

    kind = spec.info.kind
    if kind == "ivf":
        assert template is not None
        return faiss.clone_index(template)
    if kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, spec.info.hnsw_m, faiss_metric(spec.metric))
        return faiss.IndexIDMap2(hnsw)
    # flat, and the vector store behind ScaNN / torch shards
    return faiss.IndexIDMap2(faiss.IndexFlat(dim, faiss_metric(spec.metric)))


def new_refine_store(dim: int, metric: str) -> Any:
    import faiss

    return faiss.IndexIDMap2(faiss.IndexFlat(dim, faiss_metric(metric)))


def add_to_index(index: Any, xb: npt.NDArray[np.float32], ids: npt.NDArray[np.int64],
                  lists: npt.NDArray[np.int64] | None) -> None:
    import faiss

    xb = np.ascontiguousarray(xb, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if lists is not None and isinstance(index, faiss.IndexIVF):
        # use the central coarse assignment so each vector lands in exactly the list (and thus
        # the shard) the router expects, bit-for-bit
        lists = np.ascontiguousarray(lists, dtype=np.int64)
        index.add_core(len(ids), faiss.swig_ptr(xb), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
    else:
        index.add_with_ids(xb, ids)


def all_vectors(index: Any) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """(ids, vectors) stored in an IndexIDMap2-wrapped flat or HNSW index."""
    import faiss

    n = int(index.ntotal)
    ids = faiss.vector_to_array(index.id_map).astype(np.int64) if n else np.zeros(0, np.int64)
    vecs = index.index.reconstruct_n(0, n) if n else np.zeros((0, index.d), np.float32)
    return ids, np.asarray(vecs, dtype=np.float32)


class GpuGuard:
    """Serialise calls into a faiss-gpu index (they are not thread-safe)."""

    def __init__(self, accelerated: Any) -> None:
        self._lock = getattr(accelerated, "_dask_rag_lock", None)

    def __enter__(self) -> None:
        if self._lock is not None:
            self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.release()


class ScannView:
    """A ScaNN searcher over a shard's vectors (ScaNN shards are rebuilt after mutations)."""

    def __init__(self, searcher: Any, ids: npt.NDArray[np.int64], vecs: npt.NDArray[np.float32],
                 metric: str) -> None:
        self.searcher = searcher
        self.ids = ids
        self.vecs = vecs
        self.metric = metric

    @classmethod
    def build(cls, shard: Shard) -> ScannView:
        try:
            import scann
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise InvalidInput("ScaNN shards need the 'scann' extra: pip install dask-rag[scann]"
                               ) from exc
        ids, vecs = all_vectors(shard.index)
        n = len(ids)
        if n == 0:
            return cls(None, ids, vecs, shard.spec.metric)
        distance = "dot_product" if shard.spec.metric == "ip" else "squared_l2"
        leaves = shard.spec.info.scann_leaves or max(1, int(np.sqrt(n)))
        leaves = min(leaves, n)
        to_search = max(1, min(leaves, shard.spec.nprobe))
        builder = scann.scann_ops_pybind.builder(vecs, 10, distance)
        if n >= 64 and leaves > 1:
            builder = builder.tree(num_leaves=leaves, num_leaves_to_search=to_search,
                                   training_sample_size=min(n, 100_000))
        if n >= 256 and vecs.shape[1] >= 2:
            builder = builder.score_ah(2, anisotropic_quantization_threshold=0.2).reorder(
                min(n, 100))
        else:
            builder = builder.score_brute_force()
        return cls(builder.build(), ids, vecs, shard.spec.metric)

    def search(self, xq: npt.NDArray[np.float32], k: int, shard: Shard,
               sel_ids: npt.NDArray[np.int64] | None = None
               ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        nq = xq.shape[0]
        if self.searcher is None:
            return empty_result(nq, k, self.metric)
        if sel_ids is not None:
            # filtered or tombstoned: exact search over the allowed subset (ScaNN has no
            # selectors); correct, and the allowed subset is usually small
            keep = np.isin(self.ids, sel_ids)
            vecs, ids = self.vecs[keep], self.ids[keep]
            scores = xq @ vecs.T if self.metric == "ip" else (
                (xq * xq).sum(1)[:, None] - 2 * xq @ vecs.T + (vecs * vecs).sum(1)[None, :])
            cand = np.broadcast_to(ids, scores.shape)
            return merge_topk([scores.astype(np.float32)], [cand], k, self.metric)
        kk = min(k, len(self.ids))
        pos, dist = self.searcher.search_batched(np.ascontiguousarray(xq), final_num_neighbors=kk)
        pos = np.asarray(pos, dtype=np.int64)
        dist = np.asarray(dist, dtype=np.float32)
        I = np.where(pos >= 0, self.ids[np.maximum(pos, 0)], -1)
        D_out, I_out = empty_result(nq, k, self.metric)
        D_out[:, :kk] = dist
        I_out[:, :kk] = I
        return D_out, I_out
