"""Day-2 steps of the kubernetes driver against the fake API server and fake Argo CD: update, stop and
start, adoption and its release."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import yaml

from apphosting.v1 import bus_pb2, deployments_pb2
from provisioner.driver import StepOutcome, StepResult
from provisioner.kubernetes import KubernetesDriver, Names
from tests.k8s.conftest import Cluster
from tests.k8s.fake_argocd import FakeArgoCD
from tests.k8s.test_driver import Run, driver, job

# The driver fixture of the driver tests, shared here.
__all__ = ["driver"]

_Status = deployments_pb2.DeploymentStatus
# Rounds of "step, then one Argo CD reconcile" before a step that keeps answering "not yet" fails the test.
_ROUNDS = 40


async def until(step: Callable[[], Awaitable[StepResult]], argocd: FakeArgoCD) -> StepResult:
    """Runs a step until it stops asking to be polled again, letting the fake Argo CD work in between."""
    result = await step()
    for _ in range(_ROUNDS):
        if result.outcome is not StepOutcome.RETRY:
            return result
        await asyncio.to_thread(argocd.reconcile)
        result = await step()
    raise AssertionError(f"still not done: {result.message}")


def _log(repo: str) -> list[str]:
    done = subprocess.run(
        ["git", "--git-dir", repo, "log", "--format=%s", "main"], capture_output=True, text=True, check=True
    )
    return done.stdout.splitlines()


def _with(base: bus_pb2.ProvisionJob, operation: bus_pb2.Operation.ValueType, release: int) -> bus_pb2.ProvisionJob:
    changed = bus_pb2.ProvisionJob()
    changed.CopyFrom(base)
    changed.operation = operation
    changed.release = release
    changed.job_id = f"{base.job_id}-{operation}-{release}"
    return changed


async def _running(driver: KubernetesDriver, cluster: Cluster, **fields: Any) -> tuple[bus_pb2.ProvisionJob, str]:
    """A deployment created at release 1 and running; its job and the vCluster's kubeconfig."""
    create = job(**fields)
    create.release = 1
    last = await Run(driver, cluster)(create)
    assert last.status == _Status.DEPLOYMENT_STATUS_RUNNING, last.message
    kubeconfig = await driver.read_kubeconfig(create)
    return create, kubeconfig.fields["kubeconfig"]


async def test_an_update_is_a_new_commit_synced_and_healthy_at_its_release(
    cluster: Cluster, driver: KubernetesDriver
) -> None:
    fake, argocd = cluster.need_fake()
    create, kubeconfig = await _running(driver, cluster)
    names = Names.of(create.deployment, driver.location)
    # Argo CD polls git only every few minutes: the new commit must be synced on request.
    argocd.auto_sync = False
    update = _with(create, bus_pb2.OPERATION_UPDATE, 2)
    update.deployment.docker_image = "ghcr.io/acme/shop:1.3.0"
    commits = len(_log(driver.repo.url))

    applied = await driver.ensure_app(update, kubeconfig)

    assert applied.outcome is StepOutcome.DONE, applied.message
    assert "release 2" in applied.message
    assert "sync requested" in applied.message
    log = _log(driver.repo.url)
    assert len(log) == commits + 1
    assert "release 2" in log[0]
    committed = driver.repo.read(names.git_path)
    assert committed is not None
    assert yaml.safe_load(committed["deployment-shop.yaml"])["metadata"]["annotations"] == {
        "apphosting.dev/release": "2"
    }
    application = fake.get("Application", names.app_application, "argocd")
    assert application is not None
    assert application["metadata"]["annotations"]["apphosting.dev/release"] == "2"

    rolled = await until(lambda: driver.app_rollout(update, kubeconfig), argocd)

    assert rolled.outcome is StepOutcome.DONE, rolled.message
    assert "release 2" in rolled.message
    assert (names.app_application, {"release": "2"}) in argocd.sync_requests
    deployment = fake.get("Deployment", "shop", "default", cluster=names.release)
    assert deployment is not None
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/acme/shop:1.3.0"
    assert deployment["metadata"]["annotations"]["apphosting.dev/release"] == "2"
    application = fake.get("Application", names.app_application, "argocd")
    assert application is not None
    assert application["status"]["operationState"]["phase"] == "Succeeded"

    # The same job again: already committed, nothing new in git, still healthy.
    again = await driver.ensure_app(update, kubeconfig)
    assert again.outcome is StepOutcome.DONE
    assert "already committed" in again.message
    assert len(_log(driver.repo.url)) == commits + 1
    assert (await driver.app_rollout(update, kubeconfig)).outcome is StepOutcome.DONE


