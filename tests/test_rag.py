"""RAG pipeline: evaluation metrics, prompts, generators, filters, rerank, streaming, bad input."""

from __future__ import annotations

import asyncio
import itertools
import re

import numpy as np
import pytest
from distributed import get_task_stream
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_rag import DistributedIndex, IndexSpec
from dask_rag.config import RagConfig
from dask_rag.errors import InvalidInput, ModelLoadError
from dask_rag.evaluate import evaluate, known_item_set, mrr_at_k, ndcg_at_k, recall_at_k
from dask_rag.pipeline import Hit, RagPipeline
from dask_rag.rag.fusion import reciprocal_rank_fusion, weighted_fusion
from dask_rag.rag.generate import SamplingParams, parse_generator_spec
from dask_rag.rag.generate.extractive import ExtractiveGenerator
from dask_rag.rag.prompt import build_prompt, parse_prompt
from tests.tiny_models import save_tiny_cross_encoder, save_tiny_gpt2

# ------------------------------------------------------------------------------------------------
# pure pieces
# ------------------------------------------------------------------------------------------------


def test_metrics_match_hand_computed_values():
    ranked = ["a", "r1", "b", "r2", "c"]  # relevant at ranks 2 and 4, 3 relevant in all
    rel = {"r1": 1, "r2": 1, "r3": 1}
    assert recall_at_k(ranked, rel, 5) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, rel, 2) == pytest.approx(1 / 3)
    assert mrr_at_k(ranked, rel, 5) == pytest.approx(0.5)
    assert mrr_at_k(ranked, rel, 1) == 0.0
    dcg = 1 / np.log2(3) + 1 / np.log2(5)
    idcg = 1 / np.log2(2) + 1 / np.log2(3) + 1 / np.log2(4)
    assert ndcg_at_k(ranked, rel, 5) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(["r1"], {"r1": 2}, 10) == pytest.approx(1.0)


def test_rrf_and_weighted_fusion():
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 1, 4]], rrf_k=60)
    scores = dict(fused)
    assert scores[1] == pytest.approx(1 / 61 + 1 / 62)
    assert scores[3] == pytest.approx(1 / 63 + 1 / 61)
    assert [c for c, _ in fused][:2] == [1, 3]
    w = weighted_fusion([(1, 0.9), (2, 0.1)], [(2, 10.0), (3, 0.0)], dense_weight=0.5)
    assert dict(w) == pytest.approx({1: 0.5, 2: 0.5, 3: 0.0})
    with pytest.raises(InvalidInput):
        reciprocal_rank_fusion([[1]], rrf_k=0)


def test_rrf_ties_break_by_best_rank_then_id():
    # 0.75 / (1 + 5) == 0.25 / (1 + 1) == 0.125 exactly: chunk 7 (5th dense) ties chunk 9
    # (1st BM25); 9 has the better best rank, so it goes first although 7 < 9
    fused = reciprocal_rank_fusion([[10, 11, 12, 13, 7], [9, -1]], rrf_k=1,
                                   weights=[0.75, 0.25])
    assert dict(fused)[7] == dict(fused)[9] == 0.125
    order = [c for c, _ in fused]
    assert order.index(9) < order.index(7)
    # equal scores and equal best ranks: the smaller id first; a repeated id counts once, at
    # its first place (the later copy still takes up a rank)
    fused = reciprocal_rank_fusion([[5, 4, 5, 8], [4, 5]], rrf_k=60)
    assert [c for c, _ in fused] == [4, 5, 8]
    assert dict(fused)[8] == pytest.approx(1 / 64)


_words = st.text(alphabet=st.sampled_from(list("abcdefgh xyz.,!?<>/\"'\n")), min_size=0,
                 max_size=400)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def bpe_count(gpt2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gpt2_dir), local_files_only=True)
    return lambda texts: [len(tok(t)["input_ids"]) for t in texts]


@settings(max_examples=80, deadline=None)
@given(texts=st.lists(_words, min_size=0, max_size=8), budget=st.integers(60, 600),
       question=st.text(alphabet="abc? ", min_size=1, max_size=40))
