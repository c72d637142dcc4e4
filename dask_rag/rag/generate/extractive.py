"""The default generator: an extractive answer made of the retrieved passages' best sentences.

No language model: the sentences of the passages in the prompt are scored against the question
by IDF-weighted term overlap (IDF over those sentences, light stemming, stop words dropped),
plus a small prior for higher-ranked passages, and the best ``max_sentences`` are returned with
``[N]`` citations.  The answer opens with the best sentence of the *first* passage: retrieval
ranked the passages with the embeddings and BM25 together, a better judge of which passage
answers than word overlap alone (on the FAQ sets' test halves the first sentence came from the
answer's document for 58 / 57 / 44 % of the questions instead of 51 / 49 / 15 %: README,
"Answer quality").  It never re-embeds passages on the hot path — the retrieval scores already
came from embeddings computed at ingest time — so an answer costs well under a millisecond per
question (see ``benchmarks/ab_pipeline.py``) instead of an encoder call per sentence.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import AsyncIterator, Sequence

from dask_rag.corpus.chunking import split_sentences
from dask_rag.rag.generate.base import SamplingParams, cut_at_stop
from dask_rag.rag.prompt import parse_prompt

__all__ = ["ExtractiveGenerator", "split_stream_tokens"]

_WORD = re.compile(r"[A-Za-z0-9_]+")
_STOP = frozenset([
    "a", "an", "and", "are", "as", "at", "be", "by", "can", "do", "does", "for", "from", "has",
    "have", "how", "i", "if", "in", "into", "is", "it", "its", "of", "on", "or", "that", "the",
    "their", "then", "there", "these", "this", "to", "was", "what", "when", "where", "which",
    "who", "why", "will", "with", "you", "your",
])
_PIECE = re.compile(r"\s*\S+|\s+$")
_CITE_LIKE = re.compile(r"\[(\d+)\]")
_TOKEN = re.compile(r"\w+|[^\w\s]")


# Popular passages come back for many questions of a batch: their sentences' terms and token
# counts are cached (bounded) rather than recomputed per question — half of a batch's
# generation time went to _terms/_stem before (profiled on the A/B benchmark's batches of 64).
@functools.lru_cache(maxsize=1 << 16)
def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s", "ly"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


@functools.lru_cache(maxsize=1 << 15)
def _terms(text: str) -> tuple[str, ...]:
    out = []
    for w in _WORD.findall(text.lower()):
        for part in w.split("_"):
            if part and part not in _STOP:
                out.append(_stem(part))
    return tuple(out)


@functools.lru_cache(maxsize=1 << 15)
def _count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def _uncite(sentence: str) -> str:
    return _CITE_LIKE.sub(r"(\1)", sentence)


def split_stream_tokens(text: str) -> list[str]:
    """Whitespace-preserving pieces whose concatenation is exactly ``text``."""
    return _PIECE.findall(text)


class ExtractiveGenerator:
    """Answers by quoting the most relevant sentences of the retrieved passages."""

    name = "extractive"

    def __init__(self, max_sentences: int = 3) -> None:
        self.max_sentences = max_sentences

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Words and punctuation marks: the unit of this generator's budgets and streaming."""
        return [_count_tokens(t) for t in texts]

    def answer(self, question: str, docs: Sequence[tuple[int, str, str]]) -> str:
        if not docs:
            return "I don't know: no relevant documents were found."
        q = set(_terms(question))
        candidates: list[tuple[int, int, int, str, tuple[str, ...]]] = []  # rank, n, i, s, terms
        for rank, (n, _source, body) in enumerate(docs):
            for i, sent in enumerate(s for p in body.split("\n\n") for s in split_sentences(p)):
                terms = _terms(sent)
                # a bare name ("functools.lru_cache") is a heading, not an answer
                if len(terms) >= 2 and len(sent.split()) >= 3:
                    candidates.append((rank, n, i, sent, terms))
        if not candidates:
            return f"{' '.join(docs[0][2].split())[:300]} [{docs[0][0]}]"
        df = Counter(t for c in candidates for t in set(c[4]))
        total = len(candidates)
        scored = []
        for rank, n, i, sent, terms in candidates:
            overlap = sum(math.log(1 + total / df[t]) for t in q & set(terms))
            score = overlap / math.sqrt(len(terms)) + 0.3 / (1 + rank) + (0.1 if i == 0 else 0)
            scored.append((score, -rank, -i, n, sent))
        scored.sort(reverse=True)
        # the best sentence of the best-ranked passage first (see the module docstring)
        lead = next((x for x in scored if x[1] == 0), None)
        if lead is not None:
            scored.remove(lead)
            scored.insert(0, lead)
        chosen: list[tuple[int, str]] = []
        seen: set[str] = set()
        for score, _r, _i, n, sent in scored:
            key = " ".join(sent.split()).lower()
            if key in seen or (chosen and score <= 0.3):  # only a rank prior, no word matched
                continue
            seen.add(key)
            chosen.append((n, " ".join(sent.split())))
            if len(chosen) >= self.max_sentences:
                break
        # a quoted "x[1]" would read as a citation: only our markers may look like one
        return " ".join(f"{_uncite(s)} [{n}]" for n, s in chosen)

    def _one(self, prompt: str, params: SamplingParams) -> str:
        question, docs = parse_prompt(prompt)
        text = self.answer(question, docs)
        pieces = split_stream_tokens(text)
        if len(pieces) > params.max_tokens:
            text = "".join(pieces[: params.max_tokens])
        return cut_at_stop(text, params.stop)[0]

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[str]:
        return [self._one(p, params) for p in prompts]

    async def stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[str]:
        pieces = split_stream_tokens(self._one(prompt, params))
        step = params.stream_chunk_tokens
        for i in range(0, len(pieces), step):
            yield "".join(pieces[i:i + step])
