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

A file that cannot be read (corrupt, truncated, over a size limit, not UTF-8) is reported with
its reason and skipped; the others are ingested, and the report lists every skipped file
(``dask-rag ingest`` then exits with status 3: a partial success).  A skipped file keeps what
the index held for it, so fixing it and re-running picks it up incrementally.  Nothing is
written before every group has been read and chunked, so other failures (a duplicate source,
an unknown model path) leave an existing index untouched.

DataFrames (:func:`ingest_dataframe`, ``dask-rag ingest data.parquet --text-column ...``) go
the same way with one partition per read task, run on the worker that holds the partition.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from distributed import Client, as_completed

from dask_rag.cluster.plugins import ensure_model_cache
from dask_rag.config import ChunkConfig, EmbedConfig, IndexSpec, Metric
from dask_rag.corpus.chunking import Chunk, chunk_documents
from dask_rag.corpus.frames import FrameColumns, frame_documents
from dask_rag.corpus.loaders import Document, discover_files, load_file
from dask_rag.embed.encoder import recorded_config, resolve_model_path
from dask_rag.embed.service import (
    embed_texts_task,
    encoder_info_task,
    worker_encoder,
)
from dask_rag.errors import InvalidInput
from dask_rag.index import store
from dask_rag.index.distributed import DistributedIndex
from dask_rag.index.location import open_location

__all__ = ["BUILD_BATCH", "IngestReport", "auto_spec", "ingest", "ingest_dataframe"]

#: a first build of more chunks than this gathers their vectors a batch at a time (bounded
#: client memory: 100k rows of a Parquet file ingest in under 500 MB of client RSS)
BUILD_BATCH = 8_192


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
    #: (file, reason) of every file that could not be read and was skipped
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        out = (f"{self.documents} documents ({self.new_documents} new, "
               f"{self.changed_documents} changed, {self.deleted_documents} deleted, "
               f"{self.unchanged_documents} unchanged); {self.chunks_embedded} chunks embedded, "
               f"{self.chunks_removed} removed, {self.chunks_total} in the index")
        if self.skipped:
            out += f"\n{len(self.skipped)} file(s) skipped:" + "".join(
                f"\n  {name}: {reason}" for name, reason in self.skipped)
        return out


def auto_spec(n_chunks: int, n_workers: int, metric: Metric = "ip") -> IndexSpec:
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
                        known: dict[str, str], frame: FrameColumns | None = None
                        ) -> tuple[list[tuple[str, str]], list[Chunk], list[tuple[str, str]]]:
    """Read (paths), take (Documents) or convert (DataFrame partitions, with ``frame``) a
    group of items; chunk the documents not already indexed.

    Returns ``(seen, chunks, skipped)``: every document's (source, doc_hash), the chunks of the
    documents whose hash differs from ``known``, and (file, reason) of unreadable files.
    """
    docs: list[Document] = []
    skipped: list[tuple[str, str]] = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            try:
                docs.extend(load_file(item))
            except InvalidInput as exc:
                skipped.append((str(item), str(exc)))
        elif frame is not None:
            docs.extend(frame_documents(item, frame))
        else:
            docs.append(item)
    seen = [(d.source, d.doc_hash) for d in docs]
    todo = [d for d in docs if known.get(d.source) != d.doc_hash]
    chunks = (chunk_documents(todo, worker_encoder(embed, check=False).count_tokens, chunk)
              if todo else [])
    return seen, chunks, skipped


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
    items: list[Any]
    if sources and all(isinstance(s, Document) for s in sources):
        items = list(sources)
    elif any(isinstance(s, Document) for s in sources):
        raise InvalidInput("pass either paths or Documents to ingest, not a mix")
    else:
        if not sources:
            raise InvalidInput("nothing to ingest: no paths given")
        items = [str(p) for p in discover_files(sources)]  # type: ignore[arg-type]
    size = group_size or (16 if items and not isinstance(items[0], Document) else 64)
    return _ingest(client, _groups(items, size), index_dir, spec=spec, embed=embed,
                   chunk=chunk, progress=progress, embed_batch=embed_batch)


def ingest_dataframe(client: Client, df: Any, index_dir: str | os.PathLike[str], *,
                     text: str, id: str, metadata: Sequence[str] = (),
                     spec: IndexSpec | None = None, embed: EmbedConfig | None = None,
                     chunk: ChunkConfig | None = None, progress: bool = True,
                     embed_batch: int = 128, rows_per_partition: int = 5_000
                     ) -> IngestReport:
    """Ingest the rows of a dask or pandas DataFrame: column ``text`` is the text, ``id`` the
    document id (its source; re-runs replace changed rows and drop missing ones), and the
    ``metadata`` columns become filterable metadata.

    A dask DataFrame's partitions are computed on the workers and each is read and chunked by a
    task on the worker holding it; a pandas DataFrame is split into partitions of
    ``rows_per_partition`` rows first.
    """
    import dask.dataframe as dd

    cols = FrameColumns(text=text, id=id, metadata=tuple(metadata))
    if not isinstance(df, dd.DataFrame):
        if not hasattr(df, "columns") or not hasattr(df, "iloc"):
            raise InvalidInput(f"expected a pandas or dask DataFrame, got {type(df).__name__}")
        df = dd.from_pandas(df, npartitions=max(1, math.ceil(len(df) / rows_per_partition)))
    cols.check(df.columns)
    parts = client.compute(df[[text, id, *cols.metadata]].to_delayed())
    return _ingest(client, [[p] for p in parts], index_dir, spec=spec, embed=embed,
                   chunk=chunk, progress=progress, embed_batch=embed_batch, frame=cols)


