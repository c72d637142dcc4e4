"""Cluster specs (``clusters/*.yaml``): one file moves dask-rag from a laptop to SLURM,
Kubernetes or a GPU box.

A spec is validated against :data:`SPEC_SCHEMA` (unknown keys, wrong types and missing
sections are errors naming the key) and turned into a Dask cluster::

    kind: local | local-cuda | slurm | kubernetes | scheduler
    workers: 2                     # worker processes / jobs / pods
    threads_per_worker: 1
    memory_limit: 4GiB
    resources: {shard: 4}          # Dask worker resources: placement of work
    tls: {ca_file: ..., cert: ..., key: ...}   # distributed.security.Security, TLS only
    comms: {scheduler_to_worker_ms: 0.5, ...}  # batched-send intervals (CommConfig)
    local_cuda: {...}   slurm: {...}   kubernetes: {...}   scheduler: {address: ...}

Worker resources place work: a ``shard`` resource marks index workers (shard loads then run
only there, and so do searches, which follow their shard); ``generator: 1`` marks the GPU
workers holding an LLM (generation tasks request it).  vLLM workers must be non-daemon
processes (``local_cuda.daemon: false``), since vLLM starts processes of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dask_rag.config import CommConfig
from dask_rag.errors import InvalidInput

__all__ = ["SPEC_SCHEMA", "ClusterSpec", "load_spec", "start_from_spec"]

_SECTION_KEYS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "local_cuda": {"visible_devices": str, "rmm_pool_size": str, "protocol": str,
                   "enable_nvlink": bool, "daemon": bool},
    "slurm": {"queue": str, "account": str, "cores": int, "memory": str, "walltime": str,
              "processes": int, "jobs": int, "job_extra_directives": list,
              "job_script_prologue": list, "interface": str, "local_directory": str,
              "python": str},
    "kubernetes": {"name": str, "image": str, "namespace": str, "resources": dict,
                   "env": dict, "scheduler_service_type": str},
    "scheduler": {"address": str},
    "tls": {"ca_file": str, "cert": str, "key": str},
    "comms": {"client_to_scheduler_ms": (int, float), "scheduler_to_worker_ms": (int, float),
              "scheduler_to_client_ms": (int, float), "worker_to_scheduler_ms": (int, float)},
}

#: the spec format, as a JSON Schema (for editors and documentation; enforced by load_spec)
SPEC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["kind"],
    "additionalProperties": False,
    "properties": {
        "kind": {"enum": ["local", "local-cuda", "slurm", "kubernetes", "scheduler"]},
        "workers": {"type": "integer", "minimum": 0},
        "threads_per_worker": {"type": "integer", "minimum": 1},
        "memory_limit": {"type": ["string", "number"]},
        "resources": {"type": "object", "additionalProperties": {"type": "number"}},
        "dashboard_address": {"type": "string"},
        **{name: {"type": "object", "additionalProperties": False,
                  "properties": {k: {} for k in keys}} for name, keys in _SECTION_KEYS.items()},
    },
}

_TOP_KEYS: dict[str, type | tuple[type, ...]] = {
    "kind": str, "workers": int, "threads_per_worker": int, "memory_limit": (str, int, float),
    "resources": dict, "dashboard_address": str, **{k: dict for k in _SECTION_KEYS}}
_KINDS = ("local", "local-cuda", "slurm", "kubernetes", "scheduler")
_REQUIRED_SECTION = {"slurm": "slurm", "kubernetes": "kubernetes", "scheduler": "scheduler"}


def _check(where: str, data: dict[str, Any], schema: dict[str, type | tuple[type, ...]]) -> None:
    for key, value in data.items():
        if key not in schema:
            raise InvalidInput(f"{where}: unknown key {key!r}; allowed: {sorted(schema)}")
        typ = schema[key]
        if isinstance(value, bool) and typ in (int, (int, float), (str, int, float)):
            raise InvalidInput(f"{where}: {key!r} must not be a boolean")
        if not isinstance(value, typ):
            names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            raise InvalidInput(f"{where}: {key!r} must be {names}, got "
                               f"{type(value).__name__}")


@dataclass(frozen=True)
class ClusterSpec:
    """A validated cluster spec."""

    kind: str
    path: str = "<dict>"
    workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str | int | float = "auto"
    resources: dict[str, float] = field(default_factory=dict)
    dashboard_address: str = ":8787"
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str = "<dict>") -> ClusterSpec:
        if not isinstance(data, dict):
            raise InvalidInput(f"{where}: a cluster spec must be a mapping")
        _check(where, data, _TOP_KEYS)
        kind = data.get("kind")
        if kind not in _KINDS:
            raise InvalidInput(f"{where}: 'kind' must be one of {list(_KINDS)}, got {kind!r}")
        sections = {k: dict(data[k]) for k in _SECTION_KEYS if k in data}
        for name, body in sections.items():
            _check(f"{where}: {name}", body, _SECTION_KEYS[name])
        need = _REQUIRED_SECTION.get(kind)
        if need and need not in sections:
            raise InvalidInput(f"{where}: kind {kind!r} needs a {need!r} section")
        for name, value in (data.get("resources") or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise InvalidInput(f"{where}: resources.{name} must be a positive number")
        if "comms" in sections:
            CommConfig(**sections["comms"])  # validates the values
        workers = data.get("workers", 2)
        if workers < 0 or data.get("threads_per_worker", 1) < 1:
            raise InvalidInput(f"{where}: workers must be >= 0 and threads_per_worker >= 1")
        return cls(kind=kind, path=where, workers=workers,
                   threads_per_worker=data.get("threads_per_worker", 1),
                   memory_limit=data.get("memory_limit", "auto"),
                   resources=dict(data.get("resources") or {}),
                   dashboard_address=data.get("dashboard_address", ":8787"),
                   sections=sections)

    # ---- pieces --------------------------------------------------------------------------------

    def comms(self) -> CommConfig:
        return CommConfig(**self.sections.get("comms", {}))

    def security(self) -> Any:
        """``distributed.security.Security`` for the TLS section (None without one)."""
        tls = self.sections.get("tls")
        if not tls:
            return None
        from distributed.security import Security

        base = Path(self.path).parent if self.path != "<dict>" else Path.cwd()
        files = {}
        for key in ("ca_file", "cert", "key"):
            if key not in tls:
                raise InvalidInput(f"{self.path}: tls.{key} is required")
            p = Path(os.path.expandvars(tls[key])).expanduser()
            p = p if p.is_absolute() else base / p
            if not p.is_file():
                raise InvalidInput(f"{self.path}: tls.{key} file {str(p)!r} does not exist")
            files[key] = str(p)
        return Security(tls_ca_file=files["ca_file"], tls_client_cert=files["cert"],
                        tls_client_key=files["key"], tls_scheduler_cert=files["cert"],
                        tls_scheduler_key=files["key"], tls_worker_cert=files["cert"],
                        tls_worker_key=files["key"], require_encryption=True)

    def _local_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"n_workers": self.workers,
                              "threads_per_worker": self.threads_per_worker,
                              "memory_limit": self.memory_limit,
                              "dashboard_address": self.dashboard_address}
        if self.resources:
            kw["resources"] = self.resources
        sec = self.security()
        if sec is not None:
            kw.update(security=sec, protocol="tls://")
        return kw

    def build_cluster(self) -> Any:
        """The Dask cluster object (started for local kinds, not yet scaled for SLURM)."""
        from dask_rag.cluster.workers import tune_worker_malloc

        tune_worker_malloc()
        if self.kind == "local":
            from distributed import LocalCluster

            return LocalCluster(processes=True, **self._local_kwargs())
        if self.kind == "local-cuda":
            try:
                from dask_cuda import LocalCUDACluster
            except ImportError as exc:
                raise InvalidInput("kind 'local-cuda' needs dask-cuda: pip install "
                                   "'dask-rag[gpu]'") from exc
            import dask

            cuda = self.sections.get("local_cuda", {})
            kw = self._local_kwargs()
            kw.pop("n_workers")  # one worker per visible GPU
            if not cuda.get("daemon", True):
                # vLLM starts worker processes of its own: a daemonic worker may not
                dask.config.set({"distributed.worker.daemon": False})
            return LocalCUDACluster(
                CUDA_VISIBLE_DEVICES=cuda.get("visible_devices"),
                rmm_pool_size=cuda.get("rmm_pool_size"), protocol=cuda.get("protocol", "tcp"),
                enable_nvlink=cuda.get("enable_nvlink", False), **kw)
        if self.kind == "slurm":
            return self.slurm_cluster()
        if self.kind == "kubernetes":
            from dask_kubernetes.operator import KubeCluster

            return KubeCluster(custom_cluster_spec=self.kubernetes_manifest())
        raise InvalidInput(f"{self.path}: kind 'scheduler' connects to an existing cluster")

    def slurm_cluster(self) -> Any:
        """A ``dask_jobqueue.SLURMCluster`` (no jobs submitted until ``scale``)."""
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError as exc:
            raise InvalidInput("kind 'slurm' needs dask-jobqueue: pip install "
                               "'dask-rag[clusters]'") from exc
        s = dict(self.sections["slurm"])
        s.pop("jobs", None)
        from dask_rag.cluster.workers import WORKER_MALLOC_ENV

        # the job's shell exports dask-rag's worker malloc settings (see dask_rag.cluster);
        # the spec's own prologue lines come after them and can override them
        s["job_script_prologue"] = [f"export {k}={v}" for k, v in WORKER_MALLOC_ENV.items()] \
            + list(s.get("job_script_prologue") or [])
        extra_worker_args = []
        for name, value in self.resources.items():
            extra_worker_args += ["--resources", f"{name}={value}"]
        return SLURMCluster(
            queue=s.pop("queue", None), account=s.pop("account", None),
            cores=s.pop("cores", self.threads_per_worker), memory=s.pop("memory", "8GB"),
            processes=s.pop("processes", 1), walltime=s.pop("walltime", "01:00:00"),
            worker_extra_args=extra_worker_args, security=self.security(),
            protocol="tls://" if self.security() is not None else None, **s)

    def kubernetes_manifest(self) -> dict[str, Any]:
        """The DaskCluster custom resource for the dask-kubernetes operator."""
        from dask_kubernetes.operator import make_cluster_spec

        from dask_rag.cluster.workers import WORKER_MALLOC_ENV

        k = self.sections["kubernetes"]
        # dask-rag's worker malloc settings (see dask_rag.cluster) unless the spec sets them
        env = {**{n: str(v) for n, v in WORKER_MALLOC_ENV.items()}, **(k.get("env") or {})}
        spec: dict[str, Any] = make_cluster_spec(
            name=k.get("name", "dask-rag"), image=k.get("image", "ghcr.io/dask/dask:latest"),
            n_workers=self.workers, resources=k.get("resources"), env=env,
            worker_command="dask-worker" if not self.resources else [
                "dask-worker", "--resources",
                ",".join(f"{n}={v}" for n, v in self.resources.items())],
            scheduler_service_type=k.get("scheduler_service_type", "ClusterIP"))
        if "namespace" in k:
            spec.setdefault("metadata", {})["namespace"] = k["namespace"]
        return spec


def load_spec(path: str | os.PathLike[str]) -> ClusterSpec:
    """Read and validate a cluster spec YAML file."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidInput(f"{p}: cannot read the cluster spec ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{p}: not valid YAML ({exc})") from None
    return ClusterSpec.from_dict(data, str(p))


def start_from_spec(path: str | os.PathLike[str]) -> tuple[Any, Any]:
    """``(client, cluster)`` for a spec; ``cluster`` is None for ``kind: scheduler``."""
    from distributed import Client

    from dask_rag.cluster.plugins import tune_comms

    spec = load_spec(path)
    sec = spec.security()
    if spec.kind == "scheduler":
        client = Client(spec.sections["scheduler"]["address"], security=sec)
        cluster = None
    else:
        cluster = spec.build_cluster()
        if spec.kind == "slurm":
            cluster.scale(jobs=spec.sections["slurm"].get("jobs", 1))
        elif spec.kind == "kubernetes":
            cluster.scale(spec.workers)
        client = Client(cluster, security=sec)
    tune_comms(client, spec.comms())
    return client, cluster
