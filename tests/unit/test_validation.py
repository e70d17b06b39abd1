"""Tests of the create-request validation: each rule, and that all violations come back at once."""

from __future__ import annotations

from typing import Any

import pytest

from apphosting.settings import Limits
from services.deployments.validation import (
    FIELD_ORDER,
    DeploymentSpec,
    SpecInvalid,
    Violation,
    Volume,
    validate_create,
)

REGIONS = frozenset({"eu", "us", "asia"})
DROP = object()

DOCKER: dict[str, Any] = {
    "geographic_region": "eu",
    "deployment_name": "web",
    "app_type": "web_app",
    "docker_image": "nginx:1.27",
}
HELM: dict[str, Any] = {
    "geographic_region": "eu",
    "deployment_name": "shop",
    "app_type": "helm",
    "helm_repo_url": "https://charts.bitnami.com/bitnami",
    "helm_chart_name": "nginx",
}
# The reference's curl body, with realistic values in place of "example".
CONTRACT_EXAMPLE: dict[str, Any] = {
    "geographic_region": "eu",
    "deployment_name": "shop-frontend",
    "app_type": "helm",
    "config": {},
    "cpu_request": 0.5,
    "memory_request_mb": 512,
    "replicas": 1,
    "container_port": 8080,
    "environment_variables": ["LOG_LEVEL=info"],
    "docker_image": "ghcr.io/acme/shop:1.4.2",
    "storage_size_gb": 1,
    "volumes": [{"path": "/data", "sizeGb": 10, "purpose": "uploads"}],
    "run_as_uid": 1000,
    "deployment_type": "docker",
    "helm_repo_url": "https://charts.bitnami.com/bitnami",
    "helm_chart_name": "nginx",
    "helm_chart_version": "18.2.4",
    "custom_values_yaml": "replicaCount: 1\n",
    "image_update_strategy": "semver",
    "image_update_constraint": "^1.4",
    "image_allow_tags": "regexp:^1\\.[0-9]+\\.[0-9]+$",
    "image_ignore_tags": "*-rc*,latest",
    "kubernetes_version": "1.34",
}


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    data = {**base, **changes}
    return {key: value for key, value in data.items() if value is not DROP}


def _validate(data: dict[str, Any]) -> DeploymentSpec:
    return validate_create(data, limits=Limits(), regions=REGIONS)


def _violations(data: dict[str, Any]) -> tuple[Violation, ...]:
    with pytest.raises(SpecInvalid) as caught:
        _validate(data)
    return caught.value.violations


def test_valid_docker_request_passes_with_defaults() -> None:
    spec = _validate(DOCKER)
    assert spec.app_type == "web_app"
    assert spec.deployment_type == "docker"
    assert spec.docker_image == "nginx:1.27"
    assert spec.volumes is None


def test_valid_helm_request_passes_and_app_type_defaults_to_helm() -> None:
    spec = _validate(_with(HELM, app_type=DROP, helm_chart_version="v1.2.3-rc.1+build.5"))
    assert spec.app_type == "helm"
    assert spec.docker_image is None


def test_contract_example_validates() -> None:
    spec = _validate(CONTRACT_EXAMPLE)
    assert spec.volumes == [Volume(path="/data", size_gb=10, purpose="uploads")]
    assert spec.env_dict() == {"LOG_LEVEL": "info"}
    assert spec.model_dump(by_alias=True)["volumes"][0]["sizeGb"] == 10


def test_nulls_mean_unset_and_volume_size_defaults_to_10() -> None:
    data = _with(HELM, replicas=None, app_type=None, docker_image=None, volumes=[{"path": "/data", "sizeGb": None}])
    spec = _validate(data)
    assert spec.app_type == "helm"
    assert spec.replicas is None
    assert spec.volumes is not None
    assert spec.volumes[0].size_gb == 10


def test_env_dict_keeps_equals_signs_in_values() -> None:
    spec = _validate(_with(DOCKER, environment_variables=["URL=a=b", "EMPTY="]))
    assert spec.env_dict() == {"URL": "a=b", "EMPTY": ""}


LONG_ENV_VALUE = "x" * (Limits().environment_value_max_bytes + 1)

