"""Encoder canaries: an index records a few texts and their vectors; a worker whose encoder
does not reproduce them (another CPU kind for int8, a damaged model copy — here a fault point
that perturbs its vectors) embeds nothing for that index, and the cluster answers exactly
like a healthy one."""

from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import pytest

from dask_rag.config import EmbedConfig, EncoderCanaries
from dask_rag.corpus.demo import DEMO_QUESTIONS
from dask_rag.errors import EncoderMismatch, InvalidInput
from dask_rag.faults import FAULTS_ENV, REPORT_ENV, ArmFaults, read_report


@pytest.fixture(scope="module")
def canary_index(client, demo_docs, tmp_path_factory):
    from dask_rag.ingest import ingest

    path = tmp_path_factory.mktemp("canaries") / "index"
    ingest(client, demo_docs[:120], path, progress=False)
    return path


def test_manifest_records_canaries_that_the_encoder_reproduces(canary_index):
    from dask_rag.embed.encoder import SentenceEncoder, check_canaries

    recorded = json.loads((canary_index / "manifest.json").read_text())["embed"]["canaries"]
    canaries = EncoderCanaries.from_manifest(recorded)
    assert canaries is not None and len(canaries.texts) >= 3 and canaries.dim == 384
    verdict = check_canaries(SentenceEncoder(EmbedConfig()), canaries)
    assert verdict.ok and verdict.max_abs_diff <= canaries.max_abs
    other = SentenceEncoder(EmbedConfig(precision="int8"))  # another arithmetic: caught
    assert not check_canaries(other, canaries).ok
    with pytest.raises(InvalidInput, match="canaries is malformed"):
        EncoderCanaries.from_manifest({**recorded, "vectors_f32_b64": "not base64!"})


def _hits(pipe, questions):
    small = [[(h.id, h.score) for h in pipe.search(q, k=10)] for q in questions]
    batch = [[(h.id, h.score) for h in hits] for hits in pipe.search_many(questions, k=10)]
    return small, batch


@pytest.mark.slow
def test_a_worker_whose_encoder_differs_is_not_used_and_results_stay_exact(
        client, canary_index, tmp_path):
    """Another cluster whose first worker's encoder is perturbed (a fault point, reported
    where it fired): the canaries flag that worker (pipeline status, /readyz detail, metric),
    nothing is embedded there, and every search returns the healthy cluster's hits; with
    every worker perturbed, opening the index fails naming the canaries."""
    from distributed import Client
    from starlette.testclient import TestClient

    from dask_rag.cluster import start_local_cluster
    from dask_rag.embed.encoder import SentenceEncoder
    from dask_rag.pipeline import RagPipeline
    from dask_rag.serve.app import create_app

    questions = [*DEMO_QUESTIONS, "how do I sort a list", "parse command line options",
                 "compress a file with gzip", "read a csv file"]
    with RagPipeline.from_index_dir(client, canary_index) as pipe:
        healthy = _hits(pipe, questions)

    report = tmp_path / "faults.log"
    with start_local_cluster(2, dashboard_address=":0", memory_limit="4GiB") as cluster, \
            Client(cluster) as other:
        bad = sorted(other.scheduler_info(n_workers=-1)["workers"])[0]

        def arm() -> None:
            os.environ[FAULTS_ENV] = "embed.vectors=perturb"
            os.environ[REPORT_ENV] = str(report)

        other.run(arm, workers=[bad])
        with RagPipeline.from_index_dir(other, canary_index) as pipe:
            assert set(pipe.embedder.mismatched_workers()) == {bad}
            assert not pipe.embedder.embeds_everywhere()
            assert _hits(pipe, questions) == healthy
            # 8 embedding tasks at once: unrestricted, the scheduler would spread them over
            # both workers (and the bad one would refuse); all run where the encoder matches
            batches = [[f"{q} ({i})" for q in questions] for i in range(8)]

            async def embed_all() -> list[np.ndarray]:
                return list(await asyncio.gather(*(pipe.embedder.aembed_now(b)
                                                   for b in batches)))

            local = SentenceEncoder(EmbedConfig())
            for got, batch in zip(asyncio.run(embed_all()), batches, strict=True):
                np.testing.assert_array_equal(got, local.encode(batch))
            ready, detail = pipe.shards_ready()
            assert ready and "1 of 2 workers" in detail and bad in detail, detail
            with TestClient(create_app(pipe)) as http:
                body = http.get("/readyz").json()
                assert body["status"] == "ready" and "canary" in body["detail"]
                assert "dask_rag_encoder_mismatched_workers 1.0" in http.get("/metrics").text
            # the perturbation fired on the bad worker only, in its canary check
            pids = {pid for point, pid, _, action in read_report(report)
                    if point == "embed.vectors" and action == "perturb"}
            assert pids == set(other.run(os.getpid, workers=[bad]).values())

        other.register_plugin(ArmFaults({"embed.vectors": "perturb"}))
        other.restart()  # new worker processes, all perturbed, nothing cached
        with pytest.raises(EncoderMismatch, match="2 of 2 workers.*canary"):
            RagPipeline.from_index_dir(other, canary_index)


