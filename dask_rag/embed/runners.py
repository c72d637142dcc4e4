"""How an encoder runs its model: one strategy per backend, picked once when the model loads.

A :class:`~dask_rag.embed.encoder.SentenceEncoder` tokenizes, orders and buckets texts and
keeps the counters; what differs between backends is only how a tokenized text (or a padded
bucket of them) becomes a sentence embedding.  Each runner answers that in two ways:

``each(features)``
    each text unpadded, as if alone (the batch-invariant path; ONNX fp32 runs texts of one
    token length together, bit-identically): yields each text's embedding as a float32
    vector, normalised when the config says so;
``buckets(groups)``
    padded buckets (``batch_invariant=False``): yields each bucket's embeddings ``(b, dim)``
    as a float torch tensor, before normalisation.

:class:`TorchRunner` runs sentence-transformers' torch modules at fp32 / bf16 / fp16 or with
torch's dynamic int8 ``Linear`` layers; :class:`OnnxRunner` runs the transformer with ONNX
Runtime (:mod:`dask_rag.embed.onnx`) and the pooling in float64 numpy where the model's pooling
is a standard one.  Why here and not inline: the encoder's two encode paths no longer ask which
backend they are on, and a new backend (OpenVINO, a GPU engine) is one class.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["MAX_GROUP", "OnnxRunner", "Runner", "TorchRunner", "load_runner", "unit"]

#: the most texts of one token length that run as one forward (bounds its activations)
MAX_GROUP = 64

Features = dict[str, npt.NDArray[np.int64]]
Rows = list[dict[str, list[int]]]


class Runner(Protocol):
    """What an encoder needs from its backend (see the module docstring)."""

    #: the sentence-transformers model at the runner's precision (tokenizer, dimension)
    model: Any
    #: forward passes :meth:`each` has run (fewer than its texts where it groups them)
    forwards: int

    def each(self, features: Sequence[Features]) -> Iterator[npt.NDArray[np.float32]]: ...

    def buckets(self, groups: Sequence[Rows]) -> Iterator[Any]: ...


def load_runner(backend: str, model: Any, model_path: str, precision: str, device: str,
                normalize: bool) -> Runner:
    """The runner for a resolved ``backend`` / ``precision`` / ``device`` (see
    :func:`~dask_rag.embed.encoder.resolve_config`)."""
    if backend == "onnx":
        return OnnxRunner(model, model_path, quantize=precision == "int8", normalize=normalize)
    return TorchRunner(model, precision, device, normalize)


def unit(v: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """``v / ||v||`` computed in float64, as float32 (a zero vector stays zero).

    The norm is an exactly rounded sum (``math.fsum``), not a BLAS dot product: BLAS picks
    its kernel, and with it the order of the sum, by CPU generation.
    """
    v64 = np.asarray(v, dtype=np.float64)
    norm = math.sqrt(math.fsum((v64 * v64).tolist()))
    return (v64 / norm if norm > 1e-12 else v64).astype(np.float32)


def run_modules_after_transformer(model: Any, token_embeddings: Any, attention_mask: Any
                                  ) -> Any:
    """The model's own pooling / dense / normalise modules (torch) over token embeddings:
    the sentence embeddings ``(b, dim)`` as a float tensor."""
    features: dict[str, Any] = {"token_embeddings": token_embeddings,
                                "attention_mask": attention_mask}
    for module in list(model)[1:]:
        features = module(features)
    return features["sentence_embedding"].float()


class TorchRunner:
    """sentence-transformers' torch modules at the encoder's precision."""

    def __init__(self, model: Any, precision: str, device: str, normalize: bool) -> None:
        import torch

        if precision == "bf16":
            model = model.to(torch.bfloat16)
        elif precision == "fp16":
            model = model.to(torch.float16)
        elif precision == "int8":
            import warnings

            with warnings.catch_warnings():  # torch.ao deprecation notices, not actionable here
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(
                    model, {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
                    dtype=torch.qint8)
        self.model = model
        self.device = device
        self.normalize = normalize
        self.forwards = 0

    def _forward(self, feats: Any) -> Any:
        feats = {k: v.to(self.device) for k, v in feats.items()}
        return self.model(feats)["sentence_embedding"].float()

    def each(self, features: Sequence[Features]) -> Iterator[npt.NDArray[np.float32]]:
        import torch

        for f in features:
            self.forwards += 1
            emb = self._forward({k: torch.from_numpy(v) for k, v in f.items()}).cpu().numpy()[0]
            yield unit(emb) if self.normalize else emb

    def buckets(self, groups: Sequence[Rows]) -> Iterator[Any]:
        for rows in groups:
            yield self._forward(self.model.tokenizer.pad(rows, padding=True,
                                                         return_tensors="pt"))


@dataclass(frozen=True)
class _Pooling:
    """A model's pooling that :meth:`OnnxRunner.pool_one` computes in numpy."""

    modes: tuple[str, ...]
    normalize: bool


_NUMPY_POOLINGS = frozenset({"cls", "lasttoken", "max", "mean", "mean_sqrt_len_tokens"})


def numpy_pooling(model: Any) -> _Pooling | None:
    """The model's pooling when its modules after the transformer are exactly a standard
    ``Pooling`` (optionally followed by ``Normalize``); None otherwise (Dense layers, weighted
    means, prompts excluded from pooling: those run as the model's own torch modules)."""
    modules = list(model)[1:]
    names = [type(m).__name__ for m in modules]
    if names not in (["Pooling"], ["Pooling", "Normalize"]):
        return None
    pooling = modules[0]
    mode = getattr(pooling, "pooling_mode", None)
    modes = (mode,) if isinstance(mode, str) else tuple(mode or ())
    if not modes or not set(modes) <= _NUMPY_POOLINGS or not getattr(pooling,
                                                                     "include_prompt", True):
        return None
    return _Pooling(modes=modes, normalize=names[-1] == "Normalize")


