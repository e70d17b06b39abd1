"""The API process: gRPC server, database, outbox relay, status-event consumer and watch fan-out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, timedelta
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from apphosting import CannotStart, bus, db, metrics, secrets
from apphosting.imageupdates import RegistryAccess
from apphosting.locations import load_locations
from apphosting.netguard import Resolver
from apphosting.registry import RegistryClient
from apphosting.settings import DEFAULT_DATABASE_URL, DEFAULT_LISTEN, Limits
from apphosting.supervise import Backoff, Supervisor
from apphosting.v1 import api_keys_pb2, api_keys_pb2_grpc, bus_pb2, deployments_pb2_grpc
from apphosting.v1 import deployments_pb2 as pb
from services.deployments import defaults
from services.deployments.api_keys import ApiKeyServicer, ApiKeyStore, ApiKeyVerifier
from services.deployments.auth import (
    NOT_CONFIGURED,
    JwtVerifier,
    Unset,
    VerifierChain,
    tls_server_credentials,
)
from services.deployments.calls import CallInterceptor
from services.deployments.capacity import Capacity
from services.deployments.convert import STATUS_NAMES, has, placement_to_json
from services.deployments.metrics import ApiMetrics
from services.deployments.quotas import Quotas
from services.deployments.resync import Resync
from services.deployments.servicer import DeploymentServicer, change_of
from services.deployments.store import (
    SETTABLE,
    UNSENT_MOST,
    Change,
    DeploymentStore,
    EventInput,
    RecordMissing,
    TransitionRejected,
)
from services.deployments.tables import EVENT_HISTORY
from services.deployments.watch import WatchHub

log = logging.getLogger(__name__)

MIGRATIONS = "services.deployments:migrations"
VERSION_TABLE = "alembic_version_deployments"
# An event that arrived before its predecessors comes back after this long (up to MAX_DELIVER times).
EARLY_EVENT_DELAY = 3.0
# Most status events applied in one transaction.
APPLY_BATCH = 128
# How long the outbox relay waits without a wake-up before it reads again (rows another replica wrote
# wake only that replica's relay).
RELAY_POLL_SECONDS = 1.0
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DeploymentService"].full_name
API_KEY_SERVICE_NAME = api_keys_pb2.DESCRIPTOR.services_by_name["ApiKeyService"].full_name


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
    event_history: int = EVENT_HISTORY
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
    # Resync (services/deployments/resync.py): a deployment pending, provisioning or deleting with no
    # change for stuck_after seconds has its request sent again, at most max_redrives times after the
    # owner's last create, retry or delete; then it is moved to error. Looked for at start and every
    # resync_interval seconds. stuck_after is above the longest silence of a healthy job: a step's
    # 600 s timeout plus a 120 s driver call (provisioner RetryPolicy), plus a redelivery's 300 s wait.
    stuck_after: float = defaults.STUCK_AFTER
    resync_interval: float = defaults.RESYNC_INTERVAL
    max_redrives: int = defaults.MAX_REDRIVES
    # How a failed long-lived task (relay, consumer, applier, housekeeping, resync) is restarted.
    restart_backoff: Backoff = field(default_factory=Backoff)
    # A deleted deployment's record and history are kept this many seconds after its teardown ended
    # (Get shows it, a request_id replay finds it, its bytes count in the owner's stored_mb quota),
    # then purged; so deleting and creating again cannot grow the database without bound.
    deleted_retention: float = defaults.DELETED_RETENTION
    # Seconds between two rounds of housekeeping (history trimming, purging deleted records).
    housekeeping_interval: float = 60.0
    # Seconds a new release may take to become healthy before it is rolled back by itself.
    rollout_timeout: float = defaults.ROLLOUT_TIMEOUT
    # host:port serving Prometheus metrics at /metrics (port 0: any free one); None: no metrics server.
    metrics_listen: str | None = None
    # How PreviewImageUpdate reaches registries (the flags the updater takes too).
    registries: RegistryAccess = field(default_factory=RegistryAccess)
    # The key file that seals secret environment values (apphosting/secrets.py); None: only secret_ref
    # entries are accepted.
    secret_key_file: str | None = None


# A status event handed to the applier, and where its outcome goes.
_Applying = tuple[bus_pb2.StatusEvent, "asyncio.Future[Change | Exception | None]"]


class ApplierStopped(Exception):
    """The applier ended before it applied an event; the event's message is redelivered."""


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
        release=event.release,
        release_healthy=event.release_healthy,
        release_failed=event.release_failed,
        record={"placement": placement_to_json(event.placement)} if event.HasField("placement") else {},
    )


