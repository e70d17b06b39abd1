"""PreviewImageUpdate through the real API (gRPC, SQLite, auth) against a real docker-registry: every strategy,
the allow and ignore rules, the refusals, and the registry's failures as statuses."""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import json_format

from apphosting.imageupdates import UPDATER_ACTOR, RegistryAccess
from apphosting.v1 import deployments_pb2 as pb
from apphosting.v1 import deployments_pb2_grpc
from services.deployments.app import ApiOptions, ApiServer
from services.deployments.auth import JwtVerifier, mint_token
from services.deployments.quotas import UNLIMITED
from tests.support.grpc_errors import Details, details_of
from tests.support.registry import (
    REGISTRY_PASSWORD,
    REGISTRY_USER,
    RunningRegistry,
    free_port,
    htpasswd_registry_fixture,
    http_server,
    open_registry_fixture,
    push_image,
    retag,
)

if TYPE_CHECKING:
    from apphosting.v1.deployments_pb2_grpc import DeploymentServiceAsyncStub as Stub

__all__ = ["htpasswd_registry_fixture", "open_registry_fixture"]

T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
OWNER = "8c1d6a52-3f0e-4b8e-9a57-8f7d1e2c3b4a"
OTHER = "1b2c3d4e-5f60-4718-9a0b-1c2d3e4f5a6b"


