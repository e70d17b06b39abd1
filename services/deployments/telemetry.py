"""Each gRPC call's server span, and its deployment and request ids in the log context."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import Any

import grpc
from opentelemetry.trace import INVALID_SPAN

from apphosting import logs, tracing

log = logging.getLogger(__name__)

# Health checks and reflection are not operations: no span, no log context.
_UNTRACED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
# The span attribute of the code a call ended with (OpenTelemetry's gRPC conventions).
_STATUS_ATTRIBUTE = "rpc.grpc.status_code"
# Metadata a caller (the REST gateway, a proxy) may send to name its request.
REQUEST_ID_METADATA = "x-request-id"
# Codes that mean the server failed, not the caller (OpenTelemetry's gRPC conventions).
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _deployment_of(message: Any) -> str | None:
    """The deployment a request or an answer is about: its `id`, or its deployment's."""
    found = getattr(message, "id", None)
    if isinstance(found, str) and found:
        return found
    deployment = getattr(message, "deployment", None)
    found = getattr(deployment, "id", None)
    return found if isinstance(found, str) and found else None


def is_stream(result: Any) -> bool:
    """Whether a server-streaming handler's result yields its messages (an async generator) or is a coroutine
    that writes them itself through context.write and returns None (grpc's Health.Watch)."""
    return hasattr(result, "__aiter__")


class CallTrace:
    """A method's server spans and log context; what is the same for each of its calls is made once."""

    __slots__ = ("attributes", "method", "name", "traced")

    def __init__(self, method: str) -> None:
        self.method = method
        self.traced = not method.startswith(_UNTRACED_PREFIXES)
        self.name = method.lstrip("/")
        service, _, name = self.name.partition("/")
        self.attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}

    def call(self, request: Any, metadata: Iterable[tuple[str, Any]]) -> TracedCall | UntracedCall:
        """One call's trace, to be entered around the call (continuing a caller's W3C traceparent)."""
        if not self.traced:
            return _UNTRACED
        headers = {key: value for key, value in metadata if isinstance(value, str)}
        request_id = getattr(request, "request_id", None)
        if not (isinstance(request_id, str) and request_id):
            request_id = headers.get(REQUEST_ID_METADATA) or uuid.uuid4().hex
        # The caller's trace context is read now: the call keeps it, not the headers, for its whole life.
        return TracedCall(self, _deployment_of(request), request_id, tracing.extract(headers))


class TracedCall:
    """One call's server span and log context: its deployment id and request id bound to the lines it logs,
    so the outbox rows it writes carry both. A plain object, since a stream holds it for its whole life."""

    __slots__ = ("_bound", "_current", "_deployment_id", "_parent", "_request_id", "_trace", "span")

    def __init__(self, trace: CallTrace, deployment_id: str | None, request_id: str, parent: Any) -> None:
        self._trace = trace
        self._deployment_id = deployment_id
        self._request_id = request_id
        self._parent = parent
        self._bound = logs.bound(deployment_id=deployment_id, request_id=request_id)
        self._current: tracing.Current | None = None
        self.span: tracing.Span = INVALID_SPAN

    def __enter__(self) -> TracedCall:
        self._bound.__enter__()
        tracer = tracing.tracer()
        if tracer is not None:
            trace = self._trace
            attributes = {**trace.attributes, tracing.REQUEST_ATTRIBUTE: self._request_id}
            if self._deployment_id:
                attributes[tracing.DEPLOYMENT_ATTRIBUTE] = self._deployment_id
            self._current = tracing.Current(tracer, trace.name, attributes, tracing.SpanKind.SERVER, self._parent)
            self.span = self._current.span
        return self

    def __exit__(self, kind: type[BaseException] | None, failure: BaseException | None, tb: Any) -> None:
        try:
            if self._current is not None:
                self._current.end(failure)
        finally:
            self._bound.__exit__()

    def answered(self, response: Any, code: grpc.StatusCode, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """The call ended with `response`: a create learns its deployment's id only from its answer."""
        made = _deployment_of(response) if self._deployment_id is None else None
        if made is None:
            self.ended(code, context)
            return
        self.span.set_attributes({tracing.DEPLOYMENT_ATTRIBUTE: made, _STATUS_ATTRIBUTE: code.value[0]})
        with logs.bound(deployment_id=made):
            self._ended(code, context)

    def ended(self, code: grpc.StatusCode, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """The call ended with `code`: its status on the span, and a failure of the server's own marks the
        span failed."""
        self.span.set_attribute(_STATUS_ATTRIBUTE, code.value[0])
        self._ended(code, context)

    def _ended(self, code: grpc.StatusCode, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        log.debug("%s answered %s", self._trace.method, code.name)
        if code in _SERVER_ERRORS:
            tracing.failed(self.span, f"{code.name}: {context.details() or ''}")


class UntracedCall:
    """A call of a method that is not an operation (health, reflection): no span, no log context."""

    __slots__ = ()

    def __enter__(self) -> UntracedCall:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def answered(self, response: Any, code: grpc.StatusCode, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        pass

    def ended(self, code: grpc.StatusCode, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        pass


_UNTRACED = UntracedCall()
