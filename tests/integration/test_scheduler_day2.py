"""The scheduler's day-2 work through a real nats-server and database: pinned placement and its
explanation, adoption, forwarded update/stop/start jobs, stopped deployments, and capacity request/reply."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from sqlalchemy import select

from apphosting import bus
from apphosting.v1 import bus_pb2
from apphosting.v1 import deployments_pb2 as pb
from scheduler.placement import Demand
from scheduler.service import Scheduler
from scheduler.tables import LedgerClock
from tests.support.stack import Stack, eventually, publish


def _location(location_id: str, *, cpu: float = 4.0, healthy: bool = True, weight: float = 0.0) -> dict[str, Any]:
    return {
        "id": location_id,
        "provider": "test",
        "region": f"r-{location_id}",
        "geographic_region": "eu",
        "capacity": {"cpu": cpu, "memory_mb": 8192, "storage_gb": 100, "vclusters": 10},
        "healthy": healthy,
        "weight": weight,
    }


# eu-a wins an unpinned placement by its weight; eu-sick is never a candidate.
LOCATIONS = [_location("eu-a", weight=1.0), _location("eu-b"), _location("eu-sick", healthy=False)]


def _deployment(**fields: Any) -> pb.Deployment:
    fields.setdefault("id", str(uuid.uuid4()))
    fields.setdefault("geographic_region", "eu")
    fields.setdefault("cpu_request", 1.0)
    fields.setdefault("memory_request_mb", 512)
    fields.setdefault("replicas", 1)
    fields.setdefault("storage_size_gb", 10)
    return pb.Deployment(**fields)


class Bus:
    """A test's own connection: publishes requests and events, and hears every event and job."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.events: list[bus_pb2.StatusEvent] = []
        self.jobs: list[tuple[str, bus_pb2.ProvisionJob]] = []

    async def listen(self) -> None:
        async def on_event(msg: Msg) -> None:
            self.events.append(bus_pb2.StatusEvent.FromString(msg.data))

        async def on_job(msg: Msg) -> None:
            self.jobs.append((msg.subject, bus_pb2.ProvisionJob.FromString(msg.data)))

        await self.nc.subscribe(bus.EVENTS_SUBJECTS, cb=on_event)
        await self.nc.subscribe(bus.JOBS_SUBJECTS, cb=on_job)
        await self.nc.flush()

    async def request(self, operation: Any, deployment: pb.Deployment, **fields: Any) -> str:
        request_id = str(uuid.uuid4())
        message = bus_pb2.PlacementRequest(
            request_id=request_id, operation=operation, deployment=deployment, **fields
        ).SerializeToString()
        await publish(self.js, bus.PLACEMENT_SUBJECT, message, request_id)
        return request_id

    async def event(
        self, deployment_id: str, match: Callable[[bus_pb2.StatusEvent], bool] = lambda e: True
    ) -> bus_pb2.StatusEvent:
        found: list[bus_pb2.StatusEvent] = []

        async def heard() -> bool:
            found[:] = [e for e in self.events if e.deployment_id == deployment_id and match(e)]
            return bool(found)

        await eventually(heard, within=60)
        return found[0]

    async def job(self, deployment_id: str, operation: Any) -> tuple[str, bus_pb2.ProvisionJob]:
        found: list[tuple[str, bus_pb2.ProvisionJob]] = []

        async def heard() -> bool:
            found[:] = [(s, j) for s, j in self.jobs if j.deployment.id == deployment_id and j.operation == operation]
            return bool(found)

        await eventually(heard, within=60)
        return found[0]

    async def ask(self, request: bus_pb2.CapacityRequest | bytes) -> bus_pb2.CapacityReply:
        """A capacity request as the API makes it; retried only until a scheduler has subscribed."""
        payload = request if isinstance(request, bytes) else request.SerializeToString()
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            try:
                reply = await self.nc.request(bus.CAPACITY_SUBJECT, payload, timeout=30)
            except (NoRespondersError, NatsTimeoutError):
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.1)
                continue
            return bus_pb2.CapacityReply.FromString(reply.data)


