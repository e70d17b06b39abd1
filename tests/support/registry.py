"""A real registry for tests: Debian's docker-registry (CNCF distribution 2.8) on loopback, a token server, and pushes.

Fixtures (import them into a test module by their function names):

- ``open_registry``: no authentication;
- ``htpasswd_registry``: HTTP basic against a bcrypt htpasswd file made here (user ``REGISTRY_USER``);
- ``token_registry``: Bearer tokens from :class:`TokenServer`, a small local token service whose RS256 JWTs carry
  their certificate (x5c), which the registry trusts through its ``rootcertbundle``.

Each is a :class:`RunningRegistry`; ``push_image`` and ``retag`` put small images into it through the registry's
HTTP API (monolithic blob uploads: POST, then PUT with the digest), with an image config whose ``created`` the test
chooses. The fixtures skip with the reason when ``/usr/bin/docker-registry`` is not installed.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

REGISTRY_BINARY: Final = os.environ.get("APPHOSTING_TEST_REGISTRY", "/usr/bin/docker-registry")
REGISTRY_USER: Final = "pusher"
REGISTRY_PASSWORD: Final = "correct horse battery staple"
TOKEN_SERVICE: Final = "apphosting-test-registry"
TOKEN_ISSUER: Final = "apphosting-test-token-server"

OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
OCI_LAYER: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER: Final = "application/vnd.docker.image.rootfs.diff.tar.gzip"

_READY_DEADLINE: Final = 60.0


def registry_missing_reason() -> str | None:
    """None when the registry binary is there, else why the registry tests are skipped."""
    if shutil.which(REGISTRY_BINARY) is None:
        return (
            f"{REGISTRY_BINARY} is not installed (Debian package docker-registry: "
            "`apt-get install -y docker-registry`; "
            "or set APPHOSTING_TEST_REGISTRY to a distribution registry 2.x binary)"
        )
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def htpasswd_line(username: str, password: str) -> str:
    """One htpasswd line with a bcrypt hash (the only hash the distribution registry accepts)."""
    import bcrypt

    return f"{username}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}\n"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class RunningRegistry:
    """A started registry: ``host`` is 127.0.0.1:<port>, ``url`` its base URL; ``headers`` what pushes send."""

    host: str
    process: subprocess.Popen[bytes]
    log_path: Path
    headers: dict[str, str] = field(default_factory=dict)
    token_server: TokenServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def push_headers(self, repository: str) -> dict[str, str]:
        """What a push to ``repository`` sends: basic credentials, or a push token from the token server."""
        if self.token_server is not None:
            token = self.token_server.issue(REGISTRY_USER, [("repository", repository, ["pull", "push"])])
            return {"Authorization": f"Bearer {token}"}
        return dict(self.headers)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def _start(tmp_path: Path, auth: dict[str, Any] | None) -> RunningRegistry:
    reason = registry_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path / f"registry-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    last_log = ""
    # Another process can take the free port between our probe and the registry's bind: try again on a new one.
    for _ in range(3):
        port = free_port()
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(root / "data")},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"127.0.0.1:{port}", "secret": uuid.uuid4().hex},
        }
        if auth is not None:
            config["auth"] = auth
        config_path = root / "config.yml"
        config_path.write_text(yaml.safe_dump(config))
        log_path = root / "registry.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(config_path)], stdout=log, stderr=subprocess.STDOUT
            )
        running = RunningRegistry(host=f"127.0.0.1:{port}", process=process, log_path=log_path)
        if _wait_ready(running):
            return running
        _stop(running)
        last_log = running.log()
    raise RuntimeError(f"docker-registry did not start; its log:\n{last_log}")


def _wait_ready(running: RunningRegistry) -> bool:
    deadline = time.monotonic() + _READY_DEADLINE
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            return False
        try:
            response = httpx.get(f"{running.url}/v2/", timeout=2)
        except httpx.HTTPError:
            time.sleep(0.05)
            continue
        # 401 is ready too: the registry answers, and asks for credentials.
        return response.status_code in (200, 401)
    return False


def _stop(running: RunningRegistry) -> None:
    if running.process.poll() is None:
        running.process.terminate()
        try:
            running.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            running.process.kill()
            running.process.wait()


@pytest.fixture(name="open_registry")
def open_registry_fixture(tmp_path: Path) -> Iterator[RunningRegistry]:
    running = _start(tmp_path, None)
    yield running
    _stop(running)


@pytest.fixture(name="htpasswd_registry")
def htpasswd_registry_fixture(tmp_path: Path) -> Iterator[RunningRegistry]:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(htpasswd_line(REGISTRY_USER, REGISTRY_PASSWORD))
    running = _start(tmp_path, {"htpasswd": {"realm": "apphosting-test", "path": str(htpasswd)}})
    pair = base64.b64encode(f"{REGISTRY_USER}:{REGISTRY_PASSWORD}".encode()).decode()
    running.headers = {"Authorization": f"Basic {pair}"}
    yield running
    _stop(running)


@pytest.fixture(name="token_server")
def token_server_fixture(tmp_path: Path) -> Iterator[TokenServer]:
    server = TokenServer(tmp_path / "token-cert.pem")
    server.start()
    yield server
    server.stop()


@pytest.fixture(name="token_registry")
def token_registry_fixture(tmp_path: Path, token_server: TokenServer) -> Iterator[RunningRegistry]:
    running = _start(
        tmp_path,
        {
            "token": {
                "realm": token_server.realm,
                "service": TOKEN_SERVICE,
                "issuer": TOKEN_ISSUER,
                "rootcertbundle": str(token_server.cert_path),
            }
        },
    )
    running.token_server = token_server
    yield running
    _stop(running)


class TokenServer:
    """A Docker token service on loopback: GET /token?service=&scope= answers an RS256 JWT granting the scopes asked
    for, to ``REGISTRY_USER`` with ``REGISTRY_PASSWORD`` (basic), or to anyone for pull when ``anonymous_pull``.

    ``requests`` records each request's (scope, username or None); ``expires_in`` sets the tokens' lifetime.
    """

    def __init__(self, cert_path: Path, *, expires_in: int = 300) -> None:
        self.cert_path = cert_path
        self.expires_in = expires_in
        self.anonymous_pull = False
        self.requests: list[tuple[str, str | None]] = []
        self._lock = threading.Lock()
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = dt.datetime.now(dt.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TOKEN_ISSUER)])
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def issue(self, subject: str, access: list[tuple[str, str, list[str]]]) -> str:
        now = int(time.time())
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": subject,
            "aud": TOKEN_SERVICE,
            "exp": now + self.expires_in,
            "nbf": now - 60,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": [{"type": kind, "name": name, "actions": actions} for kind, name, actions in access],
        }
        x5c = base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"x5c": [x5c]})

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                scopes = query.get("scope", [])
                header = self.headers.get("Authorization")
                user = _basic_user(header)
                with server._lock:
                    server.requests.append((" ".join(scopes), user))
                if header and user is None:
                    self._answer(401, {"details": "wrong username or password"})
                    return
                if user is None and not server.anonymous_pull:
                    self._answer(401, {"details": "credentials required"})
                    return
                access = []
                for scope in scopes:
                    kind, name, actions = _split_scope(scope)
                    granted = actions if user else [action for action in actions if action == "pull"]
                    access.append((kind, name, granted))
                token = server.issue(user or "anonymous", access)
                self._answer(200, {"token": token, "expires_in": server.expires_in})

            def _answer(self, status: int, document: dict[str, Any]) -> None:
                body = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def _basic_user(header: str | None) -> str | None:
    """The user a Basic header authenticates, or None."""
    if not header or not header.startswith("Basic "):
        return None
    try:
        username, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except ValueError:
        return None
    return username if (username, password) == (REGISTRY_USER, REGISTRY_PASSWORD) else None


def _split_scope(scope: str) -> tuple[str, str, list[str]]:
    # repository:<name>:<actions>; the name may hold a port's colon, the actions never do.
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    return kind, name, [action for action in actions.split(",") if action]


# -- pushing images through the HTTP API -------------------------------------------------------------------------


@dataclass(frozen=True)
class PushedImage:
    digest: str
    config_digest: str
    manifest: bytes


async def push_blob(client: httpx.AsyncClient, registry: RunningRegistry, repository: str, data: bytes) -> str:
    """A monolithic upload: POST opens the upload, PUT with ?digest= sends the whole blob and commits it."""
    digest = sha256(data)
    headers = registry.push_headers(repository)
    started = await client.post(f"{registry.url}/v2/{repository}/blobs/uploads/", headers=headers)
    assert started.status_code == 202, (started.status_code, started.text)
    location = started.headers["Location"]
    separator = "&" if "?" in location else "?"
    put = await client.put(
        f"{location}{separator}digest={digest}",
        content=data,
        headers={**headers, "Content-Type": "application/octet-stream"},
    )
    assert put.status_code == 201, (put.status_code, put.text)
    return digest


async def push_manifest(
    client: httpx.AsyncClient, registry: RunningRegistry, repository: str, reference: str, body: bytes, media_type: str
) -> str:
    headers = {**registry.push_headers(repository), "Content-Type": media_type}
    response = await client.put(f"{registry.url}/v2/{repository}/manifests/{reference}", content=body, headers=headers)
    assert response.status_code == 201, (response.status_code, response.text)
    digest: str = response.headers["Docker-Content-Digest"]
    assert digest == sha256(body)
    return digest


async def push_image(
    registry: RunningRegistry,
    repository: str,
    tag: str,
    *,
    created: dt.datetime | None,
    docker: bool = False,
    config: bytes | None = None,
    layer: bytes | None = None,
    annotations: dict[str, str] | None = None,
) -> PushedImage:
    """Pushes a one-layer image under ``tag``: an OCI manifest (or Docker v2 schema 2 with ``docker``) whose config
    says ``created`` (RFC 3339, UTC); ``config`` replaces the config blob's bytes (for malformed configs)."""
    if config is None:
        document: dict[str, Any] = {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
            "config": {"Labels": {"tag": tag}},
        }
        if created is not None:
            document["created"] = created.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        config = json.dumps(document, sort_keys=True).encode()
    layer = layer if layer is not None else f"layer of {repository}:{tag}".encode()
    async with httpx.AsyncClient(timeout=30) as client:
        config_digest = await push_blob(client, registry, repository, config)
        layer_digest = await push_blob(client, registry, repository, layer)
        media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {
                "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {"mediaType": DOCKER_LAYER if docker else OCI_LAYER, "digest": layer_digest, "size": len(layer)}
            ],
        }
        if annotations:
            manifest["annotations"] = annotations
        body = json.dumps(manifest, indent=2).encode()
        digest = await push_manifest(client, registry, repository, tag, body, media_type)
    return PushedImage(digest=digest, config_digest=config_digest, manifest=body)


async def push_index(
    registry: RunningRegistry, repository: str, tag: str, images: list[tuple[PushedImage, str, str]]
) -> str:
    """Pushes an OCI index of already pushed images, each with its (os, architecture); returns its digest."""
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": image.digest,
                "size": len(image.manifest),
                "platform": {"os": os_name, "architecture": architecture},
            }
            for image, os_name, architecture in images
        ],
    }
    async with httpx.AsyncClient(timeout=30) as client:
        return await push_manifest(client, registry, repository, tag, json.dumps(index).encode(), OCI_INDEX)


async def retag(
    registry: RunningRegistry, repository: str, image: PushedImage, tag: str, *, docker: bool = False
) -> str:
    """Puts the same manifest bytes under another tag (what `crane tag` does): the digest stays the same."""
    async with httpx.AsyncClient(timeout=30) as client:
        media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
        return await push_manifest(client, registry, repository, tag, image.manifest, media_type)


@contextlib.contextmanager
def http_server(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serves ``handler`` on a loopback port in a thread; yields its host:port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
