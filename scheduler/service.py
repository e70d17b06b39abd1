"""The scheduler process: turns placement requests into provisioning jobs and holds capacity."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

from nats.aio.msg import Msg

from apphosting import bus, db
from apphosting.locations import LocationConfig, load_locations
from apphosting.settings import DEFAULT_DATABASE_URL
from apphosting.v1 import bus_pb2
from apphosting.v1 import deployments_pb2 as pb
from scheduler.ledger import Ledger
from scheduler.placement import Placed, demand_of

log = logging.getLogger(__name__)

SOURCE = "scheduler"
# Statuses after which a deployment holds no capacity any more.
_RELEASING = frozenset({pb.DEPLOYMENT_STATUS_FAILED, pb.DEPLOYMENT_STATUS_ERROR})
_IDS = uuid.UUID("6a0d0f55-4a4e-4d8f-a1b4-0c2c61f0e2d1")


def _derived_id(*parts: str) -> str:
    """The same inputs give the same id, so a redelivered request republishes what JetStream drops."""
    return str(uuid.uuid5(_IDS, "/".join(parts)))


@dataclass
class SchedulerOptions:
    nats_url: str = "nats://127.0.0.1:4222"
    database_url: str = DEFAULT_DATABASE_URL
    locations_file: str | None = None


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

    def subscriptions(self) -> list[bus.Subscription]:
        return [
            bus.Subscription(bus.REQUESTS_STREAM, bus.SCHEDULER_CONSUMER, bus.PLACEMENT_SUBJECT, self._on_request),
            bus.Subscription(bus.EVENTS_STREAM, bus.SCHEDULER_EVENTS_CONSUMER, bus.EVENTS_SUBJECTS, self._on_event),
        ]

    async def prepare(self) -> None:
        await self.ledger.create_tables()

    async def close(self) -> None:
        await self.engine.dispose()

    async def _on_request(self, msg: Msg) -> None:
        request = bus_pb2.PlacementRequest.FromString(msg.data)
        deployment = request.deployment
        async with self._locks.hold(deployment.id):
            if request.operation == bus_pb2.OPERATION_CREATE:
                await self._place(request)
            elif request.operation == bus_pb2.OPERATION_DELETE:
                await self._tear_down(request)
            else:
                log.warning("placement request %s has no operation; dropped", request.request_id)
        await msg.ack()

    async def _place(self, request: bus_pb2.PlacementRequest) -> None:
        deployment = request.deployment
        placement = await self.ledger.reserve(deployment.id, deployment.geographic_region, demand_of(deployment))
        if not isinstance(placement, Placed):
            await self._emit(
                bus_pb2.StatusEvent(
                    event_id=_derived_id(request.request_id, "refused"),
                    deployment_id=deployment.id,
                    status=pb.DEPLOYMENT_STATUS_FAILED,
                    phase="placement",
                    message=placement.message,
                    error_message=placement.message,
                )
            )
            return
        location = placement.location
        # The event goes first, so the service hears of the placement before any provisioner step.
        await self._emit(
            bus_pb2.StatusEvent(
                event_id=_derived_id(request.request_id, "placed"),
                deployment_id=deployment.id,
                status=pb.DEPLOYMENT_STATUS_PROVISIONING,
                phase="placement",
                message=f"placed on {location.id} ({location.provider} {location.region})",
                provider=location.provider,
                region=location.region,
                location_id=location.id,
                cluster_status="provisioning",
            )
        )
        await self._send_job(request, location)

    async def _tear_down(self, request: bus_pb2.PlacementRequest) -> None:
        deployment = request.deployment
        location_id = await self.ledger.location_of(deployment.id) or deployment.location_id
        location = self._by_id.get(location_id) if location_id else None
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
        await msg.ack()


async def serve(options: SchedulerOptions, stop: asyncio.Event) -> None:
    scheduler = Scheduler(options)
    print(f"scheduler: {len(scheduler.locations)} locations, NATS {options.nats_url}", flush=True)
    await scheduler.serve(stop)
