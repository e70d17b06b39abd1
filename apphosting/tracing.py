"""OpenTelemetry: the tracer set up from OTEL_* variables, and trace context in NATS headers and outbox rows."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from apphosting import logs, spans

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "DEPLOYMENT_ATTRIBUTE",
    "DEPLOYMENT_HEADER",
    "REQUEST_ATTRIBUTE",
    "REQUEST_HEADER",
    "STEP_ATTRIBUTE",
    "Current",
    "Span",
    "SpanKind",
    "configure",
    "consuming",
    "enabled",
    "extract",
    "failed",
    "flush",
    "inject",
    "outbox_headers",
    "record",
    "span",
    "span_exporters",
    "tracer",
]

log = logging.getLogger(__name__)

# What a message says about the deployment and request it is part of, for the consumer's log lines.
DEPLOYMENT_HEADER = "Apphosting-Deployment-Id"
REQUEST_HEADER = "Apphosting-Request-Id"
# Span attributes (no ids in span names: names stay few, ids are attributes).
DEPLOYMENT_ATTRIBUTE = "apphosting.deployment_id"
REQUEST_ATTRIBUTE = "apphosting.request_id"
STEP_ATTRIBUTE = "apphosting.step"

_INSTRUMENTATION = "apphosting"
_propagator = TraceContextTextMapPropagator()
_lock = threading.Lock()
# None until first use; then the tracer, or None for "off" (no OTEL_* exporter asked for).
_tracer: trace.Tracer | None = None
_configured = False


def _exporters() -> list[str]:
    """The span exporters the standard variables ask for; none when they ask for nothing."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = [name.strip().lower() for name in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()]
    if named:
        return [name for name in named if name != "none"]
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return ["otlp"]
    return []


def configure(process: str | None = None) -> bool:
    """Sets up this process's tracer from the OTEL_* variables; True when spans are exported.

    Safe to call more than once (the first call wins); the helpers below call it on first use,
    so a process that never calls it still traces when the variables ask for it.
    """
    global _tracer, _configured
    with _lock:
        if _configured:
            return _tracer is not None
        _configured = True
        exporters = _exporters()
        if not exporters:
            # The API's default (no-op) provider stays: spans cost nothing and nothing is sent.
            return False
        _tracer = _sdk_tracer(process or logs.process_name(), exporters)
        return _tracer is not None


def _sdk_tracer(process: str, exporters: list[str]) -> trace.Tracer | None:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes: dict[str, Any] = {"process.pid": os.getpid(), "apphosting.process": process}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = f"apphosting-{process}"
    # Resource.create adds OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME (which wins over our default).
    provider = TracerProvider(resource=Resource.create(attributes))
    # Batched off the event loop's thread, bounded by the OTEL_BSP_* variables; flushed at exit.
    processors = [BatchSpanProcessor(exporter) for exporter in span_exporters(exporters)]
    for processor in processors:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    log.info("traces exported with %s", ", ".join(exporters))
    return spans.Tracer(provider, processors, _INSTRUMENTATION)


def span_exporters(names: list[str]) -> list[SpanExporter]:
    """The exporters of `names` (otlp, console); others are logged and left out."""
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    made: list[SpanExporter] = []
    for name in names:
        if name == "otlp":
            protocol = os.environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            )
            if protocol.strip().lower() != "grpc":
                log.warning("OTLP protocol %s is not supported; spans are sent with OTLP/gRPC", protocol)
            from apphosting import otlp

            # The exporter reads its endpoint, headers, TLS and timeout from the OTEL_EXPORTER_OTLP_* variables.
            made.append(otlp.SpanExporter())
        elif name == "console":
            made.append(ConsoleSpanExporter())
        else:
            log.warning("traces exporter %s is not supported (otlp, console, none); ignored", name)
    return made


def enabled() -> bool:
    """Whether spans are recorded and exported in this process."""
    if not _configured:
        configure()
    return _tracer is not None


def _active() -> trace.Tracer | None:
    if not _configured:
        configure()
    return _tracer


