"""Every file name inside an index location, and how names are read back: the one place.

Layout (see :mod:`dask_rag.index.store` for what each file holds and how it is committed)::

    manifest.json                    the commit point
    quantizer[.gG].faiss             trained template, generation G (none for G = 0)
    shards/NNNNN[.gG].faiss          shard NNNNN's faiss index
    shards/NNNNN[.gG].parquet        its records
    shards/NNNNN[.gG].refine.faiss   its refine store (IVF-PQ with refinement)
    shards/NNNNN[.gG].bm25/          its BM25 term statistics
    wal/SSSSSSSSSSSS.npz             one acknowledged mutation, sequence SSSSSSSSSSSS

A save or export writes the next generation's names beside the current ones (an object store
has no rename), commits the manifest, then deletes what the manifest does not name.  Writers
build names with the functions here and cleaners parse them back with the functions here, so a
rule can never drift between the two.
"""

from __future__ import annotations

import re

__all__ = [
    "MANIFEST",
    "QUANTIZER",
    "SHARDS_DIR",
    "WAL_DIR",
    "generation_of",
    "is_quantizer",
    "quantizer_name",
    "shard_file_names",
    "wal_name",
    "wal_seq_of",
]

MANIFEST = "manifest.json"
QUANTIZER = "quantizer.faiss"
SHARDS_DIR = "shards"
WAL_DIR = "wal"

_GENERATION = re.compile(r"\.g(\d+)(?=\.|$)")
_WAL = re.compile(r"^(\d{12})\.npz$")


def _suffix(generation: int) -> str:
    return "" if generation == 0 else f".g{generation}"


def shard_file_names(shard_no: int, generation: int) -> tuple[str, str, str, str]:
    """(faiss, records, refine store, BM25 directory) names of a shard's files."""
    base = f"{SHARDS_DIR}/{shard_no:05d}{_suffix(generation)}"
    return f"{base}.faiss", f"{base}.parquet", f"{base}.refine.faiss", f"{base}.bm25"


def quantizer_name(generation: int) -> str:
    """The trained template of ``generation``."""
    return f"quantizer{_suffix(generation)}.faiss"


def generation_of(name: str) -> int:
    """The generation a shard or quantizer file name belongs to (0 without a ``.gG`` part)."""
    m = _GENERATION.search(name)
    return int(m.group(1)) if m else 0


def is_quantizer(name: str) -> bool:
    """Whether a top-level name is a quantizer of some generation."""
    base = name.rsplit("/", 1)[-1]
    return base.startswith("quantizer") and base.endswith(".faiss")


def wal_name(seq: int) -> str:
    """The log entry of sequence number ``seq``."""
    return f"{WAL_DIR}/{seq:012d}.npz"


def wal_seq_of(name: str) -> int | None:
    """The sequence number of a log entry's name (a path or a bare name), or None for a
    file that is not one (a temporary file, say)."""
    m = _WAL.match(name.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None
