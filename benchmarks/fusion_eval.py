"""Offline fusion scoring for :mod:`benchmarks.fusion_study`: every fusion of a grid over
cached candidate lists, per set, and the leave-one-out choice of the default.

A row is one judged query: ``dense`` / ``sparse`` lists of ``[chunk id, score, document]``
(30 chunks deep, best first), ``rel`` its judgements, ``split`` tune or test.  The fused
ranking is :func:`dask_rag.rag.fusion.fuse` of the two lists — the function the pipeline runs —
cut to the first 10 distinct documents.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dask_rag.evaluate import mrr_at_k, recall_at_k
from dask_rag.rag.fusion import Fusion, fuse

K = 10
Rows = list[dict[str, Any]]


def _docs(ranked: Sequence[int], src: dict[int, str]) -> list[str]:
    seen: dict[str, None] = {}
    for c in ranked:
        seen.setdefault(src[c], None)
        if len(seen) == K:
            break
    return list(seen)


def metrics(rows: Rows, fusion: Fusion | str) -> dict[str, float]:
    """recall@10 and MRR@10 (document level) of ``fusion`` ('dense' / 'sparse': one list)."""
    rec = mrr = 0.0
    for row in rows:
        src = {int(c): s for c, _, s in (*row["dense"], *row["sparse"])}
        dense = [(int(c), float(x)) for c, x, _ in row["dense"]]
        sparse = [(int(c), float(x)) for c, x, _ in row["sparse"]]
        if isinstance(fusion, str):
            ranked = [c for c, _ in (dense if fusion == "dense" else sparse)]
        else:
            ranked = [c for c, _ in fuse("hybrid", dense, sparse, fusion, row["text"],
                                         row.get("idf_sum"))]
        docs = _docs(ranked, src)
        rec += recall_at_k(docs, row["rel"], K)
        mrr += mrr_at_k(docs, row["rel"], K)
    n = max(1, len(rows))
    return {"recall@10": round(rec / n, 6), "mrr@10": round(mrr / n, 6)}


def grid() -> list[Fusion]:
    """Fixed fusions (every method, dense weights 0.3-0.9) and the adaptive ones."""
    out = [Fusion(method="rrf", dense_weight=0.5, rrf_k=60),
           Fusion(method="rrf", dense_weight=0.95, rrf_k=10)]
    for w in (0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9):
        out += [Fusion(method=m, dense_weight=w) for m in ("weighted", "dbsf")]
        out += [Fusion(method="rrf", dense_weight=w, rrf_k=rk) for rk in (10, 60)]
    for w in (0.3, 0.4, 0.5, 0.6, 0.7):
        for qw in (0.9, 0.95, 1.0):
            out.append(Fusion(method="adaptive", dense_weight=w, question_weight=qw, rrf_k=10))
    return out


#: the acceptance lines (issue #28): no measure more than TOLERANCE below the better part;
#: where BM25's recall@10 is within CLOSE of dense's, recall@10 GAIN above the better part
TOLERANCE, CLOSE, GAIN = 0.01, 0.05, 0.02


def _margin(m: dict[str, float], base: dict[str, dict[str, float]]) -> float:
    """The smaller gain over the better single retriever, of recall@10 and MRR@10."""
    return min(m[key] - max(base["dense"][key], base["sparse"][key])
               for key in ("recall@10", "mrr@10"))


def holds(m: dict[str, float], base: dict[str, dict[str, float]]) -> bool:
    """Whether ``m`` meets the acceptance lines against the set's dense and sparse figures."""
    if _margin(m, base) < -TOLERANCE:
        return False
    d, s = base["dense"]["recall@10"], base["sparse"]["recall@10"]
    return s < d - CLOSE or m["recall@10"] >= max(d, s) + GAIN


def study(sets: dict[str, Rows]) -> dict[str, Any]:
    """Every set's table (test halves), and the leave-one-out choices."""
    from dask_rag.config import RagConfig
    from dask_rag.rag.fusion import default_fusion

    default = default_fusion(RagConfig())
    candidates = grid()
    tables: dict[str, dict[str, Any]] = {}
    for name, rows in sets.items():
        test = [r for r in rows if r["split"] == "test"]
        every = rows
        tables[name] = {
            "all": {"dense": metrics(every, "dense"), "sparse": metrics(every, "sparse"),
                    **{_label(f): metrics(every, f) for f in candidates}},
            "test": {"dense": metrics(test, "dense"), "sparse": metrics(test, "sparse"),
                     "default": metrics(test, default),
                     **{_label(f): metrics(test, f) for f in candidates}},
        }
    loo = {}
    for held in [*sets, None]:
        others = [n for n in sets if n != held]

        def score(f: Fusion, others: list[str] = others) -> tuple[float, int]:
            label = _label(f)
            margins = [_margin(tables[n]["all"][label], tables[n]["all"]) for n in others]
            passed = sum(holds(tables[n]["all"][label], tables[n]["all"]) for n in others)
            return sum(margins) / len(margins), passed

        best = max(candidates, key=score)
        label = _label(best)
        if held is None:  # the rule on every set: what the default should be
            chosen_on_all = {"chosen": best.model_dump(), "label": label,
                             "mean_margin": round(score(best)[0], 6),
                             "sets_passed": score(best)[1]}
            continue
        loo[held] = {"chosen": best.model_dump(), "label": label, "chosen_on": others,
                     "mean_margin_on_others": round(score(best)[0], 6),
                     "sets_passed_of_others": score(best)[1],
                     "held_out_holds": holds(tables[held]["test"][label], tables[held]["test"]),
                     "held_out_test": tables[held]["test"][label],
                     "dense_test": tables[held]["test"]["dense"],
                     "sparse_test": tables[held]["test"]["sparse"]}
    return {"default": default.model_dump(), "rule": RULE, "tables": tables,
            "leave_one_out": loo, "rule_on_every_set": chosen_on_all}


RULE = ("choose, on every set but the held-out one (all their queries), the fusion with the "
        "largest mean over those sets of its margin min(recall@10 - better part, mrr@10 - "
        "better part), the better part being the better of dense and sparse on that set and "
        "measure; report it on the held-out set's test half")


def _label(f: Fusion) -> str:
    if f.method == "rrf":
        return f"rrf w{f.dense_weight} k{f.rrf_k}"
    if f.method == "adaptive":
        return f"adaptive w{f.dense_weight} q{f.question_weight} k{f.rrf_k}"
    return f"{f.method} w{f.dense_weight}"


def auto_table(sets: dict[str, Rows], tuned: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each set's test half with the fusion ``--tune-fusion auto`` adopted on that set's own
    pseudo-queries (the default where it adopted none), beside the default.  No set's labels
    take part in the tuning: every row is held out."""
    from dask_rag.config import RagConfig
    from dask_rag.rag.fusion import default_fusion

    default = default_fusion(RagConfig())
    out = {}
    for name, rows in sets.items():
        test = [r for r in rows if r["split"] == "test"]
        fusion = tuned[name]["fusion"]
        chosen = default if fusion is None else Fusion.model_validate(fusion)
        out[name] = {"adopted": fusion is not None, "fusion": chosen.model_dump(),
                     "pseudo_queries": tuned[name]["evidence"].get("pseudo_queries"),
                     "check_half": tuned[name]["evidence"].get("check"),
                     "default_test": metrics(test, default), "auto_test": metrics(test, chosen)}
    return out
