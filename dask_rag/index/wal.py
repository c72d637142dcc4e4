"""The write-ahead log: ``DIR/wal/SSSSSSSSSSSS.npz``, one file per acknowledged mutation.

A mutation is appended (atomically, fsynced) before it is applied to any shard; a shard that
is (re)loaded replays the entries after the manifest's ``wal_seq``, so an acknowledged write
survives the loss of the worker that applied it.  A save folds the log into new shard files
and deletes the entries it folded, after the manifest commit.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dask_rag.errors import CorruptIndex
from dask_rag.index.layout import WAL_DIR, wal_name, wal_seq_of
from dask_rag.index.store import list_files, put_file

__all__ = ["WalEntry", "append_wal", "read_wal", "wal_files", "wal_seqs"]



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
    #: an ``add`` that replaces: these ids are removed first, in the same acknowledged write
    removed: npt.NDArray[np.int64] | None = None

    def records(self) -> list[dict[str, Any]] | None:
        if self.records_json is None:
            return None
        out: list[dict[str, Any]] = json.loads(self.records_json.decode("utf-8"))
        return out


def wal_files(index_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(seq, path) of the log entries in a local index directory, in order."""
    return [(seq, Path(index_dir) / wal_name(seq)) for seq in wal_seqs(index_dir)]


def wal_seqs(location: str | os.PathLike[str]) -> list[int]:
    """Sequence numbers of the log entries at ``location`` (a directory or a URL), sorted."""
    seqs = (wal_seq_of(rel) for rel in list_files(location, WAL_DIR))
    return sorted(seq for seq in seqs if seq is not None)


def append_wal(index_dir: str | os.PathLike[str], entry: WalEntry) -> None:
    """Durably record a mutation before it is applied anywhere (an fsynced rename in a
    directory, one PUT in an object store)."""
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
    if entry.removed is not None:
        arrays["removed"] = entry.removed
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    put_file(index_dir, wal_name(entry.seq), buf.getvalue())


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
                    removed=z["removed"].astype(np.int64) if "removed" in z else None,
                )
        except FileNotFoundError:
            raise  # deleted by a save while listed: the caller starts again from the manifest
        except (OSError, ValueError, KeyError) as exc:
            raise CorruptIndex(f"{path}: unreadable write-ahead log entry ({exc})") from None
