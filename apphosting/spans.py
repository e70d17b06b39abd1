"""Spans made and ended for a fraction of the SDK's cost, sampled, limited and exported by the SDK's own parts.

Every gRPC call and every bus message makes a span, so the SDK's span is on the hot path: its start and end
take about 22 us of the event loop (four locks, the sampler's context look-ups, every attribute value checked,
and a copy made at its end for the processors), where this one takes about 8 us. The span here keeps what an
exporter reads in a `ReadableSpan` and is handed to the processors itself once it ends.

What stays the SDK's: the provider's sampler (OTEL_TRACES_SAMPLER), id generator and resource, the span limits
(OTEL_SPAN_*_LIMIT, OTEL_ATTRIBUTE_*_LIMIT), the processors and exporters. An attribute value other than a
string, bool, int or float, or one past a limit, is handled by the SDK's `BoundedAttributes` as the SDK's span
handles it. A span belongs to the thread that started it: unlike the SDK's it takes no lock.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.semconv.attributes.exception_attributes import (
    EXCEPTION_ESCAPED,
    EXCEPTION_MESSAGE,
    EXCEPTION_STACKTRACE,
    EXCEPTION_TYPE,
)
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util import types

__all__ = ["Span", "Tracer"]

log = logging.getLogger(__name__)

# Values every exporter carries as they are: a mapping of only these needs no check.
_PLAIN = frozenset({str, bool, int, float})
# What the provider's sampler describes itself as when OTEL_TRACES_SAMPLER asks for nothing else: sample a root,
# follow the parent otherwise. The tracer decides that itself instead of asking the sampler.
_DEFAULT_SAMPLER = (
    "ParentBased{root:AlwaysOnSampler,remoteParentSampled:AlwaysOnSampler,remoteParentNotSampled:AlwaysOffSampler,"
    "localParentSampled:AlwaysOnSampler,localParentNotSampled:AlwaysOffSampler}"
)
_UNSET = Status(StatusCode.UNSET)


class Tracer(trace.Tracer):
    """Makes `Span`s with a provider's sampler, ids and resource, handing each to `processors` as it starts
    and ends (the processors the provider was given, so that its flush and shutdown reach them too)."""

    def __init__(
        self, provider: TracerProvider, processors: Sequence[SpanProcessor], name: str, limits: SpanLimits | None = None
    ) -> None:
        self.resource = provider.resource
        self.scope = InstrumentationScope(name)
        self.processors = tuple(processors)
        self.limits = limits or SpanLimits()
        self._ids = provider.id_generator
        self._random_ids = provider.id_generator.is_trace_id_random()
        self._sampler = provider.sampler
        self._default_sampler = provider.sampler.get_description() == _DEFAULT_SAMPLER
        # A mapping of plain values is kept as a dict when no limit can cut it.
        most = self.limits.max_span_attributes
        if self.limits.max_span_attribute_length is not None:
            self._plain_up_to = -1
        else:
            self._plain_up_to = sys.maxsize if most is None else most

    def start_span(
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        parent: SpanContext | None = trace.get_current_span(context).get_span_context()
        if parent is not None and not parent.is_valid:
            parent = None
        trace_id = self._ids.generate_trace_id() if parent is None else parent.trace_id
        random_ids = self._random_ids if parent is None else parent.trace_flags.random_trace_id
        trace_state = None if parent is None else parent.trace_state
        if self._default_sampler and not links:
            sampled = parent is None or parent.trace_flags.sampled
            recording = sampled
        else:
            result = self._sampler.should_sample(context, trace_id, name, kind, attributes, links)
            sampled = result.decision is Decision.RECORD_AND_SAMPLE
            recording = result.decision is not Decision.DROP
            attributes = result.attributes
            trace_state = result.trace_state
        flags = (TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT) | (
            TraceFlags.RANDOM_TRACE_ID if random_ids else TraceFlags.DEFAULT
        )
        made = SpanContext(
            trace_id,
            self._ids.generate_span_id(),
            is_remote=False,
            trace_flags=TraceFlags(flags),
            trace_state=trace_state,
        )
        if not recording:
            return trace.NonRecordingSpan(made)
        span = Span(
            self,
            name,
            made,
            parent,
            kind,
            attributes,
            links or (),
            start_time if start_time is not None else time.time_ns(),
        )
        for processor in self.processors:
            # Typed for the SDK's own span; a processor reads it as a ReadableSpan, which this is.
            processor.on_start(cast(Any, span), parent_context=context)
        return span

    @contextlib.contextmanager
    def start_as_current_span(  # type: ignore[override]  # the API's return type is its private alias of this
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        made = self.start_span(name, context, kind, attributes, links, start_time)
        with trace.use_span(
            made,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current

    def attributes(self, given: types.Attributes) -> dict[str, Any] | BoundedAttributes:
        """A span's attributes: a plain dict when every value is plain and no limit applies, else the SDK's."""
        if not given:
            return {}
        if self.plain(len(given), given):
            return dict(given)
        return self.bounded(given)

    def plain(self, count: int, added: Mapping[str, Any]) -> bool:
        """Whether a span holding `count` attributes, `added` among them, may keep them in a plain dict: no
        limit can cut them and every value added is plain."""
        return count <= self._plain_up_to and all(type(value) in _PLAIN for value in added.values())

    def links(self, given: Sequence[Link]) -> Sequence[Link]:
        """A span's links: those that say something (a valid context, attributes or a trace state), up to the
        limit, the others counted as dropped."""
        if not given:
            return ()
        kept = [link for link in given if link.context.is_valid or link.attributes or link.context.trace_state]
        return BoundedList.from_seq(self.limits.max_links, kept)

    def bounded(self, given: types.Attributes) -> BoundedAttributes:
        return BoundedAttributes(
            self.limits.max_span_attributes,
            given,
            immutable=False,
            max_value_len=self.limits.max_span_attribute_length,
        )


class Span(ReadableSpan, trace.Span):
    """A recording span: what an exporter reads, and the API's methods that fill it until it ends."""

    def __init__(
        self,
        tracer: Tracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: types.Attributes,
        links: Sequence[Link],
        start_time: int,
    ) -> None:
        super().__init__(
            name,
            context=context,
            parent=parent,
            resource=tracer.resource,
            attributes=tracer.attributes(attributes),
            events=(),
            links=tracer.links(links),
            kind=kind,
            status=_UNSET,
            start_time=start_time,
            instrumentation_scope=tracer.scope,
        )
        self._tracer = tracer

    def get_span_context(self) -> SpanContext:
        return self._context  # type: ignore[return-value]

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        self.set_attributes({key: value})

    def set_attributes(self, attributes: Mapping[str, types.AttributeValue]) -> None:
        if self._end_time is not None:
            log.warning("attributes set on an ended span %s are dropped", self._name)
            return
        held = self._attributes
        if type(held) is dict:
            if self._tracer.plain(len(held) + len(attributes), attributes):
                held.update(attributes)
                return
            held = self._attributes = self._tracer.bounded(held)
        for key, value in attributes.items():
            held[key] = value  # type: ignore[index]

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        if self._end_time is not None:
            log.warning("an event added to an ended span %s is dropped", self._name)
            return
        limits = self._tracer.limits
        if not isinstance(self._events, BoundedList):
            self._events = BoundedList(limits.max_events)
        held = BoundedAttributes(limits.max_event_attributes, attributes, max_value_len=limits.max_attribute_length)
        self._events.append(Event(name, held, timestamp if timestamp is not None else time.time_ns()))

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        kind = type(exception)
        module = kind.__module__
        described: dict[str, Any] = {
            EXCEPTION_TYPE: kind.__qualname__ if module in (None, "builtins") else f"{module}.{kind.__qualname__}",
            EXCEPTION_MESSAGE: str(exception),
            EXCEPTION_STACKTRACE: "".join(traceback.format_exception(exception)),
            EXCEPTION_ESCAPED: str(escaped),
        }
        described.update(attributes or {})
        self.add_event("exception", described, timestamp)

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # As the specification has it: OK is final, and UNSET changes nothing.
        if self._status.status_code is StatusCode.OK or self._end_time is not None:
            return
        if isinstance(status, Status):
            if status.status_code is not StatusCode.UNSET:
                self._status = status
        elif status is not StatusCode.UNSET:
            self._status = Status(status, description)

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            log.warning("span %s ended twice", self._name)
            return
        self._end_time = end_time if end_time is not None else time.time_ns()
        for processor in self._tracer.processors:
            processor.on_end(self)
