"""The one interceptor every call passes: its server span and log context, its Prometheus series, and its
caller's authentication with a safe decode of its body, in one wrapping of the method's handler.

The wrapping is made once per method and kept: each call reads what it needs (its metadata) from its
context. One layer, where an interceptor per concern had each call find its handler through a chain of
coroutines, wrapped anew at every step, and had each open stream held by a generator per interceptor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.deployments.auth import Gate, JwtVerifier, is_public
from services.deployments.metrics import GrpcMetrics, MethodCounts
from services.deployments.telemetry import CallTrace, is_stream


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each method's handler once: the span outermost, so it covers the metrics and what the
    gate refuses; the metrics next, so they count refusals too; then the gate, then the servicer."""

    def __init__(self, verifier: JwtVerifier | None, grpc_metrics: GrpcMetrics) -> None:
        self._gate = Gate(verifier)
        self._metrics = grpc_metrics
        # Only methods a servicer answers are kept: as many as the services have.
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return None
            wrapped = self._wrapped[method] = self._wrap(method, handler)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        trace = CallTrace(method)
        gate = None if is_public(method) else self._gate
        deserializer = handler.request_deserializer if gate is None else gate.deserializer(handler)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(method, handler.unary_unary, trace, MethodCounts(self._metrics, "unary", method), gate),
                deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _stream(
                    method, handler.unary_stream, trace, MethodCounts(self._metrics, "server_stream", method), gate
                ),
                deserializer,
                handler.response_serializer,
            )
        if gate is not None:
            # The API has no client-streaming methods; refuse rather than serve one unauthenticated.
            raise NotImplementedError(f"{method}: client-streaming methods are not supported")
        return handler


# A call that ended without a code of its own: the caller went away (CANCELLED), or the servicer raised
# something no layer answered (UNKNOWN, which is what grpc then sends).
_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def _ended_with(context: grpc.aio.ServicerContext[Any, Any], failure: BaseException | None) -> grpc.StatusCode:
    """The code a call ended with: the one it was answered with, else what its end says."""
    code: Any = context.code()
    if code is None:
        if failure is None:
            return grpc.StatusCode.OK
        if isinstance(failure, asyncio.CancelledError | GeneratorExit):
            return grpc.StatusCode.CANCELLED
        return grpc.StatusCode.UNKNOWN
    if isinstance(code, grpc.StatusCode):
        return code
    return _BY_VALUE.get(int(code), grpc.StatusCode.UNKNOWN)


def _unary(
    method: str, servicer: Any, trace: CallTrace, counts: MethodCounts, gate: Gate | None
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        with trace.call(request, context.invocation_metadata() or ()) as call:
            start = counts.started()
            try:
                if gate is None:
                    response = await servicer(request, context)
                else:
                    await gate.admit(method, request, context)
                    try:
                        response = await servicer(request, context)
                    except grpc.aio.AbortError:
                        raise
                    except Exception as failure:
                        await gate.fail(method, failure, context)
            except BaseException as failure:
                code = _ended_with(context, failure)
                counts.finished(code, context, start)
                call.ended(code, context)
                raise
            code = _ended_with(context, None)
            counts.finished(code, context, start)
            call.answered(response, code, context)
            return response

    return behavior


def _stream(
    method: str, servicer: Any, trace: CallTrace, counts: MethodCounts, gate: Gate | None
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
    # The one generator a stream holds for its whole life besides its servicer's.
    async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        with trace.call(request, context.invocation_metadata() or ()) as call:
            start = counts.started()
            ended: BaseException | None = None
            try:
                if gate is not None:
                    await gate.admit(method, request, context)
                try:
                    result = servicer(request, context)
                    if is_stream(result):
                        async for item in result:
                            counts.sent()
                            yield item
                    else:
                        await result
                except grpc.aio.AbortError:
                    raise
                except Exception as failure:
                    if gate is None:
                        raise
                    await gate.fail(method, failure, context)
            except BaseException as failure:
                ended = failure
                raise
            finally:
                code = _ended_with(context, ended)
                counts.finished(code, context, start)
                call.ended(code, context)

    return behavior
