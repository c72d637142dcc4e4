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
                    D2: npt.NDArray[np.float32], I2: npt.NDArray[np.int64]) -> bool:
    """True when two top-k results are equal except for the order of exactly tied hits.

    faiss orders equal distances arbitrarily (heap order); dask-rag's merge orders them by id.
    The last distance of a row may be tied with hits beyond k, so ids tied at the cut-off are
    only required to have that same distance.
    """
    if D1.shape != D2.shape or not np.array_equal(D1, D2):
        return False
    for d, a, b in zip(D1, I1, I2, strict=True):
        if np.array_equal(a, b):
            continue
        last = d[-1]
        for value in np.unique(d):
            sa, sb = set(a[d == value].tolist()), set(b[d == value].tolist())
            if value != last and sa != sb:
                return False
    return True
