"""The on-disk index format: manifest, quantizer, shard files, write-ahead log.

Layout of an index directory ``DIR/``::

    manifest.json            the commit point (format_version, dim, metric, factory, sharding,
                             n_shards, per-shard files + counts + checksums, embed model, ...)
    quantizer.faiss          trained empty index (coarse quantizer / codec template)
    shards/NNNNN.faiss       one faiss index per shard   (NNNNN.gG.faiss after G re-saves)
    shards/NNNNN.parquet     id, text, source, metadata, doc_hash of the shard's chunks
    wal/SSSSSSSSSSSS.npz     mutations (add / remove) acknowledged since the last save

Crash safety: every file is written to a temporary name and renamed into place; a save writes
*new* file names and commits by atomically replacing ``manifest.json``; files the new manifest
no longer names are deleted only after the commit.  So a crash at any point leaves either the
old or the new index fully loadable.  Mutations are appended to the WAL (atomically, one file per
call) before they are applied in memory, and a shard that is reloaded — after its worker died,
say — replays the WAL, so acknowledged writes survive worker loss.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from dask_rag.errors import CorruptIndex
from dask_rag.index.layout import MANIFEST, shard_file_names
from dask_rag.index.location import Location, atomic_write_bytes, open_location
from dask_rag.index.manifest import FORMAT_VERSION, Manifest, ShardEntry
from dask_rag.index.objstore import (
    bytes_checksum,
    file_checksum,
)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "RECORD_COLUMNS",
    "Manifest",
    "atomic_write_bytes",
    "atomic_write_json",
    "bytes_checksum",
    "commit_manifest",
    "delete_files",
    "file_checksum",
    "list_files",
    "local_index_dir",
    "location_str",
    "new_index_uuid",
    "put_file",
    "read_faiss_file",
    "read_manifest",
    "read_records",
    "resolve_index_file",
    "shard_file_names",
    "staging_dir",
    "swap_into_place",
    "write_records",
    "write_shard_files",
]

RECORD_COLUMNS = ("id", "text", "source", "metadata", "doc_hash")


def new_index_uuid() -> str:
    return uuid.uuid4().hex


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=True).encode("utf-8"))


def resolve_index_file(index_dir: str | os.PathLike[str], relative: str) -> Path:
    """Resolve a manifest-relative file name, refusing anything outside the index directory."""
    root = Path(index_dir).resolve()
    if not isinstance(relative, str) or not relative or Path(relative).is_absolute():
        raise CorruptIndex(f"{root / MANIFEST}: invalid file name {relative!r}")
    candidate = (root / relative).resolve()
    if root not in candidate.parents:
        raise CorruptIndex(f"{root / MANIFEST}: file name {relative!r} points outside the index")
    return candidate


# --------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------

def location_str(location: str | os.PathLike[str] | Location) -> str:
    """The canonical string of an index location: a URL as given (no trailing slash), a
    local path (or ``file://`` URL) made absolute."""
    return open_location(location).url


def read_manifest(index_dir: str | os.PathLike[str] | Location) -> Manifest:
    """Read and validate ``DIR/manifest.json`` (``DIR`` a directory or an object-store URL);
    IndexNotFound / CorruptIndex / StorageUnavailable name the problem."""
    loc = open_location(index_dir)
    raw = loc.read(MANIFEST)
    if raw is None:
        raise loc.missing_index()
    return parse_manifest(raw, loc.name_of(MANIFEST))


def parse_manifest(raw: bytes, where: str) -> Manifest:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptIndex(f"{where}: manifest is not valid JSON ({exc})") from None
    return Manifest.from_json(data, where)


def commit_manifest(location: str | os.PathLike[str] | Location, manifest: Manifest) -> None:
    """Replace the manifest atomically: the commit point of every build, save and export
    (a rename on a filesystem, one PUT on an object store)."""
    data = json.dumps(manifest.to_json(), indent=2, sort_keys=True).encode("utf-8")
    open_location(location).write(MANIFEST, data)


def put_file(location: str | os.PathLike[str] | Location, rel: str, data: bytes) -> None:
    """Write one file of an index (atomically) at ``location``."""
    open_location(location).write(rel, data)


def list_files(location: str | os.PathLike[str] | Location, sub: str) -> list[str]:
    """Index-relative names of the entries directly under ``sub`` (``shards``, ``wal``)."""
    return open_location(location).listdir(sub)


def delete_files(location: str | os.PathLike[str] | Location, rels: list[str]) -> None:
    """Delete index files (or BM25 directories) that no committed manifest names."""
    open_location(location).delete(rels)


def local_index_dir(location: str | os.PathLike[str] | Location, manifest: Manifest, *,
                    shard_no: int | None = None, quantizer: bool = False,
                    wal: bool = False) -> Path:
    """A local directory to read the named parts of an index from: the directory itself, or
    for a URL this process's cached copy of just those parts (one shard's files, the
    quantizer, the write-ahead log after the manifest's ``wal_seq``)."""
    loc = open_location(location)
    files: dict[str, str | None] = {}
    if shard_no is not None:
        files.update(manifest.shards[shard_no].files())
    if quantizer and manifest.quantizer is not None:
        files[manifest.quantizer.file] = manifest.quantizer.checksum
    for rel in files:  # the same refusal as resolve_index_file, before anything is fetched
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CorruptIndex(f"{loc.name_of(MANIFEST)}: file name {rel!r} points outside "
                               "the index")
    return loc.mirror(manifest.index_uuid, files, manifest.wal_seq if wal else None)


# --------------------------------------------------------------------------------------------
# chunk records
# --------------------------------------------------------------------------------------------


def write_records(path: Path, table: Any, index_uuid: str, shard_no: int) -> None:
    """Write a shard's records as Parquet, stamped with the index uuid and shard number."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = dict(table.schema.metadata or {})
    meta[b"dask_rag.index_uuid"] = index_uuid.encode()
    meta[b"dask_rag.shard"] = str(shard_no).encode()
    table = table.replace_schema_metadata(meta)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue().to_pybytes())


def read_records(path: Path, index_uuid: str | None = None, shard_no: int | None = None) -> Any:
    """Read a shard's records, checking that they belong to this index and shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise CorruptIndex(f"{path}: unreadable shard records ({exc})") from None
    missing = [c for c in RECORD_COLUMNS if c not in table.column_names]
    if missing:
        raise CorruptIndex(f"{path}: shard records lack columns {missing}")
    meta = table.schema.metadata or {}
    if index_uuid is not None and meta.get(b"dask_rag.index_uuid", b"").decode() != index_uuid:
        raise CorruptIndex(f"{path}: shard records belong to another index")
    if shard_no is not None and meta.get(b"dask_rag.shard", b"").decode() != str(shard_no):
        raise CorruptIndex(f"{path}: shard records belong to another shard")
    return table.select(list(RECORD_COLUMNS))


# --------------------------------------------------------------------------------------------
def check_fresh_target(path: str | os.PathLike[str] | Location) -> bool:
    """Refuse to write an index into a non-empty directory (or URL prefix) that is not a
    dask-rag index; for a URL, first check that the store is reachable at all.  Returns
    whether an index (a manifest, valid or not) is already there, to replace or update."""
    return open_location(path).check_fresh_target()


def recover_interrupted_swap(path: str | os.PathLike[str] | Location) -> None:
    """Finish a directory swap interrupted between its two renames (see
    :meth:`LocalDir.recover <dask_rag.index.location.LocalDir.recover>`)."""
    open_location(path).recover()


def now() -> float:
    return time.time()


def staging_dir(target: Path) -> Path:
    """A fresh hidden sibling of ``target`` to write a whole index into before it is swapped
    into place (same file system, so the swap is two renames)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))


def swap_into_place(staging: Path, target: Path) -> None:
    """Move a completely written index directory to ``target`` (replacing an old index).

    A crash between the two renames leaves the old index beside ``target``;
    :func:`recover_interrupted_swap` puts it back on the next load.
    """
    if not target.exists():
        staging.rename(target)
        return
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
        staging.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


# shard files
# --------------------------------------------------------------------------------------------


def write_shard_files(index_dir: str | os.PathLike[str] | Location, shard_no: int,
                      generation: int, index_uuid: str, index: Any, records: Any,
                      refine: Any | None, sparse: Any | None = None) -> ShardEntry:
    """Write a shard's files (faiss, records, refine store, BM25) at ``index_dir`` and return
    its manifest entry (for a URL they are written locally, then uploaded: see
    :meth:`~dask_rag.index.objstore.ObjectStoreDir.writable_dir`)."""
    with open_location(index_dir).writable_dir() as local:
        return _write_shard_files_local(local, shard_no, generation, index_uuid, index,
                                        records, refine, sparse)


def _write_shard_files_local(index_dir: Path, shard_no: int, generation: int, index_uuid: str,
                             index: Any, records: Any, refine: Any | None,
                             sparse: Any | None) -> ShardEntry:
    import faiss

    faiss_name, meta_name, refine_name, bm25_name = shard_file_names(shard_no, generation)
    data = faiss.serialize_index(index).tobytes()
    atomic_write_bytes(index_dir / faiss_name, data)
    write_records(index_dir / meta_name, records, index_uuid, shard_no)
    refine_file = refine_checksum = bm25 = None
    if refine is not None:
        rdata = faiss.serialize_index(refine).tobytes()
        atomic_write_bytes(index_dir / refine_name, rdata)
        refine_file, refine_checksum = refine_name, file_checksum(index_dir / refine_name)
    if sparse is not None:
        # derived from the records: no checksum; an unreadable one is rebuilt at load
        sparse.save(index_dir / bm25_name)
        bm25 = bm25_name
    return ShardEntry(file=faiss_name, meta=meta_name, count=int(index.ntotal),
                      bytes=len(data), checksum=file_checksum(index_dir / faiss_name),
                      meta_checksum=file_checksum(index_dir / meta_name),
                      refine_file=refine_file, refine_checksum=refine_checksum, bm25=bm25)


def read_faiss_file(path: Path, expected_checksum: str | None, what: str) -> tuple[Any, int]:
    import faiss

    if not path.is_file():
        raise CorruptIndex(f"{path}: {what} file is missing")
    data = path.read_bytes()
    if expected_checksum is not None and bytes_checksum(data) != expected_checksum:
        raise CorruptIndex(
            f"{path}: {what} checksum mismatch (file truncated, modified, or from another "
            "index)")
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        raise CorruptIndex(f"{path}: not a readable faiss index ({str(exc).splitlines()[0]})"
                           ) from None
    return index, len(data)
