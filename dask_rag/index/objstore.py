"""Index locations that are URLs: ``s3://``, ``gs://``, ``memory://``, any fsspec protocol.

Machines rarely share a filesystem, so an index can live in an object store instead of a
directory.  The layout under the URL is the directory layout of :mod:`dask_rag.index.store`;
what differs is how it is written and read:

* **Writes** go straight to the store, one object per file.  Shard files are written by the
  worker that holds the shard (into a private temporary directory, then uploaded), never
  through the client.  File names never repeat within an index (a save, or a rebuild over an
  existing index, uses the next *generation* of names), so an upload never overwrites a file
  that a committed manifest names.
* **The commit** is one PUT of ``manifest.json``, written last.  S3, GCS and Azure replace an
  object atomically and read their own writes (strong consistency), so a reader sees the old
  manifest or the new one, each naming files that are all present.  Files the new manifest no
  longer names are deleted after the commit.
* **Reads** copy what a process needs into a local cache (a worker's ``local_directory``, or
  a temporary directory on the client), keyed by index uuid and verified against the
  manifest's checksums; the shard is then loaded from the local copy by the same code as a
  local index.  Each worker fetches only its own shards' files.

Credentials and endpoints come from the environment of each process (``AWS_*`` variables,
``FSSPEC_S3_ENDPOINT_URL``, ``~/.config/fsspec/``, GCP application credentials), never from
the manifest or the task graph.  Every failure names the URL (:class:`StorageUnavailable`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dask_rag.errors import IndexNotFound, InvalidInput, StorageUnavailable
from dask_rag.index.layout import MANIFEST, WAL_DIR, wal_seq_of

__all__ = ["ObjectStoreDir", "bytes_checksum", "cache_root", "file_checksum", "is_url",
           "local_location"]


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` names an object store (a URL other than ``file://``)."""
    s = str(location)
    return "://" in s and not s.startswith("file://")


