"""The OTLP/gRPC span exporter, with export requests built in place.

OpenTelemetry's own encoder makes every span, attribute and value a message of its own and then
copies it into its parent (a copy that upb makes by encoding the message and decoding it again), and
it groups spans by their resource's hash, which writes the resource's attributes out as JSON for each
span. In the API that was about 0.3 million instructions per Create in the exporter's thread, which
takes the GIL from the event loop while it runs. Here each message is added to its parent and filled
there, and a resource is compared by identity first, so it is encoded once per request. The request is
the one the stock encoder makes (tests/unit/test_otlp.py compares them); sending, retries, TLS,
headers and timeouts stay the stock exporter's, read from the OTEL_EXPORTER_OTLP_* variables.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, SpanFlags
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanMessage
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind

__all__ = ["SpanExporter", "encode"]

log = logging.getLogger(__name__)

_KINDS = {
    SpanKind.INTERNAL: SpanMessage.SpanKind.SPAN_KIND_INTERNAL,
    SpanKind.SERVER: SpanMessage.SpanKind.SPAN_KIND_SERVER,
    SpanKind.CLIENT: SpanMessage.SpanKind.SPAN_KIND_CLIENT,
    SpanKind.PRODUCER: SpanMessage.SpanKind.SPAN_KIND_PRODUCER,
    SpanKind.CONSUMER: SpanMessage.SpanKind.SPAN_KIND_CONSUMER,
}
_HAS_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK


class SpanExporter(OTLPSpanExporter):
    """OTLPSpanExporter, its requests made by `encode`."""

    def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        return encode(data)


def encode(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    """The export request of `spans`: grouped by resource, then by instrumentation scope, in the order each
    first appears."""
    request = ExportTraceServiceRequest()
    # Resources as first seen, by identity (a provider has one), each with its scopes' groups.
    by_identity: dict[int, tuple[ResourceSpans, dict[InstrumentationScope | None, ScopeSpans]]] = {}
    seen: list[tuple[Resource, tuple[ResourceSpans, dict[InstrumentationScope | None, ScopeSpans]]]] = []
    for span in spans:
        resource = span.resource
        group = by_identity.get(id(resource))
        if group is None:
            # Another object equal to one seen joins its group, as the stock encoder's hash would have it.
            group = next((found for other, found in seen if other == resource), None)
            if group is None:
                made = request.resource_spans.add()
                made.resource.SetInParent()
                _attributes(made.resource.attributes, resource.attributes)
                if resource.schema_url:
                    made.schema_url = resource.schema_url
                group = (made, {})
                seen.append((resource, group))
            by_identity[id(resource)] = group
        resource_spans, scopes = group
        scope = span.instrumentation_scope or None
        scope_spans = scopes.get(scope)
        if scope_spans is None:
            scope_spans = scopes[scope] = resource_spans.scope_spans.add()
            scope_spans.scope.SetInParent()
            if scope is not None:
                scope_spans.scope.name = scope.name
                if scope.version:
                    scope_spans.scope.version = scope.version
                _attributes(scope_spans.scope.attributes, scope.attributes)
                if scope.schema_url:
                    scope_spans.schema_url = scope.schema_url
        _span(scope_spans.spans.add(), span)
    return request


def _span(made: SpanMessage, span: ReadableSpan) -> None:
    context = span.get_span_context()
    assert context is not None  # an SDK span always has one
    made.trace_id = context.trace_id.to_bytes(16, "big")
    made.span_id = context.span_id.to_bytes(8, "big")
    if context.trace_state:
        made.trace_state = context.trace_state.to_header()
    parent = span.parent
    if parent:
        made.parent_span_id = parent.span_id.to_bytes(8, "big")
    made.name = span.name
    made.kind = _KINDS[span.kind]
    if span.start_time is not None:
        made.start_time_unix_nano = span.start_time
    if span.end_time is not None:
        made.end_time_unix_nano = span.end_time
    _attributes(made.attributes, span.attributes)
    for event in span.events:
        added = made.events.add()
        added.name = event.name
        added.time_unix_nano = event.timestamp
        _attributes(added.attributes, event.attributes)
        added.dropped_attributes_count = event.dropped_attributes
    for link in span.links:
        linked = made.links.add()
        linked.trace_id = link.context.trace_id.to_bytes(16, "big")
        linked.span_id = link.context.span_id.to_bytes(8, "big")
        _attributes(linked.attributes, link.attributes)
        linked.dropped_attributes_count = link.dropped_attributes
        linked.flags = _flags(link.context)
    status = span.status
    if status is not None:
        made.status.code = status.status_code.value  # type: ignore[assignment]
        if status.description:
            made.status.message = status.description
    made.dropped_attributes_count = span.dropped_attributes
    made.dropped_events_count = span.dropped_events
    made.dropped_links_count = span.dropped_links
    made.flags = _flags(parent)


def _flags(parent: SpanContext | None) -> int:
    if parent and parent.is_remote:
        return _HAS_IS_REMOTE | _IS_REMOTE
    return _HAS_IS_REMOTE


def _attributes(into: RepeatedCompositeFieldContainer[KeyValue], attributes: Mapping[str, Any] | None) -> None:
    if not attributes:
        return
    for key, value in attributes.items():
        pair = into.add()
        pair.key = key
        try:
            _value(pair.value, value)
        except TypeError:
            # As the stock encoder does: the attribute is left out, the rest are sent.
            del into[-1]
            log.exception("span attribute %s has a value OTLP cannot carry", key)


def _value(into: AnyValue, value: Any) -> None:
    if value is None:
        into.SetInParent()
    elif isinstance(value, bool):
        into.bool_value = value
    elif isinstance(value, str):
        into.string_value = value
    elif isinstance(value, int):
        into.int_value = value
    elif isinstance(value, float):
        into.double_value = value
    elif isinstance(value, bytes):
        into.bytes_value = value
    elif isinstance(value, Sequence):
        into.array_value.SetInParent()
        values = into.array_value.values
        for item in value:
            _value(values.add(), item)
    elif isinstance(value, Mapping):
        into.kvlist_value.SetInParent()
        pairs = into.kvlist_value.values
        for key, item in value.items():
            pair = pairs.add()
            pair.key = str(key)
            _value(pair.value, item)
    else:
        raise TypeError(f"{type(value).__name__} is not an OTLP value")