@asynccontextmanager
async def _bus(stack: Stack) -> AsyncIterator[Bus]:
    nc = await nats.connect(stack.nats.url)
    try:
        wire = Bus(nc)
        # Requests published before the scheduler declared the streams would find none.
        await bus.ensure_streams(wire.js)
        await wire.listen()
        yield wire
    finally:
        await nc.drain()


async def _placed(wire: Bus, scheduler: Scheduler, deployment: pb.Deployment) -> bus_pb2.StatusEvent:
    """Creates the deployment through the scheduler and waits until it holds its capacity."""
    await wire.request(bus_pb2.OPERATION_CREATE, deployment, release=1)
    return await wire.event(deployment.id, lambda e: e.phase == "placement")


# --- placement ---------------------------------------------------------------------------------


@pytest.mark.locations(LOCATIONS)
async def test_a_pinned_create_is_placed_on_its_location_and_explained(stack: Stack) -> None:
    scheduler = stack.add_scheduler()
    async with _bus(stack) as wire:
        deployment = _deployment(target_location="eu-b")
        await wire.request(bus_pb2.OPERATION_CREATE, deployment, release=1)
        placed = await wire.event(deployment.id)
        assert placed.status == pb.DEPLOYMENT_STATUS_PROVISIONING
        assert placed.location_id == "eu-b"
        assert placed.release == 1
        explanation = placed.placement
        assert explanation.chosen_location_id == "eu-b"
        assert {c.location_id: (c.chosen, c.reason) for c in explanation.candidates} == {
            "eu-b": (True, ""),
            "eu-a": (False, "not the pinned location"),
            "eu-sick": (False, "not the pinned location"),
        }
        subject, job = await wire.job(deployment.id, bus_pb2.OPERATION_CREATE)
        assert subject == bus.job_subject("eu-b")
        assert job.release == 1
        holding = await scheduler.ledger.holding(deployment.id)
        assert holding == ("eu-b", Demand(cpu=1.0, memory_mb=512, storage_gb=10, vclusters=1))


@pytest.mark.locations(LOCATIONS)
async def test_an_unpinned_create_explains_every_candidate(stack: Stack) -> None:
    stack.add_scheduler()
    async with _bus(stack) as wire:
        deployment = _deployment()
        await wire.request(bus_pb2.OPERATION_CREATE, deployment)
        explanation = (await wire.event(deployment.id)).placement
        assert explanation.chosen_location_id == "eu-a"
        assert [(c.location_id, c.reason) for c in explanation.candidates] == [
            ("eu-a", ""),
            ("eu-b", "lower score"),
            ("eu-sick", "unhealthy"),
        ]
        assert explanation.candidates[0].weight == 1.0
        assert explanation.candidates[0].score > explanation.candidates[1].score


@pytest.mark.locations(LOCATIONS)
@pytest.mark.parametrize(
    ("pinned", "cpu", "why"),
    [
        ("eu-sick", 1.0, "location eu-sick is unhealthy"),
        ("eu-nowhere", 1.0, "unknown location 'eu-nowhere'"),
        ("eu-b", 4.5, "location eu-b is short of cpu by 0.5"),
    ],
)
async def test_a_pinned_create_that_cannot_go_there_is_refused_saying_why(
    stack: Stack, pinned: str, cpu: float, why: str
) -> None:
    scheduler = stack.add_scheduler()
    async with _bus(stack) as wire:
        deployment = _deployment(target_location=pinned, cpu_request=cpu)
        await wire.request(bus_pb2.OPERATION_CREATE, deployment, release=1)
        refused = await wire.event(deployment.id)
        assert refused.status == pb.DEPLOYMENT_STATUS_FAILED
        assert refused.error_message == why
        assert refused.placement.refusal == why
        assert refused.placement.chosen_location_id == ""
        assert await scheduler.ledger.holding(deployment.id) is None
        assert wire.jobs == []


