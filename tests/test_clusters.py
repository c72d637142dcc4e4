"""Cluster specs, TLS, and fault tolerance of ingestion and serving."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from distributed import Client

from dask_rag import DistributedIndex, IndexSpec
from dask_rag.cluster import WORKER_MALLOC_ENV, start_local_cluster, tune_worker_malloc
from dask_rag.cluster.spec import ClusterSpec, load_spec, start_from_spec
from dask_rag.errors import InvalidInput

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "clusters"


@pytest.mark.parametrize("name", ["local-cpu", "local-cuda", "slurm", "kubernetes"])
def test_every_spec_loads(name):
    spec = load_spec(SPECS / f"{name}.yaml")
    assert spec.kind == name.replace("-cpu", "")


def test_slurm_spec_renders_a_job_script():
    pytest.importorskip("dask_jobqueue")
    cluster = load_spec(SPECS / "slurm.yaml").slurm_cluster()
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -p normal" in script and "#SBATCH -A my-project" in script
    assert "#SBATCH --exclusive" in script and "--resources shard=64" in script
    assert "source ~/venvs/dask-rag/bin/activate" in script
    assert script.index("export MALLOC_MMAP_THRESHOLD_=33554432") < script.index(
        "source ~/venvs/dask-rag/bin/activate")  # the spec's own prologue comes after


def test_kubernetes_spec_renders_a_manifest():
    pytest.importorskip("dask_kubernetes")
    m = load_spec(SPECS / "kubernetes.yaml").kubernetes_manifest()
    assert m["apiVersion"] == "kubernetes.dask.org/v1" and m["kind"] == "DaskCluster"
    assert m["metadata"]["name"] == "dask-rag" and m["metadata"]["namespace"] == "search"
    worker = m["spec"]["worker"]
    assert worker["replicas"] == 4
    container = worker["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/dask/dask:latest"
    assert "shard=64" in " ".join(container["args"])
    assert container["resources"]["limits"]["memory"] == "8Gi"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(32 << 20)


def test_local_spec_starts_and_places_shards(tmp_path):
    client, cluster = start_from_spec(SPECS / "local-cpu.yaml")
    try:
        info = client.scheduler_info()["workers"]
        assert len(info) == 2 and all(w["resources"] == {"shard": 64} for w in info.values())
        xb = np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32)
        with DistributedIndex.build(client, xb, spec=IndexSpec(metric="l2")) as index:
            assert (index.search(xb[:3], k=1)[1][:, 0] == [0, 1, 2]).all()
            # the load tasks requested the 'shard' resource
            assert all(index.shard_locations().values())
        # the workers were spawned with dask-rag's malloc settings (see dask_rag.cluster)
        envs = client.run(lambda: {k: os.environ.get(k) for k in WORKER_MALLOC_ENV})
        assert all(e == {k: str(v) for k, v in WORKER_MALLOC_ENV.items()} for e in envs.values())
    finally:
        client.close()
        cluster.close()


def test_worker_malloc_settings_keep_the_users_own():
    import dask

    key = "distributed.nanny.pre-spawn-environ"
    with dask.config.set({key: {"MALLOC_MMAP_THRESHOLD_": 4096, "OMP_NUM_THREADS": 1}}):
        assert tune_worker_malloc()["MALLOC_MMAP_THRESHOLD_"] == 4096
        assert dask.config.get(key) == {"MALLOC_MMAP_THRESHOLD_": 4096, "OMP_NUM_THREADS": 1}
    with dask.config.set({key: {"MALLOC_TRIM_THRESHOLD_": 65536, "OMP_NUM_THREADS": 1}}):
        env = tune_worker_malloc()
        assert dask.config.get(key) == env == {**WORKER_MALLOC_ENV, "OMP_NUM_THREADS": 1}


def test_clusters_dask_rag_starts_are_quiet_unless_told(client, monkeypatch):
    """Workers of start_local_cluster run without the statistical profiler and with slow
    ticks and memory polls (QUIET_DASK_CONFIG); a value the user set in the environment
    wins."""
    import os

    import dask

    from dask_rag.cluster.workers import quiet_dask_config

    got = client.run(lambda dask_worker: {k: v.callback_time
                                          for k, v in dask_worker.periodic_callbacks.items()})
    for callbacks in got.values():
        assert "profile" not in callbacks
        assert callbacks["tick"] == 500 and callbacks["memory_monitor"] == 500
    monkeypatch.setenv("DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL", "50ms")
    with dask.config.set({"distributed.admin.tick.interval": "50ms"}):
        quiet_dask_config()
        assert os.environ["DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL"] == "50ms"
        assert dask.config.get("distributed.admin.tick.interval") == "50ms"


@pytest.mark.parametrize("data,match", [
    ({"kind": "cloud"}, "'kind' must be one of"),
    ({"kind": "local", "wokers": 2}, "unknown key 'wokers'"),
    ({"kind": "local", "workers": "two"}, "'workers' must be int"),
    ({"kind": "slurm"}, "needs a 'slurm' section"),
    ({"kind": "slurm", "slurm": {"cores": "8"}}, "'cores' must be int"),
    ({"kind": "local", "resources": {"shard": -1}}, "positive"),
    ({"kind": "local", "comms": {"scheduler_to_worker_ms": -2}}, "scheduler_to_worker_ms"),
    ({"kind": "local", "tls": {"ca_file": "nope.pem", "cert": "c", "key": "k"}}, None),
    ([1, 2], "mapping"),
])
def test_bad_specs_are_named(data, match, tmp_path):
    if match is None:  # TLS files are checked when the security object is made
        with pytest.raises(InvalidInput, match="does not exist"):
            ClusterSpec.from_dict(data).security()
        return
    with pytest.raises(InvalidInput, match=match):
        ClusterSpec.from_dict(data)
    p = tmp_path / "bad.yaml"
    p.write_text(": : not yaml [")
    with pytest.raises(InvalidInput, match="not valid YAML"):
        load_spec(p)


def _make_certs(directory: Path) -> None:
    """A CA and a certificate for 127.0.0.1 / localhost signed by it."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    def key():
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, cert_key = key(), key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dask-rag test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(cert_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "cert.pem").write_bytes(cert.public_bytes(pem))
    (directory / "key.pem").write_bytes(cert_key.private_bytes(
        pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))


