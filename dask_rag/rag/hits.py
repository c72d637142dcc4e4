"""What retrieval and generation return: :class:`Hit` (one retrieved chunk) and
:class:`Answer` (a generated answer with its citations), plus the one helper that re-orders
hits by new scores (rerank)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Answer", "Hit", "reorder_hits"]


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk."""

    id: int
    score: float
    text: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": self.score, "text": self.text, "source": self.source,
                "metadata": self.metadata}

    @classmethod
    def from_record(cls, rec: dict[str, Any] | None, cid: int, score: float) -> Hit:
        rec = rec or {}
        meta = rec.get("metadata")
        if isinstance(meta, str):
            try:
                meta = json.loads(meta)
            except json.JSONDecodeError:
                meta = {"raw": meta}
        return cls(id=int(cid), score=float(score), text=rec.get("text") or "",
                   source=rec.get("source") or "", metadata=meta or {})


def reorder_hits(hits: Sequence[Hit], scores: Sequence[float], k: int) -> list[Hit]:
    """The best ``k`` of ``hits`` by new ``scores`` (ties keep the earlier hit), each carrying
    its new score."""
    order = sorted(range(len(hits)), key=lambda i: (-scores[i], i))[:k]
    return [Hit(hits[i].id, float(scores[i]), hits[i].text, hits[i].source, hits[i].metadata)
            for i in order]


@dataclass
class Answer:
    """A generated answer; ``citations[n - 1]`` is the passage cited as ``[n]``."""

    question: str
    text: str
    citations: list[Hit]
    timings_ms: dict[str, float]
    hits: list[Hit] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.text,
                "citations": [dict(h.to_dict(), n=i + 1) for i, h in enumerate(self.citations)],
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()}}