@pytest.mark.locations(LOCATIONS)
async def test_an_adoption_is_pinned_takes_no_vcluster_slot_and_sends_an_adopt_job(stack: Stack) -> None:
    scheduler = stack.add_scheduler()
    async with _bus(stack) as wire:
        deployment = _deployment(target_location="eu-b", is_adopted=True, source_namespace="legacy")
        await wire.request(bus_pb2.OPERATION_ADOPT, deployment, release=1)
        placed = await wire.event(deployment.id)
        assert placed.location_id == "eu-b"
        subject, adopt = await wire.job(deployment.id, bus_pb2.OPERATION_ADOPT)
        assert adopt.deployment.is_adopted
        assert subject == bus.job_subject("eu-b")
        holding = await scheduler.ledger.holding(deployment.id)
        assert holding == ("eu-b", Demand(cpu=1.0, memory_mb=512, storage_gb=10, vclusters=0))


# --- forwarded jobs and stopped deployments ----------------------------------------------------


@pytest.mark.locations(LOCATIONS)
async def test_update_stop_and_start_go_to_the_deployments_location(stack: Stack) -> None:
    scheduler = stack.add_scheduler()
    async with _bus(stack) as wire:
        deployment = _deployment(target_location="eu-b")
        await _placed(wire, scheduler, deployment)
        # The record's location, not a new placement: eu-a would win one.
        await wire.request(bus_pb2.OPERATION_UPDATE, deployment, release=2, rollout_timeout_seconds=45.0)
        await wire.request(bus_pb2.OPERATION_STOP, deployment, release=2)
        await wire.request(bus_pb2.OPERATION_START, deployment, release=3)
        await wire.request(bus_pb2.OPERATION_DELETE, deployment, release=3, force=True)
        subject, update = await wire.job(deployment.id, bus_pb2.OPERATION_UPDATE)
        assert subject == bus.job_subject("eu-b")
        assert (update.release, update.rollout_timeout_seconds, update.location.id) == (2, 45.0, "eu-b")
        subject, stop = await wire.job(deployment.id, bus_pb2.OPERATION_STOP)
        assert (subject, stop.release) == (bus.job_subject("eu-b"), 2)
        subject, start = await wire.job(deployment.id, bus_pb2.OPERATION_START)
        assert (subject, start.release) == (bus.job_subject("eu-b"), 3)
        subject, delete = await wire.job(deployment.id, bus_pb2.OPERATION_DELETE)
        assert (subject, delete.release, delete.force) == (bus.job_subject("eu-b"), 3, True)
        assert len({job.job_id for _, job in wire.jobs}) == len(wire.jobs)


async def _tick(scheduler: Scheduler) -> int:
    """The ledger clock: it moves with every transaction that changes what locations hold."""
    async with scheduler.engine.connect() as conn:
        tick = await conn.scalar(select(LedgerClock.tick))
    assert tick is not None
    return int(tick)


@pytest.mark.locations(LOCATIONS)
async def test_an_update_holds_a_new_demand_and_writes_nothing_when_the_demand_is_unchanged(stack: Stack) -> None:
    scheduler = stack.add_scheduler()
    async with _bus(stack) as wire:
        deployment = _deployment(target_location="eu-b", docker_image="shop:1")
        await _placed(wire, scheduler, deployment)
        placed = await _tick(scheduler)
        deployment.docker_image = "shop:2"
        await wire.request(bus_pb2.OPERATION_UPDATE, deployment, release=2)
        _, update = await wire.job(deployment.id, bus_pb2.OPERATION_UPDATE)
        assert (update.release, update.deployment.docker_image) == (2, "shop:2")
        assert await _tick(scheduler) == placed
        deployment.cpu_request = 2.0
        await wire.request(bus_pb2.OPERATION_UPDATE, deployment, release=3)

        async def forwarded() -> bool:
            return any(job.release == 3 for _, job in wire.jobs)

        # The job goes out after the reservation's commit.
        await eventually(forwarded, within=60)
        grown = Demand(cpu=2.0, memory_mb=512, storage_gb=10, vclusters=1)
        assert await scheduler.ledger.holding(deployment.id) == ("eu-b", grown)
        assert await _tick(scheduler) == placed + 1