FAILING: list[tuple[str, dict[str, Any], str, str]] = [
    # geographic_region
    ("region missing", _with(DOCKER, geographic_region=DROP), "geographic_region", "REQUIRED"),
    ("region empty", _with(DOCKER, geographic_region=""), "geographic_region", "REQUIRED"),
    ("region unknown", _with(DOCKER, geographic_region="mars"), "geographic_region", "UNSUPPORTED"),
    ("region padded", _with(DOCKER, geographic_region=" eu"), "geographic_region", "INVALID_FORMAT"),
    ("region wrong type", _with(DOCKER, geographic_region=1), "geographic_region", "INVALID_TYPE"),
    # deployment_name
    ("name missing", _with(DOCKER, deployment_name=DROP), "deployment_name", "REQUIRED"),
    ("name uppercase", _with(DOCKER, deployment_name="Web"), "deployment_name", "INVALID_FORMAT"),
    ("name underscore", _with(DOCKER, deployment_name="my_app"), "deployment_name", "INVALID_FORMAT"),
    ("name ends with dash", _with(DOCKER, deployment_name="web-"), "deployment_name", "INVALID_FORMAT"),
    ("name too long", _with(DOCKER, deployment_name="a" * 54), "deployment_name", "TOO_LONG"),
    ("name padded", _with(DOCKER, deployment_name="web "), "deployment_name", "INVALID_FORMAT"),
    # app_type, deployment_type
    ("app_type unknown", _with(DOCKER, app_type="lambda"), "app_type", "UNSUPPORTED"),
    ("deployment_type git", _with(DOCKER, deployment_type="git"), "deployment_type", "UNSUPPORTED"),
    # helm vs image apps
    ("helm without repo", _with(HELM, helm_repo_url=DROP), "helm_repo_url", "REQUIRED"),
    ("helm without chart", _with(HELM, helm_chart_name=DROP), "helm_chart_name", "REQUIRED"),
    ("default app_type needs chart", _with(DOCKER, app_type=DROP), "helm_repo_url", "REQUIRED"),
    ("web_app without image", _with(DOCKER, docker_image=DROP), "docker_image", "REQUIRED"),
    ("repo on web_app", _with(DOCKER, helm_repo_url="https://c.example"), "helm_repo_url", "NOT_ALLOWED"),
    ("chart on api", _with(DOCKER, app_type="api", helm_chart_name="x"), "helm_chart_name", "NOT_ALLOWED"),
    ("version on container", _with(DOCKER, helm_chart_version="1.0.0"), "helm_chart_version", "NOT_ALLOWED"),
    ("values on static_site", _with(DOCKER, custom_values_yaml="a: 1"), "custom_values_yaml", "NOT_ALLOWED"),
    ("database without storage", _with(DOCKER, app_type="database"), "storage_size_gb", "REQUIRED"),
    (
        "database with empty volumes",
        _with(DOCKER, app_type="database", volumes=[]),
        "storage_size_gb",
        "REQUIRED",
    ),
    # helm_repo_url
    ("repo ftp", _with(HELM, helm_repo_url="ftp://charts.example"), "helm_repo_url", "INVALID_FORMAT"),
    ("repo relative", _with(HELM, helm_repo_url="charts.example/x"), "helm_repo_url", "INVALID_FORMAT"),
    ("repo no host", _with(HELM, helm_repo_url="https:///charts"), "helm_repo_url", "INVALID_FORMAT"),
    (
        "repo bad port",
        _with(HELM, helm_repo_url="https://c.example:99999"),
        "helm_repo_url",
        "INVALID_FORMAT",
    ),
    ("repo credentials", _with(HELM, helm_repo_url="https://u:p@c.example"), "helm_repo_url", "NOT_ALLOWED"),
    (
        "repo too long",
        _with(HELM, helm_repo_url="https://c.example/" + "a" * 2048),
        "helm_repo_url",
        "TOO_LONG",
    ),
    ("repo padded", _with(HELM, helm_repo_url=" https://c.example"), "helm_repo_url", "INVALID_FORMAT"),
    ("repo empty", _with(HELM, helm_repo_url=""), "helm_repo_url", "INVALID_FORMAT"),
    # helm_chart_name, helm_chart_version
    ("chart uppercase", _with(HELM, helm_chart_name="Nginx"), "helm_chart_name", "INVALID_FORMAT"),
    ("chart slash", _with(HELM, helm_chart_name="bitnami/nginx"), "helm_chart_name", "INVALID_FORMAT"),
    ("chart trailing dot", _with(HELM, helm_chart_name="nginx."), "helm_chart_name", "INVALID_FORMAT"),
    ("chart too long", _with(HELM, helm_chart_name="a" * 251), "helm_chart_name", "TOO_LONG"),
    ("version partial", _with(HELM, helm_chart_version="1.2"), "helm_chart_version", "INVALID_FORMAT"),
    (
        "version leading zero",
        _with(HELM, helm_chart_version="01.2.3"),
        "helm_chart_version",
        "INVALID_FORMAT",
    ),
    ("version range", _with(HELM, helm_chart_version="^1.2.3"), "helm_chart_version", "INVALID_FORMAT"),
    # custom_values_yaml
    ("values a list", _with(HELM, custom_values_yaml="- a\n- b\n"), "custom_values_yaml", "INVALID_FORMAT"),
    ("values a scalar", _with(HELM, custom_values_yaml="hello"), "custom_values_yaml", "INVALID_FORMAT"),
    ("values broken", _with(HELM, custom_values_yaml="a: [1, 2\n"), "custom_values_yaml", "INVALID_FORMAT"),
    (
        "values too big",
        _with(HELM, custom_values_yaml="a: " + "x" * Limits().custom_values_yaml_max_bytes),
        "custom_values_yaml",
        "TOO_LONG",
    ),
    # resources
    ("cpu zero", _with(DOCKER, cpu_request=0), "cpu_request", "OUT_OF_RANGE"),
    ("cpu negative", _with(DOCKER, cpu_request=-1.0), "cpu_request", "OUT_OF_RANGE"),
    ("cpu above max", _with(DOCKER, cpu_request=16.5), "cpu_request", "OUT_OF_RANGE"),
    ("cpu finer than millicores", _with(DOCKER, cpu_request=0.0005), "cpu_request", "TOO_PRECISE"),
    ("cpu nan", _with(DOCKER, cpu_request=float("nan")), "cpu_request", "INVALID_FORMAT"),
    ("cpu a string", _with(DOCKER, cpu_request="0.5"), "cpu_request", "INVALID_TYPE"),
    ("memory below min", _with(DOCKER, memory_request_mb=63), "memory_request_mb", "OUT_OF_RANGE"),
    ("memory above max", _with(DOCKER, memory_request_mb=65_537), "memory_request_mb", "OUT_OF_RANGE"),
    ("memory a float", _with(DOCKER, memory_request_mb=512.5), "memory_request_mb", "INVALID_TYPE"),
    ("replicas zero", _with(DOCKER, replicas=0), "replicas", "OUT_OF_RANGE"),
    ("replicas above max", _with(DOCKER, replicas=21), "replicas", "OUT_OF_RANGE"),
    ("replicas a bool", _with(DOCKER, replicas=True), "replicas", "INVALID_TYPE"),
    ("port zero", _with(DOCKER, container_port=0), "container_port", "OUT_OF_RANGE"),
    ("port too big", _with(DOCKER, container_port=65_536), "container_port", "OUT_OF_RANGE"),
    ("storage zero", _with(DOCKER, storage_size_gb=0), "storage_size_gb", "OUT_OF_RANGE"),
    ("storage above max", _with(DOCKER, storage_size_gb=1_025), "storage_size_gb", "OUT_OF_RANGE"),
    ("uid root", _with(DOCKER, run_as_uid=0), "run_as_uid", "NOT_ALLOWED"),
    ("uid negative", _with(DOCKER, run_as_uid=-5), "run_as_uid", "OUT_OF_RANGE"),
    ("uid too big", _with(DOCKER, run_as_uid=2_147_483_648), "run_as_uid", "OUT_OF_RANGE"),
    # environment_variables
    (
        "env too many",
        _with(DOCKER, environment_variables=[f"V{i}=1" for i in range(129)]),
        "environment_variables",
        "TOO_LONG",
    ),
    (
        "env no equals",
        _with(DOCKER, environment_variables=["A=1", "B"]),
        "environment_variables[1]",
        "INVALID_FORMAT",
    ),
    (
        "env bad name",
        _with(DOCKER, environment_variables=["1A=x"]),
        "environment_variables[0]",
        "INVALID_FORMAT",
    ),
    (
        "env dash name",
        _with(DOCKER, environment_variables=["MY-VAR=x"]),
        "environment_variables[0]",
        "INVALID_FORMAT",
    ),
    (
        "env empty name",
        _with(DOCKER, environment_variables=["=x"]),
        "environment_variables[0]",
        "INVALID_FORMAT",
    ),
    (
        "env duplicate",
        _with(DOCKER, environment_variables=["A=1", "B=2", "A=3"]),
        "environment_variables[2]",
        "DUPLICATE",
    ),
    (
        "env value too long",
        _with(DOCKER, environment_variables=["A=" + LONG_ENV_VALUE]),
        "environment_variables[0]",
        "TOO_LONG",
    ),
    ("env not a list", _with(DOCKER, environment_variables="A=1"), "environment_variables", "INVALID_TYPE"),
    (
        "env entry not a string",
        _with(DOCKER, environment_variables=[1]),
        "environment_variables[0]",
        "INVALID_TYPE",
    ),
    # docker_image
    ("image uppercase", _with(DOCKER, docker_image="Nginx"), "docker_image", "INVALID_FORMAT"),
    ("image empty tag", _with(DOCKER, docker_image="nginx:"), "docker_image", "INVALID_FORMAT"),
    ("image empty component", _with(DOCKER, docker_image="a//b"), "docker_image", "INVALID_FORMAT"),
    ("image a url", _with(DOCKER, docker_image="http://x/y"), "docker_image", "INVALID_FORMAT"),
    ("image short digest", _with(DOCKER, docker_image="nginx@sha256:abc"), "docker_image", "INVALID_FORMAT"),
    ("image long tag", _with(DOCKER, docker_image="nginx:" + "a" * 129), "docker_image", "INVALID_FORMAT"),
    ("image name too long", _with(DOCKER, docker_image="a" * 256), "docker_image", "TOO_LONG"),
    ("image padded", _with(DOCKER, docker_image="nginx "), "docker_image", "INVALID_FORMAT"),
    ("image empty", _with(DOCKER, docker_image=""), "docker_image", "INVALID_FORMAT"),
    # volumes
    (
        "volumes too many",
        _with(DOCKER, volumes=[{"path": f"/v{i}"} for i in range(17)]),
        "volumes",
        "TOO_LONG",
    ),
    ("volume relative", _with(DOCKER, volumes=[{"path": "data"}]), "volumes[0].path", "INVALID_FORMAT"),
    ("volume dotdot", _with(DOCKER, volumes=[{"path": "/data/../etc"}]), "volumes[0].path", "INVALID_FORMAT"),
    ("volume dot", _with(DOCKER, volumes=[{"path": "/data/./x"}]), "volumes[0].path", "INVALID_FORMAT"),
    ("volume double slash", _with(DOCKER, volumes=[{"path": "//data"}]), "volumes[0].path", "INVALID_FORMAT"),
    (
        "volume trailing slash",
        _with(DOCKER, volumes=[{"path": "/data/"}]),
        "volumes[0].path",
        "INVALID_FORMAT",
    ),
    ("volume root", _with(DOCKER, volumes=[{"path": "/"}]), "volumes[0].path", "NOT_ALLOWED"),
    ("volume proc", _with(DOCKER, volumes=[{"path": "/proc"}]), "volumes[0].path", "NOT_ALLOWED"),
    ("volume under sys", _with(DOCKER, volumes=[{"path": "/sys/fs"}]), "volumes[0].path", "NOT_ALLOWED"),
    ("volume under dev", _with(DOCKER, volumes=[{"path": "/dev/shm"}]), "volumes[0].path", "NOT_ALLOWED"),
    ("volume no path", _with(DOCKER, volumes=[{"sizeGb": 5}]), "volumes[0].path", "REQUIRED"),
    (
        "volume duplicate path",
        _with(DOCKER, volumes=[{"path": "/a"}, {"path": "/b"}, {"path": "/a"}]),
        "volumes[2].path",
        "DUPLICATE",
    ),
    (
        "volume size zero",
        _with(DOCKER, volumes=[{"path": "/a", "sizeGb": 0}]),
        "volumes[0].sizeGb",
        "OUT_OF_RANGE",
    ),
    (
        "volume size above max",
        _with(DOCKER, volumes=[{"path": "/a", "sizeGb": 1_025}]),
        "volumes[0].sizeGb",
        "OUT_OF_RANGE",
    ),
    (
        "volume purpose too long",
        _with(DOCKER, volumes=[{"path": "/a", "purpose": "p" * 254}]),
        "volumes[0].purpose",
        "TOO_LONG",
    ),
    (
        "volume unknown key",
        _with(DOCKER, volumes=[{"path": "/a", "size": 1}]),
        "volumes[0].size",
        "UNKNOWN_FIELD",
    ),
    ("volume not an object", _with(DOCKER, volumes=["/a"]), "volumes[0]", "INVALID_TYPE"),
    # image updates
    (
        "strategy unknown",
        _with(DOCKER, image_update_strategy="latest-ish"),
        "image_update_strategy",
        "UNSUPPORTED",
    ),
    (
        "strategy without image",
        _with(HELM, image_update_strategy="semver"),
        "image_update_strategy",
        "NOT_ALLOWED",
    ),
    ("allow tags without image", _with(HELM, image_allow_tags="any"), "image_allow_tags", "NOT_ALLOWED"),
    (
        "ignore tags without image",
        _with(HELM, image_ignore_tags="latest"),
        "image_ignore_tags",
        "NOT_ALLOWED",
    ),
    (
        "constraint without strategy",
        _with(DOCKER, image_update_constraint="^1.2"),
        "image_update_strategy",
        "REQUIRED",
    ),
    (
        "constraint without image",
        _with(HELM, image_update_strategy="semver", image_update_constraint="^1.2"),
        "image_update_constraint",
        "NOT_ALLOWED",
    ),
    (
        "semver constraint garbage",
        _with(DOCKER, image_update_strategy="semver", image_update_constraint="one point two"),
        "image_update_constraint",
        "INVALID_FORMAT",
    ),
    (
        "semver constraint empty alternative",
        _with(DOCKER, image_update_strategy="semver", image_update_constraint="^1 ||"),
        "image_update_constraint",
        "INVALID_FORMAT",
    ),
    (
        "digest without constraint",
        _with(DOCKER, image_update_strategy="digest"),
        "image_update_constraint",
        "REQUIRED",
    ),
    (
        "digest constraint not a tag",
        _with(DOCKER, image_update_strategy="digest", image_update_constraint="a/b"),
        "image_update_constraint",
        "INVALID_FORMAT",
    ),
    (
        "constraint with newest-build",
        _with(DOCKER, image_update_strategy="newest-build", image_update_constraint="^1"),
        "image_update_constraint",
        "NOT_ALLOWED",
    ),
    (
        "constraint empty",
        _with(DOCKER, image_update_strategy="semver", image_update_constraint=""),
        "image_update_constraint",
        "INVALID_FORMAT",
    ),
    ("allow tags bare regex", _with(DOCKER, image_allow_tags="^1\\."), "image_allow_tags", "INVALID_FORMAT"),
    (
        "allow tags bad regex",
        _with(DOCKER, image_allow_tags="regexp:(unclosed"),
        "image_allow_tags",
        "INVALID_FORMAT",
    ),
    (
        "allow tags empty regex",
        _with(DOCKER, image_allow_tags="regexp:"),
        "image_allow_tags",
        "INVALID_FORMAT",
    ),
    (
        "allow tags lookahead",
        _with(DOCKER, image_allow_tags="regexp:^(?!rc)"),
        "image_allow_tags",
        "UNSUPPORTED",
    ),
    (
        "ignore tags empty entry",
        _with(DOCKER, image_ignore_tags="a,,b"),
        "image_ignore_tags",
        "INVALID_FORMAT",
    ),
    (
        "ignore tags trailing comma",
        _with(DOCKER, image_ignore_tags="latest,"),
        "image_ignore_tags",
        "INVALID_FORMAT",
    ),
    ("ignore tags spaced", _with(DOCKER, image_ignore_tags="a, b"), "image_ignore_tags", "INVALID_FORMAT"),
    (
        "ignore tags open bracket",
        _with(DOCKER, image_ignore_tags="v[0-9"),
        "image_ignore_tags",
        "INVALID_FORMAT",
    ),
    # kubernetes_version
    ("k8s unsupported minor", _with(DOCKER, kubernetes_version="1.20"), "kubernetes_version", "UNSUPPORTED"),
    ("k8s major 2", _with(DOCKER, kubernetes_version="2.0"), "kubernetes_version", "INVALID_FORMAT"),
    ("k8s garbage", _with(DOCKER, kubernetes_version="latest"), "kubernetes_version", "INVALID_FORMAT"),
    # config
    ("config a list", _with(DOCKER, config=[1]), "config", "INVALID_TYPE"),
    (
        "config too big",
        _with(DOCKER, config={"k": "x" * Limits().config_max_bytes}),
        "config",
        "TOO_LONG",
    ),
    ("config not json", _with(DOCKER, config={"k": {1, 2}}), "config", "INVALID_TYPE"),
    # unknown fields
    ("unknown field", _with(DOCKER, replica_count=3), "replica_count", "UNKNOWN_FIELD"),
]


