"""The registry client against a real docker-registry (open, htpasswd, token auth) and small servers for 429/5xx."""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from apphosting.registry import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Backoff,
    Credentials,
    ImageReference,
    MalformedResponse,
    NotFound,
    Platform,
    RateLimited,
    RegistryClient,
    RegistryUnavailable,
    Unauthorized,
    load_docker_config,
)
from tests.support.registry import (
    REGISTRY_PASSWORD,
    REGISTRY_USER,
    RunningRegistry,
    TokenServer,
    free_port,
    htpasswd_registry_fixture,
    http_server,
    open_registry_fixture,
    push_image,
    push_index,
    retag,
    token_registry_fixture,
    token_server_fixture,
)

__all__ = ["htpasswd_registry_fixture", "open_registry_fixture", "token_registry_fixture", "token_server_fixture"]

T0 = dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)


class Clock:
    """A clock the test moves, for token expiry and backoff."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingTransport(httpx.AsyncBaseTransport):
    """Passes requests on and remembers their URLs, to see pages and token fetches happen."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.urls: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.urls.append(str(request.url))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def client_for(registry: RunningRegistry, **options: object) -> RegistryClient:
    return RegistryClient(plain_http=[registry.host], **options)  # type: ignore[arg-type]


def docker_config(tmp_path: Path, host: str, username: str, password: str) -> Path:
    path = tmp_path / "config.json"
    auth = base64.b64encode(f"{username}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {f"http://{host}/v2/": {"auth": auth}}}))
    return path


async def test_tags_of_the_real_registry(open_registry: RunningRegistry) -> None:
    image = await push_image(open_registry, "team/web", "v1.0.0", created=T0)
    names = [f"v1.0.{i}" for i in range(1, 8)]
    for name in names:
        await retag(open_registry, "team/web", image, name)
    async with client_for(open_registry) as client:
        tags = await client.list_tags(open_registry.host, "team/web", page_size=3)
    # distribution 2.8 ignores `n` for tag lists (it pages only the catalog) and answers every tag at once.
    assert sorted(tags) == sorted(["v1.0.0", *names])


TAGS = [f"v{i}" for i in range(10)]


class PagedTags(http.server.BaseHTTPRequestHandler):
    """Tag lists as the OCI spec pages them: `n` per page, `last` the previous page's end, a Link to the next."""

    next_host = ""

    def do_GET(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        n = int(query["n"][0])
        start = TAGS.index(query["last"][0]) + 1 if "last" in query else 0
        page = TAGS[start : start + n]
        body = json.dumps({"name": "app", "tags": page}).encode()
        self.send_response(200)
        if start + n < len(TAGS):
            prefix = f"http://{self.next_host}" if self.next_host else ""
            self.send_header("Link", f'<{prefix}/v2/app/tags/list?n={n}&last={page[-1]}>; rel="next"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


async def test_tags_are_listed_across_pages() -> None:
    # distribution 2.8 does not page tag lists, so a small server that does (as distribution 3, GHCR, Harbor do).
    with http_server(PagedTags) as host:
        transport = CountingTransport()
        async with RegistryClient(plain_http=[host], transport=transport) as client:
            assert await client.list_tags(host, "app", page_size=3) == TAGS
        pages = [url for url in transport.urls if "/tags/list" in url]
        assert len(pages) == 4
        assert pages[1].endswith("n=3&last=v2")

        class Elsewhere(PagedTags):
            next_host = "other.example:5000"

    with http_server(Elsewhere) as host:
        async with RegistryClient(plain_http=[host]) as client:
            with pytest.raises(MalformedResponse, match="on another host"):
                await client.list_tags(host, "app", page_size=3)


async def test_digests_follow_the_manifest_bytes(open_registry: RunningRegistry) -> None:
    first = await push_image(open_registry, "app", "stable", created=T0)
    await retag(open_registry, "app", first, "v1")
    async with client_for(open_registry) as client:
        assert await client.get_digest(open_registry.host, "app", "stable") == first.digest
        assert await client.get_digest(open_registry.host, "app", "v1") == first.digest
        manifest = await client.get_manifest(open_registry.host, "app", "v1")
        assert manifest.digest == first.digest
        assert manifest.media_type == OCI_MANIFEST
        assert manifest.config_digest == first.config_digest
        by_digest = await client.get_manifest(open_registry.host, "app", first.digest)
        assert by_digest.body == first.manifest

        second = await push_image(open_registry, "app", "stable", created=T0 + dt.timedelta(days=1))
        assert second.digest != first.digest
        assert await client.get_digest(open_registry.host, "app", "stable") == second.digest
        # The old tag still names the old image.
        assert await client.get_digest(open_registry.host, "app", "v1") == first.digest


async def test_created_is_read_from_the_config_of_oci_docker_and_index_images(open_registry: RunningRegistry) -> None:
    await push_image(open_registry, "app", "oci", created=T0)
    docker = await push_image(open_registry, "app", "docker", created=T0 + dt.timedelta(hours=1), docker=True)
    await push_image(open_registry, "app", "undated", created=None)
    amd = await push_image(open_registry, "app", "amd", created=T0 + dt.timedelta(hours=2))
    arm = await push_image(open_registry, "app", "arm", created=T0 + dt.timedelta(hours=3), layer=b"arm layer")
    index_digest = await push_index(open_registry, "app", "multi", [(amd, "linux", "amd64"), (arm, "linux", "arm64")])
    host = open_registry.host
    async with client_for(open_registry) as client:
        assert await client.created(host, "app", "oci") == T0
        assert await client.created(host, "app", "docker") == T0 + dt.timedelta(hours=1)
        assert (await client.get_manifest(host, "app", "docker")).media_type == DOCKER_MANIFEST
        assert (await client.get_manifest(host, "app", "docker")).digest == docker.digest
        assert await client.created(host, "app", "undated") is None

        top, image = await client.resolve(host, "app", "multi")
        assert (top.digest, top.media_type, top.is_index) == (index_digest, OCI_INDEX, True)
        assert image.digest == amd.digest
        assert await client.created(host, "app", "multi") == T0 + dt.timedelta(hours=2)
        assert await client.created(host, "app", "multi", Platform("linux", "arm64")) == T0 + dt.timedelta(hours=3)
        with pytest.raises(NotFound, match="no image for linux/s390x"):
            await client.created(host, "app", "multi", Platform("linux", "s390x"))
        with pytest.raises(MalformedResponse, match="is an index"):
            await client.get_config(host, "app", top)


async def test_missing_repository_and_tag_are_not_found(open_registry: RunningRegistry) -> None:
    await push_image(open_registry, "app", "v1", created=T0)
    async with client_for(open_registry) as client:
        with pytest.raises(NotFound, match="NAME_UNKNOWN"):
            await client.list_tags(open_registry.host, "nobody/here")
        with pytest.raises(NotFound):
            await client.get_manifest(open_registry.host, "nobody/here", "v1")
        with pytest.raises(NotFound, match="MANIFEST_UNKNOWN"):
            await client.get_manifest(open_registry.host, "app", "v2")
        with pytest.raises(NotFound):
            await client.get_digest(open_registry.host, "app", "v2")
        # A repository's absence is not the registry's failure: no backoff.
        assert client.backoff.allowed(open_registry.host)


async def test_malformed_and_oversized_answers_are_refused(open_registry: RunningRegistry) -> None:
    await push_image(open_registry, "app", "badconfig", created=None, config=b"this is not json")
    await push_image(open_registry, "app", "badtime", created=None, config=b'{"created": "yesterday"}')
    await push_image(open_registry, "app", "big", created=T0, annotations={"padding": "x" * 4000})
    await push_image(open_registry, "app", "bigconfig", created=None, config=json.dumps({"pad": "y" * 4000}).encode())
    host = open_registry.host
    async with client_for(open_registry, max_manifest_bytes=2048, max_config_bytes=2048) as client:
        with pytest.raises(MalformedResponse, match="not JSON"):
            await client.created(host, "app", "badconfig")
        with pytest.raises(MalformedResponse, match="not RFC 3339"):
            await client.created(host, "app", "badtime")
        with pytest.raises(MalformedResponse, match="more than the 2048"):
            await client.get_manifest(host, "app", "big")
        with pytest.raises(MalformedResponse, match="more than the 2048"):
            await client.created(host, "app", "bigconfig")


async def test_htpasswd_registry_wants_the_configured_credentials(
    htpasswd_registry: RunningRegistry, tmp_path: Path
) -> None:
    await push_image(htpasswd_registry, "private/app", "v1", created=T0)
    host = htpasswd_registry.host
    async with client_for(htpasswd_registry) as anonymous:
        with pytest.raises(Unauthorized, match="none is configured"):
            await anonymous.list_tags(host, "private/app")
    wrong = load_docker_config(docker_config(tmp_path, host, REGISTRY_USER, "wrong"))
    async with client_for(htpasswd_registry, credentials=wrong) as client:
        with pytest.raises(Unauthorized, match="refused"):
            await client.list_tags(host, "private/app")
    right = load_docker_config(docker_config(tmp_path, host, REGISTRY_USER, REGISTRY_PASSWORD))
    assert set(right) == {host}
    transport = CountingTransport()
    async with client_for(htpasswd_registry, credentials=right, transport=transport) as client:
        assert await client.list_tags(host, "private/app") == ["v1"]
        assert await client.created(host, "private/app", "v1") == T0
    # After the first challenge the credentials go with every request: one 401 round trip, not one per call.
    assert len(transport.urls) == 4


async def test_token_registry_with_bearer_tokens_cached_per_scope(
    token_registry: RunningRegistry, token_server: TokenServer
) -> None:
    await push_image(token_registry, "team/app", "v1", created=T0)
    await push_image(token_registry, "team/other", "v2", created=T0)
    token_server.requests.clear()
    host = token_registry.host
    clock = Clock()
    credentials = {host: Credentials(username=REGISTRY_USER, password=REGISTRY_PASSWORD)}
    async with RegistryClient(credentials, plain_http=[host, token_server.host], clock=clock) as client:
        assert await client.list_tags(host, "team/app") == ["v1"]
        assert await client.created(host, "team/app", "v1") == T0
        assert await client.get_digest(host, "team/app", "v1")
        assert token_server.requests == [("repository:team/app:pull", REGISTRY_USER)]
        assert await client.list_tags(host, "team/other") == ["v2"]
        assert token_server.requests[-1] == ("repository:team/other:pull", REGISTRY_USER)
        assert len(token_server.requests) == 2
        # Past its expiry a token is not sent again: a new one is fetched.
        clock.now += token_server.expires_in
        assert await client.list_tags(host, "team/app") == ["v1"]
        assert len(token_server.requests) == 3

    async with RegistryClient(plain_http=[host, token_server.host]) as anonymous:
        with pytest.raises(Unauthorized, match="refused us"):
            await anonymous.list_tags(host, "team/app")
        token_server.anonymous_pull = True
        assert await anonymous.list_tags(host, "team/app") == ["v1"]
        assert token_server.requests[-1][1] is None

    # A token realm over plain HTTP is refused unless the realm's host is allowed plain HTTP.
    async with RegistryClient(credentials, plain_http=[host]) as strict:
        with pytest.raises(Unauthorized, match="not https"):
            await strict.list_tags(host, "team/app")


class TooManyRequests(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, headers = (429, {"Retry-After": "7"}) if "/tags/" in self.path else (503, {})
        body = json.dumps({"errors": [{"code": "TOOMANYREQUESTS", "message": "slow down"}]}).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


async def test_rate_limits_and_failures_back_the_registry_off() -> None:
    clock = Clock()
    with http_server(TooManyRequests) as host:
        backoff = Backoff(base=2, ceiling=60, clock=clock)
        async with RegistryClient(plain_http=[host], backoff=backoff, clock=clock) as client:
            assert client.backoff.allowed(host)
            with pytest.raises(RateLimited, match="slow down") as limited:
                await client.list_tags(host, "app")
            assert limited.value.retry_after == 7
            assert client.backoff.next_allowed(host) == clock.now + 7
            assert not client.backoff.allowed(host)
            clock.now += 7
            assert client.backoff.allowed(host)
            # 503: exponential backoff, 2 → 4 → 8 seconds after consecutive failures.
            for expected in (4, 8):
                with pytest.raises(RegistryUnavailable, match="503"):
                    await client.get_manifest(host, "app", "v1")
                assert client.backoff.next_allowed(host) == clock.now + expected
                clock.now += expected
            assert client.backoff.failures(host) == 3
    refused = f"127.0.0.1:{free_port()}"
    async with RegistryClient(plain_http=[refused], clock=clock) as client:
        with pytest.raises(RegistryUnavailable, match="failed"):
            await client.list_tags(refused, "app")
        assert not client.backoff.allowed(refused)


async def test_tls_is_verified_unless_the_host_is_allowed_plain_http(open_registry: RunningRegistry) -> None:
    # Not on the plain-HTTP list: we speak TLS to it, which a plain-HTTP registry cannot answer.
    async with RegistryClient() as client:
        with pytest.raises(RegistryUnavailable):
            await client.list_tags(open_registry.host, "app")


class NotAManifest(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "layers": []}'
        self.send_response(200)
        self.send_header("Content-Type", OCI_MANIFEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


async def test_a_manifest_without_config_is_malformed() -> None:
    # The real registry refuses such a manifest on push, so a small server serves it.
    with http_server(NotAManifest) as host:
        async with RegistryClient(plain_http=[host]) as client:
            with pytest.raises(MalformedResponse, match="no sha256 config digest"):
                await client.get_manifest(host, "app", "v1")


def test_references_parse_with_docker_hub_defaults() -> None:
    assert ImageReference.parse("nginx") == ImageReference("docker.io", "library/nginx")
    assert ImageReference.parse("nginx:1.27").tag == "1.27"
    assert ImageReference.parse("docker.io/bitnami/redis:7") == ImageReference("docker.io", "bitnami/redis", "7")
    assert ImageReference.parse("index.docker.io/nginx").repository == "library/nginx"
    digest = "sha256:" + "a" * 64
    parsed = ImageReference.parse(f"registry.example.com:5000/team/app:v1@{digest}")
    assert parsed == ImageReference("registry.example.com:5000", "team/app", "v1", digest)
    assert parsed.reference == digest
    assert str(parsed) == f"registry.example.com:5000/team/app:v1@{digest}"
    assert ImageReference.parse("localhost/app").registry == "localhost"
    with pytest.raises(ValueError, match="not a valid name"):
        ImageReference.parse("Team/App")


def test_docker_config_entries(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    auth = base64.b64encode(b"hub:secret").decode()
    path.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": auth},
                    "ghcr.io": {"username": "bot", "password": "pat"},
                    "quay.io": {"registrytoken": "tok"},
                }
            }
        )
    )
    loaded = load_docker_config(path)
    assert loaded["docker.io"] == Credentials("hub", "secret")
    assert loaded["ghcr.io"] == Credentials("bot", "pat")
    assert loaded["quay.io"] == Credentials(token="tok")
    assert "secret" not in repr(loaded)
    path.write_text(json.dumps({"credsStore": "desktop", "auths": {}}))
    with pytest.raises(ValueError, match="credsStore"):
        load_docker_config(path)
    path.write_text(json.dumps({"auths": {"ghcr.io": {}}}))
    with pytest.raises(ValueError, match="neither"):
        load_docker_config(path)
