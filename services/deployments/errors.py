"""Errors of the deployment service and their gRPC form: a canonical code, ErrorInfo and BadRequest (AIP-193)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from apphosting import registry

DOMAIN = "apphosting.v1.DeploymentService"

log = logging.getLogger(__name__)

# A default gRPC client refuses more than 8 KiB of response metadata, and an error travels there: its
# message percent-encoded (up to 3 bytes a byte) in grpc-message, its details base64-encoded (4 bytes
# per 3) in grpc-status-details-bin. These bounds keep both together near 6 KiB whatever is echoed.
MESSAGE_MAX_BYTES: Final = 400
# What a database that is down or overloaded raises (OperationalError is a DBAPIError): the caller is told
# UNAVAILABLE, to retry.
DATABASE_FAILURES: Final = (DBAPIError, PoolTimeout, OSError)
DETAILS_MAX_BYTES: Final = 3_400
DESCRIPTION_MAX_BYTES: Final = 400
FIELD_MAX_BYTES: Final = 200
METADATA_MAX_ENTRIES: Final = 8
METADATA_KEY_MAX_BYTES: Final = 64
METADATA_VALUE_MAX_BYTES: Final = 200
# The fields named in an INVALID_ARGUMENT message; BadRequest lists as many violations as fit.
MESSAGE_MAX_FIELDS: Final = 8


def clip(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` of UTF-8, with an ellipsis when cut; for anything a client sent."""
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= max_bytes:
        return text
    return encoded[: max(0, max_bytes - 3)].decode("utf-8", "ignore") + "…"


def echo(value: str, max_chars: int = 64) -> str:
    """A client's value quoted for an error description, shortened so an error stays small."""
    if len(value) <= max_chars:
        return repr(value)
    return f"{value[:max_chars]!r}… ({len(value)} characters)"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field: the gRPC form of one entry of the contract's HTTPValidationError (loc, msg, type)."""

    field: str
    description: str
    reason: str


@dataclass
class ServiceError(Exception):
    """A failure the caller is told about, with a canonical code and a stable reason."""

    code: grpc.StatusCode
    reason: str
    message: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    violations: tuple[FieldViolation, ...] = ()

    def __str__(self) -> str:
        return clip(self.message, MESSAGE_MAX_BYTES)

    def to_status(self) -> grpc.Status:
        """The wire form, bounded so a default client can read it whatever a handler put in."""
        metadata = {
            clip(key, METADATA_KEY_MAX_BYTES): clip(value, METADATA_VALUE_MAX_BYTES)
            for key, value in list(self.metadata.items())[:METADATA_MAX_ENTRIES]
        }
        info = error_details_pb2.ErrorInfo(
            reason=clip(self.reason, METADATA_KEY_MAX_BYTES), domain=DOMAIN, metadata=metadata
        )
        status = status_pb2.Status(code=self.code.value[0], message=clip(self.message, MESSAGE_MAX_BYTES))
        # Room is kept for the metadata entry that says how many violations were left out.
        room = DETAILS_MAX_BYTES - status.ByteSize() - info.ByteSize() - 64
        listed = error_details_pb2.BadRequest()
        for violation in self.violations:
            listed.field_violations.add(
                field=clip(violation.field, FIELD_MAX_BYTES),
                description=clip(violation.description, DESCRIPTION_MAX_BYTES),
                reason=clip(violation.reason, METADATA_KEY_MAX_BYTES),
            )
            if listed.ByteSize() > room:
                del listed.field_violations[-1]
                break
        omitted = len(self.violations) - len(listed.field_violations)
        if omitted:
            info.metadata["violations_not_listed"] = str(omitted)
        status.details.append(_pack(info))
        if listed.field_violations:
            status.details.append(_pack(listed))
        return rpc_status.to_status(status)


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def invalid_argument(violations: Iterable[FieldViolation]) -> ServiceError:
    found = tuple(violations)
    names = list(dict.fromkeys(clip(v.field, 60) for v in found))
    fields = ", ".join(names[:MESSAGE_MAX_FIELDS])
    if len(names) > MESSAGE_MAX_FIELDS:
        fields += f" and {len(names) - MESSAGE_MAX_FIELDS} more"
    noun = "field" if len(found) == 1 else "fields"
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST",
        f"the request has {len(found)} invalid {noun}: {fields}",
        violations=found,
    )


def invalid_field(field_path: str, description: str, reason: str = "INVALID_FORMAT") -> ServiceError:
    return invalid_argument([FieldViolation(field_path, description, reason)])


def not_found(deployment_id: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        "DEPLOYMENT_NOT_FOUND",
        f"deployment {deployment_id} does not exist",
        metadata={"id": deployment_id},
    )


def name_taken(name: str, existing_id: str | None) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.ALREADY_EXISTS,
        "DEPLOYMENT_NAME_TAKEN",
        f"deployment_name {name!r} is already used by one of your live deployments",
        metadata={"deployment_name": name, **({"id": existing_id} if existing_id else {})},
    )


def unavailable(what: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE", f"{what} is unavailable; retry")


def unauthenticated(reason: str, message: str) -> ServiceError:
    """No usable credentials: reason TOKEN_MISSING, TOKEN_INVALID, TOKEN_EXPIRED or TOKEN_REVOKED."""
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, reason, message)


