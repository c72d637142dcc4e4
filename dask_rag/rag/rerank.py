"""Optional cross-encoder rerank (sentence-transformers ``CrossEncoder`` from a local path).

A query batch is reranked by one task on the worker holding the model; each query's
(query, passage) pairs are one ``predict`` call, so a query's scores are the same whatever else
is in its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dask_rag.errors import ModelLoadError

__all__ = ["CrossEncoderReranker", "rerank_scores_task", "resolve_reranker_path"]


def resolve_reranker_path(path: str) -> str:
    p = Path(path).expanduser()
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ModelLoadError(f"rerank model path {path!r} is not a model directory "
                             "(models are loaded from local directories only)")
    return str(p.resolve())


class CrossEncoderReranker:
    """Scores (query, passage) pairs; higher is more relevant."""

    def __init__(self, path: str, device: str = "auto", batch_size: int = 64) -> None:
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        path = resolve_reranker_path(path)
        try:
            from sentence_transformers import CrossEncoder

            self.model = CrossEncoder(path, device=device, local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"could not load a cross-encoder from {path!r}: "
                                 f"{type(exc).__name__}: {exc}") from None
        self.path = path
        self.batch_size = batch_size
        self.model_calls = 0

    def scores(self, queries: Sequence[str], passages: Sequence[Sequence[str]]
               ) -> list[list[float]]:
        """Scores of each query's passages.

        One model call per query, over exactly that query's passages: the pairs of a call are
        padded to their longest, and padded batches round differently with their shape, so a
        call mixing several queries' pairs (as a micro-batch would) made a query's scores, and
        its order, depend on the other questions in its batch.
        """
        out: list[list[float]] = []
        for q, ps in zip(queries, passages, strict=True):
            if not ps:
                out.append([])
                continue
            scores = np.asarray(self.model.predict([(q, p) for p in ps],
                                                   batch_size=max(1, len(ps)),
                                                   show_progress_bar=False), dtype=np.float64)
            if scores.ndim > 1:  # multi-label heads: use the first logit
                scores = scores[:, 0]
            self.model_calls += 1
            out.append([float(x) for x in scores])
        return out


def rerank_scores_task(path: str, queries: list[str], passages: list[list[str]]
                       ) -> list[list[float]]:
    """Runs on a worker: the cross-encoder is loaded once per worker."""
    from dask_rag.cluster.plugins import worker_model_cache

    model: CrossEncoderReranker = worker_model_cache().get(
        ("cross-encoder", path), lambda: CrossEncoderReranker(path))
    return model.scores(queries, passages)
