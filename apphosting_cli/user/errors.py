"""What a refused gRPC call says: its code, message, reason and every violated field (AIP-193 details)."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    violations: list[Violation] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """2 for a request the user must change (INVALID_ARGUMENT), 1 for anything else."""
        return 2 if self.code == grpc.StatusCode.INVALID_ARGUMENT else 1


def read_error(error: grpc.aio.AioRpcError) -> CallError:
    """The ErrorInfo reason and the BadRequest field violations out of the call's trailing metadata."""
    status = status_pb2.Status()
    for key, value in error.trailing_metadata() or ():
        if key == _DETAILS_KEY:
            status.ParseFromString(value if isinstance(value, bytes) else value.encode())
    info = error_details_pb2.ErrorInfo()
    bad = error_details_pb2.BadRequest()
    for detail in status.details:
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(bad.DESCRIPTOR):
            detail.Unpack(bad)
    return CallError(
        code=error.code(),
        message=error.details() or "",
        reason=info.reason,
        violations=[Violation(v.field, v.description, v.reason) for v in bad.field_violations],
    )
