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

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from dask_rag.errors import CorruptIndex, IndexNotFound, InvalidInput
from dask_rag.index.layout import MANIFEST, shard_file_names
from dask_rag.index.objstore import (
    ObjectStoreDir,
    bytes_checksum,
    cache_root,
    file_checksum,
    is_url,
    local_location,
)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "RECORD_COLUMNS",
    "atomic_write_bytes",
    "atomic_write_json",
    "bytes_checksum",
    "commit_manifest",
    "delete_files",
    "file_checksum",
    "is_url",
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
    "validate_manifest",
    "write_records",
    "write_shard_files",
]

FORMAT_VERSION = 1
RECORD_COLUMNS = ("id", "text", "source", "metadata", "doc_hash")


def new_index_uuid() -> str:
    return uuid.uuid4().hex


def _fsync_dir(path: Path) -> None:
    # make the rename itself durable; not supported on every platform / filesystem
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


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

_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "index_uuid": str,
    "dim": int,
    "metric": str,
    "factory": str,
    "spec": dict,
    "routing": dict,
    "n_shards": int,
    "shards": list,
    "quantizer": (dict, type(None)),
    "generation": int,
    "wal_seq": int,
    "created_at": (int, float),
}
_SHARD_REQUIRED: dict[str, type] = {
    "file": str,
    "meta": str,
    "count": int,
    "bytes": int,
    "checksum": str,
    "meta_checksum": str,
}


def validate_manifest(data: Any, where: str) -> dict[str, Any]:
    """Check a parsed manifest against the format (types, counts, version); return it."""
    if not isinstance(data, dict):
        raise CorruptIndex(f"{where}: manifest must be a JSON object")
    for key, typ in _REQUIRED.items():
        if key not in data:
            raise CorruptIndex(f"{where}: manifest is missing field {key!r}")
        if not isinstance(data[key], typ) or isinstance(data[key], bool):
            raise CorruptIndex(f"{where}: manifest field {key!r} has the wrong type")
    if data["format_version"] != FORMAT_VERSION:
        raise CorruptIndex(
            f"{where}: format_version {data['format_version']} is not supported "
            f"(this dask-rag reads version {FORMAT_VERSION})"
        )
    if data["dim"] <= 0:
        raise CorruptIndex(f"{where}: dim must be positive")
    if data["metric"] not in ("ip", "l2"):
        raise CorruptIndex(f"{where}: metric {data['metric']!r} is not 'ip' or 'l2'")
    if data["n_shards"] != len(data["shards"]) or data["n_shards"] < 1:
        raise CorruptIndex(f"{where}: n_shards does not match the shard list")
    for i, shard in enumerate(data["shards"]):
        if not isinstance(shard, dict):
            raise CorruptIndex(f"{where}: shard entry {i} is not an object")
        for key, typ in _SHARD_REQUIRED.items():
            if not isinstance(shard.get(key), typ):
                raise CorruptIndex(f"{where}: shard entry {i} field {key!r} is missing or invalid")
    if data["routing"].get("sharding") not in ("ivf", "hash", "range"):
        raise CorruptIndex(f"{where}: routing.sharding is invalid")
    return data


def location_str(location: str | os.PathLike[str]) -> str:
    """The canonical string of an index location: a URL as given (no trailing slash), a
    local path (or ``file://`` URL) made absolute."""
    if is_url(location):
        return str(location).rstrip("/")
    return str(Path(local_location(location)).resolve())


