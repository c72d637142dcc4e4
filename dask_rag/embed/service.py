"""Embedding on Dask workers: the model is loaded once per worker, texts travel in batches.

``embed_texts_task`` is the one task that turns texts into vectors; ingestion maps it over
chunk batches, and :class:`EmbeddingService` feeds it from the async micro-batcher so that
concurrent single-text requests (HTTP ``/v1/embed``, query embedding) share model calls.

Canaries: when the config carries an index's :class:`~dask_rag.config.EncoderCanaries`, a
worker checks its encoder against them once (the verdict is cached with the model) and
refuses to embed for that index if its vectors differ (:class:`EncoderMismatch`); the
service checks every worker up front and places embedding only on those that match, so a
cluster with one mismatched worker answers exactly like a healthy one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from distributed import Client, Future

from dask_rag.batching import MicroBatcher
from dask_rag.cluster.futures import (
    DIRECT_TIMEOUT_S,
    ActorCall,
    actor_on,
    await_actor_calls,
    await_future,
    falls_back,
)
from dask_rag.cluster.plugins import ensure_model_cache, worker_model_cache
from dask_rag.cluster.sync import synchronous
from dask_rag.config import BatchConfig, EmbedConfig
from dask_rag.embed.encoder import (
    CanaryVerdict,
    SentenceEncoder,
    check_canaries,
    resolve_config,
    resolve_model_path,
)
from dask_rag.errors import EncoderMismatch, InvalidInput
from dask_rag.faults import fault_point

__all__ = ["TEXT_FIXED_COST", "EmbedHere", "EmbeddingService", "canary_check_task",
           "embed_texts_task", "encoder_info_task", "split_balanced", "split_weighted",
           "text_costs", "water_fill", "worker_encoder"]


log = logging.getLogger("dask_rag.embed")


def _loaded_encoder(config: EmbedConfig) -> SentenceEncoder:
    resolved = resolve_config(config)
    enc: SentenceEncoder = worker_model_cache().get(("encoder", resolved),
                                                    lambda: SentenceEncoder(resolved))
    return enc


def worker_encoder(config: EmbedConfig, check: bool = True) -> SentenceEncoder:
    """The encoder for ``config`` on this worker (loaded on first use, then cached under the
    config with ``"auto"`` resolved, so ``precision="auto"`` and the precision it means here
    share one model).  With canaries in ``config``, an encoder that does not reproduce them
    raises :class:`EncoderMismatch` instead of embedding (``check=False``: for its tokenizer
    only, e.g. chunking, which the canaries do not concern)."""
    enc = _loaded_encoder(config)
    if check and config.canaries is not None:
        verdict = _canary_verdict(enc, config)
        if not verdict.ok:
            raise EncoderMismatch(f"worker {_worker_name()}: {verdict.detail}")
    return enc


def _canary_verdict(enc: SentenceEncoder, config: EmbedConfig) -> CanaryVerdict:
    """This worker's verdict on ``config.canaries``, checked once and cached with the model."""
    canaries = config.canaries
    assert canaries is not None

    def check() -> CanaryVerdict:
        verdict = check_canaries(enc, canaries)
        if not verdict.ok:
            log.warning("worker %s does not embed for indexes with canaries %s: %s",
                        _worker_name(), canaries.digest, verdict.detail)
        return verdict

    key = ("canaries", resolve_config(config), canaries.digest)
    result: CanaryVerdict = worker_model_cache().get(key, check)
    return result


def _worker_name() -> str:
    from distributed import get_worker

    try:
        return str(get_worker().address)
    except ValueError:
        return "(not a worker)"


def canary_check_task(config: EmbedConfig) -> tuple[str, CanaryVerdict]:
    """(this worker's address, its verdict on ``config.canaries``)."""
    return _worker_name(), _canary_verdict(_loaded_encoder(config), config)


def embed_texts_task(config: EmbedConfig, texts: list[str]) -> npt.NDArray[np.float32]:
    fault_point("embed.batch")
    return worker_encoder(config).encode(texts)


