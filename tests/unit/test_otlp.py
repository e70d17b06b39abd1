"""The exporter's requests are the ones OpenTelemetry's own encoder makes, for every kind of span content."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from apphosting import otlp, tracing


def _provider(resource: Resource, spans: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return provider


@pytest.fixture
def recorded() -> Iterator[list[ReadableSpan]]:
    """Spans of two providers with equal resources (different objects), one with another resource, and
    several scopes: every field the encoder writes, and each kind of attribute value."""
    spans = InMemorySpanExporter()
    first = _provider(Resource.create({"service.name": "api", "process.pid": 7}), spans)
    same = _provider(Resource.create({"service.name": "api", "process.pid": 7}), spans)
    other = _provider(Resource({"service.name": "scheduler"}, schema_url="https://example.com/schema"), spans)
    bare = _provider(Resource({}), spans)
    remote = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "value"), ("other", "x")]),
    )
    linked = SpanContext(trace_id=1, span_id=2, is_remote=False)
    tracer = first.get_tracer("apphosting")
    with tracer.start_as_current_span(
        "apphosting.v1.DeploymentService/CreateAppHostingDeployment",
        context=trace.set_span_in_context(NonRecordingSpan(remote)),
        kind=SpanKind.SERVER,
        attributes={
            "text": "x",
            "empty": "",
            "count": 3,
            "zero": 0,
            "ratio": 0.5,
            "flag": True,
            "off": False,
            "texts": ["a", "b"],
            "numbers": [1, 2],
            "none": [],
        },
        links=[Link(linked, {"why": "batch"}), Link(remote)],
    ) as server:
        server.add_event("chosen", {"location": "eu-1", "score": 0.9})
        server.add_event("bare")
        with tracer.start_as_current_span("child") as child:
            child.set_status(Status(StatusCode.ERROR, "failed: reason"))
        with tracer.start_as_current_span("unset status"):
            pass
        server.set_attribute("rpc.grpc.status_code", 0)
    first.get_tracer("bus", "1.2", schema_url="https://example.com/bus").start_span(
        "publish", kind=SpanKind.PRODUCER
    ).end()
    first.get_tracer("bus", "1.2", schema_url="https://example.com/bus").start_span(
        "publish again", kind=SpanKind.PRODUCER
    ).end()
    same.get_tracer("apphosting").start_span("same resource", kind=SpanKind.CONSUMER).end()
    other.get_tracer("scheduler", attributes={"scope": "attributes"}).start_span("place", kind=SpanKind.CLIENT).end()
    first.get_tracer("apphosting").start_span("back to the first").end()
    bare.get_tracer("bare").start_span("bare").end()
    # A span made without a tracer has no scope: its group still has one, empty.
    unscoped = ReadableSpan(name="unscoped", context=linked, resource=Resource({}), start_time=1, end_time=2)
    yield [*spans.get_finished_spans(), unscoped]
    for provider in (first, same, other, bare):
        provider.shutdown()


def test_requests_are_the_stock_encoders(recorded: list[ReadableSpan]) -> None:
    assert len(recorded) == 10
    made, stock = otlp.encode(recorded), encode_spans(recorded)
    assert made == stock
    assert made.SerializeToString(deterministic=True) == stock.SerializeToString(deterministic=True)
    # Equal resources share a group, as the stock encoder's hash has them; the bare resource is present, empty.
    assert len(made.resource_spans) == 3
    assert [len(group.scope_spans) for group in made.resource_spans] == [2, 1, 2]
    for each in range(len(recorded)):
        assert otlp.encode(recorded[each : each + 1]) == encode_spans(recorded[each : each + 1])
    assert otlp.encode([]) == encode_spans([]) == ExportTraceServiceRequest()


def test_an_attribute_otlp_cannot_carry_is_left_out(recorded: list[ReadableSpan]) -> None:
    (span,) = [each for each in recorded if each.kind == SpanKind.SERVER]
    attributes: dict[str, Any] = dict(span.attributes or {})
    attributes["object"] = object()
    odd = ReadableSpan(
        name=span.name,
        context=span.get_span_context(),
        parent=span.parent,
        resource=span.resource,
        attributes=attributes,
        kind=span.kind,
        instrumentation_scope=span.instrumentation_scope,
        start_time=span.start_time,
        end_time=span.end_time,
    )
    made = otlp.encode([odd])
    keys = [pair.key for pair in made.resource_spans[0].scope_spans[0].spans[0].attributes]
    assert "object" not in keys
    assert "text" in keys
    assert made == encode_spans([odd])


def test_the_processes_export_with_this_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    exporters = tracing.span_exporters(["otlp"])
    assert [type(exporter) for exporter in exporters] == [otlp.SpanExporter]
    for exporter in exporters:
        exporter.shutdown()
