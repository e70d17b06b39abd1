"""Reads the rich error details (ErrorInfo, BadRequest) out of a failed gRPC call."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import grpc

from apphosting_client import read_error

_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class Details:
    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    metadata: dict[str, str]
    violations: dict[str, tuple[str, str]]  # field -> (reason, description)


def details_of(error: grpc.aio.AioRpcError) -> Details:
    read = read_error(error)
    return Details(
        code=read.code,
        message=read.message,
        reason=read.reason,
        domain=read.domain,
        metadata=read.metadata,
        violations={v.field: (v.reason, v.description) for v in read.violations},
    )


def _percent_encoded_bytes(text: str) -> int:
    # grpc-message keeps printable ASCII but '%' and writes every other byte as %XX.
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in text.encode())


def metadata_wire_bytes(error: grpc.aio.AioRpcError) -> int:
    """What an error's trailers count against a client's metadata limit: names, values as sent (base64 for
    -bin, percent-encoded grpc-message) and HTTP/2's 32 bytes per entry."""
    entries = [(key, value) for key, value in error.trailing_metadata() or ()]
    entries.append(("grpc-message", error.details() or ""))
    total = 0
    for key, value in entries:
        if key.endswith("-bin"):
            size = len(base64.b64encode(value if isinstance(value, bytes) else value.encode()))
        elif key == "grpc-message":
            size = _percent_encoded_bytes(value if isinstance(value, str) else value.decode())
        else:
            size = len(value)
        total += len(key) + size + 32
    return total
