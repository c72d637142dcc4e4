"""add / remove / save / load, crash safety of save, and bad input that changes nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from dask_rag import DistributedIndex, IndexSpec
from dask_rag.datasets import clustered_vectors, exact_search
from dask_rag.errors import CorruptIndex, IndexNotFound, InvalidInput
from dask_rag.faults import InjectedFault, read_report
from dask_rag.index.merge import merge_results

DIM = 32


def _snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture()
def data():
    x = clustered_vectors(5_040, DIM, seed=11)
    return x[:4_000], x[4_000:5_000], x[5_000:]


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "HNSW16", "IVF16,PQ8,RFlat"])
def test_add_remove_save_load_round_trip(client, tmp_path, data, factory):
    xb, xnew, xq = data
    path = tmp_path / "idx"
    spec = IndexSpec(factory=factory, n_shards=3, nprobe=16, ef_search=128)
    index = DistributedIndex.build(client, xb, spec=spec, path=path,
                                   records=[{"text": f"chunk {i}", "source": "a"}
                                            for i in range(len(xb))])
    new_ids = np.arange(10_000, 10_000 + len(xnew))
    assert index.add(xnew, new_ids, [{"text": f"new {i}"} for i in new_ids]) == len(xnew)
    assert index.ntotal == len(xb) + len(xnew)
    # a new vector is found when searching for itself
    _, I = index.search(xnew[:20], k=10)
    assert np.mean([new_ids[i] in I[i] for i in range(20)]) >= 0.9
    removed = np.concatenate([np.arange(0, 4_000, 2), new_ids[:100]])
    assert index.remove(removed) == len(removed)
    assert index.remove(removed) == 0
    assert index.ntotal == len(xb) + len(xnew) - len(removed)
    _, I = index.search(xq, k=50)
    assert not np.isin(I, removed).any()
    assert index.fetch(np.array([1, 0, 10_100]))[0]["text"] == "chunk 1"
    assert index.fetch(np.array([0]))[0] is None
    before = index.search(xq, k=10)
    index.save()
    assert not list((path / "wal").glob("*.npz"))
    index.close()
    loaded = DistributedIndex.load(client, path)
    assert loaded.ntotal == len(xb) + len(xnew) - len(removed)
    after = loaded.search(xq, k=10)
    np.testing.assert_array_equal(before[1], after[1])
    assert loaded.fetch(np.array([10_100]))[0]["text"] == "new 10100"
    loaded.close()


def test_unsaved_mutations_survive_reload_from_wal(client, tmp_path, data):
    xb, xnew, xq = data
    path = tmp_path / "idx"
    index = DistributedIndex.build(client, xb, spec=IndexSpec(n_shards=2), path=path)
    index.add(xnew[:10], np.arange(50_000, 50_010))
    index.remove(np.arange(5))
    expected = index.search(xq, k=10)[1]
    index.close()  # no save: the write-ahead log holds the changes
    again = DistributedIndex.load(client, path)
    np.testing.assert_array_equal(again.search(xq, k=10)[1], expected)
    assert again.ntotal == len(xb) + 10 - 5
    again.close()


def test_a_stale_copy_of_a_shard_catches_up_after_a_save_folded_the_log(client, tmp_path, data):
    """A copy of shard 0 loaded before two writes and a save (which folds the log into new
    files and deletes it) — as Dask's copy on a second worker is when every task lands on the
    first — answers with every acknowledged write once caught up: it reloads from the saved
    files rather than replay a log that is gone, and applies nothing twice."""
    from dask_rag.index.shard import ShardRef, load_shard

    xb, xnew, _ = data
    path = tmp_path / "idx"
    index = DistributedIndex.build(client, xb, spec=IndexSpec(factory="Flat", n_shards=1),
                                   path=path, elastic=False)
    stale = load_shard(ShardRef(str(path), 0, index.index_uuid))  # a copy, loaded now
    new_ids = np.arange(60_000, 60_020)
    index.add(xnew[:10], new_ids[:10])
    index.save()
    index.add(xnew[10:20], new_ids[10:])
    assert not (path / "wal" / f"{1:012d}.npz").exists()  # folded and deleted
    assert stale.applied_seq == 0 and stale.ntotal == len(xb)
    stale.catch_up(index.acked_seq)
    assert stale.applied_seq == index.acked_seq == 2
    assert stale.ntotal == len(xb) + 20
    assert all(r is not None for r in stale.fetch(new_ids))
    index.close()


def test_failure_in_the_middle_of_save_leaves_previous_index(client, tmp_path, data,
                                                            monkeypatch):
    """A save that dies between writing its shard files and the manifest commit (the fault
    point proves that phase was reached) leaves exactly the previous content loadable."""
    xb, _, xq = data
    path = tmp_path / "idx"
    index = DistributedIndex.build(client, xb, spec=IndexSpec(factory="IVF16,Flat", n_shards=2),
                                   path=path)
    index.add(xb[:10] + 1.0, np.arange(len(xb), len(xb) + 10))  # in the WAL only
    index.remove(np.arange(5))
    snapshot = _snapshot(path)
    expected = index.search(xq, k=10)
    live = sorted(i for i, _, _ in index.doc_index())
    report = tmp_path / "faults.log"
    monkeypatch.setenv("DASK_RAG_FAULTS", "save.shards_written=raise")
    monkeypatch.setenv("DASK_RAG_FAULTS_REPORT", str(report))
    with pytest.raises(InjectedFault):
        index.save()
    monkeypatch.delenv("DASK_RAG_FAULTS")
    assert [(p, a) for p, _, _, a in read_report(report)] == [("save.shards_written", "raise")]
    # the new generation's shard files were written; nothing the old manifest names changed
    assert len(list((path / "shards").iterdir())) > len([k for k in snapshot if "shards/" in k])
    assert {k: v for k, v in _snapshot(path).items() if k in snapshot} == snapshot
    index.close()
    reloaded = DistributedIndex.load(client, path)
    assert reloaded.manifest["generation"] == 0
    assert sorted(i for i, _, _ in reloaded.doc_index()) == live
    D, I = reloaded.search(xq, k=10)
    np.testing.assert_array_equal(I, expected[1])
    np.testing.assert_array_equal(D, expected[0])
    # the next save succeeds and cleans up the orphaned files of the failed one
    reloaded.save()
    referenced = {e[key] for e in reloaded.manifest["shards"] for key in ("file", "meta", "bm25")
                  if key in e}
    assert {f"shards/{p.name}" for p in (path / "shards").iterdir()} == referenced
    np.testing.assert_array_equal(reloaded.search(xq, k=10)[1], expected[1])
    reloaded.close()


def test_export_and_interrupted_swap_recovery(client, tmp_path, data):
    xb, _, xq = data
    index = DistributedIndex.build(client, xb, spec=IndexSpec(n_shards=2))
    target = tmp_path / "copy"
    index.save(target)
    expected = index.search(xq, k=5)[1]
    index.close()
    # simulate a crash between the two renames of a directory swap
    aside = tmp_path / ".copy.old-deadbeef"
    target.rename(aside)
    loaded = DistributedIndex.load(client, target)
    np.testing.assert_array_equal(loaded.search(xq, k=5)[1], expected)
    loaded.close()


def test_build_refuses_to_clobber(client, tmp_path, data):
    xb, _, _ = data
    path = tmp_path / "idx"
    DistributedIndex.build(client, xb, spec=IndexSpec(n_shards=2), path=path).close()
    snap = _snapshot(path)
    with pytest.raises(InvalidInput, match="already exists"):
        DistributedIndex.build(client, xb[:100], spec=IndexSpec(n_shards=2), path=path)
    assert _snapshot(path) == snap
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(InvalidInput, match="not a dask-rag index"):
        DistributedIndex.build(client, xb, spec=IndexSpec(n_shards=2), path=other)
    assert (other / "mine.txt").read_text() == "keep me"


@pytest.fixture(scope="module")
def built(client, tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "idx"
    xb = clustered_vectors(2_000, DIM, seed=2)
    index = DistributedIndex.build(client, xb, spec=IndexSpec(factory="IVF8,Flat", n_shards=2),
                                   path=path)
    yield index, path
    index.close()


@pytest.fixture(scope="module")
def pristine(client, tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    xb = clustered_vectors(1_000, DIM, seed=4)
    for name in ("a", "b"):
        DistributedIndex.build(client, xb, spec=IndexSpec(factory="IVF8,Flat", n_shards=2),
                               path=root / name).close()
    return root


class TestBadInput:

    @pytest.mark.parametrize("xq,match", [
        (np.zeros((3, DIM + 1), np.float32), "dimension"),
        (np.zeros(DIM, np.float32), "2-D"),
        (np.zeros((2, 3, DIM), np.float32), "2-D"),
        (np.zeros((0, DIM), np.float32), "empty"),
        (np.array([[np.nan] * DIM], np.float32), "NaN"),
        (np.array([[np.inf] * DIM], np.float32), "NaN or infinite"),
        (np.array([["a"] * DIM]), "numeric"),
    ])
    def test_bad_queries(self, built, xq, match):
        index, _ = built
        with pytest.raises(InvalidInput, match=match):
            index.search(xq, k=5)

    @pytest.mark.parametrize("k,match", [(0, ">= 1"), (-3, ">= 1"), (1025, "maximum"),
                                         (10**9, "maximum"), (2.5, "integer"), (True, "integer")])
    def test_bad_k(self, built, k, match):
        index, _ = built
        with pytest.raises(InvalidInput, match=match):
            index.search(np.zeros((1, DIM), np.float32), k=k)

    def test_bad_mutations_change_nothing(self, built):
        index, path = built
        snap = _snapshot(path)
        n = index.ntotal
        with pytest.raises(InvalidInput, match="dimension"):
            index.add(np.zeros((2, DIM + 2), np.float32), [10**6, 10**6 + 1])
        with pytest.raises(InvalidInput, match="NaN"):
            index.add(np.full((1, DIM), np.nan, np.float32), [10**6])
        with pytest.raises(InvalidInput, match="already in the index"):
            index.add(np.zeros((1, DIM), np.float32), [5])
        with pytest.raises(InvalidInput, match="duplicates"):
            index.add(np.zeros((2, DIM), np.float32), [10**6, 10**6])
        with pytest.raises(InvalidInput, match=">= 0"):
            index.add(np.zeros((1, DIM), np.float32), [-4])
        with pytest.raises(InvalidInput, match="integers"):
            index.remove(np.array([0.5]))
        assert index.ntotal == n
        assert _snapshot(path) == snap

    def test_unknown_factory_and_ivf_too_small(self, client):
        with pytest.raises(InvalidInput, match="factory"):
            DistributedIndex.build(client, np.zeros((10, 4), np.float32),
                                   spec=IndexSpec(factory="LSH"))  # rejected by IndexSpec
        with pytest.raises(InvalidInput, match="at least 64"):
            DistributedIndex.build(client, np.random.rand(10, 4).astype(np.float32),
                                   spec=IndexSpec(factory="IVF64,Flat"))
        with pytest.raises(InvalidInput, match="divisible"):
            DistributedIndex.build(client, np.random.rand(100, 10).astype(np.float32),
                                   spec=IndexSpec(factory="IVF4,PQ4"))


def _copy_index(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


class TestCorruptIndex:
    def test_missing_directory(self, client, tmp_path):
        with pytest.raises(IndexNotFound, match="does not exist"):
            DistributedIndex.load(client, tmp_path / "nope")
        (tmp_path / "empty").mkdir()
        with pytest.raises(IndexNotFound, match="not a dask-rag index"):
            DistributedIndex.load(client, tmp_path / "empty")

    def test_garbage_manifest(self, client, pristine, tmp_path):
        path = _copy_index(pristine / "a", tmp_path / "x")
        (path / "manifest.json").write_text("{not json")
        with pytest.raises(CorruptIndex, match="manifest.json.*not valid JSON"):
            DistributedIndex.load(client, path)

    @pytest.mark.parametrize("change,match", [
        ({"format_version": 99}, "format_version 99"),
        ({"dim": "big"}, "'dim'"),
        ({"n_shards": 5}, "n_shards"),
    ])
    def test_bad_manifest_fields(self, client, pristine, tmp_path, change, match):
        path = _copy_index(pristine / "a", tmp_path / "x")
        m = json.loads((path / "manifest.json").read_text())
        m.update(change)
        (path / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(CorruptIndex, match=match):
            DistributedIndex.load(client, path)

    def test_manifest_path_traversal_refused(self, client, pristine, tmp_path):
        path = _copy_index(pristine / "a", tmp_path / "x")
        m = json.loads((path / "manifest.json").read_text())
        m["shards"][0]["file"] = "../../etc/passwd"
        (path / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(CorruptIndex, match="outside the index"):
            DistributedIndex.load(client, path)

    def test_truncated_shard_file(self, client, pristine, tmp_path):
        path = _copy_index(pristine / "a", tmp_path / "x")
        shard = path / "shards" / "00001.faiss"
        shard.write_bytes(shard.read_bytes()[:100])
        with pytest.raises(CorruptIndex, match="00001.faiss.*checksum"):
            DistributedIndex.load(client, path)

    def test_shard_file_from_another_index(self, client, pristine, tmp_path):
        path = _copy_index(pristine / "a", tmp_path / "x")
        for name in ("00000.faiss", "00000.parquet"):
            (path / "shards" / name).write_bytes((pristine / "b" / "shards" / name).read_bytes())
        with pytest.raises(CorruptIndex, match="00000"):
            DistributedIndex.load(client, path)

    def test_corrupt_quantizer(self, client, pristine, tmp_path):
        path = _copy_index(pristine / "a", tmp_path / "x")
        (path / "quantizer.faiss").write_bytes(b"\x00" * 64)
        with pytest.raises(CorruptIndex, match="quantizer.faiss"):
            DistributedIndex.load(client, path)


def _fetch_rows_task(shard, *mats):
    return shard.fetch_rows(*mats)


def _first_ids(shard):
    return [i for i in shard.records.column("id").to_pylist() if i not in shard.deleted][:3]


def test_search_records_match_fetch_after_removal(client, tmp_path, data):
    """Hybrid search returns, for every dense and BM25 hit, that id's stored record (one
    batched lookup per shard): never another id's, never a removed one's."""
    xb, _, xq = data
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    records = [{"text": f"chunk {i} {words[i % 5]}", "source": f"s{i % 7}"}
               for i in range(len(xb))]
    index = DistributedIndex.build(client, xb, spec=IndexSpec(n_shards=2), path=tmp_path / "i",
                                   records=records)
    index.remove(np.arange(0, 200, 3))
    queries = [words[i % 5] + " chunk" for i in range(len(xq))]
    query = index.query(10, with_records=True, texts=queries, sparse_k=10)
    res = merge_results(len(xq), 10, index.metric,
                        client.gather(index.submit_search(query, xq)))
    checked = 0
    for I, payload in ((res.I, res.payload), (res.sparse.I, res.sparse.payload)):
        assert len(payload) == len(I)
        for ids, recs in zip(I, payload, strict=True):
            for cid, rec in zip(ids, recs, strict=True):
                if cid < 0:
                    assert rec is None
                    continue
                assert rec is not None and rec["id"] == cid
                assert rec["text"] == records[cid]["text"]
                assert set(rec) == {"id", "text", "source", "metadata"}
                checked += 1
    assert checked >= 600
    assert not np.isin(res.I, np.arange(0, 200, 3)).any()

    # the lookup itself: rows kept, padding and removed ids None, repeated ids share a dict
    shard = index.shard_futures[0]
    held = client.submit(_first_ids, shard, pure=False).result()
    dense = np.array([[held[0], -1, held[1]], [3, held[2], held[0]]])
    sparse = np.array([[held[1], held[0]]])
    a, b = client.submit(_fetch_rows_task, shard, dense, sparse, pure=False).result()
    assert [[r and r["id"] for r in row] for row in a] == [[held[0], None, held[1]],
                                                          [None, held[2], held[0]]]
    assert a[0][0] is a[1][2] and b[0][1] == a[0][0]
    index.close()


def test_a_replacing_add_is_one_acknowledged_write(client, tmp_path, data, monkeypatch):
    """``add(..., replace=old_ids)`` is one WAL entry: a crash right after it is logged (the
    fault point proves where) leaves exactly the new content on reload, never the removal
    without the addition."""
    xb, _, xq = data
    path = tmp_path / "idx"
    index = DistributedIndex.build(client, xb, spec=IndexSpec(factory="Flat", n_shards=3),
                                   path=path)
    old_ids = np.arange(10, 30)
    new_ids = np.arange(len(xb), len(xb) + 15)
    new_vecs = xb[:15][::-1] + 0.5
    report = tmp_path / "faults.log"
    monkeypatch.setenv("DASK_RAG_FAULTS", "wal.appended=raise")
    monkeypatch.setenv("DASK_RAG_FAULTS_REPORT", str(report))
    with pytest.raises(InjectedFault):
        index.add(new_vecs, new_ids, replace=old_ids)
    monkeypatch.delenv("DASK_RAG_FAULTS")
    assert [(p, a) for p, _, _, a in read_report(report)] == [("wal.appended", "raise")]
    index.close()  # the shards never applied it: only the log has it
    reloaded = DistributedIndex.load(client, path)
    expected_ids = np.concatenate([np.delete(np.arange(len(xb)), old_ids), new_ids])
    assert sorted(i for i, _, _ in reloaded.doc_index()) == sorted(expected_ids.tolist())
    assert reloaded.ntotal == len(expected_ids)
    expected_vecs = np.concatenate([np.delete(xb, old_ids, axis=0), new_vecs])
    truth = exact_search(expected_vecs, xq, 10)[1]
    np.testing.assert_array_equal(reloaded.search(xq, k=10)[1], expected_ids[truth])
    # applied live (no crash): the same content
    again = reloaded.add(xb[:2] + 9.0, [10**6, 10**6 + 1], replace=new_ids[:2])
    assert again == 2 and reloaded.ntotal == len(expected_ids)
    reloaded.close()


@pytest.mark.parametrize("factory", ["HNSW16", "Flat"])
def test_a_replaced_or_readded_id_has_only_its_new_vector(client, tmp_path, data, factory):
    """An HNSW graph cannot drop a node, so a removal is a tombstone until the next save.
    Writing the same id again (an upsert, or a remove then an add) must not bring the old
    node back: the id is found at its new vector only, once, before and after a save and a
    reload (the save compacts the graph), and the count stays right."""
    xb, _, _ = data
    xb = xb[:600]
    path = tmp_path / "idx"
    spec = IndexSpec(factory=factory, n_shards=2, ef_search=256)
    index = DistributedIndex.build(client, xb, spec=spec, path=path,
                                   records=[{"text": f"chunk {i}"} for i in range(len(xb))])
    old = xb[[7, 8]].copy()
    new = -old  # far from the old vectors (cosine -1)
    index.add(new[:1], np.array([7]), [{"text": "seven again"}],
              replace=np.array([7]))  # upsert
    index.remove(np.array([8]))
    index.add(new[1:], np.array([8]), [{"text": "eight again"}])  # remove, then add

    def check(ix: DistributedIndex) -> None:
        assert ix.ntotal == len(xb)
        D, I = ix.search(old, k=20)
        for row in range(2):
            assert len(set(I[row].tolist())) == 20  # no id twice
            assert 7 + row not in I[row][:10].tolist()  # the old vector is gone
        D, I = ix.search(new, k=20)
        assert I[:, 0].tolist() == [7, 8]
        np.testing.assert_allclose(D[:, 0], (new * new).sum(axis=1), rtol=1e-4)
        assert all(len(set(r.tolist())) == 20 for r in I)
        assert [r["text"] for r in ix.fetch(np.array([7, 8]))] == ["seven again", "eight again"]

    check(index)
    index.close()
    check(reloaded := DistributedIndex.load(client, path))  # from the write-ahead log
    reloaded.save()  # compacts the HNSW graph
    reloaded.close()
    check(again := DistributedIndex.load(client, path))
    again.close()
