"""Prompt building: retrieved passages in ``<doc>`` tags, under a token budget.

The prompt is::

    {instructions}
    [Example question / context / answer blocks, optional]

    Context:
    <doc id="1" source="json.dumps">…</doc>
    <doc id="2" source="…">…</doc>

    Question: {question}
    Answer:

Passages come most relevant first and are numbered 1..n; ``Prompt.citations[n - 1]`` is the hit
id behind ``[n]``.  Near-duplicate passages (word-shingle Jaccard similarity >= threshold) are
dropped, and the last passage that does not fit is cut at a sentence boundary.  The budget is
counted with the *generator's* tokenizer on the assembled prompt — not estimated from
characters, and not summed per part (BPE merges across part boundaries) — so the result never
exceeds it.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dask_rag.corpus.chunking import split_sentences
from dask_rag.errors import InvalidInput

__all__ = ["DEFAULT_INSTRUCTIONS", "Prompt", "build_prompt", "parse_prompt"]

CountTokens = Callable[[Sequence[str]], list[int]]

DEFAULT_INSTRUCTIONS = (
    "Answer the question using only the documents in the context below. "
    "Cite the documents you use as [N], where N is the document id. "
    "If the context does not contain the answer, say that you do not know."
)

_DOC_RE = re.compile(r'<doc id="(\d+)" source="([^"]*)">\n?(.*?)\n?</doc>', re.S)


@dataclass(frozen=True)
class Prompt:
    """An assembled prompt and what its citation numbers refer to."""

    text: str
    question: str
    citations: tuple[int, ...]
    tokens: int
    dropped_duplicates: int = 0
    truncated: bool = False
    passages: tuple[str, ...] = field(default=(), repr=False)


def _shingles(text: str, n: int = 3) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _jaccard(a: set[Any], b: set[Any]) -> float:
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)


def _escape(text: str) -> str:
    # a passage must not be able to close its own <doc> tag or open a new one
    return text.replace("<doc", "&lt;doc").replace("</doc", "&lt;/doc")


def _doc_block(n: int, source: str, text: str) -> str:
    return f'<doc id="{n}" source="{html.escape(source, quote=True)}">\n{_escape(text)}\n</doc>'


def _assemble(instructions: str, examples: str, blocks: Sequence[str], question: str,
              history: Sequence[tuple[str, str]] = ()) -> str:
    context = "\n".join(blocks) if blocks else "(no documents)"
    head = instructions + ("\n\n" + examples if examples else "")
    if history:  # earlier turns of a chat: context for the answer, escaped like passages
        turns = "\n".join(f"{role}: {_escape(' '.join(text.split()))}" for role, text in history)
        head += f"\n\nConversation so far:\n{turns}"
    return f"{head}\n\nContext:\n{context}\n\nQuestion: {question}\nAnswer:"


def _examples(few_shot: Sequence[tuple[str, str, str]]) -> str:
    """Few-shot examples as (question, context, answer) triples."""
    return "\n\n".join(f"Example question: {q}\nExample context: {c}\nExample answer: {a}"
                       for q, c, a in few_shot)


def build_prompt(question: str, hits: Sequence[Any], count_tokens: CountTokens, budget: int,
                 *, instructions: str = DEFAULT_INSTRUCTIONS,
                 few_shot: Sequence[tuple[str, str, str]] = (),
                 dedup_threshold: float = 0.9,
                 history: Sequence[tuple[str, str]] = ()) -> Prompt:
    """Pack the most relevant passages into a prompt of at most ``budget`` tokens.

    ``hits`` need ``id``, ``text`` and ``source`` attributes, most relevant first;
    ``history`` holds the earlier turns of a chat as ``(role, text)``.
    """
    if budget < 1:
        raise InvalidInput(f"token budget {budget} is invalid: must be >= 1")
    examples = _examples(few_shot)

    def size(blocks: Sequence[str]) -> int:
        return count_tokens([_assemble(instructions, examples, blocks, question, history)])[0]

    base = size([])
    if base > budget:
        raise InvalidInput(f"the question and instructions alone take {base} tokens, more than "
                           f"the token budget of {budget}")
    # Pack with per-block counts (one tokenizer call per passage, not per candidate prompt),
    # then verify the assembled prompt and back off: BPE may merge across block boundaries,
    # so only the final count is authoritative.
    blocks: list[str] = []
    ids: list[int] = []
    texts: list[str] = []
    sources: list[str] = []
    kept_shingles: list[set[tuple[str, ...]]] = []
    dropped = 0
    truncated = False
    used = base
    for hit in hits:
        text = (hit.text or "").strip()
        if not text:
            continue
        sh = _shingles(text)
        if any(_jaccard(sh, other) >= dedup_threshold for other in kept_shingles):
            dropped += 1
            continue
        n = len(blocks) + 1
        block = _doc_block(n, hit.source, text)
        cost = count_tokens([block + "\n"])[0]
        if used + cost <= budget:
            blocks.append(block)
            ids.append(int(hit.id))
            texts.append(text)
            sources.append(hit.source)
            kept_shingles.append(sh)
            used += cost
            continue
        # does not fit whole: keep the longest prefix of whole sentences that fits
        sentences = split_sentences(" ".join(text.split()))
        lo, hi = 0, len(sentences)
        while lo < hi:  # binary search on the number of sentences
            mid = (lo + hi + 1) // 2
            part = _doc_block(n, hit.source, " ".join(sentences[:mid]))
            if used + count_tokens([part + "\n"])[0] <= budget:
                lo = mid
            else:
                hi = mid - 1
        if lo > 0:
            cut = " ".join(sentences[:lo])
            blocks.append(_doc_block(n, hit.source, cut))
            ids.append(int(hit.id))
            texts.append(cut)
            sources.append(hit.source)
            truncated = True
        break
    # the authoritative check: shorten the tail until the assembled prompt fits
    while blocks and size(blocks) > budget:
        sentences = split_sentences(" ".join(texts[-1].split()))
        if len(sentences) > 1:
            texts[-1] = " ".join(sentences[:-1])
            blocks[-1] = _doc_block(len(blocks), sources[-1], texts[-1])
            truncated = True
        else:
            blocks.pop()
            ids.pop()
            texts.pop()
            sources.pop()
    text = _assemble(instructions, examples, blocks, question, history)
    return Prompt(text=text, question=question, citations=tuple(ids),
                  tokens=count_tokens([text])[0], dropped_duplicates=dropped,
                  truncated=truncated, passages=tuple(texts))


def parse_prompt(text: str) -> tuple[str, list[tuple[int, str, str]]]:
    """(question, [(n, source, passage)]) back from a prompt made by :func:`build_prompt`."""
    # the question block is the last one: passages cannot fake it (they sit before it)
    at = text.rfind("\n\nQuestion: ")
    if at < 0 or not text.endswith("\nAnswer:"):
        raise InvalidInput("not a dask-rag prompt: no 'Question: ... Answer:' block")
    question = text[at + len("\n\nQuestion: "):-len("\nAnswer:")]
    docs = [(int(n), html.unescape(src), body.replace("&lt;doc", "<doc").replace(
        "&lt;/doc", "</doc")) for n, src, body in _DOC_RE.findall(text[:at])]
    return question.strip(), docs
