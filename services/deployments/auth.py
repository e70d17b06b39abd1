"""Who is calling: a Bearer JWT (key file or OIDC issuer) or API key, checked on each RPC but health and reflection."""

from __future__ import annotations

import asyncio
import contextvars
import enum
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit

import grpc
import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from apphosting.imageupdates import UPDATER_ACTOR
from services.deployments import errors
from services.deployments.errors import ServiceError

log = logging.getLogger(__name__)

# The one user of single-user local mode (ApiOptions.auth None), and the user of `apphosting dev`'s token.
LOCAL_USER_ID: Final = str(uuid.uuid5(uuid.NAMESPACE_URL, "apphosting:local-user"))

# Answered without a token: load balancers probe health, and grpcurl needs reflection to describe the API.
PUBLIC_METHOD_PREFIXES: Final = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
# What a read-only API key may call: the methods that get, list, watch or preview and change nothing.
# Listed by name, so a method added later is refused to such a key until it is put here.
READING_METHODS: Final = frozenset(
    {
        "/apphosting.v1.DeploymentService/GetDeployment",
        "/apphosting.v1.DeploymentService/ListDeployments",
        "/apphosting.v1.DeploymentService/WatchDeployment",
        "/apphosting.v1.DeploymentService/WatchDeployments",
        "/apphosting.v1.DeploymentService/ListReleases",
        "/apphosting.v1.DeploymentService/PreviewImageUpdate",
        "/apphosting.v1.ApiKeyService/ListApiKeys",
    }
)
# RFC 7518 §3.2: an HS256 key has at least 256 bits.
MIN_SECRET_BYTES: Final = 32
# Far above any real token; a bigger header is refused before it is parsed.
MAX_TOKEN_BYTES: Final = 8192
DEFAULT_LEEWAY = timedelta(seconds=30)
_CURVE_ALGORITHMS: Final = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


@dataclass(frozen=True)
class Caller:
    """The authenticated user of one call; an admin sees and manages every user's deployments."""

    user_id: str
    admin: bool = False
    # The prefix of the API key the call was made with (ahk_1a2b3c4d); None for a token or local mode.
    api_key: str | None = None
    # A read-only API key: only READING_METHODS are answered.
    read_only: bool = False


LOCAL_CALLER: Final = Caller(LOCAL_USER_ID)
# The image updater's service identity: a token of the API's own key whose sub is "image-updater". It sees every
# owner's deployments and may only read them, preview and update them (its releases name it as their actor).
UPDATER_CALLER: Final = Caller(UPDATER_ACTOR, admin=True)
UPDATER_METHODS: Final = frozenset(
    f"/apphosting.v1.DeploymentService/{name}"
    for name in ("GetDeployment", "ListDeployments", "WatchDeployments", "PreviewImageUpdate", "UpdateDeployment")
)


class Unset(enum.Enum):
    NOT_CONFIGURED = "not configured"


# ApiOptions.auth until it is set: a server never runs without authentication by omission.
NOT_CONFIGURED: Final = Unset.NOT_CONFIGURED

_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("apphosting_caller")


def current_caller() -> Caller:
    """The caller of the RPC being served; UNAUTHENTICATED when no interceptor set one (fail closed)."""
    try:
        return _caller.get()
    except LookupError:
        raise errors.unauthenticated("TOKEN_MISSING", "the call carries no authenticated caller") from None


