"""Day-2 operations end to end on the kubernetes driver: gRPC, the real bus, scheduler and provisioner, the
cluster (the fakes, or a real one with APPHOSTING_TEST_KUBECONFIG), on both databases."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any

import yaml

from apphosting.v1 import deployments_pb2 as pb
from provisioner.driver import host_namespace_name
from provisioner.kubernetes import Names
from tests.e2e.test_day2 import at_rest, request, until, update
from tests.k8s.conftest import IMAGE, IMAGE_V2, REAL_KUBECONFIG, WITHIN, K8sStack, git_log, wait_for
from tests.k8s.test_driver import ready_pods

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub as Stub

RUNNING = pb.DEPLOYMENT_STATUS_RUNNING
STOPPED = pb.DEPLOYMENT_STATUS_STOPPED
LOCATION = "eu-k8s-a"
# How long a release may take to get healthy before it is rolled back: short on the fakes, whose
# broken image is known at once; a real cluster needs time to pull and start even a good one.
ROLLOUT_TIMEOUT = 180.0 if REAL_KUBECONFIG else 2.0


async def _log(k8s: K8sStack) -> list[str]:
    """Commit subjects of the GitOps repository's main branch, newest first."""
    return await asyncio.to_thread(git_log, k8s.gitops)


def _committed_deployment(k8s: K8sStack, git_path: str) -> dict[str, Any]:
    """The app's Deployment manifest as committed under `git_path` on main."""
    files = k8s.gitops.read(git_path) or {}
    for text in files.values():
        for document in yaml.safe_load_all(text):
            if isinstance(document, dict) and document.get("kind") == "Deployment":
                return document
    raise AssertionError(f"no Deployment committed under {git_path}")


def _release_name(deployment: pb.Deployment) -> str:
    """The vCluster's release name, the last part of the deployment's git path."""
    return deployment.git_path.rsplit("/", 1)[1]


async def _running(stub: Stub, name: str, **fields: Any) -> pb.Deployment:
    created = await stub.CreateAppHostingDeployment(request(name, **{"docker_image": IMAGE, **fields}))
    seen = await until(stub, created.id, at_rest(RUNNING, 1), within=WITHIN)
    done = seen[-1].deployment
    assert done.status == RUNNING, done.error_message
    assert done.location_id == LOCATION
    return done


async def _delete(stub: Stub, deployment: pb.Deployment) -> None:
    """Deletes the deployment and waits until it is gone, so a real cluster keeps nothing of the test."""
    await stub.DeleteDeployment(pb.DeleteDeploymentRequest(id=deployment.id))
    gone = await until(stub, deployment.id, lambda d: d.HasField("deleted_at"), within=WITHIN)
    assert gone[-1].event.final


async def _pipeline(k8s: K8sStack, **api_options: Any) -> Stub:
    stub = await k8s.stack.add_api(**api_options)
    k8s.stack.add_scheduler()
    k8s.stack.add_provisioner()
    return stub


