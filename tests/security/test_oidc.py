"""Tokens of an OIDC issuer over a real channel: an in-test issuer on loopback serves discovery and its JWKS."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from apphosting.v1 import deployments_pb2 as pb
from services.deployments.auth import JwtVerifier, OidcVerifier, VerifierChain, oidc_user_id
from services.deployments.errors import DOMAIN
from tests.integration.test_api import create_request, expect_error
from tests.security.conftest import SECRET, ApiFactory, bearer, token_for

AUDIENCE = "apphosting-api"


@dataclass
class SigningKey:
    kid: str
    algorithm: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        to_jwk = RSAAlgorithm.to_jwk if self.algorithm.startswith("RS") else ECAlgorithm.to_jwk
        published: dict[str, Any] = to_jwk(self.private.public_key(), as_dict=True)
        return {**published, "kid": self.kid, "alg": self.algorithm, "use": "sig"}

    def public_pem(self) -> bytes:
        return bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def rsa_key(kid: str) -> SigningKey:
    return SigningKey(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_key(kid: str) -> SigningKey:
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


@dataclass
class Issuer:
    """An OIDC issuer on loopback: discovery and JWKS, keys swappable, able to fail like an outage."""

    keys: list[SigningKey]
    url: str = ""
    down: bool = False
    jwks_requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def token(self, subject: str, key: SigningKey | None = None, **claims: Any) -> str:
        key = key or self.keys[0]
        now = datetime.now(UTC)
        payload = {"iss": self.url, "aud": AUDIENCE, "sub": subject, "iat": now, "exp": now + timedelta(minutes=5)}
        payload.update(claims)
        return jwt.encode(
            {k: v for k, v in payload.items() if v is not None}, key.private, key.algorithm, headers={"kid": key.kid}
        )


class _Handler(BaseHTTPRequestHandler):
    issuer: Issuer

    def do_GET(self) -> None:
        issuer = self.issuer
        if self.path == "/.well-known/openid-configuration":
            body: dict[str, Any] = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}/jwks"}
        elif self.path == "/jwks":
            with issuer.lock:
                issuer.jwks_requests += 1
                body = {"keys": [key.jwk() for key in issuer.keys]}
        else:
            self.send_error(404)
            return
        if issuer.down:
            self.send_error(503)
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    state = Issuer([rsa_key("rsa-1"), ec_key("ec-1")])
    handler = type("Handler", (_Handler,), {"issuer": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


class Clock:
    """The verifier's clock for cache lifespans and refetch cooldowns, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def verifier(issuer: Issuer, clock: Clock, **options: Any) -> OidcVerifier:
    settings: dict[str, Any] = {
        "leeway": timedelta(0),
        "admin_claim": "groups",
        "admin_value": "platform-admins",
        "cache_lifespan": 300.0,
        "refetch_cooldown": 30.0,
        "clock": clock,
    }
    settings.update(options)
    return OidcVerifier(issuer.url, AUDIENCE, **settings)


async def _refused(call: Any, reason: str, hint: str) -> None:
    details = await expect_error(call, grpc.StatusCode.UNAUTHENTICATED)
    assert details.reason == reason, details
    assert details.domain == DOMAIN
    assert hint in details.message, details


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256_with_public_key(issuer: Issuer, key: SigningKey, subject: str) -> str:
    """The algorithm-confusion attack: HMAC "signed" with the issuer's public key, which anyone has."""
    header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
    exp = int((datetime.now(UTC) + timedelta(minutes=5)).timestamp())
    payload = {"iss": issuer.url, "aud": AUDIENCE, "sub": subject, "exp": exp}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = hmac.new(key.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _unsigned(issuer: Issuer, subject: str) -> str:
    header = {"alg": "none", "typ": "JWT", "kid": issuer.keys[0].kid}
    exp = int((datetime.now(UTC) + timedelta(minutes=5)).timestamp())
    payload = {"iss": issuer.url, "aud": AUDIENCE, "sub": subject, "exp": exp}
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}."


