"""The gRPC ceiling: a bare grpc.aio server that answers CreateAppHostingDeployment with canned bytes.

It serves the same method path, so the benchmark's client (stub, serialisation, channel,
concurrency) is exactly the one it uses against the real API; the server does no work at all.
Run as `python -m bench.echo RESPONSE_FILE`; it prints the port it listens on.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

import grpc

METHOD = "CreateAppHostingDeployment"
SERVICE = "apphosting.v1.DeploymentService"


async def serve(response: bytes, listen: str) -> None:
    async def answer(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return response

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(answer)})
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
