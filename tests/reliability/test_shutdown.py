"""Graceful shutdown: watch streams end with where to resume, and provisioners hand their jobs back."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
import pytest

from apphosting.nats_server import NatsServer
from apphosting.v1 import deployments_pb2 as pb
from services.deployments.app import ApiOptions, ApiServer
from services.deployments.quotas import UNLIMITED
from tests.e2e.test_pipeline import SETTLED, request, watch
from tests.support.grpc_errors import details_of
from tests.support.stack import Stack, eventually

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub as Stub


async def test_a_stopping_replica_ends_watches_with_the_revision_to_resume_from(stack: Stack) -> None:
    leaving = await stack.add_api()
    staying = await stack.add_api()
    # No provisioner yet: the deployment is placed and waits there until the replica has left.
    stack.add_scheduler()
    created = await leaving.CreateAppHostingDeployment(request("moving"))
    seen: list[pb.WatchDeploymentResponse] = []
    placed = asyncio.Event()
    stream = leaving.WatchDeployment(pb.WatchDeploymentRequest(id=created.id))

    async def read() -> None:
        async for item in stream:
            seen.append(item)
            if item.deployment.phase == "placement":
                placed.set()

    reader = asyncio.create_task(read())
    async with asyncio.timeout(30):
        await placed.wait()
    await stack.apis[0].stop()
    stack.apis.pop(0)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await asyncio.wait_for(reader, timeout=30)
    details = details_of(raised.value)
    assert details.code == grpc.StatusCode.UNAVAILABLE
    assert details.reason == "SHUTTING_DOWN"
    resume = int(details.metadata["revision"])
    assert resume == seen[-1].deployment.revision
    assert seen[-1].deployment.status == pb.DEPLOYMENT_STATUS_PROVISIONING
    stack.add_provisioner()
    rest = await watch(staying, created.id, since=resume, until=SETTLED)
    joined = [i.deployment.revision for i in seen] + [i.event.revision for i in rest]
    assert joined == list(range(joined[0], joined[-1] + 1))
    assert rest[-1].deployment.status == pb.DEPLOYMENT_STATUS_RUNNING


async def test_an_idle_all_deployments_watch_ends_on_shutdown(stack: Stack) -> None:
    stub: Stub = await stack.add_api()
    stream = stub.WatchDeployments(pb.WatchDeploymentsRequest())

    async def read() -> None:
        async for _ in stream:
            pass

    reader = asyncio.create_task(read())
    hub = stack.apis[0].hub

    async def listening() -> bool:
        return hub.open_watches == 1

    await eventually(listening)
    await stack.apis[0].stop()
    stack.apis.clear()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await asyncio.wait_for(reader, timeout=30)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_every_task_of_a_stopping_api_ends_by_itself(database_url: str, nats_server: NatsServer) -> None:
    """The applier, which waits for events, ends once the consumer that hands them over has: stop does not
    wait out its grace period to cancel it (each stop of an idle API took the whole 5 s)."""
    server = ApiServer(
        ApiOptions(
            listen="127.0.0.1:0", database_url=database_url, nats_url=nats_server.url, auth=None, quotas=UNLIMITED
        )
    )
    await server.start()

    async def bus_tasks_running() -> bool:
        names = {task.get_name() for task in server.supervisor.tasks}
        return {"status-event applier", "status-event consumer", "outbox relay"} <= names

    await eventually(bus_tasks_running)
    tasks = list(server.supervisor.tasks)
    await server.stop()
    assert all(task.done() for task in tasks)
    assert [task.get_name() for task in tasks if task.cancelled()] == []
