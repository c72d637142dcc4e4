"""The manifest as a typed, frozen value: validated once, when it is read.

``manifest.json`` is an index's commit point (see :mod:`dask_rag.index.store`).  Code reads it
as a :class:`Manifest` — attributes with types, never string keys into a dict — and changes it
only by making a new one (:meth:`Manifest.replace`), which :func:`~dask_rag.index.store.
commit_manifest` writes atomically.  :meth:`Manifest.from_json` is the only parser and states
every rule of the format; :meth:`Manifest.to_json` writes the same keys this format has always
had, so the on-disk shape (``FORMAT_VERSION`` 1) is unchanged: bump the version when it
changes.  Keys this version does not know (written by a newer minor release) are kept and
written back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from dask_rag.config import METRICS, RESOLVED_SHARDINGS
from dask_rag.errors import CorruptIndex

__all__ = ["FORMAT_VERSION", "Manifest", "QuantizerEntry", "ShardEntry"]

FORMAT_VERSION = 1

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


@dataclass(frozen=True)
class ShardEntry:
    """One shard's files, their checksums and its vector count at the last save."""

    file: str
    meta: str
    count: int
    bytes: int
    checksum: str
    meta_checksum: str
    refine_file: str | None = None
    refine_checksum: str | None = None
    #: the BM25 folder (derived from the records: no checksum, rebuilt when unreadable)
    bm25: str | None = None

    @classmethod
    def from_json(cls, data: Any, where: str, i: int) -> ShardEntry:
        if not isinstance(data, dict):
            raise CorruptIndex(f"{where}: shard entry {i} is not an object")
        for key, typ in _SHARD_REQUIRED.items():
            if not isinstance(data.get(key), typ) or isinstance(data.get(key), bool):
                raise CorruptIndex(f"{where}: shard entry {i} field {key!r} is missing or "
                                   "invalid")
        return cls(file=data["file"], meta=data["meta"], count=data["count"],
                   bytes=data["bytes"], checksum=data["checksum"],
                   meta_checksum=data["meta_checksum"], refine_file=data.get("refine_file"),
                   refine_checksum=data.get("refine_checksum"), bm25=data.get("bm25"))

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def files(self) -> dict[str, str | None]:
        """Every file name of the shard → its checksum (None for the BM25 folder)."""
        out: dict[str, str | None] = {self.file: self.checksum, self.meta: self.meta_checksum}
        if self.refine_file:
            out[self.refine_file] = self.refine_checksum
        if self.bm25:
            out[self.bm25] = None
        return out


@dataclass(frozen=True)
class QuantizerEntry:
    """The trained template (coarse quantizer / codec) of the current generation."""

    file: str
    checksum: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "checksum": self.checksum}


@dataclass(frozen=True)
class Manifest(Mapping[str, Any]):
    """An index's manifest (see the module docstring).

    It is also a read-only mapping of its JSON form (``manifest["dim"]``) for scripts and
    notebooks that read ``manifest.json`` themselves; the package uses the attributes."""

    index_uuid: str
    dim: int
    metric: str
    factory: str
    spec: dict[str, Any]
    routing: dict[str, Any]
    shards: tuple[ShardEntry, ...]
    quantizer: QuantizerEntry | None
    generation: int
    wal_seq: int
    created_at: float
    updated_at: float
    ntotal: int = 0
    sharding: str | None = None
    #: the encoder that produced the vectors (``SentenceEncoder.describe``), canaries included
    embed: dict[str, Any] | None = None
    #: fields callers set (:data:`METADATA_FIELDS`): the tuned fusion and its evidence
    fusion: dict[str, Any] | None = None
    fusion_auto: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    #: keys this version does not know, kept as they are
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    #: the fields callers may set with ``DistributedIndex.set_metadata``; the index never
    #: reads them
    METADATA_FIELDS = frozenset({"fusion", "fusion_auto"})

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    @classmethod
    def from_json(cls, data: Any, where: str) -> Manifest:
        """Check a parsed manifest against the format (types, counts, version); CorruptIndex
        names the file and the rule it breaks."""
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
                f"(this dask-rag reads version {FORMAT_VERSION})")
        if data["dim"] <= 0:
            raise CorruptIndex(f"{where}: dim must be positive")
        if data["metric"] not in METRICS:
            raise CorruptIndex(f"{where}: metric {data['metric']!r} is not one of {METRICS}")
        if data["n_shards"] != len(data["shards"]) or data["n_shards"] < 1:
            raise CorruptIndex(f"{where}: n_shards does not match the shard list")
        shards = tuple(ShardEntry.from_json(s, where, i) for i, s in enumerate(data["shards"]))
        if data["routing"].get("sharding") not in RESOLVED_SHARDINGS:
            raise CorruptIndex(f"{where}: routing.sharding is invalid")
        q = data["quantizer"]
        if q is not None and not isinstance(q.get("file"), str):
            raise CorruptIndex(f"{where}: quantizer.file is missing or invalid")
        for key in ("embed", *cls.METADATA_FIELDS):
            if not isinstance(data.get(key), (dict, type(None))):
                raise CorruptIndex(f"{where}: manifest field {key!r} has the wrong type")
        known = {f.name for f in dataclasses.fields(cls)} | {"n_shards"}
        return cls(
            index_uuid=data["index_uuid"], dim=data["dim"], metric=data["metric"],
            factory=data["factory"], spec=data["spec"], routing=data["routing"],
            shards=shards,
            quantizer=None if q is None else QuantizerEntry(q["file"], q.get("checksum")),
            generation=data["generation"], wal_seq=data["wal_seq"],
            created_at=float(data["created_at"]),
            updated_at=float(data.get("updated_at") or data["created_at"]),
            ntotal=int(data.get("ntotal", sum(s.count for s in shards))),
            sharding=data.get("sharding"), embed=data.get("embed"),
            fusion=data.get("fusion"), fusion_auto=data.get("fusion_auto"),
            format_version=data["format_version"],
            extra={k: v for k, v in data.items() if k not in known})

    def to_json(self) -> dict[str, Any]:
        """The JSON object ``manifest.json`` holds."""
        out: dict[str, Any] = dict(self.extra)
        out.update(
            format_version=self.format_version, index_uuid=self.index_uuid, dim=self.dim,
            metric=self.metric, factory=self.factory, sharding=self.sharding,
            spec=self.spec, routing=self.routing, n_shards=self.n_shards,
            shards=[s.to_json() for s in self.shards], ntotal=self.ntotal,
            quantizer=None if self.quantizer is None else self.quantizer.to_json(),
            embed=self.embed, generation=self.generation, wal_seq=self.wal_seq,
            created_at=self.created_at, updated_at=self.updated_at)
        for key in self.METADATA_FIELDS:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def replace(self, **changes: Any) -> Manifest:
        """A copy with ``changes`` (shards given as entries keep ``ntotal`` in step)."""
        if "shards" in changes:
            changes["shards"] = tuple(changes["shards"])
            changes.setdefault("ntotal", sum(s.count for s in changes["shards"]))
        return dataclasses.replace(self, **changes)

    # ---- the read-only mapping of the JSON form ------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())