class JwtVerifier:
    """Checks a token's signature, expiry and subject; returns the caller it names."""

    def __init__(
        self,
        key: Any,
        algorithms: list[str],
        *,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: timedelta = DEFAULT_LEEWAY,
    ) -> None:
        self._key = key
        self.algorithms = algorithms
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway

    @classmethod
    def from_secret(cls, secret: bytes, **options: Any) -> JwtVerifier:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"an HS256 secret needs at least {MIN_SECRET_BYTES} bytes, this one has {len(secret)}")
        return cls(secret, ["HS256"], **options)

    @classmethod
    def from_public_key(cls, pem: bytes, **options: Any) -> JwtVerifier:
        key = serialization.load_pem_public_key(pem)
        if isinstance(key, rsa.RSAPublicKey):
            if key.key_size < 2048:
                raise ValueError(f"an RS256 key needs at least 2048 bits, this one has {key.key_size}")
            return cls(key, ["RS256"], **options)
        if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _CURVE_ALGORITHMS:
            return cls(key, [_CURVE_ALGORITHMS[key.curve.name]], **options)
        raise ValueError(f"the public key must be RSA or EC P-256/P-384/P-521, not {type(key).__name__}")

    @classmethod
    def from_files(
        cls, *, secret_file: str | None = None, public_key_file: str | None = None, **options: Any
    ) -> JwtVerifier:
        """From `--jwt-secret-file` (HS256; outer whitespace such as a final newline is ignored) or
        `--jwt-public-key-file` (PEM; RS256 or ES256)."""
        if (secret_file is None) == (public_key_file is None):
            raise ValueError("give exactly one of a JWT secret file and a JWT public key file")
        if secret_file is not None:
            return cls.from_secret(Path(secret_file).read_bytes().strip(), **options)
        assert public_key_file is not None
        return cls.from_public_key(Path(public_key_file).read_bytes(), **options)

    def verify(self, token: str) -> Caller:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self.algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise errors.unauthenticated("TOKEN_EXPIRED", "the bearer token has expired; get a new one") from None
        except jwt.InvalidTokenError as exc:
            raise errors.unauthenticated("TOKEN_INVALID", f"the bearer token is not valid: {exc}") from None
        return self._caller(claims)

    def _caller(self, claims: Mapping[str, Any]) -> Caller:
        subject = claims["sub"]
        if subject == UPDATER_ACTOR:
            return UPDATER_CALLER
        try:
            user_id = str(uuid.UUID(subject)) if isinstance(subject, str) else None
        except ValueError:
            user_id = None
        if user_id is None:
            raise errors.unauthenticated("TOKEN_INVALID", "the bearer token's sub must be a user id (a UUID)")
        return Caller(user_id, admin=claims.get("admin") is True)

    def issuers(self) -> frozenset[str | None]:
        """The `iss` values this verifier answers for (None: whatever a token carries)."""
        return frozenset({self._issuer})

    def recognizes(self, token: str) -> bool:
        """True for a token that is no JWT but one this verifier alone checks (an API key)."""
        return False

    async def verify_async(self, token: str) -> Caller:
        """As verify; a verifier that fetches keys over the network overrides it so the event loop never waits."""
        return self.verify(token)

    def authenticate(self, metadata: Any) -> Caller:
        """The caller named by the call's `authorization: Bearer <JWT>` header."""
        return self.verify(bearer_token(metadata))

    async def authenticate_async(self, metadata: Any) -> Caller:
        """As authenticate, for the server's interceptor."""
        return await self.verify_async(bearer_token(metadata))


def bearer_token(metadata: Any) -> str:
    """The token of the call's one `authorization: Bearer <token>` header; UNAUTHENTICATED without one."""
    values = [value for key, value in metadata or () if key == "authorization"]
    if not values:
        raise errors.unauthenticated(
            "TOKEN_MISSING", "this call needs an 'authorization: Bearer <token>' header with a JWT or an API key"
        )
    if len(values) > 1:
        raise errors.unauthenticated("TOKEN_INVALID", "the call carries more than one authorization header")
    value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise errors.unauthenticated("TOKEN_INVALID", "the authorization header must be 'Bearer <token>'")
    if len(token) > MAX_TOKEN_BYTES:
        raise errors.unauthenticated("TOKEN_INVALID", f"the bearer token is longer than {MAX_TOKEN_BYTES} bytes")
    return token.strip()


# OIDC Core §2: a `sub` is unique only within its issuer, so a user id is derived from the pair.
OIDC_SUBJECT_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "apphosting:oidc-subject")
OIDC_DEFAULT_ALGORITHMS: Final = ("RS256", "ES256")
# A JWKS publishes public keys: only asymmetric algorithms verify with them. Accepting HS256 would let
# anyone "sign" with the public key (algorithm confusion); `none` would accept unsigned tokens.
OIDC_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
MAX_KID_CHARS: Final = 256


class UserIdMapping(enum.Enum):
    """How an OIDC token's user claim becomes a user id (a UUID, as every owner column holds)."""

    # uuid5 of (issuer, claim): stable across logins, distinct across issuers, whatever the claim looks like.
    ISSUER_SUBJECT = "issuer-subject"
    # The claim already is our user id (an issuer that was given them); it must be a UUID.
    CLAIM = "claim"