async def test_an_image_update_is_a_new_commit_synced_and_healthy_at_release_2(k8s_stack: K8sStack) -> None:
    stub = await _pipeline(k8s_stack)
    web = await _running(stub, "web", container_port=8080)
    release = _release_name(web)
    commits = len(await _log(k8s_stack))

    answer = await stub.UpdateDeployment(update(web.id, "docker_image", docker_image=IMAGE_V2))
    assert answer.release == 2
    seen = await until(stub, web.id, at_rest(RUNNING, 2), since=web.revision, within=WITHIN)

    done = seen[-1].deployment
    assert done.healthy_release == 2, done.error_message
    assert all(item.deployment.status == RUNNING for item in seen)
    log = await _log(k8s_stack)
    assert len(log) > commits
    assert "release 2" in log[0]
    committed = _committed_deployment(k8s_stack, web.git_path)
    assert committed["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE_V2
    assert committed["metadata"]["annotations"]["apphosting.dev/release"] == "2"
    application = k8s_stack.read.get("Application", f"{release}-app", "argocd")
    assert application is not None
    assert application["metadata"]["annotations"]["apphosting.dev/release"] == "2"
    # Argo CD synced a commit that holds release 2.
    release_2 = k8s_stack.gitops.last_change(web.git_path)
    assert release_2 is not None
    assert k8s_stack.gitops.contains(release_2, application["status"]["sync"]["revision"])
    names = Names.of(web, k8s_stack.location)
    await wait_for("the new image running", lambda: ready_pods(k8s_stack.cluster, names, IMAGE_V2, 1))
    releases = (await stub.ListReleases(pb.ListReleasesRequest(id=web.id))).releases
    assert [(r.number, r.healthy, r.spec.docker_image) for r in releases] == [(2, True, IMAGE_V2), (1, True, IMAGE)]
    await _delete(stub, done)


async def test_a_release_that_never_gets_healthy_is_rolled_back_by_itself(k8s_stack: K8sStack) -> None:
    stub = await _pipeline(k8s_stack, rollout_timeout=ROLLOUT_TIMEOUT)
    web = await _running(stub, "web")
    # An image that never gets ready: one that does not exist, on a real cluster.
    broken = f"{IMAGE.rsplit(':', 1)[0]}:never-healthy"

    await stub.UpdateDeployment(update(web.id, "docker_image", docker_image=broken))
    seen = await until(stub, web.id, at_rest(RUNNING, 3), since=web.revision, within=WITHIN)

    done = seen[-1].deployment
    assert done.release == 3
    assert done.healthy_release == 3, done.error_message
    assert done.docker_image == IMAGE
    assert "release 2 did not become healthy" in done.error_message
    assert "rolled back to release 1" in done.error_message
    events = [item.event for item in seen if item.HasField("event")]
    assert any(e.operation == "rollback" and "rolled back" in e.message for e in events)
    # Both releases went through git: the broken one, then the rollback to release 1's spec.
    log = await _log(k8s_stack)
    assert "release 3" in log[0]
    assert any("release 2" in subject for subject in log)
    committed = _committed_deployment(k8s_stack, web.git_path)
    assert committed["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE
    assert committed["metadata"]["annotations"]["apphosting.dev/release"] == "3"
    names = Names.of(web, k8s_stack.location)
    await wait_for("release 1's image running again", lambda: ready_pods(k8s_stack.cluster, names, IMAGE, 1))
    releases = (await stub.ListReleases(pb.ListReleasesRequest(id=web.id))).releases
    assert [(r.number, r.operation, r.healthy, r.rollback_of) for r in releases] == [
        (3, "rollback-automatic", True, 1),
        (2, "update", False, 0),
        (1, "create", True, 0),
    ]
    await _delete(stub, done)


async def test_stop_scales_the_app_and_control_plane_to_zero_and_start_restores_them(k8s_stack: K8sStack) -> None:
    stub = await _pipeline(k8s_stack)
    web = await _running(stub, "web", replicas=2)
    release = _release_name(web)
    namespace = host_namespace_name(web)

    await stub.StopDeployment(pb.StopDeploymentRequest(id=web.id))
    stopped = (await until(stub, web.id, at_rest(STOPPED), since=web.revision, within=WITHIN))[-1].deployment

    assert stopped.status == STOPPED, stopped.error_message
    assert stopped.phase == "stopped"
    control_plane = k8s_stack.read.get("StatefulSet", release, namespace)
    assert control_plane is not None
    assert control_plane["spec"]["replicas"] == 0
    assert _committed_deployment(k8s_stack, web.git_path)["spec"]["replicas"] == 0
    assert any("stop web" in subject for subject in await _log(k8s_stack))
    # Volumes stay while it sleeps; no pod of the app runs.
    assert k8s_stack.read.get("PersistentVolumeClaim", f"data-{release}-0", namespace) is not None
    names = Names.of(web, k8s_stack.location)
    assert k8s_stack.read.list("Pod", namespace, names.app_pods_selector) == []

    await stub.StartDeployment(pb.StartDeploymentRequest(id=web.id))
    back = (await until(stub, web.id, at_rest(RUNNING, 1), since=stopped.revision, within=WITHIN))[-1].deployment

    assert back.status == RUNNING, back.error_message
    assert back.endpoint_url
    control_plane = k8s_stack.read.get("StatefulSet", release, namespace)
    assert control_plane is not None
    assert control_plane["spec"]["replicas"] == 1
    assert _committed_deployment(k8s_stack, web.git_path)["spec"]["replicas"] == 2
    await wait_for("the app's 2 pods back", lambda: ready_pods(k8s_stack.cluster, names, IMAGE, 2))
    await _delete(stub, back)


def _legacy(k8s: K8sStack, namespace: str) -> None:
    """A namespace with a workload that apphosting did not create, made through the API as any tool would."""
    k8s.read.create(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": namespace, "labels": {"team": "web"}},
        }
    )
    k8s.read.create(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "old-web", "namespace": namespace},
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


async def _adopted(stub: Stub, k8s: K8sStack, namespace: str) -> pb.Deployment:
    adopted = await stub.AdoptDeployment(pb.AdoptDeploymentRequest(location=LOCATION, source_namespace=namespace))
    done = (await until(stub, adopted.id, at_rest(RUNNING, 1), within=WITHIN))[-1].deployment
    assert done.status == RUNNING, done.error_message
    assert done.is_adopted
    assert done.source_namespace == namespace
    assert done.location_id == LOCATION
    found = k8s.read.get("Namespace", namespace)
    assert found is not None
    assert found["metadata"]["labels"]["apphosting.dev/deployment-id"] == done.id
    assert found["metadata"]["labels"]["team"] == "web"
    return done


async def test_adopt_then_delete_releases_the_namespace_and_a_forced_delete_removes_it(k8s_stack: K8sStack) -> None:
    stub = await _pipeline(k8s_stack)
    # Fresh names: the released namespace stays, on a real cluster from one run to the next.
    shop_ns, blog_ns = f"legacy-shop-{uuid.uuid4().hex[:6]}", f"legacy-blog-{uuid.uuid4().hex[:6]}"
    _legacy(k8s_stack, shop_ns)
    _legacy(k8s_stack, blog_ns)
    before = k8s_stack.read.get("Deployment", "old-web", shop_ns)
    assert before is not None
    shop = await _adopted(stub, k8s_stack, shop_ns)
    blog = await _adopted(stub, k8s_stack, blog_ns)
    # Adoption recreates nothing: no vCluster, no Application, the workload as it was.
    for adopted in (shop, blog):
        names = Names.of(adopted, k8s_stack.location)
        assert k8s_stack.read.get("Application", names.app_application, "argocd") is None
        assert k8s_stack.read.get("Application", names.vcluster_application, "argocd") is None
    after = k8s_stack.read.get("Deployment", "old-web", shop_ns)
    assert after is not None
    assert (after["metadata"]["generation"], after["spec"]) == (before["metadata"]["generation"], before["spec"])

    await stub.DeleteDeployment(pb.DeleteDeploymentRequest(id=shop.id))
    gone = (await until(stub, shop.id, lambda d: d.HasField("deleted_at"), within=WITHIN))[-1]
    assert gone.event.final

    released = k8s_stack.read.get("Namespace", shop_ns)
    assert released is not None
    labels = released["metadata"]["labels"]
    assert "apphosting.dev/deployment-id" not in labels
    assert labels["team"] == "web"
    assert "apphosting.dev/adopted" not in (released["metadata"].get("annotations") or {})
    assert k8s_stack.read.get("Deployment", "old-web", shop_ns) is not None

    await stub.DeleteDeployment(pb.DeleteDeploymentRequest(id=blog.id, force=True))
    forced = (await until(stub, blog.id, lambda d: d.HasField("deleted_at"), within=WITHIN))[-1]
    assert forced.event.final

    assert k8s_stack.read.get("Namespace", blog_ns) is None
    assert k8s_stack.read.get("Deployment", "old-web", blog_ns) is None
    assert k8s_stack.read.get("Namespace", shop_ns) is not None
    k8s_stack.read.delete("Namespace", shop_ns)