@pytest.mark.parametrize(("data", "field", "reason"), [case[1:] for case in FAILING], ids=[c[0] for c in FAILING])
def test_each_rule_reports_field_and_reason(data: dict[str, Any], field: str, reason: str) -> None:
    violations = _violations(data)
    assert (field, reason) in {(v.field, v.reason) for v in violations}, violations
    for violation in violations:
        # Every message names its field and every reason is a stable machine code.
        assert violation.description.startswith(violation.field + " ")
        assert violation.reason.isupper()
        assert violation.reason.replace("_", "").isalpha()


@pytest.mark.parametrize(
    "image",
    [
        "nginx",
        "nginx:1.27",
        "library/nginx:latest",
        "ghcr.io/acme/web:v1.2.3",
        "registry.example.com:5000/team/app@sha256:" + "a" * 64,
        "localhost:5000/app:dev_build.1",
        "my-registry/a__b/c---d:tag",
        "nginx:1.27@sha256:" + "0" * 64,
        "Registry.Example.com/app",
    ],
)
def test_valid_image_references(image: str) -> None:
    assert _validate(_with(DOCKER, docker_image=image)).docker_image == image


@pytest.mark.parametrize(
    "constraint",
    ["^1.2", "~1.2.3", ">=1.0 <2.0", ">= 1.0, < 2.0", "1.x", "*", "1.2 - 1.4.5", "^1 || ^2", "v1.2.*"],
)
def test_valid_semver_constraints(constraint: str) -> None:
    data = _with(DOCKER, image_update_strategy="semver", image_update_constraint=constraint)
    assert _validate(data).image_update_constraint == constraint


