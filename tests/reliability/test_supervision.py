"""Long-lived tasks are supervised: PostgreSQL cut under a running pipeline turns health NOT_SERVING,
and once it is back the tasks restart, health says SERVING and every deployment still reaches running."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import nats
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apphosting import bus
from apphosting.nats_server import NatsServer
from apphosting.supervise import Backoff
from apphosting.v1 import deployments_pb2 as pb
from services.deployments.app import SERVICE_NAME
from tests.e2e.test_pipeline import SETTLED, request, watch
from tests.support.stack import Stack, eventually
from tests.support.tcp_proxy import TcpProxy

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub as Stub

# Quick restarts, so a test waits seconds, not the production backoff.
QUICK = Backoff(base=0.1, cap=0.5, settle=0.5)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_becomes(stack: Stack, status: int) -> None:
    """Waits until the server and the service both report `status`, watched through the Health service."""
    health: Any = health_pb2_grpc.HealthStub(stack.channels[0])

    async def one(service: str) -> None:
        stream = health.Watch(health_pb2.HealthCheckRequest(service=service))
        try:
            async for answer in stream:
                if answer.status == status:
                    return
        finally:
            stream.cancel()

    async with asyncio.timeout(60):
        await asyncio.gather(one(""), one(SERVICE_NAME))


@pytest.fixture
async def proxied(
    nats_server: NatsServer, proxied_database: tuple[str, TcpProxy]
) -> AsyncIterator[tuple[Stack, TcpProxy]]:
    """A pipeline whose processes reach PostgreSQL through a proxy the test cuts."""
    url, proxy = proxied_database
    stack = Stack(nats_server, url, None)
    try:
        yield stack, proxy
    finally:
        await stack.close()


async def test_health_is_not_serving_while_a_task_is_down_and_serving_once_it_runs_again(
    proxied: tuple[Stack, TcpProxy],
) -> None:
    stack, proxy = proxied
    stub: Stub = await stack.add_api(restart_backoff=QUICK)
    await health_becomes(stack, SERVING)
    # The outbox relay reads the database at least once a second: cut, it fails and is down.
    await proxy.cut()
    await health_becomes(stack, NOT_SERVING)
    assert "outbox relay" in stack.apis[0].supervisor.down
    await proxy.start()
    await health_becomes(stack, SERVING)
    # Restarted, it sends again: a create now flows through the bus.
    stack.add_scheduler()
    stack.add_provisioner()
    created = await stub.CreateAppHostingDeployment(request("after-restart"))
    items = await watch(stub, created.id, until=SETTLED)
    assert items[-1].deployment.status == pb.DEPLOYMENT_STATUS_RUNNING


async def test_database_cut_mid_pipeline_every_deployment_still_reaches_running(
    proxied: tuple[Stack, TcpProxy],
) -> None:
    stack, proxy = proxied
    stub: Stub = await stack.add_api(restart_backoff=QUICK)
    stack.add_scheduler()
    # Slow steps: the cut lands while events are being reported and applied.
    stack.add_provisioner(simulate_delay=0.2)
    created = [await stub.CreateAppHostingDeployment(request(f"app-{n}")) for n in range(5)]
    await watch(stub, created[0].id, since=1, until={pb.DEPLOYMENT_STATUS_PROVISIONING})
    await proxy.cut()
    await health_becomes(stack, NOT_SERVING)
    await proxy.start()
    await health_becomes(stack, SERVING)

    async def all_running() -> bool:
        found = [await stub.GetDeployment(pb.GetDeploymentRequest(id=d.id)) for d in created]
        return all(d.status == pb.DEPLOYMENT_STATUS_RUNNING for d in found)

    await eventually(all_running, within=120)


async def test_a_consumer_deleted_under_a_running_scheduler_is_declared_again(stack: Stack) -> None:
    stub: Stub = await stack.add_api()
    stack.add_scheduler()
    stack.add_provisioner()
    first = await stub.CreateAppHostingDeployment(request("before"))
    await watch(stub, first.id, until=SETTLED)
    nc = await nats.connect(stack.nats.url)
    try:
        await nc.jetstream().delete_consumer(bus.REQUESTS_STREAM, bus.SCHEDULER_CONSUMER)
    finally:
        await nc.drain()
    # Its fetches fail from now on; the supervised consumer restarts and declares it again.
    created = await stub.CreateAppHostingDeployment(request("after"))
    items = await watch(stub, created.id, until=SETTLED)
    assert items[-1].deployment.status == pb.DEPLOYMENT_STATUS_RUNNING