@dataclass(frozen=True)
class EmbedHere:
    """Texts to embed inside whatever task calls this (e.g. each shard's search task: for a
    small batch, embedding it again on every shard's worker costs a few milliseconds of
    compute in parallel and saves the scheduling round trip of an embedding task)."""

    config: EmbedConfig
    texts: tuple[str, ...]

    def __call__(self) -> npt.NDArray[np.float32]:
        return embed_texts_task(self.config, list(self.texts))


class EncoderActor:
    """A worker's encoder called by the client directly (a Dask actor): a batch of texts
    embedded without a trip through the scheduler.

    Measured at concurrency 1, ``POST /v1/embeddings`` took ~14.5 ms against an encoder of
    ~5.3 ms (``benchmarks/limit.py``): most of the rest was the embedding task's way through
    the scheduler, which a dense search had already avoided (its small batches embed in the
    shard searcher actors).  Same function, same vectors: the actor calls
    :func:`embed_texts_task` on the worker's cached encoder."""

    def embed(self, config: EmbedConfig, texts: list[str]) -> npt.NDArray[np.float32]:
        return embed_texts_task(config, texts)


def encoder_info_task(config: EmbedConfig, with_canaries: bool = False) -> dict[str, Any]:
    """What a manifest records about ``config``'s encoder on this worker; ``with_canaries``:
    also its :class:`~dask_rag.config.EncoderCanaries` (for a new index)."""
    enc = worker_encoder(config)
    info = enc.describe()
    if with_canaries:
        info["canaries"] = enc.canaries().to_manifest()
    return info


def _encoder_counters_task(config: EmbedConfig) -> tuple[int, int, int]:
    enc = _loaded_encoder(config)
    return enc.encode_calls, enc.texts_encoded, enc.model_calls


def encoder_counters(client: Client, config: EmbedConfig) -> tuple[int, int]:
    """(encode calls, texts encoded) by ``config``'s encoder, summed over every worker.

    An encode call is one micro-batch (one task); it runs ``ceil(n / batch_size)`` forwards.
    """
    workers = list(client.scheduler_info(n_workers=-1)["workers"])
    futs = [client.submit(_encoder_counters_task, config, workers=[w], pure=False,
                          allow_other_workers=False) for w in workers]
    res = client.gather(futs)
    return int(sum(r[0] for r in res)), int(sum(r[1] for r in res))


