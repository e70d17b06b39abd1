"""A location's `image_updater`: under `platform` (the default) our updater does the work and the Applications
carry no Argo CD Image Updater annotations; under `argocd` they carry them for the operator's Image Updater."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from apphosting.locations import LocationConfig, LocationsFile
from apphosting.v1 import deployments_pb2
from provisioner.kubernetes import KubernetesDriver, Names, render
from tests.k8s.conftest import Cluster, location_config
from tests.k8s.schemas import application_errors, require_schemas
from tests.k8s.test_driver import Run, delete_of, job, public_dns

_Status = deployments_pb2.DeploymentStatus
REPO_URL = "https://git.example.com/platform/apps.git"
UPDATER = "argocd-image-updater.argoproj.io"
# A deployment that asks for image updates, as docker and as helm.
STRATEGY: dict[str, Any] = {
    "image_update_strategy": "semver",
    "image_update_constraint": "^1.2",
    "image_allow_tags": "regexp:^1\\.[0-9]+\\.[0-9]+$",
    "image_ignore_tags": "*-rc*,latest",
}
HELM: dict[str, Any] = {
    "app_type": deployments_pb2.APP_TYPE_HELM,
    "helm_repo_url": "https://charts.example.com/stable",
    "helm_chart_name": "shop",
    "helm_chart_version": "1.0.0",
}


def _location(**overrides: object) -> LocationConfig:
    return location_config(Path("/nonexistent/kubeconfig"), Path("/nonexistent/git"), **overrides)


def _updater_annotations(application: dict[str, object]) -> dict[str, str]:
    metadata = application["metadata"]
    assert isinstance(metadata, dict)
    annotations: dict[str, str] = metadata.get("annotations", {})
    return {key: value for key, value in annotations.items() if key.startswith(UPDATER)}


def test_the_platform_updater_is_the_default() -> None:
    assert _location().image_updater == "platform"


@pytest.mark.parametrize("kind", [{}, HELM], ids=["docker", "helm"])
def test_under_the_platform_updater_no_application_carries_image_updater_annotations(kind: dict[str, Any]) -> None:
    deployment = job(**STRATEGY, **kind).deployment
    location = _location()
    application = render.app_application(deployment, Names.of(deployment, location), location, REPO_URL, release=3)
    assert _updater_annotations(application) == {}
    # The release annotation the driver reads back is still there.
    assert application["metadata"]["annotations"]


@pytest.mark.parametrize("kind", [{}, HELM], ids=["docker", "helm"])
def test_under_argocd_the_application_carries_the_annotations_of_its_strategy(kind: dict[str, Any]) -> None:
    require_schemas()
    deployment = job(**STRATEGY, **kind).deployment
    location = _location(image_updater="argocd", git_branch="apps")
    application = render.app_application(deployment, Names.of(deployment, location), location, REPO_URL)
    assert application_errors(application) is None
    expected = {
        f"{UPDATER}/image-list": "app=ghcr.io/acme/shop:^1.2",
        f"{UPDATER}/app.update-strategy": "semver",
        f"{UPDATER}/write-back-method": "git",
        f"{UPDATER}/git-branch": "apps",
        f"{UPDATER}/app.allow-tags": "regexp:^1\\.[0-9]+\\.[0-9]+$",
        f"{UPDATER}/app.ignore-tags": "*-rc*,latest",
    }
    if kind:
        expected[f"{UPDATER}/app.helm.image-name"] = "image.repository"
        expected[f"{UPDATER}/app.helm.image-tag"] = "image.tag"
    assert _updater_annotations(application) == expected


def test_under_argocd_a_deployment_without_a_strategy_or_paused_by_a_rollback_gets_none() -> None:
    location = _location(image_updater="argocd")
    paused = job(**STRATEGY).deployment
    paused.image_updates_paused = True
    for deployment in (job().deployment, paused):
        application = render.app_application(deployment, Names.of(deployment, location), location, REPO_URL)
        assert _updater_annotations(application) == {}


def test_an_unknown_image_updater_is_refused_naming_the_field() -> None:
    fields = _location().model_dump()
    fields["image_updater"] = "flux"
    with pytest.raises(ValidationError) as refused:
        LocationsFile.model_validate({"locations": [fields]})
    (error,) = refused.value.errors()
    assert error["loc"] == ("locations", 0, "image_updater")
    assert "'platform' or 'argocd'" in error["msg"]


@pytest.mark.parametrize("mode", ["platform", "argocd"])
async def test_the_driver_writes_the_application_the_location_asks_for(
    cluster: Cluster, tmp_path: Path, mode: str
) -> None:
    fake, _ = cluster.need_fake()
    location = location_config(cluster.kubeconfig, tmp_path / "gitops", image_updater=mode)
    driver = KubernetesDriver(location, poll_after=0.25, resolver=public_dns)
    create = job(**STRATEGY)
    names = Names.of(create.deployment, location)

    last = await Run(driver, cluster)(create)

    assert last.status == _Status.DEPLOYMENT_STATUS_RUNNING, last.message
    application = fake.get("Application", names.app_application, "argocd")
    assert application is not None
    annotations = _updater_annotations(application)
    if mode == "platform":
        assert annotations == {}
    else:
        assert annotations[f"{UPDATER}/image-list"] == "app=ghcr.io/acme/shop:^1.2"
        assert annotations[f"{UPDATER}/git-branch"] == location.git_branch
    final = await Run(driver, cluster)(delete_of(create))
    assert final.final
