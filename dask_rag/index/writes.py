"""Writes to a :class:`~dask_rag.index.distributed.DistributedIndex`: ``add``, ``remove``,
``save`` (in place, compacting the write-ahead log) and export to another directory.

Durability rules: a mutation is appended to the WAL (fsynced) before any shard applies it, so
an acknowledged write survives the loss of the worker that applied it; a save writes new shard
files, then commits by replacing the manifest atomically, then deletes what the new manifest no
longer names.  A failure at any point leaves the previous state loadable.
"""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from distributed import Client, Future, wait

from dask_rag.config import IndexSpec
from dask_rag.errors import InvalidInput
from dask_rag.faults import fault_point
from dask_rag.index import store
from dask_rag.index.build import jsonable_record
from dask_rag.index.objstore import ObjectStoreDir
from dask_rag.index.query import check_ids, check_vectors
from dask_rag.index.routing import Router
from dask_rag.index.tasks import (
    apply_add_task,
    apply_remove_task,
    contains_task,
    write_shard_task,
)
from dask_rag.index.wal import WalEntry, append_wal, wal_name, wal_seqs

__all__ = ["IndexWrites", "put_quantizer", "write_index"]


class IndexWrites:
    """The write half of :class:`~dask_rag.index.distributed.DistributedIndex` (a mixin: the
    attributes below are the index's own)."""

    client: Client
    location: str
    manifest: dict[str, Any]
    spec: IndexSpec
    router: Router
    _counts: list[int]
    _write_lock: threading.Lock

    @property
    def dim(self) -> int:
        raise NotImplementedError

    @property
    def index_uuid(self) -> str:
        raise NotImplementedError

    @property
    def n_shards(self) -> int:
        raise NotImplementedError

    @property
    def shard_futures(self) -> list[Future]:
        raise NotImplementedError

    def replica_futures(self) -> list[list[Future]]:
        raise NotImplementedError

    def _check_open(self) -> None:
        raise NotImplementedError

    def _next_seq(self) -> int:
        seqs = wal_seqs(self.location)
        last = seqs[-1] if seqs else 0
        return max(last, int(self.manifest["wal_seq"])) + 1

    def add(self, xb: Any, ids: Any, records: Sequence[dict[str, Any]] | None = None, *,
            replace: Any = None) -> int:
        """Add vectors with ids (and records) to their owning shards; durable when it returns.

        ``replace``: ids removed in the same acknowledged write — an update (a changed
        document's old chunks go as its new ones come, an upsert by id): after a crash the
        index holds either all of it or none of it, never the removal without the addition.
        Returns how many vectors were added.
        """
        self._check_open()
        xb = check_vectors(xb, self.dim, "xb")
        ids = check_ids(ids, xb.shape[0])
        removed = None if replace is None else _id_array(replace)
        if records is not None and len(records) != len(ids):
            raise InvalidInput(f"records has {len(records)} entries for {len(ids)} vectors")
        recs_json = None if records is None else json.dumps(
            [jsonable_record(r) for r in records]).encode()
        with self._write_lock:
            self._check_open()  # again: close() may have run while this write waited
            present = np.concatenate(self.client.gather([
                self.client.submit(contains_task, f, ids, pure=False) for f in self.shard_futures]))
            if removed is not None:
                present = present[~np.isin(present, removed)]
            if present.size:
                raise InvalidInput(f"ids already in the index, e.g. {int(present[0])}; "
                                   "remove (or replace) them first")
            shard_of, lists = self.router.assign(xb, ids)
            seq = self._next_seq()
            append_wal(self.location, WalEntry(seq, "add", ids, shard_of, xb, lists, recs_json,
                                           removed))
            fault_point("wal.appended")
            targets = range(self.n_shards) if removed is not None else \
                [int(s) for s in np.unique(shard_of)]
            replicas = self.replica_futures()
            futs: dict[tuple[int, int], Future] = {}
            for s in targets:
                m = shard_of == s
                recs = None if records is None else [dict(r) for r, keep in
                                                     zip(records, m, strict=True) if keep]
                for r, replica in enumerate(replicas[s]):
                    futs[(s, r)] = self.client.submit(
                        apply_add_task, replica, seq, xb[m], ids[m], recs,
                        None if lists is None else lists[m], removed,
                        key=(f"dask-rag-apply-{uuid.uuid4().hex}", s), pure=False)
            wait(list(futs.values()))
            for (s, r), f in futs.items():
                if r == 0:
                    self._counts[s] = int(f.result())
            return len(ids)

    def remove(self, ids: Any) -> int:
        """Remove ids from whichever shards hold them; returns how many were removed."""
        self._check_open()
        arr = _id_array(ids)
        if arr.size == 0:
            return 0
        with self._write_lock:
            self._check_open()
            seq = self._next_seq()
            append_wal(self.location, WalEntry(seq, "remove", arr))
            fault_point("wal.appended")
            futs = [[self.client.submit(apply_remove_task, f, seq, arr,
                                        key=(f"dask-rag-apply-{uuid.uuid4().hex}", s),
                                        pure=False) for f in reps]
                    for s, reps in enumerate(self.replica_futures())]
            results = [reps[0] for reps in self.client.gather(futs)]
            for s, (_, count) in enumerate(results):
                self._counts[s] = int(count)
            return int(sum(gone for gone, _ in results))

    def save(self, path: str | Path | None = None) -> Path | str:
        """Write the current state durably and atomically; returns where.

        ``save()`` compacts in place: new shard files, then the manifest is replaced atomically,
        then old files and the write-ahead log are deleted.  ``save(other)`` exports a copy to
        another directory or URL (a directory is staged, then renamed into place; a URL gets
        the next generation of file names, then its manifest).  A failure at any point leaves
        the previous index at the target loadable and unchanged.
        """
        self._check_open()
        target = self.location if path is None else store.location_str(path)
        with self._write_lock:
            self._check_open()
            if target == self.location:
                self._save_in_place()
            else:
                self._export(target)
        return target if store.is_url(target) else Path(target)

    def _write_all(self, directory: str | Path, generation: int, index_uuid: str
                   ) -> list[dict[str, Any]]:
        futs = [self.client.submit(write_shard_task, f, str(directory), generation, index_uuid,
                                   key=(f"dask-rag-write-{uuid.uuid4().hex}", s), pure=False)
                for s, f in enumerate(self.shard_futures)]
        entries: list[dict[str, Any]] = self.client.gather(futs)
        return entries

    def _save_in_place(self) -> None:
        old = store.read_manifest(self.location)
        generation = int(old["generation"]) + 1
        wal_seq = max([int(old["wal_seq"]), *wal_seqs(self.location)])
        entries = self._write_all(self.location, generation, self.index_uuid)
        fault_point("save.shards_written")
        manifest = dict(old)
        manifest.update(shards=entries, generation=generation, wal_seq=wal_seq,
                        updated_at=store.now(), ntotal=sum(e["count"] for e in entries))
        store.commit_manifest(self.location, manifest)  # the commit point
        self.manifest = manifest
        # the new manifest is committed: old shard files and folded WAL entries can go
        drop_unnamed(self.location, manifest)

    def _quantizer_bytes(self) -> bytes:
        q = self.manifest["quantizer"]
        local = store.local_index_dir(self.location, self.manifest, quantizer=True)
        return store.resolve_index_file(local, q["file"]).read_bytes()

    def _export(self, target: str) -> None:
        exists = store.check_fresh_target(target)
        index_uuid = store.new_index_uuid()
        write_index(target, self.n_shards, exists,
                    lambda directory, generation, wal_seq: self._write_export(
                        directory, index_uuid, generation, wal_seq))

    def _write_export(self, directory: str | Path, index_uuid: str, generation: int,
                      wal_seq: int) -> dict[str, Any]:
        entries = self._write_all(directory, generation, index_uuid)
        fault_point("save.shards_written")
        manifest = dict(self.manifest)
        manifest.update(index_uuid=index_uuid, shards=entries, generation=generation,
                        wal_seq=wal_seq, created_at=store.now(),
                        ntotal=sum(e["count"] for e in entries))
        if manifest["quantizer"] is not None:
            manifest["quantizer"] = put_quantizer(directory, generation,
                                                  self._quantizer_bytes())
        store.commit_manifest(directory, manifest)
        return manifest


