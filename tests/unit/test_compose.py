"""Checks of docker-compose.yml and the Dockerfile: the stack they describe matches the `apphosting` command."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from apphosting_cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
# Each service that runs the apphosting image, with the subcommand it runs.
APPHOSTING_SERVICES = {
    "migrate": "migrate",
    "api": "api",
    "scheduler": "scheduler",
    "provisioner": "provisioner",
    "updater": "updater",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result = compose["services"]
    assert isinstance(result, dict)
    return result


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Service name -> condition; the short list form means `service_started`."""
    depends = service.get("depends_on", {})
    if isinstance(depends, list):
        return dict.fromkeys(depends, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in depends.items()}


def _option_values(command: list[str], option: str) -> list[str]:
    values = [command[i + 1] for i, part in enumerate(command[:-1]) if part == option]
    values += [part.split("=", 1)[1] for part in command if part.startswith(option + "=")]
    return values


def _subcommands() -> set[str]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("the apphosting parser has no subcommands")


def test_the_stack_has_every_service(services: dict[str, dict[str, Any]]) -> None:
    assert {"nats", "postgres", *APPHOSTING_SERVICES} <= set(services)


def test_apphosting_services_share_one_image_and_run_their_subcommand(services: dict[str, dict[str, Any]]) -> None:
    images = {(str(services[name].get("build")), services[name].get("image")) for name in APPHOSTING_SERVICES}
    assert len(images) == 1, images
    ((build, image),) = images
    assert build == "."
    assert image
    for name, subcommand in APPHOSTING_SERVICES.items():
        assert _command(services[name])[0] == subcommand, name


def test_every_subcommand_exists_in_the_cli(services: dict[str, dict[str, Any]]) -> None:
    used = {_command(services[name])[0] for name in APPHOSTING_SERVICES}
    missing = used - _subcommands()
    assert not missing, f"docker-compose.yml runs subcommands that `apphosting` lacks: {sorted(missing)}"


def test_every_option_in_compose_is_accepted_by_the_cli(services: dict[str, dict[str, Any]]) -> None:
    known = _subcommands()  # a missing subcommand fails the test above
    for name in APPHOSTING_SERVICES:
        command = _command(services[name])
        if command[0] in known:
            # Exits (SystemExit) on any unknown option or bad value.
            build_parser().parse_args(command)


def test_processes_wait_for_their_dependencies(services: dict[str, dict[str, Any]]) -> None:
    ready = {"nats": "service_healthy", "postgres": "service_healthy", "migrate": "service_completed_successfully"}
    assert _depends_on(services["migrate"]) == {"postgres": "service_healthy"}
    for name in ("api", "scheduler", "provisioner"):
        command = _command(services[name])
        needed = {"nats"}
        if "--database-url" in command:
            needed |= {"postgres", "migrate"}
        depends = _depends_on(services[name])
        assert {dep: depends.get(dep) for dep in needed} == {dep: ready[dep] for dep in needed}, name
    for name in ("api", "scheduler"):
        assert _option_values(_command(services[name]), "--database-url"), f"{name} must use PostgreSQL"


def test_urls_point_at_compose_services(services: dict[str, dict[str, Any]]) -> None:
    for name in APPHOSTING_SERVICES:
        command = _command(services[name])
        for option, service in (("--nats-url", "nats"), ("--database-url", "postgres")):
            for url in _option_values(command, option):
                host = urlsplit(url).hostname
                assert host in services, f"{name}: {option} {url} names no service"
                assert host == service, f"{name}: {option} {url} should point at {service}"


def test_nats_runs_jetstream_on_a_volume(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    nats = services["nats"]
    assert str(nats["image"]).startswith("nats:")
    command = _command(nats)
    assert "-js" in command or "--jetstream" in command
    (store_dir,) = _option_values(command, "-sd") or _option_values(command, "--store_dir")
    volumes = {str(v).split(":")[1]: str(v).split(":")[0] for v in nats["volumes"]}
    assert store_dir in volumes, "JetStream's file storage must be on a volume"
    assert volumes[store_dir] in (compose.get("volumes") or {}), "the NATS volume must be a named volume"


def test_postgres_has_a_volume_and_a_health_check(services: dict[str, dict[str, Any]]) -> None:
    postgres = services["postgres"]
    assert any(str(v).endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert "pg_isready" in postgres["healthcheck"]["test"]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = (line.strip() for line in text.splitlines())
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.partition(" ") for line in lines if line and not line.startswith("#"))
    ]


