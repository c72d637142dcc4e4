"""Chunking by encoder tokens, on paragraph, then sentence, then word boundaries, with overlap.

A chunk holds at most ``max_tokens`` encoder tokens (counted with the encoder's own tokenizer,
so nothing is silently truncated at embedding time); consecutive chunks of a document share up
to ``overlap_tokens`` tokens of whole sentences so an answer spanning a boundary is still found.
Chunk ids are a content hash of (source, text): stable across runs and machines, which is what
lets incremental ingestion skip unchanged documents.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dask_rag.config import ChunkConfig
from dask_rag.corpus.loaders import Document

__all__ = ["Chunk", "chunk_documents", "chunk_id", "split_sentences"]

CountTokens = Callable[[Sequence[str]], list[int]]

_PARAGRAPH = re.compile(r"\n\s*\n")
# a sentence ends at . ! ? followed by whitespace and an upper-case letter, digit or quote;
# abbreviations like "e.g." and dotted names like "os.path" do not end sentences
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")


@dataclass(frozen=True)
class Chunk:
    """One chunk of a document, ready to embed and index."""

    id: int
    text: str
    source: str
    metadata: dict[str, Any]
    doc_hash: str

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "source": self.source,
                "metadata": self.metadata, "doc_hash": self.doc_hash}


def chunk_id(source: str, text: str) -> int:
    """A stable non-negative int64 id: 63 bits of blake2b(source, text)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(source.encode())
    h.update(b"\x00")
    h.update(text.encode())
    return int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def split_sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(paragraph) if s.strip()]


@dataclass
class _Unit:
    text: str
    tokens: int
    paragraph: int


def _units(text: str, count: CountTokens, max_tokens: int) -> list[_Unit]:
    """Paragraphs that fit, else their sentences, else word runs — each <= max_tokens."""
    paragraphs = [p.strip() for p in _PARAGRAPH.split(text) if p.strip()]
    counts = _content_tokens(count, paragraphs)
    units: list[_Unit] = []
    for pi, (para, n) in enumerate(zip(paragraphs, counts, strict=True)):
        if n <= max_tokens:
            units.append(_Unit(para, n, pi))
            continue
        sentences = split_sentences(para)
        for sent, m in zip(sentences, _content_tokens(count, sentences), strict=True):
            if m <= max_tokens:
                units.append(_Unit(sent, m, pi))
            else:
                units.extend(_Unit(w, wn, pi) for w, wn in _word_runs(sent, count, max_tokens))
    return units


def _content_tokens(count: CountTokens, texts: Sequence[str]) -> list[int]:
    """Token counts without the special tokens the tokenizer adds around every text."""
    if not texts:
        return []
    overhead = count([""])[0]
    return [max(0, n - overhead) for n in count(list(texts))]


def _word_runs(sentence: str, count: CountTokens, max_tokens: int) -> list[tuple[str, int]]:
    words = sentence.split()
    sizes = _content_tokens(count, words)
    runs: list[tuple[str, int]] = []
    cur: list[str] = []
    cur_n = 0
    for w, n in zip(words, sizes, strict=True):
        if cur and cur_n + n > max_tokens:
            runs.append((" ".join(cur), cur_n))
            cur, cur_n = [], 0
        cur.append(w)
        cur_n += n
    if cur:
        runs.append((" ".join(cur), cur_n))
    return runs


def _join(units: list[_Unit]) -> str:
    out = units[0].text
    for prev, u in itertools.pairwise(units):
        out += ("\n\n" if u.paragraph != prev.paragraph else " ") + u.text
    return out


def chunk_text(text: str, count: CountTokens, config: ChunkConfig) -> list[str]:
    """Split ``text`` into chunks of at most ``config.max_tokens`` tokens with overlap."""
    units = _units(text, count, config.max_tokens)
    chunks: list[str] = []
    cur: list[_Unit] = []
    cur_n = 0
    for u in units:
        if cur and cur_n + u.tokens > config.max_tokens:
            chunks.append(_join(cur))
            # carry whole trailing units worth <= overlap_tokens into the next chunk
            carry: list[_Unit] = []
            carry_n = 0
            for prev in reversed(cur):
                if carry_n + prev.tokens > config.overlap_tokens or \
                        carry_n + prev.tokens + u.tokens > config.max_tokens:
                    break
                carry.insert(0, prev)
                carry_n += prev.tokens
            cur, cur_n = carry, carry_n
        cur.append(u)
        cur_n += u.tokens
    if cur:
        chunks.append(_join(cur))
    return chunks


def chunk_documents(docs: Sequence[Document], count: CountTokens,
                    config: ChunkConfig | None = None) -> list[Chunk]:
    """Chunks of every document (empty documents yield none; duplicate chunks kept once)."""
    config = config or ChunkConfig()
    out: list[Chunk] = []
    for doc in docs:
        doc_hash = doc.doc_hash
        seen: set[int] = set()
        # sections (a heading's text, a page) are chunked apart: no chunk crosses one
        parts = ([(s.text, s.metadata) for s in doc.sections] if doc.sections
                 else [(doc.text, {})])
        i = 0
        for part, extra in parts:
            for text in chunk_text(part, count, config):
                cid = chunk_id(doc.source, text)
                i += 1
                if cid in seen:
                    continue
                seen.add(cid)
                out.append(Chunk(id=cid, text=text, source=doc.source,
                                 metadata={**doc.metadata, **extra, "chunk": i - 1},
                                 doc_hash=doc_hash))
    return out