async def test_issuer_tokens_beside_key_files_each_user_sees_only_their_own(
    secure_api_factory: ApiFactory, issuer: Issuer
) -> None:
    oidc = verifier(issuer, Clock())
    api = await secure_api_factory(auth=VerifierChain([JwtVerifier.from_secret(SECRET, leeway=timedelta(0)), oidc]))
    stub = api.stub
    # Subjects as IdPs issue them (not UUIDs), one signed with the RSA key and one with the EC key.
    alice = bearer(issuer.token("alice@example.com"))
    bob = bearer(issuer.token("00u1bob", key=issuer.keys[1]))
    admin = bearer(issuer.token("ops", groups=["developers", "platform-admins"]))
    keyfile_user = str(uuid.uuid4())

    mine = await stub.CreateAppHostingDeployment(create_request(deployment_name="web"), metadata=alice)
    assert mine.user_id == oidc_user_id(issuer.url, "alice@example.com")
    theirs = await stub.CreateAppHostingDeployment(create_request(deployment_name="web"), metadata=bob)
    assert theirs.user_id == oidc_user_id(issuer.url, "00u1bob")
    # Today's key file keeps working beside the issuer.
    old = await stub.CreateAppHostingDeployment(
        create_request(deployment_name="web"), metadata=bearer(token_for(keyfile_user))
    )
    assert old.user_id == keyfile_user

    listed = await stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=alice)
    assert [d.id for d in listed.deployments] == [mine.id]
    listed = await stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=bob)
    assert [d.id for d in listed.deployments] == [theirs.id]
    details = await expect_error(
        stub.GetDeployment(pb.GetDeploymentRequest(id=theirs.id), metadata=alice), grpc.StatusCode.NOT_FOUND
    )
    assert details.reason == "DEPLOYMENT_NOT_FOUND"
    everyone = await stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=admin)
    assert {d.id for d in everyone.deployments} == {mine.id, theirs.id, old.id}
    # A group that is not the admin group gives nothing more.
    plain = bearer(issuer.token("dev", groups=["developers"]))
    assert not (await stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=plain)).deployments
    # Keys were fetched once for all of it.
    assert oidc.fetches == 1


async def test_bad_tokens_are_unauthenticated_with_a_reason(secure_api_factory: ApiFactory, issuer: Issuer) -> None:
    oidc = verifier(issuer, Clock())
    api = await secure_api_factory(auth=oidc)
    stub = api.stub
    now = datetime.now(UTC)
    stranger = rsa_key("rsa-1")  # the issuer's kid, another key: a forgery
    expired = issuer.token("alice", iat=now - timedelta(hours=2), exp=now - timedelta(hours=1))
    confused = _hs256_with_public_key(issuer, issuer.keys[0], "alice")
    cases = [
        ("wrong issuer", issuer.token("alice", iss="https://evil.example.com"), "TOKEN_INVALID", "issuer"),
        ("wrong audience", issuer.token("alice", aud="another-api"), "TOKEN_INVALID", "Audience"),
        ("no audience", issuer.token("alice", aud=None), "TOKEN_INVALID", "aud"),
        ("expired", expired, "TOKEN_EXPIRED", "expired"),
        ("not yet valid", issuer.token("alice", nbf=now + timedelta(hours=1)), "TOKEN_INVALID", "not yet valid"),
        ("alg none", _unsigned(issuer, "alice"), "TOKEN_INVALID", "'none' is not accepted"),
        ("HS256 with the public key", confused, "TOKEN_INVALID", "'HS256' is not accepted"),
        ("forged signature", issuer.token("alice", key=stranger), "TOKEN_INVALID", "Signature verification failed"),
        ("unknown kid", issuer.token("alice", key=rsa_key("made-up")), "TOKEN_INVALID", "kid 'made-up'"),
        ("no subject", issuer.token("alice", sub=None), "TOKEN_INVALID", "sub"),
    ]  # fmt: skip
    for case, token, reason, hint in cases:
        assert case  # named for the reader of a failure
        await _refused(stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=bearer(token)), reason, hint)
    assert await api.rows() == 0


