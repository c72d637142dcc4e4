"""Merging per-shard top-k results into one global top-k (numpy, and torch for GPUs).

The convention is faiss's: ``D``/``I`` are ``(nq, k)``; a missing hit has id ``-1`` and the worst
possible distance (``-FLT_MAX`` for inner product, ``+FLT_MAX`` for L2).  Ties are broken by
ascending id so the result never depends on the order in which shards answered — the merged
result of S shards is a pure function of the set of candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from dask_rag.config import METRICS
from dask_rag.errors import InvalidInput
from dask_rag.index.query import ShardResult
from dask_rag.index.sparse import merge_sparse

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "FLT_MAX",
    "empty_result",
    "merge_results",
    "merge_topk",
    "merge_topk_torch",
    "topk_positions",
    "worst_distance",
]

FLT_MAX = float(np.finfo(np.float32).max)


def worst_distance(metric: str) -> float:
    """The distance faiss reports for a missing hit under ``metric``."""
    return -FLT_MAX if metric == "ip" else FLT_MAX


def empty_result(nq: int, k: int, metric: str) -> tuple[npt.NDArray[np.float32],
                                                         npt.NDArray[np.int64]]:
    """``(D, I)`` of shape ``(nq, k)`` holding only padding."""
    D = np.full((nq, k), worst_distance(metric), dtype=np.float32)
    I = np.full((nq, k), -1, dtype=np.int64)
    return D, I


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise InvalidInput(f"metric={metric!r} is invalid: must be 'ip' or 'l2'")


def topk_positions(D: npt.NDArray[np.float32], I: npt.NDArray[np.int64], k: int,
                   metric: str) -> npt.NDArray[np.intp]:
    """Column positions of the best ``k`` candidates of each row of ``(D, I)``.

    Padding (``I == -1``) sorts last; ties sort by ascending id.  Returns ``(nq, min(k, m))``.
    """
    _check_metric(metric)
    # a sort key where smaller is better, and padding always loses
    key = -D.astype(np.float64) if metric == "ip" else D.astype(np.float64)
    key = np.where(I < 0, np.inf, key)
    tie = np.where(I < 0, np.iinfo(np.int64).max, I)
    order = np.lexsort((tie, key), axis=-1)
    return order[:, :k]


def merge_topk(D_parts: Sequence[npt.NDArray[np.float32]], I_parts: Sequence[npt.NDArray[np.int64]],
               k: int, metric: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Merge per-shard ``(nq, k_i)`` results into the global ``(nq, k)`` top-k.

    Pure and vectorised: one ``lexsort`` over the concatenated candidates.  Rows with fewer than
    ``k`` real candidates are padded with ``-1`` ids and the worst distance.
    """
    if k <= 0:
        raise InvalidInput(f"k={k} is invalid: must be >= 1")
    if len(D_parts) != len(I_parts):
        raise InvalidInput("merge_topk: D_parts and I_parts have different lengths")
    if not D_parts:
        raise InvalidInput("merge_topk: no parts to merge")
    nq = D_parts[0].shape[0]
    for D, I in zip(D_parts, I_parts, strict=True):
        if D.shape != I.shape or D.ndim != 2 or D.shape[0] != nq:
            raise InvalidInput(
                f"merge_topk: part shapes {D.shape} / {I.shape} do not match nq={nq}")
    D_cat = np.concatenate([np.asarray(d, dtype=np.float32) for d in D_parts], axis=1)
    I_cat = np.concatenate([np.asarray(i, dtype=np.int64) for i in I_parts], axis=1)
    D_out, I_out = empty_result(nq, k, metric)
    if D_cat.shape[1] == 0 or nq == 0:
        return D_out, I_out
    pos = topk_positions(D_cat, I_cat, k, metric)
    rows = np.arange(nq)[:, None]
    width = pos.shape[1]
    I_sel = I_cat[rows, pos]
    D_sel = D_cat[rows, pos]
    D_out[:, :width] = np.where(I_sel < 0, worst_distance(metric), D_sel)
    I_out[:, :width] = I_sel
    return D_out, I_out