# ---- whole-index writes shared by build, save and export -----------------------------------------


def next_generation(location: str) -> tuple[int, int]:
    """(generation, wal_seq) for a new index written over whatever is at ``location``: file
    names after every generation present there, and a log position after every WAL entry
    present (an old index's entries must never replay into the new one)."""
    generation = -1
    for rel in store.list_files(location, "shards"):
        stem = rel.rsplit("/", 1)[-1].split(".")
        gen = next((int(p[1:]) for p in stem[1:] if p[:1] == "g" and p[1:].isdigit()), 0)
        generation = max(generation, gen)
    return generation + 1, max(wal_seqs(location), default=0)


def write_index(target: str, n_shards: int, exists: bool,
                write: Callable[[str | Path, int, int], dict[str, Any]],
                direct: bool = False) -> None:
    """Write a whole index at ``target`` so that a failure leaves the previous one intact.

    ``write(directory, generation, wal_seq)`` writes every file, commits the manifest there
    and returns it.  A directory is written in a staging sibling and swapped into place
    (``direct``: into ``target`` itself, a fresh directory removed on failure).  An object
    store has no rename: the index is written at ``target`` under the next generation of
    file names, beside the old one; a failure deletes that generation (all of ``target``
    when there was no index: not ``exists``), a success deletes what the new manifest does
    not name.
    """
    if store.is_url(target):
        generation, wal_seq = next_generation(target)
        try:
            manifest = write(target, generation, wal_seq)
        except BaseException:
            discard_generation(target, n_shards, generation, not exists)
            raise
        drop_unnamed(target, manifest)
        return
    staging = Path(target) if direct else store.staging_dir(Path(target))
    try:
        write(staging, 0, 0)
        if not direct:
            store.swap_into_place(staging, Path(target))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def quantizer_name(generation: int) -> str:
    return store.QUANTIZER if generation == 0 else f"quantizer.g{generation}.faiss"


