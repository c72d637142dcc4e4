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
import hashlib
import io
import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dask_rag.errors import CorruptIndex, IndexNotFound, InvalidInput

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "RECORD_COLUMNS",
    "WalEntry",
    "append_wal",
    "atomic_write_bytes",
    "atomic_write_json",
    "file_checksum",
    "new_index_uuid",
    "read_manifest",
    "read_records",
    "read_wal",
    "resolve_index_file",
    "validate_manifest",
    "wal_files",
    "write_records",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
QUANTIZER = "quantizer.faiss"
RECORD_COLUMNS = ("id", "text", "source", "metadata", "doc_hash")
_WAL_RE = re.compile(r"^(\d{12})\.npz$")


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


def file_checksum(path: str | os.PathLike[str]) -> str:
    """blake2b-128 of a file's bytes (fast enough to verify shards at every load)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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


def read_manifest(index_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``DIR/manifest.json``; IndexNotFound / CorruptIndex name the problem."""
    root = Path(index_dir)
    if not root.exists():
        raise IndexNotFound(f"index directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise IndexNotFound(f"{str(root)!r} is not a directory")
    path = root / MANIFEST
    if not path.exists():
        raise IndexNotFound(f"{str(root)!r} is not a dask-rag index (no {MANIFEST})")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptIndex(f"{path}: manifest is not valid JSON ({exc})") from None
    return validate_manifest(data, str(path))


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
# write-ahead log
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WalEntry:
    """One acknowledged mutation: ``add`` (ids, vectors, target shards, records) or ``remove``."""

    seq: int
    op: str
    ids: npt.NDArray[np.int64]
    shards: npt.NDArray[np.int32] | None = None
    vectors: npt.NDArray[np.float32] | None = None
    lists: npt.NDArray[np.int64] | None = None
    records_json: bytes | None = None

    def records(self) -> list[dict[str, Any]] | None:
        if self.records_json is None:
            return None
        out: list[dict[str, Any]] = json.loads(self.records_json.decode("utf-8"))
        return out


def wal_files(index_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    wal = Path(index_dir) / "wal"
    if not wal.is_dir():
        return []
    found = []
    for p in wal.iterdir():
        m = _WAL_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def append_wal(index_dir: str | os.PathLike[str], entry: WalEntry) -> None:
    """Durably record a mutation before it is applied anywhere."""
    arrays: dict[str, Any] = {"op": np.frombuffer(entry.op.encode(), dtype=np.uint8),
                              "ids": entry.ids}
    if entry.shards is not None:
        arrays["shards"] = entry.shards
    if entry.vectors is not None:
        arrays["vectors"] = entry.vectors
    if entry.lists is not None:
        arrays["lists"] = entry.lists
    if entry.records_json is not None:
        arrays["records"] = np.frombuffer(entry.records_json, dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(Path(index_dir) / "wal" / f"{entry.seq:012d}.npz", buf.getvalue())


def read_wal(index_dir: str | os.PathLike[str], after_seq: int) -> Iterator[WalEntry]:
    """WAL entries with ``seq > after_seq`` in order."""
    for seq, path in wal_files(index_dir):
        if seq <= after_seq:
            continue
        try:
            with np.load(path, allow_pickle=False) as z:
                op = bytes(z["op"]).decode()
                yield WalEntry(
                    seq=seq,
                    op=op,
                    ids=z["ids"].astype(np.int64),
                    shards=z["shards"].astype(np.int32) if "shards" in z else None,
                    vectors=z["vectors"].astype(np.float32) if "vectors" in z else None,
                    lists=z["lists"].astype(np.int64) if "lists" in z else None,
                    records_json=bytes(z["records"]) if "records" in z else None,
                )
        except (OSError, ValueError, KeyError) as exc:
            raise CorruptIndex(f"{path}: unreadable write-ahead log entry ({exc})") from None


def check_fresh_target(path: Path) -> None:
    """Refuse to write an index into a non-empty directory that is not a dask-rag index."""
    if path.exists() and not path.is_dir():
        raise InvalidInput(f"index path {str(path)!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / MANIFEST).exists():
        raise InvalidInput(
            f"index path {str(path)!r} is a non-empty directory that is not a dask-rag index; "
            "refusing to write into it"
        )


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
