"""apphosting.spans: the spans it makes are exported as the SDK's own would be, sampled and limited alike."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from apphosting import spans

REMOTE = SpanContext(
    trace_id=0x0AF7651916CD43DD8448EB211C80319C,
    span_id=0xB7AD6B7169203331,
    is_remote=True,
    trace_flags=TraceFlags(TraceFlags.SAMPLED),
    trace_state=TraceState([("vendor", "value")]),
)
UNSAMPLED = SpanContext(trace_id=5, span_id=6, is_remote=True, trace_flags=TraceFlags(TraceFlags.DEFAULT))


def _tracers() -> dict[str, tuple[trace.Tracer, InMemorySpanExporter]]:
    """The SDK's tracer and ours, over providers made alike from the environment as it is now."""
    made: dict[str, tuple[trace.Tracer, InMemorySpanExporter]] = {}
    for name in ("sdk", "ours"):
        exporter = InMemorySpanExporter()
        processor = SimpleSpanProcessor(exporter)
        provider = TracerProvider(resource=Resource({"service.name": "api"}))
        provider.add_span_processor(processor)
        tracer = (
            provider.get_tracer("apphosting") if name == "sdk" else spans.Tracer(provider, [processor], "apphosting")
        )
        made[name] = (tracer, exporter)
    return made


def _scenario(tracer: trace.Tracer) -> None:
    """Every method a span has, called as the processes call them and as they might."""
    with tracer.start_as_current_span(
        "server",
        context=trace.set_span_in_context(NonRecordingSpan(REMOTE)),
        kind=SpanKind.SERVER,
        attributes={
            "text": "x",
            "empty": "",
            "count": 3,
            "ratio": 0.5,
            "flag": True,
            "texts": ["a", "b"],
            "mixed": ["a", 1],
            "object": {"not": "allowed"},
            "none": None,
        },
        links=[Link(UNSAMPLED, {"why": "batch"})],
    ) as server:
        server.add_event("chosen", {"location": "eu-1", "score": 0.9})
        server.set_attribute("rpc.grpc.status_code", 0)
        server.set_attributes({"later": "yes", "numbers": [1, 2]})
        server.update_name("server renamed")
        with tracer.start_as_current_span("child") as child:
            child.set_status(Status(StatusCode.ERROR, "failed: reason"))
            child.set_status(StatusCode.UNSET)
        with tracer.start_as_current_span("ok stays") as ok:
            ok.set_status(StatusCode.OK)
            ok.set_status(StatusCode.ERROR, "too late")
        try:
            raise ValueError("bad input")
        except ValueError as failure:
            server.record_exception(failure, {"extra": 1})
    with pytest.raises(KeyError), tracer.start_as_current_span("raises", kind=SpanKind.CONSUMER):
        raise KeyError("missing")
    tracer.start_span("timed", start_time=10).end(end_time=20)
    plain = tracer.start_span("plain", kind=SpanKind.PRODUCER)
    plain.end()
    plain.set_attribute("after", "the end")
    plain.add_event("after the end")
    plain.set_status(StatusCode.ERROR)
    plain.end()


def _normalized(finished: tuple[ReadableSpan, ...]) -> ExportTraceServiceRequest:
    """The OTLP request of `finished`, its made ids numbered in order of appearance and its times taken out."""
    request = encode_spans(finished)
    numbers: dict[bytes, bytes] = {}

    def number(value: bytes) -> bytes:
        if not value or value in (REMOTE.span_id.to_bytes(8, "big"), REMOTE.trace_id.to_bytes(16, "big")):
            return value
        return numbers.setdefault(value, len(numbers).to_bytes(len(value), "big"))

    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                span.trace_id = number(span.trace_id)
                span.span_id = number(span.span_id)
                span.parent_span_id = number(span.parent_span_id)
                span.start_time_unix_nano = span.end_time_unix_nano = 0
                for event in span.events:
                    event.time_unix_nano = 0
                    for pair in event.attributes:
                        if pair.key == "exception.stacktrace":
                            # The frames of the context manager the span was made current by differ.
                            lines = pair.value.string_value.splitlines()
                            pair.value.string_value = "\n".join(lines[:1] + lines[-3:])
    return request


def _both(scenario: Callable[[trace.Tracer], Any]) -> dict[str, tuple[Any, tuple[ReadableSpan, ...]]]:
    made = {}
    for name, (tracer, exporter) in _tracers().items():
        result = scenario(tracer)
        made[name] = (result, exporter.get_finished_spans())
    return made


