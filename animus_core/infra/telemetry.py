"""OpenTelemetry: traces, metrics and logs over OTLP gRPC when ``OTEL_ENDPOINT`` is set.

Unset, animus logs readable lines to stderr and every instrument below is a no-op, so the
rest of the code never checks whether telemetry is on. Export never blocks work: spans and
logs go through batch processors, metrics through a periodic reader, and an unreachable
collector is retried by the exporters in their own threads.

The metric names here are a contract with the Grafana dashboards in ``docker/grafana``
(a test checks that every dashboard query names one of them). Through the collector's
Prometheus exporter, dots become underscores and counters gain ``_total``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

from opentelemetry import context, metrics, propagate, trace
from opentelemetry.metrics import CallbackOptions, Observation

from animus_core.infra.config import Settings

__all__ = [
    "METRICS",
    "Telemetry",
    "current_traceparent",
    "extract",
    "setup_telemetry",
    "tracing",
]

tracer = trace.get_tracer("animus")
meter = metrics.get_meter("animus")

#: name -> (kind, unit, description); kinds: counter, histogram, gauge
METRICS: dict[str, tuple[str, str, str]] = {
    "animus.work.submitted": ("counter", "{item}", "work items submitted (created)"),
    "animus.work.merged": ("counter", "{item}", "submissions merged into live work"),
    "animus.work.transitions": ("counter", "{transition}", "state transitions by from/to"),
    "animus.queue.depth": ("gauge", "{message}", "messages in each pgmq queue"),
    "animus.focus.duration": ("histogram", "s", "whole focus, by faculty and result"),
    "animus.phase.duration": ("histogram", "s", "each phase, by faculty and phase"),
    "animus.hook.failures": ("counter", "{failure}", "failed phases, by faculty, phase, reason"),
    "animus.work.unroutable": ("counter", "{notice}", "work seen with no faculty for its type"),
    "animus.schedule.ticks": ("counter", "{tick}", "schedule ticks fired, by schedule"),
    "gen_ai.client.token.usage": ("histogram", "{token}", "LLM tokens, by gen_ai.token.type"),
    "gen_ai.client.operation.duration": ("histogram", "s", "LLM call duration"),
}

#: Histogram bucket boundaries by unit. The SDK's default (0, 5, 10, 25, ... 10000) suits
#: milliseconds: in seconds every quick focus would land in the first bucket. Tokens follow
#: the GenAI semantic conventions.
_BOUNDARIES: dict[str, tuple[float, ...]] = {
    "s": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
          1800, 3600),
    "{token}": (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                16777216, 67108864),
}

_queue_depths: dict[str, int] = {}
#: seconds one export may take: short, so a stopping engine does not wait long on a dead collector
_EXPORT_TIMEOUT = 3


def _observe_depth(options: CallbackOptions) -> Iterator[Observation]:
    for queue, depth in list(_queue_depths.items()):
        yield Observation(depth, {"queue": queue})


def _instrument(name: str) -> Any:
    kind, unit, description = METRICS[name]
    if kind == "counter":
        return meter.create_counter(name, unit=unit, description=description)
    if kind == "histogram":
        return meter.create_histogram(name, unit=unit, description=description,
                                      explicit_bucket_boundaries_advisory=_BOUNDARIES.get(unit))
    return meter.create_observable_gauge(name, [_observe_depth], unit=unit,
                                         description=description)


class _Instruments:
    def __init__(self) -> None:
        self.submitted = _instrument("animus.work.submitted")
        self.merged = _instrument("animus.work.merged")
        self.transitions = _instrument("animus.work.transitions")
        self.queue_depth = _instrument("animus.queue.depth")
        self.focus_duration = _instrument("animus.focus.duration")
        self.phase_duration = _instrument("animus.phase.duration")
        self.hook_failures = _instrument("animus.hook.failures")
        self.unroutable = _instrument("animus.work.unroutable")
        self.schedule_ticks = _instrument("animus.schedule.ticks")
        self.tokens = _instrument("gen_ai.client.token.usage")
        self.llm_duration = _instrument("gen_ai.client.operation.duration")

    @staticmethod
    def set_queue_depth(queue: str, depth: int) -> None:
        _queue_depths[queue] = depth


class _ReportOnce(logging.Filter):
    """Let a message through once per ``window`` seconds (keyed by its first words)."""

    def __init__(self, window: float) -> None:
        super().__init__()
        self.window = window
        self._seen: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        import time

        key = " ".join(record.getMessage().split()[:6])
        now = time.monotonic()
        if now - self._seen.get(key, -1e9) < self.window:
            return False
        self._seen[key] = now
        return True


class Telemetry:
    """What :func:`setup_telemetry` set up; :meth:`shutdown` flushes and stops exporters."""

    def __init__(self, providers: list[Any]) -> None:
        self._providers = providers

    def shutdown(self) -> None:
        for provider in self._providers:
            try:
                provider.shutdown()
            except Exception:  # a collector that is down must not fail the exit
                logging.getLogger(__name__).debug("telemetry shutdown failed", exc_info=True)


def setup_telemetry(settings: Settings, *, service_name: str = "animus") -> Telemetry:
    """Configure logging and, with ``OTEL_ENDPOINT``, the three OTLP exporters."""
    from animus_core.infra.logs import setup_logging
    from animus_core.infra.secrets import RedactingFilter
    from animus_core.values.version import __version__

    setup_logging(settings.log_level)
    if not settings.otel_endpoint:
        return Telemetry([])

    from opentelemetry._logs import set_logger_provider
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    endpoint = settings.otel_endpoint
    insecure = not endpoint.startswith("https://")
    resource = Resource.create({
        "service.name": service_name,
        "service.version": __version__,
        "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
    })
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=endpoint, insecure=insecure, timeout=_EXPORT_TIMEOUT)))
    trace.set_tracer_provider(tracer_provider)

    meter_provider = MeterProvider(resource=resource, metric_readers=[
        PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint, insecure=insecure,
                                                         timeout=_EXPORT_TIMEOUT),
                                      export_interval_millis=settings.metric_interval_ms)])
    metrics.set_meter_provider(meter_provider)

    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(BatchLogRecordProcessor(
        OTLPLogExporter(endpoint=endpoint, insecure=insecure, timeout=_EXPORT_TIMEOUT)))
    set_logger_provider(logger_provider)
    handler = LoggingHandler(level=logging.getLevelName(settings.log_level.upper()),
                             logger_provider=logger_provider)
    handler.addFilter(RedactingFilter())
    logging.getLogger().addHandler(handler)
    # The exporters log their own retries: keep those off the OTLP handler (no feedback loop)
    # and say each kind of problem once every 10 minutes, not on every retry.
    once = logging.StreamHandler()
    once.addFilter(_ReportOnce(600.0))
    once.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s telemetry: %(message)s",
                                        "%H:%M:%S"))
    for noisy in ("opentelemetry", "grpc"):
        logger = logging.getLogger(noisy)
        logger.propagate = False
        logger.handlers[:] = [once]
    return Telemetry([tracer_provider, meter_provider, logger_provider])


def tracing() -> bool:
    """Whether a tracer provider is installed (by :func:`setup_telemetry` or an application):
    without one, spans are no-ops and the engine skips building them."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span; outside any span, the valid
    ``TRACEPARENT`` this process was started with, so that a hook (or ``animus work submit``
    run by one) that submits child work continues the focus's trace."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    found = carrier.get("traceparent")
    if found is None:
        inherited = os.environ.get("TRACEPARENT", "").strip()
        ctx = extract(inherited)
        if ctx is not None and trace.get_current_span(ctx).get_span_context().is_valid:
            return inherited
    return found


def extract(traceparent: str | None) -> context.Context | None:
    if not traceparent:
        return None
    return propagate.extract({"traceparent": traceparent})


instruments = _Instruments()