class Api:
    """One API on a fresh SQLite database, no bus; `stub(user)` calls it with that user's token."""

    def __init__(self, server: ApiServer, secret: bytes, channel: grpc.aio.Channel) -> None:
        self.server = server
        self.secret = secret
        self.channel = channel

    def metadata(self, user: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {mint_token(self.secret, user)}"),)

    async def create(self, name: str, image: str, **fields: Any) -> pb.Deployment:
        body = {
            "geographic_region": "eu",
            "deployment_name": name,
            "app_type": "web_app",
            "cpu_request": 0.5,
            "memory_request_mb": 512,
            **({"docker_image": image} if image else {}),
            **fields,
        }
        request = json_format.ParseDict(body, pb.CreateAppHostingDeploymentRequest())
        return await self.stub.CreateAppHostingDeployment(request, metadata=self.metadata(OWNER))

    async def preview(self, deployment_id: str, user: str = OWNER) -> pb.PreviewImageUpdateResponse:
        request = pb.PreviewImageUpdateRequest(id=deployment_id)
        return await self.stub.PreviewImageUpdate(request, metadata=self.metadata(user))

    async def refused(self, deployment_id: str, user: str = OWNER) -> Details:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await self.preview(deployment_id, user)
        return details_of(failure.value)

    @property
    def stub(self) -> Stub:
        return deployments_pb2_grpc.DeploymentServiceStub(self.channel)


@asynccontextmanager
async def api_for(tmp_path: Path, registries: RegistryAccess) -> AsyncIterator[Api]:
    secret = secrets.token_bytes(32)
    server = ApiServer(
        ApiOptions(
            listen="127.0.0.1:0",
            database_url=f"sqlite+aiosqlite:///{tmp_path / f'api-{secrets.token_hex(4)}.db'}",
            nats_url=None,
            auth=JwtVerifier.from_secret(secret),
            quotas=UNLIMITED,
            registries=registries,
        )
    )
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Api(server, secret, channel)
    finally:
        await channel.close()
        await server.stop()


def verdicts(answer: pb.PreviewImageUpdateResponse) -> dict[str, str]:
    return {c.tag: c.excluded_by or "kept" for c in answer.candidates}


async def push_tags(registry: RunningRegistry, repository: str, tags: list[str]) -> None:
    first = await push_image(registry, repository, tags[0], created=T0)
    for tag in tags[1:]:
        await retag(registry, repository, first, tag)


async def test_semver_with_allow_and_ignore_rules(open_registry: RunningRegistry, tmp_path: Path) -> None:
    repo = "acme/web"
    await push_tags(
        open_registry, repo, ["1.2.3", "1.2.4", "1.2.9", "1.3.0", "2.0.0", "1.2.5-rc.1", "latest", "v1.2.6"]
    )
    async with api_for(tmp_path, RegistryAccess(plain_http=(open_registry.host,))) as api:
        web = await api.create(
            "web",
            f"{open_registry.host}/{repo}:1.2.3",
            image_update_strategy="semver",
            image_update_constraint="~1.2",
            image_allow_tags="regexp:^v?1\\.",
            image_ignore_tags="1.2.9,*-rc*",
        )
        answer = await api.preview(web.id)
        assert answer.repository == f"{open_registry.host}/{repo}"
        assert answer.strategy == "semver"
        assert answer.constraint == "~1.2"
        assert answer.current_tag == "1.2.3"
        assert verdicts(answer) == {
            "1.2.3": "kept",
            "1.2.4": "kept",
            "1.2.9": "ignored",
            "1.3.0": "outside-constraint",
            "2.0.0": "not-allowed",
            "1.2.5-rc.1": "ignored",
            "latest": "not-allowed",
            "v1.2.6": "kept",
        }
        details = {c.tag: c.detail for c in answer.candidates}
        assert details["1.2.9"] == "ignored by pattern '1.2.9'"
        assert details["1.3.0"] == "outside constraint '~1.2'"
        assert answer.winner == "v1.2.6"
        assert "highest semantic version within '~1.2'" in answer.reason
        assert answer.would_update
        assert not answer.paused
        assert answer.new_docker_image == f"{open_registry.host}/{repo}:v1.2.6"
        assert answer.new_release == 2
        # Nothing was written: the deployment is as created.
        again = await api.stub.GetDeployment(pb.GetDeploymentRequest(id=web.id), metadata=api.metadata(OWNER))
        assert (again.docker_image, again.release, again.etag) == (web.docker_image, 1, web.etag)

        # An empty constraint never picks a pre-release; a constraint that names one may.
        bare = await api.create("bare", f"{open_registry.host}/{repo}:1.2.3", image_update_strategy="semver")
        answer = await api.preview(bare.id)
        assert verdicts(answer)["1.2.5-rc.1"] == "prerelease"
        assert verdicts(answer)["latest"] == "not-semver"
        assert answer.winner == "2.0.0"

        # A deployment already on the winner would not be updated.
        current = await api.create(
            "current", f"{open_registry.host}/{repo}:2.0.0", image_update_strategy="semver", image_ignore_tags="*"
        )
        answer = await api.preview(current.id)
        assert set(verdicts(answer).values()) == {"updates-disabled"}
        assert not answer.would_update
        assert answer.winner == ""


async def test_newest_build_alphabetical_and_digest(open_registry: RunningRegistry, tmp_path: Path) -> None:
    repo = "acme/api"
    old = await push_image(open_registry, repo, "build-a", created=T0)
    newest = await push_image(open_registry, repo, "build-b", created=T0 + dt.timedelta(hours=2))
    await push_image(open_registry, repo, "build-c", created=T0 + dt.timedelta(hours=1))
    await push_image(open_registry, repo, "zz-unbuilt", created=None)
    stable = await retag(open_registry, repo, old, "stable")
    async with api_for(tmp_path, RegistryAccess(plain_http=(open_registry.host,))) as api:
        image = f"{open_registry.host}/{repo}"
        built = await api.create(
            "built", f"{image}:build-a", image_update_strategy="newest-build", image_ignore_tags="stable"
        )
        answer = await api.preview(built.id)
        assert answer.winner == "build-b"
        assert answer.winner_digest == newest.digest
        assert verdicts(answer) == {
            "build-a": "kept",
            "build-b": "kept",
            "build-c": "kept",
            "zz-unbuilt": "no-created-time",
            "stable": "ignored",
        }
        created = {c.tag: c.created.ToDatetime(tzinfo=dt.UTC) for c in answer.candidates if c.HasField("created")}
        assert created["build-b"] == T0 + dt.timedelta(hours=2)
        assert "most recently built" in answer.reason
        assert answer.new_docker_image == f"{image}:build-b"

        named = await api.create("named", f"{image}:build-a", image_update_strategy="alphabetical")
        answer = await api.preview(named.id)
        assert answer.winner == "zz-unbuilt"
        assert answer.strategy == "alphabetical"
        assert not any(c.digest for c in answer.candidates)

        followed = await api.create(
            "followed", f"{image}:stable", image_update_strategy="digest", image_update_constraint="stable"
        )
        answer = await api.preview(followed.id)
        assert verdicts(answer)["stable"] == "kept"
        assert verdicts(answer)["build-b"] == "not-followed-tag"
        assert answer.winner == "stable"
        assert answer.winner_digest == stable
        assert answer.would_update
        assert answer.new_docker_image == f"{image}:stable@{stable}"

        # Pinned at the digest the tag still names: nothing to do; the tag moves: an update.
        pinned = await api.create(
            "pinned",
            f"{image}:stable@{stable}",
            image_update_strategy="digest",
            image_update_constraint="stable",
        )
        answer = await api.preview(pinned.id)
        assert answer.current_digest == stable
        assert not answer.would_update
        assert "still points at" in answer.reason
        await retag(open_registry, repo, newest, "stable")
        answer = await api.preview(pinned.id)
        assert answer.would_update
        assert answer.winner_digest == newest.digest
        assert answer.new_docker_image == f"{image}:stable@{newest.digest}"


async def test_refusals_name_the_field_and_follow_ownership(open_registry: RunningRegistry, tmp_path: Path) -> None:
    await push_tags(open_registry, "acme/web", ["1.0.0"])
    async with api_for(tmp_path, RegistryAccess(plain_http=(open_registry.host,))) as api:
        image = f"{open_registry.host}/acme/web:1.0.0"
        plain = await api.create("plain", image)
        refused = await api.refused(plain.id)
        assert refused.code == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.metadata["field"] == "image_update_strategy"

        web = await api.create("web", image, image_update_strategy="semver")
        # Another user's deployment is not found, as an unknown id is; the updater's identity sees it.
        assert (await api.refused(web.id, OTHER)).code == grpc.StatusCode.NOT_FOUND
        assert (await api.refused("b3a0f8a6-2a3c-4c39-9d6e-1f0a3c9b2d7e")).code == grpc.StatusCode.NOT_FOUND
        assert (await api.refused("not-a-uuid")).code == grpc.StatusCode.INVALID_ARGUMENT
        assert (await api.preview(web.id, UPDATER_ACTOR)).winner == "1.0.0"
        # That identity may read, preview and update; nothing else.
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await api.stub.DeleteDeployment(pb.DeleteDeploymentRequest(id=web.id), metadata=api.metadata(UPDATER_ACTOR))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_registry_failures_are_clear_statuses(
    open_registry: RunningRegistry, htpasswd_registry: RunningRegistry, tmp_path: Path
) -> None:
    await push_image(htpasswd_registry, "private/web", "1.0.1", created=T0)

    class TooMany(http.server.BaseHTTPRequestHandler):
        asked: list[str] = []

        def do_GET(self) -> None:
            self.asked.append(self.path)
            self.send_response(429)
            self.send_header("Retry-After", "42")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Malformed(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if "/tags/list" in self.path:
                body = json.dumps({"name": "acme/web", "tags": ["1.0.0", "1.0.1"]}).encode()
            else:
                body = b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"'
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    with http_server(TooMany) as limited, http_server(Malformed) as malformed:
        hosts = (open_registry.host, htpasswd_registry.host, limited, malformed)
        async with api_for(tmp_path, RegistryAccess(plain_http=hosts)) as api:

            async def refusal(name: str, image: str, strategy: str = "semver") -> Details:
                created = await api.create(name, image, image_update_strategy=strategy)
                return await api.refused(created.id)

            unknown = await refusal("unknown", f"{open_registry.host}/acme/nothing:1.0.0")
            assert unknown.code == grpc.StatusCode.FAILED_PRECONDITION
            assert unknown.reason == "IMAGE_REPOSITORY_NOT_FOUND"
            assert unknown.metadata["field"] == "docker_image"
            assert "docker_image" in unknown.message

            private = await refusal("private", f"{htpasswd_registry.host}/private/web:1.0.1")
            assert private.code == grpc.StatusCode.UNAVAILABLE
            assert private.reason == "REGISTRY_AUTH_REFUSED"

            slow = await refusal("limited", f"{limited}/acme/web:1.0.0")
            assert slow.code == grpc.StatusCode.UNAVAILABLE
            assert slow.reason == "REGISTRY_RATE_LIMITED"
            assert slow.metadata["retry_after_seconds"] == "42"
            # The registry asked for 42 s: a second preview does not ask it again before then.
            again = await refusal("limited-again", f"{limited}/acme/web:1.0.0")
            assert again.code == grpc.StatusCode.UNAVAILABLE
            assert again.reason == "REGISTRY_RATE_LIMITED"
            assert 1 <= int(again.metadata["retry_after_seconds"]) <= 42
            assert len(TooMany.asked) == 1

            # A registry at an internal address the operator did not name is not asked.
            inward = await refusal("inward", "10.1.2.3:5000/acme/web:1.0.0")
            assert inward.code == grpc.StatusCode.FAILED_PRECONDITION
            assert inward.reason == "REGISTRY_ADDRESS_REFUSED"
            assert inward.metadata["field"] == "docker_image"
            loopback = await refusal("loopback", f"127.0.0.1:{free_port()}/acme/web:1.0.0")
            assert loopback.reason == "REGISTRY_ADDRESS_REFUSED"

            # newest-build reads each tag's manifest, and this registry's is cut short.
            bad = await refusal("malformed", f"{malformed}/acme/web:1.0.0", "newest-build")
            assert bad.code == grpc.StatusCode.FAILED_PRECONDITION
            assert bad.reason == "REGISTRY_MALFORMED_RESPONSE"
            assert bad.metadata["field"] == "docker_image"

    # With the registry's credentials in a Docker config.json, the same preview works.
    config = tmp_path / "config.json"
    pair = base64.b64encode(f"{REGISTRY_USER}:{REGISTRY_PASSWORD}".encode()).decode()
    config.write_text(json.dumps({"auths": {htpasswd_registry.host: {"auth": pair}}}))
    access = RegistryAccess(credentials_file=str(config), plain_http=(htpasswd_registry.host,))
    async with api_for(tmp_path, access) as api:
        created = await api.create(
            "private", f"{htpasswd_registry.host}/private/web:1.0.0", image_update_strategy="semver"
        )
        answer = await api.preview(created.id)
        assert answer.winner == "1.0.1"
        assert answer.would_update


async def test_patterns_made_to_backtrack_are_matched_at_once(open_registry: RunningRegistry, tmp_path: Path) -> None:
    # A backtracking engine would try every way to split the long tag among the repeats (2**120
    # for the allow pattern), on the API's event loop.
    repo = "acme/long"
    long_tag = "a" * 120 + "-1"
    await push_tags(open_registry, repo, ["1.0.0", long_tag])
    async with api_for(tmp_path, RegistryAccess(plain_http=(open_registry.host,))) as api:
        web = await api.create(
            "web",
            f"{open_registry.host}/{repo}:1.0.0",
            image_update_strategy="alphabetical",
            image_allow_tags="regexp:^(a|a)*c|^1\\.",
            image_ignore_tags="*a*a*a*a*a*a*a*a*c",
        )
        answer = await api.preview(web.id)
        assert verdicts(answer) == {"1.0.0": "kept", long_tag: "not-allowed"}
