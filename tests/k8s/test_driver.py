"""The kubernetes driver through the reconciler, on the fakes or (APPHOSTING_TEST_KUBECONFIG) a real cluster.

Each test acts only through the driver and reads the cluster through its API: what the host cluster
shows (namespaces, Applications, the pods, volumes and Ingresses vCluster syncs there), the GitOps
repository, and Argo CD's reports in the Applications' status.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from apphosting.locations import LocationConfig
from apphosting.v1 import bus_pb2, deployments_pb2
from provisioner import CREATE_STEPS, Reconciler, RetryPolicy
from provisioner.driver import StepOutcome, StepResult
from provisioner.kubernetes import KubernetesDriver, Names
from tests.k8s.conftest import (
    BASE_DOMAIN,
    HELM_CHART,
    HELM_REPO,
    HELM_VERSION,
    IMAGE,
    POLL,
    WITHIN,
    Cluster,
    git_log,
    wait_for,
)

_Status = deployments_pb2.DeploymentStatus
# A step's "not yet" ends after WITHIN seconds of the waits it asks for; temporary failures after 4 tries.
FAST = RetryPolicy(backoff_base=0.01, backoff_cap=0.05, max_attempts=4, min_poll=0.0, step_timeout=WITHIN)


def job(
    operation: bus_pb2.Operation.ValueType = bus_pb2.OPERATION_CREATE,
    *,
    deployment_id: str = "3f2b8c1d-9e4a-4b7c-8d2e-1a2b3c4d5e6f",
    **fields: Any,
) -> bus_pb2.ProvisionJob:
    values: dict[str, Any] = {
        "name": "shop",
        "app_type": deployments_pb2.APP_TYPE_WEB_APP,
        "docker_image": IMAGE,
        "cpu_request": 0.5,
        "memory_request_mb": 512,
        "replicas": 2,
        "container_port": 8080,
        "kubernetes_version": "1.35",
    }
    values.update(fields)
    volumes = values.pop("volumes", [])
    deployment = deployments_pb2.Deployment(id=deployment_id, geographic_region="eu", **values)
    for volume in volumes:
        deployment.volumes.add(**volume)
    location = bus_pb2.Location(id="eu-k8s-a", provider="hetzner", region="eu-central-fsn1", geographic_region="eu")
    return bus_pb2.ProvisionJob(
        job_id=f"job-{operation}", operation=operation, deployment=deployment, location=location
    )


def helm_job(**fields: Any) -> bus_pb2.ProvisionJob:
    """A Helm app of the chart the tests deploy (a real one on a real cluster)."""
    values: dict[str, Any] = {
        "name": "blog",
        "app_type": deployments_pb2.APP_TYPE_HELM,
        "helm_repo_url": HELM_REPO,
        "helm_chart_name": HELM_CHART,
        "helm_chart_version": HELM_VERSION,
    }
    values.update(fields)
    return job(**values)


def delete_of(create: bus_pb2.ProvisionJob) -> bus_pb2.ProvisionJob:
    deleting = bus_pb2.ProvisionJob()
    deleting.CopyFrom(create)
    deleting.operation = bus_pb2.OPERATION_DELETE
    deleting.job_id = f"{create.job_id}-delete"
    return deleting


class Run:
    """A reconciler over the driver, waiting as it asks while the cluster's controllers do their work."""

    def __init__(self, driver: KubernetesDriver, cluster: Cluster) -> None:
        self.events: list[bus_pb2.StatusEvent] = []
        self.cluster = cluster

        async def emit(event: bus_pb2.StatusEvent) -> None:
            self.events.append(event)

        self.reconciler = Reconciler(driver, emit, worker_id="t", policy=FAST)

    async def __call__(self, job: bus_pb2.ProvisionJob) -> bus_pb2.StatusEvent:
        return await self.reconciler.run(job)


async def public_dns(host: str) -> list[str]:
    """Every chart host is a public address: the tests do not depend on this machine's DNS."""
    return ["93.184.216.34"]


@pytest.fixture
def driver(location: LocationConfig) -> KubernetesDriver:
    return KubernetesDriver(location, poll_after=POLL * 5, resolver=public_dns)


