"""Which shard owns a vector, and which shards a query batch must visit.

Three sharding schemes:

``ivf``
    One coarse quantizer is trained once for the whole index; every shard owns a set of its
    inverted lists (balanced by list size).  A vector lives on the shard owning its list; a query
    batch is coarse-quantized *once*, centrally, and each shard receives only the query rows that
    probe one of its lists, together with those probes — so the union of the shards' answers is
    exactly what a single IVF index with the same quantizer and ``nprobe`` would return.
``hash``
    ``id % n_shards``; every query visits every shard.
``range``
    Contiguous id ranges (boundaries fixed at build time); every query visits every shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from dask_rag.config import RESOLVED_SHARDINGS
from dask_rag.errors import InvalidInput
from dask_rag.index.exact import ExactRescorer, FlatVectors

__all__ = [
    "RoutedBatch",
    "RoutedRows",
    "Router",
    "balance_lists",
    "coarse_assign",
    "plan_placement",
    "range_boundaries",
]

# faiss's IndexIVF::add_with_ids assigns in blocks of this many vectors; using the same block
# size makes our central assignment bit-identical to what a single IVF index computes.
_ASSIGN_BLOCK = 65_536


def balance_lists(list_sizes: npt.NDArray[np.int64], n_shards: int) -> npt.NDArray[np.int32]:
    """Map each inverted list to a shard so that shards hold similar numbers of vectors.

    Greedy longest-processing-time: lists in decreasing size go to the currently lightest shard
    (ties: fewest lists, then lowest shard number).  Deterministic.
    """
    nlist = int(list_sizes.shape[0])
    if n_shards > nlist:
        raise InvalidInput(
            f"n_shards={n_shards} is larger than the number of inverted lists ({nlist}); "
            "every IVF shard must own at least one list"
        )
    order = np.lexsort((np.arange(nlist), -list_sizes.astype(np.int64)))
    load = np.zeros(n_shards, dtype=np.int64)
    count = np.zeros(n_shards, dtype=np.int64)
    owner = np.empty(nlist, dtype=np.int32)
    for lst in order:
        s = int(np.lexsort((np.arange(n_shards), count, load))[0])
        owner[lst] = s
        load[s] += int(list_sizes[lst])
        count[s] += 1
    return owner


def coarse_assign(quantizer: Any, xb: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    """Nearest coarse centroid of every vector, computed in faiss's own block size."""
    out = np.empty(xb.shape[0], dtype=np.int64)
    for start in range(0, xb.shape[0], _ASSIGN_BLOCK):
        block = xb[start:start + _ASSIGN_BLOCK]
        _, idx = quantizer.search(block, 1)
        out[start:start + block.shape[0]] = idx[:, 0]
    return out


