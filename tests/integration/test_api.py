"""The DeploymentService over a real gRPC channel, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import json_format

from apphosting.v1 import deployments_pb2 as pb
from tests.support.grpc_errors import details_of

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub as Stub

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "create-deployment.json"


def create_request(**fields: Any) -> pb.CreateAppHostingDeploymentRequest:
    """Builds the request from the contract's JSON shape, the way grpcurl does."""
    body = {
        "geographic_region": "eu",
        "deployment_name": "web",
        "app_type": "web_app",
        "docker_image": "nginx:1.27",
    }
    body.update(fields)
    body = {key: value for key, value in body.items() if value is not None}
    return json_format.ParseDict(body, pb.CreateAppHostingDeploymentRequest())


async def expect_error(call: Any, code: grpc.StatusCode) -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    details = details_of(raised.value)
    assert details.code == code, details
    return details


async def test_every_reference_field_round_trips(stub: Stub) -> None:
    body = json.loads(EXAMPLE.read_text())
    created = await stub.CreateAppHostingDeployment(json_format.ParseDict(body, pb.CreateAppHostingDeploymentRequest()))
    fetched = await stub.GetDeployment(pb.GetDeploymentRequest(id=created.id))
    assert fetched == created
    echoed = json_format.MessageToDict(fetched, preserving_proto_field_name=True)
    for name, value in body.items():
        if name == "deployment_name":
            assert echoed["name"] == value
        elif name == "app_type":
            assert fetched.app_type == pb.APP_TYPE_HELM
        elif name == "volumes":
            assert [json_format.MessageToDict(v) for v in fetched.volumes] == value
        elif name == "run_as_uid":
            assert fetched.run_as_uid == value
        else:
            assert echoed[name] == value, name
    assert fetched.status == pb.DEPLOYMENT_STATUS_PENDING
    assert fetched.is_adopted is False
    assert fetched.created_at == fetched.updated_at
    assert fetched.revision == 1
    for uuid_field in ("id", "user_id", "cluster_id"):
        assert len(getattr(fetched, uuid_field)) == 36


async def test_defaults_and_presence(stub: Stub) -> None:
    created = await stub.CreateAppHostingDeployment(
        create_request(
            app_type=None,
            docker_image=None,
            helm_repo_url="https://charts.example.com",
            helm_chart_name="podinfo",
            volumes=[{"path": "/data"}],
        )
    )
    assert created.app_type == pb.APP_TYPE_HELM
    assert created.deployment_type == "docker"
    assert created.volumes[0].size_gb == 10
    # Unset optional fields stay unset: absent is not zero.
    for name in (
        "cpu_request",
        "replicas",
        "memory_request_mb",
        "container_port",
        "run_as_uid",
        "docker_image",
    ):
        assert not created.HasField(name), name


# One failing case for each validation rule: the fields to change and the field path reported.
VIOLATIONS: list[tuple[dict[str, Any], str]] = [
    ({"geographic_region": "mars"}, "geographic_region"),
    ({"geographic_region": ""}, "geographic_region"),
    ({"deployment_name": "Web_App"}, "deployment_name"),
    ({"deployment_name": "a" * 54}, "deployment_name"),
    ({"app_type": "lambda"}, "app_type"),
    ({"deployment_type": "git"}, "deployment_type"),
    ({"cpu_request": 0}, "cpu_request"),
    ({"cpu_request": 1000}, "cpu_request"),
    ({"memory_request_mb": 1}, "memory_request_mb"),
    ({"replicas": 0}, "replicas"),
    ({"replicas": 1000}, "replicas"),
    ({"container_port": 0}, "container_port"),
    ({"container_port": 70000}, "container_port"),
    ({"environment_variables": ["NOEQUALS"]}, "environment_variables[0]"),
    ({"environment_variables": ["OK=1", "1BAD=x"]}, "environment_variables[1]"),
    ({"environment_variables": ["A=1", "A=2"]}, "environment_variables[1]"),
    ({"docker_image": "Nginx:"}, "docker_image"),
    ({"docker_image": None}, "docker_image"),
    ({"storage_size_gb": 0}, "storage_size_gb"),
    ({"volumes": [{"path": "data"}]}, "volumes[0].path"),
    ({"volumes": [{"path": "/data", "sizeGb": 0}]}, "volumes[0].sizeGb"),
    ({"volumes": [{"path": "/data"}, {"path": "/data"}]}, "volumes[1].path"),
    ({"run_as_uid": 0}, "run_as_uid"),
    ({"helm_chart_name": "nginx"}, "helm_chart_name"),
    ({"custom_values_yaml": "a: 1"}, "custom_values_yaml"),
    (
        {
            "app_type": "helm",
            "helm_repo_url": "https://c.example.com",
            "helm_chart_name": "x",
            "custom_values_yaml": "- a",
        },
        "custom_values_yaml",
    ),
    ({"app_type": "helm", "helm_chart_name": "x"}, "helm_repo_url"),
    ({"app_type": "helm", "helm_repo_url": "ftp://c.example.com", "helm_chart_name": "x"}, "helm_repo_url"),
    ({"app_type": "helm", "helm_repo_url": "https://c.example.com"}, "helm_chart_name"),
    (
        {
            "app_type": "helm",
            "helm_repo_url": "https://c.example.com",
            "helm_chart_name": "x",
            "helm_chart_version": "one",
        },
        "helm_chart_version",
    ),
    ({"image_update_strategy": "latest"}, "image_update_strategy"),
    ({"image_update_strategy": "digest"}, "image_update_constraint"),
    ({"image_allow_tags": "regexp:("}, "image_allow_tags"),
    ({"image_ignore_tags": "a,,b"}, "image_ignore_tags"),
    ({"kubernetes_version": "1.20"}, "kubernetes_version"),
]