def test_what_is_exported_is_what_the_sdk_exports() -> None:
    made = _both(_scenario)
    (_, sdk), (_, ours) = made["sdk"], made["ours"]
    assert [span.name for span in ours] == ["child", "ok stays", "server renamed", "raises", "timed", "plain"]
    # Times given are kept as given.
    assert [(span.start_time, span.end_time) for span in ours if span.name == "timed"] == [(10, 20)]
    assert all(isinstance(span, spans.Span) for span in ours)
    assert _normalized(ours) == _normalized(sdk)
    # What each span says of itself, beyond what OTLP carries.
    for mine, theirs in zip(ours, sdk, strict=True):
        assert (mine.parent is None) == (theirs.parent is None)
        assert mine.context.trace_flags == theirs.context.trace_flags
        assert mine.context.trace_state == theirs.context.trace_state
        assert not mine.context.is_remote
        assert mine.start_time is not None
        assert mine.end_time is not None
        assert mine.end_time >= mine.start_time


def test_a_span_prints_as_the_console_exporter_prints_the_sdks() -> None:
    made = _both(_scenario)
    printed = {name: [json.loads(span.to_json()) for span in finished] for name, (_, finished) in made.items()}
    for span in (*printed["sdk"], *printed["ours"]):
        span.pop("context")
        span.pop("parent_id")
        span.pop("start_time")
        span.pop("end_time")
        for event in span["events"]:
            event.pop("timestamp")
            event["attributes"].pop("exception.stacktrace", None)
    assert printed["ours"] == printed["sdk"]
    out = io.StringIO()
    assert ConsoleSpanExporter(out=out).export(made["ours"][1]) is SpanExportResult.SUCCESS
    assert out.getvalue().count('"name": "exception"') == 2


@pytest.mark.parametrize(
    ("sampler", "argument", "parent"),
    [
        ("always_off", None, None),
        ("always_on", None, UNSAMPLED),
        ("traceidratio", "0", None),
        ("parentbased_always_off", None, None),
        ("parentbased_always_off", None, REMOTE),
        (None, None, UNSAMPLED),
        (None, None, REMOTE),
        (None, None, None),
    ],
)
def test_the_providers_sampler_decides_as_for_the_sdk(
    monkeypatch: pytest.MonkeyPatch, sampler: str | None, argument: str | None, parent: SpanContext | None
) -> None:
    if sampler:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    if argument:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", argument)
    context = None if parent is None else trace.set_span_in_context(NonRecordingSpan(parent))

    def start(tracer: trace.Tracer) -> trace.Span:
        span = tracer.start_span("op", context=context)
        span.end()
        return span

    made = _both(start)
    (sdk, sdk_finished), (ours, ours_finished) = made["sdk"], made["ours"]
    assert ours.is_recording() is sdk.is_recording() is False or len(ours_finished) == len(sdk_finished) == 1
    assert len(ours_finished) == len(sdk_finished)
    mine, theirs = ours.get_span_context(), sdk.get_span_context()
    assert mine.trace_flags == theirs.trace_flags
    assert mine.trace_state == theirs.trace_state
    if parent is not None:
        assert mine.trace_id == parent.trace_id
    assert mine.span_id not in (0, getattr(parent, "span_id", 0))


@pytest.mark.parametrize(
    "limits",
    [
        {"OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "2"},
        {"OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT": "3"},
        {"OTEL_ATTRIBUTE_COUNT_LIMIT": "1", "OTEL_SPAN_EVENT_COUNT_LIMIT": "1", "OTEL_SPAN_LINK_COUNT_LIMIT": "0"},
    ],
)
def test_the_span_limits_cut_as_the_sdks_do(monkeypatch: pytest.MonkeyPatch, limits: dict[str, str]) -> None:
    for name, value in limits.items():
        monkeypatch.setenv(name, value)
    made = _both(_scenario)
    (_, sdk), (_, ours) = made["sdk"], made["ours"]
    assert _normalized(ours) == _normalized(sdk)
    assert [(span.dropped_attributes, span.dropped_events, span.dropped_links) for span in ours] == [
        (span.dropped_attributes, span.dropped_events, span.dropped_links) for span in sdk
    ]
    assert any(span.dropped_attributes or span.dropped_events or span.dropped_links for span in ours) or (
        "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT" in limits
    )
