"""The transformer of a sentence-transformers model run by ONNX Runtime (CPU), fp32 or int8.

Why: ORT's per-call overhead is a fraction of torch's, so one short query encodes in ~5 ms at
fp32 (~2 ms at int8) instead of ~13 ms with torch, and fp32 vectors equal torch's (cosine
0.99999); fp32 is the default because its vectors do not depend on the CPU generation (see
:mod:`dask_rag.embed.encoder`).  int8 is per-channel dynamic quantization of the MatMul
weights; its sessions set ``session.x64quantprecision`` so that CPUs without VNNI multiply
exactly (u8u8) instead of saturating u8s8 pairwise sums (onnxruntime issues 6004, 14642) —
mean cosine to fp32 0.9916 -> 0.9939 on AVX2 at equal speed (measured here).  That makes
int8 exact in its integer arithmetic, not portable: see the encoder's docstring.

Only the first module (the Hugging Face transformer) is exported; pooling, dense and normalise
modules stay the model's own torch modules, so any sentence-transformers model whose first
module is a ``Transformer`` works.  The exported (and quantized) graph is cached on disk under
``$DASK_RAG_CACHE`` (default ``~/.cache/dask-rag``), keyed by the model's files and the library
versions, and written atomically: Dask workers that load the same model at once each may export,
but none ever reads a half-written file; a damaged cache entry is rebuilt.  Entries nobody
can use again are pruned when a model loads: those whose model folder is gone (a deleted or
temporary model) and those unused for ``$DASK_RAG_CACHE_MAX_AGE_DAYS`` (default 30: left
behind by library upgrades, which change the key) — ~110 MB each for MiniLM.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dask_rag.errors import ModelLoadError

__all__ = ["OnnxTransformer", "cache_dir", "onnx_available", "prune_cache"]

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@functools.cache
def onnx_available() -> bool:
    """True when ONNX Runtime and the ``onnx`` package (export, quantization) are importable."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def cache_dir() -> Path:
    return Path(os.environ.get("DASK_RAG_CACHE") or Path.home() / ".cache" / "dask-rag")