def test_prompt_never_exceeds_budget(bpe_count, texts, budget, question):
    hits = [Hit(id=100 + i, score=1.0, text=t, source=f"src{i}\"<x>") for i, t in
            enumerate(texts)]
    for count in (bpe_count, ExtractiveGenerator().count_tokens):
        try:
            p = build_prompt(question, hits, count, budget)
        except InvalidInput:
            assert count([build_prompt(question, [], count, 10**6).text])[0] > budget
            continue
        assert count([p.text])[0] <= budget and p.tokens <= budget
        q, docs = parse_prompt(p.text)
        assert q == question.strip()
        assert [n for n, _, _ in docs] == list(range(1, len(p.citations) + 1))
        assert p.text.count("<doc id=") == len(p.citations) == p.text.count("</doc>")
        assert set(p.citations) <= {h.id for h in hits}


def test_prompt_order_dedup_and_sentence_cut():
    count = ExtractiveGenerator().count_tokens
    long = " ".join(f"Sentence {i} talks about json." for i in range(200))
    hits = [Hit(1, 0.9, "json.dumps serializes obj to a JSON formatted str.", "json.dumps"),
            Hit(2, 0.8, "json.dumps serializes obj to a JSON formatted str.", "copy"),
            Hit(3, 0.7, long, "long")]
    p = build_prompt("How to serialize?", hits, count, 400)
    assert p.citations[0] == 1 and 2 not in p.citations and p.dropped_duplicates == 1
    assert p.truncated and p.citations[-1] == 3
    last = parse_prompt(p.text)[1][-1][2]
    assert last.endswith(".") and last.startswith("Sentence 0 ")  # cut at a sentence boundary
    assert count([p.text])[0] <= 400
    with pytest.raises(InvalidInput, match="token budget"):
        build_prompt("x " * 500, hits, count, 100)


def test_sampling_params_validation():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}, {"top_k": -2},
                {"stop": ("",)}, {"stream_chunk_tokens": 0}, {"temperature": float("nan")}):
        with pytest.raises(InvalidInput, match="SamplingParams"):
            SamplingParams(**bad)
    with pytest.raises(InvalidInput, match="unknown sampling"):
        SamplingParams.from_dict({"temp": 1})
    assert SamplingParams.from_dict({"stop": "END"}).stop == ("END",)


def test_generator_specs(tmp_path, gpt2_dir):
    assert parse_generator_spec("extractive").kind == "extractive"
    assert parse_generator_spec(f"hf:{gpt2_dir}").path == str(gpt2_dir.resolve())
    with pytest.raises(InvalidInput, match="unknown generator"):
        parse_generator_spec("gpt:gpt-9")
    with pytest.raises(InvalidInput, match="must be an http"):  # openai: takes a server URL
        parse_generator_spec("openai:gpt-9")
    with pytest.raises(ModelLoadError, match="not a directory"):
        parse_generator_spec(f"hf:{tmp_path / 'missing'}")
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ModelLoadError, match="not a model directory"):
        parse_generator_spec(f"hf:{tmp_path / 'notamodel'}")