class _HeaderGetter(Getter[Mapping[str, str]]):
    """Reads NATS headers, whose names a server or client may have re-cased."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            for name, found in carrier.items():
                if name.lower() == key:
                    value = found
                    break
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_getter = _HeaderGetter()


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Adds the current trace context (W3C traceparent, tracestate) and log context to message headers."""
    deployment_id = logs.deployment_id()
    if deployment_id:
        headers.setdefault(DEPLOYMENT_HEADER, deployment_id)
    request_id = logs.request_id()
    if request_id:
        headers.setdefault(REQUEST_HEADER, request_id)
    if _active() is not None:
        _propagator.inject(headers)
    return headers


def outbox_headers(deployment_id: str | None = None) -> dict[str, str] | None:
    """The headers an outbox row keeps for the message the relay sends later: its trace and log context."""
    headers: dict[str, str] = {}
    if deployment_id:
        headers[DEPLOYMENT_HEADER] = deployment_id
    inject(headers)
    return headers or None


def extract(headers: Mapping[str, str] | None) -> otel_context.Context | None:
    """The trace context a message or call carries, or None."""
    if not headers or _active() is None:
        return None
    return _propagator.extract(headers, getter=_getter)


class Current:
    """A span started and made current until `end`: what `span` does, without its generators, for a caller
    that enters and leaves it itself (each gRPC call's server span)."""

    __slots__ = ("_token", "span")

    def __init__(
        self,
        tracer: trace.Tracer,
        name: str,
        attributes: Mapping[str, Any],
        kind: SpanKind,
        parent: otel_context.Context | None,
    ) -> None:
        self.span = tracer.start_span(name, context=parent, kind=kind, attributes=attributes)
        self._token = otel_context.attach(trace.set_span_in_context(self.span))

    def end(self, failure: BaseException | None = None) -> None:
        """Leaves the span; an exception (not a GeneratorExit or a cancellation) is recorded and marks it
        failed, as OpenTelemetry's own `use_span` does."""
        otel_context.detach(self._token)
        if isinstance(failure, Exception) and self.span.is_recording():
            self.span.record_exception(failure)
            self.span.set_status(Status(StatusCode.ERROR, f"{type(failure).__name__}: {failure}"))
        self.span.end()


def tracer() -> trace.Tracer | None:
    """This process's tracer, or None when spans are not exported."""
    return _active()


@contextlib.contextmanager
def span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: otel_context.Context | None = None,
) -> Iterator[Span]:
    """A span made current for the block; an exception leaving it is recorded and marks it failed.

    With tracing off it is the invalid span, whose methods do nothing, and no context is touched.
    """
    active = _active()
    if active is None:
        yield INVALID_SPAN
        return
    clean = {key: value for key, value in (attributes or {}).items() if value not in (None, "")}
    current = Current(active, name, clean, kind, parent)
    try:
        yield current.span
    except BaseException as failure:
        current.end(failure)
        raise
    current.end()


@contextlib.contextmanager
def consuming(name: str, headers: Mapping[str, str] | None, attributes: Mapping[str, Any]) -> Iterator[Span]:
    """The handling of one bus message: its log context from the headers, and a consumer span
    continuing the trace its publisher was in."""
    deployment_id = _header(headers, DEPLOYMENT_HEADER)
    request_id = _header(headers, REQUEST_HEADER)
    with logs.bound(deployment_id=deployment_id, request_id=request_id):
        if _active() is None:
            yield INVALID_SPAN
            return
        with span(
            name,
            {**attributes, DEPLOYMENT_ATTRIBUTE: deployment_id, REQUEST_ATTRIBUTE: request_id},
            kind=SpanKind.CONSUMER,
            parent=extract(headers),
        ) as current:
            yield current


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    found = _getter.get(headers, name)
    return found[0] if found else None


def failed(current: Span, message: str) -> None:
    """Marks a span failed with a message, for a failure that is reported rather than raised."""
    current.set_status(Status(StatusCode.ERROR, logs.redact(message)))


def record(current: Span, failure: BaseException) -> None:
    """Records an exception that is handled (not raised through the span) and marks the span failed."""
    current.record_exception(failure)
    failed(current, f"{type(failure).__name__}: {failure}")


def flush(timeout_millis: int = 5000) -> None:
    """Sends the spans still batched (the provider also does at exit)."""
    provider = trace.get_tracer_provider()
    force_flush = getattr(provider, "force_flush", None)
    if force_flush is not None:
        force_flush(timeout_millis)
