#!/usr/bin/env python
"""The peer of #30: dask-rag's serving job written the obvious way, in one process.

What a user would build instead of dask-rag on one machine: a Starlette app on uvicorn, the
index's own encoder (the settings its manifest records: the same ONNX model and precision
dask-rag serves), ``faiss.IndexFlatIP`` over the index's vectors and the chunk texts in a
dict, all in this process.  Two variants (``--batch``):

* ``off``: each request encodes its query and searches on its own, in a thread of the default
  executor (ONNX Runtime and faiss release the GIL, so concurrent requests overlap);
* ``on``: a simple asyncio micro-batcher — requests waiting at most 2 ms, at most 64 per batch,
  encoded and searched as one batch in a thread, one batch at a time.

Routes (the bodies dask-rag takes): ``POST /v1/embeddings`` ``{"input": str}`` and
``POST /v1/search`` ``{"query": str, "k": int}`` (dense; ids, scores and texts).

    python -m benchmarks.peer_server --index .demo-index --port 8100 [--batch on]
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import numpy as np

#: the micro-batcher variant: how long the first request of a batch waits, and a batch's size
BATCH_WAIT_S = 0.002
BATCH_MAX = 64


class PeerIndex:
    """The index's vectors in one ``IndexFlatIP`` and its chunks' texts, with its encoder."""

    def __init__(self, index_dir: Path) -> None:
        import faiss

        from dask_rag.embed.encoder import SentenceEncoder, recorded_config
        from dask_rag.index import store
        from dask_rag.index.shard import ShardRef, load_shard

        manifest = store.read_manifest(index_dir)
        ids, vectors, self.texts = [], [], {}
        for no in range(manifest.n_shards):
            shard = load_shard(ShardRef(str(index_dir), no, manifest.index_uuid))
            flat = shard.flat_view()
            ids.append(flat.ids)
            vectors.append(np.array(flat.vectors, dtype=np.float32))
            for rec_id, rec in zip(flat.ids.tolist(), shard.fetch(flat.ids), strict=True):
                self.texts[rec_id] = rec["text"] if rec else ""
        self.ids = np.concatenate(ids)
        self.index = faiss.IndexFlatIP(manifest.dim)
        self.index.add(np.concatenate(vectors))
        self.encoder = SentenceEncoder(recorded_config(manifest.embed or {}))

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.encoder.encode(texts), dtype=np.float32)

    def search(self, texts: list[str], k: int) -> list[list[dict[str, Any]]]:
        scores, rows = self.index.search(self.embed(texts), k)
        return [[{"id": int(self.ids[r]), "score": float(s), "text": self.texts[int(self.ids[r])]}
                 for s, r in zip(srow, rrow, strict=True) if r >= 0]
                for srow, rrow in zip(scores, rows, strict=True)]


class Batcher:
    """The simple micro-batcher a user would write: a queue and one consumer task."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def submit(self, item: Any) -> Any:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.consume())
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self.queue.put((item, fut))
        return await fut

    async def consume(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = asyncio.get_running_loop().time() + BATCH_WAIT_S
            while len(batch) < BATCH_MAX:
                left = deadline - asyncio.get_running_loop().time()
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), max(left, 0)))
                except asyncio.TimeoutError:
                    break
            try:
                results = await asyncio.to_thread(self.run, [item for item, _ in batch])
                for (_, fut), result in zip(batch, results, strict=True):
                    fut.set_result(result)
            except Exception as exc:
                for _, fut in batch:
                    fut.set_exception(exc)


def create_app(index_dir: Path, batch: bool) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    peer = PeerIndex(index_dir)
    def embed_many(texts: list[str]) -> list[list[float]]:
        return peer.embed(texts).tolist()

    def search_many(items: list[tuple[str, int]]) -> list[list[dict[str, Any]]]:
        k = max(k for _, k in items)
        return [hits[:kk] for hits, (_, kk) in
                zip(peer.search([q for q, _ in items], k), items, strict=True)]

    embed_batcher, search_batcher = Batcher(embed_many), Batcher(search_many)

    async def embeddings(request: Request) -> JSONResponse:
        text = (await request.json())["input"]
        vector = (await embed_batcher.submit(text) if batch
                  else (await asyncio.to_thread(embed_many, [text]))[0])
        return JSONResponse({"object": "list", "data": [
            {"object": "embedding", "index": 0, "embedding": vector}]})

    async def search(request: Request) -> JSONResponse:
        body = await request.json()
        item = (body["query"], int(body.get("k", 5)))
        hits = (await search_batcher.submit(item) if batch
                else (await asyncio.to_thread(search_many, [item]))[0])
        return JSONResponse({"hits": hits})

    async def ready(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ready"})

    return Starlette(routes=[Route("/v1/embeddings", embeddings, methods=["POST"]),
                             Route("/v1/search", search, methods=["POST"]),
                             Route("/readyz", ready, methods=["GET"])])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--index", type=Path, required=True)
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--batch", choices=("on", "off"), default="off")
    args = p.parse_args(argv)
    import uvicorn

    uvicorn.run(create_app(args.index, args.batch == "on"), host="127.0.0.1", port=args.port,
                log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