def _handshake(address: str, security) -> dict:
    """Open one comm to the scheduler and ask its identity; raises when the scheduler refuses."""
    import asyncio

    from distributed.comm import connect

    async def go() -> dict:
        comm = await connect(address, timeout="3s", **security.get_connection_args("client"))
        try:
            await asyncio.wait_for(comm.write({"op": "identity", "reply": True}), 3)
            return await asyncio.wait_for(comm.read(), 3)
        finally:
            comm.abort()

    return asyncio.run(go())


def _tls_attempt(address: str, ca: Path, cert: Path | None = None, key: Path | None = None
                 ) -> tuple[int, str]:
    """A raw TLS client that trusts ``ca`` (so it accepts the scheduler) and presents
    ``cert`` (or none): its local port, and the error it got when the server hung up."""
    import socket
    import ssl

    host, port = address.replace("tls://", "").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    raw = socket.create_connection((host, int(port)), timeout=5)
    with ctx.wrap_socket(raw, server_hostname=host) as tls:  # TLS 1.3: the client is done
        local_port = tls.getsockname()[1]
        try:
            tls.sendall(b"\0" * 16)
            data = tls.recv(16)
            return local_port, f"read {data!r}"
        except (ssl.SSLError, OSError) as exc:
            return local_port, str(exc)