@pytest.mark.parametrize(
    "changes",
    [
        {"custom_values_yaml": ""},
        {"custom_values_yaml": "# just a comment\n"},
        {"helm_repo_url": "oci://registry-1.docker.io/bitnamicharts"},
        {"helm_chart_name": "my_chart.v2"},
        {"kubernetes_version": "v1.35.2"},
        {
            "docker_image": "ghcr.io/acme/web",
            "image_update_strategy": "digest",
            "image_update_constraint": "main",
        },
        {
            "docker_image": "ghcr.io/acme/web",
            "image_update_strategy": "alphabetical",
            "image_allow_tags": "any",
        },
        {
            "cpu_request": 2,
            "volumes": [{"path": "/var/lib/data", "sizeGb": 1_024}],
            "run_as_uid": 2_147_483_647,
        },
    ],
)
def test_edge_values_that_are_allowed(changes: dict[str, Any]) -> None:
    _validate(_with(HELM, **changes))


def test_database_storage_from_volumes_is_enough() -> None:
    _validate(_with(DOCKER, app_type="database", volumes=[{"path": "/var/lib/postgresql"}]))


def test_limits_and_regions_come_from_the_caller() -> None:
    limits = Limits(replicas_max=3, kubernetes_versions=("1.30",))
    data = _with(DOCKER, replicas=4, kubernetes_version="1.30", geographic_region="moon")
    with pytest.raises(SpecInvalid) as caught:
        validate_create(data, limits=limits, regions={"moon", "sun"})
    assert [(v.field, v.reason) for v in caught.value.violations] == [("replicas", "OUT_OF_RANGE")]
    assert "between 1 and 3" in caught.value.violations[0].description


