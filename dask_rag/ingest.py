"""Ingestion: files (or documents) → chunks → embeddings on workers → a sharded index on disk.

The Dask pipeline:

1. **read + chunk** in parallel on the workers (one task per group of files / documents); a
   task skips documents whose content hash the index already holds, so re-ingesting unchanged
   files costs one read and no embedding;
2. **embed** each group's chunks on the workers as soon as it is chunked (micro-batches of
   ``embed_batch`` texts; the model is loaded once per worker), with a progress bar;
3. **build** (first run): train the coarse quantizer on a sample, build and write the shards in
   parallel, write the manifest last — or **update** (later runs): remove the chunks of deleted
   and changed documents, add the new ones, and save atomically.

Nothing is written before every file has been read and chunked without error, so bad input
(an unreadable or binary file, an invalid JSONL line, an unknown model path) leaves an existing
index untouched.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from distributed import Client, as_completed

from dask_rag.cluster.plugins import ensure_model_cache
from dask_rag.config import ChunkConfig, EmbedConfig, IndexSpec
from dask_rag.corpus.chunking import Chunk, chunk_documents
from dask_rag.corpus.loaders import Document, discover_files, load_file
from dask_rag.embed.encoder import recorded_config, resolve_model_path
from dask_rag.embed.service import embed_texts_task, encoder_info_task, worker_encoder
from dask_rag.errors import InvalidInput
from dask_rag.index import store
from dask_rag.index.distributed import DistributedIndex

__all__ = ["IngestReport", "auto_spec", "ingest"]


@dataclass
class IngestReport:
    """What an ingestion run did."""

    index_dir: str
    documents: int = 0
    new_documents: int = 0
    changed_documents: int = 0
    deleted_documents: int = 0
    unchanged_documents: int = 0
    chunks_embedded: int = 0
    chunks_removed: int = 0
    chunks_total: int = 0
    built: bool = False
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{self.documents} documents ({self.new_documents} new, "
                f"{self.changed_documents} changed, {self.deleted_documents} deleted, "
                f"{self.unchanged_documents} unchanged); {self.chunks_embedded} chunks embedded, "
                f"{self.chunks_removed} removed, {self.chunks_total} in the index")


def auto_spec(n_chunks: int, n_workers: int, metric: Literal["ip", "l2"] = "ip") -> IndexSpec:
    """Exact search while it is cheap, IVF beyond ~50k chunks; one shard per worker."""
    shards = max(1, n_workers)
    if n_chunks < 50_000:
        return IndexSpec(factory="Flat", n_shards=shards, metric=metric)
    nlist = int(min(65_536, 2 ** round(math.log2(4 * math.sqrt(n_chunks)))))
    return IndexSpec(factory=f"IVF{nlist},Flat", n_shards=shards, metric=metric,
                     nprobe=max(16, nlist // 64))


# ------------------------------------------------------------------------------------------------
# tasks
# ------------------------------------------------------------------------------------------------


def read_and_chunk_task(embed: EmbedConfig, chunk: ChunkConfig, items: list[Any],
                        known: dict[str, str]) -> tuple[list[tuple[str, str]], list[Chunk]]:
    """Read (paths) or take (Documents) a group of items; chunk the ones not already indexed.

    Returns ``(seen, chunks)``: every document's (source, doc_hash), and the chunks of the
    documents whose hash differs from ``known``.
    """
    docs: list[Document] = []
    for item in items:
        docs.extend(load_file(item) if isinstance(item, (str, os.PathLike)) else [item])
    seen = [(d.source, d.doc_hash) for d in docs]
    todo = [d for d in docs if known.get(d.source) != d.doc_hash]
    chunks = chunk_documents(todo, worker_encoder(embed).count_tokens, chunk) if todo else []
    return seen, chunks


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------


def _groups(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def ingest(client: Client, sources: Sequence[str | os.PathLike[str] | Document],
           index_dir: str | os.PathLike[str], *, spec: IndexSpec | None = None,
           embed: EmbedConfig | None = None, chunk: ChunkConfig | None = None,
           progress: bool = True, embed_batch: int = 128, group_size: int | None = None
           ) -> IngestReport:
    """Ingest files / directories (or Documents) into the index at ``index_dir``.

    The first run builds the index; later runs on the same sources embed only new or changed
    documents and remove the chunks of documents that disappeared.
    """
    t_start = time.perf_counter()
    index_dir = Path(index_dir).resolve()
    report = IngestReport(index_dir=str(index_dir))
    requested_embed = embed
    embed = embed or EmbedConfig()
    chunk = chunk or ChunkConfig()
    items: list[Any]
    if sources and all(isinstance(s, Document) for s in sources):
        items = list(sources)
    elif any(isinstance(s, Document) for s in sources):
        raise InvalidInput("pass either paths or Documents to ingest, not a mix")
    else:
        if not sources:
            raise InvalidInput("nothing to ingest: no paths given")
        items = [str(p) for p in discover_files(sources)]  # type: ignore[arg-type]
    resolve_model_path(embed.model)  # ModelLoadError now, before any task runs
    store.check_fresh_target(index_dir)
    ensure_model_cache(client)

    # what the index already holds
    existing: DistributedIndex | None = None
    known_docs: dict[str, tuple[str | None, list[int]]] = {}
    if (index_dir / store.MANIFEST).exists():
        existing = DistributedIndex.load(client, index_dir)
        embed = _index_encoder(existing, requested_embed)
        for cid, source, dh in existing.doc_index():
            entry = known_docs.setdefault(source or "", (dh, []))
            entry[1].append(cid)
    known_hash = {src: dh for src, (dh, _) in known_docs.items() if dh is not None}
    report.seconds["prepare"] = time.perf_counter() - t_start

    # read + chunk, then embed each group as soon as it is chunked
    t0 = time.perf_counter()
    size = group_size or (16 if items and not isinstance(items[0], Document) else 64)
    by_origin: dict[str, dict[str, str]] = {}
    for src, dh in known_hash.items():
        by_origin.setdefault(_origin(src), {})[src] = dh
    chunk_futs = [client.submit(read_and_chunk_task, embed, chunk, g,
                                {src: dh for item in g
                                 for src, dh in by_origin.get(_origin_of(item), {}).items()},
                                pure=False) for g in _groups(items, size)]
    seen: list[tuple[str, str]] = []
    chunks: list[Chunk] = []
    embed_futs: list[tuple[int, Any]] = []
    bar = _progress(progress, "embedding chunks")
    try:
        for fut in as_completed(chunk_futs):
            group_seen, group_chunks = fut.result()
            seen.extend(group_seen)
            for i in range(0, len(group_chunks), embed_batch):
                part = group_chunks[i:i + embed_batch]
                embed_futs.append((len(chunks) + i, client.submit(
                    embed_texts_task, embed, [c.text for c in part], pure=False)))
            chunks.extend(group_chunks)
            if bar is not None:
                bar.total = len(chunks)
                bar.refresh()
        vectors = np.zeros((len(chunks), 0), dtype=np.float32)
        if chunks:
            fut_to_start = {f.key: start for start, f in embed_futs}
            parts: dict[int, np.ndarray] = {}
            for fut in as_completed([f for _, f in embed_futs]):
                block = fut.result()
                parts[fut_to_start[fut.key]] = block
                if bar is not None:
                    bar.update(len(block))
            vectors = np.concatenate([parts[s] for s in sorted(parts)])
    finally:
        if bar is not None:
            bar.close()
    report.seconds["chunk_and_embed"] = time.perf_counter() - t0

    # diff against the index
    current = dict(seen)
    if len(current) != len(seen):
        raise InvalidInput("two documents share a source name; sources must be unique")
    report.documents = len(current)
    deleted = [s for s in known_docs if s not in current]
    changed = [s for s in current if s in known_docs and known_hash.get(s) != current[s]]
    report.new_documents = sum(1 for s in current if s not in known_docs)
    report.changed_documents = len(changed)
    report.deleted_documents = len(deleted)
    report.unchanged_documents = report.documents - report.new_documents - len(changed)
    chunks, vectors = _dedupe(chunks, vectors)
    report.chunks_embedded = len(chunks)

    t0 = time.perf_counter()
    if existing is None:
        if not chunks:
            raise InvalidInput("the sources contain no text to index")
        n_workers = len(client.scheduler_info(n_workers=-1)["workers"])
        spec = spec or auto_spec(len(chunks), n_workers)
        info = client.submit(encoder_info_task, embed, pure=False).result()
        index = DistributedIndex.build(
            client, vectors, np.array([c.id for c in chunks], dtype=np.int64), spec,
            path=index_dir, records=[c.record() for c in chunks], progress=progress,
            embed={**info, "chunk": {"max_tokens": chunk.max_tokens,
                                     "overlap_tokens": chunk.overlap_tokens}})
        report.built = True
    else:
        index = existing
        stale = np.array([cid for s in deleted + changed for cid in known_docs[s][1]],
                         dtype=np.int64)
        # one acknowledged write: a crash leaves the old content or the new, never a mix
        if chunks:
            before = index.ntotal
            index.add(vectors, np.array([c.id for c in chunks], dtype=np.int64),
                      [c.record() for c in chunks], replace=stale if stale.size else None)
            report.chunks_removed = before + len(chunks) - index.ntotal
        elif stale.size:
            report.chunks_removed = index.remove(stale)
        if stale.size or chunks:
            index.save()
    report.chunks_total = index.ntotal
    index.close()
    report.seconds["index"] = time.perf_counter() - t0
    report.seconds["total"] = time.perf_counter() - t_start
    return report


def _origin(source: str) -> str:
    """The file a source came from: JSONL records are ``FILE#id`` or ``FILE:line``."""
    if "#" in source:
        return source.split("#", 1)[0]
    head, sep, tail = source.rpartition(":")
    if sep and tail.isdigit() and head.endswith(".jsonl"):
        return head
    return source