def test_hf_generator_greedy_stream_and_params(gpt2_dir):
    from dask_rag.rag.generate.hf import HFGenerator

    gen = HFGenerator(str(gpt2_dir))
    prompts = ["How do I serialize a Python object?", "The quick brown fox"]
    params = SamplingParams(max_tokens=16)
    first = gen.generate(prompts, params)
    assert first == gen.generate(prompts, params)  # greedy is deterministic
    assert all(isinstance(t, str) for t in first)

    async def streamed(prompt, p):
        return [piece async for piece in gen.stream(prompt, p)]

    for chunk in (1, 3, 32):
        p = SamplingParams(max_tokens=16, stream_chunk_tokens=chunk)
        pieces = asyncio.run(streamed(prompts[0], p))
        assert "".join(pieces) == gen.generate([prompts[0]], p)[0]
        if chunk == 1:
            assert len(pieces) > 1
    sampled = SamplingParams(max_tokens=16, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    assert gen.generate(prompts, sampled) == gen.generate(prompts, sampled)  # seeded
    with pytest.raises(InvalidInput, match="does not fit"):
        gen.generate(["word " * 2000], SamplingParams(max_tokens=8))


def test_hf_generator_sampling_parameters_and_stop_take_effect(gpt2_dir):
    """Each decoding parameter changes what the real model generates, checked against the
    model's own greedy output (the oracle): sampling differs from greedy and from another
    seed; top_k=1 and a tiny top_p leave only the argmax token, i.e. greedy again; another
    temperature under the same seed samples differently; a stop string cuts the greedy text
    exactly before its first occurrence."""
    from dask_rag.rag.generate.hf import HFGenerator

    gen = HFGenerator(str(gpt2_dir))
    prompts = ["How do I serialize a Python object?", "The quick brown fox", "Sort a list"]
    greedy = gen.generate(prompts, SamplingParams(max_tokens=16))

    def sample(**kw):
        return gen.generate(prompts, SamplingParams(max_tokens=16, **kw))

    assert sample(temperature=1.0, seed=1) != greedy
    assert sample(temperature=1.0, seed=1) != sample(temperature=1.0, seed=2)
    assert sample(temperature=1.0, seed=1) != sample(temperature=3.0, seed=1)
    assert sample(temperature=1.0, seed=3, top_k=1) == greedy
    assert sample(temperature=1.0, seed=3, top_p=1e-6) == greedy
    text = greedy[0]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text  # a visible piece of the answer
    cut = gen.generate(prompts[:1], SamplingParams(max_tokens=16, stop=(stop,)))[0]
    assert cut == text[:text.find(stop)] and len(cut) < len(text)


# ------------------------------------------------------------------------------------------------
# on the cluster
# ------------------------------------------------------------------------------------------------


def test_filtered_search_in_shards(client):
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((3000, 16)).astype(np.float32)
    records = [{"text": f"t{i}", "source": ("json." if i % 10 == 0 else "csv.") + str(i),
                "metadata": {"lang": "en" if i % 3 == 0 else "fr"}} for i in range(3000)]
    for spec in (IndexSpec(factory="Flat", n_shards=3), IndexSpec(factory="IVF16,Flat",
                                                                  n_shards=3, nprobe=16),
                 IndexSpec(factory="HNSW16", n_shards=2, ef_search=200)):
        with DistributedIndex.build(client, xb, spec=spec, records=records) as index:
            _, I = index.search(xb[:5], k=50, filter={"source_prefix": "json."})
            assert (I >= 0).all() and (I % 10 == 0).all()  # 300 matches: k of them returned
            _, I2 = index.search(xb[:5], k=20, filter={"source_prefix": "json.",
                                                         "metadata": {"lang": "en"}})
            assert (I2 >= 0).all() and (I2 % 30 == 0).all()
            _, I3 = index.search(xb[:1], k=5, filter={"source_prefix": "nothing."})
            assert (I3 == -1).all()
    with pytest.raises(InvalidInput, match="unknown field"):
        DistributedIndex.build(client, xb[:50], records=records[:50]).search(
            xb[:1], k=1, filter={"colour": "red"})


@pytest.fixture(scope="module")
def pipe(client, demo_index):
    with RagPipeline.from_index_dir(client, demo_index, RagConfig(k=5)) as p:
        yield p


def test_searches_of_every_size_go_to_the_actors_with_the_graphs_results(pipe, client):
    """Searches of any batch size go to the workers' actors — a small batch embedded by each
    searcher actor, a bigger one by the encoder actors first — with no task through the
    scheduler, and give the graph's hits bit for bit (dense, hybrid and BM25 only)."""
    queries = [f"How do I {verb} a {noun}?" for verb in ("read", "write", "parse", "sort")
               for noun in ("file", "string", "list")]

    def transitions():
        return client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)

    for mode in ("dense", "hybrid", "sparse"):
        for n in (1, 4, 12):
            reqs = [pipe.search_request(q, k=5, mode=mode) for q in queries[:n]]
            by_graph, _ = client.gather(pipe.submit_search(reqs))
            for _ in range(2):  # the actors exist after these (calls rotate over the workers)
                pipe.search_many(queries[:n], k=5, mode=mode)
            before = transitions()
            direct = pipe.search_many(queries[:n], k=5, mode=mode)
            assert transitions() == before, (mode, n)  # nothing went through the scheduler
            assert [[(h.id, h.score) for h in row] for row in direct] == \
                [[(h.id, h.score) for h in row] for row in by_graph], (mode, n)


