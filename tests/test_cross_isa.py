"""The default encoder's vectors do not depend on the CPU's instruction set.

The encoder runs natively and, in the same virtualenv, under ``qemu-x86_64 -cpu MODEL`` with
a CPU model of another generation (Debian's ``qemu-user``): on an AVX-512 machine an AVX2-only
EPYC-Rome, on an AVX2 machine a Nehalem (SSE4.2, no AVX) — ONNX Runtime, numpy and torch read
the emulated CPUID and dispatch that CPU's kernels.  Emulation is faithful: an emulated
Haswell gives the native AVX2 vectors bit for bit (checked when this test was written).
Minutes: every emulated process imports torch and loads the model under TCG.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dask_rag.corpus.demo import DEMO_QUESTIONS
from dask_rag.embed.encoder import CANARY_MAX_ABS

pytestmark = [pytest.mark.minutes,
              pytest.mark.skipif(shutil.which("qemu-x86_64") is None,
                                 reason="needs qemu-x86_64 (Debian qemu-user; make qemu)")]

ROOT = Path(__file__).resolve().parent.parent


def other_cpu_model() -> str:
    """A CPU model with another instruction set than this machine's."""
    flags = Path("/proc/cpuinfo").read_text()
    return "EPYC-Rome" if " avx512f" in flags else "Nehalem"


def encode(tmp_path: Path, config: dict[str, str], texts: list[str], cpu: str | None
           ) -> np.ndarray:
    out = tmp_path / f"{cpu or 'native'}-{'-'.join(config.values()) or 'default'}.npy"
    src = tmp_path / "texts.json"
    src.write_text(json.dumps(texts))
    cmd = [sys.executable, "-m", "tests.isa_encode", json.dumps(config), str(src), str(out)]
    if cpu:
        cmd = ["qemu-x86_64", "-cpu", cpu, *cmd]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=1200)
    return np.load(out)


@pytest.fixture(scope="module")
def texts(demo_docs):
    return list(DEMO_QUESTIONS) + [d.text[:600] for d in demo_docs[:6]]


def test_default_encoder_vectors_are_the_same_on_another_instruction_set(
        tmp_path, texts, demo_docs):
    """Within the canaries' tolerance component by component, and the same top-10 over the
    demo corpus for every demo question."""
    import faiss

    from dask_rag.config import EmbedConfig
    from dask_rag.corpus.chunking import chunk_documents
    from dask_rag.embed.encoder import SentenceEncoder

    native = encode(tmp_path, {}, texts, None)
    emulated = encode(tmp_path, {}, texts, other_cpu_model())
    diff = float(np.abs(native - emulated).max())
    assert diff <= CANARY_MAX_ABS["fp32"], diff

    enc = SentenceEncoder(EmbedConfig())
    chunks = [c.text for c in chunk_documents(demo_docs[:120], enc.count_tokens)]
    index = faiss.IndexFlatIP(enc.dim)
    index.add(enc.encode(chunks))
    nq = len(DEMO_QUESTIONS)
    _, ids_native = index.search(native[:nq], 10)
    _, ids_emulated = index.search(emulated[:nq], 10)
    np.testing.assert_array_equal(ids_native, ids_emulated)


def test_int8_is_not_portable_which_the_canaries_catch(tmp_path, texts):
    """Why int8 is opt-in: its vectors on another instruction set differ by far more than
    the canaries allow (dynamic quantization rounds last-bit fp32 differences into whole
    quantization steps) — so a worker of another CPU kind is excluded from an int8 index."""
    config = {"precision": "int8"}
    native = encode(tmp_path, config, texts, None)
    emulated = encode(tmp_path, config, texts, other_cpu_model())
    assert float(np.abs(native - emulated).max()) > 100 * CANARY_MAX_ABS["int8"]
