"""Fidelity of what the driver renders: the vcluster chart's schema, Argo CD's CRD, Kubernetes' own schemas."""

from __future__ import annotations

from pathlib import Path

import pytest

from apphosting.settings import KUBERNETES_VERSIONS
from apphosting.v1 import deployments_pb2
from provisioner.kubernetes import Names, render
from tests.k8s.conftest import location_config
from tests.k8s.schemas import application_errors, core_errors, require_schemas, vcluster_values_errors
from tests.k8s.test_driver import job

LOCATION = location_config(
    Path("/nonexistent/kubeconfig"), Path("/nonexistent/git"), storage_class="fast", ingress_class="nginx"
)


@pytest.mark.parametrize("version", [*KUBERNETES_VERSIONS, "1.34.2", "v1.33.1"])
def test_vcluster_values_fit_the_chart_schema(version: str) -> None:
    require_schemas()
    deployment = job(kubernetes_version=version, storage_size_gb=20, volumes=[{"path": "/x", "size_gb": 3}]).deployment
    values = render.vcluster_values(deployment, Names.of(deployment, LOCATION), LOCATION)
    assert vcluster_values_errors(values) is None
    assert values["controlPlane"]["distro"]["k8s"]["image"]["tag"].startswith(f"v{version.removeprefix('v')[:4]}")
    quota = values["policies"]["resourceQuota"]["quota"]
    assert quota["requests.storage"] == "28Gi"  # 20 + 3 + the control plane's 5
    assert quota["count/persistentvolumeclaims"] == 3


def test_an_unknown_version_is_refused() -> None:
    with pytest.raises(Exception, match="not offered"):
        render.distro_tag("1.20")


def _deployments() -> list[deployments_pb2.Deployment]:
    return [
        job(storage_size_gb=5, volumes=[{"path": "/data"}], environment_variables=["A=1"], run_as_uid=1001).deployment,
        job(image_update_strategy="digest", image_update_constraint="latest").deployment,
        job(
            app_type=deployments_pb2.APP_TYPE_HELM,
            helm_repo_url="oci://registry.example.com/charts",
            helm_chart_name="api",
            custom_values_yaml="service: {type: ClusterIP}\n",
        ).deployment,
    ]


@pytest.mark.parametrize("deployment", _deployments(), ids=["docker", "digest-updates", "helm"])
def test_applications_fit_the_argocd_crd(deployment: deployments_pb2.Deployment) -> None:
    require_schemas()
    names = Names.of(deployment, LOCATION)
    for application in (
        render.vcluster_application(deployment, names, LOCATION),
        render.app_application(deployment, names, LOCATION, "https://git.example.com/platform/apps.git"),
    ):
        assert application_errors(application) is None


@pytest.mark.parametrize("deployment", _deployments()[:2], ids=["docker", "digest-updates"])
def test_core_objects_fit_every_supported_kubernetes_version(deployment: deployments_pb2.Deployment) -> None:
    names = Names.of(deployment, LOCATION)
    objects = [render.namespace(names), *render.docker_manifests(deployment, names, LOCATION)]
    for obj in objects:
        assert core_errors(obj) is None, obj["kind"]
    # The data volume moved off /data, which a named volume already holds.
    mounts = objects[1]["spec"]["template"]["spec"]["containers"][0].get("volumeMounts", [])
    assert len({m["mountPath"] for m in mounts}) == len(mounts)


def test_image_updater_follows_its_strategies() -> None:
    digest = render.image_updater_annotations(_deployments()[1], helm=False)
    assert digest["argocd-image-updater.argoproj.io/image-list"] == "app=ghcr.io/acme/shop:latest"
    assert digest["argocd-image-updater.argoproj.io/app.update-strategy"] == "digest"
    newest = job(image_update_strategy="newest-build", image_allow_tags="any").deployment
    annotations = render.image_updater_annotations(newest, helm=False)
    assert annotations["argocd-image-updater.argoproj.io/image-list"] == "app=ghcr.io/acme/shop"
    assert annotations["argocd-image-updater.argoproj.io/app.allow-tags"] == "any"
    assert render.image_updater_annotations(job().deployment, helm=False) == {}


def test_registry_ports_are_not_tags() -> None:
    assert render.split_image("registry.example.com:5000/team/app") == ("registry.example.com:5000/team/app", None)
    assert render.split_image("registry.example.com:5000/team/app:v2") == ("registry.example.com:5000/team/app", "v2")