def _bind(add_port: Callable[[], int], listen: str) -> int:
    """The port gRPC bound; CannotStart when it could not (taken by another server, or not an address here)."""
    try:
        port = add_port()
    except RuntimeError:
        port = 0
    if port == 0:
        raise CannotStart(f"cannot listen on {listen}: another process serves that port, or it is not an address here")
    return port


class ApiServer:
    """One replica of the API; several may share a database and a NATS cluster."""

    def __init__(self, options: ApiOptions) -> None:
        self.options = options
        self.engine = db.make_engine(options.database_url)
        self.store = DeploymentStore(self.engine)
        self.hub = WatchHub()
        self.health = health.aio.HealthServicer()
        self.port = 0
        # This replica's own registry: replicas and other processes in one interpreter never share series.
        self.registry = metrics.registry()
        self.metrics = ApiMetrics(self.registry, self.store, lambda: self.hub.open_watches)
        self._consumers = metrics.ConsumerGauges(self.registry)
        self._refresher = metrics.Refresher([self.metrics.refresh, self._refresh_consumers])
        self.metrics_server: metrics.MetricsServer | None = None
        self._server: grpc.aio.Server | None = None
        self._nc: Client | None = None
        self._registry_client: RegistryClient | None = None
        self._js: JetStreamContext | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._outbox_ready = asyncio.Event()
        self._stopping = asyncio.Event()
        # Events for the applier; None once nothing will hand it more (stop), after what waits.
        self._applying: asyncio.Queue[_Applying | None] = asyncio.Queue()
        self._applier_task: asyncio.Task[None] | None = None
        self.store.outbox_written = self._outbox_ready.set
        # Every long-lived task; while one is down, health says NOT_SERVING.
        self.supervisor = Supervisor(self._stopping, backoff=options.restart_backoff, on_change=self._health_changed)
        self._serving = False
        # Reports run one at a time, each reading the state afresh: the last one says how it is now.
        self._health_lock = asyncio.Lock()
        self._changes: Any = None
        self._dead_letters: Any = None
        self.resync = Resync(
            self.store,
            on_applied=self._announce_applied,
            stuck_after=options.stuck_after,
            max_redrives=options.max_redrives,
            ready=lambda: self._nc is not None and self._nc.is_connected,
            rollout_timeout=options.rollout_timeout,
        )

    async def start(self) -> int:
        if self.options.auth is NOT_CONFIGURED:
            raise ValueError("ApiOptions.auth must be a JwtVerifier, or None for single-user local mode")
        await db.upgrade(self.engine, MIGRATIONS, VERSION_TABLE)
        locations = load_locations(self.options.locations_file)
        regions = locations.geographic_regions
        self.metrics.known_regions(frozenset(regions))
        try:
            self._registry_client = self.options.registries.client()
        except ValueError as unusable:
            raise CannotStart(f"--registry-credentials-file: {unusable}") from None
        servicer = DeploymentServicer(
            self.store,
            self.hub,
            limits=self.options.limits,
            regions=regions,
            announce=self.announce,
            quotas=self.options.quotas,
            resolver=self.options.resolver,
            locations=locations.locations,
            capacity=Capacity(lambda: self._nc) if self.options.nats_url is not None else None,
            rollout_timeout=self.options.rollout_timeout,
            registry_client=self._registry_client,
            secret_keys=secrets.load_for_start(self.options.secret_key_file),
        )
        api_keys = ApiKeyStore(self.store)
        auth = self.options.auth
        if isinstance(auth, JwtVerifier):
            # `Bearer ahk_...` is checked against the api_keys table; any other token as before.
            auth = VerifierChain([ApiKeyVerifier(api_keys, self._background), auth])
        server = grpc.aio.server(
            interceptors=[CallInterceptor(auth, self.metrics.grpc)],
            options=[
                ("grpc.max_receive_message_length", self.options.max_request_bytes),
                # gRPC's default SO_REUSEPORT would let a second server share a port already served.
                ("grpc.so_reuseport", 0),
            ],
        )
        deployments_pb2_grpc.add_DeploymentServiceServicer_to_server(servicer, server)
        api_keys_pb2_grpc.add_ApiKeyServiceServicer_to_server(ApiKeyServicer(api_keys), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                API_KEY_SERVICE_NAME,
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
            self.port = _bind(lambda: server.add_secure_port(self.options.listen, credentials), self.options.listen)
        elif self.options.tls_client_ca:
            raise ValueError("a client CA (mutual TLS) needs a TLS certificate and key")
        else:
            self.port = _bind(lambda: server.add_insecure_port(self.options.listen), self.options.listen)
        await server.start()
        self._server = server
        if self.options.metrics_listen is not None:
            self.metrics_server = metrics.MetricsServer(self.registry, self.options.metrics_listen)
            self.metrics_server.start()
            # Gauges read from the database and JetStream, only when someone can scrape them.
            self._refresher.start()
        if self.options.nats_url is not None:
            url = self.options.nats_url
            self.supervisor.start("bus connection", lambda: self._bus(url))
        self.supervisor.start("housekeeping", self._housekeeping)
        if self.options.nats_url is not None:
            # Without a bus nothing is sent, so nothing is lost either: no resync.
            self.supervisor.start("resync", lambda: self.resync.run(self.options.resync_interval, self._stopping))
        self._serving = True
        await self._report_health()
        return self.port

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        """Runs `work` beside the calls; shutdown waits for it within the grace period."""
        task = asyncio.create_task(work)
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    def _health_changed(self) -> None:
        task = asyncio.create_task(self._report_health())
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _report_health(self) -> None:
        """SERVING while every supervised task runs; after a graceful shutdown began, set calls are ignored."""
        async with self._health_lock:
            if not self._serving:
                return
            healthy = self.supervisor.healthy
            if not healthy:
                log.warning("not serving: %s down", ", ".join(sorted(self.supervisor.down)))
            status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE_NAME):
                await self.health.set(name, status)

    async def stop(self) -> None:
        self._stopping.set()
        await self.health.enter_graceful_shutdown()
        # Watch streams never finish by themselves: end them first, with where to resume.
        self.hub.close()
        if self._server is not None:
            await self._server.stop(self.options.grace)
        # The consumer and the relay finish what they hold; only then is anything cancelled.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.grace
        tasks = [*self.supervisor.tasks, *self._tasks]
        feeding = [task for task in tasks if task is not self._applier_task]
        if feeding:
            await asyncio.wait(feeding, timeout=self.options.grace)
        if self._applier_task in tasks:
            # Nothing hands the applier events any more: it applies what waits, then ends.
            self._applying.put_nowait(None)
            await asyncio.wait([self._applier_task], timeout=max(0.0, deadline - loop.time()))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._nc is not None and self._nc.is_connected:
            with contextlib.suppress(Exception):
                await self._nc.drain()
        if self._registry_client is not None:
            await self._registry_client.aclose()
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
        """Connects (once: the client reconnects by itself) and starts the supervised bus tasks."""
        nc = self._nc if self._nc is not None else await self._connect(url)
        js = nc.jetstream()
        await bus.ensure_streams(js)
        self._js = js
        if self._changes is None:
            self._changes = await nc.subscribe(bus.CHANGES_SUBJECTS, cb=self._on_change)
        if self._dead_letters is None:
            # A message that ran out of deliveries: its deployment is resynced now, not once it looks stuck.
            self._dead_letters = await nc.subscribe(bus.MAX_DELIVERIES_ADVISORIES, cb=self._on_dead_letter)
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
        self._applier_task = self.supervisor.start("status-event applier", self._applier)
        self.supervisor.start("status-event consumer", consumer.run)
        self.supervisor.start("outbox relay", lambda: self._relay(js))

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
            # Cleared before the read, so a row committed while the read is in flight wakes the next one;
            # a cycle that read fewer rows than it could has left nothing of its own behind.
            self._outbox_ready.clear()
            rows = await self.store.unsent()
            if rows:
                # All in flight at once, sent on one connection in row order; each is marked sent only
                # once JetStream acknowledged it, and a resend of any other is dropped by its Nats-Msg-Id.
                results = await asyncio.gather(
                    *(bus.publish(js, row.subject, row.payload, row.id, row.headers) for row in rows),
                    return_exceptions=True,
                )
                await self.store.mark_sent([row for row, result in zip(rows, results, strict=True) if result is None])
                failures = [result for result in results if isinstance(result, BaseException)]
                if failures:
                    log.warning("outbox relay paused: %s", failures[0])
                    await asyncio.sleep(0.5)
                    continue
                if len(rows) == UNSENT_MOST:
                    continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbox_ready.wait(), timeout=RELAY_POLL_SECONDS)

    async def _refresh_consumers(self) -> None:
        if self._js is not None:
            await self._consumers.refresh(self._js, [(bus.EVENTS_STREAM, bus.API_EVENTS_CONSUMER)])

    async def _on_dead_letter(self, msg: Msg) -> None:
        if self._js is not None:
            await self.resync.dead_letter(self._js, msg)

    async def _on_change(self, msg: Msg) -> None:
        self.hub.notify(pb.WatchDeploymentsResponse.FromString(msg.data))

    def _announce_applied(self, applied: Change) -> None:
        self.announce(change_of(applied))
        for other in applied.also:
            self.announce(change_of(other))

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
            self._announce_applied(applied)
            try:
                await self.metrics.applied(event, applied)
            except Exception as exc:
                log.warning("lifecycle metrics of event %s not observed: %s", event.event_id, exc)
        await msg.ack()

    async def _applier(self) -> None:
        """Applies the events the consumer hands over, as many at once as are waiting, in one commit each.

        One task: this replica applies its events in the order it received them, and a burst of
        events costs one transaction instead of one per event.
        """
        batch: list[_Applying] = []
        ending = False
        try:
            while not ending:
                first = await self._applying.get()
                if first is None:
                    return
                batch = [first]
                while not self._applying.empty() and len(batch) < APPLY_BATCH:
                    waiting = self._applying.get_nowait()
                    if waiting is None:
                        ending = True
                        break
                    batch.append(waiting)
                changes = [(event.deployment_id, event_input(event)) for event, _ in batch]
                try:
                    results: list[Change | Exception | None] = list(await self.store.apply_batch(changes))
                except Exception as exc:
                    log.warning("applying %d status events failed: %s", len(batch), exc)
                    results = [exc] * len(batch)
                for (_, done), result in zip(batch, results, strict=True):
                    if not done.done():
                        done.set_result(result)
                batch = []
        finally:
            # Nobody applies what this applier held or what waits for it: fail each, so its message is
            # nak'ed and comes again, instead of waiting for ever while heartbeats keep it from redelivery.
            while not self._applying.empty():
                if (waiting := self._applying.get_nowait()) is not None:
                    batch.append(waiting)
            gone = ApplierStopped("the status-event applier stopped")
            for _, done in batch:
                if not done.done():
                    done.set_result(gone)

    async def _housekeeping(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.options.housekeeping_interval)
                return
            try:
                await self.store.trim_events(self.options.event_history)
                await self.store.purge_deleted(timedelta(seconds=self.options.deleted_retention))
            except Exception as exc:
                log.warning("housekeeping failed: %s", exc)


async def serve(options: ApiOptions, stop: asyncio.Event) -> None:
    """Runs the API until `stop` is set, then shuts down gracefully."""
    server = ApiServer(options)
    port = await server.start()
    host = options.listen.rsplit(":", 1)[0]
    log.info("DeploymentService listening on %s:%d", host, port)
    print(f"api: gRPC DeploymentService on {host}:{port}", flush=True)
    if server.metrics_server is not None:
        print(f"api: metrics on {server.metrics_server.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()
