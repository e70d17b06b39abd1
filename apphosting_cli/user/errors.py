"""How the command line reports a refused call: the client's reading of it, and the exit code it gives."""

from __future__ import annotations

import grpc

from apphosting_client import CallError, Violation, read_error

__all__ = ["CallError", "Violation", "exit_code", "read_error"]


def exit_code(error: CallError) -> int:
    """2 for a request the user must change (INVALID_ARGUMENT), 1 for anything else."""
    return 2 if error.code == grpc.StatusCode.INVALID_ARGUMENT else 1