def read_only_key(prefix: str, method: str) -> ServiceError:
    """A read-only API key called a method that changes something."""
    return ServiceError(
        grpc.StatusCode.PERMISSION_DENIED,
        "API_KEY_READ_ONLY",
        f"API key {prefix} is read-only (scope: get, list and watch); {method} needs a key that is not read-only",
        metadata={"prefix": prefix, "scope": "read-only", "method": method},
    )


def keys_by_key(method: str) -> ServiceError:
    """An API key tried to make or revoke keys: only a token session may."""
    return ServiceError(
        grpc.StatusCode.PERMISSION_DENIED,
        "API_KEY_NOT_ALLOWED",
        f"{method} is refused to calls made with an API key; sign in with a token to manage API keys",
        metadata={"method": method},
    )


def api_key_not_found(key_id: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.NOT_FOUND, "API_KEY_NOT_FOUND", f"API key {key_id} does not exist", metadata={"id": key_id}
    )


def api_key_limit(limit: int) -> ServiceError:
    """The caller already has as many live keys as a user may."""
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "API_KEY_LIMIT",
        f"quota api_keys exceeded: a user may hold {limit} live API keys; revoke one first",
        metadata={"quota": "api_keys", "limit": str(limit)},
    )


def quota_exceeded(quota: str, unit: str, limit: float, used: float, requested: float) -> ServiceError:
    """A per-user quota would be exceeded; ErrorInfo names the quota, its limit and the current use."""

    def number(value: float) -> str:
        return f"{value:g}"

    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "QUOTA_EXCEEDED",
        f"quota {quota} exceeded: limit {number(limit)}{unit}, in use {number(used)}{unit}, "
        f"this deployment needs {number(requested)}{unit}; delete deployments or ask for a higher quota",
        metadata={"quota": quota, "limit": number(limit), "used": number(used), "requested": number(requested)},
    )


def malformed_request(detail: str, violation: FieldViolation | None = None) -> ServiceError:
    """The request body is not a valid protobuf message of the method's request type; `violation` names
    the field when the decoder's failure can be pinned to one."""
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "MALFORMED_REQUEST",
        f"the request body cannot be decoded as the method's request message ({clip(detail, 200)})",
        violations=(violation,) if violation else (),
    )


def internal(method: str, failure: BaseException) -> ServiceError:
    """An unexpected failure: logged with its traceback under a new correlation id, which the answer carries
    instead of any detail of the failure."""
    correlation_id = uuid.uuid4().hex
    log.error("internal error in %s, correlation_id=%s", method, correlation_id, exc_info=failure)
    return ServiceError(
        grpc.StatusCode.INTERNAL,
        "INTERNAL_ERROR",
        f"internal error; report correlation_id {correlation_id} to the operator",
        metadata={"correlation_id": correlation_id},
    )


def image_policy_unusable(field_path: str, detail: str) -> ServiceError:
    """A stored image update field the updater cannot apply (or that is missing), named."""
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "IMAGE_POLICY_UNUSABLE",
        f"{field_path}: {detail}",
        metadata={"field": field_path},
    )


def registry_failure(docker_image: str, failure: Exception, retry_after: float | None = None) -> ServiceError:
    """A registry's answer to an image update preview: the repository or its answers are wrong
    (FAILED_PRECONDITION naming docker_image), or the registry cannot be asked now (UNAVAILABLE, with
    retry_after_seconds: `retry_after` when given, else what the registry asked for)."""
    detail = clip(str(failure), 240)
    if isinstance(failure, registry.NotFound):
        return ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "IMAGE_REPOSITORY_NOT_FOUND",
            f"docker_image {echo(docker_image)}: the registry has no such repository ({detail})",
            metadata={"field": "docker_image"},
        )
    if isinstance(failure, registry.AddressRefused):
        return ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "REGISTRY_ADDRESS_REFUSED",
            f"docker_image {echo(docker_image)}: its registry is an internal address, which is not asked ({detail})",
            metadata={"field": "docker_image"},
        )
    if isinstance(failure, registry.MalformedResponse):
        return ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "REGISTRY_MALFORMED_RESPONSE",
            f"docker_image {echo(docker_image)}: the registry answered what the distribution API does not allow "
            f"({detail})",
            metadata={"field": "docker_image"},
        )
    if retry_after is None and isinstance(failure, registry.RateLimited | registry.RegistryUnavailable):
        retry_after = failure.retry_after
    reasons = {
        registry.Unauthorized: ("REGISTRY_AUTH_REFUSED", "refused us (check its credentials)"),
        registry.RateLimited: ("REGISTRY_RATE_LIMITED", "asks us to slow down"),
        registry.RegistryUnavailable: ("REGISTRY_UNAVAILABLE", "is unavailable"),
    }
    reason, said = next(
        (found for kind, found in reasons.items() if isinstance(failure, kind)),
        ("REGISTRY_UNAVAILABLE", "cannot be asked now"),
    )
    metadata = {"field": "docker_image"}
    when = ""
    if retry_after is not None:
        metadata["retry_after_seconds"] = str(max(1, round(retry_after)))
        when = f" in {metadata['retry_after_seconds']} s"
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        reason,
        f"the registry of docker_image {echo(docker_image)} {said} ({detail}); retry{when}",
        metadata=metadata,
    )


def secret_unopenable(name: str, why: str) -> ServiceError:
    """A stored secret value that the API's key file cannot open (a key removed before its values were rewrapped)."""
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "SECRET_KEY_MISSING",
        f"secret value {name} cannot be opened with the configured key file: {why}",
        metadata={"name": name},
    )