class EmbeddingService:
    """Micro-batched embedding on the cluster.

    ``await service.aembed(text)`` from many coroutines at once: texts are grouped by the
    :class:`~dask_rag.batching.MicroBatcher`; each group is split across the workers, one
    ``embed_texts_task`` each.  ``service.embed_now(texts)`` embeds a list directly.
    """

    def __init__(self, client: Client, config: EmbedConfig | None = None,
                 batch: BatchConfig | None = None) -> None:
        self.client = client
        self.config = config or EmbedConfig()
        resolve_model_path(self.config.model)  # a bad path fails here, before any task
        ensure_model_cache(client)
        #: canary verdicts by worker address (only with canaries); checks still running
        self.verdicts: dict[str, CanaryVerdict] = {}
        self._checking: dict[str, Future] = {}
        self._verdict_lock = threading.Lock()
        self._workers: list[str] = []
        self._workers_checked = -1e9
        if self.config.canaries is not None:
            self._refresh_workers(wait=True)
            if not self.healthy_workers():
                raise EncoderMismatch(self.mismatch_summary())
        info_at = self.healthy_workers() if self.config.canaries is not None else None
        self.info: dict[str, Any] = client.submit(encoder_info_task, self.config, pure=False,
                                                  workers=info_at).result()
        self.dim = int(self.info["dim"])
        #: split batches across workers only in parts of at least this many texts
        self.min_part = 8
        #: the direct path: a part goes to a worker only if it holds at least this many texts'
        #: worth of work (a call costs ~1 ms of round trip and a little CPU on both ends)
        self.min_direct_part = 2
        self._tokenizer: Any = None
        #: encoder actors' proxies by worker (the direct path), and the work (text_costs)
        #: sent to each and not answered yet
        self._actors: dict[str, Any] = {}
        self._actor_key = f"dask-rag-encoder-{uuid.uuid4().hex}"
        self._turn = 0
        self._load: dict[str, float] = {}
        self._load_lock = threading.Lock()
        self.batcher: MicroBatcher[str, npt.NDArray[np.float32]] = MicroBatcher(
            self._process, batch or BatchConfig(), name="embed")

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """How many tokens the encoder reads of each text (special tokens included, cut at
        its maximum sequence length) — what ``usage`` reports.  The tokenizer is loaded here
        once (no model weights), so counting costs no trip to the workers."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                resolve_model_path(self.config.model), local_files_only=True)
        limit = int(self.info.get("max_seq_length") or 512)
        enc = self._tokenizer(list(texts), truncation=True, max_length=limit, padding=False,
                              verbose=False)
        return [len(ids) for ids in enc["input_ids"]]

    def warmup(self) -> None:
        """Load the model on every worker now rather than on the first request (and, with
        canaries, check every worker's encoder against them)."""
        if self.config.canaries is not None:
            self._refresh_workers(wait=True)
            return
        workers = list(self.client.scheduler_info(n_workers=-1)["workers"])
        futs = [self.client.submit(encoder_info_task, self.config, workers=[w], pure=False,
                                   allow_other_workers=False) for w in workers]
        self.client.gather(futs)

    # ---- canaries -----------------------------------------------------------------------------

    def _refresh_workers(self, wait: bool = False) -> list[str]:
        """The cluster's workers (a scheduler round trip at most every few seconds); with
        canaries, a check is started on each worker not seen before (``wait``: and awaited)."""
        now = time.monotonic()
        if wait or now - self._workers_checked > 5.0:
            self._workers = list(self.client.scheduler_info(n_workers=-1)["workers"])
            self._workers_checked = now
            if self.config.canaries is not None:
                self._check_new_workers(wait)
        return self._workers

    def _check_new_workers(self, wait: bool) -> None:
        current = set(self._workers)
        with self._verdict_lock:
            for gone in set(self.verdicts) - current:
                del self.verdicts[gone]
            new = [w for w in self._workers
                   if w not in self.verdicts and w not in self._checking]
            for w in new:
                fut = self.client.submit(canary_check_task, self.config, workers=[w],
                                         allow_other_workers=False, pure=False, priority=20)
                self._checking[w] = fut
                fut.add_done_callback(lambda f, w=w: self._record_verdict(w, f))
            pending = list(self._checking.values())
        if wait and pending:
            for f in pending:  # (distributed.wait would use the default client, not ours)
                with contextlib.suppress(Exception):  # a worker lost mid-check: checked later
                    f.result(timeout=600)
            for w, f in list(self._checking.items()):  # callbacks may lag behind result()
                self._record_verdict(w, f)

    def _record_verdict(self, worker: str, fut: Future) -> None:
        with self._verdict_lock:
            if self._checking.get(worker) is not fut:
                return
            if fut.status == "finished":
                _, verdict = fut.result()
                self.verdicts[worker] = verdict
                if not verdict.ok:
                    log.warning("worker %s is not used to embed: %s", worker, verdict.detail)
            elif fut.status in ("error", "cancelled", "lost"):
                pass  # the worker went away mid-check: checked again if it comes back
            else:
                return
            del self._checking[worker]

    def mismatched_workers(self) -> dict[str, CanaryVerdict]:
        """Workers whose encoder does not reproduce the canaries, with their verdicts."""
        self._refresh_workers()
        with self._verdict_lock:
            return {w: v for w, v in self.verdicts.items() if not v.ok}

    def healthy_workers(self) -> list[str]:
        """Workers that may embed for this config: all but those whose encoder failed the
        canaries.  A worker not checked yet is included: its embedding tasks check it
        themselves and raise rather than embed differently."""
        bad = self.mismatched_workers()
        return [w for w in self._workers if w not in bad]

    def embeds_everywhere(self) -> bool:
        """True when every current worker is known to embed alike (then any task may embed
        where it runs: a small batch is embedded in the shards' own tasks)."""
        if self.config.canaries is None:
            return True
        workers = self._refresh_workers()
        with self._verdict_lock:
            return all((v := self.verdicts.get(w)) is not None and v.ok for w in workers)

    def mismatch_summary(self) -> str:
        bad = self.mismatched_workers()
        total = len(self._workers)
        if not bad:
            return f"encoder canaries match on {total - len(self._checking)} of {total} workers"
        first = next(iter(bad.values()))
        return (f"{len(bad)} of {total} workers' encoders do not reproduce the index's "
                f"canary vectors and do not embed for it ({', '.join(sorted(bad))}): "
                f"{first.detail}")

    def counters(self) -> tuple[int, int]:
        """(encode calls, texts encoded) summed over the cluster's encoders."""
        return encoder_counters(self.client, self.config)

    def submit(self, texts: Sequence[str]) -> list[tuple[Future, npt.NDArray[np.int64]]]:
        """One embed task per worker's share of ``texts``: ``(future, rows)`` pieces, each
        future holding the vectors of the texts at positions ``rows`` — the form
        :meth:`~dask_rag.index.distributed.DistributedIndex.submit_search` takes, so query
        vectors go from the embedding tasks to the search tasks without visiting the client.

        A batch is split across the workers so that all of them encode at once: on CPU the
        encoder is compute-bound, and one task would leave the other workers idle.  The batch
        is sorted by cost (:func:`text_costs`) and cut into contiguous runs of about equal
        cost, so the workers finish together.  (Vectors do not depend on the split: the
        default encoder is batch-invariant.)
        """
        _, restrict, rows = self._split(texts)
        # one map call: one update_graph message for all the parts
        futures = self.client.map(embed_texts_task, [self.config] * len(rows),
                                  [[texts[i] for i in r] for r in rows], pure=False, priority=5,
                                  workers=restrict, allow_other_workers=False)
        return list(zip(futures, rows, strict=True))

    def _split(self, texts: Sequence[str]
               ) -> tuple[list[str], list[str] | None, list[npt.NDArray[np.int64]]]:
        """The workers that may embed, the restriction to them (None: any), and ``texts``'
        positions cut into one run per worker that will embed (see :meth:`submit`)."""
        workers, restrict, order, costs = self._ordered(texts)
        n_parts = max(1, min(len(workers), len(texts) // self.min_part))
        parts = split_balanced(costs, n_parts)
        return workers, restrict, [order[a:b] for a, b in parts]

    def _ordered(self, texts: Sequence[str]) -> tuple[list[str], list[str] | None,
                                                      npt.NDArray[np.int64],
                                                      npt.NDArray[np.float64]]:
        """The workers that may embed, the restriction to them (None: any), the texts'
        positions by decreasing cost and those costs (:func:`text_costs`)."""
        texts = _check_texts(texts)
        bad = self.mismatched_workers()
        workers = [w for w in self._workers if w not in bad]
        if self.config.canaries is not None and not workers:
            raise EncoderMismatch(self.mismatch_summary())
        restrict = workers if bad else None
        costs = text_costs(texts)
        order = np.argsort(-costs, kind="stable").astype(np.int64)
        return workers, restrict, order, costs[order]

    def _assign(self, texts: Sequence[str]) -> list[tuple[str, npt.NDArray[np.int64],
                                                           float]]:
        """The direct path's parts of ``texts``: ``(worker, positions, cost)`` each, cut so
        that the workers finish together, counting the work each one still has from earlier
        batches (:func:`water_fill`), and booked against them until answered.

        Why: parts of equal size, handed out in turn, left a worker idle a third of the time
        at 64 clients (``POST /v1/embeddings``, 2 workers: one busy 98 %, the other 64-77 %).
        The wave split sends batches of alternating sizes, a batch too small to split went to
        the same worker each time, and the longer half of a batch (cut by characters, while
        a text's encode is mostly a fixed cost) finished ~40 % later than the other."""
        workers, _, order, costs = self._ordered(texts)
        if not workers:
            return []
        turn, self._turn = self._turn, self._turn + 1
        workers = workers[turn % len(workers):] + workers[:turn % len(workers)]  # ties rotate
        total = float(costs.sum())
        with self._load_lock:
            for gone in set(self._load) - set(workers):
                del self._load[gone]
            loads = [self._load.get(w, 0.0) for w in workers]
            shares = water_fill(loads, total, self.min_direct_part * total / len(texts))
            used = [i for i in sorted(range(len(workers)), key=lambda i: loads[i])
                    if shares[i] > 0]
            runs = split_weighted(costs, [shares[i] for i in used])
            out = []
            for i, (a, b) in zip(used, runs, strict=True):
                cost = float(costs[a:b].sum())
                self._load[workers[i]] = self._load.get(workers[i], 0.0) + cost
                out.append((workers[i], order[a:b], cost))
        return out

    def busy(self) -> bool:
        """Whether the encoder actors have work sent and not answered yet."""
        with self._load_lock:  # (another thread's _assign may add or drop a worker)
            return any(v > 0 for v in self._load.values())

    def _unload(self, worker: str, cost: float) -> None:
        with self._load_lock:
            if worker in self._load:
                self._load[worker] = max(0.0, self._load[worker] - cost)

    async def _aembed_direct(self, texts: list[str]) -> npt.NDArray[np.float32] | None:
        """``texts`` embedded by the workers' :class:`EncoderActor` s, one call per part
        (:meth:`_assign`); None when that path failed (a worker or its actor gone): the
        caller submits tasks."""
        parts = self._assign(texts)
        if not parts:
            return None
        booked = set(range(len(parts)))

        def unload(i: int) -> None:  # once per part: on the client's loop or on this one
            try:
                booked.remove(i)  # (atomic: only one of the two threads gets past it)
            except KeyError:
                return
            self._unload(parts[i][0], parts[i][2])

        try:
            calls = []
            for worker, rows, _ in parts:
                actor = self._actors.get(worker)
                if actor is None:
                    actor = self._actors[worker] = actor_on(
                        self.client, EncoderActor, worker, f"{self._actor_key}-{worker}")
                calls.append(ActorCall(actor, "embed", (self.config, [texts[j] for j in rows])))
            vectors = await await_actor_calls(self.client, calls, DIRECT_TIMEOUT_S, unload)
        except Exception as exc:
            if not falls_back(exc):  # (else the texts go to tasks)
                raise
            self._actors = {}
            return None
        finally:
            for i in range(len(parts)):  # (calls never sent, or a timeout)
                unload(i)
        return self._assemble(len(texts), vectors, [rows for _, rows, _ in parts])

    def here(self, texts: Sequence[str]) -> EmbedHere:
        """``texts`` to be embedded in the task that needs them (see :class:`EmbedHere`)."""
        return EmbedHere(self.config, tuple(_check_texts(texts)))

    def _assemble(self, n: int, parts: Sequence[npt.NDArray[np.float32]],
                  rows: Sequence[npt.NDArray[np.int64]]) -> npt.NDArray[np.float32]:
        out = np.empty((n, self.dim), dtype=np.float32)
        for part, r in zip(parts, rows, strict=True):
            out[r] = part
        return out

    async def aembed_now(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embed a batch on the cluster: through the workers' encoder actors (no scheduler
        trip; the parts run in parallel), or as tasks when that path fails."""
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        direct = await self._aembed_direct(texts)
        if direct is not None:
            return direct
        pieces = self.submit(texts)
        parts = await asyncio.gather(*(await_future(f) for f, _ in pieces))
        return self._assemble(len(texts), parts, [r for _, r in pieces])

    embed_now = synchronous(aembed_now)

    async def aembed(self, text: str) -> npt.NDArray[np.float32]:
        if not isinstance(text, str):
            raise InvalidInput(f"text must be a string, got {type(text).__name__}")
        return await self.batcher.submit(text)

    async def _process(self, texts: list[str]) -> list[npt.NDArray[np.float32]]:
        return list(await self.aembed_now(texts))

    async def aclose(self) -> None:
        await self.batcher.close()


#: the cost of encoding one text, in characters: a fixed part (one forward's set-up, pooling,
#: the call) plus the text's length.  Measured with the default int8 ONNX encoder on one core:
#: 3.8 ms at 10 characters, 5.0 at 50, 7.1 at 100, 11.3 at 200, 39.8 at 800 — about
#: 0.047 ms per character plus 2.8 ms, i.e. 60 characters' worth.  Cutting batches of short
#: queries by length alone gave one worker 11 texts and the other 31.
TEXT_FIXED_COST = 60


def text_costs(texts: Sequence[str]) -> npt.NDArray[np.float64]:
    """Each text's estimated encoding cost (see :data:`TEXT_FIXED_COST`)."""
    return np.fromiter((TEXT_FIXED_COST + len(t) for t in texts), dtype=np.float64,
                       count=len(texts))


def water_fill(loads: Sequence[float], total: float, min_share: float) -> list[float]:
    """How much of ``total`` new work each worker gets, given the work ``loads`` each one
    still has: the least loaded are filled to one common level (so all finish together), and
    a worker whose share would be under ``min_share`` gets none (its share goes to the others;
    the least loaded worker always gets work)."""
    n = len(loads)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: loads[i])
    use = n
    while True:
        below = 0.0
        for j in range(1, use + 1):
            below += loads[order[j - 1]]
            level = (total + below) / j
            if j == use or level <= loads[order[j]]:
                break
        shares = [0.0] * n
        for i in order[:j]:
            shares[i] = level - loads[i]
        if j == 1 or min(shares[i] for i in order[:j]) >= min_share:
            return shares
        use = j - 1  # the most loaded of those filled gets nothing


def split_weighted(costs: npt.NDArray[Any], shares: Sequence[float]
                   ) -> list[tuple[int, int]]:
    """Cut ``costs`` (in order) into ``len(shares)`` non-empty contiguous runs whose sums are
    about proportional to ``shares`` (at most ``len(costs)`` runs)."""
    n = len(costs)
    n_parts = max(1, min(len(shares), n))
    if n_parts == 1:
        return [(0, n)]
    weights = np.asarray(shares[:n_parts], dtype=np.float64)
    cum = np.cumsum(costs, dtype=np.float64)
    targets = cum[-1] * np.cumsum(weights)[:-1] / weights.sum()
    # a run ends after the item whose middle is past its target
    cuts = np.searchsorted(cum - np.asarray(costs, dtype=np.float64) / 2, targets,
                           side="left")
    bounds = [0]
    for i, c in enumerate(cuts.tolist()):  # strictly increasing, leaving room for the rest
        bounds.append(int(min(max(c, bounds[-1] + 1), n - (n_parts - 1 - i))))
    bounds.append(n)
    return list(itertools.pairwise(bounds))


def split_balanced(costs: npt.NDArray[Any], n_parts: int) -> list[tuple[int, int]]:
    """Cut ``costs`` (in order) into ``n_parts`` non-empty contiguous runs of about equal sum."""
    return split_weighted(costs, [1.0] * max(1, n_parts))


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise InvalidInput("expected a list of strings, got a single string")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise InvalidInput(f"text {i} is {type(t).__name__}, not a string")
    return out
