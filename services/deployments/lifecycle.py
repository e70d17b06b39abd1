"""The status lifecycle of a deployment: which changes are allowed, and which operations from where."""

from __future__ import annotations

# From each status, the statuses a reported event may move a deployment to. A status may always
# repeat itself (a new phase of the same status). failed and error wait for a retry, an update
# (recorded, rolled out by the retry) or a delete.
_NEXT: dict[str, frozenset[str]] = {
    "pending": frozenset({"provisioning", "failed", "error", "deleting"}),
    "provisioning": frozenset({"running", "failed", "error", "deleting"}),
    "running": frozenset({"promoting", "stopped", "migrating", "failed", "error", "deleting"}),
    "promoting": frozenset({"running", "failed", "error", "deleting"}),
    "migrating": frozenset({"running", "failed", "error", "deleting"}),
    "stopped": frozenset({"provisioning", "running", "failed", "error", "deleting"}),
    "failed": frozenset({"pending", "deleting"}),
    "error": frozenset({"pending", "deleting"}),
    "deleting": frozenset({"error"}),
}
STATUSES = frozenset(_NEXT)
# The way a deployment moves forward; an event further along it than the next step arrived early.
_FORWARD = ("pending", "provisioning", "running")
TERMINAL = frozenset({"failed", "error"})

# The operations an owner may ask for, and the statuses each is allowed from. An update (and its
# short forms) of a stopped, failed or error deployment is recorded as a release and rolled out by
# the next start or retry. docs/api.md shows this table.
OPERATIONS: dict[str, frozenset[str]] = {
    "update": frozenset({"running", "stopped", "failed", "error"}),
    "scale": frozenset({"running", "stopped", "failed", "error"}),
    "rollback": frozenset({"running", "stopped", "failed", "error"}),
    "stop": frozenset({"running"}),
    "start": frozenset({"stopped"}),
    "promote": frozenset({"running"}),
    "retry": frozenset({"failed", "error"}),
    "delete": frozenset(STATUSES),
}
# What an adopted deployment allows: it is managed in place, so nothing that would rebuild it.
ADOPTED_OPERATIONS = frozenset({"delete", "retry"})


# Moves that only the operation named may make: a stop job's late progress report (running) must not
# wake a deployment that its last report stopped, nor a start's late one put it back to sleep.
_GUARDED: dict[tuple[str, str], str] = {
    ("stopped", "running"): "start",
    ("stopped", "provisioning"): "start",
    ("running", "stopped"): "stop",
}


def allowed(current: str, new: str, operation: str | None = None) -> bool:
    """Whether a change may move a deployment from `current` to `new` while `operation` is in flight."""
    if new == current:
        return True
    guard = _GUARDED.get((current, new))
    return new in _NEXT[current] and (guard is None or guard == operation)


def early(current: str, new: str) -> bool:
    """True when `new` lies ahead on the way forward: the events in between have not arrived yet."""
    return current in _FORWARD and new in _FORWARD and _FORWARD.index(new) > _FORWARD.index(current) + 1


def operation_allowed(operation: str, status: str, *, adopted: bool = False) -> bool:
    """Whether the owner may ask for `operation` while the deployment has `status`."""
    if adopted and operation not in ADOPTED_OPERATIONS:
        return False
    return status in OPERATIONS[operation]