def put_quantizer(location: str | Path, generation: int, data: bytes) -> dict[str, Any]:
    """Write the trained template of ``generation``; returns its manifest entry."""
    name = quantizer_name(generation)
    store.put_file(location, name, data)
    return {"file": name, "checksum": store.bytes_checksum(data)}


def drop_unnamed(location: str, manifest: dict[str, Any]) -> None:
    """After a commit: delete the shard files and quantizers the manifest no longer names and
    the log entries it has folded (leftovers are garbage, never corruption)."""
    keep = {e[key] for e in manifest["shards"]
            for key in ("file", "meta", "refine_file", "bm25") if key in e}
    if manifest.get("quantizer"):
        keep.add(manifest["quantizer"]["file"])
    stale = [rel for rel in store.list_files(location, "shards") if rel not in keep]
    stale += [rel for rel in store.list_files(location, "") if rel.rsplit("/", 1)[-1]
              .startswith("quantizer") and rel.rsplit("/", 1)[-1] not in keep]
    stale += [wal_name(seq) for seq in wal_seqs(location) if seq <= int(manifest["wal_seq"])]
    store.delete_files(location, stale)


def discard_generation(location: str, n_shards: int, generation: int, everything: bool) -> None:
    """Undo a failed write of ``generation`` at an object-store ``location`` (``everything``:
    there was no index before, so remove all of it)."""
    if everything:
        ObjectStoreDir(location).delete_all()
        return
    names = [name for s in range(n_shards) for name in store.shard_file_names(s, generation)]
    store.delete_files(location, [*names, quantizer_name(generation)])


def _id_array(ids: Any) -> npt.NDArray[np.int64]:
    """Distinct ids to remove, sorted (InvalidInput for anything but a 1-D integer array)."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise InvalidInput(f"ids must be a 1-D array of integers, got shape {arr.shape}")
    return np.unique(arr.astype(np.int64))
