import nbformat as nbf
from pathlib import Path

def nb(cells):
    n = nbf.v4.new_notebook()
    n.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    n.cells = [nbf.v4.new_markdown_cell(c[1]) if c[0] == "md" else nbf.v4.new_code_cell(c[1]) for c in cells]
    return n

common_setup = '''import os, tempfile
from pathlib import Path
from distributed import Client

from dask_rag.cluster import start_local_cluster

# SMALL=1 (set by the test suite) keeps every cell to a few seconds
SMALL = os.environ.get("DASK_RAG_NOTEBOOK_SMALL") == "1"
cluster = start_local_cluster(2, dashboard_address=":0")
client = Client(cluster)
print("Dask dashboard:", client.dashboard_link)'''

common_teardown = '''pipe.close()
client.close()
cluster.close()'''

quick = nb([
("md", "# dask-rag quickstart\n\nIngest the built-in demo corpus (the Python standard library's own docstrings) into a faiss index sharded on a local Dask cluster, then search it and ask it questions. Open the dashboard link printed below and watch the task stream while the cells run: embedding tasks during ingestion, one `dask-rag-search` task per shard and a merge per query batch afterwards."),
("code", common_setup),
("md", "## Ingest\n\nDocuments are chunked by encoder tokens and embedded on the workers (the model is loaded once per worker); the shards are written in parallel and loaded as worker-local futures."),
("code", '''from dask_rag.corpus.demo import stdlib_documents
from dask_rag.ingest import ingest

modules = ["json", "csv", "functools", "subprocess", "pathlib"] if SMALL else None
docs = stdlib_documents(modules)
index_dir = Path(tempfile.mkdtemp()) / "demo-index"
report = ingest(client, docs, index_dir, progress=not SMALL)
print(report.summary())'''),
("md", "## Search and ask"),
("code", '''from dask_rag import RagPipeline

pipe = RagPipeline.from_index_dir(client, index_dir)
for hit in pipe.search("How do I serialize a Python object to a JSON string?", k=3):
    print(f"{hit.score:.4f}  {hit.source}")'''),
("code", '''answer = pipe.ask("How do I run a shell command and capture its output?")
print(answer.text)
for n, hit in enumerate(answer.citations, 1):
    print(f"[{n}] {hit.source}")
print({k: round(v, 1) for k, v in answer.timings_ms.items()})'''),
("md", "Batches are one graph each: `ask_many` answers a list of questions with one embedding task, one search task per shard and one generation task."),
("code", '''answers = pipe.ask_many(["What does functools.partial do?", "How do I read a CSV file?"])
[(a.question, a.citations[0].source) for a in answers]'''),
("md", "Filters are applied inside each shard during the search, so `k` hits still come back when enough chunks match:"),
("code", '''[h.source for h in pipe.search("parse", k=4, filter={"source_prefix": "json."})]'''),
("code", common_teardown),
])

profiling = nb([
("md", "# Profiling with the Dask dashboard\n\nA Dask `performance_report` records the task stream, worker profiles and bandwidth of a block of work into one HTML file; the per-stage timings every `Answer` carries show where a request's time goes. The HTTP shim exports the same stage timings as the Prometheus histogram `dask_rag_stage_latency_seconds`."),
("code", common_setup),
("code", '''from distributed import performance_report
from dask_rag.corpus.demo import stdlib_documents
from dask_rag.ingest import ingest
from dask_rag import RagPipeline

index_dir = Path(tempfile.mkdtemp()) / "index"
ingest(client, stdlib_documents(["json", "csv", "functools", "itertools", "os"]), index_dir,
       progress=False)
pipe = RagPipeline.from_index_dir(client, index_dir)
pipe.warmup()'''),
("code", '''questions = ["How do I sort a list?", "What is a named tuple?", "How to parse JSON?",
             "How do I join paths?", "What does itertools.chain do?"] * (2 if SMALL else 10)
report = Path(tempfile.mkdtemp()) / "dask-rag-report.html"
with performance_report(filename=str(report)):
    answers = [pipe.ask(q) for q in questions]          # one request at a time
    batched = pipe.ask_many(questions)                   # one graph for the batch
print("report:", report, report.stat().st_size, "bytes")'''),
("md", "## Per-stage latency"),
("code", '''import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

stages = ["embed", "search", "fuse", "generate", "total"]
single = {s: [a.timings_ms.get(s, 0) for a in answers] for s in stages}
fig, ax = plt.subplots(figsize=(7, 3))
ax.boxplot([single[s] for s in stages])
ax.set_xticks(range(1, len(stages) + 1), stages)
ax.set_ylabel("ms")
ax.set_title("per-stage latency, one request at a time")
fig.tight_layout()
print({s: round(float(np.median(v)), 1) for s, v in single.items()})
print("batched, per batch:", {k: round(v, 1) for k, v in batched[0].timings_ms.items()})'''),
("code", common_teardown),
])

scaling = nb([
("md", "# Shards vs throughput\n\nThe same clustered synthetic vectors, indexed with 1, 2 and 4 shards on two single-threaded workers; QPS of batched searches and recall@10 against exact search. `benchmarks/scaling.py` runs the full sweep (10k to 1M vectors, 1 to 8 shards)."),
("code", common_setup),
("code", '''import time
import numpy as np
from dask_rag import DistributedIndex, IndexSpec
from dask_rag.datasets import clustered_vectors, exact_search, recall_at_k

n = 20_000 if SMALL else 200_000
x = clustered_vectors(n + 512, 128, n_clusters=200)
xb, xq = x[:n], x[n:]
truth = exact_search(xb, xq, 10)[1]
rows = []
for shards in (1, 2, 4):
    spec = IndexSpec(factory="IVF256,Flat", n_shards=shards, nprobe=16)
    with DistributedIndex.build(client, xb, spec=spec) as index:
        index.search(xq[:64], 10)
        t0 = time.perf_counter()
        for i in range(0, len(xq), 128):
            _, I = index.search(xq[i:i + 128], 10)
        qps = len(xq) / (time.perf_counter() - t0)
        rows.append((shards, qps, recall_at_k(index.search(xq, 10)[1], truth, 10)))
rows'''),
("code", '''import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-")
ax.set_xlabel("shards")
ax.set_ylabel("queries / s (batch 128)")
fig.tight_layout()
assert all(r[2] == rows[0][2] for r in rows), "ivf sharding must not change the results"'''),
("code", '''client.close()
cluster.close()'''),
])

out = Path("notebooks")
for name, n in (("01-quickstart.ipynb", quick), ("02-profiling.ipynb", profiling), ("03-scaling.ipynb", scaling)):
    nbf.write(n, out / name)
print("ok")  # run: python notebooks/make_notebooks.py (writes the notebooks without outputs)