async def test_a_rollout_that_never_gets_healthy_keeps_retrying(cluster: Cluster, driver: KubernetesDriver) -> None:
    _, argocd = cluster.need_fake()
    create, kubeconfig = await _running(driver, cluster)
    update = _with(create, bus_pb2.OPERATION_UPDATE, 2)
    update.deployment.docker_image = "ghcr.io/acme/never-healthy:2.0"
    assert (await driver.ensure_app(update, kubeconfig)).outcome is StepOutcome.DONE

    for _ in range(5):
        await asyncio.to_thread(argocd.reconcile)
        waiting = await driver.app_rollout(update, kubeconfig)
        assert waiting.outcome is StepOutcome.RETRY, waiting.message
    assert "Progressing" in waiting.message or "not yet available" in waiting.message


async def test_stop_then_start(cluster: Cluster, driver: KubernetesDriver) -> None:
    fake, argocd = cluster.need_fake()
    create, kubeconfig = await _running(driver, cluster)
    names = Names.of(create.deployment, driver.location)
    assert len(fake.objects("Pod", names.namespace)) == 2
    stop = _with(create, bus_pb2.OPERATION_STOP, 1)

    stopped = await until(lambda: driver.stop_app(stop, kubeconfig), argocd)
    assert stopped.outcome is StepOutcome.DONE, stopped.message
    assert fake.objects("Pod", names.namespace) == []
    committed = driver.repo.read(names.git_path)
    assert committed is not None
    assert yaml.safe_load(committed["deployment-shop.yaml"])["spec"]["replicas"] == 0
    # Volumes and config stay.
    assert fake.get("Deployment", "shop", "default", cluster=names.release) is not None

    asleep = await until(lambda: driver.sleep_vcluster(stop), argocd)
    assert asleep.outcome is StepOutcome.DONE, asleep.message
    control_plane = fake.get("StatefulSet", names.control_plane, names.namespace)
    assert control_plane is not None
    assert control_plane["spec"]["replicas"] == 0
    assert fake.get("PersistentVolumeClaim", f"data-{names.release}-0", names.namespace) is not None
    # Argo CD does not scale it back, and the vCluster stays down.
    await asyncio.to_thread(argocd.reconcile)
    control_plane = fake.get("StatefulSet", names.control_plane, names.namespace)
    assert control_plane is not None
    assert control_plane["spec"]["replicas"] == 0
    assert (await driver.sleep_vcluster(stop)).outcome is StepOutcome.DONE

    start = _with(create, bus_pb2.OPERATION_START, 1)
    woken = await driver.wake_vcluster(start)
    assert woken.outcome is StepOutcome.DONE, woken.message
    ready = await until(lambda: driver.vcluster_ready(start), argocd)
    assert ready.outcome is StepOutcome.DONE, ready.message
    applied = await driver.ensure_app(start, kubeconfig)
    assert applied.outcome is StepOutcome.DONE, applied.message
    rolled = await until(lambda: driver.app_rollout(start, kubeconfig), argocd)
    assert rolled.outcome is StepOutcome.DONE, rolled.message
    assert len(fake.objects("Pod", names.namespace)) == 2
    deployment = fake.get("Deployment", "shop", "default", cluster=names.release)
    assert deployment is not None
    assert deployment["spec"]["replicas"] == 2
    assert [s for s in _log(driver.repo.url) if "stop shop" in s]


def _legacy(cluster: Cluster) -> None:
    fake, _ = cluster.need_fake()
    fake.put(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "legacy", "labels": {"team": "web", "app.kubernetes.io/managed-by": "Helm"}},
        }
    )
    fake.put(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "old-web", "namespace": "legacy"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "old-web"}},
                "template": {
                    "metadata": {"labels": {"app": "old-web"}},
                    "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]},
                },
            },
        }
    )


def _adoption(**fields: Any) -> bus_pb2.ProvisionJob:
    adopt = job(bus_pb2.OPERATION_ADOPT, name="legacy-web", is_adopted=True, source_namespace="legacy", **fields)
    adopt.release = 1
    return adopt


