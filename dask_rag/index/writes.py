"""Writes to a :class:`~dask_rag.index.distributed.DistributedIndex`: ``add``, ``remove``,
``save`` (in place, compacting the write-ahead log) and export to another directory.

Durability rules: a mutation is appended to the WAL (fsynced) before any shard applies it, so
an acknowledged write survives the loss of the worker that applied it; a save writes new shard
files, then commits by replacing the manifest atomically, then deletes what the new manifest no
longer names.  A failure at any point leaves the previous state loadable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from distributed import Client, Future, wait

from dask_rag.errors import InvalidInput
from dask_rag.faults import fault_point
from dask_rag.index import store
from dask_rag.index.build import jsonable_record
from dask_rag.index.layout import (
    SHARDS_DIR,
    generation_of,
    is_quantizer,
    quantizer_name,
    shard_file_names,
    wal_name,
)
from dask_rag.index.location import open_location
from dask_rag.index.manifest import Manifest, QuantizerEntry, ShardEntry
from dask_rag.index.objstore import ObjectStoreDir
from dask_rag.index.query import IndexQuery, check_ids, check_vectors
from dask_rag.index.replicas import WRITE_PRIORITY, ReplicaSet
from dask_rag.index.routing import Router
from dask_rag.index.sparse import CorpusStats, text_stats
from dask_rag.index.tasks import (
    apply_add_task,
    apply_remove_task,
    bm25_stats_task,
    held_task,
    shard_count_task,
    write_shard_task,
)
from dask_rag.index.wal import WalEntry, append_wal, wal_seqs

__all__ = ["APPLY_WAIT_S", "IndexWriter", "put_quantizer", "write_index"]

#: how long a write waits for its replicas to apply it before acknowledging (it is durable in
#: the log already; a replica that is behind catches up before its next read)
APPLY_WAIT_S = 1.0


class IndexWriter:
    """The write half of a :class:`~dask_rag.index.distributed.DistributedIndex`: the log, the
    manifest (the only part that commits one), the live counts and the read token.

    It applies writes to every replica the index's
    :class:`~dask_rag.index.replicas.ReplicaSet` holds and never keeps its own view of where
    they are.  The read token (:attr:`acked_seq` with the BM25 statistics at it) is here
    because only a write moves it; a search reads it through :meth:`stamp`.
    """

    def __init__(self, client: Client, location: str, manifest: Manifest,
                 replicas: ReplicaSet, router: Router) -> None:
        self.client = client
        self.location = location
        self.manifest = manifest
        self.replicas = replicas
        self.router = router
        self.dim = manifest.dim
        self.n_shards = manifest.n_shards
        self.index_uuid = manifest.index_uuid
        #: live vectors per shard: reported at load, then moved by every write
        self.counts: list[int] = []
        #: the last write-ahead-log entry acknowledged (every read carries it, see
        #: Shard.catch_up) with the index's BM25 statistics at that entry (None until the
        #: shards report them)
        self._read_state: tuple[int, CorpusStats | None] = (self._log_end(), None)
        #: apply tasks still running after their write was acknowledged (see :meth:`_apply`)
        self._running: set[Future] = set()
        #: where the last ``add`` spent its time (ms): waiting for the write lock, checking
        #: ids, appending to the log, applying to the replicas
        self.last_write_ms: dict[str, float] = {}
        self.lock = threading.Lock()

    # ---- the read token -----------------------------------------------------------------------

    @property
    def acked_seq(self) -> int:
        """The write-ahead-log entry of the last acknowledged write."""
        return self._read_state[0]

    @property
    def bm25_stats(self) -> CorpusStats | None:
        return self._read_state[1]

    def start(self) -> None:
        """Take the live counts and BM25 statistics from the loaded shards."""
        self.counts = [int(c) for c in self.on_each_shard(shard_count_task)]
        stats = sum(self.on_each_shard(bm25_stats_task), CorpusStats())
        self._read_state = (self._read_state[0], stats)

    def _acknowledge(self, seq: int, bm25_delta: CorpusStats | None = None,
                     removed: CorpusStats | None = None) -> None:
        """Make log entry ``seq`` the read token, with the BM25 statistics it changed
        (one assignment: a search reads the position and the statistics together)."""
        stats = self._read_state[1]
        if stats is not None:
            if bm25_delta is not None:
                stats = stats + bm25_delta
            if removed is not None:
                stats = stats - removed
        self._read_state = (seq, stats)

    def stamp(self, query: IndexQuery) -> IndexQuery:
        """``query`` stamped with the last acknowledged write, which every shard copy that
        answers it must reflect (read-your-writes, whatever copies the scheduler made), and
        with the BM25 weights of the index's statistics at that write."""
        seq, stats = self._read_state
        changes: dict[str, Any] = {}
        if query.min_seq < seq:
            changes["min_seq"] = seq
        if query.texts is not None and query.bm25 is None and stats is not None:
            changes["bm25"] = stats.weights(query.texts)
        return dataclasses.replace(query, **changes) if changes else query

    def on_each_shard(self, task: Callable[..., Any], *args: Any, pin: bool = False
                      ) -> list[Any]:
        """``task(shard, *args, min_seq)`` on one replica of every shard, at the last
        acknowledged write (see :meth:`ReplicaSet.on_each_shard
        <dask_rag.index.replicas.ReplicaSet.on_each_shard>`)."""
        return self.replicas.on_each_shard(task, *args, self.acked_seq, pin=pin)

    def _log_end(self) -> int:
        """The last entry in the log: the manifest's folded position or a later entry (under
        the write lock no write is adding one)."""
        return max([self.manifest.wal_seq, *wal_seqs(self.location)])

    def _next_seq(self) -> int:
        return self._log_end() + 1

    def _present(self, ids: npt.NDArray[np.int64], removed: npt.NDArray[np.int64] | None
                 ) -> tuple[list[npt.NDArray[np.int64]], CorpusStats]:
        """Which of ``ids`` each shard holds now, and the BM25 statistics of those of them
        in ``removed`` (the write takes them from the index's)."""
        gone = np.zeros(0, np.int64) if removed is None else removed
        parts = self.on_each_shard(held_task, ids, gone, pin=True)
        return [held for held, _ in parts], sum((st for _, st in parts), CorpusStats())

    def _apply(self, seq: int, targets: Sequence[int], task: Callable[..., Any],
               args: Callable[[int], tuple[Any, ...]]) -> None:
        """Submit log entry ``seq``'s apply task to every replica of the ``targets`` shards
        (``args(shard)``: the task's arguments after the shard) and wait for them up to
        :data:`APPLY_WAIT_S`; an apply that failed fails the write.

        The wait is bounded because the entry is already durable and every read catches its
        copy up to the last acknowledged entry (:meth:`Shard.catch_up`): a replica being
        reloaded after a kill replays the entry itself, and a write need not wait for it.
        No result comes back (the shard counts follow from the write itself): gathering one
        from a worker that dies meanwhile would wait for its recomputation.  Applies still
        running are kept referenced until they end (a released future's task may be
        forgotten by the scheduler before it runs)."""
        replicas = self.replicas.replica_futures()
        where = self.replicas.holders([f for s in targets for f in replicas[s]])
        futs = [self.client.submit(task, replica, seq, *args(s), pure=False,
                                   priority=WRITE_PRIORITY, workers=where[replica.key] or None,
                                   allow_other_workers=bool(where[replica.key]),
                                   key=(f"dask-rag-apply-{uuid.uuid4().hex}", s))
                for s in targets for replica in replicas[s]]
        with contextlib.suppress(TimeoutError):
            wait(futs, timeout=APPLY_WAIT_S)
        for f in futs:
            if f.status == "error":
                f.result()  # raises: the write is logged but not acknowledged
            elif f.status != "finished":
                self._running.add(f)
                f.add_done_callback(self._running.discard)

    def add(self, xb: Any, ids: Any, records: Sequence[dict[str, Any]] | None = None, *,
            replace: Any = None) -> int:
        """Add vectors with ids (and records) to their owning shards; durable when it returns.

        ``replace``: ids removed in the same acknowledged write — an update (a changed
        document's old chunks go as its new ones come, an upsert by id): after a crash the
        index holds either all of it or none of it, never the removal without the addition.
        Returns how many vectors were added.  Every search, fetch and save submitted after
        it returns sees the write, on every replica (read-your-writes).
        """
        self.replicas.check_open()
        xb = check_vectors(xb, self.dim, "xb")
        ids = check_ids(ids, xb.shape[0])
        removed = None if replace is None else _id_array(replace)
        if records is not None and len(records) != len(ids):
            raise InvalidInput(f"records has {len(records)} entries for {len(ids)} vectors")
        recs_json = None if records is None else json.dumps(
            [jsonable_record(r) for r in records]).encode()
        t0 = time.perf_counter()
        with self.lock:
            self.replicas.check_open()  # again: close() may have run while this write waited
            t_lock = time.perf_counter()
            held, removed_stats = self._present(
                ids if removed is None else np.union1d(ids, removed), removed)
            t_check = time.perf_counter()
            present = np.concatenate([h[np.isin(h, ids)] for h in held])
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
            t_log = time.perf_counter()
            targets = range(self.n_shards) if removed is not None else \
                [int(s) for s in np.unique(shard_of)]

            def args(s: int) -> tuple[Any, ...]:
                m = shard_of == s
                recs = None if records is None else [dict(r) for r, keep in
                                                     zip(records, m, strict=True) if keep]
                return (xb[m], ids[m], recs, None if lists is None else lists[m], removed)

            self._apply(seq, targets, apply_add_task, args)
            for s in targets:  # exact: the ids were checked above, under the write lock
                gone = 0 if removed is None else int(np.isin(held[s], removed).sum())
                self.counts[s] += int((shard_of == s).sum()) - gone
            added = text_stats([] if records is None else [r.get("text") for r in records])
            self._acknowledge(seq, added, removed_stats)
            t_end = time.perf_counter()
            self.last_write_ms = {"lock": (t_lock - t0) * 1e3, "check": (t_check - t_lock) * 1e3,
                                  "log": (t_log - t_check) * 1e3, "apply": (t_end - t_log) * 1e3}
            return len(ids)

    def remove(self, ids: Any) -> int:
        """Remove ids from whichever shards hold them; returns how many were removed."""
        self.replicas.check_open()
        arr = _id_array(ids)
        if arr.size == 0:
            return 0
        with self.lock:
            self.replicas.check_open()
            held, removed_stats = self._present(arr, arr)
            seq = self._next_seq()
            append_wal(self.location, WalEntry(seq, "remove", arr))
            fault_point("wal.appended")
            self._apply(seq, range(self.n_shards), apply_remove_task, lambda s: (arr,))
            for s in range(self.n_shards):
                self.counts[s] -= len(held[s])
            self._acknowledge(seq, removed=removed_stats)
            return int(sum(len(h) for h in held))

    def save(self, path: str | Path | None = None) -> Path | str:
        """Write the current state durably and atomically; returns where.

        ``save()`` compacts in place: new shard files, then the manifest is replaced atomically,
        then old files and the write-ahead log are deleted.  ``save(other)`` exports a copy to
        another directory or URL (a directory is staged, then renamed into place; a URL gets
        the next generation of file names, then its manifest).  A failure at any point leaves
        the previous index at the target loadable and unchanged.
        """
        self.replicas.check_open()
        target = self.location if path is None else store.location_str(path)
        with self.lock:
            self.replicas.check_open()
            if target == self.location:
                self._save_in_place()
            else:
                self._export(target)
        return open_location(target).where

    def set_metadata(self, name: str, value: Any) -> None:
        """Record ``value`` (JSON) under ``name`` in the manifest, atomically."""
        self.replicas.check_open()
        if name not in Manifest.METADATA_FIELDS:
            raise InvalidInput(f"metadata field {name!r} is not one of "
                               f"{sorted(Manifest.METADATA_FIELDS)}")
        if not isinstance(value, (dict, type(None))):
            raise InvalidInput(f"metadata field {name!r} takes a JSON object or None")
        json.dumps(value)  # JSON or nothing
        with self.lock:
            self.replicas.check_open()  # again: close() may have run while this waited
            manifest = store.read_manifest(self.location).replace(
                **{name: value}, updated_at=store.now())
            store.commit_manifest(self.location, manifest)
            self.manifest = manifest

    def close(self) -> None:
        """Mark the index closed once a write in progress has finished (up to 60 s), so
        nothing writes into its location afterwards; later writes fail as "closed"."""
        locked = self.lock.acquire(timeout=60)
        try:
            self.replicas.closed = True
        finally:
            if locked:
                self.lock.release()

    def _write_all(self, directory: str | Path, generation: int, index_uuid: str,
                   wal_seq: int) -> list[ShardEntry]:
        """Every shard's files, reflecting the log up to ``wal_seq`` (what the manifest about
        to be committed says they fold)."""
        futs = [self.client.submit(write_shard_task, f, str(directory), generation, index_uuid,
                                   wal_seq, key=(f"dask-rag-write-{uuid.uuid4().hex}", s),
                                   pure=False, priority=WRITE_PRIORITY)
                for s, f in enumerate(self.replicas.shard_futures())]
        entries: list[ShardEntry] = self.client.gather(futs)
        return entries

    def _save_in_place(self) -> None:
        old = store.read_manifest(self.location)
        generation = old.generation + 1
        wal_seq = max([old.wal_seq, *wal_seqs(self.location)])
        entries = self._write_all(self.location, generation, self.index_uuid, wal_seq)
        fault_point("save.shards_written")
        manifest = old.replace(shards=entries, generation=generation, wal_seq=wal_seq,
                               updated_at=store.now())
        store.commit_manifest(self.location, manifest)  # the commit point
        self.manifest = manifest
        # the new manifest is committed: old shard files and folded WAL entries can go
        drop_unnamed(self.location, manifest)

    def _quantizer_bytes(self) -> bytes:
        q = self.manifest.quantizer
        assert q is not None
        local = store.local_index_dir(self.location, self.manifest, quantizer=True)
        return store.resolve_index_file(local, q.file).read_bytes()

    def _export(self, target: str) -> None:
        exists = store.check_fresh_target(target)
        index_uuid = store.new_index_uuid()
        write_index(target, self.n_shards, exists,
                    lambda directory, generation, wal_seq: self._write_export(
                        directory, index_uuid, generation, wal_seq))

    def _write_export(self, directory: str | Path, index_uuid: str, generation: int,
                      wal_seq: int) -> Manifest:
        entries = self._write_all(directory, generation, index_uuid, self._log_end())
        fault_point("save.shards_written")
        manifest = self.manifest.replace(index_uuid=index_uuid, shards=entries,
                                         generation=generation, wal_seq=wal_seq,
                                         created_at=store.now())
        if manifest.quantizer is not None:
            manifest = manifest.replace(quantizer=put_quantizer(
                directory, generation, self._quantizer_bytes()))
        store.commit_manifest(directory, manifest)
        return manifest