def _atomic_target(final: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    return Path(tmp)


def _writable(folder: Path) -> Path:
    """``folder``, or a per-user temp folder when it cannot be written (read-only home)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_target(folder / "probe").unlink()
        return folder
    except OSError:
        fallback = Path(tempfile.gettempdir()) / f"dask-rag-{os.getuid()}" / "onnx"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


#: a cache entry's record of the model folder it was exported from (see :func:`prune_cache`)
_SOURCE = "source.txt"


def _mark_used(folder: Path, model_path: str) -> None:
    """Record where the entry's model lives and that it was just used (the folder's mtime)."""
    with contextlib.suppress(OSError):
        source = folder / _SOURCE
        if not source.exists():
            tmp = _atomic_target(source)
            tmp.write_text(str(Path(model_path).resolve()))
            tmp.replace(source)
        os.utime(folder)


def prune_cache(root: Path, keep: Path, max_age_days: float | None = None) -> list[Path]:
    """Delete the entries under ``root`` (but ``keep``) that cannot be used again: their model
    folder is gone, or nobody loaded them for ``max_age_days`` (default
    ``$DASK_RAG_CACHE_MAX_AGE_DAYS`` or 30).  A load refreshes its entry's age, so an entry
    in use is never old; one being written by another process has a fresh mtime too.
    Returns what was deleted."""
    import time

    if max_age_days is None:
        max_age_days = float(os.environ.get("DASK_RAG_CACHE_MAX_AGE_DAYS") or 30)
    cutoff = time.time() - max_age_days * 86400
    gone: list[Path] = []
    try:
        entries = [p for p in root.iterdir() if p.is_dir() and p != keep]
    except OSError:
        return gone
    for entry in entries:
        try:
            source = entry / _SOURCE
            orphan = source.exists() and not Path(source.read_text().strip()).exists()
            if orphan or entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
                gone.append(entry)
        except OSError:
            continue  # another process pruned or is writing it: leave it
    return gone


def _model_key(model_path: str, input_names: Sequence[str]) -> str:
    """A key that changes when the model's files or the exporting libraries change."""
    import onnxruntime
    import torch

    h = hashlib.sha256()
    for part in (str(Path(model_path).resolve()), torch.__version__, onnxruntime.__version__,
                 ",".join(input_names), "v1"):
        h.update(part.encode())
        h.update(b"\0")
    for f in sorted(Path(model_path).rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(model_path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Exporter/quantizer notices (tracer warnings, the quantizer's 'consider pre-processing'
    on the root logger) are not actionable by a user of dask-rag."""
    root = logging.getLogger()
    level = root.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root.setLevel(max(level, logging.ERROR))
        try:
            yield
        finally:
            root.setLevel(level)


def _export(auto_model: Any, input_names: Sequence[str], path: Path) -> None:
    """torch -> ONNX with dynamic batch and sequence axes (eager attention: ORT fuses it)."""
    import torch

    class _Wrapped(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: Any) -> Any:
            return self.model(**dict(zip(input_names, args, strict=True))).last_hidden_state

    set_attn = getattr(auto_model, "set_attn_implementation", None)
    if set_attn is not None:
        with _quiet(), contextlib.suppress(Exception):  # no eager attention: export as it is
            set_attn("eager")
    dummy = tuple(torch.ones(2, 16, dtype=torch.long) if n != "token_type_ids"
                  else torch.zeros(2, 16, dtype=torch.long) for n in input_names)
    axes = {n: {0: "batch", 1: "tokens"} for n in (*input_names, "token_embeddings")}
    tmp = _atomic_target(path)
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(_Wrapped(auto_model).eval(), dummy, str(tmp),
                              input_names=list(input_names), output_names=["token_embeddings"],
                              dynamic_axes=axes, opset_version=17, dynamo=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _quantize(src: Path, dst: Path) -> None:
    """Per-channel dynamic int8 of the MatMul weights (activations quantized per call).

    ORT's quantizer writes a shape-inferred copy *next to its input* (``model-inferred.onnx``)
    and deletes it after: workers quantizing one cache entry at once read each other's
    half-written copies.  Each quantizes a private link to ``src`` in a folder of its own.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=dst.parent) as work:
        private = Path(work) / src.name
        try:
            os.link(src, private)
        except OSError:  # no hard links here (another file system, Windows shares)
            shutil.copyfile(src, private)
        out = Path(work) / dst.name
        with _quiet():
            quantize_dynamic(str(private), str(out), weight_type=QuantType.QInt8, per_channel=True)
        os.replace(out, dst)


class OnnxTransformer:
    """Runs a sentence-transformers model's first module with ONNX Runtime.

    ``forward(features)`` takes the padded numpy token arrays and returns the token embeddings
    as float32 numpy ``(batch, tokens, hidden)``, like the torch module's ``token_embeddings``.
    """

    def __init__(self, st_model: Any, model_path: str, quantize: bool,
                 threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelLoadError("EmbedConfig(backend='onnx') needs the 'onnxruntime' and "
                                 "'onnx' packages (pip install onnxruntime onnx)") from exc
        first = st_model[0]
        auto_model = getattr(first, "auto_model", None)
        if auto_model is None:
            raise ModelLoadError(f"{model_path!r}: the ONNX backend needs a model whose first "
                                 f"module is a Transformer, not {type(first).__name__}")
        probe = st_model.tokenizer(["a"], return_tensors="np")
        self.input_names = tuple(n for n in _INPUTS if n in probe)
        key = _model_key(model_path, self.input_names)  # the fp32 and int8 graphs side by side
        folder = _writable(cache_dir() / "onnx") / f"{Path(model_path).name}-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        fp32 = folder / "model.onnx"
        self.path = folder / ("model_int8.onnx" if quantize else "model.onnx")
        self._threads = max(1, int(threads or _torch_threads()))
        # several single-threaded runs at once, one per length bucket, rather than one run
        # spread over all threads: small matmuls scale poorly across threads (measured here
        # with 2 threads: 1.6-2.0x fp32 torch vs 1.4-1.7x with ORT's intra-op threads)
        self._pool = (ThreadPoolExecutor(self._threads, thread_name_prefix="dask-rag-onnx")
                      if self._threads > 1 else None)
        try:
            try:
                self.session = self._session(ort, auto_model, fp32, quantize)
            except Exception:  # a damaged cache entry: rebuild it once
                for f in (fp32, self.path):
                    f.unlink(missing_ok=True)
                self.session = self._session(ort, auto_model, fp32, quantize)
        except Exception as exc:
            raise ModelLoadError(f"could not run {model_path!r} with ONNX Runtime "
                                 f"({self.path}): {type(exc).__name__}: {exc}") from None
        _mark_used(folder, model_path)
        prune_cache(folder.parent, keep=folder)

    def _session(self, ort: Any, auto_model: Any, fp32: Path, quantize: bool) -> Any:
        if not self.path.exists():
            if not fp32.exists():
                _export(auto_model, self.input_names, fp32)
            if quantize:
                _quantize(fp32, self.path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        if quantize:  # exact u8u8 products where the CPU's u8s8 kernel would saturate
            opts.add_session_config_entry("session.x64quantprecision", "1")
        return ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])

    def forward_many(self, features: Sequence[Any]) -> Iterator[npt.NDArray[np.float32]]:
        """:meth:`forward` of each padded batch, in order; several at once when this
        transformer has more than one thread (ORT releases the GIL while it runs)."""
        if self._pool is None or len(features) < 2:
            return map(self.forward, features)
        return self._pool.map(self.forward, features)

    def forward(self, features: Any) -> npt.NDArray[np.float32]:
        feeds = {n: np.ascontiguousarray(features[n], dtype=np.int64) for n in self.input_names}
        out: npt.NDArray[np.float32] = self.session.run(["token_embeddings"], feeds)[0]
        return out


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())
