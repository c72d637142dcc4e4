"""Generators behind one protocol: extractive (default), ``hf:PATH``, ``vllm:PATH``."""

from __future__ import annotations

from typing import Any

from dask_rag.rag.generate.base import (
    Generator,
    GeneratorSpec,
    SamplingParams,
    parse_generator_spec,
)

__all__ = ["Generator", "GeneratorSpec", "SamplingParams", "load_generator",
           "parse_generator_spec"]


def load_generator(spec: GeneratorSpec | str, **options: Any) -> Generator:
    """Instantiate the generator a spec names (imports torch / transformers / vllm lazily)."""
    if isinstance(spec, str):
        spec = parse_generator_spec(spec)
    if spec.kind == "extractive":
        from dask_rag.rag.generate.extractive import ExtractiveGenerator

        return ExtractiveGenerator(**options)
    assert spec.path is not None
    if spec.kind == "hf":
        from dask_rag.rag.generate.hf import HFGenerator

        return HFGenerator(spec.path, **options)
    from dask_rag.rag.generate.vllm_engine import VLLMGenerator

    return VLLMGenerator(spec.path, **options)