@pytest.mark.slow
def test_tls_scheduler_refuses_clients_without_a_certificate_of_its_ca(tmp_path):
    """The *scheduler* refuses a client that trusts its CA but has no client certificate, and
    one whose certificate another CA signed: its listener logs the failed handshake of that
    very connection (matched by port), and the client receives the server's alert."""
    import logging

    _make_certs(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _make_certs(other)
    spec_path = tmp_path / "tls.yaml"
    spec_path.write_text(yaml.safe_dump({
        "kind": "local", "workers": 1, "dashboard_address": ":0",
        "tls": {"ca_file": "ca.pem", "cert": "cert.pem", "key": "key.pem"}}))
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    listener_log = logging.getLogger("distributed.comm.tcp")
    handler = Keep(level=logging.WARNING)
    listener_log.addHandler(handler)
    client, cluster = start_from_spec(spec_path)  # the scheduler listens in this process
    try:
        address = cluster.scheduler_address
        assert address.startswith("tls://")
        assert client.submit(lambda x: x + 1, 1).result() == 2
        xb = np.random.default_rng(1).standard_normal((200, 4)).astype(np.float32)
        with DistributedIndex.build(client, xb, spec=IndexSpec(metric="l2")) as index:
            assert index.search(xb[:1], k=1)[1][0, 0] == 0

        def refused(port: int) -> str:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                for r in records:
                    msg = r.getMessage()
                    if f":{port}'" in msg and "TLS handshake failed" in msg:
                        return msg
                time.sleep(0.02)
            raise AssertionError(f"the scheduler logged no refusal of port {port}")

        port, client_side = _tls_attempt(address, tmp_path / "ca.pem")
        assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in refused(port)
        # the server's alert (or, when it hangs up first, only the closed connection)
        assert "CERTIFICATE_REQUIRED" in client_side or "EOF occurred" in client_side, \
            client_side
        port, client_side = _tls_attempt(address, tmp_path / "ca.pem", other / "cert.pem",
                                         other / "key.pem")
        assert "CERTIFICATE_VERIFY_FAILED" in refused(port)
        # the client sees the server's alert, or only the closed connection when the server
        # hangs up first (timing): the refusal itself is the scheduler's log line above
        assert "ALERT" in client_side or "EOF occurred" in client_side, client_side
        from distributed.security import Security

        with pytest.raises((OSError, TimeoutError)):
            _handshake(address.replace("tls://", "tcp://"), Security())  # plaintext refused
        # the right certificate gets through: the refusals above are the certificate's doing
        identity = _handshake(address, Security(
            tls_ca_file=str(tmp_path / "ca.pem"), tls_client_cert=str(tmp_path / "cert.pem"),
            tls_client_key=str(tmp_path / "key.pem"), require_encryption=True))
        assert identity["type"] == "Scheduler"
    finally:
        listener_log.removeHandler(handler)
        client.close()
        cluster.close()


# ------------------------------------------------------------------------------------------------
# faults: each test arms a named fault point (dask_rag.faults) and proves from its report that
# the fault landed in the phase it claims
# ------------------------------------------------------------------------------------------------


def _content(client, path) -> list[tuple[int, str | None, str | None]]:
    """What an index holds: every live chunk's (id, source, content hash)."""
    with DistributedIndex.load(client, path, comms=None) as index:
        return sorted(index.doc_index())


@pytest.mark.slow
def test_worker_killed_during_ingestion(demo_docs, tmp_path):
    """A worker SIGKILLs itself in the middle of an embedding task (its second): the lost
    work is redone elsewhere and the index equals a clean ingestion, chunk for chunk."""
    from dask_rag.faults import ArmFaults, read_report
    from dask_rag.ingest import ingest

    docs = demo_docs[:300]
    report = tmp_path / "faults.log"
    with start_local_cluster(2, dashboard_address=None, memory_limit="6GiB") as cluster, \
            Client(cluster) as client:
        ingest(client, docs, tmp_path / "clean", progress=False)
        pids = set(client.run(os.getpid).values())
        client.register_plugin(ArmFaults({"embed.batch": "kill@2"}, report=str(report)))
        try:
            faulty = ingest(client, docs, tmp_path / "faulty", progress=False)
        finally:
            client.register_plugin(ArmFaults({}))
        fired = [(pid, n) for point, pid, n, action in read_report(report)
                 if point == "embed.batch" and action == "kill"]
        assert len(fired) == 1 and fired[0][0] in pids  # one worker died, mid-embedding
        assert fired[0][0] not in set(client.run(os.getpid).values())
        assert faulty.chunks_total == len(_content(client, tmp_path / "clean"))
        assert _content(client, tmp_path / "faulty") == _content(client, tmp_path / "clean")


@pytest.mark.slow
def test_worker_killed_while_serving_answers_stay_right(demo_index, tmp_path):
    """A worker dies inside a shard's search task while batches keep coming: every answer is
    right; at most one request gets a clear ShardUnavailable."""
    from dask_rag.errors import ShardUnavailable
    from dask_rag.faults import ArmFaults, read_report
    from dask_rag.pipeline import RagPipeline

    path = tmp_path / "index"
    shutil.copytree(demo_index, path)
    report = tmp_path / "faults.log"
    questions = ["How do I sort a list?", "How to parse JSON?", "read a CSV file",
                 "run a subprocess", "create a temporary file", "compute a hash"] * 4
    with start_local_cluster(2, dashboard_address=None, memory_limit="6GiB") as cluster, \
            Client(cluster) as client, RagPipeline.from_index_dir(client, path) as pipe:
        pipe.warmup()
        truth = [[h.id for h in hs] for hs in pipe.search_many(questions, k=5)]
        client.register_plugin(ArmFaults({"search.shard": "kill@3"}, report=str(report)))
        results, failures = [], 0
        for _ in range(12):
            try:
                got = pipe.search_many(questions, k=5)
                results.append([[h.id for h in hs] for hs in got])
            except ShardUnavailable:
                failures += 1
        client.register_plugin(ArmFaults({}))
        killed = [r for r in read_report(report) if r[3] == "kill"]
        assert len(killed) == 1  # the fault landed inside a search task
        assert len(results) >= 11 and all(r == truth for r in results)
        assert failures <= 1


def _ingest_cmd(corpus: Path, index: Path) -> list[str]:
    return [sys.executable, "-m", "dask_rag.cli", "ingest", str(corpus), "--index", str(index),
            "--workers", "2", "--dashboard", ":0", "-q"]


@pytest.mark.slow
def test_kill_9_during_ingest_leaves_old_or_new_content(client, demo_docs, tmp_path):
    """An incremental ``dask-rag ingest`` is SIGKILLed (with its whole local cluster) while
    blocked at a named phase: during embedding the index keeps exactly its old content; once
    the update is in the write-ahead log, and between the new shard files and the manifest
    commit, it has exactly the new content (the content a clean ingest of the same corpus
    gives)."""
    from dask_rag.faults import read_report
    from dask_rag.ingest import ingest

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, d in enumerate(demo_docs[:120]):
        (corpus / f"doc{i:03d}.txt").write_text(d.text)
    index = tmp_path / "index"
    # the index and the references are ingested on the session's cluster; only the ingest
    # that is killed runs as `dask-rag ingest` with a local cluster of its own
    ingest(client, [corpus], index, progress=False)
    for attempt, (point, outcome) in enumerate((("embed.batch", "old"),
                                                ("wal.appended", "new"),
                                                ("save.shards_written", "new"))):
        for i in range(attempt * 10, attempt * 10 + 10):  # change the corpus each round
            (corpus / f"doc{i:03d}.txt").write_text(f"edited in round {attempt}: "
                                                    + demo_docs[i].text)
        (corpus / f"new{attempt}.txt").write_text(f"A new document, round {attempt}.")
        reference = tmp_path / f"clean{attempt}"
        ingest(client, [corpus], reference, progress=False)
        report = tmp_path / f"faults{attempt}.log"
        env = dict(os.environ, DASK_RAG_FAULTS=f"{point}=block",
                   DASK_RAG_FAULTS_REPORT=str(report),
                   DASK_RAG_FAULTS_RELEASE=str(tmp_path / "never"))
        old = _content(client, index)
        proc = subprocess.Popen(_ingest_cmd(corpus, index), cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while not any(r[0] == point for r in read_report(report)):
                assert proc.poll() is None, f"ingest exited ({proc.returncode}) before {point}"
                assert time.monotonic() < deadline, f"{point} was never reached"
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the ingest and its whole local cluster
            proc.wait()
        assert next(r[3] for r in read_report(report) if r[0] == point) == "block"
        after = _content(client, index)
        new = _content(client, reference)
        assert old != new
        assert after == (old if outcome == "old" else new), (point, outcome)


@pytest.mark.slow
def test_sigterm_to_serve_closes_its_local_cluster(demo_index):
    """``dask-rag serve`` starts its scheduler and workers as processes of their own; SIGTERM
    (what a process manager sends) must drain, close them and exit, leaving no orphans."""
    import httpx
    import psutil

    from dask_rag.serve.server import free_port, wait_ready

    port = free_port()
    cmd = [sys.executable, "-m", "dask_rag.cli", "serve", "--index", str(demo_index), "--port",
           str(port), "--workers", "1", "--dashboard", ":0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout=180)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/search", json={"query": "parse JSON"},
                       timeout=30)
        assert r.status_code == 200
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3  # scheduler, nanny, worker
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [p.cmdline()[:4] for p in alive]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