def test_a_mismatched_worker_refuses_to_embed(client, canary_index):
    """The last line of defence, inside the task: an encoder that fails the canaries raises
    instead of returning vectors (e.g. a worker that joined after the service checked)."""
    from dask_rag.embed.service import embed_texts_task

    recorded = json.loads((canary_index / "manifest.json").read_text())["embed"]["canaries"]
    good = EncoderCanaries.from_manifest(recorded)
    assert good is not None
    vectors = np.frombuffer(good.vectors, dtype=np.float32).copy()
    vectors[0] += 0.05
    wrong = EncoderCanaries(good.texts, vectors.tobytes(), good.max_abs)
    with pytest.raises(EncoderMismatch, match="canary vectors differ"):
        client.submit(embed_texts_task, EmbedConfig(canaries=wrong), ["hello"],
                      pure=False).result()
    assert client.submit(embed_texts_task, EmbedConfig(canaries=good), ["hello"],
                         pure=False).result().shape == (1, 384)


def test_queries_use_the_manifests_encoder_not_what_auto_means_here(client, demo_docs,
                                                                      tmp_path):
    """An index built at int8 (not what ``auto`` resolves to) is queried at int8: each hit's
    score is the inner product of the int8 query vector with the int8 chunk vector, and not
    the fp32 query vector's."""
    from dask_rag.embed.encoder import SentenceEncoder
    from dask_rag.ingest import ingest
    from dask_rag.pipeline import RagPipeline

    ingest(client, demo_docs[:60], tmp_path / "int8", embed=EmbedConfig(precision="int8"),
           progress=False)
    questions = ["how do I sort a list", "parse a date string", "copy a directory tree"]
    with RagPipeline.from_index_dir(client, tmp_path / "int8") as pipe:
        assert (pipe.embedder.info["precision"], pipe.embedder.info["backend"]) == \
            ("int8", "onnx")
        got = [pipe.search(q, k=5, mode="dense") for q in questions]
        got += pipe.search_many(questions * 3, k=5, mode="dense")[:3]  # the batched path
    int8 = SentenceEncoder(EmbedConfig(precision="int8"))
    fp32 = SentenceEncoder(EmbedConfig())
    gaps = []
    for q, hits in zip(questions * 2, got, strict=True):
        chunks = int8.encode([h.text for h in hits])
        scores = np.array([h.score for h in hits])
        np.testing.assert_allclose(scores, chunks @ int8.encode([q])[0], atol=1e-5)
        gaps.append(np.abs(scores - chunks @ fp32.encode([q])[0]).max())
    assert min(gaps) > 1e-4  # an fp32 query vector would have given other scores