# ---- whole-index writes shared by build, save and export -----------------------------------------


def next_generation(location: str) -> tuple[int, int]:
    """(generation, wal_seq) for a new index written over whatever is at ``location``: file
    names after every generation present there, and a log position after every WAL entry
    present (an old index's entries must never replay into the new one)."""
    generation = -1
    for rel in store.list_files(location, SHARDS_DIR):
        generation = max(generation, generation_of(rel))
    return generation + 1, max(wal_seqs(location), default=0)


def write_index(target: str, n_shards: int, exists: bool,
                write: Callable[[str | Path, int, int], Manifest],
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
    if not open_location(target).can_rename:
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


def put_quantizer(location: str | Path, generation: int, data: bytes) -> QuantizerEntry:
    """Write the trained template of ``generation``; returns its manifest entry."""
    name = quantizer_name(generation)
    store.put_file(location, name, data)
    return QuantizerEntry(name, store.bytes_checksum(data))


def drop_unnamed(location: str, manifest: Manifest) -> None:
    """After a commit: delete the shard files and quantizers the manifest no longer names and
    the log entries it has folded (leftovers are garbage, never corruption)."""
    keep = {name for e in manifest.shards for name in e.files()}
    if manifest.quantizer is not None:
        keep.add(manifest.quantizer.file)
    stale = [rel for rel in store.list_files(location, SHARDS_DIR) if rel not in keep]
    stale += [rel for rel in store.list_files(location, "") if is_quantizer(rel)
              and rel.rsplit("/", 1)[-1] not in keep]
    stale += [wal_name(seq) for seq in wal_seqs(location) if seq <= manifest.wal_seq]
    store.delete_files(location, stale)


def discard_generation(location: str, n_shards: int, generation: int, everything: bool) -> None:
    """Undo a failed write of ``generation`` at an object-store ``location`` (``everything``:
    there was no index before, so remove all of it)."""
    if everything:
        ObjectStoreDir(location).delete_all()
        return
    names = [name for s in range(n_shards) for name in shard_file_names(s, generation)]
    store.delete_files(location, [*names, quantizer_name(generation)])


def _id_array(ids: Any) -> npt.NDArray[np.int64]:
    """Distinct ids to remove, sorted (InvalidInput for anything but a 1-D integer array)."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise InvalidInput(f"ids must be a 1-D array of integers, got shape {arr.shape}")
    return np.unique(arr.astype(np.int64))