def _origin_of(item: Any) -> str:
    return item.source if isinstance(item, Document) else str(item)


def _dedupe(chunks: list[Chunk], vectors: np.ndarray) -> tuple[list[Chunk], np.ndarray]:
    keep: dict[int, int] = {}
    for i, c in enumerate(chunks):
        keep.setdefault(c.id, i)
    if len(keep) == len(chunks):
        return chunks, vectors
    rows = sorted(keep.values())
    return [chunks[i] for i in rows], vectors[rows]


def _index_encoder(index: DistributedIndex, requested: EmbedConfig | None) -> EmbedConfig:
    """The encoder new chunks of an existing index are embedded with: the one its manifest
    records (a different model is refused; other differences are logged)."""
    recorded = index.manifest.get("embed") or {}
    if not recorded:
        index.close()
        raise InvalidInput(f"{index.path} was not built by ingestion (no encoder recorded); "
                           "ingest into a new index directory")
    if requested is not None and recorded.get("model") != requested.model:
        index.close()
        raise InvalidInput(
            f"{index.path} was built with encoder {recorded.get('model')!r}, not "
            f"{requested.model!r}; use the same model or a new index directory")
    if int(recorded.get("dim", -1)) != index.dim:
        index.close()
        raise InvalidInput(f"{index.path}: recorded encoder dimension does not match the index")
    return recorded_config(recorded, requested)


def _progress(enabled: bool, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=0, desc=desc, unit="chunk")
