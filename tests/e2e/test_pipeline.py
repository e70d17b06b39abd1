"""A deployment's way from pending to running, failed or gone, through the real bus and processes."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import json_format

from apphosting.v1 import deployments_pb2 as pb
from provisioner import CREATE_STEPS
from tests.support.stack import Stack, eventually

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub as Stub

SETTLED: set[pb.DeploymentStatus.ValueType] = {
    pb.DEPLOYMENT_STATUS_RUNNING,
    pb.DEPLOYMENT_STATUS_FAILED,
    pb.DEPLOYMENT_STATUS_ERROR,
}


def request(name: str, **fields: Any) -> pb.CreateAppHostingDeploymentRequest:
    body = {
        "geographic_region": "eu",
        "deployment_name": name,
        "app_type": "web_app",
        "docker_image": "ghcr.io/acme/web:1.0.0",
        "cpu_request": 0.5,
        "memory_request_mb": 512,
    }
    body.update(fields)
    return json_format.ParseDict(body, pb.CreateAppHostingDeploymentRequest())


async def watch(
    stub: Stub,
    deployment_id: str,
    *,
    since: int = 0,
    until: Collection[pb.DeploymentStatus.ValueType] = (),
    limit: int | None = None,
) -> list[pb.WatchDeploymentResponse]:
    """Reads a watch until a status in `until`, a final event, or `limit` messages."""
    seen: list[pb.WatchDeploymentResponse] = []
    stream = stub.WatchDeployment(pb.WatchDeploymentRequest(id=deployment_id, since_revision=since))
    try:
        async with asyncio.timeout(30):
            async for item in stream:
                seen.append(item)
                if limit is not None and len(seen) >= limit:
                    break
                if item.event.final or (until and item.deployment.status in until and item.HasField("event")):
                    break
                # Watched from now, a deployment that settled before the watch opened answers with its
                # state alone, and nothing more comes.
                if until and since == 0 and len(seen) == 1 and item.deployment.status in until:
                    break
    finally:
        stream.cancel()
    return seen


def revisions(items: list[pb.WatchDeploymentResponse]) -> list[int]:
    return [item.deployment.revision for item in items]


async def test_create_watch_running_with_endpoint_and_location(pipeline: Stub) -> None:
    created = await pipeline.CreateAppHostingDeployment(request("web"))
    assert created.status == pb.DEPLOYMENT_STATUS_PENDING
    items = await watch(pipeline, created.id, until={pb.DEPLOYMENT_STATUS_RUNNING})
    # From now: the deployment as it is, then each change in order (none if it was running already).
    first, *changes = items
    assert not first.HasField("event")
    assert first.deployment.revision >= 1
    assert revisions(items) == list(range(first.deployment.revision, first.deployment.revision + len(items)))
    assert [c.event.revision for c in changes] == revisions(changes)
    assert items[-1].deployment.status == pb.DEPLOYMENT_STATUS_RUNNING
    # Every change since the create, however late the watch opens.
    history = await watch(pipeline, created.id, since=created.revision, until={pb.DEPLOYMENT_STATUS_RUNNING})
    running = history[-1].deployment
    assert running.status == pb.DEPLOYMENT_STATUS_RUNNING
    assert running.endpoint_url.startswith("https://web-")
    assert running.location_id.startswith("eu-")
    assert running.provider
    assert running.region
    assert running.cluster_status == "ready"
    assert running.cluster_id == created.cluster_id
    phases = [c.event.phase for c in history]
    assert phases[-1] == "endpoint"
    # Steps done within the provisioner's report window share one event (the last step's is always
    # reported), so which steps have an event of their own varies; each is the scheduler's or a create step's.
    assert set(phases) <= {"placement", *CREATE_STEPS}
    assert all(
        c.event.simulated and c.event.message.startswith("[simulated]")
        for c in history
        if c.event.source != "scheduler"
    )
    fetched = await pipeline.GetDeployment(pb.GetDeploymentRequest(id=created.id))
    assert fetched == running


async def test_injected_failure_fails_with_its_message(pipeline: Stub) -> None:
    created = await pipeline.CreateAppHostingDeployment(
        request("broken", docker_image="ghcr.io/acme/fail-permanent:1.0.0")
    )
    items = await watch(pipeline, created.id, since=created.revision, until=SETTLED)
    failed = items[-1].deployment
    assert failed.status == pb.DEPLOYMENT_STATUS_FAILED
    assert "fail-permanent" in failed.error_message
    assert items[-1].event.simulated


async def test_temporary_failures_retry_then_end_in_error_naming_the_step(pipeline: Stub) -> None:
    created = await pipeline.CreateAppHostingDeployment(
        request("flaky", docker_image="ghcr.io/acme/fail-temporary:1.0.0")
    )
    items = await watch(pipeline, created.id, until=SETTLED)
    errored = items[-1].deployment
    assert errored.status == pb.DEPLOYMENT_STATUS_ERROR
    assert "step app failed after 3 attempts" in errored.error_message


async def test_no_capacity_fails_naming_the_shortfall(pipeline: Stub) -> None:
    created = await pipeline.CreateAppHostingDeployment(request("huge", cpu_request=16, replicas=20))
    items = await watch(pipeline, created.id, until=SETTLED)
    failed = items[-1].deployment
    assert failed.status == pb.DEPLOYMENT_STATUS_FAILED
    assert "'eu'" in failed.error_message
    assert "cpu 320.0" in failed.error_message
    assert "short" in failed.error_message
    assert items[-1].event.source == "scheduler"


ONE_SLOT = [
    {
        "id": "eu-tiny-a",
        "provider": "hetzner",
        "region": "eu-central-fsn1",
        "geographic_region": "eu",
        "capacity": {"cpu": 64, "memory_mb": 262144, "storage_gb": 1000, "vclusters": 1},
    }
]
TWENTY_SLOTS = [{**ONE_SLOT[0], "capacity": {**ONE_SLOT[0]["capacity"], "vclusters": 20}}]  # type: ignore[dict-item]


@pytest.mark.locations(TWENTY_SLOTS)
async def test_fifty_concurrent_creates_never_overbook(stack: Stack, pipeline: Stub) -> None:
    created = await asyncio.gather(
        *(pipeline.CreateAppHostingDeployment(request(f"app-{n}", cpu_request=0.1)) for n in range(50))
    )

    async def settled() -> bool:
        page = await pipeline.ListDeployments(pb.ListDeploymentsRequest(page_size=100))
        return all(d.status in SETTLED for d in page.deployments)

    await eventually(settled, within=60)
    page = await pipeline.ListDeployments(pb.ListDeploymentsRequest(page_size=100))
    statuses = [d.status for d in page.deployments]
    assert len(page.deployments) == len(created) == 50
    assert statuses.count(pb.DEPLOYMENT_STATUS_RUNNING) == 20
    assert statuses.count(pb.DEPLOYMENT_STATUS_FAILED) == 30
    assert all("vCluster slots" in d.error_message for d in page.deployments if d.status == pb.DEPLOYMENT_STATUS_FAILED)
    used = await stack.schedulers[0].ledger.used()
    assert used["eu-tiny-a"].vclusters == 20


@pytest.mark.locations(ONE_SLOT)
async def test_delete_releases_capacity_and_ends_the_watch(pipeline: Stub) -> None:
    first = await pipeline.CreateAppHostingDeployment(request("first"))
    settled = await watch(pipeline, first.id, until=SETTLED)
    second = await pipeline.CreateAppHostingDeployment(request("second"))
    refused = await watch(pipeline, second.id, until=SETTLED)
    assert refused[-1].deployment.status == pb.DEPLOYMENT_STATUS_FAILED

    # Resumed from the settled revision: every later event comes, however late the watch opens.
    ending = asyncio.create_task(watch(pipeline, first.id, since=settled[-1].deployment.revision))
    deleting = await pipeline.DeleteDeployment(pb.DeleteDeploymentRequest(id=first.id))
    assert deleting.status == pb.DEPLOYMENT_STATUS_DELETING
    items = await ending
    assert items[-1].event.final
    assert items[-1].deployment.HasField("deleted_at")
    assert items[-1].event.phase == "deleted"
    # A torn-down deployment is left out of lists until asked for (AIP-164); it is kept until purged.
    listed = await pipeline.ListDeployments(pb.ListDeploymentsRequest())
    assert first.id not in {d.id for d in listed.deployments}
    assert second.id in {d.id for d in listed.deployments}
    everything = await pipeline.ListDeployments(pb.ListDeploymentsRequest(show_deleted=True))
    assert [d.HasField("deleted_at") for d in everything.deployments if d.id == first.id] == [True]

    # The scheduler frees the slot once its own consumer has seen the final event, which the watch above
    # may have seen first: wait until it says the third fits, as a caller can ask (validate_only).
    async def fits() -> bool:
        preview = await pipeline.CreateAppHostingDeployment(request("third", validate_only=True))
        return preview.status != pb.DEPLOYMENT_STATUS_FAILED

    await eventually(fits, within=60)
    third = await pipeline.CreateAppHostingDeployment(request("third"))
    placed = await watch(pipeline, third.id, until=SETTLED)
    assert placed[-1].deployment.status == pb.DEPLOYMENT_STATUS_RUNNING
    # The name is free again once its deployment is gone.
    again = await pipeline.CreateAppHostingDeployment(request("first"))
    assert again.name == "first"


async def test_deleting_a_failed_deployment_ends_it(pipeline: Stub) -> None:
    created = await pipeline.CreateAppHostingDeployment(request("huge", cpu_request=16, replicas=20))
    await watch(pipeline, created.id, until=SETTLED)
    await pipeline.DeleteDeployment(pb.DeleteDeploymentRequest(id=created.id))
    items = await watch(pipeline, created.id, since=1)
    assert items[-1].event.final


async def test_resumed_watch_misses_and_repeats_nothing(pipeline: Stub) -> None:
    created = await pipeline.CreateAppHostingDeployment(request("resume"))
    head = await watch(pipeline, created.id, since=1, limit=2)
    last = head[-1].event.revision
    tail = await watch(pipeline, created.id, since=last, until={pb.DEPLOYMENT_STATUS_RUNNING})
    joined = [i.event.revision for i in head + tail]
    assert joined == list(range(2, joined[-1] + 1))
    full = await watch(pipeline, created.id, since=1, until={pb.DEPLOYMENT_STATUS_RUNNING})
    assert [i.event for i in full] == [i.event for i in head + tail]
    assert [i.deployment for i in full] == [i.deployment for i in head + tail]


async def test_watch_errors_are_clear(pipeline: Stub) -> None:
    created = await pipeline.CreateAppHostingDeployment(request("errs"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await watch(pipeline, created.id, since=10_000)
    assert raised.value.code() == grpc.StatusCode.OUT_OF_RANGE
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await watch(pipeline, "not-an-id")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_two_api_replicas_serve_the_same_watch(stack: Stack) -> None:
    one = await stack.add_api()
    two = await stack.add_api()
    stack.add_scheduler()
    stack.add_provisioner()
    created = await one.CreateAppHostingDeployment(request("replicated"))
    on_two, on_one = await asyncio.gather(
        watch(two, created.id, until={pb.DEPLOYMENT_STATUS_RUNNING}),
        watch(one, created.id, until={pb.DEPLOYMENT_STATUS_RUNNING}),
    )
    assert on_two[-1].deployment.status == pb.DEPLOYMENT_STATUS_RUNNING
    assert [i.event for i in on_two[1:]] == [i.event for i in on_one[1:]] or revisions(on_two)[-1] == revisions(on_one)[
        -1
    ]
    assert revisions(on_two) == list(range(revisions(on_two)[0], revisions(on_two)[-1] + 1))


async def test_watch_all_deployments_filters_by_region(stack: Stack, pipeline: Stub) -> None:
    stream = pipeline.WatchDeployments(pb.WatchDeploymentsRequest(geographic_region="us"))
    seen: list[pb.WatchDeploymentsResponse] = []

    async def read() -> None:
        async for item in stream:
            seen.append(item)
            if item.deployment.status == pb.DEPLOYMENT_STATUS_RUNNING:
                return

    reader = asyncio.create_task(read())
    hub = stack.apis[0].hub

    async def listening() -> bool:
        return hub.open_watches == 1

    # This watch has no initial message: it hears only what happens once it is registered.
    await eventually(listening)
    await pipeline.CreateAppHostingDeployment(request("in-eu"))
    in_us = await pipeline.CreateAppHostingDeployment(request("in-us", geographic_region="us"))
    async with asyncio.timeout(30):
        await reader
    stream.cancel()
    assert {item.deployment.id for item in seen} == {in_us.id}
    assert [item.event.revision for item in seen] == list(range(1, len(seen) + 1))


async def test_create_while_nats_is_down_flows_once_it_is_back(stack: Stack, pipeline: Stub) -> None:
    stack.nats.stop()
    created = await pipeline.CreateAppHostingDeployment(request("offline"))
    assert created.status == pb.DEPLOYMENT_STATUS_PENDING
    await asyncio.sleep(1.0)
    await asyncio.to_thread(stack.nats.start)

    async def running() -> bool:
        got = await pipeline.GetDeployment(pb.GetDeploymentRequest(id=created.id))
        return got.status == pb.DEPLOYMENT_STATUS_RUNNING

    await eventually(running, within=60)


@pytest.mark.locations(ONE_SLOT)
async def test_retry_restarts_a_failed_deployment(pipeline: Stub) -> None:
    holder = await pipeline.CreateAppHostingDeployment(request("holder"))
    await watch(pipeline, holder.id, until=SETTLED)
    waiting = await pipeline.CreateAppHostingDeployment(request("waiting"))
    refused = await watch(pipeline, waiting.id, until=SETTLED)
    assert refused[-1].deployment.status == pb.DEPLOYMENT_STATUS_FAILED

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await pipeline.RetryDeployment(pb.RetryDeploymentRequest(id=holder.id))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    await pipeline.DeleteDeployment(pb.DeleteDeploymentRequest(id=holder.id))
    await watch(pipeline, holder.id, since=refused[0].deployment.revision)
    retried = await pipeline.RetryDeployment(pb.RetryDeploymentRequest(id=waiting.id))
    assert retried.status == pb.DEPLOYMENT_STATUS_PENDING
    assert not retried.HasField("error_message")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await pipeline.RetryDeployment(pb.RetryDeploymentRequest(id=waiting.id))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    items = await watch(pipeline, waiting.id, since=retried.revision, until=SETTLED)
    assert items[-1].deployment.status == pb.DEPLOYMENT_STATUS_RUNNING
