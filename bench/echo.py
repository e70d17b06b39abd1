"""The gRPC ceiling: a bare grpc.aio server that answers CreateAppHostingDeployment with canned bytes.

It serves the same method path, so the benchmark's client (stub, serialisation, channel,
concurrency) is exactly the one it uses against the real API; the server does no work at all. It
also holds WatchDeployment streams open (an empty first answer, then nothing), so that the memory
one open stream costs in grpc.aio itself is measured beside the API's.
Run as `python -m bench.echo RESPONSE_FILE`; it prints the port it listens on.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

METHOD = "CreateAppHostingDeployment"
WATCH = "WatchDeployment"
SERVICE = "apphosting.v1.DeploymentService"


async def serve(response: bytes, listen: str) -> None:
    async def answer(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return response

    async def hold(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        yield b""
        await asyncio.Event().wait()

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {METHOD: grpc.unary_unary_rpc_method_handler(answer), WATCH: grpc.unary_stream_rpc_method_handler(hold)},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"echo: listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__)
    parser.add_argument("response_file", help="the serialized Deployment to answer every call with")
    parser.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args()
    asyncio.run(serve(Path(args.response_file).read_bytes(), args.listen))


if __name__ == "__main__":
    main()