async def until(step: Callable[[], Awaitable[StepResult]], waits: list[str] | None = None) -> StepResult:
    """Calls a driver step until it stops answering "not yet", waiting as it asks in between (the cluster's
    controllers work meanwhile); fails the test after WITHIN seconds. `waits` collects the "not yet"s."""
    deadline = time.monotonic() + WITHIN
    result = await step()
    while result.outcome is StepOutcome.RETRY:
        if waits is not None:
            waits.append(result.message)
        if time.monotonic() > deadline:
            raise AssertionError(f"still not done after {WITHIN:.0f}s: {result.message}")
        await asyncio.sleep(result.after_seconds)
        result = await step()
    return result


def _b64(text: str) -> str:
    return base64.b64decode(text).decode()


def _repository(image: str) -> str:
    return image.rsplit(":", 1)[0]


def host_pods(cluster: Cluster, names: Names) -> list[dict[str, Any]]:
    """The app's pods as vCluster syncs them into the host namespace."""
    return cluster.read.list("Pod", names.namespace, names.app_pods_selector)


def ready_pods(cluster: Cluster, names: Names, image: str, count: int) -> list[dict[str, Any]] | None:
    """The app's `count` pods, all of `image` and ready; None until the host shows exactly that."""
    pods = host_pods(cluster, names)
    ready = [
        pod
        for pod in pods
        if [c["image"] for c in pod["spec"]["containers"]] == [image]
        and any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions") or [])
    ]
    return pods if len(pods) == count and len(ready) == count else None


def synced_name(name: str, names: Names) -> str:
    """The name vCluster gives an object of the app's namespace when it syncs it to the host."""
    return f"{name}-x-default-x-{names.release}"


async def test_docker_app_runs_then_delete_leaves_nothing(cluster: Cluster, driver: KubernetesDriver) -> None:
    read = cluster.read
    create = job(
        environment_variables=["GREETING=hello=world", "MODE=prod"],
        run_as_uid=1000,
        storage_size_gb=5,
        volumes=[{"path": "/cache", "size_gb": 2}, {"path": "/srv/uploads"}],
    )
    names = Names.of(create.deployment, driver.location)
    run = Run(driver, cluster)

    last = await run(create)

    assert last.status == _Status.DEPLOYMENT_STATUS_RUNNING, last.message
    assert [e.phase for e in run.events] == list(CREATE_STEPS)
    assert not any(e.simulated or "[simulated]" in e.message for e in run.events)
    assert last.endpoint_url == f"https://shop-3f2b8c1d.{BASE_DOMAIN}"
    app_event = next(e for e in run.events if e.phase == "app")
    assert app_event.git_path == "deployments/eu-k8s-a/shop-3f2b8c1d9e4a"
    rendered = list(yaml.safe_load_all(app_event.values_yaml))
    assert [m["kind"] for m in rendered] == [
        "Deployment",
        "PersistentVolumeClaim",
        "PersistentVolumeClaim",
        "PersistentVolumeClaim",
        "Service",
        "Ingress",
    ]

    # Host cluster: a restricted namespace, the vCluster's objects and the kubeconfig secret with clean names.
    namespace = read.get("Namespace", names.namespace)
    assert namespace is not None
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert names.kubeconfig_secret == "vc-shop-3f2b8c1d9e4a"
    assert read.get("Secret", names.kubeconfig_secret, names.namespace) is not None
    vcluster_app = read.get("Application", names.vcluster_application, "argocd")
    assert vcluster_app is not None
    values = vcluster_app["spec"]["source"]["helm"]["valuesObject"]
    assert values["controlPlane"]["distro"]["k8s"]["image"]["tag"] == "v1.35.0"
    assert values["policies"]["resourceQuota"]["quota"]["requests.cpu"] == "1720m"  # 3 pods x 500m + 220m
    cluster_secret = read.get("Secret", names.argocd_cluster_secret, "argocd")
    assert cluster_secret is not None
    assert _b64(cluster_secret["data"]["name"]) == names.argocd_cluster
    credentials = json.loads(_b64(cluster_secret["data"]["config"]))
    assert credentials.get("bearerToken") or credentials.get("tlsClientConfig", {}).get("certData")

    # What Argo CD applied from git, as vCluster runs it on the host: pods that meet Pod Security restricted.
    pods = await wait_for("2 ready pods of the app", lambda: ready_pods(cluster, names, IMAGE, 2))
    pod = pods[0]["spec"]
    assert {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000}.items() <= pod[
        "securityContext"
    ].items()
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = pod["containers"][0]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert {"GREETING": "hello=world", "MODE": "prod"}.items() <= env.items()
    assert {"/cache", "/srv/uploads", "/data"} <= {m["mountPath"] for m in container["volumeMounts"]}
    claims = {
        c["metadata"]["name"]: c["spec"]["resources"]["requests"]["storage"]
        for c in read.list("PersistentVolumeClaim", names.namespace)
    }
    assert {
        synced_name("shop-vol-0", names): "2Gi",
        synced_name("shop-vol-1", names): "10Gi",
        synced_name("shop-data", names): "5Gi",
    }.items() <= claims.items()
    ingress = read.get("Ingress", synced_name("shop", names), names.namespace)
    assert ingress is not None
    assert ingress["spec"]["rules"][0]["host"] == f"shop-3f2b8c1d.{BASE_DOMAIN}"
    assert driver.repo.read(names.git_path) is not None

    run.events.clear()
    final = await run(delete_of(create))

    assert final.final, final.message
    assert [e.phase for e in run.events] == ["app", "vcluster", "namespace", "deleted"]
    assert read.get("Namespace", names.namespace) is None
    assert read.get("Application", names.app_application, "argocd") is None
    assert read.get("Application", names.vcluster_application, "argocd") is None
    assert read.get("Secret", names.argocd_cluster_secret, "argocd") is None
    assert read.list("PersistentVolumeClaim", names.namespace) == []
    assert read.list("Pod", names.namespace) == []
    assert driver.repo.read(names.git_path) is None


