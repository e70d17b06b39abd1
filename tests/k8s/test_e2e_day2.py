"""Day-2 operations end to end on the kubernetes driver: gRPC, the real bus, scheduler and provisioner, the
fake API server and fake Argo CD, on both databases."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from apphosting.v1 import deployments_pb2 as pb
from provisioner.driver import host_namespace_name
from tests.e2e.test_day2 import at_rest, request, until, update
from tests.k8s.conftest import K8sStack

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub as Stub

RUNNING = pb.DEPLOYMENT_STATUS_RUNNING
STOPPED = pb.DEPLOYMENT_STATUS_STOPPED
LOCATION = "eu-k8s-a"
# A kubernetes deployment takes many steps through two fakes: every wait is generous.
WITHIN = 120.0


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", str(repo), *args], capture_output=True, text=True, check=True).stdout


def _log(repo: Path) -> list[str]:
    """Commit subjects of the GitOps repository's main branch, newest first."""
    return _git(repo, "log", "--format=%s", "main").splitlines()


def _committed_deployment(repo: Path, git_path: str) -> dict[str, Any]:
    """The app's Deployment manifest as committed under `git_path` on main."""
    for name in _git(repo, "ls-tree", "--name-only", f"main:{git_path}").split():
        for document in yaml.safe_load_all(_git(repo, "show", f"main:{git_path}/{name}")):
            if isinstance(document, dict) and document.get("kind") == "Deployment":
                return document
    raise AssertionError(f"no Deployment committed under {git_path}")


def _release_name(deployment: pb.Deployment) -> str:
    """The vCluster's release name, the last part of the deployment's git path."""
    return deployment.git_path.rsplit("/", 1)[1]


async def _running(stub: Stub, name: str, **fields: Any) -> pb.Deployment:
    created = await stub.CreateAppHostingDeployment(request(name, **fields))
    seen = await until(stub, created.id, at_rest(RUNNING, 1), within=WITHIN)
    done = seen[-1].deployment
    assert done.status == RUNNING, done.error_message
    assert done.location_id == LOCATION
    return done


async def _pipeline(k8s: K8sStack, **api_options: Any) -> Stub:
    stub = await k8s.stack.add_api(**api_options)
    k8s.stack.add_scheduler()
    k8s.stack.add_provisioner()
    return stub


