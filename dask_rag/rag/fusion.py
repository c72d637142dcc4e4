"""Fusion of one query's dense and sparse (BM25) rankings into one ranking.

Three methods, each weighted (``dense_weight`` for the dense side, ``1 - dense_weight`` for
BM25):

``rrf``
    weighted reciprocal rank fusion, ``w / (rrf_k + rank_dense) + (1 - w) / (rrf_k + rank_bm25)``
    (ranks from 1; ``w = 0.5`` orders exactly like plain RRF).  Uses ranks only.
``weighted``
    a convex combination of per-query min-max normalised scores.
``dbsf``
    distribution-based score fusion: each list's scores are normalised with its mean and
    standard deviation (``mean - 3 sd`` to ``mean + 3 sd`` maps to 0..1, clipped), then combined
    convexly; less sensitive than min-max to one outlying top score.
``adaptive``
    chooses by the query's form.  A natural-language *question* ("How do I ...?", "Why is
    ...") is worded unlike its answer — the vocabulary gap that dense retrieval exists to
    bridge — and BM25 ranks on the question's incidental words: dense-led weighted RRF
    (``question_weight``, ``rrf_k``), where BM25 only breaks the dense ranking's near-ties.
    Any other query — keywords, a name, a title, a phrase or sentence from the text — shares
    its words with what it looks for, and BM25 carries as much signal as dense: the convex
    combination of min-max normalised scores with ``dense_weight``.  Unless BM25's best chunk
    matches little of the query (its score under :data:`FULL_MATCH` of the query's total IDF:
    the query's words are mostly not in the corpus, or only its incidental ones are): then
    BM25's weight shrinks in proportion, and dense leads.  Measured on six sets with
    each one held out in turn (``benchmarks/fusion_study.py``, README "Retrieval quality").

A chunk missing from one list contributes 0 from it.  Every method breaks ties by the best
rank in either list, then by id, so the fused order is a function of the two lists alone.
``anchor`` keeps the dense ranking's first hits where they are and fuses the rest: the top of
a strong dense ranking (what MRR sees) is then never pushed down by a weaker BM25 list, while
BM25 can still bring documents the dense list missed into the remaining places.
Plain RRF pays a price when one retriever is much weaker than the other (it lets the weak list
push its top hits up); the weights are what ``dask-rag eval --tune-fusion`` tunes per index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dask_rag.config import FUSIONS, RagConfig
from dask_rag.errors import InvalidInput

__all__ = ["FULL_MATCH", "Fusion", "default_fusion", "distribution_fusion", "fuse", "is_question",
           "reciprocal_rank_fusion", "weighted_fusion"]

Ranked = Sequence[tuple[int, float]]


class Fusion(BaseModel):
    """How hybrid mode fuses the two rankings (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str = Field("rrf", json_schema_extra={"enum": list(FUSIONS)})
    dense_weight: float = Field(0.5, ge=0.0, le=1.0, allow_inf_nan=False)
    rrf_k: int = Field(60, ge=1, le=100_000, strict=True)
    anchor: int = Field(0, ge=0, le=100, strict=True)
    #: ``adaptive``: the dense weight of the RRF that ranks question-form queries
    question_weight: float = Field(0.95, ge=0.0, le=1.0, allow_inf_nan=False)

    @field_validator("method")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in FUSIONS:
            raise ValueError(f"must be one of {', '.join(map(repr, FUSIONS))}")
        return value


def default_fusion(config: RagConfig) -> Fusion:
    """The fusion a :class:`~dask_rag.config.RagConfig` names (used when neither the request
    nor the index's manifest gives one)."""
    return Fusion(method=config.fusion, dense_weight=config.dense_weight, rrf_k=config.rrf_k,
                  anchor=config.fusion_anchor, question_weight=config.question_weight)


#: ``adaptive``: the share of a query's total IDF its best BM25 chunk must score for BM25 to
#: get its full weight (a chunk holding each query term once, at average length, scores
#: ``1 / (1 + k1) = 0.4`` of it); below, the weight shrinks in proportion
FULL_MATCH = 0.3

#: words that open an English question (after which a query is read as one)
_QUESTION_OPENERS = frozenset((
    "how", "what", "why", "when", "where", "which", "who", "whom", "whose", "can", "could",
    "is", "are", "was", "were", "do", "does", "did", "should", "would", "will", "shall",
    "may", "might", "must", "has", "have", "am", "isn't", "aren't", "doesn't", "don't",
    "can't", "won't"))


def is_question(text: str | None) -> bool:
    """A natural-language question: ends with "?", or opens with a question word and has at
    least three words ("how to sort a list", "is there a way to ...")."""
    if not text:
        return False
    stripped = text.strip()
    if stripped.endswith("?"):
        return True
    words = stripped.split()
    return len(words) >= 3 and words[0].lower().strip("\"'(") in _QUESTION_OPENERS


def _ranks(ranked: Ranked) -> dict[int, int]:
    out: dict[int, int] = {}
    for rank, (cid, _) in enumerate((c for c in ranked if c[0] >= 0), start=1):
        out.setdefault(cid, rank)
    return out


def _sorted(scores: dict[int, float], ranks: Sequence[dict[int, int]]) -> list[tuple[int, float]]:
    # each id's best rank in any list, computed once (it runs per query in the fusion task)
    best: dict[int, int] = {}
    for r in ranks:
        for cid, rank in r.items():
            if rank < best.get(cid, 1 << 30):
                best[cid] = rank
    return sorted(scores.items(), key=lambda kv: (-kv[1], best.get(kv[0], 1 << 30), kv[0]))


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], rrf_k: int = 60,
                           weights: Sequence[float] | None = None) -> list[tuple[int, float]]:
    """Fuse ranked id lists: ``score(d) = sum_i w_i / (rrf_k + rank_i(d))`` (ranks from 1).

    Ties are broken by the best rank in any list, then by id, so the order is deterministic.
    """
    if rrf_k < 1:
        raise InvalidInput(f"rrf_k={rrf_k} is invalid: must be >= 1")
    weights = weights or [1.0] * len(rankings)
    rank_maps = [_ranks([(c, 0.0) for c in ranking]) for ranking in rankings]
    scores: dict[int, float] = {}
    for ranks, w in zip(rank_maps, weights, strict=True):
        for cid, rank in ranks.items():
            scores[cid] = scores.get(cid, 0.0) + w / (rrf_k + rank)
    return _sorted(scores, rank_maps)


