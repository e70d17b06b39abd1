"""End to end on the kubernetes driver: gRPC create, the real bus and processes, the fake cluster, delete."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from google.protobuf import json_format

from apphosting.nats_server import NatsServer
from apphosting.v1 import deployments_pb2 as pb
from tests.e2e.conftest import Stack
from tests.k8s.conftest import BASE_DOMAIN
from tests.k8s.fake_apiserver import FakeApiServer
from tests.k8s.fake_argocd import FakeArgoCD
from tests.k8s.schemas import object_errors

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub as Stub

SETTLED = {pb.DEPLOYMENT_STATUS_RUNNING, pb.DEPLOYMENT_STATUS_FAILED, pb.DEPLOYMENT_STATUS_ERROR}


@pytest.fixture
def fake() -> Iterator[tuple[FakeApiServer, FakeArgoCD]]:
    server = FakeApiServer(validator=object_errors).start()
    server.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "argocd"}})
    argocd = FakeArgoCD(server).start()
    yield server, argocd
    argocd.stop()
    server.stop()


@pytest.fixture
async def pipeline(
    nats_server: NatsServer, database_url: str, tmp_path: Path, fake: tuple[FakeApiServer, FakeArgoCD]
) -> AsyncIterator[Stub]:
    server, _ = fake
    location = {
        "id": "eu-k8s-a",
        "provider": "hetzner",
        "region": "eu-central-fsn1",
        "geographic_region": "eu",
        "capacity": {"cpu": 64, "memory_mb": 262144, "storage_gb": 4000, "vclusters": 100},
        "kubeconfig": str(server.write_kubeconfig(tmp_path / "kubeconfig")),
        "base_domain": BASE_DOMAIN,
        "git_local_dir": str(tmp_path / "gitops"),
        "poll_seconds": 0.05,
    }
    locations = tmp_path / "locations.yaml"
    locations.write_text(yaml.safe_dump({"locations": [location]}))
    stack = Stack(nats_server, database_url, str(locations))
    try:
        stub = await stack.add_api()
        stack.add_scheduler()
        stack.add_provisioner()
        yield stub
    finally:
        await stack.close()


def request(name: str, **fields: Any) -> pb.CreateAppHostingDeploymentRequest:
    body = {"geographic_region": "eu", "deployment_name": name, "cpu_request": 0.25, "memory_request_mb": 256}
    body.update(fields)
    return json_format.ParseDict(body, pb.CreateAppHostingDeploymentRequest())


async def watch_until(stub: Stub, deployment_id: str, until: set[pb.DeploymentStatus.ValueType]) -> pb.Deployment:
    stream = stub.WatchDeployment(pb.WatchDeploymentRequest(id=deployment_id))
    try:
        async with asyncio.timeout(60):
            async for item in stream:
                if item.event.final or (item.HasField("event") and item.deployment.status in until):
                    return item.deployment
    finally:
        stream.cancel()
    raise AssertionError("the watch ended early")


async def test_docker_and_helm_run_and_delete_leaves_nothing(
    pipeline: Stub, fake: tuple[FakeApiServer, FakeArgoCD]
) -> None:
    server, _ = fake
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


async def test_a_rejected_object_ends_failed_with_the_api_message(
    pipeline: Stub, fake: tuple[FakeApiServer, FakeArgoCD]
) -> None:
    server, _ = fake
    denial = 'admission webhook "quota.example" denied the request: namespace limit reached'
    server.reject("Namespace", "-refused", denial, code=403)
    created = await pipeline.CreateAppHostingDeployment(
        request("refused", app_type="web_app", docker_image="ghcr.io/acme/web:1.0.0")
    )

    failed = await watch_until(pipeline, created.id, SETTLED)

    assert failed.status == pb.DEPLOYMENT_STATUS_FAILED
    assert denial in failed.error_message
