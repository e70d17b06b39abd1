"""End to end: a tag pushed to a real registry is deployed by the image updater through the day-2 path, with its
actor and reason; a rollback pins the deployment and a newer tag is then not deployed."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import http.server
import json
from collections.abc import Callable, Iterator

import httpx
import pytest
from google.protobuf import json_format

from apphosting.imageupdates import UPDATER_ACTOR, RegistryAccess
from apphosting.v1 import deployments_pb2 as pb
from tests.e2e.test_rest import serve_gateway
from tests.e2e.test_user_cli import cli
from tests.support.image_updates import at_rest, platform, until
from tests.support.registry import RunningRegistry, http_server, open_registry_fixture, push_image
from tests.support.stack import Stack, eventually
from updater.service import Updater, UpdaterOptions

__all__ = ["open_registry_fixture"]

T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)


async def test_a_pushed_tag_is_deployed_and_a_rollback_pins(stack: Stack, open_registry: RunningRegistry) -> None:
    host = open_registry.host
    image = f"{host}/acme/web"
    await push_image(open_registry, "acme/web", "1.2.3", created=T0)
    await push_image(open_registry, "acme/web", "2.0.0", created=T0)
    world = await platform(stack, (host,))
    web = await world.running("web", f"{image}:1.2.3", image_update_strategy="semver", image_update_constraint="~1.2")
    # 2.0.0 is outside the constraint: nothing to do yet.
    preview = await world.user.preview_image_update(web.id)
    assert preview.winner == "1.2.3"
    assert not preview.would_update

    updater = Updater(
        UpdaterOptions(client=world.updater_config(), interval=0.2, registries=RegistryAccess(plain_http=(host,)))
    )
    stop = asyncio.Event()
    running = asyncio.create_task(updater.run(stop))
    try:
        await push_image(open_registry, "acme/web", "1.2.4", created=T0 + dt.timedelta(hours=1))
        seen = await until(
            world.user, web.id, lambda d: d.docker_image == f"{image}:1.2.4" and at_rest(2)(d), since=web.revision
        )
        assert seen[-1].deployment.release == 2
        requested = [item.event for item in seen if item.event.phase == "update_requested"]
        assert len(requested) == 1, seen
        assert requested[0].actor == UPDATER_ACTOR
        assert f"reason: {UPDATER_ACTOR}: tag 1.2.4, highest semantic version within '~1.2'" in requested[0].message
        releases = await world.user.releases(web.id)
        newest = releases.releases[0]
        assert (newest.number, newest.operation, newest.actor) == (2, "update", UPDATER_ACTOR)
        assert newest.reason.startswith(f"{UPDATER_ACTOR}: tag 1.2.4")

        # A rollback pins: updates pause, and a newer matching tag is not deployed.
        back = await world.user.rollback(web.id, 1, reason="1.2.4 misbehaves")
        rolled = await until(
            world.user, web.id, lambda d: d.docker_image == f"{image}:1.2.3" and at_rest(3)(d), since=back.revision
        )
        assert rolled[-1].deployment.image_updates_paused
        await push_image(open_registry, "acme/web", "1.2.5", created=T0 + dt.timedelta(hours=2))
        preview = await world.user.preview_image_update(web.id)
        assert preview.paused
        assert preview.winner == "1.2.5"
        assert not preview.would_update
        assert "paused" in preview.reason
        # Three whole rounds of the updater after the push leave it where the rollback put it.
        rounds = updater.rounds
        await eventually(lambda: _rounds_after(updater, rounds + 3), within=60.0)
        now = await world.user.get(web.id)
        assert (now.docker_image, now.release) == (f"{image}:1.2.3", 3)
    finally:
        stop.set()
        await running
        await updater.close()
        await world.close()


async def _rounds_after(updater: Updater, count: int) -> bool:
    return updater.rounds >= count


class TooMany(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(429)
        self.send_header("Retry-After", "42")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def stack_server() -> Iterator[Callable[[type[http.server.BaseHTTPRequestHandler]], str]]:
    """Starts small HTTP servers for the test; returns each one's host:port."""
    with contextlib.ExitStack() as servers:
        yield lambda handler: servers.enter_context(http_server(handler))