def _ingest(client: Client, groups: list[list[Any]], index_dir: str | os.PathLike[str], *,
            spec: IndexSpec | None, embed: EmbedConfig | None, chunk: ChunkConfig | None,
            progress: bool, embed_batch: int, frame: FrameColumns | None = None
            ) -> IngestReport:
    t_start = time.perf_counter()
    index_dir = store.location_str(index_dir)  # a directory or an object-store URL
    report = IngestReport(index_dir=index_dir)
    requested_embed = embed
    embed = embed or EmbedConfig()
    chunk = chunk or ChunkConfig()
    resolve_model_path(embed.model)  # ModelLoadError now, before any task runs
    has_index = store.check_fresh_target(index_dir)
    ensure_model_cache(client)

    # what the index already holds
    existing: DistributedIndex | None = None
    known_docs: dict[str, tuple[str | None, list[int]]] = {}
    if has_index:
        existing = DistributedIndex.load(client, index_dir)
        embed = _index_encoder(existing, requested_embed)
        for cid, source, dh in existing.doc_index():
            entry = known_docs.setdefault(source or "", (dh, []))
            entry[1].append(cid)
    known_hash = {src: dh for src, (dh, _) in known_docs.items() if dh is not None}
    report.seconds["prepare"] = time.perf_counter() - t_start

    # read + chunk, then embed each group as soon as it is chunked
    t0 = time.perf_counter()
    by_origin: dict[str, dict[str, str]] = {}
    for src, dh in known_hash.items():
        by_origin.setdefault(_origin(src), {})[src] = dh
    if frame is not None:  # row ids are only known on the workers: every task gets them all
        [known_all] = client.scatter([known_hash], broadcast=True, hash=False)
        chunk_futs = [client.submit(read_and_chunk_task, embed, chunk, g, known_all, frame,
                                    pure=False) for g in groups]
    else:
        chunk_futs = [client.submit(read_and_chunk_task, embed, chunk, g,
                                    {src: dh for item in g for src, dh in
                                     by_origin.get(_origin_of(item), {}).items()},
                                    pure=False) for g in groups]
    seen: list[tuple[str, str]] = []
    group_of = {f.key: g for g, f in enumerate(chunk_futs)}
    by_group: dict[int, list[Chunk]] = {}
    group_embeds: dict[int, list[Any]] = {}
    n_chunks = 0
    bar = _progress(progress, "embedding chunks")
    try:
        for fut in as_completed(chunk_futs):
            group_seen, group_chunks, group_skipped = fut.result()
            g = group_of[fut.key]
            fut.release()
            seen.extend(group_seen)
            for name, reason in group_skipped:
                # a skipped file keeps what the index holds for it (neither changed nor
                # deleted): fixed and re-run, it is picked up as changed
                report.skipped.append((name, reason))
                seen.extend(by_origin.get(_origin(name), {}).items())
            by_group[g] = group_chunks
            group_embeds[g] = [client.submit(embed_texts_task, embed,
                                             [c.text for c in group_chunks[i:i + embed_batch]],
                                             pure=False)
                               for i in range(0, len(group_chunks), embed_batch)]
            n_chunks += len(group_chunks)
            if bar is not None:
                bar.total = n_chunks
                bar.refresh()
        # in the order of the sources, whatever order the tasks finished in
        chunks = [c for g in sorted(by_group) for c in by_group[g]]
        del by_group
        embed_futs = [f for g in sorted(group_embeds) for f in group_embeds[g]]
        del group_embeds
        keep = _unique_rows(chunks)
        report.chunks_embedded = int(keep.sum())
        batched = None
        if existing is not None or report.chunks_embedded <= BUILD_BATCH:
            vectors = _take_rows(_blocks(embed_futs, bar), keep)
            if not keep.all():
                chunks = [c for c, k in zip(chunks, keep, strict=True) if k]
        else:  # a large first build: vectors come to the client a batch at a time
            vectors = np.zeros((0, 0), np.float32)
            if bar is not None:
                bar.close()
                bar = _progress(progress, "embedding and building")
                bar.total = len(chunks)
            batched = (_blocks(embed_futs, bar), keep)
    except BaseException:
        if bar is not None:
            bar.close()
        raise
    if batched is None and bar is not None:
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

    t0 = time.perf_counter()
    report.skipped.sort()
    if existing is None:
        if not chunks:
            raise InvalidInput("the sources contain no text to index" + (
                f" ({len(report.skipped)} file(s) skipped: "
                f"{'; '.join(r for _, r in report.skipped[:3])})" if report.skipped else ""))
        n_workers = len(client.scheduler_info(n_workers=-1)["workers"])
        spec = spec or auto_spec(report.chunks_embedded, n_workers)
        # with the vectors of a few fixed texts: every worker that serves the index checks
        # its encoder against them (another CPU kind, another model copy: EncoderCanaries)
        info = client.submit(encoder_info_task, embed, True, pure=False).result()
        recorded = {**info, "chunk": {"max_tokens": chunk.max_tokens,
                                      "overlap_tokens": chunk.overlap_tokens}}
        if batched is None:
            index = DistributedIndex.build(
                client, vectors, np.array([c.id for c in chunks], dtype=np.int64), spec,
                path=index_dir, records=[c.record() for c in chunks], progress=progress,
                embed=recorded)
        else:
            try:
                index = _build_in_batches(client, chunks, *batched, spec, index_dir, recorded,
                                          progress)
            finally:
                if bar is not None:
                    bar.close()
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


