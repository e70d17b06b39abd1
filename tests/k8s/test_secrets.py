"""Secret environment values on the kubernetes driver: the values reach the app's Secret through the API,
the GitOps repository only references it, and a changed value rolls the pods."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from google.protobuf import field_mask_pb2

from apphosting import secrets
from apphosting.locations import load_locations
from apphosting.v1 import deployments_pb2 as pb
from provisioner.kubernetes import Names
from provisioner.kubernetes.render import SECRET_ENV_CHECKSUM
from tests.k8s.conftest import K8sStack

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub as Stub

PLAIN = "k8s-pl41n-" + uuid.uuid4().hex
CHANGED = "k8s-ch4ng3d-" + uuid.uuid4().hex
SETTLED = {pb.DEPLOYMENT_STATUS_RUNNING, pb.DEPLOYMENT_STATUS_FAILED, pb.DEPLOYMENT_STATUS_ERROR}


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "secret-keys.json"
    secrets.new_key_file(path)
    return str(path)


async def settled(stub: Stub, deployment_id: str, release: int) -> pb.Deployment:
    """The deployment once its release `release` has settled (running and no longer reconciling, or failed)."""
    async with asyncio.timeout(120):
        while True:
            d = await stub.GetDeployment(pb.GetDeploymentRequest(id=deployment_id))
            done = d.status != pb.DEPLOYMENT_STATUS_RUNNING or d.healthy_release >= release
            if d.status in SETTLED and not d.reconciling and d.release >= release and done:
                return d
            await asyncio.sleep(0.05)


def git_objects(repo: Path) -> bytes:
    """Every object of the GitOps repository (all commits, trees and file versions), decompressed."""
    return subprocess.run(
        ["git", "--git-dir", str(repo), "cat-file", "--batch-all-objects", "--batch"],
        capture_output=True,
        check=True,
    ).stdout


def app_deployment(k8s: K8sStack, names: Names) -> dict[str, Any]:
    found = [d for d in k8s.fake.objects("Deployment", cluster=names.release) if d["metadata"]["name"] == names.app]
    assert found, "the app's Deployment was not synced into the vCluster"
    return found[0]


async def test_values_go_to_the_apps_secret_and_git_holds_only_references(k8s_stack: K8sStack, key_file: str) -> None:
    stack = k8s_stack.stack
    stub = await stack.add_api(secret_key_file=key_file)
    stack.add_scheduler()
    stack.add_provisioner(secret_key_file=key_file)
    created = await stub.CreateAppHostingDeployment(
        pb.CreateAppHostingDeploymentRequest(
            geographic_region="eu",
            deployment_name="shop",
            app_type="web_app",
            docker_image="ghcr.io/acme/shop:1.0.0",
            cpu_request=0.25,
            memory_request_mb=256,
            environment_variables=["MODE=prod"],
            secret_environment_variables=[
                pb.SecretEnvironmentVariable(name="DB_PASSWORD", value=PLAIN),
                pb.SecretEnvironmentVariable(
                    name="API_TOKEN", secret_ref=pb.SecretKeyReference(name="shared-creds", key="token")
                ),
            ],
        )
    )
    first = await settled(stub, created.id, 1)
    assert first.status == pb.DEPLOYMENT_STATUS_RUNNING, first.error_message
    location = load_locations(stack.locations_file).locations[0]
    names = Names.of(first, location)

    secret = k8s_stack.fake.get("Secret", names.secret_env, names.namespace)
    assert secret is not None
    assert base64.b64decode(secret["data"]["DB_PASSWORD"]).decode() == PLAIN
    assert set(secret["data"]) == {"DB_PASSWORD"}
    app = app_deployment(k8s_stack, names)
    container = app["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "MODE", "value": "prod"} in container["env"]
    assert {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": names.secret_env, "key": "DB_PASSWORD"}}} in (
        container["env"]
    )
    assert {"name": "API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "shared-creds", "key": "token"}}} in (
        container["env"]
    )
    checksum = app["spec"]["template"]["metadata"]["annotations"][SECRET_ENV_CHECKSUM]
    vcluster_values = _vcluster_values(k8s_stack, names)
    assert vcluster_values["sync"]["fromHost"]["secrets"]["mappings"]["byName"] == {
        f"{names.namespace}/{names.secret_env}": f"default/{names.secret_env}"
    }

    await stub.UpdateDeployment(
        pb.UpdateDeploymentRequest(
            deployment=pb.Deployment(
                id=created.id,
                secret_environment_variables=[
                    pb.SecretEnvironmentVariable(name="DB_PASSWORD", value=CHANGED),
                    pb.SecretEnvironmentVariable(name="API_TOKEN"),
                ],
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["secret_environment_variables"]),
        )
    )
    second = await settled(stub, created.id, 2)
    assert second.status == pb.DEPLOYMENT_STATUS_RUNNING, second.error_message
    secret = k8s_stack.fake.get("Secret", names.secret_env, names.namespace)
    assert secret is not None
    assert base64.b64decode(secret["data"]["DB_PASSWORD"]).decode() == CHANGED
    rolled = app_deployment(k8s_stack, names)["spec"]["template"]["metadata"]["annotations"][SECRET_ENV_CHECKSUM]
    assert rolled != checksum

    history = git_objects(k8s_stack.repo)
    assert b"DB_PASSWORD" in history  # the repository was read: the references are there
    assert PLAIN.encode() not in history
    assert CHANGED.encode() not in history
    for encoded in (base64.b64encode(PLAIN.encode()), base64.b64encode(CHANGED.encode())):
        assert encoded not in history


async def test_a_provisioner_without_the_key_file_fails_the_deployment_saying_why(
    k8s_stack: K8sStack, key_file: str
) -> None:
    stack = k8s_stack.stack
    stub = await stack.add_api(secret_key_file=key_file)
    stack.add_scheduler()
    stack.add_provisioner()
    created = await stub.CreateAppHostingDeployment(
        pb.CreateAppHostingDeploymentRequest(
            geographic_region="eu",
            deployment_name="nokey",
            app_type="web_app",
            docker_image="ghcr.io/acme/shop:1.0.0",
            cpu_request=0.25,
            memory_request_mb=256,
            secret_environment_variables=[pb.SecretEnvironmentVariable(name="DB_PASSWORD", value=PLAIN)],
        )
    )
    failed = await settled(stub, created.id, 1)
    assert failed.status == pb.DEPLOYMENT_STATUS_FAILED
    assert "--secret-key-file" in failed.error_message
    assert PLAIN not in failed.error_message


def _vcluster_values(k8s: K8sStack, names: Names) -> dict[str, Any]:
    application = k8s.fake.get("Application", names.vcluster_application, "argocd")
    assert application is not None
    sources = application["spec"].get("sources") or [application["spec"]["source"]]
    for source in sources:
        helm = source.get("helm") or {}
        if "valuesObject" in helm:
            return dict(helm["valuesObject"])
        if "values" in helm:
            return dict(yaml.safe_load(helm["values"]))
    raise AssertionError("the vCluster Application carries no values")