def test_messages_say_what_is_allowed() -> None:
    by_field = {
        v.field: v.description
        for v in _violations(
            _with(
                DOCKER,
                geographic_region="mars",
                kubernetes_version="1.20",
                deployment_type="git",
                run_as_uid=0,
            )
        )
    }
    assert "asia, eu, us" in by_field["geographic_region"]
    assert "1.33, 1.34, 1.35, 1.36" in by_field["kubernetes_version"]
    assert "docker" in by_field["deployment_type"]
    assert "root" in by_field["run_as_uid"]


def test_all_violations_come_back_at_once_in_field_order() -> None:
    data = {
        "geographic_region": "mars",
        "deployment_name": "Bad_Name",
        "app_type": "database",
        "cpu_request": 0.0005,
        "environment_variables": ["A=1", "nope", "A=2"],
        "volumes": [{"path": "/data/", "sizeGb": 0}],
        "run_as_uid": 0,
        "deployment_type": "git",
        "helm_chart_name": "Chart",
        "image_update_constraint": "^1",
        "kubernetes_version": "1.2",
    }
    found = [(v.field, v.reason) for v in _violations(data)]
    assert found == [
        ("geographic_region", "UNSUPPORTED"),
        ("deployment_name", "INVALID_FORMAT"),
        ("cpu_request", "TOO_PRECISE"),
        ("environment_variables[1]", "INVALID_FORMAT"),
        ("environment_variables[2]", "DUPLICATE"),
        # Cross-field rules still run although single-field rules failed.
        ("docker_image", "REQUIRED"),
        ("volumes[0].path", "INVALID_FORMAT"),
        ("volumes[0].sizeGb", "OUT_OF_RANGE"),
        ("run_as_uid", "NOT_ALLOWED"),
        ("deployment_type", "UNSUPPORTED"),
        ("helm_chart_name", "INVALID_FORMAT"),
        ("helm_chart_name", "NOT_ALLOWED"),
        ("image_update_strategy", "REQUIRED"),
        ("image_update_constraint", "NOT_ALLOWED"),
        ("kubernetes_version", "UNSUPPORTED"),
    ]


