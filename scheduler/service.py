"""The scheduler process: turns placement requests into provisioning jobs and holds capacity."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from dataclasses import dataclass

from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge

from apphosting import bus, db, metrics, phases
from apphosting.locations import LocationConfig, load_locations
from apphosting.settings import DEFAULT_DATABASE_URL
from apphosting.v1 import bus_pb2
from apphosting.v1 import deployments_pb2 as pb
from scheduler.ledger import Ledger
from scheduler.placement import Demand, Placed, demand_of

log = logging.getLogger(__name__)

SOURCE = "scheduler"
# Statuses after which a deployment holds no capacity any more.
_RELEASING = frozenset({pb.DEPLOYMENT_STATUS_FAILED, pb.DEPLOYMENT_STATUS_ERROR})
# Operations carried out where the deployment already is.
_FORWARDED = frozenset({bus_pb2.OPERATION_UPDATE, bus_pb2.OPERATION_STOP, bus_pb2.OPERATION_START})
# Placement requests handled at once: those waiting for the ledger are placed in one transaction.
REQUESTS_AT_ONCE = 32
_IDS = uuid.UUID("6a0d0f55-4a4e-4d8f-a1b4-0c2c61f0e2d1")


def _derived_id(*parts: str) -> str:
    """The same inputs give the same id, so a redelivered request republishes what JetStream drops."""
    return str(uuid.uuid5(_IDS, "/".join(parts)))


@dataclass
class SchedulerOptions:
    nats_url: str = "nats://127.0.0.1:4222"
    database_url: str = DEFAULT_DATABASE_URL
    locations_file: str | None = None
    # host:port serving Prometheus metrics at /metrics (port 0: any free one); None: no metrics server.
    metrics_listen: str | None = None


class Scheduler(bus.Worker):
    """Consumes placement requests (a durable consumer shared by all scheduler replicas)."""

    def __init__(self, options: SchedulerOptions) -> None:
        super().__init__(options.nats_url, "apphosting-scheduler")
        self.options = options
        self.locations = load_locations(options.locations_file).locations
        self._by_id = {location.id: location for location in self.locations}
        self.engine = db.make_engine(options.database_url)
        self.ledger = Ledger(self.engine, self.locations)
        self._locks = bus.KeyedLocks()
        self.registry = metrics.registry()
        self._consumers = metrics.ConsumerGauges(self.registry)
        labels = ("location", "resource")
        self._capacity_used = Gauge(
            "apphosting_scheduler_capacity_used",
            "Capacity reserved on a location (cpu in cores, memory_mb, storage_gb, vclusters)",
            labels,
            registry=self.registry,
        )
        self._capacity_free = Gauge(
            "apphosting_scheduler_capacity_free",
            "Capacity still free on a location (cpu in cores, memory_mb, storage_gb, vclusters)",
            labels,
            registry=self.registry,
        )
        self._capacity_total = Gauge(
            "apphosting_scheduler_capacity",
            "Capacity a location has in all (cpu in cores, memory_mb, storage_gb, vclusters)",
            labels,
            registry=self.registry,
        )
        self._placements = Counter(
            "apphosting_scheduler_placements_total",
            "Placement decisions by outcome (placed, refused)",
            ("outcome",),
            registry=self.registry,
        )
        for outcome in ("placed", "refused"):
            self._placements.labels(outcome)
        self._refresher = metrics.Refresher([self._refresh_capacity, self._refresh_consumers])
        self.metrics_server: metrics.MetricsServer | None = None

    def start_metrics(self) -> metrics.MetricsServer | None:
        """Serves /metrics when options.metrics_listen says where (once; run() calls it too)."""
        if self.options.metrics_listen is not None and self.metrics_server is None:
            self.metrics_server = metrics.MetricsServer(self.registry, self.options.metrics_listen)
            self.metrics_server.start()
        return self.metrics_server

    async def run(self) -> None:
        self.start_metrics()
        try:
            await super().run()
        finally:
            await self._refresher.stop()
            if self.metrics_server is not None:
                self.metrics_server.stop()
                self.metrics_server = None

    async def _refresh_capacity(self) -> None:
        used = await self.ledger.used()
        for location in self.locations:
            held = used.get(location.id)
            capacity = location.capacity
            for resource in ("cpu", "memory_mb", "storage_gb", "vclusters"):
                total = float(getattr(capacity, resource))
                taken = float(getattr(held, resource)) if held is not None else 0.0
                self._capacity_total.labels(location.id, resource).set(total)
                self._capacity_used.labels(location.id, resource).set(taken)
                self._capacity_free.labels(location.id, resource).set(max(0.0, total - taken))

    async def _refresh_consumers(self) -> None:
        if self._js is not None:
            await self._consumers.refresh(
                self._js,
                [
                    (bus.REQUESTS_STREAM, bus.SCHEDULER_CONSUMER),
                    (bus.EVENTS_STREAM, bus.SCHEDULER_EVENTS_CONSUMER),
                ],
            )

    def subscriptions(self) -> list[bus.Subscription]:
        return [
            bus.Subscription(
                bus.REQUESTS_STREAM,
                bus.SCHEDULER_CONSUMER,
                bus.PLACEMENT_SUBJECT,
                self._on_request,
                concurrency=REQUESTS_AT_ONCE,
            ),
            bus.Subscription(bus.EVENTS_STREAM, bus.SCHEDULER_EVENTS_CONSUMER, bus.EVENTS_SUBJECTS, self._on_event),
        ]

    def core_subscriptions(self) -> list[bus.CoreSubscription]:
        return [bus.CoreSubscription(bus.CAPACITY_SUBJECT, bus.CAPACITY_QUEUE, self._on_capacity)]

    async def prepare(self) -> None:
        await self.ledger.create_tables()
        if self.metrics_server is not None:
            # Once the ledger's tables exist: the capacity gauges read them.
            self._refresher.start()

    async def close(self) -> None:
        await self.engine.dispose()

    async def _on_request(self, msg: Msg) -> None:
        request = bus_pb2.PlacementRequest.FromString(msg.data)
        deployment = request.deployment
        async with self._locks.hold(deployment.id):
            if request.operation in (bus_pb2.OPERATION_CREATE, bus_pb2.OPERATION_ADOPT):
                await self._place(request)
            elif request.operation == bus_pb2.OPERATION_DELETE:
                await self._tear_down(request)
            elif request.operation in _FORWARDED:
                await self._forward(request)
            else:
                log.warning("placement request %s has no operation; dropped", request.request_id)
        await msg.ack()

    async def _place(self, request: bus_pb2.PlacementRequest) -> None:
        deployment = request.deployment
        demand = demand_of(deployment)
        pinned = deployment.target_location if deployment.HasField("target_location") else None
        if request.operation == bus_pb2.OPERATION_ADOPT:
            # The namespace exists on one host cluster already, and no vCluster is built for it.
            demand = dataclasses.replace(demand, vclusters=0)
            pinned = pinned or (deployment.location_id if deployment.HasField("location_id") else None)
        if request.operation == bus_pb2.OPERATION_ADOPT and not pinned:
            message = "an adoption names the location of its namespace (target_location); this one names none"
            await self._refuse(request, message, pb.PlacementExplanation(refusal=message))
            return
        explained = await self.ledger.place(deployment.id, deployment.geographic_region, demand, pinned or None)
        placement = explained.placement
        if not isinstance(placement, Placed):
            self._placements.labels("refused").inc()
            await self._refuse(request, placement.message, explained.explanation)
            return
        self._placements.labels("placed").inc()
        location = placement.location
        # The event goes first, so the service hears of the placement before any provisioner step.
        await self._emit(
            bus_pb2.StatusEvent(
                event_id=_derived_id(request.request_id, "placed"),
                deployment_id=deployment.id,
                status=pb.DEPLOYMENT_STATUS_PROVISIONING,
                phase=phases.PLACEMENT,
                message=f"placed on {location.id} ({location.provider} {location.region})",
                provider=location.provider,
                region=location.region,
                location_id=location.id,
                cluster_status="provisioning",
                release=request.release,
                placement=explained.explanation,
            )
        )
        await self._send_job(request, location)

    async def _refuse(
        self, request: bus_pb2.PlacementRequest, message: str, explanation: pb.PlacementExplanation
    ) -> None:
        await self._emit(
            bus_pb2.StatusEvent(
                event_id=_derived_id(request.request_id, "refused"),
                deployment_id=request.deployment.id,
                status=pb.DEPLOYMENT_STATUS_FAILED,
                phase=phases.PLACEMENT,
                message=message,
                error_message=message,
                release=request.release,
                placement=explanation,
            )
        )

    async def _location_of(self, deployment: pb.Deployment) -> tuple[LocationConfig | None, Demand | None]:
        """The location the deployment is on, and what it holds there (None: nothing held)."""
        held = await self.ledger.holding(deployment.id)
        location_id = held[0] if held is not None else deployment.location_id
        location = self._by_id.get(location_id) if location_id else None
        return location, held[1] if held is not None and location is not None else None

    async def _tear_down(self, request: bus_pb2.PlacementRequest) -> None:
        deployment = request.deployment
        location, _ = await self._location_of(deployment)
        if location is None:
            # Nothing was built anywhere: the deletion is complete as it stands.
            await self._emit(
                bus_pb2.StatusEvent(
                    event_id=_derived_id(request.request_id, "deleted"),
                    deployment_id=deployment.id,
                    status=pb.DEPLOYMENT_STATUS_DELETING,
                    phase="deleted",
                    message="deleted; nothing had been provisioned",
                    final=True,
                )
            )
            await self.ledger.release(deployment.id)
            return
        await self._send_job(request, location)

    async def _forward(self, request: bus_pb2.PlacementRequest) -> None:
        """An update, stop or start goes to the provisioners of the location the deployment is on."""
        deployment = request.deployment
        location, holds = await self._location_of(deployment)
        if location is not None:
            demand = demand_of(deployment)
            if request.operation == bus_pb2.OPERATION_UPDATE and holds != demand:
                # The API held a user's new release before it was written; an automatic rollback was not
                # asked through it, so the release's demand is held here, when it fits (never overbook).
                # A release needing what is held already (a new image) changes nothing in the ledger.
                held = await self.ledger.set_reservation(deployment.id, location.id, demand)
                if not isinstance(held.placement, Placed):
                    log.warning(
                        "release %d of %s does not fit its location %s: %s",
                        request.release,
                        deployment.id,
                        location.id,
                        held.placement.message,
                    )
            await self._send_job(request, location)
            return
        operation = bus_pb2.Operation.Name(request.operation).removeprefix("OPERATION_").lower()
        message = f"cannot {operation} deployment {deployment.id}: it is on no configured location"
        event = bus_pb2.StatusEvent(
            event_id=_derived_id(request.request_id, "unplaced"),
            deployment_id=deployment.id,
            status=deployment.status,
            phase=phases.PLACEMENT,
            message=message,
            error_message=message,
            release=request.release,
        )
        if request.operation == bus_pb2.OPERATION_STOP:
            # Nothing runs anywhere, so nothing is left to stop: the stop is done.
            event.status = pb.DEPLOYMENT_STATUS_STOPPED
            event.phase = "stopped"
            event.ClearField("error_message")
        else:
            # The release cannot roll out; the service rolls back (or reports) as for any failed release.
            event.release_failed = True
        await self._emit(event)

    async def _send_job(self, request: bus_pb2.PlacementRequest, location: LocationConfig) -> None:
        job = bus_pb2.ProvisionJob(
            job_id=_derived_id(request.request_id, "job"),
            operation=request.operation,
            deployment=request.deployment,
            location=bus_pb2.Location(
                id=location.id,
                provider=location.provider,
                region=location.region,
                geographic_region=location.geographic_region,
            ),
            release=request.release,
            rollout_timeout_seconds=request.rollout_timeout_seconds,
            force=request.force,
            sealed_secrets=request.sealed_secrets,
        )
        await bus.publish(self.js, bus.job_subject(location.id), job.SerializeToString(), job.job_id)

    async def _emit(self, event: bus_pb2.StatusEvent) -> None:
        event.source = SOURCE
        event.time.GetCurrentTime()
        await bus.publish(self.js, bus.event_subject(event.deployment_id), event.SerializeToString(), event.event_id)

    async def _on_event(self, msg: Msg) -> None:
        """Frees capacity once a deployment is gone or has failed; a retry places it afresh."""
        event = bus_pb2.StatusEvent.FromString(msg.data)
        if event.final or event.status in _RELEASING:
            await self.ledger.release(event.deployment_id)
        elif event.status == pb.DEPLOYMENT_STATUS_STOPPED:
            await self.ledger.stop(event.deployment_id)
        await msg.ack()

    async def _on_capacity(self, msg: Msg) -> None:
        """Answers a CapacityRequest; whatever goes wrong, the asker gets a reply rather than a timeout."""
        try:
            reply = await self._capacity(bus_pb2.CapacityRequest.FromString(msg.data))
        except Exception as exc:
            log.exception("capacity request on %s failed", msg.subject)
            reply = bus_pb2.CapacityReply(fits=False, message=f"the scheduler could not answer: {exc}")
        if msg.reply:
            try:
                await msg.respond(reply.SerializeToString())
            except Exception:
                log.exception("capacity reply to %s not sent", msg.reply)

    async def _capacity(self, request: bus_pb2.CapacityRequest) -> bus_pb2.CapacityReply:
        deployment = request.deployment
        demand = demand_of(deployment)
        if request.mode == bus_pb2.CAPACITY_MODE_EXPLAIN:
            explained = await self.ledger.explain(deployment.geographic_region, demand, request.location_id or None)
        elif request.mode in (bus_pb2.CAPACITY_MODE_CHECK, bus_pb2.CAPACITY_MODE_RESERVE):
            if not deployment.id:
                return bus_pb2.CapacityReply(fits=False, message="the capacity request names no deployment id")
            location_id = deployment.location_id or await self.ledger.location_of(deployment.id)
            if not location_id:
                return bus_pb2.CapacityReply(
                    fits=False, message=f"deployment {deployment.id} is on no location: nothing to check capacity on"
                )
            if request.mode == bus_pb2.CAPACITY_MODE_CHECK:
                explained = await self.ledger.check(deployment.id, location_id, demand)
            else:
                explained = await self.ledger.set_reservation(deployment.id, location_id, demand)
        else:
            return bus_pb2.CapacityReply(fits=False, message=f"unknown capacity mode {request.mode}")
        placement = explained.placement
        if isinstance(placement, Placed):
            return bus_pb2.CapacityReply(fits=True, explanation=explained.explanation)
        return bus_pb2.CapacityReply(fits=False, message=placement.message, explanation=explained.explanation)


async def serve(options: SchedulerOptions, stop: asyncio.Event) -> None:
    scheduler = Scheduler(options)
    print(f"scheduler: {len(scheduler.locations)} locations, NATS {options.nats_url}", flush=True)
    if (served := scheduler.start_metrics()) is not None:
        print(f"scheduler: metrics on {served.url}", flush=True)
    await scheduler.serve(stop)