def merge_topk_torch(D_parts: Sequence[Any], I_parts: Sequence[Any], k: int,
                     metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_topk` for torch tensors (on any device, e.g. the GPU that produced them).

    Same semantics and tie-breaking: a stable sort by id, then a stable sort by distance.
    """
    import torch

    _check_metric(metric)
    if k <= 0:
        raise InvalidInput(f"k={k} is invalid: must be >= 1")
    D_cat = torch.cat([torch.as_tensor(d, dtype=torch.float32) for d in D_parts], dim=1)
    I_cat = torch.cat([torch.as_tensor(i, dtype=torch.int64) for i in I_parts], dim=1).to(
        D_cat.device)
    nq = D_cat.shape[0]
    pad = I_cat < 0
    key = (-D_cat if metric == "ip" else D_cat).double()
    key = torch.where(pad, torch.full_like(key, float("inf")), key)
    tie = torch.where(pad, torch.full_like(I_cat, torch.iinfo(torch.int64).max), I_cat)
    by_id = torch.sort(tie, dim=1, stable=True).indices
    key_by_id = torch.gather(key, 1, by_id)
    by_key = torch.sort(key_by_id, dim=1, stable=True).indices
    pos = torch.gather(by_id, 1, by_key)[:, :k]
    I_sel = torch.gather(I_cat, 1, pos)
    D_sel = torch.gather(D_cat, 1, pos)
    worst = worst_distance(metric)
    D_out = torch.full((nq, k), worst, dtype=torch.float32, device=D_cat.device)
    I_out = torch.full((nq, k), -1, dtype=torch.int64, device=D_cat.device)
    width = pos.shape[1]
    D_out[:, :width] = torch.where(I_sel < 0, torch.full_like(D_sel, worst), D_sel)
    I_out[:, :width] = I_sel
    return D_out, I_out


def merge_results(nq: int, k: int, metric: str, parts: Sequence[ShardResult]) -> ShardResult:
    """Merge partial results (each covering some rows of an ``nq``-query batch) into one
    result over the union of their rows: dense hits by :func:`merge_topk`, records aligned
    with them, BM25 hits by score then id.  Pure: the same parts give the same result in a
    task or in the client, in any order."""
    rows = np.unique(np.concatenate([p.rows for p in parts])) if parts else np.zeros(0, np.int64)
    D_full, I_full = [], []
    payload_cols: list[list[list[dict[str, Any] | None]]] = []
    with_payload = any(p.payload is not None for p in parts)
    for p in parts:
        D, I = empty_result(nq, p.D.shape[1], metric)
        D[p.rows] = p.D
        I[p.rows] = p.I
        D_full.append(D)
        I_full.append(I)
        if with_payload:
            cols: list[list[dict[str, Any] | None]] = [[None] * p.D.shape[1] for _ in range(nq)]
            for r, recs in zip(p.rows, p.payload or [], strict=False):
                cols[int(r)] = list(recs)
            payload_cols.append(cols)
    D_cat = np.concatenate(D_full, axis=1)
    I_cat = np.concatenate(I_full, axis=1)
    D_m, I_m = merge_topk([D_cat], [I_cat], k, metric)
    payload = None
    if with_payload:
        pos = topk_positions(D_cat, I_cat, k, metric)
        flat_rows = [[rec for c in payload_cols for rec in c[r]] for r in range(nq)]
        payload = [[flat_rows[r][int(p)] if I_m[r, j] >= 0 else None
                    for j, p in enumerate(pos[r])] for r in range(nq)]
        payload = [row + [None] * (k - len(row)) for row in payload]
    sparse = None
    if any(p.sparse is not None for p in parts):
        sparse = merge_sparse(nq, [p for p in parts if p.sparse is not None])
    return ShardResult(rows=rows, D=D_m[rows], I=I_m[rows],
                       payload=None if payload is None else [payload[int(r)] for r in rows],
                       sparse=sparse,
                       search_ms=max((p.search_ms for p in parts), default=0.0),
                       started_at=min((p.started_at for p in parts), default=0.0))