def test_asks_go_to_the_actors_and_answer_like_the_graph(pipe, client):
    """Asks with the extractive generator (no model) are searched through the actors and
    answered in the client — no task through the scheduler — with the graph's answers:
    the same text, citations, hits and scores."""
    questions = [f"How do I {verb} a {noun}?" for verb in ("read", "write", "parse", "sort")
                 for noun in ("file", "string", "list")]

    def transitions():
        return client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)

    def fields(text, citations, hits, prompt_tokens):
        return (text, [c.id for c in citations], [(h.id, h.score) for h in hits],
                prompt_tokens)

    for n in (1, 4, 12):
        reqs = [pipe.ask_request(q) for q in questions[:n]]
        by_graph = client.gather(pipe.submit_ask(reqs))
        pipe.ask_many(questions[:n])  # the actors exist after this
        before = transitions()
        direct = pipe.ask_many(questions[:n])
        assert transitions() == before, n  # nothing went through the scheduler
        assert [fields(a.text, a.citations, a.hits, a.prompt_tokens) for a in direct] == [
            fields(r["text"], r["citations"], r["hits"], r["prompt_tokens"])
            for r in by_graph], n


def test_a_small_batch_is_embedded_once_while_others_run(pipe):
    """A lone query on an idle cluster is embedded by each shard's searcher (no second call);
    while another search runs, the same query is embedded once, by an encoder actor — the
    workers' time goes to other requests — with the same hits."""
    holders = {w for ws in pipe.index.replica_set.locations().values() for w in ws}
    assert len(holders) > 1
    query = "How do I copy a directory tree?"
    want = [(h.id, h.score) for h in pipe.search(query, k=5)]

    def texts_encoded():
        before = pipe.embedder.counters()[1]
        got = [(h.id, h.score) for h in pipe.search(query, k=5)]
        assert got == want
        return pipe.embedder.counters()[1] - before

    assert texts_encoded() > 1  # idle: every shard's worker embeds it
    pipe._running += 1  # as if another search were in flight
    try:
        assert texts_encoded() == 1
    finally:
        pipe._running -= 1


def test_a_worker_lost_under_the_actor_path_sends_the_batch_to_tasks(pipe, monkeypatch):
    """A worker lost under the direct path — here no actor can start on it (actor_on raises
    ShardUnavailable, as it does for a worker that just died) — sends the embedding to tasks
    and the search to the graph: the same hits, no error (a CI run of
    test_worker_killed_while_serving_answers_stay_right once lost 8 of 12 batches to it)."""
    from dask_rag.errors import ShardUnavailable

    queries = [f"How do I {verb} a file?" for verb in ("read", "write", "copy", "move",
                                                     "delete", "lock", "open", "close")]
    want = [[(h.id, h.score) for h in row] for row in pipe.search_many(queries, k=5)]

    def refuse(*args, **kwargs):
        raise ShardUnavailable("no actor: the worker is gone")

    monkeypatch.setattr("dask_rag.embed.service.actor_on", refuse)
    monkeypatch.setattr("dask_rag.index.fanout.actor_on", refuse)
    pipe.embedder._actors = {}
    pipe.index.direct.forget()
    for batch in (queries, queries[:2]):  # encoder actors + searcher actors; searchers only
        got = pipe.search_many(batch, k=5)
        assert [[(h.id, h.score) for h in row] for row in got] == want[:len(batch)]


def test_filtered_pipeline_search(pipe):
    hits = pipe.search("parse a string", k=8, filter={"source_prefix": "json."})
    assert len(hits) == 8 and all(h.source.startswith("json.") for h in hits)
    hits = pipe.search("open a file", k=5, filter={"metadata": {"module": "csv"}})
    assert hits and all(h.metadata["module"] == "csv" for h in hits)


