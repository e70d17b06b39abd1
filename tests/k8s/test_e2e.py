"""End to end on the kubernetes driver: gRPC create, the real bus and processes, the cluster (the fakes, or a
real one with APPHOSTING_TEST_KUBECONFIG), delete."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest
from google.protobuf import json_format

from apphosting.v1 import deployments_pb2 as pb
from provisioner.kubernetes import Names
from tests.k8s.conftest import BASE_DOMAIN, HELM_CHART, HELM_REPO, HELM_VERSION, IMAGE, WITHIN, K8sStack, wait_for
from tests.k8s.test_driver import ready_pods

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
        async with asyncio.timeout(WITHIN):
            async for item in stream:
                if item.event.final or (item.HasField("event") and item.deployment.status in until):
                    return item.deployment
                # The first answer, the deployment as it is: it settled or was torn down before the watch
                # opened, and nothing more comes.
                if not item.HasField("event") and (
                    item.deployment.status in until or item.deployment.HasField("deleted_at")
                ):
                    return item.deployment
    finally:
        stream.cancel()
    raise AssertionError("the watch ended early")


async def test_docker_and_helm_run_and_delete_leaves_nothing(pipeline: Stub, k8s_stack: K8sStack) -> None:
    read = k8s_stack.read
    docker = await pipeline.CreateAppHostingDeployment(
        request("web", app_type="web_app", docker_image=IMAGE, container_port=8080, storage_size_gb=1)
    )
    helm = await pipeline.CreateAppHostingDeployment(
        request(
            "blog",
            app_type="helm",
            helm_repo_url=HELM_REPO,
            helm_chart_name=HELM_CHART,
            helm_chart_version=HELM_VERSION,
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
    names = [Names.of(d, k8s_stack.location) for d in running]
    for each in names:
        assert read.get("Application", each.app_application, "argocd") is not None
        assert read.get("Application", each.vcluster_application, "argocd") is not None
    await wait_for("the web app's pod", lambda: ready_pods(k8s_stack.cluster, names[0], IMAGE, 1))

    for deployment in running:
        await pipeline.DeleteDeployment(pb.DeleteDeploymentRequest(id=deployment.id))
    gone = await asyncio.gather(*(watch_until(pipeline, d.id, set()) for d in running))

    assert all(d.HasField("deleted_at") for d in gone)
    for each in names:
        assert read.get("Namespace", each.namespace) is None
        assert read.get("Application", each.app_application, "argocd") is None
        assert read.get("Application", each.vcluster_application, "argocd") is None
        assert read.get("Secret", each.argocd_cluster_secret, "argocd") is None
        assert read.list("PersistentVolumeClaim", each.namespace) == []


@pytest.mark.fake_only(reason="needs an admission webhook that refuses the namespace")
async def test_a_rejected_object_ends_failed_with_the_api_message(pipeline: Stub, k8s_stack: K8sStack) -> None:
    denial = 'admission webhook "quota.example" denied the request: namespace limit reached'
    k8s_stack.fake.reject("Namespace", "-refused", denial, code=403)
    created = await pipeline.CreateAppHostingDeployment(request("refused", app_type="web_app", docker_image=IMAGE))

    failed = await watch_until(pipeline, created.id, SETTLED)

    assert failed.status == pb.DEPLOYMENT_STATUS_FAILED
    assert denial in failed.error_message
