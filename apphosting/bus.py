"""NATS JetStream: the streams, subjects and consumers that carry requests, jobs and status events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import (
    ConnectionClosedError,
    ConnectionReconnectingError,
    FlushTimeoutError,
    NoRespondersError,
    OutboundBufferLimitError,
    StaleConnectionError,
)
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NoStreamResponseError, NotFoundError, ServiceUnavailableError

from apphosting import tracing
from apphosting.supervise import Supervisor

log = logging.getLogger(__name__)

# Placement requests, scheduler-bound: one subject, a work queue.
REQUESTS_STREAM = "APPHOSTING_REQUESTS"
PLACEMENT_SUBJECT = "apphosting.requests.placement"
# Provisioning jobs, addressed to the provisioners of one location: apphosting.jobs.<location id>.
JOBS_STREAM = "APPHOSTING_JOBS"
JOBS_SUBJECTS = "apphosting.jobs.*"
# Status events, from the scheduler and the provisioners: apphosting.events.<deployment id>.
EVENTS_STREAM = "APPHOSTING_EVENTS"
EVENTS_SUBJECTS = "apphosting.events.*"
# Core NATS (not stored): every API replica announces what it applied, so all replicas' watches hear it.
CHANGES_SUBJECTS = "apphosting.changes.*"
# Core NATS request/reply: CapacityRequest -> CapacityReply, answered by one scheduler replica of the group.
CAPACITY_SUBJECT = "apphosting.scheduler.capacity"
CAPACITY_QUEUE = "scheduler"

# JetStream announces here each message that reached its last delivery: ….<stream>.<consumer>.
MAX_DELIVERIES_ADVISORIES = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>"

SCHEDULER_CONSUMER = "scheduler"
SCHEDULER_EVENTS_CONSUMER = "scheduler-events"
API_EVENTS_CONSUMER = "api-events"

# Redelivery: a message neither acked nor reported in progress within its ack wait is delivered
# again. With a backoff list JetStream takes the n-th entry as the ack wait of the n-th delivery
# (the first entry replaces ACK_WAIT), so a worker that died holds its message for 10 s, and a
# message that keeps failing waits longer each time; MAX_DELIVER ends a poison message's loop.
ACK_WAIT = 10.0
MAX_DELIVER = 10
BACKOFF = [ACK_WAIT, 15.0, 30.0, 60.0, 60.0, 120.0, 120.0, 300.0, 300.0, 300.0]
# How long one pull request stays open on the server for messages still to come; a consumer
# also notices a stop within this. Past PULL_GRACE more without any answer it is asked again.
PULL_WAIT = 1.0
PULL_GRACE = 1.0
# Long handlers report progress this often, well inside the ack wait.
HEARTBEAT = ACK_WAIT / 3
# A handler that failed because NATS itself did not answer (a stream with no leader while a cluster
# elects one, a node lost, a reconnect) is run again in place, holding its message, after a wait that
# doubles from BUS_AWAY_RETRY up to BUS_AWAY_RETRY_CAP; only after BUS_AWAY_PATIENCE is the message
# handed back, spending one of its MAX_DELIVER deliveries. An election on a loaded machine takes
# longer than MAX_DELIVER quick redeliveries, which dropped messages that nothing was wrong with.
BUS_AWAY_RETRY = 0.5
BUS_AWAY_RETRY_CAP = 5.0
BUS_AWAY_PATIENCE = 300.0
# Window in which JetStream drops a second publish with the same Nats-Msg-Id.
DUPLICATE_WINDOW = 600.0
WEEK = 7 * 24 * 3600.0


def job_subject(location_id: str) -> str:
    return f"apphosting.jobs.{location_id}"


def event_subject(deployment_id: str) -> str:
    return f"apphosting.events.{deployment_id}"


def change_subject(deployment_id: str) -> str:
    return f"apphosting.changes.{deployment_id}"


def provisioner_consumer(location_id: str) -> str:
    return f"provisioner-{location_id}"


def _streams(storage: StorageType) -> list[StreamConfig]:
    common: dict[str, Any] = {
        "storage": storage,
        "duplicate_window": DUPLICATE_WINDOW,
        "discard": DiscardPolicy.OLD,
    }
    return [
        # Work queues: a message is gone once its one consumer acked it.
        StreamConfig(
            name=REQUESTS_STREAM,
            subjects=[PLACEMENT_SUBJECT],
            retention=RetentionPolicy.WORK_QUEUE,
            max_age=WEEK,
            **common,
        ),
        StreamConfig(
            name=JOBS_STREAM,
            subjects=[JOBS_SUBJECTS],
            retention=RetentionPolicy.WORK_QUEUE,
            max_age=WEEK,
            **common,
        ),
        # Kept for a week whether acked or not: the audit trail of what every worker reported.
        StreamConfig(
            name=EVENTS_STREAM,
            subjects=[EVENTS_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            max_age=WEEK,
            **common,
        ),
    ]


@dataclass(frozen=True)
class NatsSecurity:
    """How a process proves itself to NATS and checks the server: a credentials file (JWT + nkey seed)
    or an nkey seed, and TLS with the server's CA and, for mutual TLS, a client certificate."""

    creds_file: str | None = None
    nkey_seed_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    def options(self) -> dict[str, Any]:
        """Keyword arguments for nats.connect."""
        options: dict[str, Any] = {}
        if self.creds_file:
            options["user_credentials"] = self.creds_file
        if self.nkey_seed_file:
            options["nkeys_seed"] = self.nkey_seed_file
        if self.tls_cert_file and not self.tls_key_file:
            raise ValueError("a NATS TLS client certificate needs its key (--nats-tls-key)")
        if self.tls_ca_file or self.tls_cert_file:
            context = ssl.create_default_context(cafile=self.tls_ca_file)
            if self.tls_cert_file:
                context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
            options["tls"] = context
        return options