def oidc_user_id(issuer: str, subject: str) -> str:
    """The user id of `subject` at `issuer` (JSON keeps the pair unambiguous whatever either contains)."""
    return str(uuid.uuid5(OIDC_SUBJECT_NAMESPACE, json.dumps([issuer, subject])))


def _check_url(url: str, what: str) -> str:
    """https, or http to a loopback address (a local issuer); keys fetched in the clear could be swapped."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme == "https" or (parts.scheme == "http" and loopback):
        return url
    raise ValueError(f"the {what} must be an https URL (http only to a loopback address), not {url!r}")


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    """A claim by name, or by dotted path into nested objects (Keycloak's `realm_access.roles`)."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


@dataclass(frozen=True)
class _KeySet:
    keys: Mapping[str, jwt.PyJWK]
    fetched_at: float


def _issuer_unavailable(issuer: str, detail: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        "ISSUER_UNAVAILABLE",
        f"the keys of token issuer {issuer} cannot be fetched ({detail}); retry",
        metadata={"issuer": issuer},
    )


class OidcVerifier(JwtVerifier):
    """Verifies tokens of one OIDC issuer with the keys it publishes (its JWKS), fetched off the event loop.

    The JWKS is found by discovery (`<issuer>/.well-known/openid-configuration`) unless `jwks_url` is
    given, and is fetched lazily, so the API starts while the issuer is down. Keys are kept for
    `cache_lifespan` seconds; a token naming an unknown `kid` (a rotated key) fetches the set again,
    but at most once every `refetch_cooldown` seconds, so tokens with made-up kids cannot hammer the
    issuer. While the issuer is unreachable, keys already fetched keep working past their lifespan,
    and a token whose key was never fetched is answered UNAVAILABLE (not UNAUTHENTICATED: it may be
    good). Fetching is single-flight: concurrent calls wait for one fetch.
    """

    def __init__(
        self,
        issuer: str,
        audience: str,
        *,
        jwks_url: str | None = None,
        algorithms: Sequence[str] = OIDC_DEFAULT_ALGORITHMS,
        leeway: timedelta = DEFAULT_LEEWAY,
        user_claim: str = "sub",
        user_id_mapping: UserIdMapping = UserIdMapping.ISSUER_SUBJECT,
        admin_claim: str | None = None,
        admin_value: str | None = None,
        cache_lifespan: float = 300.0,
        refetch_cooldown: float = 30.0,
        fetch_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not audience:
            raise ValueError("an OIDC verifier needs the audience its tokens are issued for (the client id)")
        refused = [alg for alg in algorithms if alg not in OIDC_ALGORITHMS]
        if refused or not algorithms:
            raise ValueError(
                f"OIDC tokens are verified with asymmetric algorithms only ({', '.join(sorted(OIDC_ALGORITHMS))});"
                f" refused: {', '.join(refused) or 'an empty list'}"
            )
        if cache_lifespan <= 0 or refetch_cooldown < 0 or fetch_timeout <= 0:
            raise ValueError("cache_lifespan and fetch_timeout must be positive, refetch_cooldown not negative")
        super().__init__(
            None, list(algorithms), audience=audience, issuer=_check_url(issuer, "OIDC issuer"), leeway=leeway
        )
        self.issuer = issuer
        self._jwks_url = _check_url(jwks_url, "JWKS URL") if jwks_url else None
        self._user_claim = user_claim
        self._user_id_mapping = user_id_mapping
        self._admin_claim = admin_claim
        self._admin_value = admin_value
        self._lifespan = cache_lifespan
        self._cooldown = refetch_cooldown
        self._timeout = fetch_timeout
        self._clock = clock
        self._client: jwt.PyJWKClient | None = None
        self._keyset: _KeySet | None = None
        self._last_attempt: float | None = None
        self._failure: str | None = None
        self._fetches = 0
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    @property
    def fetches(self) -> int:
        """How many times the JWKS was fetched (or tried): what a flood of unknown kids must not raise."""
        return self._fetches

    def verify(self, token: str) -> Caller:
        """As verify_async, for a caller outside an event loop (it may wait for the issuer)."""
        return asyncio.run(self.verify_async(token))

    async def verify_async(self, token: str) -> Caller:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise errors.unauthenticated("TOKEN_INVALID", f"the bearer token is not valid: {exc}") from None
        algorithm = header.get("alg")
        # Checked before any key is looked up, so a token with a refused algorithm never causes a fetch.
        if algorithm not in self.algorithms:
            raise errors.unauthenticated(
                "TOKEN_INVALID",
                f"the bearer token's algorithm {algorithm!r} is not accepted (accepted: {', '.join(self.algorithms)})",
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > MAX_KID_CHARS:
            raise errors.unauthenticated("TOKEN_INVALID", "the bearer token names no key of its issuer (kid)")
        key = await self._signing_key(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=self.algorithms,
                audience=self._audience,
                issuer=self.issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iss", "aud"], "enforce_minimum_key_length": True},
            )
        except jwt.ExpiredSignatureError:
            raise errors.unauthenticated("TOKEN_EXPIRED", "the bearer token has expired; get a new one") from None
        except jwt.InvalidTokenError as exc:
            raise errors.unauthenticated("TOKEN_INVALID", f"the bearer token is not valid: {exc}") from None
        return self._caller(claims)

    def _caller(self, claims: Mapping[str, Any]) -> Caller:
        subject = _claim(claims, self._user_claim)
        if not isinstance(subject, str) or not subject:
            raise errors.unauthenticated("TOKEN_INVALID", f"the bearer token has no {self._user_claim} claim")
        if self._user_id_mapping is UserIdMapping.ISSUER_SUBJECT:
            user_id = oidc_user_id(self.issuer, subject)
        else:
            try:
                user_id = str(uuid.UUID(subject))
            except ValueError:
                raise errors.unauthenticated(
                    "TOKEN_INVALID", f"the bearer token's {self._user_claim} must be a user id (a UUID)"
                ) from None
        return Caller(user_id, admin=self._is_admin(claims))

    def _is_admin(self, claims: Mapping[str, Any]) -> bool:
        if self._admin_claim is None:
            return False
        value = _claim(claims, self._admin_claim)
        if self._admin_value is None:
            return value is True
        if isinstance(value, list):
            return self._admin_value in value
        return bool(value == self._admin_value)

    async def _signing_key(self, kid: str) -> jwt.PyJWK:
        keyset = self._keyset
        now = self._clock()
        if keyset is not None and kid in keyset.keys and now - keyset.fetched_at < self._lifespan:
            return keyset.keys[kid]
        # An expired set, or a kid it lacks (a rotated key, or a made-up one): fetch unless one was just tried.
        if self._last_attempt is None or now - self._last_attempt >= self._cooldown:
            await self._refresh()
        keyset = self._keyset
        if keyset is not None and kid in keyset.keys:
            return keyset.keys[kid]
        if self._failure is not None:
            raise _issuer_unavailable(self.issuer, self._failure)
        raise errors.unauthenticated(
            "TOKEN_INVALID", f"the bearer token's key (kid {kid!r}) is not one its issuer publishes"
        )

    async def _refresh(self) -> None:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        seen = self._fetches
        async with self._lock:
            if self._fetches != seen:
                return  # fetched while this call waited
            self._fetches += 1
            self._last_attempt = self._clock()
            try:
                keys = await self._fetch()
            except (httpx.HTTPError, jwt.PyJWKClientError, jwt.PyJWKError, ValueError) as exc:
                self._failure = str(exc) or type(exc).__name__
                log.warning("cannot fetch the keys of token issuer %s: %s", self.issuer, self._failure)
                return
            self._keyset = _KeySet(keys, self._clock())
            self._failure = None

    async def _fetch(self) -> dict[str, jwt.PyJWK]:
        if self._client is None:
            jwks_url = self._jwks_url or await self._discover()
            # Its own cache is off: ours serves from the event loop without a lock, and keeps keys while
            # the issuer is down. PyJWKClient fetches (urllib, no redirects) and parses the set.
            self._client = jwt.PyJWKClient(jwks_url, cache_jwk_set=False, timeout=self._timeout)
        signing = await asyncio.to_thread(self._client.get_signing_keys, True)
        # A key for another algorithm (an `oct` secret, say) is never used, whatever a token's header says.
        return {key.key_id: key for key in signing if key.key_id and key.algorithm_name in self.algorithms}

    async def _discover(self) -> str:
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        async with httpx.AsyncClient(timeout=self._timeout, follow_redirects=False) as client:
            response = await client.get(url)
            response.raise_for_status()
            document = response.json()
        if not isinstance(document, dict):
            raise ValueError(f"{url} is not a JSON object")
        # OIDC Discovery §4.3: the document must name the issuer it was fetched for.
        if document.get("issuer") != self.issuer:
            raise ValueError(f"{url} names issuer {document.get('issuer')!r}, not {self.issuer!r}")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise ValueError(f"{url} has no jwks_uri")
        return _check_url(jwks_uri, "jwks_uri")


class VerifierChain(JwtVerifier):
    """Several verifiers at once (key files and OIDC issuers): a token is verified by those that answer
    for its `iss`, or, when none does, by those that take any issuer; the first that accepts it wins."""

    def __init__(self, verifiers: Sequence[JwtVerifier]) -> None:
        if not verifiers:
            raise ValueError("a verifier chain needs at least one verifier")
        super().__init__(None, sorted({alg for verifier in verifiers for alg in verifier.algorithms}))
        self._verifiers = tuple(verifiers)

    def issuers(self) -> frozenset[str | None]:
        return frozenset().union(*(verifier.issuers() for verifier in self._verifiers))

    def _candidates(self, token: str) -> list[JwtVerifier]:
        opaque = [verifier for verifier in self._verifiers if verifier.recognizes(token)]
        if opaque:
            return opaque
        # A verifier of opaque tokens answers for no issuer. One JWT verifier beside them takes every
        # JWT itself, with its own answers, as it did alone.
        answering = [verifier for verifier in self._verifiers if verifier.issuers()]
        if len(answering) == 1:
            return answering
        try:
            # Unverified, and only to choose the verifier: the chosen one checks everything.
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError as exc:
            raise errors.unauthenticated("TOKEN_INVALID", f"the bearer token is not valid: {exc}") from None
        issuer = claims.get("iss")
        named = [verifier for verifier in self._verifiers if issuer in verifier.issuers()]
        candidates = named or [verifier for verifier in self._verifiers if None in verifier.issuers()]
        if not candidates:
            raise errors.unauthenticated("TOKEN_INVALID", f"the bearer token's issuer {issuer!r} is not trusted here")
        return candidates

    def verify(self, token: str) -> Caller:
        refusals: list[ServiceError] = []
        for verifier in self._candidates(token):
            try:
                return verifier.verify(token)
            except ServiceError as refused:
                refusals.append(refused)
        raise _most_telling(refusals)

    async def verify_async(self, token: str) -> Caller:
        refusals: list[ServiceError] = []
        for verifier in self._candidates(token):
            try:
                return await verifier.verify_async(token)
            except ServiceError as refused:
                refusals.append(refused)
        raise _most_telling(refusals)


def _most_telling(refusals: list[ServiceError]) -> ServiceError:
    """An unreachable issuer first (the token may be good), then an expiry (its signature was good)."""
    for wanted in ("ISSUER_UNAVAILABLE", "TOKEN_EXPIRED"):
        for refused in refusals:
            if refused.reason == wanted:
                return refused
    return refusals[0]


def mint_token(
    key: Any,
    user_id: str,
    *,
    admin: bool = False,
    ttl: timedelta = timedelta(hours=1),
    algorithm: str = "HS256",
    now: datetime | None = None,
    claims: Mapping[str, Any] | None = None,
) -> str:
    """A signed token for `user_id` (for `apphosting dev` and tests; production tokens come from an IdP)."""
    issued = now or datetime.now(UTC)
    payload: dict[str, Any] = {"sub": user_id, "iat": issued, "exp": issued + ttl, **(claims or {})}
    if admin:
        payload["admin"] = True
    return jwt.encode(payload, key, algorithm=algorithm)


class _Undecodable:
    """Stands for a request body that is not a valid message, so the call answers INVALID_ARGUMENT."""

    def __init__(self, detail: str, field: str | None) -> None:
        self.detail = detail
        self.field = field

    def error(self) -> ServiceError:
        if self.field is None:
            return errors.malformed_request(self.detail)
        violation = errors.FieldViolation(
            self.field,
            f"{self.field} nests deeper than the {PROTOBUF_MAX_DEPTH} levels a protobuf message may have",
            "TOO_DEEP",
        )
        return errors.malformed_request(self.detail, violation)


# The nesting a protobuf decoder accepts (upb's and the C++ runtime's default recursion limit).
PROTOBUF_MAX_DEPTH: Final = 100
_RECURSIVE_TYPES: Final = frozenset({"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"})


def _deep_field(request_type: Any) -> str | None:
    """The one field of a request type that can nest without bound (a Struct such as `config`), if any.

    The API's other fields are flat, so a decoder's depth failure can only come from that one.
    """
    descriptor = getattr(request_type, "DESCRIPTOR", None)
    if descriptor is None:
        return None
    deep = [f.name for f in descriptor.fields if f.message_type and f.message_type.full_name in _RECURSIVE_TYPES]
    return deep[0] if len(deep) == 1 else None


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    decode = deserializer
    # The generated stubs pass `Request.FromString`, whose __self__ is the request type.
    deep_field = _deep_field(getattr(decode, "__self__", None))

    def deserialize(data: bytes) -> Any:
        # gRPC answers INTERNAL when a deserializer raises; a bad body is the caller's error.
        try:
            return decode(data)
        except Exception as exc:
            detail = f"{type(exc).__name__}: {exc}"
            # upb names its recursion limit in the error ("Exceeded upb_DecodeOptions_MaxDepth").
            too_deep = "depth" in str(exc).lower()
            return _Undecodable(detail, deep_field if too_deep else None)

    return deserialize


def is_public(method: str) -> bool:
    return method.startswith(PUBLIC_METHOD_PREFIXES)


class Gate:
    """Authenticates each call (None verifier: single-user local mode) before its servicer runs.

    A call without a valid token is answered UNAUTHENTICATED; otherwise the servicer reads the caller
    with `current_caller()`. Whatever fails unexpectedly in the servicer is answered INTERNAL with a
    correlation id, never UNKNOWN. Health and reflection are public: they do not pass here.
    """

    def __init__(self, verifier: JwtVerifier | None) -> None:
        self._verifier = verifier

    async def admit(self, method: str, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Sets the call's caller, or answers the call with why it is refused (AbortError)."""
        who = await self._caller(method, context.invocation_metadata())
        if isinstance(who, ServiceError):
            await context.abort_with_status(who.to_status())
        if isinstance(request, _Undecodable):
            await context.abort_with_status(request.error().to_status())
        if who is UPDATER_CALLER and method not in UPDATER_METHODS:
            denied = ServiceError(
                grpc.StatusCode.PERMISSION_DENIED,
                "SERVICE_IDENTITY_NOT_ALLOWED",
                f"the {UPDATER_ACTOR} identity may only read, preview and update deployments, not call {method}",
            )
            await context.abort_with_status(denied.to_status())
        _caller.set(who)

    async def _caller(self, method: str, metadata: Any) -> Caller | ServiceError:
        who: Caller | ServiceError = LOCAL_CALLER
        if self._verifier is not None:
            try:
                who = await self._verifier.authenticate_async(metadata)
            except ServiceError as refused:
                log.info("refused %s: %s", method, refused)
                who = refused
            except Exception as failure:
                who = errors.internal(method, failure)
        if isinstance(who, Caller) and who.read_only and method not in READING_METHODS:
            who = errors.read_only_key(who.api_key or "", method.rsplit("/", 1)[-1])
        return who

    @staticmethod
    async def fail(method: str, failure: Exception, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
        """Answers a call whose servicer raised: its ServiceError, or INTERNAL with a correlation id."""
        error = failure if isinstance(failure, ServiceError) else errors.internal(method, failure)
        await context.abort_with_status(error.to_status())

    @staticmethod
    def deserializer(handler: grpc.RpcMethodHandler[Any, Any]) -> Callable[[bytes], Any] | None:
        """The method's request decoder, made safe: a body that is not a valid message is the caller's
        error (INVALID_ARGUMENT), where gRPC would answer INTERNAL."""
        return _safe(handler.request_deserializer)


def tls_server_credentials(cert_file: str, key_file: str, client_ca_file: str | None = None) -> grpc.ServerCredentials:
    """TLS for the gRPC server; with a client CA, mutual TLS: a client must present a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(Path(key_file).read_bytes(), Path(cert_file).read_bytes())],
        root_certificates=Path(client_ca_file).read_bytes() if client_ca_file else None,
        require_client_auth=client_ca_file is not None,
    )
