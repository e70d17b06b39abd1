"""Spans made by `tracing.span` and each gRPC call's server span: current inside their block only, and an
exception leaving them recorded as OpenTelemetry's own `start_as_current_span` records it."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from apphosting import spans as spans_module
from apphosting import tracing
from apphosting.v1 import deployments_pb2 as pb
from services.deployments.telemetry import CallTrace, TracedCall

CREATE = "/apphosting.v1.DeploymentService/CreateAppHostingDeployment"


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """Tracing on in this process, its spans kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    # The tracer the processes make (tracing._sdk_tracer).
    monkeypatch.setattr(tracing, "_tracer", spans_module.Tracer(provider, [processor], "apphosting"))
    monkeypatch.setattr(tracing, "_configured", True)
    return exporter


class _Context:
    def details(self) -> str:
        return "database unavailable"


def _stock(failure: BaseException) -> ReadableSpan:
    """The span OpenTelemetry's own start_as_current_span makes when `failure` leaves it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with pytest.raises(type(failure)), provider.get_tracer("stock").start_as_current_span("op"):
        raise failure
    (made,) = exporter.get_finished_spans()
    return made


def test_a_span_is_current_inside_its_block_only(spans: InMemorySpanExporter) -> None:
    before = trace.get_current_span()
    with tracing.span("outer", {"kept": 1, "empty": "", "none": None}) as outer:
        assert trace.get_current_span() is outer
        with tracing.span("inner", kind=SpanKind.CLIENT) as inner:
            assert trace.get_current_span() is inner
        assert trace.get_current_span() is outer
    assert trace.get_current_span() is before
    done_inner, done_outer = spans.get_finished_spans()
    assert done_inner.parent is not None
    assert done_inner.parent.span_id == done_outer.context.span_id
    assert done_inner.kind is SpanKind.CLIENT
    # Empty values are left out, as before.
    assert dict(done_outer.attributes or {}) == {"kept": 1}
    assert done_outer.status.status_code is StatusCode.UNSET


@pytest.mark.parametrize(
    "failure", [ValueError("bad input"), asyncio.CancelledError(), GeneratorExit()], ids=["error", "cancel", "exit"]
)
def test_what_leaves_a_span_is_recorded_as_opentelemetry_records_it(
    spans: InMemorySpanExporter, failure: BaseException
) -> None:
    before = trace.get_current_span()
    with pytest.raises(type(failure)), tracing.span("op"):
        raise failure
    assert trace.get_current_span() is before
    (made,) = spans.get_finished_spans()
    stock = _stock(failure)
    assert made.end_time is not None
    assert (made.status.status_code, made.status.description) == (stock.status.status_code, stock.status.description)
    assert [(event.name, dict(event.attributes or {}).get("exception.type")) for event in made.events] == [
        (event.name, dict(event.attributes or {}).get("exception.type")) for event in stock.events
    ]
    # An error fails the span; a cancellation or a closed generator only ends it.
    assert (made.status.status_code is StatusCode.ERROR) == isinstance(failure, Exception)


def test_a_calls_span_has_its_method_request_answer_and_code(spans: InMemorySpanExporter) -> None:
    call = CallTrace(CREATE).call(pb.CreateAppHostingDeploymentRequest(), [("x-request-id", "req-1")])
    assert isinstance(call, TracedCall)
    with call:
        assert trace.get_current_span() is call.span
        call.answered(pb.Deployment(id="d-1"), grpc.StatusCode.OK, _Context())  # type: ignore[arg-type]
    (made,) = spans.get_finished_spans()
    assert made.name == CREATE.lstrip("/")
    assert made.kind is SpanKind.SERVER
    assert dict(made.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "apphosting.v1.DeploymentService",
        "rpc.method": "CreateAppHostingDeployment",
        tracing.REQUEST_ATTRIBUTE: "req-1",
        tracing.DEPLOYMENT_ATTRIBUTE: "d-1",
        "rpc.grpc.status_code": 0,
    }
    assert made.status.status_code is StatusCode.UNSET


def test_a_call_the_server_failed_marks_its_span_failed(spans: InMemorySpanExporter) -> None:
    request: Any = pb.GetDeploymentRequest(id="d-2")
    call = CallTrace("/apphosting.v1.DeploymentService/GetDeployment").call(request, [])
    with call:
        call.ended(grpc.StatusCode.UNAVAILABLE, _Context())  # type: ignore[arg-type]
    (made,) = spans.get_finished_spans()
    attributes = dict(made.attributes or {})
    assert attributes[tracing.DEPLOYMENT_ATTRIBUTE] == "d-2"
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert made.status.status_code is StatusCode.ERROR
    assert made.status.description == "UNAVAILABLE: database unavailable"
