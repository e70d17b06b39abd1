"""What a refused call says: its code, message, ErrorInfo (reason, domain, metadata) and every violated
field (the AIP-193 details the service sends in the call's trailing metadata)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class Violation:
    field: str
    description: str
    reason: str = ""


@dataclass(frozen=True)
class CallError:
    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)


def read_error(error: grpc.RpcError) -> CallError:
    """The details of a failed call (async or blocking)."""
    # grpc.aio.AioRpcError and the blocking client's grpc.Call both carry these; grpc.RpcError declares none.
    call: Any = error
    trailing = call.trailing_metadata() if hasattr(call, "trailing_metadata") else None
    status = status_pb2.Status()
    for key, value in trailing or ():
        if key == _DETAILS_KEY:
            status.ParseFromString(value if isinstance(value, bytes) else value.encode())
    info = error_details_pb2.ErrorInfo()
    bad = error_details_pb2.BadRequest()
    for detail in status.details:
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(bad.DESCRIPTOR):
            detail.Unpack(bad)
    code = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
    message = call.details() if hasattr(call, "details") else ""
    return CallError(
        code=code,
        message=message or "",
        reason=info.reason,
        domain=info.domain,
        metadata=dict(info.metadata),
        violations=[Violation(v.field, v.description, v.reason) for v in bad.field_violations],
    )


def error_reason(error: grpc.RpcError) -> str:
    """The ErrorInfo reason of a failed call (e.g. SHUTTING_DOWN, REVISION_TOO_OLD), or "" when none."""
    return read_error(error).reason
