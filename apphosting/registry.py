"""OCI distribution API v2 client: tag lists, manifests and digests, image config `created`, with per-registry backoff.

What it speaks (the OCI distribution spec, which the CNCF distribution registry, Docker Hub, GHCR, ECR, GCR and
Harbor implement):

- ``GET /v2/<repo>/tags/list?n=<page>``, following ``Link: <...>; rel="next"`` until the list ends;
- ``GET``/``HEAD /v2/<repo>/manifests/<tag|digest>`` accepting the OCI image manifest and index and the Docker v2
  schema 2 manifest and manifest list; the digest is the sha256 of the body, checked against
  ``Docker-Content-Digest`` when the registry sends it;
- ``GET /v2/<repo>/blobs/<digest>`` for the image config, whose ``created`` time the newest-build strategy reads.

Authentication follows the registry's 401 challenge: ``Basic`` answers with the host's credentials; ``Bearer
realm=...,service=...,scope=...`` asks the realm for a token (with the host's credentials, or anonymously) and
retries with it. Tokens are cached per (host, scope) until shortly before they expire.

Credentials come from a Docker ``config.json`` (the format of ``docker login`` and of Kubernetes
``kubernetes.io/dockerconfigjson`` pull secrets), read by :func:`load_docker_config`::

    {"auths": {
        "ghcr.io": {"auth": "<base64 of username:password>"},
        "registry.example.com:5000": {"username": "ci", "password": "..."},
        "https://index.docker.io/v1/": {"auth": "..."},
        "quay.io": {"registrytoken": "<a bearer token sent as is>"}}}

Keys may carry a scheme and a path (Docker Hub's historical ``https://index.docker.io/v1/``); only the host[:port]
counts, and ``index.docker.io``/``registry-1.docker.io`` mean ``docker.io``. ``credsStore`` and ``credHelpers``
(programs to run) are not supported and are refused so a configuration never silently means "anonymous".

Every answer is bounded (a manifest, config or tag-list page larger than its limit is refused), every request has
a timeout, TLS is verified unless the caller passes ``verify``; plain HTTP is spoken only to hosts named in
``plain_http`` (loopback registries in tests and development).

Errors are typed: :class:`NotFound`, :class:`Unauthorized`, :class:`RateLimited` (with ``retry_after`` seconds),
:class:`RegistryUnavailable` (transport errors, timeouts, 5xx), :class:`MalformedResponse` (a body that is not what
the spec says, or too large). :class:`Backoff` records per registry when the next request is allowed; the client
records into its ``backoff`` after every request, and callers (the updater) ask ``next_allowed(host)`` before
polling a host.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Self
from urllib.parse import urlencode, urljoin, urlsplit

import httpx

from apphosting import images

__all__ = [
    "ACCEPT_MANIFESTS",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "INDEX_MEDIA_TYPES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "AddressRefused",
    "Backoff",
    "Credentials",
    "ImageConfig",
    "ImageReference",
    "MalformedResponse",
    "Manifest",
    "NotFound",
    "Platform",
    "RateLimited",
    "RegistryClient",
    "RegistryError",
    "RegistryUnavailable",
    "Unauthorized",
    "api_host",
    "load_docker_config",
    "normalize_host",
]

OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_MEDIA_TYPES: Final = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
IMAGE_MEDIA_TYPES: Final = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
ACCEPT_MANIFESTS: Final = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST))

# The registry name of Docker Hub in references, and the host its API answers on.
_DOCKER_HUB: Final = images.DEFAULT_REGISTRY
_DOCKER_HUB_API: Final = "registry-1.docker.io"
_DOCKER_HUB_ALIASES: Final = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

_MiB: Final = 1024 * 1024
# A token is dropped this many seconds before it expires, so a request never carries one that lapses in flight.
_TOKEN_MARGIN: Final = 10.0
# The spec's default when a token response omits expires_in.
_DEFAULT_TOKEN_SECONDS: Final = 60
_DIGEST: Final = re.compile(r"sha256:[a-f0-9]{64}")
_LINK_NEXT: Final = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?', re.IGNORECASE)
# One auth-param of a WWW-Authenticate challenge: key=token or key="quoted string".
_AUTH_PARAM: Final = re.compile(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


class RegistryError(Exception):
    """A registry request failed; ``host`` is the registry it was sent to."""

    def __init__(self, host: str, message: str) -> None:
        super().__init__(f"{host}: {message}")
        self.host = host
        self.message = message


class NotFound(RegistryError):
    """The repository, tag, manifest or blob does not exist (404, or the registry's NAME/MANIFEST/BLOB_UNKNOWN)."""


class Unauthorized(RegistryError):
    """The registry refused the request (401/403) with the credentials we have, or we have none it accepts."""


class RateLimited(RegistryError):
    """429 Too Many Requests; ``retry_after`` is the wait in seconds the registry asked for, when it said."""

    def __init__(self, host: str, message: str, retry_after: float | None) -> None:
        super().__init__(host, message)
        self.retry_after = retry_after


class RegistryUnavailable(RegistryError):
    """The registry could not answer: connection refused, timeout, TLS failure, 5xx."""

    def __init__(self, host: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(host, message)
        self.retry_after = retry_after


class AddressRefused(RegistryError):
    """The request was not sent: its host is internal (loopback, private, cluster-internal) and not one the operator
    named as a registry (see ``guard``)."""


class MalformedResponse(RegistryError):
    """The registry answered something that is not what the spec says: bad JSON, wrong digest, too large."""


@dataclass(frozen=True)
class ImageReference:
    """A parsed image reference: ``registry`` as written in references (docker.io by default), ``repository`` the
    API's repository path (``library/`` added for Docker Hub's official images), and its tag and digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, reference: str) -> ImageReference:
        """Parses ``[registry/]repo[:tag][@digest]`` with distribution/reference's grammar and Docker Hub defaults.

        Raises ValueError with the reason when the reference is not valid.
        """
        found = images.problem(reference)
        if found is not None:
            raise ValueError(found[1])
        name, tag, digest = images.split(reference)
        registry = images.registry(name)
        path = name[len(registry) + 1 :] if name.startswith(registry + "/") else name
        registry = normalize_host(registry)
        if registry == _DOCKER_HUB and "/" not in path:
            path = f"library/{path}"
        return cls(registry=registry, repository=path, tag=tag, digest=digest)

    @property
    def reference(self) -> str:
        """What a manifest request names: the digest when there is one, else the tag (``latest`` by default)."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


@dataclass(frozen=True)
class Credentials:
    """What we present to one registry: a username and password (HTTP basic, and at a token realm), or a bearer
    token sent as is."""

    username: str | None = None
    password: str | None = None
    token: str | None = None

    def __repr__(self) -> str:
        # Never print a secret: logs and tracebacks show whether one is set, not what it is.
        return f"Credentials(username={self.username!r}, password={'***' if self.password else None}, " + (
            f"token={'***' if self.token else None})"
        )


@dataclass(frozen=True)
class Platform:
    """Which image of an index to read: Argo CD Image Updater's default is linux/amd64."""

    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None


@dataclass(frozen=True)
class Manifest:
    """One manifest as the registry stored it: its digest (sha256 of ``body``), media type and the parts we use."""

    digest: str
    media_type: str
    body: bytes
    # An image manifest's config blob; None for an index.
    config_digest: str | None
    # An index's entries: (digest, media type, platform or None).
    children: tuple[tuple[str, str, Platform | None], ...] = ()

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_MEDIA_TYPES


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config blob we read: ``created`` (None when the image does not say)."""

    digest: str
    created: datetime | None


def normalize_host(host: str) -> str:
    """The registry name of a host as references write it: lowercase, Docker Hub's aliases folded into docker.io."""
    host = host.lower()
    return _DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def api_host(registry: str) -> str:
    """The host[:port] the registry's API answers on (Docker Hub's is not docker.io)."""
    return _DOCKER_HUB_API if normalize_host(registry) == _DOCKER_HUB else registry


def load_docker_config(path: Path) -> dict[str, Credentials]:
    """Reads the ``auths`` of a Docker config.json into credentials per registry host (see the module docstring).

    Raises ValueError naming the entry when the file is not such a config.
    """
    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable Docker config.json: {exc}") from exc
    if not isinstance(document, dict):
        raise ValueError(f"{path}: a Docker config.json is a JSON object")
    for unsupported in ("credsStore", "credHelpers"):
        if document.get(unsupported):
            raise ValueError(
                f"{path}: {unsupported} (credential helper programs) is not supported; put the credentials in auths"
            )
    auths = document.get("auths", {})
    if not isinstance(auths, dict):
        raise ValueError(f"{path}: auths must be an object of registry host to credentials")
    result: dict[str, Credentials] = {}
    for key, entry in auths.items():
        host = _config_key_host(str(key))
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: auths[{key!r}] must be an object")
        username, password = entry.get("username"), entry.get("password")
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
            except (ValueError, UnicodeDecodeError) as exc:
                raise ValueError(f"{path}: auths[{key!r}].auth is not base64 of username:password") from exc
            username, colon, password = decoded.partition(":")
            if not colon:
                raise ValueError(f"{path}: auths[{key!r}].auth is not base64 of username:password")
        token = entry.get("registrytoken") or None
        if entry.get("identitytoken"):
            raise ValueError(f"{path}: auths[{key!r}].identitytoken (OAuth2 refresh tokens) is not supported")
        if not (username and password) and not token:
            raise ValueError(f"{path}: auths[{key!r}] has neither username and password nor registrytoken")
        result[host] = Credentials(
            username=str(username) if username else None,
            password=str(password) if password else None,
            token=str(token) if token else None,
        )
    return result


def _config_key_host(key: str) -> str:
    # "https://index.docker.io/v1/" → "docker.io"; "registry:5000" stays.
    netloc = urlsplit(key).netloc if "://" in key else key.split("/", 1)[0]
    return normalize_host(netloc)


class Backoff:
    """When each registry may next be asked: after a failure, exponentially later (``base`` doubling up to
    ``ceiling`` seconds), or when a 429/503 said ``Retry-After``, no sooner than that. A success clears it.

    Times are ``clock()`` values (``time.monotonic`` by default).
    """

    def __init__(
        self, *, base: float = 5.0, ceiling: float = 600.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._base = base
        self._ceiling = ceiling
        self._clock = clock
        self._failures: dict[str, int] = {}
        self._not_before: dict[str, float] = {}
        self._last: dict[str, RegistryError] = {}

    def next_allowed(self, host: str) -> float:
        """The clock time from which ``host`` may be asked again (a time in the past when it may be asked now)."""
        return self._not_before.get(normalize_host(host), -math.inf)

    def allowed(self, host: str) -> bool:
        return self._clock() >= self.next_allowed(host)

    def failures(self, host: str) -> int:
        """Consecutive failures since the last success."""
        return self._failures.get(normalize_host(host), 0)

    def last_error(self, host: str) -> RegistryError | None:
        """The failure that started or extended the host's current backoff, as :meth:`record` counted it."""
        return self._last.get(normalize_host(host))

    def record_success(self, host: str) -> None:
        host = normalize_host(host)
        self._failures.pop(host, None)
        self._not_before.pop(host, None)
        self._last.pop(host, None)

    def record_failure(self, host: str, retry_after: float | None = None) -> float:
        """Counts a failure; returns the clock time from which the host may be asked again."""
        host = normalize_host(host)
        count = self._failures.get(host, 0) + 1
        self._failures[host] = count
        delay = min(self._ceiling, self._base * 2 ** (count - 1))
        if retry_after is not None:
            # Never sooner than the registry asked, nor sooner than our own backoff.
            delay = max(delay, retry_after)
        not_before = self._clock() + delay
        self._not_before[host] = max(not_before, self._not_before.get(host, -math.inf))
        return self._not_before[host]

    def record(self, error: RegistryError) -> float | None:
        """Counts ``error`` when it is about the registry as a whole (rate limits, unavailability); a missing tag or
        refused credentials are about one repository and do not slow the others down."""
        if isinstance(error, RateLimited | RegistryUnavailable):
            self._last[normalize_host(error.host)] = error
            return self.record_failure(error.host, error.retry_after)
        return None


@dataclass
class _Challenge:
    scheme: str
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class _Token:
    value: str
    expires: float


class RegistryClient:
    """An async client of OCI distribution v2 registries; one per process is enough (it pools connections and
    caches tokens). Use ``async with RegistryClient(...) as client`` or call :meth:`aclose`."""

    def __init__(
        self,
        credentials: Mapping[str, Credentials] | None = None,
        *,
        plain_http: Collection[str] = (),
        verify: bool | str = True,
        timeout: float = 15.0,
        page_size: int = 1000,
        max_tags: int = 100_000,
        max_manifest_bytes: int = 4 * _MiB,
        max_config_bytes: int = 4 * _MiB,
        max_page_bytes: int = 8 * _MiB,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
        guard: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        """``credentials`` by registry host (see :func:`load_docker_config`); ``plain_http`` the hosts spoken to over
        http:// (loopback registries only); ``verify`` False or a CA bundle path for registries with private CAs;
        ``guard`` is awaited with the host of every request (token realms and redirects included) before it is sent,
        and refuses one by raising a RegistryError."""
        self._credentials = {normalize_host(host): value for host, value in (credentials or {}).items()}
        self._plain_http = frozenset(normalize_host(host) for host in plain_http)
        self._page_size = page_size
        self._max_tags = max_tags
        self._max_manifest = max_manifest_bytes
        self._max_config = max_config_bytes
        self._max_page = max_page_bytes
        self._clock = clock
        self.backoff = backoff if backoff is not None else Backoff(clock=clock)
        self._tokens: dict[tuple[str, str], _Token] = {}
        # Hosts that answered a Basic challenge: later requests send the credentials at once.
        self._basic_hosts: set[str] = set()
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            verify=verify,
            # Blob downloads are redirected to object storage; httpx drops Authorization across origins.
            follow_redirects=True,
            max_redirects=5,
            transport=transport,
            headers={"User-Agent": "apphosting-image-updater"},
            trust_env=False,
            event_hooks={"request": [self._guarded]} if guard is not None else {},
        )
        self._guard = guard

    async def _guarded(self, request: httpx.Request) -> None:
        assert self._guard is not None
        await self._guard(request.url.netloc.decode("ascii"))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the API ---------------------------------------------------------------------------------------------------

    async def list_tags(self, registry: str, repository: str, *, page_size: int | None = None) -> list[str]:
        """Every tag of a repository, in the registry's order, following the ``Link`` header page by page."""
        n = page_size or self._page_size
        base = self._base_url(registry)
        url: str | None = f"{base}/v2/{repository}/tags/list?{urlencode({'n': n})}"
        tags: list[str] = []
        seen_urls: set[str] = set()
        while url is not None:
            if url in seen_urls:
                raise MalformedResponse(registry, f"the tag list of {repository} links back to {url}")
            seen_urls.add(url)
            async with self._request(registry, repository, "GET", url, {}, self._max_page) as (response, body):
                document = _json_object(registry, body, f"the tag list of {repository}")
                page = document.get("tags") or []
                if not isinstance(page, list) or not all(isinstance(tag, str) for tag in page):
                    raise MalformedResponse(registry, f"the tag list of {repository} has no list of tags")
                tags.extend(page)
                if len(tags) > self._max_tags:
                    raise MalformedResponse(registry, f"{repository} has more than {self._max_tags} tags")
                url = self._next_page(registry, base, response)
        return tags

    async def get_manifest(self, registry: str, repository: str, reference: str) -> Manifest:
        """The manifest a tag or digest names, with its digest."""
        url = f"{self._base_url(registry)}/v2/{repository}/manifests/{reference}"
        headers = {"Accept": ACCEPT_MANIFESTS}
        async with self._request(registry, repository, "GET", url, headers, self._max_manifest) as (response, body):
            digest = _sha256(body)
            announced = response.headers.get("Docker-Content-Digest")
            if announced and announced.startswith("sha256:") and announced != digest:
                raise MalformedResponse(
                    registry, f"{repository}:{reference}: the body's digest is {digest}, the registry said {announced}"
                )
            if reference.startswith("sha256:") and reference != digest:
                raise MalformedResponse(registry, f"{repository}@{reference}: the body's digest is {digest}")
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
            return _parse_manifest(registry, f"{repository}:{reference}", body, digest, content_type)

    async def get_digest(self, registry: str, repository: str, reference: str) -> str:
        """The digest a tag names: a HEAD request (which Docker Hub does not count against its pull limit), or the
        manifest itself when the registry does not say."""
        url = f"{self._base_url(registry)}/v2/{repository}/manifests/{reference}"
        async with self._request(registry, repository, "HEAD", url, {"Accept": ACCEPT_MANIFESTS}, 0) as (response, _):
            announced = str(response.headers.get("Docker-Content-Digest", ""))
        if _DIGEST.fullmatch(announced):
            return announced
        return (await self.get_manifest(registry, repository, reference)).digest

    async def get_config(self, registry: str, repository: str, manifest: Manifest) -> ImageConfig:
        """The config blob of an image manifest (for an index, pick the image with :meth:`resolve` first)."""
        if manifest.config_digest is None:
            raise MalformedResponse(registry, f"{repository}@{manifest.digest} is an index, not an image manifest")
        digest = manifest.config_digest
        url = f"{self._base_url(registry)}/v2/{repository}/blobs/{digest}"
        async with self._request(registry, repository, "GET", url, {}, self._max_config) as (_, body):
            if _sha256(body) != digest:
                raise MalformedResponse(registry, f"{repository}: config blob {digest} has digest {_sha256(body)}")
            document = _json_object(registry, body, f"the config {digest} of {repository}")
            return ImageConfig(digest=digest, created=_created(registry, repository, document.get("created")))

    async def resolve(
        self, registry: str, repository: str, reference: str, platform: Platform | None = None
    ) -> tuple[Manifest, Manifest]:
        """The manifest a reference names, and the image manifest for ``platform`` (the same one when it is not an
        index). Raises NotFound when an index has no image for the platform."""
        platform = platform or Platform()
        top = await self.get_manifest(registry, repository, reference)
        if not top.is_index:
            return top, top
        for digest, _, child_platform in top.children:
            if child_platform is not None and _matches(child_platform, platform):
                return top, await self.get_manifest(registry, repository, digest)
        wanted = f"{platform.os}/{platform.architecture}" + (f"/{platform.variant}" if platform.variant else "")
        raise NotFound(registry, f"{repository}:{reference} has no image for {wanted}")

    async def created(
        self, registry: str, repository: str, reference: str, platform: Platform | None = None
    ) -> datetime | None:
        """The ``created`` time of the image a tag names (its platform's image when the tag names an index)."""
        _, image = await self.resolve(registry, repository, reference, platform)
        return (await self.get_config(registry, repository, image)).created

    # -- transport and auth ----------------------------------------------------------------------------------------

    def _base_url(self, registry: str) -> str:
        registry = normalize_host(registry)
        scheme = "http" if registry in self._plain_http else "https"
        return f"{scheme}://{api_host(registry)}"

    def _next_page(self, registry: str, base: str, response: httpx.Response) -> str | None:
        link = response.headers.get("Link")
        if not link:
            return None
        found = _LINK_NEXT.search(link)
        if found is None:
            return None
        url = str(urljoin(base + "/", found.group(1)))
        # A next link elsewhere would send our credentials to another host.
        if urlsplit(url).netloc != urlsplit(base).netloc:
            raise MalformedResponse(registry, f"the tag list's next page {url!r} is on another host")
        return url

    @asynccontextmanager
    async def _request(
        self, registry: str, repository: str, method: str, url: str, headers: dict[str, str], limit: int
    ) -> AsyncIterator[tuple[httpx.Response, bytes]]:
        registry = normalize_host(registry)
        try:
            response, body = await self._authorized(registry, repository, method, url, headers, limit)
        except RegistryError as error:
            self.backoff.record(error)
            raise
        self.backoff.record_success(registry)
        yield response, body

    async def _authorized(
        self, registry: str, repository: str, method: str, url: str, headers: dict[str, str], limit: int
    ) -> tuple[httpx.Response, bytes]:
        scope = f"repository:{repository}:pull"
        first = dict(headers)
        authorization = self._cached_authorization(registry, scope)
        if authorization:
            first["Authorization"] = authorization
        response, body = await self._send(registry, method, url, first, limit)
        if response.status_code != 401:
            return self._checked(registry, url, response, body)
        challenge = _parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if challenge is None:
            raise Unauthorized(registry, f"{method} {url} answered 401 without a challenge we understand")
        retry = dict(headers)
        if challenge.scheme == "basic":
            credentials = self._credentials.get(registry)
            if credentials is None or not (credentials.username and credentials.password):
                raise Unauthorized(registry, f"{url} asks for a username and password and none is configured")
            if "Authorization" in first:
                raise Unauthorized(registry, f"{url} refused the configured username and password")
            self._basic_hosts.add(registry)
            retry["Authorization"] = _basic(credentials)
        elif challenge.scheme == "bearer":
            if "Authorization" in first and first["Authorization"].startswith("Bearer "):
                # The cached token was refused (revoked, or its scope no longer enough): fetch a fresh one once.
                self._tokens.pop((registry, scope), None)
            token = await self._fetch_token(registry, scope, challenge)
            retry["Authorization"] = f"Bearer {token}"
        else:
            raise Unauthorized(registry, f"{url} asks for {challenge.scheme} authentication, which we do not speak")
        response, body = await self._send(registry, method, url, retry, limit)
        if response.status_code == 401:
            raise Unauthorized(registry, f"{method} {url} refused the credentials: {_error_text(body)}")
        return self._checked(registry, url, response, body)

    def _cached_authorization(self, registry: str, scope: str) -> str | None:
        token = self._tokens.get((registry, scope))
        if token is not None:
            if self._clock() < token.expires:
                return f"Bearer {token.value}"
            del self._tokens[(registry, scope)]
        credentials = self._credentials.get(registry)
        if registry in self._basic_hosts and credentials is not None and credentials.username:
            return _basic(credentials)
        return None

    async def _fetch_token(self, registry: str, scope: str, challenge: _Challenge) -> str:
        credentials = self._credentials.get(registry)
        if credentials is not None and credentials.token:
            # A registry token from the config is the bearer token itself; it is not exchanged.
            return credentials.token
        realm = challenge.params.get("realm")
        if not realm:
            raise Unauthorized(registry, "the Bearer challenge names no realm")
        parts = urlsplit(realm)
        realm_host = normalize_host(parts.netloc)
        if parts.scheme != "https" and not (parts.scheme == "http" and realm_host in self._plain_http):
            raise Unauthorized(registry, f"the token realm {realm!r} is not https (nor an allowed plain-HTTP host)")
        query: list[tuple[str, str]] = []
        if challenge.params.get("service"):
            query.append(("service", challenge.params["service"]))
        query.append(("scope", challenge.params.get("scope") or scope))
        headers: dict[str, str] = {}
        if credentials is not None and credentials.username and credentials.password:
            headers["Authorization"] = _basic(credentials)
        separator = "&" if "?" in realm else "?"
        url = f"{realm}{separator}{urlencode(query)}"
        response, body = await self._send(registry, "GET", url, headers, 1 * _MiB)
        if response.status_code in (401, 403):
            raise Unauthorized(registry, f"the token service {realm} refused us: {_error_text(body)}")
        self._checked(registry, realm, response, body)
        document = _json_object(registry, body, f"the token from {realm}")
        value = document.get("token") or document.get("access_token")
        if not isinstance(value, str) or not value:
            raise MalformedResponse(registry, f"the token service {realm} answered no token")
        expires_in = document.get("expires_in", _DEFAULT_TOKEN_SECONDS)
        if not isinstance(expires_in, int | float) or isinstance(expires_in, bool) or expires_in <= 0:
            expires_in = _DEFAULT_TOKEN_SECONDS
        self._tokens[(registry, scope)] = _Token(value, self._clock() + float(expires_in) - _TOKEN_MARGIN)
        return value

    async def _send(
        self, registry: str, method: str, url: str, headers: dict[str, str], limit: int
    ) -> tuple[httpx.Response, bytes]:
        try:
            async with self._http.stream(method, url, headers=headers) as response:
                declared = response.headers.get("Content-Length")
                if response.status_code < 300 and declared and declared.isdigit() and int(declared) > limit > 0:
                    raise MalformedResponse(registry, f"{url} is {declared} bytes, more than the {limit} we accept")
                # Error bodies are read too (their message is useful) but never beyond a small bound.
                bound = limit if response.status_code < 300 else 64 * 1024
                chunks: list[bytes] = []
                size = 0
                if method != "HEAD":
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > bound:
                            if response.status_code < 300:
                                raise MalformedResponse(registry, f"{url} is more than the {bound} bytes we accept")
                            break
                        chunks.append(chunk)
                return response, b"".join(chunks)
        except httpx.TimeoutException as exc:
            raise RegistryUnavailable(registry, f"{method} {url} timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise RegistryUnavailable(registry, f"{method} {url} failed: {type(exc).__name__}: {exc}") from exc

    def _checked(self, registry: str, url: str, response: httpx.Response, body: bytes) -> tuple[httpx.Response, bytes]:
        status = response.status_code
        if status < 300:
            return response, body
        text = _error_text(body)
        if status == 404:
            raise NotFound(registry, f"{url}: {text}")
        if status in (401, 403):
            raise Unauthorized(registry, f"{url} answered {status}: {text}")
        retry_after = _retry_after(response.headers.get("Retry-After"))
        if status == 429:
            raise RateLimited(registry, f"{url} answered 429: {text}", retry_after)
        if status >= 500:
            raise RegistryUnavailable(registry, f"{url} answered {status}: {text}", retry_after)
        raise RegistryError(registry, f"{url} answered {status}: {text}")


def _basic(credentials: Credentials) -> str:
    pair = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(pair).decode()


def _sha256(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def _parse_challenge(header: str) -> _Challenge | None:
    """The first challenge of a WWW-Authenticate header (registries send one)."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {
        match.group(1).lower(): match.group(2).replace('\\"', '"') if match.group(2) is not None else match.group(3)
        for match in _AUTH_PARAM.finditer(rest)
    }
    return _Challenge(scheme.lower(), params)


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _error_text(body: bytes) -> str:
    """The registry's error codes and messages ({"errors": [{"code", "message"}]}), or the start of the body."""
    try:
        document = json.loads(body)
        errors = document["errors"]
        return "; ".join(f"{error.get('code')}: {error.get('message')}" for error in errors) or "no detail"
    except (ValueError, KeyError, TypeError, AttributeError):
        return body[:200].decode(errors="replace") or "no detail"


def _json_object(registry: str, body: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise MalformedResponse(registry, f"{what} is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise MalformedResponse(registry, f"{what} is not a JSON object")
    return document


def _parse_manifest(registry: str, what: str, body: bytes, digest: str, content_type: str) -> Manifest:
    document = _json_object(registry, body, f"the manifest of {what}")
    media_type = document.get("mediaType") or content_type
    if not isinstance(media_type, str):
        raise MalformedResponse(registry, f"the manifest of {what} has a mediaType that is not a string")
    if media_type not in IMAGE_MEDIA_TYPES | INDEX_MEDIA_TYPES:
        # An OCI manifest may omit mediaType; its shape says which it is.
        if "manifests" in document:
            media_type = OCI_INDEX
        elif "config" in document:
            media_type = OCI_MANIFEST
        else:
            raise MalformedResponse(registry, f"the manifest of {what} has media type {media_type!r}, not one we read")
    if media_type in INDEX_MEDIA_TYPES:
        entries = document.get("manifests")
        if not isinstance(entries, list):
            raise MalformedResponse(registry, f"the index of {what} has no manifests list")
        children = tuple(_child(registry, what, entry) for entry in entries)
        return Manifest(digest=digest, media_type=media_type, body=body, config_digest=None, children=children)
    config = document.get("config")
    config_digest = config.get("digest") if isinstance(config, dict) else None
    if not isinstance(config_digest, str) or not _DIGEST.fullmatch(config_digest):
        raise MalformedResponse(registry, f"the manifest of {what} has no sha256 config digest")
    return Manifest(digest=digest, media_type=media_type, body=body, config_digest=config_digest)


def _child(registry: str, what: str, entry: object) -> tuple[str, str, Platform | None]:
    if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str):
        raise MalformedResponse(registry, f"the index of {what} has an entry without a digest")
    raw = entry.get("platform")
    platform = None
    if isinstance(raw, dict) and isinstance(raw.get("os"), str) and isinstance(raw.get("architecture"), str):
        variant = raw.get("variant")
        platform = Platform(raw["os"], raw["architecture"], variant if isinstance(variant, str) else None)
    return entry["digest"], str(entry.get("mediaType", "")), platform


def _matches(have: Platform, want: Platform) -> bool:
    if (have.os, have.architecture) != (want.os, want.architecture):
        return False
    return want.variant is None or have.variant == want.variant


def _created(registry: str, repository: str, value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedResponse(registry, f"{repository}: the config's created is not a string")
    try:
        # RFC 3339 with up to nanoseconds (Go writes 9 fraction digits; Python reads 6).
        text = re.sub(r"(\.\d{6})\d+", r"\1", value.strip()).replace("Z", "+00:00").replace("z", "+00:00")
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise MalformedResponse(registry, f"{repository}: the config's created {value[:60]!r} is not RFC 3339") from exc
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