def local_location(location: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """``file:///x`` → ``/x``; anything else unchanged."""
    s = str(location)
    return s[len("file://"):] if s.startswith("file://") else location


def cache_root() -> Path:
    """Where this process keeps its copies of remote index files: the Dask worker's own
    ``local_directory`` when called in a task (private to that worker), else a per-user
    temporary directory (``$DASK_RAG_CACHE`` overrides both)."""
    env = os.environ.get("DASK_RAG_CACHE")
    if env:
        return Path(env)
    with contextlib.suppress(ImportError, ValueError):
        from distributed import get_worker

        return Path(get_worker().local_directory) / "dask-rag-cache"
    return Path(tempfile.gettempdir()) / f"dask-rag-cache-{os.getuid()}"


def _unavailable(url: str, what: str, exc: BaseException) -> StorageUnavailable:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return StorageUnavailable(f"{url}: cannot {what}: {type(exc).__name__}"
                              + (f": {detail}" if detail else ""))


class ObjectStoreDir:
    """One index location in an object store, addressed by relative file names (the
    object-store half of :data:`~dask_rag.index.location.Location`)."""

    #: no rename: a rewrite goes beside the old files under the next generation of names
    can_rename = False

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = str(url).rstrip("/")
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as exc:  # protocol not installed (s3fs, gcsfs, ...)
            raise StorageUnavailable(f"{self.url}: {exc}") from None
        self.root = str(root).rstrip("/")

    def __repr__(self) -> str:
        return f"<ObjectStoreDir {self.url}>"

    @property
    def where(self) -> str:
        """The location as users name it: the URL."""
        return self.url

    def name_of(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def missing_index(self) -> IndexNotFound:
        """Why there is no manifest here, for the error (a missing bucket or refused
        credentials raise StorageUnavailable saying so)."""
        self.check_reachable()
        return IndexNotFound(f"{self.url!r} is not a dask-rag index (no {MANIFEST})")

    def check_fresh_target(self) -> bool:
        """Check the store is reachable and refuse a prefix holding objects but no index;
        returns whether an index is already here."""
        self.check_reachable()
        present = self.exists(MANIFEST)
        if not present and self.listdir(""):
            raise InvalidInput(f"{self.url!r} holds objects but no dask-rag index; refusing "
                               "to write into it")
        return present

    def recover(self) -> None:
        """Nothing to finish: an object store's commit is one PUT of the manifest."""

    @contextlib.contextmanager
    def writable_dir(self) -> Iterator[Path]:
        """A private temporary directory of this process whose files are uploaded here when
        the block ends without error: a worker never needs a shared filesystem."""
        cache = cache_root()
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="upload-", dir=cache))
        try:
            yield tmp
            self.upload_tree(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _full(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call ``fn``; turn anything but a missing file into StorageUnavailable naming the URL."""
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise _unavailable(self.url, what, exc) from None

    # ---- checks ----------------------------------------------------------------------------

    def check_reachable(self) -> None:
        """Raise StorageUnavailable naming the URL when the store cannot be used at all:
        endpoint down, credentials missing or refused, or the bucket missing.  Called before
        anything is written, so a bad URL leaves nothing behind."""
        bucket = self.root.split("/", 1)[0]
        try:
            self._guard("reach the store", self.fs.ls, bucket if "/" in self.root else self.root,
                        detail=False)
        except FileNotFoundError:
            if self.fs.protocol in ("memory", ("memory",)):
                return  # a memory filesystem has no buckets
            raise StorageUnavailable(f"{self.url}: bucket {bucket!r} does not exist") from None
        self.fs.invalidate_cache()

    # ---- objects -----------------------------------------------------------------------------

    def read(self, rel: str) -> bytes | None:
        """The bytes of ``rel``, or None if there is no such object."""
        try:
            data: bytes = self._guard(f"read {rel}", self.fs.cat_file, self._full(rel))
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            return None
        return data

    def write(self, rel: str, data: bytes) -> None:
        """One PUT: readers see the previous object or this one, never a mix."""
        self._guard(f"write {rel}", self.fs.pipe_file, self._full(rel), data)

    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache()
        return bool(self._guard(f"look up {rel}", self.fs.exists, self._full(rel)))

    def listdir(self, rel_dir: str) -> list[str]:
        """Names (relative to the index) directly under ``rel_dir``; [] if there is none."""
        self.fs.invalidate_cache()
        try:
            found = self._guard(f"list {rel_dir}", self.fs.ls, self._full(rel_dir), detail=False)
        except FileNotFoundError:
            return []
        prefix = self._full(rel_dir).rstrip("/") + "/"
        out = []
        for name in found:
            name = str(name).rstrip("/")
            if name.startswith(prefix):
                out.append(f"{rel_dir}/{name[len(prefix):]}".lstrip("/"))
        return sorted(out)

    def delete(self, rels: list[str]) -> None:
        """Delete files or prefixes (best effort: a leftover is garbage, never a corruption)."""
        for rel in rels:
            with contextlib.suppress(FileNotFoundError, StorageUnavailable):
                self._guard(f"delete {rel}", self.fs.rm, self._full(rel), recursive=True)

    def delete_all(self) -> None:
        with contextlib.suppress(FileNotFoundError, StorageUnavailable):
            self._guard("delete the index", self.fs.rm, self.root, recursive=True)

    def upload_tree(self, local: Path) -> list[str]:
        """Upload every file under ``local`` to the same relative names; returns them."""
        names = []
        for p in sorted(local.rglob("*")):
            if p.is_file():
                rel = p.relative_to(local).as_posix()
                self._guard(f"write {rel}", self.fs.put_file, str(p), self._full(rel))
                names.append(rel)
        return names

    def download(self, rel: str, dest: Path) -> None:
        """Copy ``rel`` (a file, or a directory of files) to ``dest`` atomically."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            if self._guard(f"look up {rel}", self.fs.isdir, self._full(rel)):
                self._guard(f"read {rel}", self.fs.get, self._full(rel) + "/", str(tmp) + "/",
                            recursive=True)
            elif self.fs.protocol in ("memory", ("memory",)):
                # fsspec's memory filesystem hands every reader the *same* file object (one
                # seek position): threaded workers downloading one file at once read each
                # other's positions and got empty files (seen in CI); cat_file copies
                tmp.write_bytes(self._guard(f"read {rel}", self.fs.cat_file, self._full(rel)))
            else:
                self._guard(f"read {rel}", self.fs.get_file, self._full(rel), str(tmp))
            if dest.is_dir():
                shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

    # ---- the local copy ----------------------------------------------------------------------

    def mirror(self, index_uuid: str, files: dict[str, str | None],
               wal_after: int | None = None) -> Path:
        """A local directory holding ``files`` (name → expected checksum, None for a
        directory: names never repeat within an index, so a present one is current) and, with
        ``wal_after``, the write-ahead log entries after that sequence number.  Cached files
        whose checksum matches are kept.  The manifest is not copied: callers parse the one
        they read, so two loads of different generations cannot mix."""
        local = cache_root() / index_uuid
        local.mkdir(parents=True, exist_ok=True)
        for rel, checksum in files.items():
            dest = local / rel
            if dest.exists() and (checksum is None or file_checksum(dest) == checksum):
                continue
            self.download(rel, dest)
        if wal_after is not None:
            for rel in self.listdir(WAL_DIR):
                seq = wal_seq_of(rel)
                if seq is not None and seq > wal_after and not (local / rel).exists():
                    self.download(rel, local / rel)
        return local


# ---- checksums (the store module verifies every file with these) ----------------------------


def file_checksum(path: str | os.PathLike[str]) -> str:
    """blake2b-128 of a file's bytes (fast enough to verify shards at every load)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def bytes_checksum(data: bytes) -> str:
    """:func:`file_checksum` of bytes in memory."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()
