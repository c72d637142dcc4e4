"""Encode texts with an EmbedConfig and save the vectors: run by tests/test_cross_isa.py
natively and under ``qemu-x86_64 -cpu MODEL`` (a CPU with another instruction set).

    python -m tests.isa_encode CONFIG_JSON TEXTS_JSON OUT_NPY
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    import numpy as np

    from dask_rag.config import EmbedConfig
    from dask_rag.embed.encoder import SentenceEncoder

    config, texts_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(texts_path) as f:
        texts = json.load(f)
    encoder = SentenceEncoder(EmbedConfig(**json.loads(config)))
    np.save(out, encoder.encode(texts))
    print(json.dumps(encoder.describe()))


if __name__ == "__main__":
    main()