async def test_a_rerun_finds_its_work_and_changes_nothing(cluster: Cluster, driver: KubernetesDriver) -> None:
    read = cluster.read
    create = job()
    names = Names.of(create.deployment, driver.location)
    await Run(driver, cluster)(create)
    before = {
        kind: read.get(kind, name, ns)
        for kind, name, ns in [
            ("Namespace", names.namespace, ""),
            ("Application", names.app_application, "argocd"),
            ("Application", names.vcluster_application, "argocd"),
            ("Secret", names.argocd_cluster_secret, "argocd"),
        ]
    }
    commits = len(await asyncio.to_thread(git_log, driver.repo))

    again = Run(driver, cluster)
    last = await again(create)

    assert last.status == _Status.DEPLOYMENT_STATUS_RUNNING
    assert "already exists" in again.events[0].message
    for kind_name, obj in before.items():
        assert obj is not None
        now = read.get(obj["kind"], obj["metadata"]["name"], obj["metadata"].get("namespace", ""))
        assert now is not None
        assert now["metadata"].get("generation") == obj["metadata"].get("generation"), kind_name
        assert now.get("spec") == obj.get("spec"), kind_name
    assert len(await asyncio.to_thread(git_log, driver.repo)) == commits
    await Run(driver, cluster)(delete_of(create))