@pytest.mark.locations(LOCATIONS)
async def test_an_update_of_a_deployment_on_no_location_fails_its_release(stack: Stack) -> None:
    stack.add_scheduler()
    async with _bus(stack) as wire:
        deployment = _deployment(status=pb.DEPLOYMENT_STATUS_RUNNING)
        await wire.request(bus_pb2.OPERATION_UPDATE, deployment, release=2)
        event = await wire.event(deployment.id)
        assert event.release_failed
        assert event.release == 2
        assert "on no configured location" in event.error_message


@pytest.mark.locations(LOCATIONS)
async def test_a_stopped_deployment_keeps_storage_and_its_slot_but_frees_cpu_and_memory(stack: Stack) -> None:
    scheduler = stack.add_scheduler()
    async with _bus(stack) as wire:
        deployment = _deployment(target_location="eu-b")
        await _placed(wire, scheduler, deployment)
        stopped = bus_pb2.StatusEvent(
            event_id=str(uuid.uuid4()),
            deployment_id=deployment.id,
            status=pb.DEPLOYMENT_STATUS_STOPPED,
            phase="stopped",
            source="test",
        )
        await publish(wire.js, bus.event_subject(deployment.id), stopped.SerializeToString(), stopped.event_id)
        kept = ("eu-b", Demand(cpu=0.0, memory_mb=0, storage_gb=10, vclusters=1))

        async def freed() -> bool:
            return await scheduler.ledger.holding(deployment.id) == kept

        await eventually(freed, within=60)


# --- capacity request/reply --------------------------------------------------------------------


@pytest.mark.locations(LOCATIONS)
async def test_explain_says_where_a_deployment_would_go_and_holds_nothing(stack: Stack) -> None:
    scheduler = stack.add_scheduler()
    async with _bus(stack) as wire:
        explain = bus_pb2.CAPACITY_MODE_EXPLAIN
        reply = await wire.ask(bus_pb2.CapacityRequest(mode=explain, deployment=_deployment(id="")))
        assert reply.fits
        assert reply.explanation.chosen_location_id == "eu-a"
        assert [c.reason for c in reply.explanation.candidates] == ["", "lower score", "unhealthy"]
        pinned = await wire.ask(bus_pb2.CapacityRequest(mode=explain, deployment=_deployment(), location_id="eu-b"))
        assert pinned.explanation.chosen_location_id == "eu-b"
        too_big = await wire.ask(bus_pb2.CapacityRequest(mode=explain, deployment=_deployment(cpu_request=5.0)))
        assert not too_big.fits
        assert too_big.message.startswith("no location in 'eu' has room for cpu 5.0")
        assert too_big.explanation.refusal == too_big.message
        assert await scheduler.ledger.used() == {}


@pytest.mark.locations(LOCATIONS)
async def test_check_and_reserve_count_what_the_deployment_holds_as_free(stack: Stack) -> None:
    scheduler = stack.add_scheduler()
    async with _bus(stack) as wire:
        deployment = _deployment(target_location="eu-b", cpu_request=3.0)
        await _placed(wire, scheduler, deployment)
        deployment.location_id = "eu-b"
        check, reserve = bus_pb2.CAPACITY_MODE_CHECK, bus_pb2.CAPACITY_MODE_RESERVE
        # 3 held of 4: growing to 4 fits only because its own 3 count as free.
        grown = pb.Deployment()
        grown.CopyFrom(deployment)
        grown.cpu_request = 4.0
        assert (await wire.ask(bus_pb2.CapacityRequest(mode=check, deployment=grown))).fits
        assert (await scheduler.ledger.holding(deployment.id)) == (
            "eu-b",
            Demand(cpu=3.0, memory_mb=512, storage_gb=10, vclusters=1),
        )
        grown.cpu_request = 4.5
        short = await wire.ask(bus_pb2.CapacityRequest(mode=check, deployment=grown))
        assert not short.fits
        assert short.message == "location eu-b is short of cpu by 0.5"
        grown.cpu_request = 4.0
        for _ in range(2):  # set, not add
            assert (await wire.ask(bus_pb2.CapacityRequest(mode=reserve, deployment=grown))).fits
        held = Demand(cpu=4.0, memory_mb=512, storage_gb=10, vclusters=1)
        assert await scheduler.ledger.holding(deployment.id) == ("eu-b", held)
        # A stopped deployment asks for its storage only.
        grown.status = pb.DEPLOYMENT_STATUS_STOPPED
        assert (await wire.ask(bus_pb2.CapacityRequest(mode=reserve, deployment=grown))).fits
        assert await scheduler.ledger.holding(deployment.id) == ("eu-b", Demand(0.0, 0, 10, 1))


