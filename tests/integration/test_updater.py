"""The updater's rounds against a real registry and the real pipeline: a repository is read once per interval
however many deployments use it, and a registry that says 429 is not asked again before its Retry-After."""

from __future__ import annotations

import datetime as dt
import http.server
from pathlib import Path

import yaml

from apphosting.imageupdates import UPDATER_ACTOR, RegistryAccess
from apphosting.locations import load_locations
from apphosting.registry import RegistryClient
from tests.support.image_updates import CountingTransport, at_rest, platform, until
from tests.support.registry import RunningRegistry, http_server, open_registry_fixture, push_image, retag
from tests.support.stack import Stack
from updater.service import Updater, UpdaterOptions

__all__ = ["open_registry_fixture"]

T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
INTERVAL = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_repository_is_read_once_per_interval_for_all_its_deployments(
    stack: Stack, open_registry: RunningRegistry
) -> None:
    host = open_registry.host
    first = await push_image(open_registry, "acme/web", "1.0.0", created=T0)
    await push_image(open_registry, "acme/api", "3.1.0", created=T0)
    world = await platform(stack, (host,))
    webs = [await world.running(f"web-{n}", f"{host}/acme/web:1.0.0", image_update_strategy="semver") for n in range(4)]
    api = await world.running(
        "api", f"{host}/acme/api:3.1.0", image_update_strategy="newest-build", image_allow_tags="regexp:^3\\."
    )
    # A deployment without a strategy is none of the updater's business.
    await world.running("static", f"{host}/acme/web:1.0.0")
    await retag(open_registry, "acme/web", first, "1.1.0")

    clock = Clock()
    transport = CountingTransport()
    registry = RegistryClient(plain_http=[host], transport=transport, clock=clock)
    updater = Updater(
        UpdaterOptions(client=world.updater_config(), interval=INTERVAL, registries=RegistryAccess(plain_http=(host,))),
        registry_client=registry,
        clock=clock,
    )
    try:
        done = await updater.run_round()
        assert sorted(done.polled) == [f"{host}/acme/api", f"{host}/acme/web"]
        assert transport.tag_lists("acme/web") == 1
        assert transport.tag_lists("acme/api") == 1
        assert sorted(done.updated) == sorted(web.id for web in webs)
        for web in webs:
            seen = await until(world.user, web.id, at_rest(2), since=web.revision)
            assert seen[-1].deployment.docker_image == f"{host}/acme/web:1.1.0"
            update = next(item.event for item in seen if item.event.phase == "update_requested")
            assert update.actor == UPDATER_ACTOR

        # Within the interval, nothing is read again.
        again = await updater.run_round()
        assert again.polled == []
        assert sorted(again.skipped) == [f"{host}/acme/api", f"{host}/acme/web"]
        assert transport.tag_lists("acme/web") == 1

        # An interval later, once more; nothing is left to update.
        clock.now += INTERVAL
        later = await updater.run_round()
        assert sorted(later.polled) == [f"{host}/acme/api", f"{host}/acme/web"]
        assert later.updated == []
        assert transport.tag_lists("acme/web") == 2
        assert (await world.user.get(api.id)).release == 1
    finally:
        await updater.close()
        await world.close()


class TooMany(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(429)
        self.send_header("Retry-After", "300")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


async def test_a_rate_limited_registry_is_not_asked_before_its_retry_after(stack: Stack) -> None:
    with http_server(TooMany) as limited:
        world = await platform(stack, (limited,))
        await world.running("web", f"{limited}/acme/web:1.0.0", image_update_strategy="semver")
        clock = Clock()
        transport = CountingTransport()
        registry = RegistryClient(plain_http=[limited], transport=transport, clock=clock)
        updater = Updater(
            UpdaterOptions(client=world.updater_config(), interval=INTERVAL),
            registry_client=registry,
            clock=clock,
        )
        try:
            first = await updater.run_round()
            assert first.failed == [f"{limited}/acme/web"]
            assert transport.tag_lists("acme/web") == 1
            # An interval later the registry's 300 s are not over: it is not asked.
            clock.now += INTERVAL
            second = await updater.run_round()
            assert second.skipped == [f"{limited}/acme/web"]
            assert transport.tag_lists("acme/web") == 1
            clock.now += 300
            third = await updater.run_round()
            assert third.failed == [f"{limited}/acme/web"]
            assert transport.tag_lists("acme/web") == 2
        finally:
            await updater.close()
            await world.close()


async def test_deployments_on_a_location_that_argo_cd_image_updater_serves_are_left_alone(
    stack: Stack, open_registry: RunningRegistry, tmp_path: Path
) -> None:
    host = open_registry.host
    await push_image(open_registry, "acme/web", "1.0.0", created=T0)
    world = await platform(stack, (host,))
    web = await world.running("web", f"{host}/acme/web:1.0.0", image_update_strategy="semver")
    await push_image(open_registry, "acme/web", "1.1.0", created=T0)
    served = load_locations(stack.locations_file).locations
    argocd = tmp_path / "locations.yaml"
    argocd.write_text(
        yaml.safe_dump(
            {
                "locations": [
                    {**location.model_dump(mode="json", exclude_none=True), "image_updater": "argocd"}
                    for location in served
                ]
            }
        )
    )
    updater = Updater(
        UpdaterOptions(
            client=world.updater_config(),
            interval=INTERVAL,
            registries=RegistryAccess(plain_http=(host,)),
            locations_file=str(argocd),
        )
    )
    try:
        done = await updater.run_round()
        assert (done.polled, done.updated) == ([], [])
        assert (await world.user.get(web.id)).release == 1
    finally:
        await updater.close()
        await world.close()
