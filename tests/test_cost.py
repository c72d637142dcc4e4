"""The cost model derives $/hour and $/1M queries from measured QPS and a price table."""

from __future__ import annotations

import pytest

from benchmarks.cost import PriceTable, cost_rows, format_cost_table
from dask_rag.errors import InvalidInput


def test_cost_from_measured_qps():
    rows = cost_rows([
        {"name": "cpu", "qps": 100.0, "instance": "cpu", "instances": 2, "response_bytes": 0},
        {"name": "gpu", "qps": 1000.0, "instance": "gpu", "instances": 1,
         "response_bytes": 10_000},
    ], PriceTable(gpu_instance_per_hour=2.5, cpu_instance_per_hour=0.1, egress_per_gb=0.09))
    cpu, gpu = rows
    assert cpu.cost_per_hour == pytest.approx(0.2)
    # 0.2 $/h over 360,000 queries/h
    assert cpu.cost_per_million_queries == pytest.approx(0.2 / 360_000 * 1e6, rel=1e-6)
    egress = 1000 * 3600 * 10_000 / 1e9 * 0.09  # 3.24 $/h
    assert gpu.cost_per_hour == pytest.approx(2.5 + egress)
    assert gpu.cost_per_million_queries == pytest.approx((2.5 + egress) / 3.6e6 * 1e6,
                                                         rel=1e-6)
    table = format_cost_table(rows)
    assert "| cpu | 100.0 | 2 x cpu |" in table


def test_cost_inputs_validated():
    with pytest.raises(InvalidInput, match="qps"):
        cost_rows([{"name": "x", "qps": 0}])
    with pytest.raises(InvalidInput, match="instance"):
        cost_rows([{"name": "x", "qps": 1, "instance": "tpu"}])
    with pytest.raises(InvalidInput, match="egress_per_gb"):
        PriceTable(egress_per_gb=-1)


def test_median_round_and_round_ratios():
    """Benchmarks report the median round (with its own latencies) and per-round ratios."""
    from benchmarks.common import median_round, round_ratios

    rows = [{"qps": 30.0, "p50_ms": 9.0}, {"qps": 10.0, "p50_ms": 5.0},
            {"qps": 20.0, "p50_ms": 7.0}]
    assert median_round(rows) == {"qps": 20.0, "p50_ms": 7.0, "qps_rounds": [30.0, 10.0, 20.0]}
    assert median_round(rows, "p50_ms") == {"qps": 20.0, "p50_ms": 7.0,
                                            "p50_ms_rounds": [9.0, 5.0, 7.0]}
    # an even count takes the lower middle: a conservative figure for a speed
    assert median_round(rows[:2])["qps"] == 10.0
    assert round_ratios(rows, [{"qps": 10.0}] * 3) == [3.0, 1.0, 2.0]
    with pytest.raises(ValueError):
        round_ratios(rows, rows[:2])