def test_modes_and_eval_table(pipe, demo_docs):
    queries = known_item_set(demo_docs, n=60)
    results, _ = evaluate(pipe, queries, k=10)
    assert set(results) == {"dense", "sparse", "hybrid"}
    for row in results.values():
        assert 0.0 <= row["mrr@10"] <= row["recall@10"] <= 1.0
    assert results["hybrid"]["recall@10"] >= 0.8


def test_extractive_answers_cite_retrieved_gold_chunk(pipe, demo_docs):
    queries = known_item_set(demo_docs, n=100)
    answers = pipe.ask_many(list(queries.queries.values()))
    good = 0
    for qid, a in zip(queries.queries, answers, strict=True):
        retrieved = {h.id for h in a.hits}
        assert {h.id for h in a.citations} <= retrieved
        cited_numbers = {int(n) for n in re.findall(r"\[(\d+)\]", a.text)}
        assert cited_numbers and max(cited_numbers) <= len(a.citations)
        cited_sources = {a.citations[n - 1].source for n in cited_numbers}
        good += bool(cited_sources & set(queries.qrels[qid]))
        assert {"embed", "search", "generate", "total"} <= set(a.timings_ms)
    assert good / len(answers) >= 0.80, f"gold cited in {good}/{len(answers)}"


def test_stream_matches_answer_and_chunks(pipe):
    question = "How do I serialize a Python object to a JSON string?"
    answer = pipe.ask(question)

    async def collect(chunk):
        return [e async for e in pipe.astream(question, params=SamplingParams(
            stream_chunk_tokens=chunk))]

    events = asyncio.run(collect(2))
    assert events[0]["event"] == "citations" and events[-1]["event"] == "done"
    text = "".join(e["text"] for e in events if e["event"] == "text")
    assert text == answer.text
    assert [c["id"] for c in events[0]["citations"]] == [h.id for h in answer.citations]
    assert sum(1 for e in events if e["event"] == "text") > 1


def test_hf_generator_in_the_pipeline(client, demo_index, gpt2_dir):
    cfg = RagConfig(k=3, generator=f"hf:{gpt2_dir}", token_budget=700)
    with RagPipeline.from_index_dir(client, demo_index, cfg) as p:
        params = SamplingParams(max_tokens=12)
        a = p.ask("How do I sort a list?", params=params)
        assert a.prompt_tokens <= 700 and a.citations

        async def collect():
            return [e async for e in p.astream("How do I sort a list?", params=SamplingParams(
                max_tokens=12, stream_chunk_tokens=1))]

        events = asyncio.run(collect())
        assert "".join(e["text"] for e in events if e["event"] == "text") == a.text


