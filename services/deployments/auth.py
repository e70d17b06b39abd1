"""Who is calling: a Bearer JWT verified on every RPC but health and reflection, the caller kept in a contextvar."""

from __future__ import annotations

import contextvars
import enum
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

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


LOCAL_CALLER: Final = Caller(LOCAL_USER_ID)


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
        subject = claims["sub"]
        try:
            user_id = str(uuid.UUID(subject)) if isinstance(subject, str) else None
        except ValueError:
            user_id = None
        if user_id is None:
            raise errors.unauthenticated("TOKEN_INVALID", "the bearer token's sub must be a user id (a UUID)")
        return Caller(user_id, admin=claims.get("admin") is True)

    def authenticate(self, metadata: Any) -> Caller:
        """The caller named by the call's `authorization: Bearer <JWT>` header."""
        values = [value for key, value in metadata or () if key == "authorization"]
        if not values:
            raise errors.unauthenticated(
                "TOKEN_MISSING", "this call needs an 'authorization: Bearer <token>' header with a JWT"
            )
        if len(values) > 1:
            raise errors.unauthenticated("TOKEN_INVALID", "the call carries more than one authorization header")
        value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise errors.unauthenticated("TOKEN_INVALID", "the authorization header must be 'Bearer <token>'")
        if len(token) > MAX_TOKEN_BYTES:
            raise errors.unauthenticated("TOKEN_INVALID", f"the bearer token is longer than {MAX_TOKEN_BYTES} bytes")
        return self.verify(token.strip())


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


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates each call (None verifier: single-user local mode) and decodes its body safely.

    A call without a valid token is answered UNAUTHENTICATED before the servicer runs; otherwise the
    servicer reads the caller with `current_caller()`. Health and reflection are public. Whatever fails
    unexpectedly, here or in the servicer, is answered INTERNAL with a correlation id, never UNKNOWN.
    """

    def __init__(self, verifier: JwtVerifier | None) -> None:
        self._verifier = verifier

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(PUBLIC_METHOD_PREFIXES):
            return handler
        who: Caller | ServiceError = LOCAL_CALLER
        if self._verifier is not None:
            try:
                who = self._verifier.authenticate(handler_call_details.invocation_metadata)
            except ServiceError as refused:
                log.info("refused %s: %s", method, refused)
                who = refused
            except Exception as failure:
                who = errors.internal(method, failure)
        return _wrap(method, handler, who)


def _wrap(
    method: str, handler: grpc.RpcMethodHandler[Any, Any], who: Caller | ServiceError
) -> grpc.RpcMethodHandler[Any, Any]:
    async def admit(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if isinstance(who, ServiceError):
            await context.abort_with_status(who.to_status())
        if isinstance(request, _Undecodable):
            await context.abort_with_status(request.error().to_status())
        _caller.set(who)

    async def fail(failure: Exception, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        error = failure if isinstance(failure, ServiceError) else errors.internal(method, failure)
        await context.abort_with_status(error.to_status())

    deserializer = _safe(handler.request_deserializer)
    if handler.unary_unary is not None:
        unary: Any = handler.unary_unary

        async def unary_behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await admit(request, context)
            try:
                return await unary(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as failure:
                await fail(failure, context)

        return grpc.unary_unary_rpc_method_handler(unary_behavior, deserializer, handler.response_serializer)
    if handler.unary_stream is not None:
        streaming: Any = handler.unary_stream

        async def stream_behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await admit(request, context)
            try:
                async for item in streaming(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as failure:
                await fail(failure, context)

        return grpc.unary_stream_rpc_method_handler(stream_behavior, deserializer, handler.response_serializer)
    # The API has no client-streaming methods; refuse rather than serve one unauthenticated.
    raise NotImplementedError("client-streaming methods are not supported by the auth interceptor")


def tls_server_credentials(cert_file: str, key_file: str, client_ca_file: str | None = None) -> grpc.ServerCredentials:
    """TLS for the gRPC server; with a client CA, mutual TLS: a client must present a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(Path(key_file).read_bytes(), Path(cert_file).read_bytes())],
        root_certificates=Path(client_ca_file).read_bytes() if client_ca_file else None,
        require_client_auth=client_ca_file is not None,
    )