class OnnxRunner:
    """The transformer run by ONNX Runtime (fp32, or int8 dynamic quantization), pooling after.

    Texts (or buckets) run in parallel on single-threaded sessions when there are threads.
    """

    def __init__(self, model: Any, model_path: str, quantize: bool, normalize: bool) -> None:
        from dask_rag.embed.onnx import OnnxTransformer

        self.model = model
        self.normalize = normalize
        self.transformer = OnnxTransformer(model, model_path, quantize=quantize)
        self._pooling = numpy_pooling(model)
        self.forwards = 0
        #: texts of one token length run as one forward (see :meth:`each`): fp32 only — int8's
        #: dynamic quantization scales activations by the whole batch's range — and only where
        #: this CPU's kernels are seen to give each row the bits it gets alone
        self.groups_lengths = not quantize and self._rows_independent()

    def each(self, features: Sequence[Features]) -> Iterator[npt.NDArray[np.float32]]:
        """Each text's embedding, in order, as if it ran alone.

        Texts of the same token length need no padding to share a forward, and then every
        kernel sees each row as it would alone (the GEMMs accumulate each output over the
        same weights in the same order whatever the number of rows; softmax, LayerNorm and
        GELU work per row, on rows of the same width), so their vectors are bit-identical to
        one forward each — checked on this CPU at load (:meth:`_rows_independent`) and by
        the tests.  The weights are read once per group instead of once per text: 64 clients
        of ``/v1/embeddings`` (short queries) get 1.20x the q/s, dense search 1.18x
        (``benchmarks/results/limit_ab_length_groups.json``).
        """
        if not self.groups_lengths or len(features) < 2:
            self.forwards += len(features)
            for hidden in self.transformer.forward_many(features):
                yield self.pool_one(hidden)
            return
        by_length: dict[tuple[int, ...], list[int]] = {}
        for i, f in enumerate(features):
            by_length.setdefault(tuple(f["input_ids"].shape), []).append(i)
        groups = [rows[a:a + MAX_GROUP] for rows in by_length.values()
                  for a in range(0, len(rows), MAX_GROUP)]
        stacked = [features[g[0]] if len(g) == 1 else
                   {k: np.concatenate([features[i][k] for i in g]) for k in features[g[0]]}
                   for g in groups]
        self.forwards += len(groups)
        out: list[npt.NDArray[np.float32] | None] = [None] * len(features)
        for g, hidden in zip(groups, self.transformer.forward_many(stacked), strict=True):
            for row, i in enumerate(g):
                out[i] = self.pool_one(hidden[row:row + 1])
        for emb in out:
            assert emb is not None
            yield emb

    def _rows_independent(self) -> bool:
        """Whether three texts of one length, run together, give the token embeddings each
        gets alone, bit for bit (a kernel that blocks its sums by the number of rows would
        not; then every text runs alone, as before)."""
        tok = self.model.tokenizer
        first = tok(["a portable check of row independence in one forward"],
                    return_tensors="np")
        names = self.transformer.input_names
        one = {k: np.asarray(first[k], dtype=np.int64) for k in names}
        ids = one["input_ids"][0]
        rows = [ids, np.concatenate([ids[:1], ids[1:-1][::-1], ids[-1:]]),
                np.concatenate([ids[:1], np.roll(ids[1:-1], 3), ids[-1:]])]
        feats = [{**one, "input_ids": r[None, :]} for r in rows]
        together = self.transformer.forward(
            {k: np.concatenate([f[k] for f in feats]) for k in names})
        return all(np.array_equal(together[i], self.transformer.forward(f)[0])
                   for i, f in enumerate(feats))

    def buckets(self, groups: Sequence[Rows]) -> Iterator[Any]:
        import torch

        feats = [self.model.tokenizer.pad(rows, padding=True, return_tensors="np")
                 for rows in groups]
        hidden = self.transformer.forward_many(feats)  # buckets run in parallel
        for f, h in zip(feats, hidden, strict=True):
            yield run_modules_after_transformer(
                self.model, torch.from_numpy(h),
                torch.from_numpy(np.asarray(f["attention_mask"])))

    def pool_one(self, hidden: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The sentence embedding of one unpadded text from its token embeddings ``(1, L, H)``.

        Standard poolings (mean, CLS, max, last token) and normalisation are computed here in
        float64 numpy, whose reductions depend only on the array's shape (torch may split a
        reduction across its intra-op threads, and a worker and a notebook differ in those);
        other module stacks run the model's own torch modules on the one text.
        """
        if self._pooling is None:
            import torch

            emb = run_modules_after_transformer(
                self.model, torch.from_numpy(hidden),
                torch.ones(hidden.shape[:2], dtype=torch.int64)).cpu().numpy()[0]
            return unit(emb) if self.normalize else emb
        tokens = hidden[0].astype(np.float64)
        parts = []
        for mode in self._pooling.modes:
            if mode == "cls":
                parts.append(tokens[0])
            elif mode == "lasttoken":
                parts.append(tokens[-1])
            elif mode == "max":
                parts.append(tokens.max(axis=0))
            elif mode == "mean":
                parts.append(tokens.sum(axis=0) / tokens.shape[0])
            else:  # mean_sqrt_len_tokens
                parts.append(tokens.sum(axis=0) / np.sqrt(tokens.shape[0]))
        emb = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if self._pooling.normalize or self.normalize:
            return unit(emb)
        return emb.astype(np.float32)
