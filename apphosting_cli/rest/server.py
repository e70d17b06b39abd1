"""Serving the REST gateway with uvicorn: `apphosting rest` and `apphosting dev` start it through here."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import uvicorn

from apphosting import metrics
from apphosting_cli.rest.app import create_app
from apphosting_client import ClientConfig


@dataclass
class RestOptions:
    # host:port to listen on; port 0 picks a free one.
    listen: str = "127.0.0.1:8080"
    # The gRPC API it calls; callers' tokens are forwarded, so no token of its own is needed.
    client: ClientConfig = field(default_factory=ClientConfig)
    log_level: str = "warning"
    # host:port serving Prometheus metrics at /metrics (port 0: any free one); None: no metrics server.
    metrics_listen: str | None = None


class _Server(uvicorn.Server):
    # The process's owner (main.py's runner, dev) handles SIGINT/SIGTERM and sets the stop event.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class RestGateway:
    """The gateway's HTTP server in the running event loop: start(), then stop()."""

    def __init__(self, options: RestOptions) -> None:
        self.options = options
        host, _, port = options.listen.rpartition(":")
        self.host = host.strip("[]") or "127.0.0.1"
        self.port = int(port)
        self.registry = metrics.registry()
        self.metrics_server: metrics.MetricsServer | None = None
        config = uvicorn.Config(
            create_app(options.client, self.registry),
            host=self.host,
            port=self.port,
            log_level=options.log_level,
            access_log=False,
            lifespan="on",
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start_metrics(self) -> metrics.MetricsServer | None:
        """Serves /metrics when options.metrics_listen says where (once; start() calls it too)."""
        if self.options.metrics_listen is not None and self.metrics_server is None:
            self.metrics_server = metrics.MetricsServer(self.registry, self.options.metrics_listen)
            self.metrics_server.start()
        return self.metrics_server

    async def start(self) -> int:
        """Serves until stop(); returns the port it listens on."""
        self.start_metrics()
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError(f"the REST gateway could not listen on {self.options.listen}")
            await asyncio.sleep(0.02)
        for server in self._server.servers:
            for sock in server.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    self.port = sock.getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._task = None
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None


async def serve(options: RestOptions, stop: asyncio.Event) -> None:
    """Runs the gateway until `stop` is set."""
    gateway = RestGateway(options)
    await gateway.start()
    print(f"rest: REST gateway on {gateway.url} (OpenAPI at /openapi.json)", flush=True)
    if gateway.metrics_server is not None:
        print(f"rest: metrics on {gateway.metrics_server.url}", flush=True)
    try:
        stopped = asyncio.create_task(stop.wait())
        assert gateway._task is not None
        await asyncio.wait({stopped, gateway._task}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
    finally:
        await gateway.stop()
