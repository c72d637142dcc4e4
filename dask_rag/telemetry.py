"""Prometheus metrics and OpenTelemetry spans for the HTTP shim (no-op without the SDK).

Metrics live in a per-app ``CollectorRegistry`` (never the global one), so several apps — or
tests — in one process do not collide:

* ``dask_rag_stage_latency_seconds{stage="embed|search|rerank|generate|total"}`` — histogram
  of each request's per-stage latency;
* ``dask_rag_batch_size{batcher}`` — histogram of micro-batch sizes;
* ``dask_rag_inflight_requests`` — gauge; ``dask_rag_rejected_total{reason}`` — counter;
* ``dask_rag_requests_total{endpoint,status}`` — counter.

Tracing: one SERVER span per request, continuing a W3C ``traceparent`` sent by the caller, and
one child span per pipeline stage (placed in time from the stage timings).  Spans go to
whatever TracerProvider is installed; :func:`configure_tracing` installs an OTLP exporter when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set and the exporter package is available.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["STAGES", "Telemetry", "configure_tracing"]

logger = logging.getLogger(__name__)

STAGES = ("embed", "search", "rerank", "generate", "total")
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def configure_tracing(service_name: str = "dask-rag") -> bool:
    """Install an OTLP-exporting TracerProvider if configured; returns whether it did."""
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        logger.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but opentelemetry-sdk / "
                       "opentelemetry-exporter-otlp are not installed; tracing is off")
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return True


class Telemetry:
    """The metrics of one app, and its tracer."""

    def __init__(self, tracer_provider: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.stage_latency = Histogram(
            "dask_rag_stage_latency_seconds", "Per-request latency of each pipeline stage",
            ["stage"], buckets=_BUCKETS, registry=self.registry)
        self.batch_size = Histogram(
            "dask_rag_batch_size", "Requests per micro-batch (one Dask graph each)",
            ["batcher"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry)
        self.inflight = Gauge("dask_rag_inflight_requests", "Requests being processed",
                              registry=self.registry)
        self.encoder_mismatch = Gauge(
            "dask_rag_encoder_mismatched_workers",
            "Workers whose encoder does not reproduce the index's canary vectors (they do "
            "not embed for it)", registry=self.registry)
        self.rejected = Counter("dask_rag_rejected_total", "Requests rejected by back-pressure",
                                ["reason"], registry=self.registry)
        self.requests = Counter("dask_rag_requests_total", "Requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self._stage_children = {stage: self.stage_latency.labels(stage=stage)
                                for stage in STAGES}
        self._request_children: dict[tuple[str, int], Any] = {}
        self._tracer = None
        self._explicit_provider = tracer_provider is not None
        try:
            from opentelemetry import trace

            provider = tracer_provider or trace.get_tracer_provider()
            self._tracer = provider.get_tracer("dask_rag")
        except ImportError:  # pragma: no cover - opentelemetry-api is a dependency
            self._tracer = None

    def tracing(self) -> bool:
        """Whether spans are recorded: a provider was given, or one is installed globally
        (``configure_tracing``, the OTel SDK's auto-instrumentation) — checked per request, so
        one installed after start-up counts.  Without one, the API's spans record nothing,
        and building them (header extraction, contexts) was ~1/5 of the shim's own CPU per
        request: skip it."""
        if self._tracer is None:
            return False
        if self._explicit_provider:
            return True
        from opentelemetry import trace

        return not isinstance(trace.get_tracer_provider(),
                              (trace.ProxyTracerProvider, trace.NoOpTracerProvider))

    # ---- metrics ---------------------------------------------------------------------------

    def observe_stages(self, timings_ms: Mapping[str, float]) -> None:
        for stage, child in self._stage_children.items():
            if stage in timings_ms:
                child.observe(timings_ms[stage] / 1000.0)

    def count_request(self, endpoint: str, status: int) -> None:
        """``dask_rag_requests_total{endpoint, status}`` += 1 (label children cached: a
        ``labels()`` lookup per request and stage was measurable CPU on the serving path)."""
        key = (endpoint, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(
                endpoint=endpoint, status=str(status))
        child.inc()

    def batch_observer(self, name: str) -> Any:
        def observe(size: int, seconds: float) -> None:
            self.batch_size.labels(batcher=name).observe(size)

        return observe

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # ---- tracing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def request_span(self, name: str, headers: Mapping[str, str]) -> Iterator[Any]:
        """A SERVER span continuing the caller's ``traceparent`` (no-op without a tracer)."""
        if self._tracer is None or not self.tracing():
            yield None
            return
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind

        ctx = propagate.extract(dict(headers))
        with self._tracer.start_as_current_span(name, context=ctx, kind=SpanKind.SERVER) as span:
            yield span

    def stage_spans(self, span: Any, timings_ms: Mapping[str, float], end_ns: int | None = None
                    ) -> None:
        """Child spans for the stages of a finished request, laid out back to back."""
        if self._tracer is None or span is None:
            return
        from opentelemetry import trace

        end_ns = end_ns or time.time_ns()
        total_ns = int(timings_ms.get("total", 0.0) * 1e6)
        cursor = end_ns - total_ns
        ctx = trace.set_span_in_context(span)
        for stage in STAGES[:-1]:
            if stage not in timings_ms:
                continue
            dur = int(timings_ms[stage] * 1e6)
            child = self._tracer.start_span(f"dask_rag.{stage}", context=ctx,
                                            start_time=cursor)
            child.set_attribute("dask_rag.stage", stage)
            child.end(end_time=cursor + dur)
            cursor += dur
