"""Every bus message delivered many times has one effect, and an event that overtook its
predecessors waits for them instead of being lost."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import nats
from sqlalchemy import func, select

from apphosting import bus
from apphosting.v1 import bus_pb2
from apphosting.v1 import deployments_pb2 as pb
from provisioner.simulated import SimulatedDriver
from scheduler.tables import Reservation
from services.deployments.convert import row_to_proto
from services.deployments.servicer import placement_outbox
from services.deployments.tables import EventRow
from tests.e2e.test_pipeline import SETTLED, request, watch
from tests.support.stack import Stack, eventually, publish

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub as Stub


async def publish_again(stack: Stack, subject: str, payload: bytes, times: int) -> None:
    """Publishes with a new Nats-Msg-Id each time, so JetStream stores every copy: true redeliveries."""
    nc = await nats.connect(stack.nats.url)
    try:
        js = nc.jetstream()
        for _ in range(times):
            await publish(js, subject, payload, str(uuid.uuid4()))
    finally:
        await nc.drain()


def status_event(deployment_id: str, status: Any, phase: str, event_id: str | None = None) -> bus_pb2.StatusEvent:
    event = bus_pb2.StatusEvent(
        event_id=event_id or str(uuid.uuid4()),
        deployment_id=deployment_id,
        status=status,
        phase=phase,
        message=f"test {phase}",
        source="test",
    )
    event.time.GetCurrentTime()
    return event


async def _consumer_info(stack: Stack, stream: str, durable: str) -> Any:
    nc = await nats.connect(stack.nats.url)
    try:
        return await nc.jetstream().consumer_info(stream, durable)
    finally:
        await nc.drain()


async def consumed(stack: Stack, stream: str, durable: str, messages: int) -> bool:
    """True once the consumer was handed `messages` messages and holds none unacknowledged."""
    info = await _consumer_info(stack, stream, durable)
    return bool(info.ack_floor.stream_seq >= messages and info.num_ack_pending == 0 and info.num_pending == 0)


async def delivered(stack: Stack, stream: str, durable: str, messages: int) -> bool:
    """True once the consumer has delivered the first `messages` messages of the stream at least once."""
    info = await _consumer_info(stack, stream, durable)
    return bool(info.delivered.stream_seq >= messages)


async def events_of(stack: Stack, deployment_id: str) -> list[EventRow]:
    return await stack.apis[0].store.events_after(deployment_id, 0)


async def test_a_status_event_delivered_ten_times_is_applied_once(stack: Stack) -> None:
    stub: Stub = await stack.add_api()
    created = await stub.CreateAppHostingDeployment(request("once"))
    event = status_event(created.id, pb.DEPLOYMENT_STATUS_PROVISIONING, "placement")
    await publish_again(stack, bus.event_subject(created.id), event.SerializeToString(), 10)

    async def applied() -> bool:
        return len(await events_of(stack, created.id)) == 2

    await eventually(applied)
    # Every copy has been handled (acked), not merely the first one.
    await eventually(lambda: consumed(stack, bus.EVENTS_STREAM, bus.API_EVENTS_CONSUMER, 10))
    assert [e.revision for e in await events_of(stack, created.id)] == [1, 2]
    fetched = await stub.GetDeployment(pb.GetDeploymentRequest(id=created.id))
    assert fetched.revision == 2


async def test_an_event_that_overtook_its_predecessor_waits_for_it(stack: Stack) -> None:
    stub: Stub = await stack.add_api()
    created = await stub.CreateAppHostingDeployment(request("overtaken"))
    running = status_event(created.id, pb.DEPLOYMENT_STATUS_RUNNING, "endpoint")
    running.endpoint_url = "https://overtaken.example.test"
    placed = status_event(created.id, pb.DEPLOYMENT_STATUS_PROVISIONING, "placement")
    await publish_again(stack, bus.event_subject(created.id), running.SerializeToString(), 1)
    # The running event has reached the API (and was put back to wait) before its predecessor is sent.
    await eventually(lambda: delivered(stack, bus.EVENTS_STREAM, bus.API_EVENTS_CONSUMER, 1))
    await publish_again(stack, bus.event_subject(created.id), placed.SerializeToString(), 1)

    async def settled() -> bool:
        got = await stub.GetDeployment(pb.GetDeploymentRequest(id=created.id))
        return got.status == pb.DEPLOYMENT_STATUS_RUNNING

    await eventually(settled)
    assert [e.phase for e in await events_of(stack, created.id)] == ["accepted", "placement", "endpoint"]


async def test_placement_requests_and_jobs_delivered_ten_times_build_once(stack: Stack) -> None:
    stub: Stub = await stack.add_api()
    stack.add_scheduler()
    stack.add_provisioner()
    created = await stub.CreateAppHostingDeployment(request("tenfold"))
    first = await watch(stub, created.id, until=SETTLED)
    assert first[-1].deployment.status == pb.DEPLOYMENT_STATUS_RUNNING
    revision = first[-1].deployment.revision

    # The request the API sent for the create, built again from the record as the API builds it.
    row = await stack.apis[0].store.get(None, created.id)
    assert row is not None
    placement = placement_outbox(bus_pb2.OPERATION_CREATE)(row, row_to_proto(row))[0].payload
    request_message = bus_pb2.PlacementRequest.FromString(placement)
    job = bus_pb2.ProvisionJob(
        job_id="job-replayed",
        operation=bus_pb2.OPERATION_CREATE,
        deployment=request_message.deployment,
        location=bus_pb2.Location(id=first[-1].deployment.location_id),
    )
    await publish_again(stack, bus.PLACEMENT_SUBJECT, placement, 9)
    await publish_again(stack, bus.job_subject(job.location.id), job.SerializeToString(), 10)

    async def drained() -> bool:
        nc = await nats.connect(stack.nats.url)
        try:
            js = nc.jetstream()
            pending = 0
            for stream, durable in (
                (bus.REQUESTS_STREAM, bus.SCHEDULER_CONSUMER),
                (bus.JOBS_STREAM, bus.provisioner_consumer(job.location.id)),
                (bus.EVENTS_STREAM, bus.API_EVENTS_CONSUMER),
            ):
                info = await js.consumer_info(stream, durable)
                pending += info.num_pending + info.num_ack_pending
            return pending == 0
        finally:
            await nc.drain()

    await eventually(drained)
    driver = stack.provisioners[0].drivers[job.location.id]
    assert isinstance(driver, SimulatedDriver)
    assert len(driver.created_counts) == 3
    assert set(driver.created_counts.values()) == {1}
    async with stack.apis[0].store.session() as session:
        held = await session.scalar(select(func.count()).select_from(Reservation))
    assert held == 1
    # The replayed job re-ran every step against what existed; its events are new ids, so they are
    # logged, but nothing moved the deployment backwards or built anything again.
    fetched = await stub.GetDeployment(pb.GetDeploymentRequest(id=created.id))
    assert fetched.status == pb.DEPLOYMENT_STATUS_RUNNING
    assert fetched.revision >= revision
