"""Rows of a DataFrame as documents: one column is the text, one the id, others metadata.

Used on the workers, one partition at a time (a dask DataFrame's partitions are chunked and
embedded where they live), and for pandas DataFrames handed to ``ingest_dataframe``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dask_rag.corpus.loaders import Document
from dask_rag.errors import InvalidInput

__all__ = ["FrameColumns", "frame_documents"]


@dataclass(frozen=True)
class FrameColumns:
    """Which columns hold the text, the id (the document's source) and the metadata."""

    text: str
    id: str
    metadata: tuple[str, ...] = ()

    def check(self, columns: Sequence[Any]) -> None:
        """InvalidInput naming every column that is asked for and missing."""
        have = {str(c) for c in columns}
        missing = [c for c in (self.text, self.id, *self.metadata) if c not in have]
        if missing:
            raise InvalidInput(f"the DataFrame has no column(s) {', '.join(map(repr, missing))};"
                               f" it has {', '.join(map(repr, sorted(have)))}")
        if self.text == self.id:
            raise InvalidInput("the text column and the id column must differ")


def _scalar(value: Any) -> Any:
    """A metadata value as plain JSON (numpy scalars unwrapped); None for missing values."""
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def frame_documents(df: Any, cols: FrameColumns) -> list[Document]:
    """The rows of a pandas DataFrame as Documents (rows with empty text are skipped)."""
    cols.check(df.columns)
    texts = df[cols.text].tolist()
    ids = df[cols.id].tolist()
    metas = {m: df[m].tolist() for m in cols.metadata}
    out = []
    for row, (text, ident) in enumerate(zip(texts, ids, strict=True)):
        if ident is None or (isinstance(ident, float) and math.isnan(ident)):
            raise InvalidInput(f"column {cols.id!r}: row {row} of a partition has no id")
        if not isinstance(text, str) or not text.strip():
            continue
        meta = {m: v for m in cols.metadata if (v := _scalar(metas[m][row])) is not None}
        out.append(Document(source=str(_scalar(ident)), text=text, metadata=meta))
    return out
