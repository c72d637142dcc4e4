"""Building an index's pieces: the trained template (coarse quantizer), the shard plan, each
shard's files, the manifest; and reading the router back from a manifest.

The driver (:class:`~dask_rag.index.distributed.DistributedIndex`) calls these; the shard files
are built by :func:`build_shard_files` as tasks on the workers, in parallel.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from distributed import Client, Future, wait

from dask_rag.cluster import current_workers
from dask_rag.config import IndexSpec
from dask_rag.errors import CorruptIndex, InvalidInput
from dask_rag.index import store
from dask_rag.index.backends import add_to_index, configure_faiss, new_refine_store, new_shard_index
from dask_rag.index.manifest import Manifest, QuantizerEntry, ShardEntry
from dask_rag.index.routing import Router, balance_lists, coarse_assign, range_boundaries
from dask_rag.index.shard import make_records_table

__all__ = ["build_shard_files", "jsonable_record", "load_router", "new_manifest", "plan_shards",
           "read_template", "router_from_manifest", "train_template", "wait_with_progress",
           "write_shards"]


def jsonable_record(r: dict[str, Any]) -> dict[str, Any]:
    out = {key: r.get(key) for key in ("text", "source", "metadata", "doc_hash")}
    if out["metadata"] is not None and not isinstance(out["metadata"], str):
        out["metadata"] = json.dumps(out["metadata"], sort_keys=True)
    return out


def train_template(spec: IndexSpec, xb: npt.NDArray[np.float32]) -> tuple[Any, bytes | None]:
    import faiss

    info = spec.info
    if info.kind != "ivf":
        return None, None
    metric = faiss.METRIC_INNER_PRODUCT if spec.metric == "ip" else faiss.METRIC_L2
    try:
        template = faiss.index_factory(xb.shape[1], info.base_factory, metric)
    except RuntimeError as exc:
        raise InvalidInput(f"faiss rejected factory {spec.factory!r}: "
                           f"{str(exc).splitlines()[0]}") from None
    rng = np.random.default_rng(spec.seed)
    n_train = min(xb.shape[0], max(spec.train_size, info.nlist * 39))
    sample = xb if n_train >= xb.shape[0] else xb[np.sort(rng.choice(xb.shape[0], n_train,
                                                                        replace=False))]
    template.train(sample)
    return template, faiss.serialize_index(template).tobytes()


def plan_shards(spec: IndexSpec, sharding: str, template: Any, xb: npt.NDArray[np.float32],
                 ids: npt.NDArray[np.int64]
                 ) -> tuple[Router, npt.NDArray[np.int32], npt.NDArray[np.int64] | None]:
    import faiss

    S = spec.n_shards
    # a copy the router owns: the template (and its quantizer with it) may be freed before it
    quantizer = None if template is None else faiss.clone_index(template.quantizer)
    if sharding == "ivf":
        # the list sizes decide the list -> shard map, so assign first (once)
        lists = coarse_assign(quantizer, xb)
        sizes = np.bincount(lists, minlength=spec.info.nlist).astype(np.int64)
        list_to_shard = balance_lists(sizes, S)
        router = Router("ivf", S, quantizer=quantizer, list_to_shard=list_to_shard)
        return router, list_to_shard[lists], lists
    if sharding == "hash":
        router = Router("hash", S, quantizer=quantizer)
    else:
        router = Router("range", S, quantizer=quantizer, boundaries=range_boundaries(ids, S))
    shard_of, assigned = router.assign(xb, ids)
    return router, shard_of, assigned


def build_shard_files(index_dir: str, shard_no: int, generation: int, index_uuid: str,
                      spec: IndexSpec, dim: int, template_bytes: bytes | None,
                      xb: npt.NDArray[np.float32], ids: npt.NDArray[np.int64],
                      lists: npt.NDArray[np.int64] | None,
                      records: list[dict[str, Any]] | None) -> ShardEntry:
    """Build one shard from its vectors and write its files (runs as a task on a worker)."""
    import faiss

    configure_faiss()
    template = None
    if template_bytes is not None:
        template = faiss.deserialize_index(np.frombuffer(template_bytes, dtype=np.uint8))
    index = new_shard_index(spec, dim, template)
    if len(ids):
        add_to_index(index, xb, ids, lists)
    refine = None
    if spec.info.refine:
        refine = new_refine_store(dim, spec.metric)
        if len(ids):
            refine.add_with_ids(np.ascontiguousarray(xb, np.float32), ids)
    table = make_records_table(ids, records)
    sparse = None
    if records is not None and any(r.get("text") for r in records):
        from dask_rag.index.sparse import SparseIndex

        sparse = SparseIndex.build(table.column("id").to_numpy(),
                                   table.column("text").to_pylist())
    return store.write_shard_files(index_dir, shard_no, generation, index_uuid, index,
                                   table, refine, sparse)


def new_manifest(index_uuid: str, spec: IndexSpec, dim: int, router: Router,
                 entries: Sequence[ShardEntry], embed: dict[str, Any] | None,
                 quantizer: QuantizerEntry | None, generation: int, wal_seq: int) -> Manifest:
    now = store.now()
    return Manifest(index_uuid=index_uuid, dim=dim, metric=spec.metric, factory=spec.factory,
                    sharding=router.sharding, spec=spec.to_dict(),
                    routing=router.to_manifest(), shards=tuple(entries),
                    ntotal=sum(e.count for e in entries), quantizer=quantizer, embed=embed,
                    generation=generation, wal_seq=wal_seq, created_at=now, updated_at=now)


def read_template(path: Path, entry: QuantizerEntry) -> Any:
    import faiss

    qpath = store.resolve_index_file(path, entry.file)
    if not qpath.is_file():
        raise CorruptIndex(f"{qpath}: quantizer file is missing")
    if store.file_checksum(qpath) != entry.checksum:
        raise CorruptIndex(f"{qpath}: quantizer checksum mismatch (truncated or from another "
                           "index)")
    try:
        template = faiss.read_index(str(qpath))
    except RuntimeError as exc:
        raise CorruptIndex(f"{qpath}: not a readable faiss index ({str(exc).splitlines()[0]})"
                           ) from None
    # faiss's python layer already returns the concrete class (IndexIVFFlat, IndexIVFPQ, ...)
    return template


def router_from_manifest(manifest: Manifest, spec: IndexSpec, template: Any,
                         where: str) -> Router:
    import faiss

    routing = manifest.routing
    # a copy the router owns: the template (and its quantizer with it) may be freed before it
    quantizer = None if template is None else faiss.clone_index(template.quantizer)
    try:
        if routing["sharding"] == "ivf":
            l2s = np.asarray(routing["list_to_shard"], dtype=np.int32)
            if quantizer is None or l2s.shape[0] != quantizer.ntotal or (
                    l2s.size and (l2s.min() < 0 or l2s.max() >= manifest.n_shards)):
                raise CorruptIndex(f"{where}: routing.list_to_shard does not match the quantizer")
            return Router("ivf", manifest.n_shards, quantizer=quantizer, list_to_shard=l2s)
        if routing["sharding"] == "range":
            return Router("range", manifest.n_shards, quantizer=quantizer,
                          boundaries=np.asarray(routing["boundaries"], dtype=np.int64))
        return Router("hash", manifest.n_shards, quantizer=quantizer)
    except (KeyError, TypeError, ValueError, InvalidInput) as exc:
        raise CorruptIndex(f"{where}: invalid routing ({exc})") from None


def load_router(index_dir: str) -> Router:
    """The router of the index at ``index_dir`` (the task behind an IVF index's router future:
    queries are routed where it lives, next to their embeddings, not in the client)."""
    manifest = store.read_manifest(index_dir)
    where = f"{index_dir}/{store.MANIFEST}"
    spec = IndexSpec.from_dict(manifest.spec)
    template = None
    if manifest.quantizer is not None:
        template = read_template(store.local_index_dir(index_dir, manifest, quantizer=True),
                                 manifest.quantizer)
    return router_from_manifest(manifest, spec, template, where)


def write_shards(client: Client, directory: str | Path, index_uuid: str, spec: IndexSpec,
                  dim: int, template_bytes: bytes | None, xb: npt.NDArray[np.float32],
                  ids: npt.NDArray[np.int64], shard_of: npt.NDArray[np.int32],
                  lists: npt.NDArray[np.int64] | None,
                  records: Sequence[dict[str, Any]] | None, progress: bool,
                  generation: int = 0) -> list[ShardEntry]:
    """Build and write every shard in parallel on the workers (each uploads its own shard's
    files when ``directory`` is an object-store URL)."""
    workers = current_workers(client)
    futures = []
    for s in range(spec.n_shards):
        m = shard_of == s
        recs = None if records is None else [dict(r) for r, keep in zip(records, m, strict=True)
                                             if keep]
        target = [workers[s % len(workers)]] if workers else None
        # one scattered object per shard: its vectors go straight to the worker that builds it
        [part] = client.scatter([(xb[m], ids[m], None if lists is None else lists[m], recs)],
                                workers=target, direct=True, hash=False)
        futures.append(client.submit(_build_shard_task, str(directory), s, generation,
                                     index_uuid, spec, dim, template_bytes, part,
                                     workers=target,
                                     allow_other_workers=target is not None, pure=False,
                                     key=(f"dask-rag-build-{index_uuid[:12]}", s)))
    wait_with_progress(futures, "building shards", progress)
    entries: list[ShardEntry] = client.gather(futures)
    return entries


def wait_with_progress(futures: list[Future], desc: str, progress: bool) -> None:
    """Wait for ``futures``, with a tqdm bar if asked."""
    if not progress:
        wait(futures)
        return
    from distributed import as_completed
    from tqdm.auto import tqdm

    with tqdm(total=len(futures), desc=desc, unit="shard") as bar:
        for _ in as_completed(futures):
            bar.update(1)


def _build_shard_task(directory: str, shard_no: int, generation: int, index_uuid: str,
                      spec: IndexSpec, dim: int, template_bytes: bytes | None,
                      part: tuple[Any, ...]) -> ShardEntry:
    """Build one shard of a new index from its scattered ``(xb, ids, lists, records)``."""
    xb, ids, lists, recs = part
    return build_shard_files(directory, shard_no, generation, index_uuid, spec, dim,
                             template_bytes, xb, ids, lists, recs)
