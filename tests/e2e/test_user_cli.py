"""The user command line (`python -m apphosting_cli deploy|get|list|...`) as a subprocess against a real stack."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.stack import Stack

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "create-deployment.json"
# Generous: a CLI run starts a Python process and may wait for a whole rollout on a loaded machine.
WITHIN = 180.0


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


async def cli(port: int, *args: str, within: float = WITHIN) -> Result:
    env = {**os.environ, "APPHOSTING_ADDR": f"127.0.0.1:{port}"}
    for name in ("APPHOSTING_TOKEN", "APPHOSTING_TOKEN_FILE", "APPHOSTING_TLS", "APPHOSTING_CA"):
        env.pop(name, None)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "apphosting_cli",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(within):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


def _web(name: str, *extra: str) -> list[str]:
    return [
        "deploy",
        "--name",
        name,
        "--region",
        "eu",
        "--app-type",
        "web_app",
        "--image",
        "ghcr.io/acme/web:1.0.0",
        "--cpu",
        "0.5",
        "--memory-mb",
        "512",
        *extra,
    ]


async def _listed(port: int) -> list[dict[str, Any]]:
    listed = await cli(port, "list", "-o", "json")
    assert listed.code == 0, listed
    found: list[dict[str, Any]] = json.loads(listed.out)
    return found


async def _id_of(port: int, name: str) -> str:
    return next(str(d["id"]) for d in await _listed(port) if d["name"] == name)


@pytest.mark.timeout(600)
async def test_deploy_from_the_example_file_waits_until_running_and_list_shows_it(stack: Stack) -> None:
    await stack.add_api()
    stack.add_scheduler()
    stack.add_provisioner()
    port = stack.apis[0].port
    deployed = await cli(port, "deploy", "-f", str(EXAMPLE), "--wait", "--timeout", str(WITHIN - 30))
    assert deployed.code == 0, deployed
    # Plain lines, one per step, when stdout is not a terminal; the last says how it ended.
    assert "\x1b[" not in deployed.out
    lines = deployed.out.splitlines()
    assert lines[0].startswith("shop-frontend ")
    assert "pending" in lines[0]
    assert any("provisioning" in line for line in lines)
    assert lines[-1].startswith("shop-frontend: running")

    as_json = await _listed(port)
    assert [(d["name"], d["status"]) for d in as_json] == [("shop-frontend", "DEPLOYMENT_STATUS_RUNNING")]
    as_yaml = await cli(port, "list", "-o", "yaml")
    assert as_yaml.code == 0, as_yaml
    assert [d["id"] for d in yaml.safe_load(as_yaml.out)] == [as_json[0]["id"]]
    table = await cli(port, "list")
    assert table.code == 0, table
    assert table.out.split()[:7] == ["ID", "NAME", "STATUS", "PHASE", "REGION", "LOCATION", "RELEASE"]
    assert as_json[0]["id"] in table.out
    assert "shop-frontend" in table.out
    assert "running" in table.out
    wide = await cli(port, "list", "-o", "wide")
    assert "ghcr.io/acme/shop-frontend:1.4.2" in wide.out
    got = await cli(port, "get", as_json[0]["id"], "-o", "yaml")
    assert yaml.safe_load(got.out)["docker_image"] == "ghcr.io/acme/shop-frontend:1.4.2"
    shown = await cli(port, "get", as_json[0]["id"])
    assert "running" in shown.out
    assert "shop-frontend" in shown.out


@pytest.mark.timeout(300)
async def test_a_failing_image_exits_1_and_says_why(stack: Stack) -> None:
    await stack.add_api()
    stack.add_scheduler()
    stack.add_provisioner()
    port = stack.apis[0].port
    failed = await cli(port, *_web("broken", "--image", "ghcr.io/acme/fail-permanent:1", "--wait"))
    assert failed.code == 1, failed
    assert failed.out.splitlines()[-1].startswith("broken: failed")


@pytest.mark.timeout(300)
async def test_invalid_input_lists_every_violated_field_and_exits_2(stack: Stack) -> None:
    await stack.add_api()
    port = stack.apis[0].port
    refused = await cli(port, *_web("ok", "--cpu", "-1", "--memory-mb", "0", "--region", "nowhere"))
    assert refused.code == 2, refused
    assert "INVALID_ARGUMENT" in refused.err
    fields = {line.split(":")[0].strip(" -") for line in refused.err.splitlines() if line.startswith("  - ")}
    assert {"cpu_request", "memory_request_mb", "geographic_region"} <= fields, refused.err
    assert "Traceback" not in refused.err
    unknown = await cli(port, "deploy", "--set", "no_such_field=1", "--name", "x", "--region", "eu")
    assert unknown.code == 2, unknown
    assert "no_such_field" in unknown.err
    assert "Traceback" not in unknown.err
    # Not a validation error: exit 1, still no traceback.
    missing = await cli(port, "get", "00000000-0000-4000-8000-000000000000")
    assert missing.code == 1, missing
    assert "NOT_FOUND" in missing.err
    assert "Traceback" not in missing.err
    assert await _listed(port) == []


@pytest.mark.timeout(900)
async def test_day2_commands_wait_for_each_operation(stack: Stack) -> None:
    await stack.add_api()
    stack.add_scheduler()
    stack.add_provisioner()
    port = stack.apis[0].port
    assert (await cli(port, *_web("web", "--env", "A=1", "--wait"))).code == 0
    web = await _id_of(port, "web")

    updated = await cli(port, "update", web, "--image", "ghcr.io/acme/web:1.1.0", "--env", "B=2", "--wait")
    assert updated.code == 0, updated
    assert "release 2 is running" in updated.out
    got = json.loads((await cli(port, "get", web, "-o", "json")).out)
    assert got["docker_image"] == "ghcr.io/acme/web:1.1.0"
    assert got["environment_variables"] == ["A=1", "B=2"]

    generic = await cli(port, "update", web, "--set", "container_port=9090", "--reason", "new port", "--wait")
    assert generic.code == 0, generic
    scaled = await cli(port, "scale", web, "3", "--wait")
    assert scaled.code == 0, scaled
    assert json.loads((await cli(port, "get", web, "-o", "json")).out)["replicas"] == 3

    stopped = await cli(port, "stop", web, "--wait")
    assert stopped.code == 0, stopped
    assert stopped.out.splitlines()[-1] == "web: stopped"
    assert json.loads((await cli(port, "get", web, "-o", "json")).out)["status"] == "DEPLOYMENT_STATUS_STOPPED"
    started = await cli(port, "start", web, "--wait")
    assert started.code == 0, started

    back = await cli(port, "rollback", web, "--release", "1", "--wait")
    assert back.code == 0, back
    got = json.loads((await cli(port, "get", web, "-o", "json")).out)
    assert got["docker_image"] == "ghcr.io/acme/web:1.0.0"
    assert got["release"] == "5"

    releases = await cli(port, "releases", web, "-o", "json")
    assert [(r["number"], r["operation"]) for r in json.loads(releases.out)] == [
        ("5", "rollback"),
        ("4", "scale"),
        ("3", "update"),
        ("2", "update"),
        ("1", "create"),
    ]
    table = await cli(port, "releases", web)
    assert "new port" in table.out

    log = await cli(port, "events", web)
    assert log.code == 0, log
    lines = log.out.splitlines()
    assert lines[0].startswith("#1 ")
    assert any("stopped" in line for line in lines)
    # Oldest first, each revision once.
    revisions = [int(line.split()[0][1:]) for line in lines]
    assert revisions == sorted(set(revisions))
    assert revisions[-1] == int(got["revision"])

    gone = await cli(port, "delete", web, "--wait")
    assert gone.code == 0, gone
    assert gone.out.splitlines()[-1] == "web: deleted"
    assert json.loads((await cli(port, "get", web, "-o", "json")).out)["deleted_at"]


@pytest.mark.timeout(300)
async def test_wait_gives_up_at_the_timeout_with_exit_3(stack: Stack) -> None:
    # No provisioner: the deployment is placed but never provisioned.
    await stack.add_api()
    stack.add_scheduler()
    port = stack.apis[0].port
    waited = await cli(port, *_web("stuck", "--wait", "--timeout", "2"))
    assert waited.code == 3, waited
    assert "timed out after 2 s" in waited.out


async def test_completion_scripts_name_the_apphosting_command(stack: Stack) -> None:
    await stack.add_api()
    port = stack.apis[0].port
    for shell in ("bash", "zsh", "fish"):
        script = await cli(port, "completion", shell)
        assert script.code == 0, script
        assert "_APPHOSTING_COMPLETE" in script.out
    env_completion = await _complete(port, "apphosting de")
    assert "deploy" in env_completion


async def _complete(port: int, line: str) -> str:
    """What bash completion offers for `line`: the program run as the bash script runs it."""
    words = line.split(" ")
    env = {
        **os.environ,
        "APPHOSTING_ADDR": f"127.0.0.1:{port}",
        "_APPHOSTING_COMPLETE": "complete_bash",
        "COMP_WORDS": line,
        "COMP_CWORD": str(len(words) - 1),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "apphosting_cli", env=env, cwd=REPO, stdout=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(WITHIN):
        out, _ = await process.communicate()
    return out.decode()


@pytest.mark.timeout(600)
async def test_an_image_without_an_app_type_deploys_a_container_and_operations_preview_with_validate_only(
    stack: Stack,
) -> None:
    await stack.add_api()
    stack.add_scheduler()
    stack.add_provisioner()
    port = stack.apis[0].port
    deployed = await cli(
        port, "deploy", "--name", "plain", "--region", "eu", "--image", "ghcr.io/acme/web:1.0.0", "--wait"
    )
    assert deployed.code == 0, deployed
    (plain,) = await _listed(port)
    assert plain["app_type"] == "APP_TYPE_CONTAINER"
    dry = await cli(port, "scale", plain["id"], "4", "--validate-only", "-o", "json")
    assert dry.code == 0, dry
    preview = json.loads(dry.out)
    assert preview["replicas"] == 4
    (after,) = await _listed(port)
    assert after["release"] == plain["release"]
    assert after["revision"] == plain["revision"]
