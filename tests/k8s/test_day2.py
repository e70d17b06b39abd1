"""Day-2 steps of the kubernetes driver, on the fakes or (APPHOSTING_TEST_KUBECONFIG) a real cluster: update,
stop and start, adoption and its release."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from apphosting.v1 import bus_pb2, deployments_pb2
from provisioner.driver import StepOutcome
from provisioner.kubernetes import KubernetesDriver, Names
from tests.k8s.conftest import IMAGE, IMAGE_V2, Cluster, ClusterReader, git_log, wait_for
from tests.k8s.test_driver import Run, delete_of, driver, helm_job, host_pods, job, ready_pods, until

# The driver fixture of the driver tests, shared here.
__all__ = ["driver"]

_Status = deployments_pb2.DeploymentStatus


async def _log(driver: KubernetesDriver) -> list[str]:
    return await asyncio.to_thread(git_log, driver.repo)


def _with(base: bus_pb2.ProvisionJob, operation: bus_pb2.Operation.ValueType, release: int) -> bus_pb2.ProvisionJob:
    changed = bus_pb2.ProvisionJob()
    changed.CopyFrom(base)
    changed.operation = operation
    changed.release = release
    changed.job_id = f"{base.job_id}-{operation}-{release}"
    return changed


async def _running(
    driver: KubernetesDriver, cluster: Cluster, *, helm: bool = False
) -> tuple[bus_pb2.ProvisionJob, str]:
    """A deployment created at release 1 and running; its job and the vCluster's kubeconfig."""
    create = helm_job() if helm else job()
    create.release = 1
    last = await Run(driver, cluster)(create)
    assert last.status == _Status.DEPLOYMENT_STATUS_RUNNING, last.message
    kubeconfig = await driver.read_kubeconfig(create)
    return create, kubeconfig.fields["kubeconfig"]


