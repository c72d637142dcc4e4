"""merge_topk: against brute force, padding, deterministic tie-breaking, torch variant."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_rag.errors import InvalidInput
from dask_rag.index.merge import FLT_MAX, merge_topk, merge_topk_torch


def _split(D, I, n_parts, rng):
    cols = rng.permutation(D.shape[1])
    chunks = np.array_split(cols, n_parts)
    return [D[:, c] for c in chunks], [I[:, c] for c in chunks]


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_merge_equals_global_sort(metric):
    rng = np.random.default_rng(0)
    D = rng.standard_normal((7, 40)).astype(np.float32)
    I = rng.permutation(1000)[:280].reshape(7, 40).astype(np.int64)
    Dp, Ip = _split(D, I, 5, rng)
    Dm, Im = merge_topk(Dp, Ip, 10, metric)
    order = np.argsort(-D if metric == "ip" else D, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(Im, np.take_along_axis(I, order, 1))
    np.testing.assert_array_equal(Dm, np.take_along_axis(D, order, 1))


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_padding_and_short_rows(metric):
    D = np.array([[0.5, 0.0], [0.0, 0.0]], np.float32)
    I = np.array([[3, -1], [-1, -1]], np.int64)
    Dm, Im = merge_topk([D], [I], 4, metric)
    assert Im.tolist() == [[3, -1, -1, -1], [-1, -1, -1, -1]]
    worst = -FLT_MAX if metric == "ip" else FLT_MAX
    assert Dm[0, 0] == 0.5 and (Dm[0, 1:] == worst).all() and (Dm[1] == worst).all()


def test_ties_break_by_id_regardless_of_part_order():
    D1 = np.array([[1.0, 1.0]], np.float32)
    I1 = np.array([[9, 4]], np.int64)
    D2 = np.array([[1.0, 0.5]], np.float32)
    I2 = np.array([[2, 7]], np.int64)
    a = merge_topk([D1, D2], [I1, I2], 3, "ip")
    b = merge_topk([D2, D1], [I2, I1], 3, "ip")
    assert a[1].tolist() == [[2, 4, 9]] and b[1].tolist() == a[1].tolist()


@settings(max_examples=60, deadline=None)
@given(nq=st.integers(1, 4), parts=st.integers(1, 6), kk=st.integers(1, 8), k=st.integers(1, 12),
       metric=st.sampled_from(["ip", "l2"]), seed=st.integers(0, 10_000))
def test_merge_is_order_independent_and_sorted(nq, parts, kk, k, metric, seed):
    rng = np.random.default_rng(seed)
    # few distinct values: many ties
    Ds = [rng.integers(0, 4, (nq, kk)).astype(np.float32) for _ in range(parts)]
    ids = rng.permutation(10_000)[: nq * kk * parts].reshape(parts, nq, kk)
    Is = [np.where(rng.random((nq, kk)) < 0.2, -1, ids[p]).astype(np.int64) for p in range(parts)]
    Dm, Im = merge_topk(Ds, Is, k, metric)
    perm = rng.permutation(parts)
    Dm2, Im2 = merge_topk([Ds[p] for p in perm], [Is[p] for p in perm], k, metric)
    np.testing.assert_array_equal(Im, Im2)
    np.testing.assert_array_equal(Dm, Dm2)
    for r in range(nq):
        real = Im[r] >= 0
        # real hits first, then padding
        assert not np.any(real[1:] & ~real[:-1])
        vals = Dm[r][real]
        assert np.all(np.diff(vals) <= 0) if metric == "ip" else np.all(np.diff(vals) >= 0)
        n_real = sum(int((I[r] >= 0).sum()) for I in Is)
        assert real.sum() == min(k, n_real)


def test_torch_merge_matches_numpy():
    pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    Ds = [rng.integers(0, 5, (6, 8)).astype(np.float32) for _ in range(3)]
    Is = [rng.permutation(100)[:48].reshape(6, 8).astype(np.int64) for _ in range(3)]
    Is[1][0, :3] = -1
    for metric in ("ip", "l2"):
        Dn, In = merge_topk(Ds, Is, 10, metric)
        Dt, It = merge_topk_torch(Ds, Is, 10, metric)
        np.testing.assert_array_equal(In, It.numpy())
        np.testing.assert_array_equal(Dn, Dt.numpy())


def test_merge_rejects_bad_arguments():
    D = np.zeros((2, 3), np.float32)
    I = np.zeros((2, 3), np.int64)
    with pytest.raises(InvalidInput, match="k="):
        merge_topk([D], [I], 0, "ip")
    with pytest.raises(InvalidInput, match="metric"):
        merge_topk([D], [I], 1, "cos")
    with pytest.raises(InvalidInput, match="shape"):
        merge_topk([D, D[:1]], [I, I[:1]], 1, "ip")


def _sparse_part(rng, nq, k, pool):
    """A shard's BM25 answer for some rows of an nq-query batch: ids from ``pool`` (repeats
    allowed), scores on a coarse grid (ties), padding at the end, a record per slot."""
    from dask_rag.index.query import ShardResult
    from dask_rag.index.sparse import SparseHits

    rows = np.sort(rng.choice(nq, size=int(rng.integers(1, nq + 1)), replace=False))
    I = np.full((len(rows), k), -1, np.int64)
    S = np.zeros((len(rows), k), np.float32)
    for j in range(len(rows)):
        n = int(rng.integers(0, k + 1))
        I[j, :n] = rng.choice(pool, size=n)
        S[j, :n] = np.round(rng.random(n) * 3, 1)
    payload = [[{"text": f"chunk {c}"} if c >= 0 else None for c in row] for row in I.tolist()]
    empty = np.zeros((len(rows), 0), np.float32)
    return ShardResult(rows=rows.astype(np.int64), D=empty, I=empty.astype(np.int64),
                       sparse=SparseHits(rows=rows.astype(np.int64), I=I, S=S, payload=payload))


def test_merge_sparse_equals_a_sort_of_every_shards_hits():
    """BM25 merge: per query, every shard's hits sorted by score then id, an id met twice at
    its best place, padding dropped, each record still beside its id; in any part order."""
    from dask_rag.index.sparse import merge_sparse

    rng = np.random.default_rng(7)
    for _ in range(300):
        nq, k = int(rng.integers(1, 6)), int(rng.integers(1, 8))
        parts = [_sparse_part(rng, nq, k, np.arange(25)) for _ in range(int(rng.integers(1, 4)))]
        got = merge_sparse(nq, parts)
        for r in range(nq):
            cands = sorted((float(s), int(c)) for p in parts for local, row in
                           enumerate(p.sparse.rows) if row == r
                           for c, s in zip(p.sparse.I[local], p.sparse.S[local], strict=True)
                           if c >= 0)
            cands.sort(key=lambda sc: (-sc[0], sc[1]))
            want: list[tuple[float, int]] = []
            for s, c in cands:
                if c not in {w[1] for w in want}:
                    want.append((s, c))
            want = want[:k]
            n = len(want)
            assert got.I[r, :n].tolist() == [c for _, c in want]
            assert got.S[r, :n].tolist() == [s for s, _ in want]
            assert (got.I[r, n:] == -1).all()
            assert got.payload[r][:n] == [{"text": f"chunk {c}"} for _, c in want]
        again = merge_sparse(nq, parts[::-1])
        np.testing.assert_array_equal(again.I, got.I)
