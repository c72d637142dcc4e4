"""Cost model: from measured throughput and a price table to $/hour and $/million queries.

Nothing here is estimated from first principles: the QPS comes from a benchmark run, the prices
from the table (defaults: GPU instance $2.50/h, CPU instance $0.10/h, egress $0.09/GB — all
configurable).  Cost per million queries is the hourly cost of the instances (plus egress of
the responses) divided by the queries they serve in that hour at the measured rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from dask_rag.errors import InvalidInput

__all__ = ["CostRow", "PriceTable", "cost_rows", "format_cost_table"]


@dataclass(frozen=True)
class PriceTable:
    gpu_instance_per_hour: float = 2.50
    cpu_instance_per_hour: float = 0.10
    egress_per_gb: float = 0.09

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, (int, float)) or value < 0:
                raise InvalidInput(f"PriceTable.{name}={value!r} must be a number >= 0")


@dataclass(frozen=True)
class CostRow:
    name: str
    qps: float
    instance: str
    instances: int
    response_bytes: float
    cost_per_hour: float
    cost_per_million_queries: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cost_rows(measured: Sequence[dict[str, Any]], prices: PriceTable | None = None
              ) -> list[CostRow]:
    """One row per configuration: ``{"name", "qps", "instance": "cpu"|"gpu", "instances",
    "response_bytes"}`` (response bytes per query, for egress)."""
    prices = prices or PriceTable()
    rows = []
    for m in measured:
        qps = float(m["qps"])
        if qps <= 0:
            raise InvalidInput(f"{m['name']}: qps must be > 0 to price it")
        kind = m.get("instance", "cpu")
        if kind not in ("cpu", "gpu"):
            raise InvalidInput(f"{m['name']}: instance must be 'cpu' or 'gpu'")
        n = int(m.get("instances", 1))
        per_instance = (prices.gpu_instance_per_hour if kind == "gpu"
                        else prices.cpu_instance_per_hour)
        nbytes = float(m.get("response_bytes", 0.0))
        queries_per_hour = qps * 3600.0
        egress = queries_per_hour * nbytes / 1e9 * prices.egress_per_gb
        per_hour = n * per_instance + egress
        rows.append(CostRow(name=str(m["name"]), qps=qps, instance=kind, instances=n,
                            response_bytes=nbytes, cost_per_hour=round(per_hour, 6),
                            cost_per_million_queries=round(per_hour / queries_per_hour * 1e6,
                                                           6)))
    return rows


def format_cost_table(rows: Sequence[CostRow]) -> str:
    lines = ["| configuration | QPS | instances | $/hour | $/1M queries |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.qps:.1f} | {r.instances} x {r.instance} | "
                     f"{r.cost_per_hour:.4f} | {r.cost_per_million_queries:.4f} |")
    return "\n".join(lines)
