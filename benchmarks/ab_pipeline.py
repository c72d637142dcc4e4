#!/usr/bin/env python
"""A/B pipeline benchmark: naive baseline vs optimized dask-rag (see dask_rag/bench_ab.py).

    python benchmarks/ab_pipeline.py            # full stdlib corpus, 360 queries
    python benchmarks/ab_pipeline.py --quick    # what `dask-rag bench --quick` runs
"""

import sys

from dask_rag.bench_ab import main

if __name__ == "__main__":
    sys.exit(main())
