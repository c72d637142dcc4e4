#!/usr/bin/env python
"""The ``openai:`` generator never serializes requests: 64 concurrent ``/v1/ask`` through an
upstream that takes 200 ms per answer.

The upstream is an OpenAI-compatible chat server in a process of its own that sleeps 200 ms
and answers (what a remote LLM looks like from here).  Measured, alternated over rounds:

* ``generator``: the generator alone, 64 prompts at once (``OpenAIUpstream.complete_many``;
  a cold batch, then the warm one that is reported) — its ceiling is 64 / 0.2 s = 320
  answers/s;
* ``ask_openai``: ``dask-rag serve --generator openai:...`` (2 workers, a process of its own)
  under 64 closed-loop ``/v1/ask`` clients (aiohttp, in this process), and
  ``ask_extractive``: the same server with the extractive generator (retrieval's own ceiling
  on this machine — an upstream cannot make /v1/ask faster).  One server at a time.

    python -m benchmarks.upstream_generator [--rounds 3] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS_DIR,
    SERVE_QUESTIONS,
    machine_info,
    require_demo_index,
    write_result,
)

DELAY_S = 0.2
CLIENTS = 64


def _upstream(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request: Any) -> JSONResponse:
        body = await request.json()
        await asyncio.sleep(DELAY_S)
        text = f"answer to {len(body['messages'][-1]['content'])} characters"
        return JSONResponse({"choices": [{"message": {"role": "assistant", "content": text},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 10, "completion_tokens": 4}})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


async def _closed_loop(url: str, seconds: float, server_pid: int | None = None,
                       upstream_pid: int | None = None) -> dict[str, Any]:
    """64 closed-loop ``/v1/ask`` clients for ``seconds``; with the processes' ids, also the
    CPU milliseconds each part spends per request: the serving tree by role, the upstream
    and this load generator — on 2 cores the upstream and the load come out of the same
    CPUs, which bounds what any server can do here."""
    # aiohttp in this process, the servers in their own: an httpx client in the server's own
    # process (this benchmark's first form) cost ~8 ms of CPU per request and measured itself
    import aiohttp
    import psutil

    from benchmarks.http_load import closed_loop
    from benchmarks.server_cpu import tree_cpu

    def cpu() -> dict[str, float]:
        out = tree_cpu(psutil.Process(server_pid)) if server_pid is not None else {}
        if upstream_pid is not None:
            t = psutil.Process(upstream_pid).cpu_times()
            out["upstream"] = t.user + t.system
        out["load_generator"] = time.process_time()
        return out

    conn = aiohttp.TCPConnector(limit=CLIENTS + 8)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=60)) as http:
        async def ask(question: str) -> int:
            async with http.post(f"{url}/v1/ask", json={"question": question}) as r:
                await r.read()
                return r.status

        for q in SERVE_QUESTIONS:  # warm-up
            await ask(q)
        before = cpu()
        row = await closed_loop(ask, SERVE_QUESTIONS, CLIENTS, seconds)
        after = cpu()
    per = {k: round(1e3 * (after[k] - before[k]) / max(1, row["n"]), 3) for k in before
           if after[k] - before[k] > 0}
    return {"qps": round(row["qps"], 2), "failed": sum(row["errors"].values()),
            "p50_ms": round(row["p50_ms"], 1) if row["n"] else None,
            "cpu_ms_per_request": per, "cpu_ms_per_request_total": round(sum(per.values()), 3)}


async def _generator_round(url: str) -> dict[str, Any]:
    from dask_rag.rag.generate.base import SamplingParams
    from dask_rag.rag.generate.openai_upstream import OpenAIUpstream

    upstream = OpenAIUpstream(f"{url}/v1", "m")
    walls = []
    for _ in range(2):  # a cold batch (new connections), then a warm one (as a server runs)
        t0 = time.perf_counter()
        out = await upstream.complete_many([f"prompt {i}" for i in range(CLIENTS)],
                                           SamplingParams())
        walls.append(time.perf_counter() - t0)
    await upstream.close_loop()
    return {"answers": len(out), "cold_seconds": round(walls[0], 3),
            "seconds": round(walls[1], 3), "qps": round(len(out) / walls[1], 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--index", type=Path, default=Path(".demo-index"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--serve-args", default="",
                   help="more 'dask-rag serve' options for both servers, e.g. '--max-batch 16'")
    p.add_argument("--out", default="upstream_generator")
    args = p.parse_args(argv)
    require_demo_index(args.index)
    from benchmarks.http_load import start_server
    from dask_rag.serve.server import free_port, wait_ready

    port = free_port()
    proc = multiprocessing.get_context("spawn").Process(target=_upstream, args=(port,),
                                                        daemon=True)
    proc.start()
    upstream_url = f"http://127.0.0.1:{port}"
    rounds: list[dict[str, Any]] = []
    arms = {"ask_openai": ("--generator", f"openai:{upstream_url}/v1#m"),
            "ask_extractive": ()}
    try:
        import httpx

        for _ in range(100):
            try:
                httpx.get(upstream_url, timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        for r in range(args.rounds):
            row: dict[str, Any] = {"round": r,
                                   "generator": asyncio.run(_generator_round(upstream_url))}
            order = list(arms) if r % 2 == 0 else list(arms)[::-1]
            for name in order:
                # one dask-rag server at a time, in a process of its own (2 local workers)
                sport = free_port()
                server = start_server(args.index, sport, True, 2,
                                      extra=(*arms[name], *args.serve_args.split()))
                try:
                    wait_ready(f"http://127.0.0.1:{sport}", server, timeout=300)
                    row[name] = asyncio.run(_closed_loop(
                        f"http://127.0.0.1:{sport}", args.seconds, server.pid,
                        proc.pid if name == "ask_openai" else None))
                finally:
                    server.terminate()
                    server.wait(60)
            rounds.append(row)
            print(json.dumps(row), file=sys.stderr)
    finally:
        proc.terminate()
    med = {key: statistics.median(r[key]["qps"] for r in rounds)
           for key in ("generator", "ask_openai", "ask_extractive")}
    ceiling = CLIENTS / DELAY_S
    cores = os.cpu_count() or 1
    cpu_bound = {key: round(cores * 1e3 / statistics.median(
        r[key]["cpu_ms_per_request_total"] for r in rounds), 1)
        for key in ("ask_openai", "ask_extractive")}
    payload = {"machine": machine_info(), "clients": CLIENTS, "upstream_delay_s": DELAY_S,
               "upstream_ceiling_qps": ceiling, "serve_args": args.serve_args, "rounds": rounds,
               "median_qps": med,
               # what the CPU each request costs here (tree + upstream + load) allows at most
               "cpu_bound_qps": cpu_bound,
               "generator_vs_ceiling": round(med["generator"] / ceiling, 3),
               "ask_openai_vs_extractive": round(med["ask_openai"] / med["ask_extractive"], 3)}
    path = write_result(args.out, payload, out_dir=RESULTS_DIR)
    print(json.dumps({k: payload[k] for k in ("median_qps", "cpu_bound_qps",
                                              "generator_vs_ceiling",
                                              "ask_openai_vs_extractive")}))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
