"""End to end on the kubernetes driver: gRPC create, the real bus and processes, the fake cluster, delete."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest
from google.protobuf import json_format

from apphosting.v1 import deployments_pb2 as pb
from tests.k8s.conftest import BASE_DOMAIN, K8sStack

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub as Stub

SETTLED = {pb.DEPLOYMENT_STATUS_RUNNING, pb.DEPLOYMENT_STATUS_FAILED, pb.DEPLOYMENT_STATUS_ERROR}


@pytest.fixture
async def pipeline(k8s_stack: K8sStack) -> Stub:
    stub = await k8s_stack.stack.add_api()
    k8s_stack.stack.add_scheduler()
    k8s_stack.stack.add_provisioner()
    return stub


def request(name: str, **fields: Any) -> pb.CreateAppHostingDeploymentRequest:
    body = {"geographic_region": "eu", "deployment_name": name, "cpu_request": 0.25, "memory_request_mb": 256}
    body.update(fields)
    return json_format.ParseDict(body, pb.CreateAppHostingDeploymentRequest())


async def watch_until(stub: Stub, deployment_id: str, until: set[pb.DeploymentStatus.ValueType]) -> pb.Deployment:
    stream = stub.WatchDeployment(pb.WatchDeploymentRequest(id=deployment_id))
    try:
        async with asyncio.timeout(120):
            async for item in stream:
                if item.event.final or (item.HasField("event") and item.deployment.status in until):
                    return item.deployment
    finally:
        stream.cancel()
    raise AssertionError("the watch ended early")


async def test_docker_and_helm_run_and_delete_leaves_nothing(pipeline: Stub, k8s_stack: K8sStack) -> None:
    server = k8s_stack.fake
    docker = await pipeline.CreateAppHostingDeployment(
        request(
            "web", app_type="web_app", docker_image="ghcr.io/acme/web:1.0.0", container_port=8080, storage_size_gb=1
        )
    )
    helm = await pipeline.CreateAppHostingDeployment(
        request(
            "blog",
            app_type="helm",
            helm_repo_url="https://charts.example.com/stable",
            helm_chart_name="wordpress",
            helm_chart_version="18.2.4",
            custom_values_yaml="replicaCount: 2\n",
        )
    )
    running = await asyncio.gather(*(watch_until(pipeline, d.id, SETTLED) for d in (docker, helm)))

    for deployment in running:
        assert deployment.status == pb.DEPLOYMENT_STATUS_RUNNING, deployment.error_message
        assert deployment.endpoint_url.startswith(f"https://{deployment.name}-")
        assert deployment.endpoint_url.endswith(f".{BASE_DOMAIN}")
        assert deployment.git_path.startswith("deployments/eu-k8s-a/")
        assert deployment.values_yaml
    assert "replicaCount: 2" in running[1].values_yaml
    assert len(server.objects("Application", "argocd")) == 4
    assert "web" in {
        d["metadata"]["name"] for d in server.objects("Deployment", cluster=running[0].git_path.rsplit("/", 1)[1])
    }

    for deployment in running:
        await pipeline.DeleteDeployment(pb.DeleteDeploymentRequest(id=deployment.id))
    gone = await asyncio.gather(*(watch_until(pipeline, d.id, set()) for d in running))

    assert all(d.HasField("deleted_at") for d in gone)
    assert [n["metadata"]["name"] for n in server.objects("Namespace")] == ["argocd"]
    assert server.objects("Application") == []
    assert server.objects("Secret") == []
    assert server.objects("PersistentVolumeClaim") == []
    assert set(server.clusters) == {""}


async def test_a_rejected_object_ends_failed_with_the_api_message(pipeline: Stub, k8s_stack: K8sStack) -> None:
    server = k8s_stack.fake
    denial = 'admission webhook "quota.example" denied the request: namespace limit reached'
    server.reject("Namespace", "-refused", denial, code=403)
    created = await pipeline.CreateAppHostingDeployment(
        request("refused", app_type="web_app", docker_image="ghcr.io/acme/web:1.0.0")
    )

    failed = await watch_until(pipeline, created.id, SETTLED)

    assert failed.status == pb.DEPLOYMENT_STATUS_FAILED
    assert denial in failed.error_message