async def test_helm_app_gets_chart_and_merged_values(cluster: Cluster, driver: KubernetesDriver) -> None:
    image = _repository(IMAGE)
    create = helm_job(
        custom_values_yaml="replicaCount: 3\nresources:\n  limits:\n    memory: 1Gi\nextra: {a: 1}\n",
        image_update_strategy="semver",
        image_update_constraint="^1.2",
        image_allow_tags="regexp:^1\\.[0-9]+\\.[0-9]+$",
        image_ignore_tags="*-rc*,latest",
    )
    names = Names.of(create.deployment, driver.location)
    run = Run(driver, cluster)

    last = await run(create)

    assert last.status == _Status.DEPLOYMENT_STATUS_RUNNING, last.message
    assert last.endpoint_url == f"https://blog-3f2b8c1d.{BASE_DOMAIN}"
    app_event = next(e for e in run.events if e.phase == "app")
    values = yaml.safe_load(app_event.values_yaml)
    assert values["replicaCount"] == 3
    assert values["resources"] == {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}}
    assert values["image"] == {"repository": image, "tag": IMAGE.rsplit(":", 1)[1]}
    assert values["extra"] == {"a": 1}
    assert values["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert driver.repo.read(names.git_path) == {"values.yaml": app_event.values_yaml}
    application = cluster.read.get("Application", names.app_application, "argocd")
    assert application is not None
    chart, values_ref = application["spec"]["sources"]
    assert (chart["repoURL"], chart["chart"], chart["targetRevision"]) == (HELM_REPO, HELM_CHART, HELM_VERSION)
    assert chart["helm"]["valueFiles"] == [f"$values/{names.git_path}/values.yaml"]
    assert values_ref["ref"] == "values"
    # The location leaves image updates to the platform's updater (the default image_updater), so the
    # Application carries no Argo CD Image Updater annotations (tests/k8s/test_image_updater_mode.py has both).
    updater = "argocd-image-updater.argoproj.io"
    assert not [key for key in application["metadata"].get("annotations", {}) if key.startswith(updater)]

    final = await run(delete_of(create))
    assert final.final
    assert cluster.read.get("Application", names.app_application, "argocd") is None
    assert driver.repo.read(names.git_path) is None


@pytest.mark.fake_only(reason="needs a chart whose install fails; the fake Argo CD fails chart fails-to-sync")
async def test_a_chart_that_fails_to_sync_fails_the_deployment(cluster: Cluster, driver: KubernetesDriver) -> None:
    create = helm_job(helm_chart_name="fails-to-sync")

    last = await Run(driver, cluster)(create)

    assert last.status == _Status.DEPLOYMENT_STATUS_FAILED, last.message
    assert last.phase == "rollout"
    assert "sync failed" in last.error_message
    assert "fails-to-sync" in last.error_message


async def test_vcluster_ready_waits_for_control_plane_and_kubeconfig(
    cluster: Cluster, driver: KubernetesDriver
) -> None:
    create = job()
    names = Names.of(create.deployment, driver.location)
    assert (await driver.ensure_namespace(create)).outcome is StepOutcome.DONE
    assert (await driver.ensure_vcluster(create)).outcome is StepOutcome.DONE
    waits: list[str] = []

    ready = await until(lambda: driver.vcluster_ready(create), waits)

    assert ready.outcome is StepOutcome.DONE, ready.message
    # Every "not yet" named what it waited for; "done" came only with both there.
    assert all("control plane starting" in w or f"waiting for secret {names.kubeconfig_secret}" in w for w in waits)
    statefulset = cluster.read.get("StatefulSet", names.control_plane, names.namespace)
    assert statefulset is not None
    assert statefulset["status"]["readyReplicas"] >= 1
    kubeconfig = await driver.read_kubeconfig(create)
    assert yaml.safe_load(kubeconfig.fields["kubeconfig"])["kind"] == "Config"
    await Run(driver, cluster)(delete_of(create))


@pytest.mark.fake_only(reason="needs a vCluster whose control plane never starts (the fakes' ready switch)")
async def test_a_control_plane_that_never_starts_keeps_vcluster_ready_waiting(
    cluster: Cluster, driver: KubernetesDriver
) -> None:
    _, controllers = cluster.need_fake()
    controllers.ready = False
    create = job()
    names = Names.of(create.deployment, driver.location)
    assert (await driver.ensure_namespace(create)).outcome is StepOutcome.DONE
    assert (await driver.ensure_vcluster(create)).outcome is StepOutcome.DONE
    await wait_for(
        "the control plane StatefulSet", lambda: cluster.read.get("StatefulSet", names.control_plane, names.namespace)
    )

    waiting = await driver.vcluster_ready(create)

    assert waiting.outcome is StepOutcome.RETRY
    assert "control plane starting" in waiting.message
    assert cluster.read.get("Secret", names.kubeconfig_secret, names.namespace) is None


@pytest.mark.fake_only(reason="needs an API server that fails requests on demand")
async def test_transient_api_errors_are_retried(cluster: Cluster, driver: KubernetesDriver) -> None:
    fake, _ = cluster.need_fake()
    fake.fail_next(2, code=503)
    run = Run(driver, cluster)

    last = await run(job())

    assert last.status == _Status.DEPLOYMENT_STATUS_RUNNING, last.message
    assert [e.phase for e in run.events] == list(CREATE_STEPS)


@pytest.mark.fake_only(reason="needs an API server that fails requests on demand")
async def test_retries_run_out_into_error(cluster: Cluster, driver: KubernetesDriver) -> None:
    fake, _ = cluster.need_fake()
    fake.fail_next(FAST.max_attempts, code=429)

    last = await Run(driver, cluster)(job())

    assert last.status == _Status.DEPLOYMENT_STATUS_ERROR
    assert "HTTP 429" in last.error_message


@pytest.mark.fake_only(reason="needs an admission webhook that refuses the app's Application")
async def test_a_rejected_object_fails_with_the_api_message(cluster: Cluster, driver: KubernetesDriver) -> None:
    fake, _ = cluster.need_fake()
    denial = 'admission webhook "images.policy.example" denied the request: registry ghcr.io/acme is not trusted'
    fake.reject("Application", "-app", denial)

    last = await Run(driver, cluster)(job())

    assert last.status == _Status.DEPLOYMENT_STATUS_FAILED
    assert last.phase == "app"
    assert denial in last.error_message


async def test_kubectl_reads_what_the_driver_created(cluster: Cluster, driver: KubernetesDriver) -> None:
    create = job()
    names = Names.of(create.deployment, driver.location)
    await Run(driver, cluster)(create)
    kubectl = str(Path(sys.executable).with_name("kubectl"))

    def kubectl_get(*args: str) -> str:
        done = subprocess.run(
            [kubectl, f"--kubeconfig={cluster.kubeconfig}", "get", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert f"namespace/{names.namespace}" in kubectl_get("namespaces", "-o", "name").split()
    applications = json.loads(kubectl_get("applications.argoproj.io", "-n", "argocd", "-o", "json"))
    assert {names.app_application, names.vcluster_application} <= {a["metadata"]["name"] for a in applications["items"]}
    secret = json.loads(kubectl_get("secret", names.kubeconfig_secret, "-n", names.namespace, "-o", "json"))
    assert "config" in secret["data"]
    table = kubectl_get("statefulsets", "-n", names.namespace)
    assert names.control_plane in table
    await Run(driver, cluster)(delete_of(create))


async def test_a_chart_host_that_now_points_inward_is_not_fetched(cluster: Cluster, location: LocationConfig) -> None:
    async def rebound(host: str) -> list[str]:
        return ["10.1.2.3"]

    driver = KubernetesDriver(location, poll_after=POLL * 5, resolver=rebound)
    create = job(
        name="rebound",
        app_type=deployments_pb2.APP_TYPE_HELM,
        helm_repo_url="https://charts.example.com/stable",
        helm_chart_name="wordpress",
    )
    names = Names.of(create.deployment, driver.location)
    last = await Run(driver, cluster)(create)
    assert last.status == _Status.DEPLOYMENT_STATUS_FAILED
    assert "helm_repo_url is not fetched" in last.error_message
    assert "10.1.2.3" in last.error_message
    assert cluster.read.get("Application", names.app_application, "argocd") is None
    await Run(driver, cluster)(delete_of(create))


@pytest.mark.parametrize(
    "url", ["https://kubernetes.default.svc/", "https://Charts.Team.SVC.cluster.local./x", "oci://charts/stable"]
)
async def test_a_cluster_internal_chart_host_is_not_fetched_even_when_it_resolves_publicly(
    cluster: Cluster, location: LocationConfig, url: str
) -> None:
    # Stored before create refused such names: the name alone is refused at use, whatever it resolves to.
    async def public(host: str) -> list[str]:
        return ["93.184.216.34"]

    driver = KubernetesDriver(location, poll_after=POLL * 5, resolver=public)
    create = job(name="inward", app_type=deployments_pb2.APP_TYPE_HELM, helm_repo_url=url, helm_chart_name="web")
    names = Names.of(create.deployment, driver.location)
    last = await Run(driver, cluster)(create)
    assert last.status == _Status.DEPLOYMENT_STATUS_FAILED
    assert "helm_repo_url is not fetched" in last.error_message
    assert "cluster-internal" in last.error_message or "single-label" in last.error_message
    assert cluster.read.get("Application", names.app_application, "argocd") is None
    await Run(driver, cluster)(delete_of(create))
