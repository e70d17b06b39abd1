"""Messages dropped on the bus: the resync drives the deployment again, or ends it in error naming
the step, so no deployment stays pending, provisioning or deleting for ever."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import nats

from apphosting import bus
from apphosting.v1 import deployments_pb2 as pb
from provisioner.simulated import SimulatedDriver
from services.deployments.resync import SOURCE
from tests.e2e.test_pipeline import SETTLED, request, watch
from tests.support.stack import Stack, eventually

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub as Stub

# Short periods, so a lost message is noticed in seconds; enough re-drives that a loaded machine's
# slow progress never runs out of them.
QUICK = {"stuck_after": 2.0, "resync_interval": 0.2, "max_redrives": 10}


async def drop(stack: Stack, stream: str) -> None:
    """Waits until the stream holds a message, then purges it: lost, as if its deliveries ran out."""
    nc = await nats.connect(stack.nats.url)
    try:
        js = nc.jetstream()

        async def held() -> bool:
            return (await js.stream_info(stream)).state.messages > 0

        await eventually(held)
        await js.purge_stream(stream)
    finally:
        await nc.drain()


async def redrives(stub: Stub, deployment_id: str) -> list[pb.DeploymentEvent]:
    history = await watch(stub, deployment_id, since=1, until=SETTLED)
    return [item.event for item in history if item.event.source == SOURCE]


def built_once(stack: Stack) -> None:
    driver = next(iter(stack.provisioners[0].drivers.values()))
    assert isinstance(driver, SimulatedDriver)
    assert set(driver.created_counts.values()) == {1}, driver.created_counts


async def test_a_dropped_placement_request_is_sent_again(stack: Stack) -> None:
    stub = await stack.add_api(**QUICK)
    created = await stub.CreateAppHostingDeployment(request("request-lost"))
    await drop(stack, bus.REQUESTS_STREAM)
    stack.add_scheduler()
    stack.add_provisioner()
    items = await watch(stub, created.id, since=1, until=SETTLED)
    assert items[-1].deployment.status == pb.DEPLOYMENT_STATUS_RUNNING
    assert [e.phase for e in await redrives(stub, created.id)][:1] == ["accepted"]


async def test_a_dropped_job_of_a_placed_deployment_is_sent_again_and_built_once(stack: Stack) -> None:
    stub = await stack.add_api(**QUICK)
    scheduler = stack.add_scheduler()
    created = await stub.CreateAppHostingDeployment(request("job-lost"))
    await watch(stub, created.id, since=1, until={pb.DEPLOYMENT_STATUS_PROVISIONING})
    await drop(stack, bus.JOBS_STREAM)
    stack.add_provisioner()
    items = await watch(stub, created.id, since=1, until=SETTLED)
    assert items[-1].deployment.status == pb.DEPLOYMENT_STATUS_RUNNING
    assert "placement" in [e.phase for e in await redrives(stub, created.id)]
    built_once(stack)
    # Placed again on the capacity it already held, not on more.
    used = await scheduler.ledger.used()
    assert sum(d.vclusters for d in used.values()) == 1


async def test_with_its_redrives_exhausted_a_deployment_ends_in_error_naming_the_step(stack: Stack) -> None:
    stub = await stack.add_api(**{**QUICK, "stuck_after": 0.5, "max_redrives": 2})
    scheduler = stack.add_scheduler()
    created = await stub.CreateAppHostingDeployment(request("never-built"))
    # Placed, but no provisioner serves the location: every job waits, unanswered.
    items = await watch(stub, created.id, since=1, until=SETTLED)
    ended = items[-1].deployment
    assert ended.status == pb.DEPLOYMENT_STATUS_ERROR
    assert "stuck in step placement (provisioning)" in ended.error_message
    assert "after 2 re-drives" in ended.error_message
    assert len(await redrives(stub, created.id)) == 3

    # The error went over the bus as every status event does: the scheduler freed the capacity.
    async def released() -> bool:
        return not await scheduler.ledger.used()

    await eventually(released)


async def test_a_deletion_whose_request_was_dropped_ends_deleted(stack: Stack) -> None:
    stub = await stack.add_api(**QUICK)
    scheduler = stack.add_scheduler()
    stack.add_provisioner()
    created = await stub.CreateAppHostingDeployment(request("delete-lost"))
    settled = await watch(stub, created.id, until=SETTLED)
    assert settled[-1].deployment.status == pb.DEPLOYMENT_STATUS_RUNNING
    # With no scheduler to take it, the delete request waits in the stream, and is dropped there.
    scheduler.stop()
    await stack.tasks[0]
    await stub.DeleteDeployment(pb.DeleteDeploymentRequest(id=created.id))
    await drop(stack, bus.REQUESTS_STREAM)
    stack.add_scheduler()
    items = await watch(stub, created.id, since=settled[-1].deployment.revision)
    assert items[-1].event.final
    assert items[-1].deployment.HasField("deleted_at")
    assert any(item.event.source == SOURCE for item in items)


async def test_a_request_that_ran_out_of_deliveries_is_driven_again_at_once(stack: Stack) -> None:
    # Only JetStream's max-deliveries advisory can drive it again within this test.
    stub = await stack.add_api(stuck_after=3600.0)
    created = await stub.CreateAppHostingDeployment(request("dead-lettered"))
    nc = await nats.connect(stack.nats.url)
    try:
        js = nc.jetstream()

        async def held() -> bool:
            return (await js.stream_info(bus.REQUESTS_STREAM)).state.messages > 0

        await eventually(held)
        # Reaching the last of its deliveries takes the consumer's whole backoff (many minutes): the
        # advisory nats-server then publishes is sent here as the server writes it.
        stream_seq = (await js.stream_info(bus.REQUESTS_STREAM)).state.last_seq
        advisory = {
            "type": "io.nats.jetstream.advisory.v1.max_deliver",
            "stream": bus.REQUESTS_STREAM,
            "consumer": bus.SCHEDULER_CONSUMER,
            "stream_seq": stream_seq,
            "deliveries": bus.MAX_DELIVER,
        }
        subject = bus.MAX_DELIVERIES_ADVISORIES.replace(">", f"{bus.REQUESTS_STREAM}.{bus.SCHEDULER_CONSUMER}")
        await nc.publish(subject, json.dumps(advisory).encode())
    finally:
        await nc.drain()
    items = await watch(stub, created.id, since=1, limit=1)
    assert items[-1].event.source == SOURCE
    assert "delivered for the last time" in items[-1].event.message
    stack.add_scheduler()
    stack.add_provisioner()
    settled = await watch(stub, created.id, since=1, until=SETTLED)
    assert settled[-1].deployment.status == pb.DEPLOYMENT_STATUS_RUNNING
