"""The shared domain facts agree wherever they are used: quota, scheduler reservation and rendered pods."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apphosting import images, resources, versions
from apphosting.settings import Limits
from apphosting.v1 import deployments_pb2
from provisioner.driver import PermanentError
from provisioner.kubernetes import Names, render
from scheduler.placement import demand_of as reservation_of
from services.deployments.quotas import demand_of as quota_of
from services.deployments.validation import DeploymentSpec, validate_create
from tests.k8s.conftest import location_config

LIMITS = Limits()
LOCATION = location_config(Path("/nonexistent/kubeconfig"), Path("/nonexistent/git"))

_unset = st.none()
requests = st.fixed_dictionaries(
    {
        "geographic_region": st.just("eu"),
        "deployment_name": st.just("shop"),
        "app_type": st.sampled_from(["web_app", "api", "container"]),
        "docker_image": st.just("ghcr.io/acme/shop:1.2.0"),
        "cpu_request": _unset | st.integers(1, round(LIMITS.cpu_request_max * 1000)).map(lambda m: m / 1000),
        "memory_request_mb": _unset | st.integers(LIMITS.memory_request_mb_min, LIMITS.memory_request_mb_max),
        "replicas": _unset | st.integers(1, LIMITS.replicas_max),
        "storage_size_gb": _unset | st.integers(1, LIMITS.storage_size_gb_max),
        "volumes": st.lists(_unset | st.integers(1, LIMITS.volume_size_gb_max), max_size=4).map(
            lambda sizes: [{"path": f"/mnt/v{i}", "sizeGb": size} for i, size in enumerate(sizes)]
        ),
    }
)


def _deployment(spec: DeploymentSpec) -> deployments_pb2.Deployment:
    """The Deployment the scheduler and the provisioner receive for a stored spec: unset stays unset."""
    dumped = spec.model_dump(exclude_none=True)
    volumes = dumped.pop("volumes", [])
    fields = ("cpu_request", "memory_request_mb", "replicas", "storage_size_gb", "docker_image")
    message = deployments_pb2.Deployment(
        id="3f2b8c1d-9e4a-4b7c-8d2e-1a2b3c4d5e6f",
        name=spec.deployment_name,
        geographic_region=spec.geographic_region,
        app_type=deployments_pb2.APP_TYPE_WEB_APP,
        **{name: dumped[name] for name in fields if name in dumped},
    )
    for volume in volumes:
        message.volumes.add(path=volume["path"], size_gb=volume["size_gb"])
    return message


def _millicores(quantity: str) -> int:
    assert quantity.endswith("m"), quantity
    return int(quantity[:-1])


def _quantity(quantity: str, unit: str) -> int:
    assert quantity.endswith(unit), quantity
    return int(quantity.removesuffix(unit))


def _rendered(d: deployments_pb2.Deployment) -> tuple[int, int, int]:
    """cpu millicores, memory MiB and storage GiB the rendered objects request, over all replicas."""
    manifests = render.docker_manifests(d, Names.of(d, LOCATION), LOCATION)
    (deployment,) = (m for m in manifests if m["kind"] == "Deployment")
    replicas = deployment["spec"]["replicas"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    asked = container["resources"]["requests"]
    storage = sum(
        _quantity(m["spec"]["resources"]["requests"]["storage"], "Gi")
        for m in manifests
        if m["kind"] == "PersistentVolumeClaim"
    )
    return _millicores(asked["cpu"]) * replicas, _quantity(asked["memory"], "Mi") * replicas, storage


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests)
def test_quota_reservation_and_rendered_requests_agree(request: dict[str, Any]) -> None:
    spec = validate_create(request, limits=LIMITS, regions={"eu"})
    quota = quota_of(spec)
    deployment = _deployment(spec)
    reservation = reservation_of(deployment)
    cpu_m, memory_mi, storage_gi = _rendered(deployment)

    assert quota.cpu_millis == round(reservation.cpu * 1000) == cpu_m
    assert quota.memory_mb == reservation.memory_mb == memory_mi
    assert quota.storage_gb == reservation.storage_gb == storage_gi


def test_an_unset_request_gets_the_kernel_defaults_everywhere() -> None:
    spec = validate_create(
        {"geographic_region": "eu", "deployment_name": "shop", "app_type": "web_app", "docker_image": "nginx:1.27"},
        limits=LIMITS,
        regions={"eu"},
    )
    assert _rendered(_deployment(spec)) == (
        round(resources.DEFAULT_CPU * 1000) * resources.DEFAULT_REPLICAS,
        resources.DEFAULT_MEMORY_MB * resources.DEFAULT_REPLICAS,
        0,
    )
    # A volume with no size is the same size to the API, the scheduler and the provisioner.
    bare = deployments_pb2.Deployment(docker_image="nginx:1.27")
    bare.volumes.add(path="/data")
    assert reservation_of(bare).storage_gb == resources.DEFAULT_VOLUME_SIZE_GB == _rendered(bare)[2]
    with_volume = validate_create(
        {**spec.model_dump(exclude_none=True), "volumes": [{"path": "/data"}]}, limits=LIMITS, regions={"eu"}
    )
    assert [volume.size_gb for volume in with_volume.volumes or ()] == [resources.DEFAULT_VOLUME_SIZE_GB]


def test_every_offered_kubernetes_version_has_a_pinned_image_and_passes_validation() -> None:
    assert LIMITS.kubernetes_versions == versions.KUBERNETES_VERSIONS
    assert versions.DEFAULT_KUBERNETES_VERSION in versions.KUBERNETES_VERSIONS
    for version in versions.KUBERNETES_VERSIONS:
        assert render.distro_tag(version) == versions.DISTRO_TAGS[version]
        base = {"geographic_region": "eu", "deployment_name": "shop", "helm_repo_url": "https://charts.example.com"}
        validate_create(
            {**base, "helm_chart_name": "web", "kubernetes_version": version}, limits=LIMITS, regions={"eu"}
        )


@given(
    name=st.sampled_from(["nginx", "acme/web", "registry.example.com:5000/team/app", "localhost/x", "Ghcr.IO/a/b"]),
    tag=st.none() | st.sampled_from(["1.27", "v1.2.3-rc.1", "latest"]),
    digest=st.none() | st.just("sha256:" + "a" * 64),
)
def test_image_references_split_the_same_for_validation_and_rendering(
    name: str, tag: str | None, digest: str | None
) -> None:
    reference = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    assert images.split(reference) == (name, tag, digest)
    assert render.split_image(reference) == (name, tag)
    registry = name.partition("/")[0] if "/" in name and name.partition("/")[0] != "acme" else "docker.io"
    assert images.registry(reference) == registry


def test_the_provisioner_reads_custom_values_with_the_apis_yaml_bounds() -> None:
    # A document stored before a bound existed is refused by the renderer, not expanded.
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
    )
    d = deployments_pb2.Deployment(
        id="3f2b8c1d-9e4a-4b7c-8d2e-1a2b3c4d5e6f", name="shop", geographic_region="eu", custom_values_yaml=laughs
    )
    with pytest.raises(PermanentError, match="custom_values_yaml"):
        render.helm_values(d, Names.of(d, LOCATION), LOCATION)
    d.custom_values_yaml = "service: {type: ClusterIP}\n"
    assert render.helm_values(d, Names.of(d, LOCATION), LOCATION)["service"] == {"type": "ClusterIP"}