# Set once by the command line for every connection of the process (api, scheduler, provisioner).
_security = NatsSecurity()


def use_security(security: NatsSecurity) -> None:
    """Makes every later `connect` of this process use these credentials and TLS settings."""
    global _security
    _security = security


async def _log_error(error: Exception) -> None:
    # One line per problem: the client's default logs a full traceback for every reconnect attempt.
    log.warning("NATS: %s", error or type(error).__name__)


def server_urls(url: str) -> list[str]:
    """The servers of a comma-separated list (`nats://a:4222,nats://b:4222`): the seeds of a cluster."""
    urls = [part.strip() for part in url.split(",") if part.strip()]
    if not urls:
        raise ValueError(f"no NATS server in {url!r}")
    return urls


# How a client notices a server that stopped answering without closing its connections (frozen, cut
# off by the network): a ping every PING_INTERVAL, and the connection is given up after
# MAX_OUTSTANDING_PINGS unanswered, then the client moves to another server of the cluster. The
# client's defaults (2 minutes, 2 pings) would leave a process stuck on a lost node for 4 minutes.
PING_INTERVAL = 5
MAX_OUTSTANDING_PINGS = 3


async def connect(url: str, name: str, *, security: NatsSecurity | None = None, **options: Any) -> Client:
    """Connects with reconnects for ever, across every server of `url` (one URL or a comma-separated
    list) and those the cluster announces: a process outlives NATS restarts and the loss of a node."""
    options.setdefault("error_cb", _log_error)
    return await nats.connect(
        servers=server_urls(url),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=True,
        ping_interval=PING_INTERVAL,
        max_outstanding_pings=MAX_OUTSTANDING_PINGS,
        **(security or _security).options(),
        **options,
    )


# Set once by the command line (--stream-replicas); None: 3 on a clustered server, 1 on a lone one.
_stream_replicas: int | None = None
CLUSTER_REPLICAS = 3


