"""Synthetic vector data for tests, benchmarks and notebooks (numpy only, deterministic)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["clustered_vectors", "exact_search", "recall_at_k"]


def clustered_vectors(n: int, d: int, n_clusters: int = 100, spread: float = 0.35,
                      seed: int = 0, normalize: bool = True) -> npt.NDArray[np.float32]:
    """``n`` vectors around ``n_clusters`` random centres — closer to real embeddings than
    uniform noise (uniform data makes every IVF list equally likely and every neighbour far)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    labels = rng.integers(0, n_clusters, size=n)
    x = centres[labels] + spread * rng.standard_normal((n, d)).astype(np.float32)
    if normalize:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32)


def exact_search(xb: npt.NDArray[np.float32], xq: npt.NDArray[np.float32], k: int,
                 metric: str = "ip") -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Ground truth with a faiss ``IndexFlat`` (the oracle every approximate index is checked
    against)."""
    import faiss

    index = faiss.IndexFlatIP(xb.shape[1]) if metric == "ip" else faiss.IndexFlatL2(xb.shape[1])
    index.add(xb)
    D, I = index.search(xq, k)
    return D, I


def recall_at_k(I: npt.NDArray[np.int64], I_true: npt.NDArray[np.int64], k: int) -> float:
    """Mean fraction of the true top-k found in the returned top-k."""
    hits = [len(set(a[:k].tolist()) & set(b[:k].tolist()) - {-1})
            for a, b in zip(I, I_true, strict=True)]
    return float(np.mean(hits) / k)


def same_up_to_ties(D1: npt.NDArray[np.float32], I1: npt.NDArray[np.int64],
                    D2: npt.NDArray[np.float32], I2: npt.NDArray[np.int64],
                    tol: float = 1e-5) -> bool:
    """True when two top-k results agree except for the order of (near-)tied hits.

    faiss orders equal distances arbitrarily (heap order) while dask-rag's merge orders them by
    id, and BLAS may round the same dot product differently in the last bit for differently
    sized shards.  So: every id found by both must have the same distance within ``tol``, and
    ids found by only one side must sit at the cut-off, tied (within ``tol``) with its last hit.
    """
    if D1.shape != D2.shape:
        return False
    for d1, a, d2, b in zip(D1, I1, D2, I2, strict=True):
        if np.array_equal(a, b) and np.allclose(d1, d2, rtol=tol, atol=tol):
            continue
        pos_b = {int(x): j for j, x in enumerate(b)}
        for j, x in enumerate(a):
            if int(x) in pos_b:
                if abs(float(d1[j]) - float(d2[pos_b[int(x)]])) > tol * max(1.0, abs(float(d1[j]))):
                    return False
            elif abs(float(d1[j]) - float(d1[-1])) > tol * max(1.0, abs(float(d1[-1]))):
                return False
    return True
