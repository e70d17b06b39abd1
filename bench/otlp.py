"""A tiny OTLP/gRPC trace receiver for the telemetry comparison: it accepts every export and counts the spans.

Run as `python -m bench.otlp`; it prints the port it listens on, and on SIGTERM the spans it received.
It is its own process, so decoding the exports costs the benchmark's client nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = 0
        self.exports = 0

    async def Export(  # noqa: N802 (the OTLP service's method name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.exports += 1
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans += len(scope_spans.spans)
        print(f"otlp: {self.spans} spans in {self.exports} exports", flush=True)
        return trace_service_pb2.ExportTraceServiceResponse()


async def serve(listen: str) -> None:
    server = grpc.aio.server()
    receiver = _Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"otlp: listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.otlp", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args()
    asyncio.run(serve(args.listen))


if __name__ == "__main__":
    main()
