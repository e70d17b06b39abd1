"""SIGKILL at awkward moments: every accepted deployment still ends where it would have, nothing is
built twice, and a held watch resumes from its last revision. The processes are real, started by
the `apphosting` command."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import text

from apphosting import db
from apphosting.v1 import deployments_pb2 as pb
from apphosting.v1 import deployments_pb2_grpc
from provisioner.simulated import SimulatedState
from tests.support.cluster import Cluster

SETTLED = {pb.DEPLOYMENT_STATUS_RUNNING, pb.DEPLOYMENT_STATUS_FAILED, pb.DEPLOYMENT_STATUS_ERROR}

pytestmark = pytest.mark.slow


@pytest.fixture
async def cluster(tmp_path: Path, database_url: str) -> AsyncIterator[Cluster]:
    built = Cluster(tmp_path / "cluster", database_url, simulate_delay=0.3)
    try:
        yield built
    finally:
        await asyncio.to_thread(built.close)


def stub_for(address: str) -> tuple[grpc.aio.Channel, Any]:
    channel = grpc.aio.insecure_channel(address)
    return channel, deployments_pb2_grpc.DeploymentServiceStub(channel)


def request(name: str) -> pb.CreateAppHostingDeploymentRequest:
    return pb.CreateAppHostingDeploymentRequest(
        geographic_region="eu",
        deployment_name=name,
        app_type="web_app",
        docker_image="ghcr.io/acme/web:1.0.0",
        request_id=str(uuid.uuid4()),
    )


async def settle(stub: Any, ids: list[str], within: float = 90) -> dict[str, pb.Deployment]:
    async with asyncio.timeout(within):
        while True:
            found = {i: await stub.GetDeployment(pb.GetDeploymentRequest(id=i), timeout=10) for i in ids}
            if all(d.status in SETTLED for d in found.values()):
                return found
            await asyncio.sleep(0.3)


async def phase_reached(stub: Any, deployment_id: str, phase: str) -> None:
    """Waits for an event of that phase; read from the log, so one that passed already still counts."""
    async with asyncio.timeout(60):
        async for item in stub.WatchDeployment(pb.WatchDeploymentRequest(id=deployment_id, since_revision=1)):
            if item.event.phase == phase:
                return


async def history(stub: Any, deployment_id: str) -> list[pb.DeploymentEvent]:
    """Every event after the create, up to the one that settled the deployment."""
    events = []
    async with asyncio.timeout(60):
        async for item in stub.WatchDeployment(pb.WatchDeploymentRequest(id=deployment_id, since_revision=1)):
            events.append(item.event)
            if item.deployment.status in SETTLED:
                return events
    raise AssertionError(f"the watch of {deployment_id} ended before it settled")


def assert_built_once(cluster: Cluster, deployments: int) -> None:
    creations = SimulatedState(cluster.state_file).creations()
    # A namespace, a vCluster and an app per deployment, each created exactly once.
    assert len(creations) == 3 * deployments, creations
    assert set(creations.values()) == {1}, creations


async def test_provisioner_killed_mid_step_resumes_without_repeating(cluster: Cluster) -> None:
    await asyncio.to_thread(cluster.nats.start)
    api = await asyncio.to_thread(cluster.add_api, "api")
    await asyncio.to_thread(cluster.add_scheduler, "scheduler")
    provisioner = await asyncio.to_thread(cluster.add_provisioner, "provisioner")
    channel, stub = stub_for(f"127.0.0.1:{api.port}")
    async with channel:
        created = [await stub.CreateAppHostingDeployment(request(f"app-{n}")) for n in range(3)]
        await phase_reached(stub, created[0].id, "vcluster")
        await asyncio.to_thread(provisioner.kill)
        await asyncio.to_thread(provisioner.start)
        final = await settle(stub, [d.id for d in created])
    assert {d.status for d in final.values()} == {pb.DEPLOYMENT_STATUS_RUNNING}
    assert_built_once(cluster, 3)


async def test_api_killed_between_commit_and_publish(cluster: Cluster) -> None:
    # With NATS away, an accepted create is committed with its outbox row and not yet published.
    api = await asyncio.to_thread(cluster.add_api, "api")
    channel, stub = stub_for(f"127.0.0.1:{api.port}")
    async with channel:
        created = await stub.CreateAppHostingDeployment(request("kept"))
        seen = [item async for item in _first(stub.WatchDeployment(pb.WatchDeploymentRequest(id=created.id)))]
    await asyncio.to_thread(api.kill)
    await asyncio.to_thread(cluster.nats.start)
    await asyncio.to_thread(cluster.add_scheduler, "scheduler")
    await asyncio.to_thread(cluster.add_provisioner, "provisioner")
    await asyncio.to_thread(api.start)
    channel, stub = stub_for(f"127.0.0.1:{api.port}")
    async with channel:
        last = seen[-1].deployment.revision
        resumed: list[int] = []
        async with asyncio.timeout(90):
            async for item in stub.WatchDeployment(pb.WatchDeploymentRequest(id=created.id, since_revision=last)):
                resumed.append(item.event.revision)
                if item.deployment.status in SETTLED:
                    break
        final = await settle(stub, [created.id])
    assert resumed == list(range(last + 1, last + 1 + len(resumed)))
    assert final[created.id].status == pb.DEPLOYMENT_STATUS_RUNNING
    assert_built_once(cluster, 1)


async def _first(stream: Any) -> AsyncIterator[pb.WatchDeploymentResponse]:
    async for item in stream:
        yield item
        stream.cancel()
        return


async def test_scheduler_killed_while_placing(cluster: Cluster, database_url: str) -> None:
    await asyncio.to_thread(cluster.nats.start)
    api = await asyncio.to_thread(cluster.add_api, "api")
    scheduler = await asyncio.to_thread(cluster.add_scheduler, "scheduler")
    await asyncio.to_thread(cluster.add_provisioner, "provisioner")
    channel, stub = stub_for(f"127.0.0.1:{api.port}")
    async with channel:
        created = await asyncio.gather(*(stub.CreateAppHostingDeployment(request(f"app-{n}")) for n in range(6)))
        # Placing has begun: the others are being placed, queued or on their way to a provisioner.
        await phase_reached(stub, created[0].id, "placement")
        await asyncio.to_thread(scheduler.kill)
        await asyncio.to_thread(scheduler.start)
        final = await settle(stub, [d.id for d in created])
    assert {d.status for d in final.values()} == {pb.DEPLOYMENT_STATUS_RUNNING}
    engine = db.make_engine(database_url)
    try:
        async with engine.connect() as connection:
            held = await connection.scalar(text("SELECT count(*) FROM scheduler_reservations"))
    finally:
        await engine.dispose()
    # One reservation per deployment: a redelivered placement found its earlier one.
    assert held == 6
    assert_built_once(cluster, 6)


async def test_nats_killed_while_messages_flow(cluster: Cluster) -> None:
    await asyncio.to_thread(cluster.nats.start)
    api = await asyncio.to_thread(cluster.add_api, "api")
    await asyncio.to_thread(cluster.add_scheduler, "scheduler")
    await asyncio.to_thread(cluster.add_provisioner, "provisioner")
    channel, stub = stub_for(f"127.0.0.1:{api.port}")
    async with channel:
        created = [await stub.CreateAppHostingDeployment(request(f"app-{n}")) for n in range(4)]
        await phase_reached(stub, created[0].id, "host_namespace")
        assert cluster.nats.process is not None
        cluster.nats.process.kill()
        cluster.nats.process.wait()
        more = [await stub.CreateAppHostingDeployment(request(f"late-{n}")) for n in range(2)]
        await asyncio.sleep(0.5)
        await asyncio.to_thread(cluster.nats.start)
        final = await settle(stub, [d.id for d in created + more])
    assert {d.status for d in final.values()} == {pb.DEPLOYMENT_STATUS_RUNNING}
    assert_built_once(cluster, 6)


async def test_a_stopping_provisioner_hands_its_job_back(cluster: Cluster) -> None:
    await asyncio.to_thread(cluster.nats.start)
    api = await asyncio.to_thread(cluster.add_api, "api")
    await asyncio.to_thread(cluster.add_scheduler, "scheduler")
    # Two seconds a step: the job is far from done when this worker is asked to stop.
    leaving = await asyncio.to_thread(cluster.add_provisioner, "leaving", 2.0)
    channel, stub = stub_for(f"127.0.0.1:{api.port}")
    async with channel:
        created = await stub.CreateAppHostingDeployment(request("handed-back"))
        await phase_reached(stub, created.id, "host_namespace")
        await asyncio.to_thread(cluster.add_provisioner, "staying", 0.05)
        code = await asyncio.to_thread(leaving.stop)
        events = await history(stub, created.id)
    assert code == 0
    steps = [e for e in events if e.source.startswith("provisioner/")]
    first, last = steps[0], steps[-1]
    assert first.phase == "host_namespace"
    assert last.status == pb.DEPLOYMENT_STATUS_RUNNING
    # The leaving worker did not finish the job before it exited: the staying one resumed it and
    # built nothing twice.
    assert last.source != first.source, [(e.phase, e.source) for e in steps]
    assert_built_once(cluster, 1)
