"""Optional cross-encoder rerank (sentence-transformers ``CrossEncoder`` from a local path).

All (query, passage) pairs of a query batch go through the model in one ``predict`` call on the
worker holding the model, so reranking a batch of 64 questions x 20 candidates is one task.
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
        """Scores of each query's passages, computed in one batched call."""
        pairs = [(q, p) for q, ps in zip(queries, passages, strict=True) for p in ps]
        if not pairs:
            return [[] for _ in queries]
        flat = np.asarray(self.model.predict(pairs, batch_size=self.batch_size,
                                             show_progress_bar=False), dtype=np.float64)
        if flat.ndim > 1:  # multi-label heads: use the first logit
            flat = flat[:, 0]
        self.model_calls += 1
        out, i = [], 0
        for ps in passages:
            out.append([float(x) for x in flat[i:i + len(ps)]])
            i += len(ps)
        return out


def rerank_scores_task(path: str, queries: list[str], passages: list[list[str]]
                       ) -> list[list[float]]:
    """Runs on a worker: the cross-encoder is loaded once per worker."""
    from dask_rag.plugins import worker_model_cache

    model: CrossEncoderReranker = worker_model_cache().get(
        ("cross-encoder", path), lambda: CrossEncoderReranker(path))
    return model.scores(queries, passages)