@pytest.mark.locations(LOCATIONS)
async def test_bad_capacity_requests_are_answered_and_the_responder_keeps_going(stack: Stack) -> None:
    stack.add_scheduler()
    async with _bus(stack) as wire:
        check = bus_pb2.CAPACITY_MODE_CHECK
        no_id = await wire.ask(bus_pb2.CapacityRequest(mode=check, deployment=_deployment(id="")))
        assert not no_id.fits
        assert "no deployment id" in no_id.message
        unknown = await wire.ask(bus_pb2.CapacityRequest(mode=check, deployment=_deployment(location_id="eu-nowhere")))
        assert not unknown.fits
        assert "unknown location 'eu-nowhere'" in unknown.message
        nowhere = await wire.ask(bus_pb2.CapacityRequest(mode=check, deployment=_deployment()))
        assert not nowhere.fits
        assert "on no location" in nowhere.message
        garbage = await wire.ask(b"\xff\xff\xff not a protobuf")
        assert not garbage.fits
        assert "could not answer" in garbage.message
        unspecified = await wire.ask(bus_pb2.CapacityRequest(deployment=_deployment(location_id="eu-b")))
        assert not unspecified.fits
        fine = await wire.ask(bus_pb2.CapacityRequest(mode=check, deployment=_deployment(location_id="eu-b")))
        assert fine.fits


@pytest.mark.locations([_location("eu-a", cpu=4.0)])
async def test_concurrent_reserves_on_two_schedulers_never_overbook(stack: Stack) -> None:
    first = stack.add_scheduler()
    async with _bus(stack) as wire:
        reserve = bus_pb2.CAPACITY_MODE_RESERVE
        # The second replica starts once the first has migrated the database: two first-time
        # migrations of one SQLite file at once collide in db.upgrade.
        await wire.ask(bus_pb2.CapacityRequest(mode=reserve, deployment=_deployment(id="")))
        second = stack.add_scheduler()

        async def connected() -> bool:
            return second._js is not None

        await eventually(connected, within=60)
        deployments = [_deployment(location_id="eu-a", cpu_request=1.0) for _ in range(10)]
        replies = await asyncio.gather(
            *(wire.ask(bus_pb2.CapacityRequest(mode=reserve, deployment=d)) for d in deployments)
        )
        assert sum(reply.fits for reply in replies) == 4
        assert all("short of cpu by 1.0" in reply.message for reply in replies if not reply.fits)
        assert await first.ledger.used() == {"eu-a": Demand(cpu=4.0, memory_mb=2048, storage_gb=40, vclusters=4)}


@pytest.mark.locations(LOCATIONS)
async def test_the_responder_answers_again_after_nats_restarts(stack: Stack) -> None:
    stack.add_scheduler()
    explain = bus_pb2.CapacityRequest(mode=bus_pb2.CAPACITY_MODE_EXPLAIN, deployment=_deployment())
    async with _bus(stack) as wire:
        assert (await wire.ask(explain)).fits
    stack.nats.stop()
    stack.nats.start()
    async with _bus(stack) as wire:
        # No responders until the scheduler's client has reconnected and renewed its subscription.
        assert (await wire.ask(explain)).fits
