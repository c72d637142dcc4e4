"""Collections: several named indexes served together, each a :class:`RagPipeline`.

One server answers for a *default* collection (``/v1/search``, ``/v1/ask``, ...) and for
named ones (``/v1/collections/{name}/...``).  A collections root folder holds one index folder
per name; ``serve --collections DIR`` opens every index found there, and
``POST /v1/collections`` creates an empty one (flat or HNSW; filled through
``/documents``) with the default collection's encoder; ``DELETE /v1/collections/{name}``
removes a named one and its folder (the default collection is never deleted).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

from distributed import Client

from dask_rag.batching import MicroBatcher
from dask_rag.cluster.futures import close_actor_connections
from dask_rag.config import BatchConfig, IndexSpec, RagConfig
from dask_rag.errors import IndexNotFound, InvalidInput
from dask_rag.index.distributed import DistributedIndex
from dask_rag.index.layout import MANIFEST
from dask_rag.pipeline import RagPipeline

__all__ = ["NAME_RE", "Collections"]

#: a collection's name: a folder name and a URL segment at once
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

#: a deleted collection's folder is renamed to this prefix first (no collection name starts
#: with "."), then removed; :meth:`Collections.open` removes any a crash left behind
_DELETING = ".deleting-"


class Collections:
    """Named pipelines; ``default`` is the one the plain routes address."""

    def __init__(self, default: RagPipeline, default_name: str = "default",
                 root: str | Path | None = None, config: RagConfig | None = None,
                 batch: BatchConfig | None = None) -> None:
        self.client: Client = default.client
        self.default_name = default_name
        self.root = None if root is None else Path(root)
        self.config = config or default.config
        self.batch = batch
        self._pipes: dict[str, RagPipeline] = {default_name: default}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, default: RagPipeline, root: str | Path, config: RagConfig | None = None,
             batch: BatchConfig | None = None) -> Collections:
        """The default pipeline plus every index folder under ``root``."""
        out = cls(default, root=root, config=config, batch=batch)
        out.root.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        for d in out.root.glob(f"{_DELETING}*"):  # type: ignore[union-attr]
            shutil.rmtree(d, ignore_errors=True)
        for d in sorted(out.root.iterdir()):  # type: ignore[union-attr]
            if (d / MANIFEST).is_file() and NAME_RE.match(d.name) and \
                    d.name != out.default_name:
                out._pipes[d.name] = RagPipeline.from_index_dir(out.client, d, out.config,
                                                                batch=batch)
        return out

    @property
    def default(self) -> RagPipeline:
        return self._pipes[self.default_name]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._pipes)

    def get(self, name: str | None) -> RagPipeline:
        """The pipeline of ``name`` (None: the default); IndexNotFound (404) otherwise."""
        with self._lock:
            pipe = self._pipes.get(name or self.default_name)
        if pipe is None:
            raise IndexNotFound(f"no collection named {name!r}")
        return pipe

    def describe(self, name: str) -> dict[str, Any]:
        pipe = self.get(name)
        idx = pipe.index
        return {"name": name, "default": name == self.default_name, "chunks": idx.ntotal,
                "dim": idx.dim, "factory": idx.spec.factory, "shards": idx.n_shards,
                "model": pipe.embedder.config.model}

    def create(self, name: str, factory: str = "Flat", shards: int | None = None
               ) -> RagPipeline:
        """A new, empty collection under the root, with the default collection's encoder."""
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidInput(f"collection name {name!r} is invalid: 1-64 letters, digits, "
                               "'_', '-' or '.', starting with a letter or digit")
        if self.root is None:
            raise InvalidInput("this server has no collections folder (serve --collections "
                               "DIR): it cannot create collections")
        with self._lock:
            if name in self._pipes:
                raise InvalidInput(f"collection {name!r} already exists")
            n_workers = max(1, len(self.client.scheduler_info(n_workers=-1)["workers"]))
            spec = IndexSpec(factory=factory, n_shards=shards or n_workers)
            base = self.default
            embed = dict(base.index.manifest.embed or {})
            index = DistributedIndex.create(self.client, base.index.dim, spec,
                                            path=self.root / name, embed=embed)
            pipe = RagPipeline(self.client, index, base.embedder, self.config, self.batch)
            self._pipes[name] = pipe
            return pipe

    async def adelete(self, name: str) -> dict[str, Any]:
        """Delete the named collection and its folder; returns what it held.

        Order matters for what a client can see: the name leaves the registry first (new
        requests get 404), then the requests it already took finish, then its index closes
        (an in-flight write completes first; none can start after), and only then does its
        folder go — renamed out of the way in one step, then removed, so a crash midway leaves
        no half-deleted index that :meth:`open` would serve.  The shared encoder stays.
        """
        if name == self.default_name:
            raise InvalidInput("the default collection cannot be deleted")
        described = self.describe(name)  # IndexNotFound (404) for an unknown name
        with self._lock:
            pipe = self._pipes.get(name)
            if pipe is None:  # deleted meanwhile
                raise IndexNotFound(f"no collection named {name!r}")
            folder = None if self.root is None else self.root / name
            if folder is None or Path(str(pipe.index.path)).resolve() != folder.resolve():
                raise InvalidInput(f"collection {name!r} is not a folder of this server's "
                                   "collections root: it is not deleted")
            del self._pipes[name]
        await pipe.adrain()
        await asyncio.to_thread(pipe.close)
        trash = folder.with_name(f"{_DELETING}{name}-{uuid.uuid4().hex[:8]}")
        await asyncio.to_thread(folder.rename, trash)
        await asyncio.to_thread(shutil.rmtree, trash, True)
        return described

    def batchers(self) -> dict[str, MicroBatcher[Any, Any]]:
        """Every collection's micro-batchers, as ``name`` (default) or ``collection/name``."""
        out: dict[str, MicroBatcher[Any, Any]] = {}
        with self._lock:
            pipes = dict(self._pipes)
        for cname, pipe in pipes.items():
            for bname, b in pipe.batchers().items():
                key = bname if cname == self.default_name else f"{cname}/{bname}"
                if all(b is not other for other in out.values()):  # shared encoders once
                    out[key] = b
        return out

    async def aclose(self) -> None:
        with self._lock:
            pipes = list(self._pipes.values())
        for pipe in pipes:
            await pipe.aclose()
        await close_actor_connections(self.client)  # (this loop's: the server's)

    def close(self) -> None:
        with self._lock:
            pipes = list(self._pipes.values())
        for pipe in pipes:
            pipe.close()
