"""Prometheus metrics shared by every process: its own registry, the /metrics server, bounded labels, refreshes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from apphosting import CannotStart

log = logging.getLogger(__name__)

# Where `apphosting dev` serves the first process's metrics (the OpenTelemetry SDK's Prometheus port);
# the others take the next ports.
DEV_METRICS_LISTEN = "127.0.0.1:9464"
# Seconds between two refreshes of the gauges read from a database or from JetStream.
REFRESH_INTERVAL = 5.0
# The most of the time refreshes take: one that took longer than this share of its interval waits longer
# (a count of live deployments grows with the table).
REFRESH_SHARE = 0.02
# The label value for anything outside a label's known values: a label never grows with user input.
OTHER = "other"

# Buckets of operations that take seconds to minutes (placement, vCluster start, rollout, teardown).
LIFECYCLE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
# Buckets of RPCs and HTTP requests, which take milliseconds.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def bounded(value: str, known: Collection[str]) -> str:
    """`value` when it is one of the `known` label values, else OTHER."""
    return value if value in known else OTHER


def registry() -> CollectorRegistry:
    """A process's own registry: several processes in one interpreter (dev, tests) never share series."""
    return CollectorRegistry(auto_describe=True)


def parse_listen(listen: str) -> tuple[str, int]:
    """host:port or [v6]:port → (host, port); ValueError when it is not one."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"a metrics address is host:port, not {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class MetricsServer:
    """Serves one registry at http://ADDR/metrics from a thread, so a scrape never waits on the event loop."""

    def __init__(self, registry: CollectorRegistry, listen: str) -> None:
        self.registry = registry
        self.listen = listen
        self.host, self.port = parse_listen(listen)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> int:
        """Listens and serves; CannotStart when the address cannot be had."""
        try:
            self._server, self._thread = start_http_server(self.port, self.host, self.registry)
        except OSError as exc:
            raise CannotStart(f"cannot serve metrics on {self.listen}: {exc.strerror or exc}") from exc
        self.port = self._server.server_port
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def next_listen(listen: str, offset: int) -> str:
    """The address `offset` ports after `listen` (port 0 stays 0: any free port)."""
    host, port = parse_listen(listen)
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port + offset if port else 0}"


def any_port(listen: str) -> str:
    """`listen` with port 0: any free port on its host."""
    return next_listen(listen, 0).rpartition(":")[0] + ":0"


def port_free(listen: str) -> bool:
    """Whether nothing listens on `listen` now (port 0 is always free)."""
    host, port = parse_listen(listen)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class ConsumerGauges:
    """Pending and redelivered messages of a process's durable JetStream consumers, from consumer info."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("stream", "consumer")
        self.pending = Gauge(
            "apphosting_consumer_pending_messages",
            "Messages in the stream the consumer has not been delivered yet",
            labels,
            registry=registry,
        )
        self.ack_pending = Gauge(
            "apphosting_consumer_ack_pending_messages",
            "Messages delivered to the consumer and not acknowledged yet",
            labels,
            registry=registry,
        )
        self.redelivered = Gauge(
            "apphosting_consumer_redelivered_messages",
            "Messages delivered to the consumer more than once and not acknowledged yet",
            labels,
            registry=registry,
        )

    async def refresh(self, js: JetStreamContext, consumers: Collection[tuple[str, str]]) -> None:
        for stream, durable in consumers:
            try:
                info = await js.consumer_info(stream, durable)
            except Exception as exc:
                # Not made yet, or NATS away: the last values stay, and the next refresh tries again.
                log.debug("consumer info of %s/%s unavailable: %s", stream, durable, exc)
                continue
            self.pending.labels(stream, durable).set(info.num_pending or 0)
            self.ack_pending.labels(stream, durable).set(info.num_ack_pending or 0)
            self.redelivered.labels(stream, durable).set(info.num_redelivered or 0)


@dataclass
class Refresher:
    """Runs the gauge refreshes of a process every `interval` seconds, or less often when they take longer
    than REFRESH_SHARE of that, until stopped; a failing one is logged."""

    refreshes: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    interval: float = REFRESH_INTERVAL
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.refreshes and self._task is None:
            self._task = asyncio.create_task(self._run())

    async def refresh(self) -> None:
        for refresh in self.refreshes:
            try:
                await refresh()
            except Exception as exc:
                log.warning("metrics refresh failed: %s", exc)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            await self.refresh()
            await asyncio.sleep(self.pause(loop.time() - began))

    def pause(self, took: float) -> float:
        """The wait after a refresh that took `took` seconds: `interval`, or as long as keeps refreshes to
        REFRESH_SHARE of the time."""
        return max(self.interval, took * (1.0 / REFRESH_SHARE - 1.0))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