async def test_each_rule_reports_its_field_and_nothing_is_written(stub: Stub) -> None:
    for fields, path in VIOLATIONS:
        details = await expect_error(
            stub.CreateAppHostingDeployment(create_request(**fields)), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert path in details.violations, (fields, details.violations)
        assert details.reason == "INVALID_REQUEST"
        assert details.domain == "apphosting.v1.DeploymentService"
        reason, description = details.violations[path]
        assert reason.isupper(), (path, reason)
        assert description, path
    listed = await stub.ListDeployments(pb.ListDeploymentsRequest())
    assert list(listed.deployments) == []


async def test_every_violation_is_reported_at_once(stub: Stub) -> None:
    details = await expect_error(
        stub.CreateAppHostingDeployment(
            create_request(
                geographic_region="mars",
                deployment_name="Bad Name",
                docker_image=None,
                replicas=0,
                volumes=[{"path": "rel", "sizeGb": -1}],
                run_as_uid=0,
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert {
        "geographic_region",
        "deployment_name",
        "docker_image",
        "replicas",
        "volumes[0].path",
        "volumes[0].sizeGb",
        "run_as_uid",
    } <= details.violations.keys()


async def test_name_is_unique_among_live_deployments(stub: Stub) -> None:
    first = await stub.CreateAppHostingDeployment(create_request(deployment_name="shop"))
    details = await expect_error(
        stub.CreateAppHostingDeployment(create_request(deployment_name="shop")),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert details.reason == "DEPLOYMENT_NAME_TAKEN"
    assert details.metadata["id"] == first.id
    # A deployment being deleted still holds its name until it is gone.
    await stub.DeleteDeployment(pb.DeleteDeploymentRequest(id=first.id))
    await expect_error(
        stub.CreateAppHostingDeployment(create_request(deployment_name="shop")),
        grpc.StatusCode.ALREADY_EXISTS,
    )


async def test_concurrent_creates_of_one_name_store_one(stub: Stub) -> None:
    results = await asyncio.gather(
        *(stub.CreateAppHostingDeployment(create_request(deployment_name="race")) for _ in range(10)),
        return_exceptions=True,
    )
    created = [r for r in results if isinstance(r, pb.Deployment)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(created) == 1
    assert all(r.code() == grpc.StatusCode.ALREADY_EXISTS for r in refused)
    assert len(refused) == 9


async def test_request_id_replay_returns_the_first_result(stub: Stub) -> None:
    request_id = "5b0c7a49-5d69-4d0c-9b6a-0a3c1f1f2a11"
    first = await stub.CreateAppHostingDeployment(create_request(request_id=request_id))
    again = await stub.CreateAppHostingDeployment(create_request(request_id=request_id))
    assert again == first
    twin = create_request(deployment_name="twin", request_id="6b0c7a49-5d69-4d0c-9b6a-0a3c1f1f2a11")
    concurrent = await asyncio.gather(*(stub.CreateAppHostingDeployment(twin) for _ in range(5)))
    assert len({d.id for d in concurrent}) == 1
    details = await expect_error(
        stub.CreateAppHostingDeployment(create_request(deployment_name="other", request_id=request_id)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "request_id" in details.violations
    details = await expect_error(
        stub.CreateAppHostingDeployment(create_request(deployment_name="x", request_id="not-a-uuid")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "request_id" in details.violations
    listed = await stub.ListDeployments(pb.ListDeploymentsRequest())
    assert len(listed.deployments) == 2


async def test_get_missing_and_malformed_ids(stub: Stub) -> None:
    details = await expect_error(
        stub.GetDeployment(pb.GetDeploymentRequest(id="8e0f3b3a-2a57-4c8e-9d43-4f4b2b1e8d10")),
        grpc.StatusCode.NOT_FOUND,
    )
    assert details.reason == "DEPLOYMENT_NOT_FOUND"
    details = await expect_error(
        stub.GetDeployment(pb.GetDeploymentRequest(id="nope")), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "id" in details.violations
    await expect_error(stub.DeleteDeployment(pb.DeleteDeploymentRequest(id="nope")), grpc.StatusCode.INVALID_ARGUMENT)
    await expect_error(
        stub.DeleteDeployment(pb.DeleteDeploymentRequest(id="8e0f3b3a-2a57-4c8e-9d43-4f4b2b1e8d10")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_delete_moves_to_deleting_once(stub: Stub) -> None:
    created = await stub.CreateAppHostingDeployment(create_request())
    deleting = await stub.DeleteDeployment(pb.DeleteDeploymentRequest(id=created.id))
    assert deleting.status == pb.DEPLOYMENT_STATUS_DELETING
    assert deleting.revision == 2
    again = await stub.DeleteDeployment(pb.DeleteDeploymentRequest(id=created.id))
    assert again.revision == 2
    fetched = await stub.GetDeployment(pb.GetDeploymentRequest(id=created.id))
    assert fetched.status == pb.DEPLOYMENT_STATUS_DELETING


async def test_pagination_returns_each_record_once_while_records_are_added(stub: Stub) -> None:
    async def create(n: int) -> pb.Deployment:
        region = "eu" if n % 3 else "us"
        return await stub.CreateAppHostingDeployment(
            create_request(deployment_name=f"app-{n}", geographic_region=region)
        )

    created = [await create(n) for n in range(260)]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await stub.ListDeployments(pb.ListDeploymentsRequest(page_size=37, page_token=token))
        seen.extend(d.id for d in page.deployments)
        pages += 1
        # Records added while paging are newer: they belong before the first page, not in a later one.
        await create(1000 + pages)
        if not page.next_page_token:
            break
        token = page.next_page_token
    assert seen == [d.id for d in reversed(created)]
    assert pages == 8

    us = await stub.ListDeployments(pb.ListDeploymentsRequest(page_size=1000, geographic_region="us"))
    assert {d.id for d in us.deployments} == {d.id for n, d in enumerate(created) if n % 3 == 0} | {
        d.id for d in us.deployments if d.name.startswith("app-10")
    }
    assert all(d.geographic_region == "us" for d in us.deployments)

    await stub.DeleteDeployment(pb.DeleteDeploymentRequest(id=created[5].id))
    deleting = await stub.ListDeployments(pb.ListDeploymentsRequest(statuses=[pb.DEPLOYMENT_STATUS_DELETING]))
    assert [d.id for d in deleting.deployments] == [created[5].id]


async def test_page_token_and_size_errors(stub: Stub) -> None:
    for n in range(3):
        await stub.CreateAppHostingDeployment(create_request(deployment_name=f"p{n}"))
    page = await stub.ListDeployments(pb.ListDeploymentsRequest(page_size=1))
    assert page.next_page_token
    details = await expect_error(
        stub.ListDeployments(pb.ListDeploymentsRequest(page_token="garbage!")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "page_token" in details.violations
    details = await expect_error(
        stub.ListDeployments(pb.ListDeploymentsRequest(page_token=page.next_page_token, geographic_region="us")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "page_token" in details.violations
    details = await expect_error(
        stub.ListDeployments(pb.ListDeploymentsRequest(page_size=-1)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "page_size" in details.violations