def use_stream_replicas(replicas: int | None) -> None:
    """Makes every later `ensure_streams` of this process ask for this many replicas (None: by the server)."""
    if replicas is not None and not 1 <= replicas <= 5:
        raise ValueError(f"stream replicas must be 1 to 5, got {replicas}")
    global _stream_replicas
    _stream_replicas = replicas


def default_replicas(server_info: Mapping[str, Any]) -> int:
    """3 when the server is part of a cluster (its INFO names one), 1 otherwise (dev, tests)."""
    return CLUSTER_REPLICAS if server_info.get("cluster") else 1


async def ensure_streams(
    js: JetStreamContext, *, storage: StorageType = StorageType.FILE, replicas: int | None = None
) -> None:
    """Declares every stream; safe to run from every process at every start.

    The replica count asked is `replicas`, else the process's --stream-replicas, else the server's
    default. A stream that exists with another replica count is kept as it is, with a warning naming
    it: changing replicas moves a stream's data between nodes, and recreating it would drop the
    messages in flight, so that is the operator's call (`nats stream edit --replicas`), made once,
    not a side effect of whichever process starts first. Refusing to start instead would turn a
    durability shortfall into an outage of every process at once, including during a rolling upgrade
    that changes the setting.
    """
    if replicas is None:
        replicas = _stream_replicas
    if replicas is None:
        replicas = default_replicas(_server_info(js))
    for config in _streams(storage):
        config.num_replicas = replicas
        try:
            await js.add_stream(config)
        except BadRequestError:
            # It exists with another configuration: bring the rest up to date, keep its replicas.
            assert config.name is not None
            existing = await js.stream_info(config.name)
            kept = existing.config.num_replicas or 1
            if kept != replicas:
                log.warning(
                    "stream %s has %d replicas, %d asked: kept as it is (change it with "
                    "`nats stream edit %s --replicas %d`)",
                    config.name,
                    kept,
                    replicas,
                    config.name,
                    replicas,
                )
                config.num_replicas = kept
            await js.update_stream(config)


async def _until_declared(js: JetStreamContext, stopping: asyncio.Event, *, replicas: int | None = None) -> None:
    """Declares the streams (as `ensure_streams`), again until it works: on a cluster the JetStream API does
    not answer while the nodes elect a meta leader, which is no reason for a worker to die."""
    delay = 0.5
    while True:
        try:
            await ensure_streams(js, replicas=replicas)
            return
        except Exception as exc:
            if stopping.is_set():
                raise
            log.warning("streams not declared yet (%s); trying again in %g s", exc or type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _server_info(js: JetStreamContext) -> Mapping[str, Any]:
    """The INFO of the server the context's connection talks to; the client keeps it unexported."""
    info: Mapping[str, Any] = getattr(getattr(js, "_nc", None), "_server_info", None) or {}
    return info


async def ensure_consumer(js: JetStreamContext, stream: str, durable: str, filter_subject: str) -> None:
    config = ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT,
        max_deliver=MAX_DELIVER,
        backoff=BACKOFF,
        filter_subject=filter_subject,
        max_ack_pending=1000,
    )
    try:
        await js.add_consumer(stream, config)
    except BadRequestError:
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(stream, durable)
        await js.add_consumer(stream, config)


async def publish(
    js: JetStreamContext, subject: str, payload: bytes, msg_id: str, headers: Mapping[str, str] | None = None
) -> None:
    """Publishes with Nats-Msg-Id, so a repeat (a retry, a resend after a crash) is stored once.

    The message carries the trace and log context: `headers` kept with it when it was made (an
    outbox row's), else the current one (W3C traceparent, deployment and request ids).
    """
    sent = {"Nats-Msg-Id": msg_id}
    if headers:
        sent.update(headers)
    else:
        tracing.inject(sent)
    await js.publish(subject, payload, headers=sent, timeout=5.0)