async def test_a_flood_of_unknown_kids_fetches_the_keys_at_most_once_per_cooldown(
    secure_api_factory: ApiFactory, issuer: Issuer
) -> None:
    clock = Clock()
    oidc = verifier(issuer, clock)
    api = await secure_api_factory(auth=oidc)
    good = bearer(issuer.token("alice"))
    await api.stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=good)
    assert (oidc.fetches, issuer.jwks_requests) == (1, 1)
    stranger = rsa_key("unused")
    for n in range(30):
        made_up = bearer(issuer.token("alice", key=SigningKey(f"made-up-{n}", "RS256", stranger.private)))
        await _refused(api.stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=made_up), "TOKEN_INVALID", "kid")
    assert issuer.jwks_requests == 1
    clock.now += 31
    for n in range(30):
        made_up = bearer(issuer.token("alice", key=SigningKey(f"again-{n}", "RS256", stranger.private)))
        await _refused(api.stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=made_up), "TOKEN_INVALID", "kid")
    assert issuer.jwks_requests == 2


async def test_rotated_keys_are_fetched_once_and_retired_keys_stop_working(
    secure_api_factory: ApiFactory, issuer: Issuer
) -> None:
    clock = Clock()
    oidc = verifier(issuer, clock)
    api = await secure_api_factory(auth=oidc)
    stub = api.stub
    before = bearer(issuer.token("alice"))
    await stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=before)

    rotated = rsa_key("rsa-2")
    issuer.keys = [rotated, issuer.keys[1]]
    clock.now += 31  # past the cooldown the first fetch started
    after = bearer(issuer.token("alice", key=rotated))
    await stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=after)
    assert issuer.jwks_requests == 2
    await stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=after)
    assert issuer.jwks_requests == 2
    # The refetched set no longer has the old key: its tokens are refused.
    await _refused(stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=before), "TOKEN_INVALID", "kid 'rsa-1'")


async def test_issuer_down_cached_keys_still_work_and_uncached_ones_are_unavailable(
    secure_api_factory: ApiFactory, issuer: Issuer
) -> None:
    clock = Clock()
    oidc = verifier(issuer, clock)
    api = await secure_api_factory(auth=oidc)
    stub = api.stub
    token = bearer(issuer.token("alice"))
    await stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=token)

    issuer.down = True
    rotated = rsa_key("rsa-2")
    issuer.keys.append(rotated)
    await stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=token)
    clock.now += 3600  # long past the cache lifespan: the refresh fails and the fetched keys are kept
    await stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=token)
    assert issuer.jwks_requests == 2

    # A key never fetched: the token may be good, so the answer is "retry", not "you are not you".
    details = await expect_error(
        stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=bearer(issuer.token("alice", key=rotated))),
        grpc.StatusCode.UNAVAILABLE,
    )
    assert details.reason == "ISSUER_UNAVAILABLE"
    assert details.metadata == {"issuer": issuer.url}

    issuer.down = False
    clock.now += 31
    await stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=bearer(issuer.token("alice", key=rotated)))


async def test_an_unreachable_issuer_without_cached_keys_is_unavailable(
    secure_api_factory: ApiFactory, issuer: Issuer
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    # Nothing listens there: discovery is refused. The server starts all the same.
    nowhere = OidcVerifier(f"http://127.0.0.1:{closed_port}", AUDIENCE, clock=Clock(), fetch_timeout=10)
    api = await secure_api_factory(auth=VerifierChain([verifier(issuer, Clock()), nowhere]))
    token = jwt.encode(
        {"iss": nowhere.issuer, "aud": AUDIENCE, "sub": "alice", "exp": datetime.now(UTC) + timedelta(minutes=5)},
        issuer.keys[0].private,
        "RS256",
        headers={"kid": "rsa-1"},
    )
    details = await expect_error(
        api.stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=bearer(token)), grpc.StatusCode.UNAVAILABLE
    )
    assert details.reason == "ISSUER_UNAVAILABLE"
    # The other issuer is unaffected.
    await api.stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=bearer(issuer.token("alice")))


def test_symmetric_and_unsigned_algorithms_and_cleartext_issuers_are_refused() -> None:
    for algorithms in (["HS256"], ["RS256", "none"], []):
        with pytest.raises(ValueError, match="asymmetric"):
            OidcVerifier("https://id.example.com", AUDIENCE, algorithms=algorithms)
    with pytest.raises(ValueError, match="https"):
        OidcVerifier("http://id.example.com", AUDIENCE)
    with pytest.raises(ValueError, match="https"):
        OidcVerifier("https://id.example.com", AUDIENCE, jwks_url="http://id.example.com/jwks")
    with pytest.raises(ValueError, match="audience"):
        OidcVerifier("https://id.example.com", "")