def _unique_rows(chunks: list[Chunk]) -> npt.NDArray[np.bool_]:
    """A mask of the first chunk of each id (a chunk id is a hash of source and text)."""
    first: dict[int, int] = {}
    for i, c in enumerate(chunks):
        first.setdefault(c.id, i)
    keep = np.zeros(len(chunks), dtype=bool)
    keep[list(first.values())] = True
    return keep


def _blocks(futures: list[Any], bar: Any) -> Iterator[np.ndarray]:
    """The embedded blocks, in order, one gathered at a time (and released on the workers)."""
    for fut in futures:
        block: np.ndarray = fut.result()
        fut.release()
        if bar is not None:
            bar.update(len(block))
        yield block


def _kept(blocks: Iterator[np.ndarray], keep: npt.NDArray[np.bool_]
          ) -> Iterator[tuple[npt.NDArray[np.int64], np.ndarray]]:
    """(positions, vectors) of each block's kept rows, the blocks laid end to end."""
    start = 0
    for block in blocks:
        m = keep[start:start + len(block)]
        yield np.flatnonzero(m) + start, block[m]
        start += len(block)


def _take_rows(blocks: Iterator[np.ndarray], keep: npt.NDArray[np.bool_]) -> np.ndarray:
    """The kept rows of the blocks, in one array allocated once (no concatenated copy)."""
    out: np.ndarray | None = None
    filled = 0
    for _, vecs in _kept(blocks, keep):
        if out is None:
            out = np.empty((int(keep.sum()), vecs.shape[1]), dtype=np.float32)
        out[filled:filled + len(vecs)] = vecs
        filled += len(vecs)
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def _build_in_batches(client: Client, chunks: list[Chunk], blocks: Iterator[np.ndarray],
                      keep: npt.NDArray[np.bool_], spec: IndexSpec, index_dir: str,
                      recorded: dict[str, Any], progress: bool) -> DistributedIndex:
    """A large first build with bounded client memory: the index is built from the first
    batch (the training sample of an IVF factory), the rest is added a batch at a time, then
    compacted — all in a staging directory swapped into place at the end, so a crash leaves
    no partial index behind.  An object store has no rename: there the index is built at its
    URL, so a crash leaves the batches acknowledged so far, and re-running the same ingest
    adds the rest (ingestion skips documents already indexed)."""
    first = max(BUILD_BATCH, spec.train_size if spec.info.kind == "ivf" else 0,
                39 * spec.info.nlist)
    remote = not open_location(index_dir).can_rename  # an object store
    staging = Path(tempfile.mkdtemp()) if remote else store.staging_dir(Path(index_dir))
    target: str | Path = index_dir if remote else staging / "index"
    index: DistributedIndex | None = None
    pending_rows: list[int] = []
    pending_vecs: list[np.ndarray] = []

    def flush() -> None:
        nonlocal index
        xb = np.concatenate(pending_vecs)
        ids = np.array([chunks[i].id for i in pending_rows], dtype=np.int64)
        records = [chunks[i].record() for i in pending_rows]
        if index is None:
            index = DistributedIndex.build(client, xb, ids, spec, path=target,
                                           records=records, progress=False, embed=recorded)
        else:
            index.add(xb, ids, records)
        pending_rows.clear()
        pending_vecs.clear()

    try:
        for rows, vecs in _kept(blocks, keep):
            pending_rows.extend(rows.tolist())
            pending_vecs.append(vecs)
            if len(pending_rows) >= (first if index is None else BUILD_BATCH):
                flush()
        if pending_rows:
            flush()
        assert index is not None
        index.save()
        index.close()
        if not remote:
            store.swap_into_place(staging / "index", Path(index_dir))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return DistributedIndex.load(client, index_dir, progress=progress)


def _index_encoder(index: DistributedIndex, requested: EmbedConfig | None) -> EmbedConfig:
    """The encoder new chunks of an existing index are embedded with: the one its manifest
    records (a different model is refused; other differences are logged)."""
    recorded = index.manifest.embed or {}
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
