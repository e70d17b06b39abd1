"""Day-2 operations through gRPC, the bus, the scheduler and a simulated provisioner, on both databases."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, json_format

from apphosting.v1 import deployments_pb2 as pb
from tests.support.grpc_errors import Details, details_of
from tests.support.stack import Stack, eventually

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub as Stub

RUNNING = pb.DEPLOYMENT_STATUS_RUNNING
STOPPED = pb.DEPLOYMENT_STATUS_STOPPED


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


async def until(
    stub: Stub, deployment_id: str, done: Callable[[pb.Deployment], bool], *, since: int = 0, within: float = 60.0
) -> list[pb.WatchDeploymentResponse]:
    """Watches a deployment (from the revision after `since`, else its current state) until `done` holds
    for it or its final event; returns what was seen."""
    seen: list[pb.WatchDeploymentResponse] = []
    stream = stub.WatchDeployment(pb.WatchDeploymentRequest(id=deployment_id, since_revision=since))
    try:
        async with asyncio.timeout(within):
            async for item in stream:
                seen.append(item)
                if done(item.deployment) or item.event.final:
                    break
    finally:
        stream.cancel()
    return seen


def at_rest(status: pb.DeploymentStatus.ValueType, release: int | None = None) -> Callable[[pb.Deployment], bool]:
    def check(deployment: pb.Deployment) -> bool:
        return (
            deployment.status == status
            and not deployment.reconciling
            and (release is None or deployment.healthy_release == release)
        )

    return check


async def running(stub: Stub, name: str, **fields: Any) -> pb.Deployment:
    created = await stub.CreateAppHostingDeployment(request(name, **fields))
    seen = await until(stub, created.id, at_rest(RUNNING, 1))
    assert seen[-1].deployment.status == RUNNING, seen[-1].deployment
    return seen[-1].deployment


async def refused(call: Awaitable[Any]) -> Details:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    return details_of(failure.value)


def update(deployment_id: str, *paths: str, **fields: Any) -> pb.UpdateDeploymentRequest:
    body = json_format.ParseDict({"id": deployment_id, **fields}, pb.Deployment())
    return pb.UpdateDeploymentRequest(deployment=body, update_mask=field_mask_pb2.FieldMask(paths=list(paths)))


async def test_an_update_rolls_out_a_new_release_in_place_and_releases_list_it(pipeline: Stub) -> None:
    web = await running(pipeline, "web")
    assert web.release == 1
    assert web.etag
    answer = await pipeline.UpdateDeployment(
        pb.UpdateDeploymentRequest(
            deployment=pb.Deployment(id=web.id, docker_image="ghcr.io/acme/web:1.1.0", replicas=3),
            update_mask=field_mask_pb2.FieldMask(paths=["docker_image", "replicas"]),
            etag=web.etag,
            reason="new version",
        )
    )
    assert answer.status == RUNNING
    assert answer.reconciling
    assert answer.operation == "update"
    assert answer.release == 2
    assert answer.docker_image == "ghcr.io/acme/web:1.1.0"
    seen = await until(pipeline, web.id, at_rest(RUNNING, 2), since=web.revision)
    done = seen[-1].deployment
    assert done.healthy_release == 2
    assert done.replicas == 3
    assert done.docker_image == "ghcr.io/acme/web:1.1.0"
    # The deployment never left running while the release rolled out.
    assert all(item.deployment.status == RUNNING for item in seen)
    events = [item.event for item in seen if item.HasField("event")]
    assert any(e.operation == "update" and e.actor and e.release == 2 for e in events)
    releases = await pipeline.ListReleases(pb.ListReleasesRequest(id=web.id, page_size=1))
    assert [r.number for r in releases.releases] == [2]
    assert releases.releases[0].healthy
    assert releases.releases[0].reason == "new version"
    assert releases.releases[0].spec.docker_image == "ghcr.io/acme/web:1.1.0"
    rest = await pipeline.ListReleases(pb.ListReleasesRequest(id=web.id, page_token=releases.next_page_token))
    assert [(r.number, r.operation, r.spec.docker_image) for r in rest.releases] == [
        (1, "create", "ghcr.io/acme/web:1.0.0")
    ]
    assert not rest.next_page_token


async def test_update_refusals_name_the_field_the_etag_or_the_operation_in_flight(pipeline: Stub) -> None:
    web = await running(pipeline, "web", storage_size_gb=20)
    immutable = await refused(pipeline.UpdateDeployment(update(web.id, "docker_image", "geographic_region")))
    assert immutable.code == grpc.StatusCode.INVALID_ARGUMENT
    assert immutable.violations["update_mask.paths[1]"][0] == "IMMUTABLE_FIELD"
    shrink = await refused(pipeline.UpdateDeployment(update(web.id, "storage_size_gb", storage_size_gb=10)))
    assert shrink.violations["deployment.storage_size_gb"][0] == "CANNOT_SHRINK"
    bad = await refused(pipeline.UpdateDeployment(update(web.id, "docker_image", docker_image="Not An Image")))
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "deployment.docker_image" in bad.violations
    empty = await refused(pipeline.UpdateDeployment(update(web.id)))
    assert "update_mask" in empty.violations
    stale = await refused(
        pipeline.UpdateDeployment(
            pb.UpdateDeploymentRequest(
                deployment=pb.Deployment(id=web.id, replicas=2),
                update_mask=field_mask_pb2.FieldMask(paths=["replicas"]),
                etag="r1",
            )
        )
    )
    assert stale.code == grpc.StatusCode.ABORTED
    assert stale.reason == "ETAG_MISMATCH"
    # An update that never gets healthy keeps its operation in flight: a second one waits its turn.
    slow = await pipeline.UpdateDeployment(
        update(web.id, "docker_image", docker_image="ghcr.io/acme/web:never-healthy")
    )
    assert slow.operation == "update"
    busy = await refused(pipeline.ScaleDeployment(pb.ScaleDeploymentRequest(id=web.id, replicas=2)))
    assert busy.code == grpc.StatusCode.ABORTED
    assert busy.reason == "OPERATION_IN_FLIGHT"
    assert "update" in busy.message
    not_now = await refused(pipeline.StartDeployment(pb.StartDeploymentRequest(id=web.id)))
    assert not_now.code == grpc.StatusCode.ABORTED
    # Nothing refused was written: the release is the one the accepted update made.
    assert (await pipeline.GetDeployment(pb.GetDeploymentRequest(id=web.id))).release == 2


async def test_an_update_is_judged_on_the_fields_it_changes_and_the_rules_they_take_part_in(pipeline: Stub) -> None:
    web = await running(
        pipeline,
        "judged",
        environment_variables=["LOG_LEVEL=info"],
        config={"team": "web"},
        image_update_strategy="semver",
        image_update_constraint="^1.0",
    )
    cases: list[tuple[pb.UpdateDeploymentRequest, str, str]] = [
        # Rules between the changed field and the app type, the image, the other image-update settings.
        (
            update(web.id, "helm_chart_version", helm_chart_version="1.2.3"),
            "deployment.helm_chart_version",
            "NOT_ALLOWED",
        ),
        (update(web.id, "docker_image"), "deployment.docker_image", "REQUIRED"),
        (update(web.id, "image_update_strategy"), "deployment.image_update_strategy", "REQUIRED"),
        (
            update(web.id, "image_update_constraint", image_update_constraint="not a constraint"),
            "deployment.image_update_constraint",
            "INVALID_FORMAT",
        ),
        # A field's own rules.
        (
            update(web.id, "environment_variables", environment_variables=["A=1", "A=2"]),
            "deployment.environment_variables[1]",
            "DUPLICATE",
        ),
        (update(web.id, "container_port", container_port=70000), "deployment.container_port", "OUT_OF_RANGE"),
    ]
    for call, field, reason in cases:
        bad = await refused(pipeline.UpdateDeployment(call))
        assert bad.code == grpc.StatusCode.INVALID_ARGUMENT, call
        assert bad.violations[field][0] == reason, bad.violations
    scaled = await refused(pipeline.ScaleDeployment(pb.ScaleDeploymentRequest(id=web.id, replicas=-1)))
    assert "replicas" in scaled.violations
    # An accepted update keeps every field it does not name, as stored.
    updated = await pipeline.UpdateDeployment(update(web.id, "docker_image", docker_image="ghcr.io/acme/web:1.1.0"))
    assert updated.docker_image == "ghcr.io/acme/web:1.1.0"
    assert list(updated.environment_variables) == ["LOG_LEVEL=info"]
    assert json_format.MessageToDict(updated.config) == {"team": "web"}
    assert (updated.image_update_strategy, updated.image_update_constraint) == ("semver", "^1.0")
    assert (updated.cpu_request, updated.memory_request_mb, updated.release) == (0.5, 512, 2)


async def test_a_release_that_never_gets_healthy_is_rolled_back_by_itself(stack: Stack) -> None:
    stub = await stack.add_api(rollout_timeout=1.0)
    stack.add_scheduler()
    stack.add_provisioner()
    web = await running(stub, "web")
    await stub.UpdateDeployment(update(web.id, "docker_image", docker_image="ghcr.io/acme/web:never-healthy"))
    seen = await until(stub, web.id, at_rest(RUNNING, 3), since=web.revision)
    done = seen[-1].deployment
    assert done.release == 3
    assert done.healthy_release == 3
    assert done.docker_image == "ghcr.io/acme/web:1.0.0"
    assert "release 2 did not become healthy" in done.error_message
    assert "rolled back to release 1" in done.error_message
    assert done.image_updates_paused
    events = [item.event for item in seen if item.HasField("event")]
    assert any(e.operation == "rollback" and "rolled back" in e.message for e in events)
    releases = (await stub.ListReleases(pb.ListReleasesRequest(id=web.id))).releases
    assert [(r.number, r.operation, r.healthy, r.rollback_of) for r in releases] == [
        (3, "rollback-automatic", True, 1),
        (2, "update", False, 0),
        (1, "create", True, 0),
    ]


async def test_rollback_reapplies_a_release_and_pauses_image_updates_until_an_update_sets_them(pipeline: Stub) -> None:
    web = await running(pipeline, "web")
    await pipeline.UpdateDeployment(update(web.id, "docker_image", docker_image="ghcr.io/acme/web:2.0.0"))
    await until(pipeline, web.id, at_rest(RUNNING, 2))
    missing = await refused(pipeline.RollbackDeployment(pb.RollbackDeploymentRequest(id=web.id, release=9)))
    assert missing.violations["release"][0] == "NOT_FOUND"
    back = await pipeline.RollbackDeployment(pb.RollbackDeploymentRequest(id=web.id, reason="2.0.0 is slow"))
    assert back.release == 3
    assert back.docker_image == "ghcr.io/acme/web:1.0.0"
    assert back.image_updates_paused
    await until(pipeline, web.id, at_rest(RUNNING, 3))
    resumed = await pipeline.UpdateDeployment(update(web.id, "image_update_strategy", image_update_strategy="semver"))
    assert not resumed.image_updates_paused
    assert resumed.release == 4


async def test_stop_frees_cpu_and_start_brings_the_app_back(stack: Stack) -> None:
    stub = await stack.add_api()
    scheduler = stack.add_scheduler()
    stack.add_provisioner()
    web = await running(stub, "web", replicas=2)
    held = (await scheduler.ledger.used())[web.location_id]
    assert held.cpu == pytest.approx(1.0)
    await stub.StopDeployment(pb.StopDeploymentRequest(id=web.id))
    stopped = (await until(stub, web.id, at_rest(STOPPED)))[-1].deployment
    assert stopped.status == STOPPED
    assert stopped.phase == "stopped"
    again = await refused(stub.StopDeployment(pb.StopDeploymentRequest(id=web.id)))
    assert again.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "stopped" in again.message

    async def cpu_freed() -> bool:
        used = (await scheduler.ledger.used()).get(web.location_id)
        return used is not None and used.cpu == 0 and used.storage_gb == held.storage_gb

    await eventually(cpu_freed)
    started = await stub.StartDeployment(pb.StartDeploymentRequest(id=web.id))
    assert started.status == pb.DEPLOYMENT_STATUS_PROVISIONING
    assert started.operation == "start"
    back = (await until(stub, web.id, at_rest(RUNNING, 1)))[-1].deployment
    assert back.status == RUNNING
    assert back.endpoint_url
    assert (await scheduler.ledger.used())[web.location_id].cpu == pytest.approx(1.0)


def _small(location_id: str) -> dict[str, Any]:
    return {
        "id": location_id,
        "provider": "test",
        "region": f"r-{location_id}",
        "geographic_region": "eu",
        "capacity": {"cpu": 2.0, "memory_mb": 8192, "storage_gb": 100, "vclusters": 10},
    }


@pytest.mark.locations([_small("eu-small")])
async def test_start_on_a_full_location_names_the_shortfall_and_suggests_a_migration(stack: Stack) -> None:
    stub = await stack.add_api()
    stack.add_scheduler()
    stack.add_provisioner()
    first = await running(stub, "first", cpu_request=1.5)
    await stub.StopDeployment(pb.StopDeploymentRequest(id=first.id))
    await until(stub, first.id, at_rest(STOPPED))
    # The freed cpu goes to another deployment while the first sleeps.
    await running(stub, "second", cpu_request=1.5)
    full = await refused(stub.StartDeployment(pb.StartDeploymentRequest(id=first.id)))
    assert full.code == grpc.StatusCode.FAILED_PRECONDITION
    assert full.reason == "CAPACITY_EXCEEDED"
    assert "cpu" in full.message
    assert "delete_source" in full.message
    assert (await stub.GetDeployment(pb.GetDeploymentRequest(id=first.id))).status == STOPPED


async def test_an_update_of_a_stopped_deployment_rolls_out_when_it_starts(pipeline: Stub) -> None:
    web = await running(pipeline, "web")
    await pipeline.StopDeployment(pb.StopDeploymentRequest(id=web.id))
    await until(pipeline, web.id, at_rest(STOPPED))
    recorded = await pipeline.UpdateDeployment(update(web.id, "docker_image", docker_image="ghcr.io/acme/web:3.0.0"))
    assert recorded.status == STOPPED
    assert not recorded.reconciling
    assert recorded.release == 2
    await pipeline.StartDeployment(pb.StartDeploymentRequest(id=web.id))
    back = (await until(pipeline, web.id, at_rest(RUNNING, 2)))[-1].deployment
    assert back.healthy_release == 2
    assert back.docker_image == "ghcr.io/acme/web:3.0.0"


async def test_promote_copies_to_a_location_with_overrides_and_the_source_keeps_running(pipeline: Stub) -> None:
    web = await running(pipeline, "web")
    target = "eu-ams3-a" if web.location_id != "eu-ams3-a" else "eu-fsn1-a"
    answer = await pipeline.PromoteDeployment(
        pb.PromoteDeploymentRequest(
            id=web.id,
            target_cluster_id=target,
            new_name="web-staging",
            overrides=pb.PromoteOverrides(replicas=2, docker_image="ghcr.io/acme/web:1.2.0"),
        )
    )
    assert answer.source.status == pb.DEPLOYMENT_STATUS_PROMOTING
    assert answer.source.promoted_to == answer.target.id
    assert answer.target.promoted_from == web.id
    assert answer.target.target_location == target
    copy = (await until(pipeline, answer.target.id, at_rest(RUNNING, 1)))[-1].deployment
    assert copy.location_id == target
    assert copy.replicas == 2
    assert copy.docker_image == "ghcr.io/acme/web:1.2.0"
    assert copy.placement.chosen_location_id == target
    source = (await until(pipeline, web.id, at_rest(RUNNING)))[-1].deployment
    assert source.status == RUNNING
    assert source.phase == "promoted"
    assert source.docker_image == "ghcr.io/acme/web:1.0.0"


async def test_a_migration_deletes_the_source_once_the_copy_runs(pipeline: Stub) -> None:
    web = await running(pipeline, "web")
    answer = await pipeline.PromoteDeployment(
        pb.PromoteDeploymentRequest(id=web.id, delete_source=True, new_name="web-moved")
    )
    assert answer.source.status == pb.DEPLOYMENT_STATUS_MIGRATING
    assert answer.source.operation == "migrate"
    gone = (await until(pipeline, web.id, lambda d: d.HasField("deleted_at")))[-1]
    assert gone.event.final
    copy = await pipeline.GetDeployment(pb.GetDeploymentRequest(id=answer.target.id))
    assert copy.status == RUNNING


async def test_a_copy_that_fails_leaves_the_source_running_untouched(pipeline: Stub) -> None:
    web = await running(pipeline, "web")
    answer = await pipeline.PromoteDeployment(
        pb.PromoteDeploymentRequest(
            id=web.id,
            delete_source=True,
            overrides=pb.PromoteOverrides(docker_image="ghcr.io/acme/fail-permanent:1"),
        )
    )
    assert answer.target.name == "web-copy"
    source = (await until(pipeline, web.id, lambda d: d.phase == "promote_failed"))[-1].deployment
    assert source.status == RUNNING
    assert not source.reconciling
    assert source.docker_image == "ghcr.io/acme/web:1.0.0"
    copy = await pipeline.GetDeployment(pb.GetDeploymentRequest(id=answer.target.id))
    assert copy.status == pb.DEPLOYMENT_STATUS_FAILED


async def test_adopt_takes_an_existing_namespace_and_delete_releases_it(stack: Stack) -> None:
    stub = await stack.add_api()
    stack.add_scheduler()
    stack.add_provisioner(simulate_namespaces=("legacy-shop",))
    adopted = await stub.AdoptDeployment(
        pb.AdoptDeploymentRequest(location="eu-fsn1-a", source_namespace="legacy-shop", replicas=2)
    )
    assert adopted.is_adopted
    assert adopted.source_namespace == "legacy-shop"
    assert adopted.name == "legacy-shop"
    done = (await until(stub, adopted.id, at_rest(RUNNING, 1)))[-1].deployment
    assert done.location_id == "eu-fsn1-a"
    assert done.is_adopted
    twice = await refused(
        stub.AdoptDeployment(pb.AdoptDeploymentRequest(location="eu-fsn1-a", source_namespace="legacy-shop"))
    )
    assert twice.code == grpc.StatusCode.ALREADY_EXISTS
    in_place = await refused(stub.StopDeployment(pb.StopDeploymentRequest(id=adopted.id)))
    assert in_place.code == grpc.StatusCode.FAILED_PRECONDITION
    assert in_place.reason == "ADOPTED"
    system = await refused(
        stub.AdoptDeployment(pb.AdoptDeploymentRequest(location="eu-x", source_namespace="kube-system"))
    )
    assert set(system.violations) == {"location", "source_namespace"}
    await stub.DeleteDeployment(pb.DeleteDeploymentRequest(id=adopted.id))
    gone = (await until(stub, adopted.id, lambda d: d.HasField("deleted_at")))[-1]
    assert gone.event.final
    # Released, not deleted: the namespace can be adopted again.
    again = await stub.AdoptDeployment(pb.AdoptDeploymentRequest(location="eu-fsn1-a", source_namespace="legacy-shop"))
    assert (await until(stub, again.id, at_rest(RUNNING, 1)))[-1].deployment.status == RUNNING


async def test_adopting_a_namespace_that_is_not_there_fails_naming_it(stack: Stack) -> None:
    stub = await stack.add_api()
    stack.add_scheduler()
    stack.add_provisioner()
    adopted = await stub.AdoptDeployment(pb.AdoptDeploymentRequest(location="eu-fsn1-a", source_namespace="nowhere"))
    failed = (await until(stub, adopted.id, lambda d: d.status == pb.DEPLOYMENT_STATUS_FAILED))[-1].deployment
    assert "nowhere" in failed.error_message


async def test_validate_only_explains_the_placement_and_writes_nothing(pipeline: Stub) -> None:
    preview = await pipeline.CreateAppHostingDeployment(
        pb.CreateAppHostingDeploymentRequest(
            geographic_region="eu",
            deployment_name="web",
            app_type="web_app",
            docker_image="ghcr.io/acme/web:1.0.0",
            validate_only=True,
        )
    )
    assert not preview.id
    assert preview.status == pb.DEPLOYMENT_STATUS_PENDING
    explanation = preview.placement
    assert explanation.chosen_location_id in {c.location_id for c in explanation.candidates}
    assert {c.location_id for c in explanation.candidates} == {"eu-fsn1-a", "eu-ams3-a"}
    assert [c.location_id for c in explanation.candidates if not c.chosen and not c.reason] == []
    assert not (await pipeline.ListDeployments(pb.ListDeploymentsRequest())).deployments
    web = await running(pipeline, "web")
    assert web.placement.chosen_location_id == web.location_id
    before = await pipeline.GetDeployment(pb.GetDeploymentRequest(id=web.id))
    dry = await pipeline.UpdateDeployment(
        pb.UpdateDeploymentRequest(
            deployment=pb.Deployment(id=web.id, replicas=4),
            update_mask=field_mask_pb2.FieldMask(paths=["replicas"]),
            validate_only=True,
        )
    )
    assert dry.replicas == 4
    assert dry.release == 2
    after = await pipeline.GetDeployment(pb.GetDeploymentRequest(id=web.id))
    assert after.revision == before.revision
    assert after.release == 1
    assert after.replicas == before.replicas
    too_big = await refused(
        pipeline.UpdateDeployment(
            pb.UpdateDeploymentRequest(
                deployment=pb.Deployment(id=web.id, replicas=20, cpu_request=16.0),
                update_mask=field_mask_pb2.FieldMask(paths=["replicas", "cpu_request"]),
                validate_only=True,
            )
        )
    )
    assert too_big.code == grpc.StatusCode.FAILED_PRECONDITION
    assert too_big.reason == "CAPACITY_EXCEEDED"
    assert "cpu" in too_big.message