def read_manifest(index_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``DIR/manifest.json`` (``DIR`` a directory or an object-store URL);
    IndexNotFound / CorruptIndex / StorageUnavailable name the problem."""
    if is_url(index_dir):
        remote = ObjectStoreDir(str(index_dir))
        raw = remote.read(MANIFEST)
        if raw is None:
            remote.check_reachable()  # a missing bucket or refused credentials say so
            raise IndexNotFound(f"{remote.url!r} is not a dask-rag index (no {MANIFEST})")
        return parse_manifest(raw, f"{remote.url}/{MANIFEST}")
    root = Path(local_location(index_dir))
    if not root.exists():
        raise IndexNotFound(f"index directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise IndexNotFound(f"{str(root)!r} is not a directory")
    path = root / MANIFEST
    if not path.exists():
        raise IndexNotFound(f"{str(root)!r} is not a dask-rag index (no {MANIFEST})")
    return parse_manifest(path.read_bytes(), str(path))


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptIndex(f"{where}: manifest is not valid JSON ({exc})") from None
    return validate_manifest(data, where)


def commit_manifest(location: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    """Replace the manifest atomically: the commit point of every build, save and export
    (a rename on a filesystem, one PUT on an object store)."""
    data = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
    if is_url(location):
        ObjectStoreDir(str(location)).write(MANIFEST, data)
    else:
        atomic_write_bytes(Path(local_location(location)) / MANIFEST, data)


def put_file(location: str | os.PathLike[str], rel: str, data: bytes) -> None:
    """Write one file of an index (atomically) at ``location``."""
    if is_url(location):
        ObjectStoreDir(str(location)).write(rel, data)
    else:
        atomic_write_bytes(Path(local_location(location)) / rel, data)


def list_files(location: str | os.PathLike[str], sub: str) -> list[str]:
    """Index-relative names of the entries directly under ``sub`` (``shards``, ``wal``)."""
    if is_url(location):
        return ObjectStoreDir(str(location)).listdir(sub)
    d = Path(local_location(location)) / sub
    return sorted(f"{sub}/{p.name}".lstrip("/") for p in d.iterdir()) if d.is_dir() else []


def delete_files(location: str | os.PathLike[str], rels: list[str]) -> None:
    """Delete index files (or BM25 directories) that no committed manifest names."""
    if is_url(location):
        ObjectStoreDir(str(location)).delete(rels)
        return
    root = Path(local_location(location))
    for rel in rels:
        p = root / rel
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def local_index_dir(location: str | os.PathLike[str], manifest: dict[str, Any], *,
                    shard_no: int | None = None, quantizer: bool = False,
                    wal: bool = False) -> Path:
    """A local directory to read the named parts of an index from: the directory itself, or
    for a URL this process's cached copy of just those parts (one shard's files, the
    quantizer, the write-ahead log after the manifest's ``wal_seq``)."""
    if not is_url(location):
        return Path(local_location(location))
    files: dict[str, str | None] = {}
    if shard_no is not None:
        entry = manifest["shards"][shard_no]
        files[entry["file"]] = entry["checksum"]
        files[entry["meta"]] = entry["meta_checksum"]
        if entry.get("refine_file"):
            files[entry["refine_file"]] = entry.get("refine_checksum")
        if entry.get("bm25"):
            files[entry["bm25"]] = None
    if quantizer and manifest.get("quantizer"):
        files[manifest["quantizer"]["file"]] = manifest["quantizer"].get("checksum")
    for rel in files:  # the same refusal as resolve_index_file, before anything is fetched
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CorruptIndex(f"{location}/{MANIFEST}: file name {rel!r} points outside the "
                               "index")
    return ObjectStoreDir(str(location)).mirror(str(manifest["index_uuid"]), files,
                                                int(manifest["wal_seq"]) if wal else None)


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
def check_fresh_target(path: str | os.PathLike[str]) -> bool:
    """Refuse to write an index into a non-empty directory (or URL prefix) that is not a
    dask-rag index; for a URL, first check that the store is reachable at all.  Returns
    whether an index (a manifest, valid or not) is already there, to replace or update."""
    if is_url(path):
        remote = ObjectStoreDir(str(path))
        remote.check_reachable()
        present = remote.exists(MANIFEST)
        if not present and remote.listdir(""):
            raise InvalidInput(f"{remote.url!r} holds objects but no dask-rag index; refusing "
                               "to write into it")
        return present
    path = Path(local_location(path))
    if path.exists() and not path.is_dir():
        raise InvalidInput(f"index path {str(path)!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / MANIFEST).exists():
        raise InvalidInput(
            f"index path {str(path)!r} is a non-empty directory that is not a dask-rag index; "
            "refusing to write into it"
        )
    return (path / MANIFEST).exists()


def recover_interrupted_swap(path: Path) -> None:
    """Finish a directory swap that was interrupted between its two renames.

    Replacing an index directory renames the old one aside, then the new one into place; if
    the process died in between, ``path`` is missing and the old index sits beside it.  Put it
    back, so that the previous index stays loadable.
    """
    if path.exists():
        return
    candidates = sorted(path.parent.glob(f".{path.name}.old-*"))
    for old in candidates:
        if (old / MANIFEST).is_file():
            old.rename(path)
            return


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


def write_shard_files(index_dir: str | os.PathLike[str], shard_no: int, generation: int,
                      index_uuid: str, index: Any, records: Any, refine: Any | None,
                      sparse: Any | None = None) -> dict[str, Any]:
    """Write a shard's files (faiss, records, refine store, BM25) under ``index_dir`` and
    return its manifest entry.  For a URL they are written to a private temporary directory
    of this process, uploaded, then removed: a worker never needs a shared filesystem."""
    if is_url(index_dir):
        cache = cache_root()
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="upload-", dir=cache))
        try:
            entry = write_shard_files(tmp, shard_no, generation, index_uuid, index, records,
                                      refine, sparse)
            ObjectStoreDir(str(index_dir)).upload_tree(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return entry
    index_dir = Path(local_location(index_dir))
    return _write_shard_files_local(index_dir, shard_no, generation, index_uuid, index,
                                    records, refine, sparse)


def _write_shard_files_local(index_dir: Path, shard_no: int, generation: int, index_uuid: str,
                             index: Any, records: Any, refine: Any | None,
                             sparse: Any | None) -> dict[str, Any]:
    import faiss

    faiss_name, meta_name, refine_name, bm25_name = shard_file_names(shard_no, generation)
    data = faiss.serialize_index(index).tobytes()
    atomic_write_bytes(index_dir / faiss_name, data)
    write_records(index_dir / meta_name, records, index_uuid, shard_no)
    entry: dict[str, Any] = {
        "file": faiss_name,
        "meta": meta_name,
        "count": int(index.ntotal),
        "bytes": len(data),
        "checksum": file_checksum(index_dir / faiss_name),
        "meta_checksum": file_checksum(index_dir / meta_name),
    }
    if refine is not None:
        rdata = faiss.serialize_index(refine).tobytes()
        atomic_write_bytes(index_dir / refine_name, rdata)
        entry["refine_file"] = refine_name
        entry["refine_checksum"] = file_checksum(index_dir / refine_name)
    if sparse is not None:
        # derived from the records: no checksum; an unreadable one is rebuilt at load
        sparse.save(index_dir / bm25_name)
        entry["bm25"] = bm25_name
    return entry


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