def _cross_encoder_logits(model_dir, query: str, passages: list[str]) -> list[float]:
    """The oracle: the saved model's logit for each (query, passage) pair, with transformers
    alone, one pair at a time (not the reranker class under test)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    with torch.inference_mode():
        for passage in passages:
            enc = tok(query, passage, truncation=True, max_length=512, return_tensors="pt")
            out.append(float(model(**enc).logits[0, 0]))
    return out


def test_cross_encoder_rerank(client, demo_index, tmp_path):
    model = save_tiny_cross_encoder(tmp_path / "ce")
    cfg = RagConfig(k=5, rerank_model=str(model), rerank_top_n=10)
    with RagPipeline.from_index_dir(client, demo_index, cfg) as p:
        q = "How do I read a CSV file row by row?"
        before = p.search_many([q], k=10)[0]
        after = p.rerank_many([q], k=5)[0]
        logits = _cross_encoder_logits(model, q, [h.text for h in before])
        # the reranker may squash logits (sigmoid): the order is what must agree.  The oracle
        # scores one pair at a time, the reranker a query's pairs in one padded batch; the
        # tiny random model's logits can tie to ~1e-6, so near-ties may come in either order
        oracle = {before[i].id: logits[i] for i in range(10)}
        got = [oracle[h.id] for h in after]
        tol = 1e-4
        assert all(a >= b - tol for a, b in itertools.pairwise(got)), got
        assert min(got) >= sorted(logits, reverse=True)[4] - tol  # the oracle's best five
        assert [h.id for h in after] != [h.id for h in before[:5]]
        a = p.ask(q)  # the answer graph goes through the rerank
        assert "rerank" in a.timings_ms and a.citations
        assert [h.id for h in a.hits] == [h.id for h in after]


def test_bad_questions_fail_before_any_task(client, pipe, tmp_path):
    with get_task_stream(client) as ts:
        for bad, match in (("", "empty"), ("   ", "empty"), ("x" * 9000, "limit"),
                           (42, "string")):
            with pytest.raises(InvalidInput, match=match):
                pipe.ask(bad)
        with pytest.raises(InvalidInput, match=r"ask\.k: .*>= 1|greater than or equal to 1"):
            pipe.ask("fine question", k=0)
        with pytest.raises(InvalidInput, match="mode"):
            pipe.search("fine", mode="fuzzy")
    assert not ts.data
    with pytest.raises(InvalidInput, match="unknown generator"):
        RagPipeline.from_index_dir(client, pipe.index.path, RagConfig(generator="gpt5"))
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelLoadError, match="not a model"):
        RagPipeline.from_index_dir(client, pipe.index.path,
                                   RagConfig(generator=f"hf:{tmp_path / 'm'}"))


def test_extractive_quotes_cannot_fake_citations():
    gen = ExtractiveGenerator()
    hits = [Hit(7, 1.0, "Use x[3] to get the fourth element of the list x.", "a"),
            Hit(8, 0.5, "Lists are mutable sequences of items.", "b")]
    prompt = build_prompt("How do I get an element of a list?", hits, gen.count_tokens, 500)
    text = gen.generate([prompt.text], SamplingParams())[0]
    numbers = {int(n) for n in re.findall(r"\[(\d+)\]", text)}
    assert numbers and numbers <= {1, 2} and "x(3)" in text


def test_extractive_answer_opens_with_the_best_ranked_passage():
    """Retrieval ranked the passages; word overlap alone prefers the distractor here (it
    repeats the question's words), yet the answer's first sentence comes from passage [1]."""
    gen = ExtractiveGenerator()
    hits = [Hit(1, 0.9, "Install the package with apt, then run the setup wizard once.", "a"),
            Hit(2, 0.8, "How to configure a network interface on Debian is a question that "
                        "many users of Debian ask about the network interface.", "b")]
    prompt = build_prompt("How do I configure a network interface on Debian?", hits,
                          gen.count_tokens, 500)
    text = gen.generate([prompt.text], SamplingParams())[0]
    from dask_rag.evaluate import answer_sentences

    sentences = [s for s, _ in answer_sentences(text)]
    assert text.split("[")[1].startswith("1]"), text
    assert sentences[0].startswith("Install the package")
    assert "[2]" in text  # the overlapping sentence still follows


def test_grading_answers_by_citation_and_support():
    from dask_rag.evaluate import answer_sentences, grade_answer

    cites = [Hit(1, 1.0, "Lists sort in place with list.sort().", "doc-a"),
             Hit(2, 0.5, "Tuples are immutable sequences.", "doc-b")]
    text = "Lists sort in place with list.sort(). [1] Tuples are immutable. [2] Made up words."
    assert answer_sentences(text) == [("Lists sort in place with list.sort().", [1]),
                                      ("Tuples are immutable.", [2]), ("Made up words.", [])]
    g = grade_answer(text, cites, {"doc-a": 1})
    assert g["citation_precision"] == 0.5 and g["citation_recall"] == 1.0
    assert g["first_sentence_relevant"] == 1.0 and g["context_recall"] == 1.0
    assert g["supported"] == 2 / 3  # the uncited sentence is not supported
    g = grade_answer("Tuples are immutable. [2]", cites, {"doc-a": 1})
    assert g["citation_precision"] == 0.0 and g["first_sentence_relevant"] == 0.0