def test_violations_are_sorted_by_contract_field_order() -> None:
    violations = _violations(
        {"kubernetes_version": "x", "geographic_region": "x", "deployment_name": "x", "replicas": 0}
    )
    positions = [FIELD_ORDER.index(v.field) for v in violations]
    assert positions == sorted(positions)


def test_spec_invalid_message_joins_descriptions() -> None:
    with pytest.raises(SpecInvalid, match="deployment_name is required"):
        _validate(_with(DOCKER, deployment_name=DROP))


def test_spec_is_frozen() -> None:
    spec = _validate(DOCKER)
    with pytest.raises(ValueError, match="frozen"):
        spec.replicas = 3  # type: ignore[misc]


# Every string field, the request it is oversized in, and how a 20 KB value of it is reported.
_STRING_FIELDS = [
    (DOCKER, "geographic_region"),
    (DOCKER, "deployment_name"),
    (DOCKER, "app_type"),
    (DOCKER, "docker_image"),
    (DOCKER, "deployment_type"),
    (HELM, "helm_repo_url"),
    (HELM, "helm_chart_name"),
    (HELM, "helm_chart_version"),
    (_with(DOCKER, image_update_strategy="semver"), "image_update_strategy"),
    (_with(DOCKER, image_update_strategy="semver"), "image_update_constraint"),
    (DOCKER, "image_allow_tags"),
    (DOCKER, "image_ignore_tags"),
    (DOCKER, "kubernetes_version"),
]


