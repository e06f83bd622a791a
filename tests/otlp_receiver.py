"""A local OTLP/gRPC receiver for the telemetry tests: the real collector services.

:class:`OtlpReceiver` serves ``opentelemetry.proto.collector.{trace,metrics,logs}.v1``
(``TraceService/Export``, ``MetricsService/Export``, ``LogsService/Export``) with the
generated servicers of the ``opentelemetry-proto`` package on ``127.0.0.1:<free port>``, and
keeps every decoded request so that a test can assert on what an exporter really sent::

    with OtlpReceiver() as rx:
        env["OTEL_ENDPOINT"] = rx.endpoint
        ...
        span = rx.wait_for(lambda: rx.span_named("focus transform"))

The helpers flatten the requests into :class:`Span`, :class:`Point` and :class:`Log` records
with attributes decoded to plain Python values and ids as lowercase hex.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc  # type: ignore[import-untyped,unused-ignore]
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

__all__ = ["Log", "OtlpReceiver", "Point", "Span", "attributes", "value"]

T = TypeVar("T")


def value(v: AnyValue) -> Any:
    """An OTLP ``AnyValue`` as a Python value."""
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes(v.kvlist_value.values)
    if kind == "bytes_value":
        return bytes(v.bytes_value)
    return getattr(v, kind)


def attributes(kvs: Any) -> dict[str, Any]:
    """Repeated ``KeyValue`` as a dict."""
    out: dict[str, Any] = {}
    kv: KeyValue
    for kv in kvs:
        out[kv.key] = value(kv.value)
    return out


@dataclass(frozen=True)
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status_code: int
    resource: dict[str, Any]
    scope: str


@dataclass(frozen=True)
class Point:
    """One data point of one metric, with the metric's name, kind and unit."""

    metric: str
    kind: str  # sum, gauge, histogram, exponential_histogram, summary
    unit: str
    attributes: dict[str, Any]
    value: float | None  # sums and gauges
    count: int | None  # histograms
    resource: dict[str, Any]
    monotonic: bool = False
    bounds: tuple[float, ...] = ()  # explicit bucket boundaries of a histogram


@dataclass(frozen=True)
class Log:
    body: Any
    severity: str
    severity_number: int
    trace_id: str
    span_id: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str


@dataclass
class _Store:
    lock: threading.Lock = field(default_factory=threading.Lock)
    traces: list[trace_service_pb2.ExportTraceServiceRequest] = field(default_factory=list)
    metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = field(default_factory=list)
    logs: list[logs_service_pb2.ExportLogsServiceRequest] = field(default_factory=list)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
               ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.store.lock:
            self.store.traces.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    def Export(self, request: metrics_service_pb2.ExportMetricsServiceRequest, context: Any
               ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        with self.store.lock:
            self.store.metrics.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class _LogsService(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    def Export(self, request: logs_service_pb2.ExportLogsServiceRequest, context: Any
               ) -> logs_service_pb2.ExportLogsServiceResponse:
        with self.store.lock:
            self.store.logs.append(request)
        return logs_service_pb2.ExportLogsServiceResponse()


class OtlpReceiver:
    """An OTLP/gRPC server on a free loopback port that keeps what it receives."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._store = _Store()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        # the generated add_*_to_server functions are untyped
        adders: list[tuple[Any, Any]] = [
            (trace_service_pb2_grpc.add_TraceServiceServicer_to_server, _TraceService),
            (metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server, _MetricsService),
            (logs_service_pb2_grpc.add_LogsServiceServicer_to_server, _LogsService),
        ]
        for add, service in adders:
            add(service(self._store), self._server)
        self.host = host
        self.port: int = self._server.add_insecure_port(f"{host}:0")
        if not self.port:
            raise RuntimeError(f"could not bind an OTLP receiver on {host}")

    @property
    def endpoint(self) -> str:
        """What ``OTEL_ENDPOINT`` should be set to."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None).wait(5)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- raw requests --------------------------------------------------------------------------

    def requests(self) -> tuple[int, int, int]:
        """How many trace, metrics and logs requests arrived so far."""
        with self._store.lock:
            return len(self._store.traces), len(self._store.metrics), len(self._store.logs)

    # -- flattened -----------------------------------------------------------------------------

    def spans(self) -> list[Span]:
        with self._store.lock:
            reqs = list(self._store.traces)
        out: list[Span] = []
        for req in reqs:
            for rs in req.resource_spans:
                resource = attributes(rs.resource.attributes)
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        out.append(Span(
                            name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            attributes=attributes(s.attributes),
                            events=[(e.name, attributes(e.attributes)) for e in s.events],
                            status_code=int(s.status.code), resource=resource,
                            scope=ss.scope.name))
        return out

    def span_named(self, name: str) -> list[Span]:
        return [s for s in self.spans() if s.name == name]

    def points(self) -> list[Point]:
        with self._store.lock:
            reqs = list(self._store.metrics)
        out: list[Point] = []
        for req in reqs:
            for rm in req.resource_metrics:
                resource = attributes(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        out.extend(_points(m, resource))
        return out

    def metric_names(self) -> set[str]:
        return {p.metric for p in self.points()}

    def logs(self) -> list[Log]:
        with self._store.lock:
            reqs = list(self._store.logs)
        out: list[Log] = []
        for req in reqs:
            for rl in req.resource_logs:
                resource = attributes(rl.resource.attributes)
                for sl in rl.scope_logs:
                    for r in sl.log_records:
                        out.append(Log(
                            body=value(r.body), severity=r.severity_text,
                            severity_number=int(r.severity_number), trace_id=r.trace_id.hex(),
                            span_id=r.span_id.hex(), attributes=attributes(r.attributes),
                            resource=resource, scope=sl.scope.name))
        return out

    # -- waiting -------------------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], T], timeout: float = 15.0, *,
                 message: str = "") -> T:
        """Poll ``predicate`` until it returns something truthy; return it, or fail."""
        deadline = time.monotonic() + timeout
        while True:
            got = predicate()
            if got:
                return got
            if time.monotonic() >= deadline:
                what = message or getattr(predicate, "__name__", "a condition")
                raise AssertionError(
                    f"OTLP receiver: timed out after {timeout:g}s waiting for {what} "
                    f"(received trace/metrics/logs requests: {self.requests()})")
            time.sleep(0.05)


def _points(m: Any, resource: dict[str, Any]) -> Iterator[Point]:
    kind = m.WhichOneof("data")
    if kind in ("sum", "gauge"):
        data = getattr(m, kind)
        monotonic = bool(kind == "sum" and data.is_monotonic)
        for p in data.data_points:
            num = p.as_double if p.WhichOneof("value") == "as_double" else float(p.as_int)
            yield Point(m.name, kind, m.unit, attributes(p.attributes), num, None, resource,
                        monotonic)
    elif kind in ("histogram", "exponential_histogram", "summary"):
        for p in getattr(m, kind).data_points:
            bounds = tuple(p.explicit_bounds) if kind == "histogram" else ()
            yield Point(m.name, kind, m.unit, attributes(p.attributes), None, int(p.count),
                        resource, bounds=bounds)
