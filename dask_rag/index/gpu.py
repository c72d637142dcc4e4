"""GPU search paths: a torch fp16 brute-force shard, and faiss-gpu shards.

Everything here imports torch / faiss-gpu lazily — ``import dask_rag`` must work on a laptop
without either.  :class:`TorchFlatIndex` also runs on the CPU (fp32), which is how its results
are checked against ``IndexFlat`` on machines without a GPU.

faiss GPU indexes are not thread-safe, and a worker may run several search tasks at once, so
every faiss-gpu index of a worker shares one lock and one ``StandardGpuResources`` (held by
:class:`GpuResourcesPlugin`, not by a module global).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import numpy.typing as npt
from distributed.diagnostics.plugin import WorkerPlugin

from dask_rag.config import METRICS
from dask_rag.errors import InvalidInput
from dask_rag.index.merge import empty_result, merge_topk_torch, worst_distance

__all__ = ["GpuResourcesPlugin", "TorchFlatIndex", "cuda_available", "to_faiss_gpu"]

# scores of one block are nq x block halves; keep a block under ~256 MiB of scores
_SCORE_BYTES = 256 << 20


def cuda_available() -> bool:
    """True when torch sees a CUDA device (False when torch is not installed)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class TorchFlatIndex:
    """Exact search as a matmul + top-k on one device (fp16 on CUDA, fp32 on CPU).

    The database is scanned in blocks so the score matrix stays bounded; per-block top-k
    results are merged with :func:`merge_topk_torch` (same tie-breaking as the numpy merge).
    """

    def __init__(self, vectors: npt.NDArray[np.float32], ids: npt.NDArray[np.int64], metric: str,
                 device: str | None = None, dtype: Any = None) -> None:
        import torch

        if metric not in METRICS:
            raise InvalidInput(f"metric={metric!r} is invalid: must be 'ip' or 'l2'")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.metric = metric
        self.xb = torch.as_tensor(np.ascontiguousarray(vectors, np.float32)).to(
            self.device, self.dtype)
        self.ids = torch.as_tensor(np.asarray(ids, np.int64)).to(self.device)
        self.sq_norms = (self.xb.float() ** 2).sum(1) if metric == "l2" else None

    @property
    def ntotal(self) -> int:
        return int(self.xb.shape[0])

    def search(self, xq: npt.NDArray[np.float32], k: int, shard: Any = None,
               sel_ids: npt.NDArray[np.int64] | None = None
               ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        import torch

        nq = xq.shape[0]
        if nq == 0 or self.ntotal == 0:
            return empty_result(nq, k, self.metric)
        q = torch.as_tensor(np.ascontiguousarray(xq, np.float32)).to(self.device)
        qh = q.to(self.dtype)
        allowed = None
        if sel_ids is not None:
            allowed = torch.isin(self.ids, torch.as_tensor(sel_ids, device=self.device))
        itemsize = 2 if self.dtype == torch.float16 else 4
        block = max(1024, _SCORE_BYTES // max(1, nq * itemsize))
        worst = worst_distance(self.metric)
        D_parts, I_parts = [], []
        with torch.inference_mode():
            for start in range(0, self.ntotal, block):
                xb = self.xb[start:start + block]
                scores = (qh @ xb.T).float()
                if self.metric == "l2":
                    assert self.sq_norms is not None
                    scores = (q * q).sum(1, keepdim=True) - 2 * scores + self.sq_norms[
                        start:start + block][None, :]
                if allowed is not None:
                    scores = scores.masked_fill(~allowed[start:start + block][None, :], worst)
                kk = min(k, xb.shape[0])
                vals, pos = torch.topk(scores, kk, dim=1, largest=self.metric == "ip")
                ids = self.ids[start:start + block][pos]
                if allowed is not None:
                    ids = torch.where(allowed[start:start + block][pos], ids,
                                      torch.full_like(ids, -1))
                D_parts.append(vals)
                I_parts.append(ids)
            D, I = merge_topk_torch(D_parts, I_parts, k, self.metric)
        return D.cpu().numpy().astype(np.float32), I.cpu().numpy().astype(np.int64)


class GpuResourcesPlugin(WorkerPlugin):
    """One faiss ``StandardGpuResources`` and one lock per worker, shared by its GPU shards."""

    name = "dask-rag-gpu"

    def __init__(self, device: int = 0) -> None:
        self.device = device
        self.lock = threading.Lock()
        self._resources: Any = None

    def setup(self, worker: Any) -> None:
        self.lock = threading.Lock()
        self._resources = None

    def resources(self) -> Any:
        import faiss

        with self.lock:
            if self._resources is None:
                self._resources = faiss.StandardGpuResources()
            return self._resources


def _gpu_plugin() -> GpuResourcesPlugin:
    from dask_rag.cluster.plugins import worker_plugin

    try:
        return worker_plugin(GpuResourcesPlugin)
    except ValueError:  # not in a task (a shard loaded in this process): its own resources
        return GpuResourcesPlugin()


def to_faiss_gpu(index: Any) -> Any:
    """A GPU copy of a CPU faiss index, tagged with the worker's GPU lock."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        raise InvalidInput("backend='faiss-gpu' needs a faiss build with GPU support "
                           "(pip install 'dask-rag[gpu]')")
    plugin = _gpu_plugin()
    gpu_index = faiss.index_cpu_to_gpu(plugin.resources(), plugin.device, index)
    gpu_index._dask_rag_lock = plugin.lock
    return gpu_index