@pytest.mark.parametrize(("base", "field"), _STRING_FIELDS, ids=[field for _, field in _STRING_FIELDS])
@pytest.mark.parametrize("filler", ["x", " ", "\x00", "é"])
def test_an_oversized_field_gets_one_short_violation_before_any_other_rule(
    base: dict[str, Any], field: str, filler: str
) -> None:
    (violation,) = (v for v in _violations(_with(base, **{field: filler * 20_000})) if v.field == field)
    assert violation.reason == "TOO_LONG"
    assert len(violation.description) < 120, violation.description


@pytest.mark.parametrize("field", ["path", "purpose"])
def test_an_oversized_volume_field_gets_one_short_violation(field: str) -> None:
    volume = {"path": "/data", field: "/" + "x" * 20_000}
    (violation,) = _violations(_with(DOCKER, volumes=[volume]))
    assert (violation.field, violation.reason) == (f"volumes[0].{field}", "TOO_LONG")
    assert len(violation.description) < 120


def test_no_message_quotes_more_than_a_short_prefix_of_a_value() -> None:
    long_but_allowed = {
        "helm_repo_url": "ftp://" + "a" * 2000,
        "helm_chart_name": "-" * 250,
        "image_allow_tags": "x" * 1000,
        "image_ignore_tags": "[" * 1000,
        "kubernetes_version": "9" * 32,
        "geographic_region": "r" * 128,
    }
    for field, value in long_but_allowed.items():
        violations = [v for v in _violations(_with(HELM, **{field: value})) if v.field == field]
        assert violations, field
        assert all(len(v.description) < 300 for v in violations), violations
    volumes = [{"path": "/" + "d" * 4000}, {"path": "/" + "d" * 4000}]
    (duplicate,) = _violations(_with(DOCKER, volumes=volumes))
    assert duplicate.reason == "DUPLICATE"
    assert len(duplicate.description) < 300
    names = [f"{'N' * 256}=1", f"{'N' * 256}=2"]
    (duplicate,) = _violations(_with(DOCKER, environment_variables=names))
    assert duplicate.reason == "DUPLICATE"
    assert len(duplicate.description) < 300


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"a": {"b": float("nan")}}, "config.a.b"),
        ({"a": [1, {"c": float("inf")}]}, "config.a[1].c"),
        ({"x": -float("inf")}, "config.x"),
    ],
)
def test_nan_or_infinity_in_config_is_named_by_its_path(config: dict[str, Any], field: str) -> None:
    (violation,) = _violations(_with(DOCKER, config=config))
    assert (violation.field, violation.reason) == (field, "INVALID_VALUE")