Handler = Callable[[Msg], Awaitable[None]]

# What the client raises when NATS, not the request, is the problem: no server or stream leader
# answered, or the connection is being replaced.
_BUS_AWAY: tuple[type[Exception], ...] = (
    NoRespondersError,
    NoStreamResponseError,
    ServiceUnavailableError,
    NatsTimeoutError,
    FlushTimeoutError,
    ConnectionClosedError,
    ConnectionReconnectingError,
    StaleConnectionError,
    OutboundBufferLimitError,
)


def bus_away(error: BaseException) -> bool:
    """True when `error` says NATS did not answer (worth waiting for), not that the work is wrong."""
    return isinstance(error, _BUS_AWAY)


class ConsumerGone(Exception):
    """The durable consumer a Consumer pulls from was deleted."""


@dataclass
class Consumer:
    """Pulls from a durable consumer and runs a handler per message until stopped.

    The handler acks (or naks, or terms) the message itself; when it raises, the message is
    nak'ed with a delay and comes again, up to MAX_DELIVER times.
    """

    js: JetStreamContext
    stream: str
    durable: str
    filter_subject: str
    handler: Handler
    batch: int = 32
    concurrency: int = 1
    # Shared by the consumers of one process, so a stop asked for during start-up is not lost.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # On stop, hand the messages being handled back at once (nak) instead of finishing them:
    # for long handlers, whose work another worker resumes.
    hand_back: bool = False

    def __post_init__(self) -> None:
        self._stopping = self.stopping
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(self.concurrency)
        # Messages the pull request in flight may still deliver; it ends when they all came, or when
        # the server says it expired (or could not be served), or when nothing answered in time.
        self._owed = 0
        self._pull_ended = asyncio.Event()
        self._trouble: str | None = None
        self._room = asyncio.Event()

    async def run(self) -> None:
        await ensure_consumer(self.js, self.stream, self.durable, self.filter_subject)
        nc = _client(self.js)
        inbox = nc.new_inbox()
        pull_subject = f"{_api_prefix(self.js)}.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}"
        # One long-lived pull at a time: the server hands over at once what is waiting, then each
        # message as it is stored, until the batch is full or the pull expires. A fetch instead
        # costs a request per round, and a batch fetch waits for its batch or its timeout.
        sub = await nc.subscribe(inbox, cb=self._delivered)
        wake = asyncio.create_task(self._wake_on_stop())
        try:
            while not self._stopping.is_set():
                # Ask only for what there is room for: a message that waits here for a slot is not
                # handled, and its ack wait runs.
                while self._slots.locked() and not self._stopping.is_set():
                    self._room.clear()
                    await self._room.wait()
                # Handlers that end together (an applier's batch) free their slots before counting.
                await asyncio.sleep(0)
                want = max(1, min(self.batch, self.concurrency - len(self._tasks)))
                self._owed = want
                self._trouble = None
                self._pull_ended.clear()
                request = {"batch": want, "expires": int(PULL_WAIT * 1_000_000_000)}
                try:
                    await nc.publish(pull_subject, json.dumps(request).encode(), reply=inbox)
                    await asyncio.wait_for(self._pull_ended.wait(), PULL_WAIT + PULL_GRACE)
                except (TimeoutError, NatsTimeoutError):
                    # No answer at all (a reconnect lost the request, a server restarted): ask again.
                    continue
                except Exception as exc:
                    self._trouble = str(exc) or type(exc).__name__
                if self._trouble is not None and not self._stopping.is_set():
                    log.warning("pull from %s/%s failed: %s", self.stream, self.durable, self._trouble)
                    await self._check_consumer()
                    await asyncio.sleep(0.5)
        finally:
            wake.cancel()
            if self.hand_back:
                for task in self._tasks:
                    task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _wake_on_stop(self) -> None:
        await self._stopping.wait()
        self._pull_ended.set()
        self._room.set()

    async def _delivered(self, msg: Msg) -> None:
        """Takes what the pull delivers: a message starts its handler at once; a status ends the pull."""
        status = msg.headers.get(_STATUS) if msg.headers else None
        if status is None:
            self._owed -= 1
            if self._owed <= 0:
                self._pull_ended.set()
            await self._slots.acquire()
            if self._stopping.is_set():
                # Nobody is going to handle it here: hand it back now, not after the ack wait.
                self._slots.release()
                with contextlib.suppress(Exception):
                    await msg.nak()
                return
            task = asyncio.create_task(self._handle(msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        if status == _IDLE_HEARTBEAT:
            return
        if status not in (_NO_MESSAGES, _REQUEST_TIMEOUT):
            # 409 (consumer deleted, leadership change, too many pulls waiting), 503 (no JetStream).
            description = msg.headers.get(_DESCRIPTION, "") if msg.headers else ""
            self._trouble = f"{status} {description}".strip()
        self._pull_ended.set()

    async def _check_consumer(self) -> None:
        """Raises ConsumerGone when the durable consumer no longer exists (deleted, or lost with the
        server's state): pulling again would fail for ever, and a restart of run() declares it anew."""
        try:
            await self.js.consumer_info(self.stream, self.durable)
        except NotFoundError as exc:
            raise ConsumerGone(f"consumer {self.stream}/{self.durable} no longer exists") from exc
        except Exception as exc:
            # NATS itself is away: the client reconnects, and the pulls resume.
            log.debug("consumer %s/%s not checked: %s", self.stream, self.durable, exc)

    async def _handle(self, msg: Msg) -> None:
        beating = _Heartbeat(msg)
        try:
            # The handler's spans and log lines continue the trace and deployment of the publisher.
            with tracing.consuming(f"{self.durable} process", msg.headers, self._span_attributes(msg)) as span:
                try:
                    await self._run_handler(msg)
                    log.debug("handled %s from %s", msg.subject, self.durable)
                except Exception as failure:
                    tracing.record(span, failure)
                    log.exception("handler for %s failed; the message will be redelivered", msg.subject)
                    with contextlib.suppress(Exception):
                        await msg.nak(delay=1.0)
        except asyncio.CancelledError:
            # Handed back: redelivered now, not after the ack wait.
            with contextlib.suppress(Exception):
                await msg.nak()
            if not self._stopping.is_set():
                raise
        finally:
            beating.stop()
            self._slots.release()
            self._room.set()

    async def _run_handler(self, msg: Msg) -> None:
        """Runs the handler, again in place while it fails because NATS did not answer: the message
        keeps its deliveries for failures of its own. Handlers are idempotent, as for any redelivery."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + BUS_AWAY_PATIENCE
        delay = BUS_AWAY_RETRY
        while True:
            try:
                await self.handler(msg)
                return
            except Exception as failure:
                if not bus_away(failure) or self._stopping.is_set() or loop.time() + delay > give_up:
                    raise
                log.warning(
                    "handler for %s from %s: NATS did not answer (%s); running it again in %g s",
                    msg.subject,
                    self.durable,
                    failure or type(failure).__name__,
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, BUS_AWAY_RETRY_CAP)

    def _span_attributes(self, msg: Msg) -> dict[str, Any]:
        return {
            "messaging.system": "nats",
            "messaging.operation.type": "process",
            "messaging.destination.name": msg.subject,
            "messaging.consumer.group.name": self.durable,
        }


class _Heartbeat:
    """Tells JetStream, every HEARTBEAT while a message is handled, that it is still being worked on,
    so it is not given to another worker. A timer, not a task: most handlers end long before it fires."""

    __slots__ = ("_msg", "_sending", "_timer")

    def __init__(self, msg: Msg) -> None:
        self._msg = msg
        self._sending: asyncio.Task[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(HEARTBEAT, self._beat)

    def _beat(self) -> None:
        self._sending = asyncio.create_task(self._send())
        self._timer = asyncio.get_running_loop().call_later(HEARTBEAT, self._beat)

    async def _send(self) -> None:
        with contextlib.suppress(Exception):
            await self._msg.in_progress()

    def stop(self) -> None:
        self._timer.cancel()


# The status a pull request's answer carries in its headers instead of a message.
_STATUS = "Status"
_DESCRIPTION = "Description"
_IDLE_HEARTBEAT = "100"
_NO_MESSAGES = "404"
_REQUEST_TIMEOUT = "408"


def _client(js: JetStreamContext) -> Client:
    """The connection a JetStream context uses; the client keeps it unexported."""
    nc: Client = getattr(js, "_nc")  # noqa: B009
    return nc


def _api_prefix(js: JetStreamContext) -> str:
    """The JetStream API prefix ($JS.API, or a domain's) of a context; the client keeps it unexported."""
    prefix: str = getattr(js, "_prefix", "$JS.API")
    return prefix


def last_delivery(msg: Msg) -> bool:
    """True when JetStream will not deliver this message again if this attempt fails."""
    return msg.metadata.num_delivered >= MAX_DELIVER


class KeyedLocks:
    """One lock per key (a deployment id), kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


@dataclass(frozen=True)
class Subscription:
    """What a worker consumes: a durable consumer on a stream, and the handler for its messages."""

    stream: str
    durable: str
    filter_subject: str
    handler: Handler
    concurrency: int = 8
    hand_back: bool = False


@dataclass(frozen=True)
class CoreSubscription:
    """A core NATS (not stored) subscription of a worker, in a queue group: requests it answers."""

    subject: str
    queue: str
    handler: Handler


class Worker:
    """A process that consumes from JetStream until stopped: the scheduler and the provisioners."""

    def __init__(self, nats_url: str, name: str) -> None:
        self.nats_url = nats_url
        self.name = name
        self._js: JetStreamContext | None = None
        self._stopping = asyncio.Event()

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError(f"{self.name} is not connected")
        return self._js

    def subscriptions(self) -> list[Subscription]:
        raise NotImplementedError

    def core_subscriptions(self) -> list[CoreSubscription]:
        """Core NATS subscriptions alongside the consumers; the client renews them after a reconnect."""
        return []

    async def prepare(self) -> None:
        """Runs before consuming starts (migrations, caches)."""

    async def close(self) -> None:
        """Runs after consuming ended."""

    async def run(self) -> None:
        await self.prepare()
        nc = await connect(self.nats_url, self.name)
        self._js = nc.jetstream()
        await _until_declared(self._js, self._stopping)
        for core in self.core_subscriptions():
            await nc.subscribe(core.subject, queue=core.queue, cb=core.handler)
        consumers = [
            Consumer(
                self._js,
                s.stream,
                s.durable,
                s.filter_subject,
                s.handler,
                concurrency=s.concurrency,
                stopping=self._stopping,
                hand_back=s.hand_back,
            )
            for s in self.subscriptions()
        ]
        # A consumer that fails (its database away, a NATS error at start) is restarted, not fatal.
        supervisor = Supervisor(self._stopping)
        for consumer in consumers:
            supervisor.start(f"{self.name} consumer {consumer.durable}", consumer.run)
        try:
            await asyncio.gather(*supervisor.tasks)
        finally:
            with contextlib.suppress(Exception):
                await nc.drain()
            await self.close()

    def stop(self) -> None:
        """Asks the worker to finish the messages it holds and stop; safe before run() got going."""
        self._stopping.set()

    async def serve(self, stop: asyncio.Event) -> None:
        """Runs until `stop` is set (or the worker fails), then stops gracefully."""
        task = asyncio.create_task(self.run())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        self.stop()
        stopped.cancel()
        await task