async def test_an_image_update_is_a_new_commit_synced_and_healthy_at_release_2(k8s_stack: K8sStack) -> None:
    stub = await _pipeline(k8s_stack)
    web = await _running(stub, "web", container_port=8080)
    release = _release_name(web)
    commits = len(_log(k8s_stack.repo))

    answer = await stub.UpdateDeployment(update(web.id, "docker_image", docker_image="ghcr.io/acme/web:1.1.0"))
    assert answer.release == 2
    seen = await until(stub, web.id, at_rest(RUNNING, 2), since=web.revision, within=WITHIN)

    done = seen[-1].deployment
    assert done.healthy_release == 2, done.error_message
    assert all(item.deployment.status == RUNNING for item in seen)
    log = _log(k8s_stack.repo)
    assert len(log) > commits
    assert "release 2" in log[0]
    committed = _committed_deployment(k8s_stack.repo, web.git_path)
    assert committed["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/acme/web:1.1.0"
    application = k8s_stack.fake.get("Application", f"{release}-app", "argocd")
    assert application is not None
    assert application["metadata"]["annotations"]["apphosting.dev/release"] == "2"
    assert application["status"]["sync"]["revision"] == _git(k8s_stack.repo, "rev-parse", "main").strip()
    running = k8s_stack.fake.get("Deployment", "web", "default", cluster=release)
    assert running is not None
    assert running["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/acme/web:1.1.0"
    assert running["metadata"]["annotations"]["apphosting.dev/release"] == "2"
    releases = (await stub.ListReleases(pb.ListReleasesRequest(id=web.id))).releases
    assert [(r.number, r.healthy, r.spec.docker_image) for r in releases] == [
        (2, True, "ghcr.io/acme/web:1.1.0"),
        (1, True, "ghcr.io/acme/web:1.0.0"),
    ]


async def test_a_release_that_never_gets_healthy_is_rolled_back_by_itself(k8s_stack: K8sStack) -> None:
    stub = await _pipeline(k8s_stack, rollout_timeout=2.0)
    web = await _running(stub, "web")
    release = _release_name(web)

    await stub.UpdateDeployment(update(web.id, "docker_image", docker_image="ghcr.io/acme/web:never-healthy"))
    seen = await until(stub, web.id, at_rest(RUNNING, 3), since=web.revision, within=WITHIN)

    done = seen[-1].deployment
    assert done.release == 3
    assert done.healthy_release == 3, done.error_message
    assert done.docker_image == "ghcr.io/acme/web:1.0.0"
    assert "release 2 did not become healthy" in done.error_message
    assert "rolled back to release 1" in done.error_message
    events = [item.event for item in seen if item.HasField("event")]
    assert any(e.operation == "rollback" and "rolled back" in e.message for e in events)
    # Both releases went through git: the broken one, then the rollback to release 1's spec.
    log = _log(k8s_stack.repo)
    assert "release 3" in log[0]
    assert any("release 2" in subject for subject in log)
    committed = _committed_deployment(k8s_stack.repo, web.git_path)
    assert committed["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/acme/web:1.0.0"
    running = k8s_stack.fake.get("Deployment", "web", "default", cluster=release)
    assert running is not None
    assert running["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/acme/web:1.0.0"
    assert running["metadata"]["annotations"]["apphosting.dev/release"] == "3"
    releases = (await stub.ListReleases(pb.ListReleasesRequest(id=web.id))).releases
    assert [(r.number, r.operation, r.healthy, r.rollback_of) for r in releases] == [
        (3, "rollback-automatic", True, 1),
        (2, "update", False, 0),
        (1, "create", True, 0),
    ]


async def test_stop_scales_the_app_and_control_plane_to_zero_and_start_restores_them(k8s_stack: K8sStack) -> None:
    stub = await _pipeline(k8s_stack)
    web = await _running(stub, "web", replicas=2)
    release = _release_name(web)
    namespace = host_namespace_name(web)

    await stub.StopDeployment(pb.StopDeploymentRequest(id=web.id))
    stopped = (await until(stub, web.id, at_rest(STOPPED), since=web.revision, within=WITHIN))[-1].deployment

    assert stopped.status == STOPPED, stopped.error_message
    assert stopped.phase == "stopped"
    control_plane = k8s_stack.fake.get("StatefulSet", release, namespace)
    assert control_plane is not None
    assert control_plane["spec"]["replicas"] == 0
    assert _committed_deployment(k8s_stack.repo, web.git_path)["spec"]["replicas"] == 0
    assert any("stop web" in subject for subject in _log(k8s_stack.repo))
    # Volumes and the app's objects stay while it sleeps.
    assert k8s_stack.fake.get("PersistentVolumeClaim", f"data-{release}-0", namespace) is not None
    assert k8s_stack.fake.get("Deployment", "web", "default", cluster=release) is not None

    await stub.StartDeployment(pb.StartDeploymentRequest(id=web.id))
    back = (await until(stub, web.id, at_rest(RUNNING, 1), since=stopped.revision, within=WITHIN))[-1].deployment

    assert back.status == RUNNING, back.error_message
    assert back.endpoint_url
    control_plane = k8s_stack.fake.get("StatefulSet", release, namespace)
    assert control_plane is not None
    assert control_plane["spec"]["replicas"] == 1
    assert _committed_deployment(k8s_stack.repo, web.git_path)["spec"]["replicas"] == 2
    app = k8s_stack.fake.get("Deployment", "web", "default", cluster=release)
    assert app is not None
    assert app["spec"]["replicas"] == 2


def _legacy(k8s: K8sStack, namespace: str) -> None:
    """A namespace with a workload that apphosting did not create."""
    k8s.fake.put(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": namespace, "labels": {"team": "web"}},
        }
    )
    k8s.fake.put(
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
    found = k8s.fake.get("Namespace", namespace)
    assert found is not None
    assert found["metadata"]["labels"]["apphosting.dev/deployment-id"] == done.id
    assert found["metadata"]["labels"]["team"] == "web"
    return done


async def test_adopt_then_delete_releases_the_namespace_and_a_forced_delete_removes_it(k8s_stack: K8sStack) -> None:
    stub = await _pipeline(k8s_stack)
    _legacy(k8s_stack, "legacy-shop")
    _legacy(k8s_stack, "legacy-blog")
    before = k8s_stack.fake.get("Deployment", "old-web", "legacy-shop")
    shop = await _adopted(stub, k8s_stack, "legacy-shop")
    blog = await _adopted(stub, k8s_stack, "legacy-blog")
    # Adoption recreates nothing: no vCluster, no Application, the workload as it was.
    assert k8s_stack.fake.objects("Application", "argocd") == []
    assert k8s_stack.fake.get("Deployment", "old-web", "legacy-shop") == before

    await stub.DeleteDeployment(pb.DeleteDeploymentRequest(id=shop.id))
    gone = (await until(stub, shop.id, lambda d: d.HasField("deleted_at"), within=WITHIN))[-1]
    assert gone.event.final

    released = k8s_stack.fake.get("Namespace", "legacy-shop")
    assert released is not None
    labels = released["metadata"]["labels"]
    assert "apphosting.dev/deployment-id" not in labels
    assert labels["team"] == "web"
    assert "apphosting.dev/adopted" not in (released["metadata"].get("annotations") or {})
    assert k8s_stack.fake.get("Deployment", "old-web", "legacy-shop") is not None

    await stub.DeleteDeployment(pb.DeleteDeploymentRequest(id=blog.id, force=True))
    forced = (await until(stub, blog.id, lambda d: d.HasField("deleted_at"), within=WITHIN))[-1]
    assert forced.event.final

    assert k8s_stack.fake.get("Namespace", "legacy-blog") is None
    assert k8s_stack.fake.get("Deployment", "old-web", "legacy-blog") is None
    assert k8s_stack.fake.get("Namespace", "legacy-shop") is not None