async def test_an_update_is_a_new_commit_synced_and_healthy_at_its_release(
    cluster: Cluster, driver: KubernetesDriver
) -> None:
    create, kubeconfig = await _running(driver, cluster)
    names = Names.of(create.deployment, driver.location)
    update = _with(create, bus_pb2.OPERATION_UPDATE, 2)
    update.deployment.docker_image = IMAGE_V2
    commits = len(await _log(driver))

    applied = await driver.ensure_app(update, kubeconfig)

    assert applied.outcome is StepOutcome.DONE, applied.message
    assert "release 2" in applied.message
    # Argo CD polls git only every few minutes: the new commit is synced on request.
    assert "sync requested" in applied.message
    log = await _log(driver)
    assert len(log) == commits + 1
    assert "release 2" in log[0]
    committed = driver.repo.read(names.git_path)
    assert committed is not None
    manifest = yaml.safe_load(committed["deployment-shop.yaml"])
    assert manifest["metadata"]["annotations"] == {"apphosting.dev/release": "2"}
    assert manifest["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE_V2
    application = cluster.read.get("Application", names.app_application, "argocd")
    assert application is not None
    assert application["metadata"]["annotations"]["apphosting.dev/release"] == "2"

    rolled = await until(lambda: driver.app_rollout(update, kubeconfig))

    assert rolled.outcome is StepOutcome.DONE, rolled.message
    assert "release 2" in rolled.message
    application = cluster.read.get("Application", names.app_application, "argocd")
    assert application is not None
    operation = application["status"]["operationState"]
    assert operation["phase"] == "Succeeded"
    assert {"name": "release", "value": "2"} in operation["operation"]["info"]
    assert operation["syncResult"]["revision"] == driver.repo.last_change(names.git_path)
    await wait_for("the app's 2 pods running the new image", lambda: ready_pods(cluster, names, IMAGE_V2, 2))

    # The same job again: already committed, nothing new in git, still healthy.
    again = await driver.ensure_app(update, kubeconfig)
    assert again.outcome is StepOutcome.DONE
    assert "already committed" in again.message
    assert len(await _log(driver)) == commits + 1
    assert (await driver.app_rollout(update, kubeconfig)).outcome is StepOutcome.DONE
    await Run(driver, cluster)(delete_of(create))


async def test_a_rollout_that_never_gets_healthy_keeps_retrying(cluster: Cluster, driver: KubernetesDriver) -> None:
    create, kubeconfig = await _running(driver, cluster)
    names = Names.of(create.deployment, driver.location)
    update = _with(create, bus_pb2.OPERATION_UPDATE, 2)
    # An image that never gets ready: one that does not exist, on a real cluster.
    broken = f"{IMAGE.rsplit(':', 1)[0]}:never-healthy"
    update.deployment.docker_image = broken
    assert (await driver.ensure_app(update, kubeconfig)).outcome is StepOutcome.DONE

    def broken_pods() -> list[dict[str, Any]]:
        return [p for p in host_pods(cluster, names) if p["spec"]["containers"][0]["image"] == broken]

    # Once the broken release's pods run (unready), Argo CD has synced it: the rollout still waits.
    await wait_for("pods of the broken image", broken_pods)
    waiting = await driver.app_rollout(update, kubeconfig)

    assert waiting.outcome is StepOutcome.RETRY, waiting.message
    assert "Progressing" in waiting.message or "not yet available" in waiting.message
    await Run(driver, cluster)(delete_of(create))


async def test_stop_then_start(cluster: Cluster, driver: KubernetesDriver) -> None:
    read = cluster.read
    create, kubeconfig = await _running(driver, cluster)
    names = Names.of(create.deployment, driver.location)
    await wait_for("the app's 2 pods", lambda: ready_pods(cluster, names, IMAGE, 2))
    stop = _with(create, bus_pb2.OPERATION_STOP, 1)

    stopped = await until(lambda: driver.stop_app(stop, kubeconfig))
    assert stopped.outcome is StepOutcome.DONE, stopped.message
    assert host_pods(cluster, names) == []
    committed = driver.repo.read(names.git_path)
    assert committed is not None
    assert yaml.safe_load(committed["deployment-shop.yaml"])["spec"]["replicas"] == 0
    # Volumes stay.
    assert read.list("PersistentVolumeClaim", names.namespace)

    # Done only once the controllers report the control plane down; Argo CD did not scale it back.
    asleep = await until(lambda: driver.sleep_vcluster(stop))
    assert asleep.outcome is StepOutcome.DONE, asleep.message
    control_plane = read.get("StatefulSet", names.control_plane, names.namespace)
    assert control_plane is not None
    assert control_plane["spec"]["replicas"] == 0
    assert read.get("PersistentVolumeClaim", f"data-{names.release}-0", names.namespace) is not None
    assert (await driver.sleep_vcluster(stop)).outcome is StepOutcome.DONE

    start = _with(create, bus_pb2.OPERATION_START, 1)
    woken = await driver.wake_vcluster(start)
    assert woken.outcome is StepOutcome.DONE, woken.message
    ready = await until(lambda: driver.vcluster_ready(start))
    assert ready.outcome is StepOutcome.DONE, ready.message
    applied = await driver.ensure_app(start, kubeconfig)
    assert applied.outcome is StepOutcome.DONE, applied.message
    rolled = await until(lambda: driver.app_rollout(start, kubeconfig))
    assert rolled.outcome is StepOutcome.DONE, rolled.message
    await wait_for("the app's 2 pods back", lambda: ready_pods(cluster, names, IMAGE, 2))
    committed = driver.repo.read(names.git_path)
    assert committed is not None
    assert yaml.safe_load(committed["deployment-shop.yaml"])["spec"]["replicas"] == 2
    assert [s for s in await _log(driver) if "stop shop" in s]
    await Run(driver, cluster)(delete_of(create))


def _legacy(cluster: Cluster) -> None:
    """A namespace with a workload apphosting did not create, made through the API as any tool would."""
    cluster.read.create(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "legacy", "labels": {"team": "web", "app.kubernetes.io/managed-by": "Helm"}},
        }
    )
    cluster.read.create(
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


async def _forced_delete(driver: KubernetesDriver, adopt: bus_pb2.ProvisionJob) -> None:
    """A forced delete of an adopted namespace: it goes with everything in it."""
    delete = _with(adopt, bus_pb2.OPERATION_DELETE, 1)
    delete.force = True
    assert (await until(lambda: driver.delete_app(delete))).outcome is StepOutcome.DONE
    gone = await until(lambda: driver.delete_namespace(delete))
    assert gone.outcome is StepOutcome.DONE, gone.message


def _adoption(**fields: Any) -> bus_pb2.ProvisionJob:
    adopt = job(bus_pb2.OPERATION_ADOPT, name="legacy-web", is_adopted=True, source_namespace="legacy", **fields)
    adopt.release = 1
    return adopt


async def test_adopting_a_present_namespace_labels_it_and_recreates_nothing(
    cluster: Cluster, driver: KubernetesDriver
) -> None:
    read = cluster.read
    _legacy(cluster)
    before = read.get("Deployment", "old-web", "legacy")
    assert before is not None
    adopt = _adoption()

    adopted = await driver.adopt_namespace(adopt)

    assert adopted.outcome is StepOutcome.DONE, adopted.message
    namespace = read.get("Namespace", "legacy")
    assert namespace is not None
    labels = namespace["metadata"]["labels"]
    assert labels["apphosting.dev/deployment-id"] == adopt.deployment.id
    # Another tool's claim is kept.
    assert labels["app.kubernetes.io/managed-by"] == "Helm"
    assert labels["team"] == "web"
    assert namespace["metadata"]["annotations"]["apphosting.dev/adopted"] == "true"
    after = read.get("Deployment", "old-web", "legacy")
    assert after is not None
    assert (after["metadata"]["generation"], after["spec"]) == (before["metadata"]["generation"], before["spec"])
    again = await driver.adopt_namespace(adopt)
    assert "already adopted" in again.message

    other = _adoption(deployment_id="9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d")
    taken = await driver.adopt_namespace(other)
    assert taken.outcome is StepOutcome.FAIL
    assert taken.permanent
    assert adopt.deployment.id in taken.message
    await _forced_delete(driver, adopt)


async def test_adopting_an_absent_namespace_fails_for_good(cluster: Cluster, driver: KubernetesDriver) -> None:
    failed = await driver.adopt_namespace(_adoption())
    assert failed.outcome is StepOutcome.FAIL
    assert failed.permanent
    assert "legacy" in failed.message
    assert driver.location.id in failed.message


async def test_release_leaves_the_workloads_and_forced_delete_removes_them(
    cluster: Cluster, driver: KubernetesDriver
) -> None:
    read = cluster.read
    _legacy(cluster)
    adopt = _adoption()
    assert (await driver.adopt_namespace(adopt)).outcome is StepOutcome.DONE
    delete = _with(adopt, bus_pb2.OPERATION_DELETE, 1)

    released = await driver.release_namespace(delete)

    assert released.outcome is StepOutcome.DONE, released.message
    namespace = read.get("Namespace", "legacy")
    assert namespace is not None
    labels = namespace["metadata"]["labels"]
    assert "apphosting.dev/deployment-id" not in labels
    assert (labels["team"], labels["app.kubernetes.io/managed-by"]) == ("web", "Helm")
    assert "apphosting.dev/adopted" not in (namespace["metadata"].get("annotations") or {})
    assert read.get("Deployment", "old-web", "legacy") is not None

    assert (await driver.adopt_namespace(adopt)).outcome is StepOutcome.DONE
    await _forced_delete(driver, adopt)
    assert read.get("Namespace", "legacy") is None
    assert read.get("Deployment", "old-web", "legacy") is None


@pytest.mark.parametrize("helm", [False, True], ids=["docker", "helm"])
async def test_a_new_release_of_an_unchanged_spec_is_still_committed(
    cluster: Cluster, driver: KubernetesDriver, helm: bool
) -> None:
    create, kubeconfig = await _running(driver, cluster, helm=helm)
    # A rollback to release 1's spec is release 3: git and Argo CD must say 3.
    rollback = _with(create, bus_pb2.OPERATION_UPDATE, 3)
    assert (await driver.ensure_app(rollback, kubeconfig)).outcome is StepOutcome.DONE
    assert "release 3" in (await _log(driver))[0]
    rolled = await until(lambda: driver.app_rollout(rollback, kubeconfig))
    assert rolled.outcome is StepOutcome.DONE, rolled.message
    assert "release 3" in rolled.message
    await Run(driver, cluster)(delete_of(create))


@pytest.mark.fake_only(reason="reads inside the vCluster, whose API a real cluster does not expose to the test host")
async def test_an_update_gets_a_new_replica_set_and_the_old_one_scales_to_zero(
    cluster: Cluster, driver: KubernetesDriver, tmp_path: Path
) -> None:
    create, kubeconfig = await _running(driver, cluster)
    (tmp_path / "vcluster-kubeconfig").write_text(kubeconfig)
    inside = ClusterReader(tmp_path / "vcluster-kubeconfig")
    update = _with(create, bus_pb2.OPERATION_UPDATE, 2)
    update.deployment.docker_image = IMAGE_V2

    assert (await driver.ensure_app(update, kubeconfig)).outcome is StepOutcome.DONE
    rolled = await until(lambda: driver.app_rollout(update, kubeconfig))

    assert rolled.outcome is StepOutcome.DONE, rolled.message
    replica_sets = {
        rs["spec"]["template"]["spec"]["containers"][0]["image"]: (rs["spec"]["replicas"], rs["status"])
        for rs in inside.list("ReplicaSet", "default")
    }
    assert replica_sets[IMAGE][0] == 0
    assert replica_sets[IMAGE_V2] == (2, {"replicas": 2, "readyReplicas": 2, "availableReplicas": 2})
    deployment = inside.get("Deployment", "shop", "default")
    assert deployment is not None
    assert deployment["status"]["observedGeneration"] == deployment["metadata"]["generation"]
    assert deployment["status"]["readyReplicas"] == 2
    inside.close()
    await Run(driver, cluster)(delete_of(create))
