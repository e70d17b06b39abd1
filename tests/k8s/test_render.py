"""Fidelity of what the driver renders: the vcluster chart's schema, Argo CD's CRD, Kubernetes' own schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from apphosting.locations import LocationConfig
from apphosting.settings import KUBERNETES_VERSIONS
from apphosting.v1 import deployments_pb2
from provisioner.driver import PermanentError
from provisioner.kubernetes import Names, render
from tests.k8s.conftest import BASE_DOMAIN, location_config
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


def test_a_rollback_pauses_the_image_updater() -> None:
    paused = job(image_update_strategy="newest-build", image_allow_tags="any").deployment
    paused.image_updates_paused = True
    assert render.image_updater_annotations(paused, helm=False) == {}


def test_registry_ports_are_not_tags() -> None:
    assert render.split_image("registry.example.com:5000/team/app") == ("registry.example.com:5000/team/app", None)
    assert render.split_image("registry.example.com:5000/team/app:v2") == ("registry.example.com:5000/team/app", "v2")


def _container(deployment: deployments_pb2.Deployment, location: LocationConfig = LOCATION) -> dict[str, Any]:
    manifests = render.docker_manifests(deployment, Names.of(deployment, location), location)
    container: dict[str, Any] = manifests[0]["spec"]["template"]["spec"]["containers"][0]
    return container


def test_probes_open_the_port_by_default_and_ask_the_configured_path() -> None:
    tcp = _container(job().deployment)
    assert tcp["readinessProbe"]["tcpSocket"] == {"port": "http"}
    assert tcp["livenessProbe"]["tcpSocket"] == {"port": "http"}
    configured = job().deployment
    configured.config.update({"health_check_path": "/healthz"})
    http = _container(configured)
    assert http["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert http["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    helm = job(app_type=deployments_pb2.APP_TYPE_HELM, helm_repo_url="https://c.example.com", helm_chart_name="x")
    helm.deployment.config.update({"health_check_path": "/ready"})
    values = render.helm_values(helm.deployment, Names.of(helm.deployment, LOCATION), LOCATION)
    assert values["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert "livenessProbe" not in render.helm_values(job().deployment, Names.of(job().deployment, LOCATION), LOCATION)
    broken = job().deployment
    broken.config.update({"health_check_path": 3})
    with pytest.raises(PermanentError, match="health_check_path"):
        _container(broken)


def _ingress(location: LocationConfig) -> dict[str, Any]:
    deployment = job().deployment
    ingress: dict[str, Any] = render.docker_manifests(deployment, Names.of(deployment, location), location)[-1]
    assert ingress["kind"] == "Ingress"
    assert core_errors(ingress) is None
    return ingress


def test_ingress_tls_from_cert_manager_a_wildcard_secret_or_none() -> None:
    host = f"shop-3f2b8c1d.{BASE_DOMAIN}"
    issued = _ingress(location_config(Path("/k"), Path("/g"), tls_cluster_issuer="letsencrypt-prod"))
    assert issued["metadata"]["annotations"] == {"cert-manager.io/cluster-issuer": "letsencrypt-prod"}
    assert issued["spec"]["tls"] == [{"hosts": [host], "secretName": "shop-tls"}]
    wildcard = _ingress(location_config(Path("/k"), Path("/g"), tls_secret="wildcard-apps"))
    assert "annotations" not in wildcard["metadata"]
    assert wildcard["spec"]["tls"] == [{"hosts": [host], "secretName": "wildcard-apps"}]
    plain = _ingress(LOCATION)
    assert "tls" not in plain["spec"]
    with pytest.raises(ValidationError, match="not both"):
        location_config(Path("/k"), Path("/g"), tls_cluster_issuer="x", tls_secret="y")
    helm = job(app_type=deployments_pb2.APP_TYPE_HELM, helm_repo_url="https://c.example.com", helm_chart_name="x")
    located = location_config(Path("/k"), Path("/g"), tls_cluster_issuer="letsencrypt-prod")
    values = render.helm_values(helm.deployment, Names.of(helm.deployment, located), located)
    assert values["ingress"]["tls"] == [{"hosts": [host], "secretName": "shop-tls"}]
    assert values["ingress"]["annotations"] == {"cert-manager.io/cluster-issuer": "letsencrypt-prod"}


def test_the_release_is_on_every_object_but_not_the_pod_template() -> None:
    deployment = job(storage_size_gb=5).deployment
    names = Names.of(deployment, LOCATION)
    manifests = render.docker_manifests(deployment, names, LOCATION, release=7)
    assert all(m["metadata"]["annotations"]["apphosting.dev/release"] == "7" for m in manifests)
    assert "annotations" not in manifests[0]["spec"]["template"]["metadata"]
    stopped = render.docker_manifests(deployment, names, LOCATION, release=7, stopped=True)
    assert stopped[0]["spec"]["replicas"] == 0
    assert render.app_files(deployment, names, LOCATION, release=7) != render.app_files(
        deployment, names, LOCATION, release=8
    )