async def test_the_preview_through_the_cli_and_rest(
    stack: Stack,
    open_registry: RunningRegistry,
    stack_server: Callable[[type[http.server.BaseHTTPRequestHandler]], str],
) -> None:
    host = open_registry.host
    image = f"{host}/acme/web"
    await push_image(open_registry, "acme/web", "1.2.3", created=T0)
    await push_image(open_registry, "acme/web", "1.2.4", created=T0)
    await push_image(open_registry, "acme/web", "1.3.0", created=T0)
    limited = stack_server(TooMany)
    stub = await stack.add_api(registries=RegistryAccess(plain_http=(host, limited)))
    port = stack.apis[-1].port
    body = {
        "geographic_region": "eu",
        "deployment_name": "web",
        "app_type": "web_app",
        "docker_image": f"{image}:1.2.3",
        "cpu_request": 0.5,
        "memory_request_mb": 512,
        "image_update_strategy": "semver",
        "image_update_constraint": "~1.2",
    }
    web = await stub.CreateAppHostingDeployment(json_format.ParseDict(body, pb.CreateAppHostingDeploymentRequest()))

    table = await cli(port, "preview-image", web.id)
    assert table.code == 0, table
    assert "would update" in table.out
    assert f"{image}:1.2.4" in table.out
    assert "outside constraint '~1.2'" in table.out
    as_json = await cli(port, "preview-image", web.id, "-o", "json")
    assert as_json.code == 0, as_json
    answer = json.loads(as_json.out)
    assert answer["winner"] == "1.2.4"
    assert answer["would_update"] is True
    assert {c["tag"]: c.get("excluded_by", "") for c in answer["candidates"]} == {
        "1.2.3": "",
        "1.2.4": "",
        "1.3.0": "outside-constraint",
    }
    missing = await cli(port, "preview-image", "b3a0f8a6-2a3c-4c39-9d6e-1f0a3c9b2d7e")
    assert missing.code != 0
    assert "does not exist" in missing.err + missing.out

    gateway = await serve_gateway(port)
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            found = await http.get(f"/deployments/{web.id}/image-update-preview")
            assert found.status_code == 200, found.text
            preview = found.json()
            assert preview["winner"] == "1.2.4"
            assert preview["new_docker_image"] == f"{image}:1.2.4"
            assert preview["new_release"] == 2
            verdicts = {c["tag"]: c["excluded_by"] for c in preview["candidates"]}
            assert verdicts == {"1.2.3": "", "1.2.4": "", "1.3.0": "outside-constraint"}
            gone = await http.get("/deployments/b3a0f8a6-2a3c-4c39-9d6e-1f0a3c9b2d7e/image-update-preview")
            assert gone.status_code == 404
            plain = await stub.CreateAppHostingDeployment(
                json_format.ParseDict(
                    {
                        **body,
                        "deployment_name": "plain",
                        "image_update_strategy": None,
                        "image_update_constraint": None,
                    },
                    pb.CreateAppHostingDeploymentRequest(),
                )
            )
            refused = await http.get(f"/deployments/{plain.id}/image-update-preview")
            assert refused.status_code == 409
            assert refused.json()["reason"] == "IMAGE_POLICY_UNUSABLE"
            slow = {"deployment_name": "slow", "docker_image": f"{limited}/acme/web:1.0.0"}
            throttled = await stub.CreateAppHostingDeployment(
                json_format.ParseDict({**body, **slow}, pb.CreateAppHostingDeploymentRequest())
            )
            busy = await http.get(f"/deployments/{throttled.id}/image-update-preview")
            assert busy.status_code == 503
            assert busy.json()["reason"] == "REGISTRY_RATE_LIMITED", busy.json()
            # The client retries UNAVAILABLE; later answers come from the API's backoff, with the time left.
            assert 1 <= int(busy.headers["Retry-After"]) <= 42
    finally:
        await gateway.stop()