def range_boundaries(ids: npt.NDArray[np.int64], n_shards: int) -> npt.NDArray[np.int64]:
    """Lower id bound of shards 1..S-1, at the quantiles of ``ids`` (so shards start balanced)."""
    if ids.size == 0:
        return np.zeros(n_shards - 1, dtype=np.int64)
    srt = np.sort(ids)
    cuts = [srt[min(len(srt) - 1, (len(srt) * s) // n_shards)] for s in range(1, n_shards)]
    return np.asarray(cuts, dtype=np.int64)


@dataclass(frozen=True)
class RoutedRows:
    """The part of a query batch one shard must answer.

    ``rows`` index into the batch and ``xq`` holds their vectors (None for a BM25-only batch);
    ``Iq``/``Dq`` are the coarse probes of those rows with lists owned by other shards replaced
    by ``-1`` (faiss skips them), or ``None`` for shards without a coarse quantizer.
    """

    shard: int
    rows: npt.NDArray[np.int64]
    xq: npt.NDArray[np.float32] | None
    Iq: npt.NDArray[np.int64] | None
    Dq: npt.NDArray[np.float32] | None


@dataclass(frozen=True)
class RoutedBatch:
    """A whole query batch with its coarse probes: what a route task hands every shard's
    search task, each of which keeps its own part (:meth:`for_shard`)."""

    xq: npt.NDArray[np.float32]
    Iq: npt.NDArray[np.int64] | None = None
    Dq: npt.NDArray[np.float32] | None = None
    #: shard owning each probed list (ivf sharding), or None: every shard answers every row
    owner: npt.NDArray[np.int32] | None = None

    def for_shard(self, shard: int) -> RoutedRows:
        nq = self.xq.shape[0]
        if self.owner is None:
            return RoutedRows(shard, np.arange(nq, dtype=np.int64), self.xq, self.Iq, self.Dq)
        assert self.Iq is not None and self.Dq is not None
        mine = self.owner == shard
        rows = np.flatnonzero(mine.any(axis=1)).astype(np.int64)
        return RoutedRows(shard, rows, self.xq[rows], np.where(mine[rows], self.Iq[rows], -1),
                          self.Dq[rows])

    def shards(self, n_shards: int) -> list[int]:
        """The shards with at least one row to answer."""
        if self.owner is None:
            return list(range(n_shards))
        return [int(s) for s in np.unique(self.owner[self.owner >= 0])]


class Router:
    """Shard assignment for vectors and shard selection for query batches."""

    def __init__(self, sharding: str, n_shards: int, *, quantizer: Any = None,
                 list_to_shard: npt.NDArray[np.int32] | None = None,
                 boundaries: npt.NDArray[np.int64] | None = None) -> None:
        if sharding not in RESOLVED_SHARDINGS:
            raise InvalidInput(
                f"sharding={sharding!r} is invalid: must be 'ivf', 'hash' or 'range'")
        if sharding == "ivf" and (quantizer is None or list_to_shard is None):
            raise InvalidInput("ivf sharding needs a trained quantizer and a list-to-shard map")
        if sharding == "range" and boundaries is None:
            raise InvalidInput("range sharding needs shard boundaries")
        self.sharding = sharding
        self.n_shards = n_shards
        self.quantizer = quantizer
        self.list_to_shard = None if list_to_shard is None else np.asarray(list_to_shard, np.int32)
        self.boundaries = None if boundaries is None else np.asarray(boundaries, np.int64)
        self._rescorer: ExactRescorer | None = None

    # ---- vectors -> shards ---------------------------------------------------------------

    def assign(self, xb: npt.NDArray[np.float32], ids: npt.NDArray[np.int64]
               ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64] | None]:
        """Shard number of every vector, and its inverted list (IVF factories) or None.

        The lists are computed here, centrally, whatever the sharding, so that a shard stores
        each vector in exactly the list the query router will probe for it.
        """
        lists = None if self.quantizer is None else coarse_assign(self.quantizer, xb)
        if self.sharding == "ivf":
            assert self.list_to_shard is not None and lists is not None
            return self.list_to_shard[lists], lists
        if self.sharding == "hash":
            return (ids % self.n_shards).astype(np.int32), lists
        assert self.boundaries is not None
        return np.searchsorted(self.boundaries, ids, side="right").astype(np.int32), lists

    # ---- queries -> shards ---------------------------------------------------------------

    def probe(self, xq: npt.NDArray[np.float32], nprobe: int
              ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Coarse-quantize a query batch once: ``(Dq, Iq)`` of shape ``(nq, nprobe)``, the
        ``nprobe`` nearest centroids by exact distance (ties by list number), so a query
        probes the same lists whatever else is in its batch (see :mod:`dask_rag.index.exact`).
        """
        assert self.quantizer is not None
        nprobe = min(nprobe, int(self.quantizer.ntotal))
        return self._centroids().search(np.ascontiguousarray(xq, dtype=np.float32), nprobe)

    def _centroids(self) -> ExactRescorer:
        if self._rescorer is None:
            n = int(self.quantizer.ntotal)
            store = FlatVectors(np.arange(n, dtype=np.int64),
                                np.asarray(self.quantizer.reconstruct_n(0, n), dtype=np.float32))
            metric = "ip" if int(self.quantizer.metric_type) == 0 else "l2"
            self._rescorer = ExactRescorer(store, metric, self.quantizer.search, n,
                                           lambda: np.arange(n, dtype=np.int64))
        return self._rescorer

    def route(self, xq: npt.NDArray[np.float32], nprobe: int | None) -> RoutedBatch:
        """Coarse-quantize a query batch once (with a quantizer and ``nprobe``); with ``ivf``
        sharding, record which shard owns each probe, so each shard gets only its rows."""
        if self.quantizer is None or nprobe is None:
            return RoutedBatch(xq)
        Dq, Iq = self.probe(xq, nprobe)
        if self.sharding != "ivf":
            return RoutedBatch(xq, Iq, Dq)
        assert self.list_to_shard is not None
        owner = np.where(Iq >= 0, self.list_to_shard[np.maximum(Iq, 0)], -1).astype(np.int32)
        return RoutedBatch(xq, Iq, Dq, owner)

    def to_manifest(self) -> dict[str, Any]:
        data: dict[str, Any] = {"sharding": self.sharding}
        if self.list_to_shard is not None:
            data["list_to_shard"] = self.list_to_shard.tolist()
        if self.boundaries is not None:
            data["boundaries"] = self.boundaries.tolist()
        return data


def plan_placement(current: dict[tuple[int, int], str | None], workers: list[str],
                   hosts: dict[str, str]) -> dict[tuple[int, int], str]:
    """Where each replica ``(shard, replica)`` should live: the moves (slot → worker) from
    ``current`` (slot → its worker, None if it has none) that spread the slots evenly over
    ``workers`` — each ends with ``floor`` or ``ceil`` of ``slots / workers`` — with the
    replicas of one shard on different workers, and on different hosts when ``hosts``
    (worker → host) allows; distinct hosts come before an even spread.  Deterministic, and
    a slot that may stay where it is stays."""
    if not workers:
        return {}
    slots = sorted(current)
    floor, extra = divmod(len(slots), len(workers))
    cap = floor + (1 if extra else 0)
    load = {w: 0 for w in workers}
    placed: dict[tuple[int, int], str] = {}
    full = [0]  # workers holding floor + 1: at most ``extra`` of them (else one ends below floor)

    def room(w: str) -> bool:
        return load[w] < floor or (load[w] < cap and full[0] < extra)

    def place(slot: tuple[int, int], w: str) -> None:
        placed[slot] = w
        load[w] += 1
        if load[w] > floor:
            full[0] += 1

    def siblings(slot: tuple[int, int]) -> list[str]:
        return [w for (s, r), w in placed.items() if s == slot[0] and r != slot[1]]

    spread_hosts = len({hosts.get(w, w) for w in workers}) > 1
    for slot in slots:  # keep what may stay
        w = current[slot]
        if w is None:
            continue
        same_host = spread_hosts and hosts.get(w, w) in {hosts.get(x, x) for x in siblings(slot)}
        if w in load and room(w) and w not in siblings(slot) and not same_host:
            place(slot, w)
    order = {w: i for i, w in enumerate(workers)}
    for slot in slots:
        if slot in placed:
            continue
        taken = siblings(slot)
        taken_hosts = {hosts.get(w, w) for w in taken}
        # a replica on another host first (a host's loss must not take every copy), then
        # the even spread
        place(slot, min(workers, key=lambda w: (
            w in taken, hosts.get(w, w) in taken_hosts, not room(w), load[w], order[w])))
    return {slot: w for slot, w in placed.items() if current[slot] != w}
