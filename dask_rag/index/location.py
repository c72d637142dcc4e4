"""Where an index lives, behind one interface: a local directory or an object-store URL.

:func:`open_location` decides once which of the two a path or URL names; every reader and
writer of index files (:mod:`dask_rag.index.store`, the WAL, builds and saves) then calls the
same methods on either and never asks again.  What differs is behind them: a local write is a
temporary file renamed into place and fsynced, an object-store write is one PUT; a local
directory is its own cache, a URL is copied part by part into this process's cache
(:meth:`~dask_rag.index.objstore.ObjectStoreDir.mirror`); a local directory can be swapped
into place with two renames (``can_rename``), an object store cannot — there a rewrite goes
beside the old files under the next generation of names (:mod:`dask_rag.index.layout`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dask_rag.errors import IndexNotFound, InvalidInput
from dask_rag.index.layout import MANIFEST
from dask_rag.index.objstore import ObjectStoreDir, is_url, local_location

__all__ = ["LocalDir", "Location", "ObjectStoreDir", "atomic_write_bytes", "open_location"]


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


class LocalDir:
    """An index location on a filesystem this process can reach (a local disk, or a shared
    filesystem every worker mounts), addressed by the same relative names as
    :class:`~dask_rag.index.objstore.ObjectStoreDir`."""

    #: a whole index can be written beside it and swapped into place
    can_rename = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(local_location(path)).resolve()
        self.url = str(self.path)

    def __repr__(self) -> str:
        return f"<LocalDir {self.url}>"

    @property
    def where(self) -> Path:
        """The location as users name it: a Path."""
        return self.path

    def name_of(self, rel: str) -> str:
        return str(self.path / rel)

    def read(self, rel: str) -> bytes | None:
        """The bytes of ``rel``, or None if there is no such file."""
        try:
            return (self.path / rel).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write(self, rel: str, data: bytes) -> None:
        atomic_write_bytes(self.path / rel, data)

    def exists(self, rel: str) -> bool:
        return (self.path / rel).exists()

    def listdir(self, sub: str) -> list[str]:
        """Index-relative names of the entries directly under ``sub`` (``shards``, ``wal``)."""
        d = self.path / sub
        return sorted(f"{sub}/{p.name}".lstrip("/") for p in d.iterdir()) if d.is_dir() else []

    def delete(self, rels: list[str]) -> None:
        for rel in rels:
            p = self.path / rel
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def missing_index(self) -> IndexNotFound:
        """Why there is no manifest here, for the error."""
        if not self.path.exists():
            return IndexNotFound(f"index directory {self.url!r} does not exist")
        if not self.path.is_dir():
            return IndexNotFound(f"{self.url!r} is not a directory")
        return IndexNotFound(f"{self.url!r} is not a dask-rag index (no {MANIFEST})")

    def check_fresh_target(self) -> bool:
        """Refuse a path that is a file, or a non-empty directory that is not an index;
        returns whether an index is already here."""
        if self.path.exists() and not self.path.is_dir():
            raise InvalidInput(f"index path {self.url!r} exists and is not a directory")
        present = (self.path / MANIFEST).exists()
        if not present and self.path.is_dir() and any(self.path.iterdir()):
            raise InvalidInput(
                f"index path {self.url!r} is a non-empty directory that is not a dask-rag "
                "index; refusing to write into it")
        return present

    def recover(self) -> None:
        """Finish a directory swap that was interrupted between its two renames.

        Replacing an index directory renames the old one aside, then the new one into place;
        if the process died in between, the path is missing and the old index sits beside it.
        Put it back, so that the previous index stays loadable.
        """
        if self.path.exists():
            return
        for old in sorted(self.path.parent.glob(f".{self.path.name}.old-*")):
            if (old / MANIFEST).is_file():
                old.rename(self.path)
                return

    def mirror(self, index_uuid: str, files: dict[str, str | None],
               wal_after: int | None = None) -> Path:
        """The directory itself: every part is already local."""
        return self.path

    @contextlib.contextmanager
    def writable_dir(self) -> Iterator[Path]:
        """A directory whose files end up at this location: this one."""
        self.path.mkdir(parents=True, exist_ok=True)
        yield self.path


#: an index location, chosen once by :func:`open_location`
Location = LocalDir | ObjectStoreDir


def open_location(location: str | os.PathLike[str] | Location) -> Location:
    """The :data:`Location` that ``location`` names: an object store for a URL (other than
    ``file://``), else a local directory; one already opened is returned as it is."""
    if isinstance(location, (LocalDir, ObjectStoreDir)):
        return location
    return ObjectStoreDir(str(location)) if is_url(location) else LocalDir(location)