def test_dockerfile_runs_apphosting_as_a_user_without_dev_extras() -> None:
    instructions = _dockerfile_instructions()
    (entrypoint,) = [rest for word, rest in instructions if word == "ENTRYPOINT"]
    assert "apphosting" in entrypoint
    users = [rest for word, rest in instructions if word == "USER"]
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    installs = [rest for word, rest in instructions if word == "RUN" and "pip install" in rest]
    assert installs
    assert not any("[dev]" in rest or "-e " in rest for rest in installs)
    assert any(re.search(r"pip install (\S+ )*\.(\s|$)", rest) for rest in installs)


def test_prometheus_scrapes_every_process_on_its_metrics_port(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {
        target for job in config["scrape_configs"] for entry in job["static_configs"] for target in entry["targets"]
    }
    for name in ("api", "scheduler", "provisioner", "rest", "updater"):
        (listen,) = _option_values(_command(services[name]), "--metrics-listen")
        port = listen.rpartition(":")[2]
        assert f"{name}:{port}" in targets, name
    mounted = " ".join(services["prometheus"]["volumes"])
    assert "./deploy/prometheus/alerts.yml" in mounted
    assert "./deploy/grafana/dashboard.json" in " ".join(services["grafana"]["volumes"])


# The processes that use the key file of secret environment values: the API seals, the provisioner opens.
KEY_FILE_USERS = ("api", "provisioner")
KEY_FILE_MAKER = "secret-keys"


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Container path -> (source, mode) of a service's short-syntax volumes."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *mode = str(volume).split(":")
        mounts[target] = (source, mode[0] if mode else "rw")
    return mounts


def _key_file_script(services: dict[str, dict[str, Any]]) -> str:
    maker = services[KEY_FILE_MAKER]
    assert maker["entrypoint"] == ["sh", "-c"]
    (script,) = _command(maker) if isinstance(maker["command"], str) else maker["command"]
    return str(script)


def test_the_key_file_is_made_once_by_a_one_shot_on_a_named_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    maker = services[KEY_FILE_MAKER]
    assert maker["restart"] == "no"
    assert (str(maker.get("build")), maker.get("image")) == (
        str(services["api"].get("build")),
        services["api"]["image"],
    )
    script = _key_file_script(services)
    made = re.search(r"test -e (\S+) \|\| apphosting (secrets new-key-file (\S+));", script)
    assert made, f"the one-shot must make the key file only when it is missing: {script!r}"
    path, invocation, made_path = made[1], made[2], made[3]
    assert path == made_path
    # `new-key-file` refuses a file that exists; the guard above is what keeps a second `up` succeeding.
    assert build_parser().parse_args(shlex.split(invocation)).path == path
    assert f"chown 10001:10001 {path}" in script, "the image's user must own the key file it reads"
    source, mode = _mounts(maker)[str(Path(path).parent)]
    assert source in (compose.get("volumes") or {}), "the key file must live on a named volume"
    assert mode == "rw"


def test_only_the_api_and_the_provisioner_get_the_key_file_read_only(services: dict[str, dict[str, Any]]) -> None:
    maker_source, _ = _mounts(services[KEY_FILE_MAKER])["/keys"]
    made_path = re.findall(r"new-key-file (\S+);", _key_file_script(services))[0]
    for name in (*APPHOSTING_SERVICES, "rest"):
        service = services[name]
        paths = _option_values(_command(service), "--secret-key-file")
        key_mounts = {target: spec for target, spec in _mounts(service).items() if spec[0] == maker_source}
        if name not in KEY_FILE_USERS:
            assert not paths, f"{name} must not get the key file"
            assert not key_mounts, f"{name} must not mount the key file"
            assert KEY_FILE_MAKER not in _depends_on(service), name
            continue
        (path,) = paths
        assert key_mounts == {str(Path(path).parent): (maker_source, "ro")}, name
        assert Path(path).name == Path(made_path).name, name
        assert _depends_on(service)[KEY_FILE_MAKER] == "service_completed_successfully", name
