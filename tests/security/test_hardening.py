"""Input hardening over a real channel: each rule answers INVALID_ARGUMENT naming the field, and writes nothing."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest

from apphosting import netguard
from apphosting.settings import Limits
from services.deployments.validation import SpecInvalid, validate_create
from tests.integration.test_api import create_request, expect_error
from tests.security.conftest import ApiFactory, SecureApi, stub_resolver

HELM: dict[str, Any] = {
    "app_type": "helm",
    "docker_image": None,
    "helm_repo_url": "https://charts.example.com",
    "helm_chart_name": "podinfo",
}
BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"x": value}
    return value


CASES: list[tuple[str, dict[str, Any], str, str]] = [
    # (what, request fields, field reported, reason)
    ("config too deep", {"config": _nested(33)}, "config", "TOO_DEEP"),
    ("config too big", {"config": {"k": "v" * 70_000}}, "config", "TOO_LONG"),
    ("yaml a list", {**HELM, "custom_values_yaml": "- a\n- b\n"}, "custom_values_yaml", "INVALID_FORMAT"),
    ("yaml billion laughs", {**HELM, "custom_values_yaml": BILLION_LAUGHS}, "custom_values_yaml", "TOO_LONG"),
    ("yaml too deep", {**HELM, "custom_values_yaml": "a: " + "[" * 70 + "]" * 70}, "custom_values_yaml", "TOO_DEEP"),
    ("yaml alias cycle", {**HELM, "custom_values_yaml": "a: &x [*x]\n"}, "custom_values_yaml", "INVALID_FORMAT"),
    (
        "yaml python tag",
        {**HELM, "custom_values_yaml": "a: !!python/object:os.system x\n"},
        "custom_values_yaml",
        "INVALID_FORMAT",
    ),
    ("yaml too big", {**HELM, "custom_values_yaml": "a: " + "x" * 262_144}, "custom_values_yaml", "TOO_LONG"),
    ("repo over http", {**HELM, "helm_repo_url": "http://charts.example.com"}, "helm_repo_url", "NOT_ALLOWED"),
    ("repo ftp", {**HELM, "helm_repo_url": "ftp://charts.example.com"}, "helm_repo_url", "INVALID_FORMAT"),
    ("repo loopback", {**HELM, "helm_repo_url": "https://127.0.0.1/charts"}, "helm_repo_url", "NOT_ALLOWED"),
    ("repo loopback v6", {**HELM, "helm_repo_url": "https://[::1]:8443/"}, "helm_repo_url", "NOT_ALLOWED"),
    ("repo decimal ip", {**HELM, "helm_repo_url": "https://2130706433/"}, "helm_repo_url", "NOT_ALLOWED"),
    ("repo private", {**HELM, "helm_repo_url": "oci://10.0.0.8/charts"}, "helm_repo_url", "NOT_ALLOWED"),
    ("repo link-local", {**HELM, "helm_repo_url": "https://169.254.10.1/"}, "helm_repo_url", "NOT_ALLOWED"),
    ("repo metadata", {**HELM, "helm_repo_url": "https://169.254.169.254/latest"}, "helm_repo_url", "NOT_ALLOWED"),
    (
        "repo metadata name",
        {**HELM, "helm_repo_url": "https://metadata.google.internal/"},
        "helm_repo_url",
        "NOT_ALLOWED",
    ),
    ("repo localhost", {**HELM, "helm_repo_url": "https://localhost:8080/"}, "helm_repo_url", "NOT_ALLOWED"),
    (
        "repo resolves private",
        {**HELM, "helm_repo_url": "https://charts.internal.test/"},
        "helm_repo_url",
        "NOT_ALLOWED",
    ),
    ("repo resolves mixed", {**HELM, "helm_repo_url": "https://charts.mixed.test/"}, "helm_repo_url", "NOT_ALLOWED"),
    ("image bad grammar", {"docker_image": "Nginx:latest"}, "docker_image", "INVALID_FORMAT"),
    ("volume under /proc", {"volumes": [{"path": "/proc/self"}]}, "volumes[0].path", "NOT_ALLOWED"),
    ("volume not normal", {"volumes": [{"path": "/data/../etc"}]}, "volumes[0].path", "INVALID_FORMAT"),
    ("root uid", {"run_as_uid": 0}, "run_as_uid", "NOT_ALLOWED"),
    # Every way to split the spaces between terms, tried by a backtracking engine, would take years.
    (
        "constraint made to backtrack",
        {"image_update_strategy": "semver", "image_update_constraint": "1  " * 40 + "!"},
        "image_update_constraint",
        "INVALID_FORMAT",
    ),
    ("env bad name", {"environment_variables": ["1BAD=x"]}, "environment_variables[0]", "INVALID_FORMAT"),
    ("env value too big", {"environment_variables": ["A=" + "x" * 40_000]}, "environment_variables[0]", "TOO_LONG"),
    (
        "env too big in all",
        {"environment_variables": [f"V{n}=" + "x" * 30_000 for n in range(10)]},
        "environment_variables",
        "TOO_LONG",
    ),
    ("env NUL", {"environment_variables": ["A=1", "TOKEN=ab\x00cd"]}, "environment_variables.TOKEN", "INVALID_FORMAT"),
    (
        "env escape",
        {"environment_variables": ["TERM_TRAP=\x1b]0;x\x07"]},
        "environment_variables.TERM_TRAP",
        "INVALID_FORMAT",
    ),
    # Each oversized field: one short violation, not an error too big for gRPC's metadata.
    ("app_type 20 KB", {"app_type": "x" * 20_000}, "app_type", "TOO_LONG"),
    ("region 20 KB", {"geographic_region": "x" * 20_000}, "geographic_region", "TOO_LONG"),
    ("name 20 KB", {"deployment_name": "x" * 20_000}, "deployment_name", "TOO_LONG"),
    ("image 20 KB", {"docker_image": "x" * 20_000}, "docker_image", "TOO_LONG"),
    ("version 20 KB", {"kubernetes_version": "1" * 20_000}, "kubernetes_version", "TOO_LONG"),
    ("type 20 KB", {"deployment_type": "x" * 20_000}, "deployment_type", "TOO_LONG"),
    ("repo 20 KB", {**HELM, "helm_repo_url": "https://" + "a" * 20_000}, "helm_repo_url", "TOO_LONG"),
]
# Cluster-internal chart hosts, in several spellings: Argo CD would fetch them inside the host cluster.
CLUSTER_INTERNAL_URLS = [
    "https://kubernetes.default.svc/",
    "https://KUBERNETES.default.svc./",
    "https://kubernetes%2edefault.svc/",
    "https://\uff4b\uff55\uff42\uff45\uff52\uff4e\uff45\uff54\uff45\uff53.default.svc/",
    "https://kubernetes\u3002default\u3002svc/",
    "https://chartmuseum.tools.svc.cluster.local:8080/",
    "https://registry.cluster.local/",
    "https://kubernetes.default/",
    "https://charts/",
    "oci://charts/stable",
    "https://charts.example.com@kubernetes.default.svc/",
]
CASES += [
    (f"repo cluster-internal {url}", {**HELM, "helm_repo_url": url}, "helm_repo_url", "NOT_ALLOWED")
    for url in CLUSTER_INTERNAL_URLS
]


async def test_each_hardening_rule_names_its_field_and_writes_nothing(secure: SecureApi) -> None:
    alice = secure.user("alice")
    for what, fields, field, reason in CASES:
        details = await expect_error(
            secure.stub.CreateAppHostingDeployment(create_request(**fields), metadata=alice.metadata),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert details.violations.get(field, ("",))[0] == reason, (what, details.violations)
    assert await secure.rows() == 0
    # The cases' neighbours pass: a public name, oci, and a name that does not resolve now (the
    # fetcher checks again at the time of use).
    for n, url in enumerate(("https://charts.example.com", "oci://ghcr.io/acme/charts", "https://x.nxdomain.test")):
        fields = {**HELM, "helm_repo_url": url, "custom_values_yaml": "a: &x 1\nb: *x\n"}
        await secure.stub.CreateAppHostingDeployment(
            create_request(deployment_name=f"ok-{n}", **fields), metadata=alice.metadata
        )


async def test_nan_or_infinity_in_config_is_invalid_argument_naming_the_path(secure: SecureApi) -> None:
    alice = secure.user("alice")
    for config, field in (({"a": {"b": float("nan")}}, "config.a.b"), ({"x": [0, float("-inf")]}, "config.x[1]")):
        request = create_request()
        request.config.update(config)
        details = await expect_error(
            secure.stub.CreateAppHostingDeployment(request, metadata=alice.metadata), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert details.violations[field][0] == "INVALID_VALUE", details.violations
    assert await secure.rows() == 0


async def test_allow_lists_for_chart_hosts_and_image_registries(secure_api_factory: ApiFactory) -> None:
    api = await secure_api_factory(
        limits=Limits(helm_repo_hosts=("charts.example.com", "*.acme.io"), image_registries=("ghcr.io", "docker.io"))
    )
    alice = api.user("alice")
    refused = [
        ({**HELM, "helm_repo_url": "https://charts.evil.com"}, "helm_repo_url"),
        ({**HELM, "helm_repo_url": "oci://acme.io.evil.com/x"}, "helm_repo_url"),
        ({"docker_image": "quay.io/acme/web:1"}, "docker_image"),
        ({"docker_image": "localhost:5000/web"}, "docker_image"),
    ]
    for fields, field in refused:
        details = await expect_error(
            api.stub.CreateAppHostingDeployment(create_request(**fields), metadata=alice.metadata),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert details.violations[field][0] == "NOT_ALLOWED", details.violations
    allowed = [
        {**HELM, "helm_repo_url": "https://charts.example.com"},
        {**HELM, "helm_repo_url": "oci://registry.acme.io/charts"},
        {"docker_image": "ghcr.io/acme/web:1"},
        {"docker_image": "nginx:1.27"},  # docker.io
    ]
    for n, fields in enumerate(allowed):
        await api.stub.CreateAppHostingDeployment(
            create_request(deployment_name=f"ok-{n}", **fields), metadata=alice.metadata
        )


async def test_oversized_and_undecodable_requests(secure_api_factory: ApiFactory) -> None:
    api = await secure_api_factory(max_request_bytes=64 * 1024)
    alice = api.user("alice")
    # Above the transport limit: refused by gRPC before it is decoded.
    big = create_request(config={"k": "v" * 100_000})
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await api.stub.CreateAppHostingDeployment(big, metadata=alice.metadata)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Bytes that are not a request message: INVALID_ARGUMENT, not INTERNAL.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{api.server.port}") as channel:
        raw: Any = channel.unary_unary("/apphosting.v1.DeploymentService/CreateAppHostingDeployment")
        for body in (b"\xff\xff\xff", b"\x0a\x05\xff\xfe\xfd\xfc\xfb", b"\x12"):
            details = await expect_error(raw(body, metadata=alice.metadata), grpc.StatusCode.INVALID_ARGUMENT)
            assert details.reason == "MALFORMED_REQUEST"
    assert await api.rows() == 0


def test_billion_laughs_is_refused_by_its_expansion_even_with_many_aliases_allowed() -> None:
    started = time.perf_counter()
    with pytest.raises(SpecInvalid) as raised:
        validate_create(
            {"geographic_region": "eu", "deployment_name": "x", **HELM, "custom_values_yaml": BILLION_LAUGHS},
            limits=Limits(custom_values_yaml_max_aliases=10_000),
            regions={"eu"},
        )
    assert [(v.field, v.reason) for v in raised.value.violations] == [("custom_values_yaml", "TOO_LONG")]
    assert "expanded" in raised.value.violations[0].description
    # Printed, not asserted (no timing assertions): it is a few milliseconds.
    print(f"billion laughs refused in {(time.perf_counter() - started) * 1000:.1f} ms")


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "a loopback address"),
        ("::1", "a loopback address"),
        ("::ffff:127.0.0.1", "a loopback address"),
        ("64:ff9b::a00:1", "a private address"),
        ("10.0.0.1", "a private address"),
        ("172.16.5.4", "a private address"),
        ("192.168.1.1", "a private address"),
        ("100.64.0.1", "a private address"),
        ("fd12::1", "a private address"),
        ("169.254.169.254", "a cloud metadata address"),
        ("fd00:ec2::254", "a cloud metadata address"),
        ("169.254.1.1", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("0.0.0.0", "the unspecified address"),
        ("224.0.0.1", "a multicast address"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_kinds(address: str, kind: str | None) -> None:
    assert netguard.address_kind(address) == kind


async def test_time_of_use_check_resolves_and_refuses_internal_answers() -> None:
    # What a chart fetcher calls just before connecting, and then connects to the answer.
    assert await netguard.resolve_public("charts.example.com", resolver=stub_resolver) == ["93.184.216.34"]
    for host in ("charts.internal.test", "charts.mixed.test", "127.1", "localhost"):
        with pytest.raises(netguard.Refused):
            await netguard.resolve_public(host, resolver=stub_resolver)
    with pytest.raises(netguard.Unresolvable):
        await netguard.resolve_public("x.nxdomain.test", resolver=stub_resolver)
    with pytest.raises(netguard.Refused, match="allowed hosts"):
        await netguard.resolve_public("charts.example.com", allowed=["ghcr.io"], resolver=stub_resolver)
