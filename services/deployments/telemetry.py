"""gRPC server interceptor: each call's server span, and its deployment and request ids in the log context."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry.trace import INVALID_SPAN

from apphosting import logs, tracing

log = logging.getLogger(__name__)

# Health checks and reflection are not operations: no span, no log context.
_UNTRACED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
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
    that writes them itself through context.write and returns None (grpc's Health.Watch).

    Each interceptor iterates the result in its own generator rather than through a helper generator: every
    async generator costs an open stream a frame and an entry in the event loop's set of generators."""
    return hasattr(result, "__aiter__")


def _server_span(name: str, attributes: dict[str, Any], parent: Any) -> contextlib.AbstractContextManager[tracing.Span]:
    """The call's span; with tracing off, the invalid span without the span helper's generator, which a
    stream would hold for its whole life."""
    if not tracing.enabled():
        return contextlib.nullcontext(INVALID_SPAN)
    return tracing.span(name, attributes, kind=tracing.SpanKind.SERVER, parent=parent)


class TelemetryInterceptor(grpc.aio.ServerInterceptor):
    """Runs each call inside a SERVER span (continuing a caller's W3C traceparent) and binds its
    deployment id and request id to the log context, so the outbox rows it writes carry both."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_UNTRACED_PREFIXES):
            return handler
        metadata = {
            key: value for key, value in handler_call_details.invocation_metadata or () if isinstance(value, str)
        }
        return _wrap(method, handler, metadata)


def _wrap(
    method: str, handler: grpc.RpcMethodHandler[Any, Any], metadata: dict[str, str]
) -> grpc.RpcMethodHandler[Any, Any]:
    service, _, name = method.lstrip("/").partition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}

    def about(request: Any) -> tuple[str | None, str]:
        request_id = getattr(request, "request_id", None)
        if not (isinstance(request_id, str) and request_id):
            request_id = metadata.get(REQUEST_ID_METADATA) or uuid.uuid4().hex
        return _deployment_of(request), request_id

    def finish(span: tracing.Span, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        code = context.code() or grpc.StatusCode.OK
        if isinstance(code, int):
            code = next((known for known in grpc.StatusCode if known.value[0] == code), grpc.StatusCode.UNKNOWN)
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        log.debug("%s answered %s", method, code.name)
        if code in _SERVER_ERRORS:
            tracing.failed(span, f"{code.name}: {context.details() or ''}")

    if handler.unary_unary is not None:
        unary: Any = handler.unary_unary

        async def unary_behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            deployment_id, request_id = about(request)
            with (
                logs.bound(deployment_id=deployment_id, request_id=request_id),
                _server_span(
                    method.lstrip("/"),
                    {
                        **attributes,
                        tracing.DEPLOYMENT_ATTRIBUTE: deployment_id,
                        tracing.REQUEST_ATTRIBUTE: request_id,
                    },
                    tracing.extract(metadata),
                ) as span,
            ):
                try:
                    response = await unary(request, context)
                except BaseException:
                    finish(span, context)
                    raise
                made = _deployment_of(response) if deployment_id is None else None
                if made is not None:
                    # A create learns its deployment's id only from its answer.
                    span.set_attribute(tracing.DEPLOYMENT_ATTRIBUTE, made)
                with logs.bound(deployment_id=made):
                    finish(span, context)
                return response

        return grpc.unary_unary_rpc_method_handler(
            unary_behavior, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        streaming: Any = handler.unary_stream

        async def stream_behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            deployment_id, request_id = about(request)
            with (
                logs.bound(deployment_id=deployment_id, request_id=request_id),
                _server_span(
                    method.lstrip("/"),
                    {
                        **attributes,
                        tracing.DEPLOYMENT_ATTRIBUTE: deployment_id,
                        tracing.REQUEST_ATTRIBUTE: request_id,
                    },
                    tracing.extract(metadata),
                ) as span,
            ):
                try:
                    result = streaming(request, context)
                    if is_stream(result):
                        async for item in result:
                            yield item
                    else:
                        await result
                finally:
                    finish(span, context)

        return grpc.unary_stream_rpc_method_handler(
            stream_behavior, handler.request_deserializer, handler.response_serializer
        )
    # Client-streaming calls (the API has none) pass through untraced.
    return handler
