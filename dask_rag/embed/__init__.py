"""Sentence encoders (fp32 / fp16 / bf16 / int8, dynamic padding) and embedding on workers."""

from dask_rag.embed.encoder import Encoder, SentenceEncoder, default_model_path

__all__ = ["Encoder", "SentenceEncoder", "default_model_path"]