def _convex(dense: Ranked, sparse: Ranked, dense_weight: float,
            normalise: Literal["minmax", "distribution"]) -> list[tuple[int, float]]:
    def norm(ranked: Ranked) -> dict[int, float]:
        ranked = [(c, s) for c, s in ranked if c >= 0]
        if not ranked:
            return {}
        values = np.asarray([s for _, s in ranked], dtype=np.float64)
        if normalise == "minmax":
            lo, hi = values.min(), values.max()
        else:
            mean, sd = values.mean(), values.std()
            lo, hi = mean - 3 * sd, mean + 3 * sd
        if hi - lo <= 1e-12:
            out = np.ones_like(values)
        else:
            out = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
        result: dict[int, float] = {}
        for (cid, _), v in zip(ranked, out.tolist(), strict=True):
            result.setdefault(cid, v)
        return result

    d, s = norm(dense), norm(sparse)
    fused = {cid: dense_weight * d.get(cid, 0.0) + (1 - dense_weight) * s.get(cid, 0.0)
             for cid in set(d) | set(s)}
    return _sorted(fused, [_ranks(dense), _ranks(sparse)])


def weighted_fusion(dense: Ranked, sparse: Ranked, dense_weight: float = 0.5
                    ) -> list[tuple[int, float]]:
    """``w * minmax(dense) + (1 - w) * minmax(sparse)``, per query."""
    return _convex(dense, sparse, dense_weight, "minmax")


def distribution_fusion(dense: Ranked, sparse: Ranked, dense_weight: float = 0.5
                        ) -> list[tuple[int, float]]:
    """``w * dbsf(dense) + (1 - w) * dbsf(sparse)``: scores normalised by mean +- 3 sd."""
    return _convex(dense, sparse, dense_weight, "distribution")


def fuse(mode: str, dense: Ranked, sparse: Ranked, fusion: Fusion | None = None,
         query: str | None = None, idf_sum: float | None = None) -> list[tuple[int, float]]:
    """Rank candidates for ``mode`` in {dense, sparse, hybrid}: (id, score), best first.
    ``query``: the query's text, ``idf_sum``: its total BM25 term weight (see
    :meth:`~dask_rag.index.sparse.CorpusStats.idf_sums`) — the ``adaptive`` method reads
    them."""
    if mode == "dense":
        return [(c, s) for c, s in dense if c >= 0]
    if mode == "sparse":
        return [(c, s) for c, s in sparse if c >= 0]
    if mode != "hybrid":
        raise InvalidInput(f"mode={mode!r} is invalid: must be 'dense', 'sparse' or 'hybrid'")
    fusion = fusion or Fusion()
    w = fusion.dense_weight
    method = fusion.method
    if method == "adaptive":
        method = "rrf" if is_question(query) else "weighted"
        if method == "rrf":
            w = fusion.question_weight
        elif idf_sum:
            best = max((x for c, x in sparse if c >= 0), default=0.0)
            w = 1 - (1 - w) * min(1.0, best / idf_sum / FULL_MATCH)
    if method == "rrf":
        fused = reciprocal_rank_fusion([[c for c, _ in dense], [c for c, _ in sparse]],
                                       fusion.rrf_k, [w, 1 - w])
    elif method == "weighted":
        fused = weighted_fusion(dense, sparse, w)
    else:
        fused = distribution_fusion(dense, sparse, w)
    if not fusion.anchor:
        return fused
    top = [c for c, _ in dense if c >= 0][:fusion.anchor]
    scores = dict(fused)
    head = [(c, scores[c]) for c in top]
    return head + [(c, x) for c, x in fused if c not in set(top)]
