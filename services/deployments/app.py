"""The API process: gRPC server, database, outbox relay, status-event consumer and watch fan-out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from apphosting import bus, db
from apphosting.locations import load_locations
from apphosting.netguard import Resolver
from apphosting.settings import DEFAULT_DATABASE_URL, DEFAULT_LISTEN, Limits
from apphosting.v1 import bus_pb2, deployments_pb2_grpc
from apphosting.v1 import deployments_pb2 as pb
from services.deployments.auth import (
    NOT_CONFIGURED,
    AuthInterceptor,
    JwtVerifier,
    Unset,
    tls_server_credentials,
)
from services.deployments.convert import STATUS_NAMES, has
from services.deployments.quotas import Quotas
from services.deployments.servicer import DeploymentServicer, change_of
from services.deployments.store import (
    SETTABLE,
    Change,
    DeploymentStore,
    EventInput,
    RecordMissing,
    TransitionRejected,
)
from services.deployments.watch import WatchHub

log = logging.getLogger(__name__)

MIGRATIONS = "services.deployments:migrations"
VERSION_TABLE = "alembic_version_deployments"
# An event that arrived before its predecessors comes back after this long (up to MAX_DELIVER times).
EARLY_EVENT_DELAY = 3.0
# Most status events applied in one transaction.
APPLY_BATCH = 128
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DeploymentService"].full_name


@dataclass
class ApiOptions:
    listen: str = DEFAULT_LISTEN
    database_url: str = DEFAULT_DATABASE_URL
    # None: run without a bus (records are kept and sent once a bus is configured).
    nats_url: str | None = "nats://127.0.0.1:4222"
    locations_file: str | None = None
    limits: Limits = field(default_factory=Limits)
    # Seconds in-flight RPCs get to finish on shutdown.
    grace: float = 5.0
    # Events kept per deployment for resuming watches.
    event_history: int = 1000
    # Who may call: a JwtVerifier, or None for single-user local mode (every call is one local user,
    # no token). Left unset, the server refuses to start: no authentication only when asked for.
    auth: JwtVerifier | Unset | None = NOT_CONFIGURED
    quotas: Quotas = field(default_factory=Quotas)
    # TLS (PEM files); with tls_client_ca, mutual TLS. Without tls_cert the port is plaintext.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    # Larger requests are refused by gRPC (RESOURCE_EXHAUSTED) before they are decoded; every field
    # has its own smaller bound, so a request under this one that is too big is INVALID_ARGUMENT.
    max_request_bytes: int = 1 << 20
    # Resolves helm_repo_url host names at create time (None: the system resolver); tests stub it.
    resolver: Resolver | None = None


def event_input(event: bus_pb2.StatusEvent) -> EventInput:
    return EventInput(
        event_id=event.event_id,
        status=STATUS_NAMES[event.status],
        phase=event.phase,
        message=event.message,
        source=event.source,
        simulated=event.simulated,
        final=event.final,
        time=event.time.ToDatetime(tzinfo=UTC) if event.HasField("time") else None,
        fields={name: getattr(event, name) for name in SETTABLE if has(event, name)},
    )


class ApiServer:
    """One replica of the API; several may share a database and a NATS cluster."""

    def __init__(self, options: ApiOptions) -> None:
        self.options = options
        self.engine = db.make_engine(options.database_url)
        self.store = DeploymentStore(self.engine)
        self.hub = WatchHub()
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._outbox_ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._applying: asyncio.Queue[tuple[bus_pb2.StatusEvent, asyncio.Future[Change | Exception | None]]] = (
            asyncio.Queue()
        )
        self.store.outbox_written = self._outbox_ready.set

    async def start(self) -> int:
        if self.options.auth is NOT_CONFIGURED:
            raise ValueError("ApiOptions.auth must be a JwtVerifier, or None for single-user local mode")
        await db.upgrade(self.engine, MIGRATIONS, VERSION_TABLE)
        regions = load_locations(self.options.locations_file).geographic_regions
        servicer = DeploymentServicer(
            self.store,
            self.hub,
            limits=self.options.limits,
            regions=regions,
            announce=self.announce,
            quotas=self.options.quotas,
            resolver=self.options.resolver,
        )
        server = grpc.aio.server(
            interceptors=[AuthInterceptor(self.options.auth)],
            options=[
                ("grpc.max_receive_message_length", self.options.max_request_bytes),
                # gRPC's default SO_REUSEPORT would let a second server share a port already served.
                ("grpc.so_reuseport", 0),
            ],
        )
        deployments_pb2_grpc.add_DeploymentServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        if self.options.tls_cert or self.options.tls_key:
            if not (self.options.tls_cert and self.options.tls_key):
                raise ValueError("TLS needs both a certificate and its key")
            credentials = tls_server_credentials(
                self.options.tls_cert, self.options.tls_key, self.options.tls_client_ca
            )
            self.port = server.add_secure_port(self.options.listen, credentials)
        elif self.options.tls_client_ca:
            raise ValueError("a client CA (mutual TLS) needs a TLS certificate and key")
        else:
            self.port = server.add_insecure_port(self.options.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.options.listen}")
        await server.start()
        self._server = server
        if self.options.nats_url is not None:
            self._tasks.append(asyncio.create_task(self._bus(self.options.nats_url)))
        self._tasks.append(asyncio.create_task(self._housekeeping()))
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self) -> None:
        self._stopping.set()
        await self.health.enter_graceful_shutdown()
        # Watch streams never finish by themselves: end them first, with where to resume.
        self.hub.close()
        if self._server is not None:
            await self._server.stop(self.options.grace)
        # The consumer and the relay finish what they hold; only then is anything cancelled.
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.options.grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._nc is not None and self._nc.is_connected:
            with contextlib.suppress(Exception):
                await self._nc.drain()
        await self.engine.dispose()

    async def wait(self) -> None:
        await self._stopping.wait()

    def announce(self, change: pb.WatchDeploymentsResponse) -> None:
        """Hands an applied change to this replica's watches and, over NATS, to every other replica's."""
        self.hub.notify(change)
        if self._nc is not None and self._nc.is_connected:
            task = asyncio.create_task(
                self._nc.publish(bus.change_subject(change.deployment.id), change.SerializeToString())
            )
            self._tasks.append(task)
            task.add_done_callback(self._tasks.remove)

    async def _bus(self, url: str) -> None:
        nc = await self._connect(url)
        js = nc.jetstream()
        await bus.ensure_streams(js)
        self._js = js
        await nc.subscribe(bus.CHANGES_SUBJECTS, cb=self._on_change)
        consumer = bus.Consumer(
            js,
            bus.EVENTS_STREAM,
            bus.API_EVENTS_CONSUMER,
            bus.EVENTS_SUBJECTS,
            self._on_event,
            # Enough in hand to fill the applier's batches.
            concurrency=APPLY_BATCH,
            stopping=self._stopping,
        )
        applier = asyncio.create_task(self._applier())
        try:
            await asyncio.gather(consumer.run(), self._relay(js))
        finally:
            applier.cancel()

    async def _connect(self, url: str) -> Client:
        delay = 0.2
        while True:
            if self._stopping.is_set():
                raise asyncio.CancelledError
            try:
                # no_echo: this replica's own change announcements reach its watches directly.
                nc = await bus.connect(url, "apphosting-api", no_echo=True, reconnected_cb=self._reconnected)
                self._nc = nc
                return nc
            except Exception as exc:
                log.warning("NATS at %s unreachable (%s); requests are kept until it is back", url, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _reconnected(self) -> None:
        # Announcements from other replicas may have been missed while away.
        self.hub.resync()
        self._outbox_ready.set()

    async def _relay(self, js: JetStreamContext) -> None:
        """Sends outbox rows; each is marked sent only after JetStream stored it."""
        while not self._stopping.is_set():
            rows = await self.store.unsent()
            if not rows:
                self._outbox_ready.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._outbox_ready.wait(), timeout=1.0)
                continue
            # All in flight at once, sent on one connection in row order; each is marked sent only
            # once JetStream acknowledged it, and a resend of any other is dropped by its Nats-Msg-Id.
            results = await asyncio.gather(
                *(bus.publish(js, row.subject, row.payload, row.id) for row in rows), return_exceptions=True
            )
            await self.store.mark_sent([row.seq for row, result in zip(rows, results, strict=True) if result is None])
            failures = [result for result in results if isinstance(result, BaseException)]
            if failures:
                log.warning("outbox relay paused: %s", failures[0])
                await asyncio.sleep(0.5)

    async def _on_change(self, msg: Msg) -> None:
        self.hub.notify(pb.WatchDeploymentsResponse.FromString(msg.data))

    async def _on_event(self, msg: Msg) -> None:
        event = bus_pb2.StatusEvent.FromString(msg.data)
        done: asyncio.Future[Change | Exception | None] = asyncio.get_running_loop().create_future()
        await self._applying.put((event, done))
        applied = await done
        if isinstance(applied, TransitionRejected):
            if applied.early:
                # Its predecessors are held by another replica or wait for redelivery: apply it after them.
                await msg.nak(delay=EARLY_EVENT_DELAY)
                return
            log.warning("status event %s for %s refused: %s", event.event_id, event.deployment_id, applied)
            await msg.term()
            return
        if isinstance(applied, RecordMissing):
            log.warning("status event %s for an unknown deployment %s: dropped", event.event_id, applied)
            await msg.term()
            return
        if isinstance(applied, Exception):
            raise applied
        if applied is not None:
            self.announce(change_of(applied))
        await msg.ack()

    async def _applier(self) -> None:
        """Applies the events the consumer hands over, as many at once as are waiting, in one commit each.

        One task: this replica applies its events in the order it received them, and a burst of
        events costs one transaction instead of one per event.
        """
        while True:
            batch = [await self._applying.get()]
            while not self._applying.empty() and len(batch) < APPLY_BATCH:
                batch.append(self._applying.get_nowait())
            changes = [(event.deployment_id, event_input(event)) for event, _ in batch]
            try:
                results: list[Change | Exception | None] = list(await self.store.apply_batch(changes))
            except Exception as exc:
                log.warning("applying %d status events failed: %s", len(batch), exc)
                results = [exc] * len(batch)
            for (_, done), result in zip(batch, results, strict=True):
                if not done.done():
                    done.set_result(result)

    async def _housekeeping(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=60)
                return
            try:
                await self.store.trim_events(self.options.event_history)
            except Exception as exc:
                log.warning("housekeeping failed: %s", exc)


async def serve(options: ApiOptions, stop: asyncio.Event) -> None:
    """Runs the API until `stop` is set, then shuts down gracefully."""
    server = ApiServer(options)
    port = await server.start()
    host = options.listen.rsplit(":", 1)[0]
    log.info("DeploymentService listening on %s:%d", host, port)
    print(f"api: gRPC DeploymentService on {host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()