async def test_adopting_a_present_namespace_labels_it_and_recreates_nothing(
    cluster: Cluster, driver: KubernetesDriver
) -> None:
    fake, _ = cluster.need_fake()
    _legacy(cluster)
    before = fake.get("Deployment", "old-web", "legacy")
    adopt = _adoption()

    adopted = await driver.adopt_namespace(adopt)

    assert adopted.outcome is StepOutcome.DONE, adopted.message
    namespace = fake.get("Namespace", "legacy")
    assert namespace is not None
    labels = namespace["metadata"]["labels"]
    assert labels["apphosting.dev/deployment-id"] == adopt.deployment.id
    # Another tool's claim is kept.
    assert labels["app.kubernetes.io/managed-by"] == "Helm"
    assert labels["team"] == "web"
    assert namespace["metadata"]["annotations"]["apphosting.dev/adopted"] == "true"
    assert fake.get("Deployment", "old-web", "legacy") == before
    again = await driver.adopt_namespace(adopt)
    assert "already adopted" in again.message

    other = _adoption(deployment_id="9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d")
    taken = await driver.adopt_namespace(other)
    assert taken.outcome is StepOutcome.FAIL
    assert taken.permanent
    assert adopt.deployment.id in taken.message


async def test_adopting_an_absent_namespace_fails_for_good(cluster: Cluster, driver: KubernetesDriver) -> None:
    cluster.need_fake()
    failed = await driver.adopt_namespace(_adoption())
    assert failed.outcome is StepOutcome.FAIL
    assert failed.permanent
    assert "legacy" in failed.message
    assert driver.location.id in failed.message


async def test_release_leaves_the_workloads_and_forced_delete_removes_them(
    cluster: Cluster, driver: KubernetesDriver
) -> None:
    fake, argocd = cluster.need_fake()
    _legacy(cluster)
    adopt = _adoption()
    assert (await driver.adopt_namespace(adopt)).outcome is StepOutcome.DONE
    delete = _with(adopt, bus_pb2.OPERATION_DELETE, 1)

    released = await driver.release_namespace(delete)

    assert released.outcome is StepOutcome.DONE, released.message
    namespace = fake.get("Namespace", "legacy")
    assert namespace is not None
    labels = namespace["metadata"]["labels"]
    assert "apphosting.dev/deployment-id" not in labels
    assert (labels["team"], labels["app.kubernetes.io/managed-by"]) == ("web", "Helm")
    assert "apphosting.dev/adopted" not in (namespace["metadata"].get("annotations") or {})
    assert fake.get("Deployment", "old-web", "legacy") is not None

    assert (await driver.adopt_namespace(adopt)).outcome is StepOutcome.DONE
    delete.force = True
    assert (await until(lambda: driver.delete_app(delete), argocd)).outcome is StepOutcome.DONE
    gone = await until(lambda: driver.delete_namespace(delete), argocd)
    assert gone.outcome is StepOutcome.DONE, gone.message
    assert fake.get("Namespace", "legacy") is None
    assert fake.get("Deployment", "old-web", "legacy") is None


@pytest.mark.parametrize("helm", [False, True], ids=["docker", "helm"])
async def test_a_new_release_of_an_unchanged_spec_is_still_committed(
    cluster: Cluster, driver: KubernetesDriver, helm: bool
) -> None:
    _, argocd = cluster.need_fake()
    fields: dict[str, Any] = {}
    if helm:
        fields = {
            "name": "blog",
            "app_type": deployments_pb2.APP_TYPE_HELM,
            "helm_repo_url": "https://charts.example.com/stable",
            "helm_chart_name": "wordpress",
        }
    create, kubeconfig = await _running(driver, cluster, **fields)
    # A rollback to release 1's spec is release 3: git and Argo CD must say 3.
    rollback = _with(create, bus_pb2.OPERATION_UPDATE, 3)
    assert (await driver.ensure_app(rollback, kubeconfig)).outcome is StepOutcome.DONE
    assert "release 3" in _log(driver.repo.url)[0]
    rolled = await until(lambda: driver.app_rollout(rollback, kubeconfig), argocd)
    assert rolled.outcome is StepOutcome.DONE, rolled.message
    assert "release 3" in rolled.message