@pytest.mark.parametrize("path", ["healthz", "", 3, "/health z", "/ok\n", "/" + "a" * 1024])
def test_a_health_check_path_in_config_must_be_an_absolute_http_path(path: Any) -> None:
    (violation,) = _violations(_with(DOCKER, config={"health_check_path": path}))
    assert (violation.field, violation.reason) == ("config.health_check_path", "INVALID_VALUE")


def test_an_absolute_health_check_path_passes() -> None:
    assert _validate(_with(DOCKER, config={"health_check_path": "/healthz?full=1"})).config == {
        "health_check_path": "/healthz?full=1"
    }


@pytest.mark.parametrize("control", ["\x00", "\x01", "\x1b", "\x7f", "\x0b"])
def test_a_control_character_in_an_environment_value_is_refused_naming_the_variable(control: str) -> None:
    env = ["OK=1", f"TOKEN=ab{control}cd"]
    (violation,) = _violations(_with(DOCKER, environment_variables=env))
    assert (violation.field, violation.reason) == ("environment_variables.TOKEN", "INVALID_FORMAT")


def test_tabs_and_line_breaks_in_an_environment_value_pass() -> None:
    pem = "-----BEGIN CERTIFICATE-----\r\nMIIB\tx\n-----END CERTIFICATE-----\n"
    assert _validate(_with(DOCKER, environment_variables=[f"CERT={pem}"])).env_dict() == {"CERT": pem}


@pytest.mark.parametrize(
    "url",
    [
        "https://kubernetes.default.svc/",
        "https://kubernetes.default.svc.cluster.local/charts",
        "https://chartmuseum.tools.svc.cluster.local:8080/",
        "https://chartmuseum.tools.svc/",
        "https://registry.cluster.local/",
        "https://kubernetes.default/",
        "https://argocd-repo-server.argocd:8081/",
        "https://charts/",
        "oci://charts/stable",
        "https://KUBERNETES.Default.SVC/",
        "https://kubernetes.default.svc./",
        "https://charts./",
        "https://kubernetes%2Edefault%2Esvc/",
        "https://%6b%75%62%65rnetes.default.svc/",
        "https://\uff4b\uff55\uff42\uff45\uff52\uff4e\uff45\uff54\uff45\uff53.default.svc/",
        "https://kubernetes\u3002default\u3002svc/",
        "https://kubernetes.default.svc\uff0e/",
        "https://printer.local/",
        "https://charts..example.com/",
    ],
)
def test_cluster_internal_chart_hosts_are_refused_in_every_spelling(url: str) -> None:
    (violation,) = _violations(_with(HELM, helm_repo_url=url))
    assert (violation.field, violation.reason) == ("helm_repo_url", "NOT_ALLOWED"), violation


@pytest.mark.parametrize(
    "url",
    [
        "https://user@kubernetes.default.svc/",
        "https://charts.example.com@kubernetes.default.svc/",
        "https://charts.example.com:443@kubernetes.default.svc/",
    ],
)
def test_userinfo_cannot_hide_a_cluster_internal_host(url: str) -> None:
    (violation,) = _violations(_with(HELM, helm_repo_url=url))
    assert (violation.field, violation.reason) == ("helm_repo_url", "NOT_ALLOWED")


@pytest.mark.parametrize(
    "url",
    [
        "https://charts.example.com/",
        "oci://ghcr.io/acme/charts",
        "https://charts.example.com./",
        "https://b\u00fccher.de/",
    ],
)
def test_public_chart_hosts_still_pass(url: str) -> None:
    assert _validate(_with(HELM, helm_repo_url=url)).helm_repo_url == url


@pytest.mark.parametrize("inside", [" ", "\t", "\u00a0", "\u2003", "\u3000", "\x00", "\x1b", "\x7f"])
def test_whitespace_or_a_control_character_inside_a_chart_url_is_refused(inside: str) -> None:
    (violation,) = _violations(_with(HELM, helm_repo_url=f"https://charts.example/a{inside}b"))
    assert (violation.field, violation.reason) == ("helm_repo_url", "INVALID_FORMAT")
    assert "whitespace or control characters" in violation.description


@pytest.mark.parametrize("control", ["\x00", "\x1f", "\x7f"])
def test_a_control_character_in_a_volumes_purpose_is_refused(control: str) -> None:
    volumes = [{"path": "/data", "sizeGb": 10, "purpose": f"up{control}loads"}]
    (violation,) = _violations(_with(HELM, volumes=volumes))
    assert (violation.field, violation.reason) == ("volumes[0].purpose", "INVALID_FORMAT")
    assert "control characters" in violation.description
