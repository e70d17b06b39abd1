"""Errors of the deployment service and their gRPC form: a canonical code, ErrorInfo and BadRequest (AIP-193)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "apphosting.v1.DeploymentService"


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
        return self.message

    def to_status(self) -> grpc.Status:
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=dict(self.metadata))
        details = [_pack(info)]
        if self.violations:
            bad_request = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description, reason=v.reason
                    )
                    for v in self.violations
                ]
            )
            details.append(_pack(bad_request))
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=details)
        return rpc_status.to_status(status)


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def invalid_argument(violations: Iterable[FieldViolation]) -> ServiceError:
    found = tuple(violations)
    fields = ", ".join(dict.fromkeys(v.field for v in found))
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
    """No usable credentials: reason TOKEN_MISSING, TOKEN_INVALID or TOKEN_EXPIRED."""
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, reason, message)


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


def malformed_request(detail: str) -> ServiceError:
    """The request body is not a valid protobuf message of the method's request type."""
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "MALFORMED_REQUEST",
        f"the request body cannot be decoded as the method's request message ({detail[:200]})",
    )
