"""The status lifecycle of a deployment: which changes are allowed."""

from __future__ import annotations

# From each status, the statuses a reported event may move a deployment to. A status may always
# repeat itself (a new phase of the same status). failed and error wait for a retry or a delete.
_NEXT: dict[str, frozenset[str]] = {
    "pending": frozenset({"provisioning", "failed", "error", "deleting"}),
    "provisioning": frozenset({"running", "failed", "error", "deleting"}),
    "running": frozenset({"promoting", "stopped", "migrating", "failed", "error", "deleting"}),
    "promoting": frozenset({"running", "failed", "error", "deleting"}),
    "migrating": frozenset({"running", "failed", "error", "deleting"}),
    "stopped": frozenset({"provisioning", "running", "deleting"}),
    "failed": frozenset({"pending", "deleting"}),
    "error": frozenset({"pending", "deleting"}),
    "deleting": frozenset({"error"}),
}
STATUSES = frozenset(_NEXT)
# The way a deployment moves forward; an event further along it than the next step arrived early.
_FORWARD = ("pending", "provisioning", "running")
TERMINAL = frozenset({"failed", "error"})


def allowed(current: str, new: str) -> bool:
    return new == current or new in _NEXT[current]


def early(current: str, new: str) -> bool:
    """True when `new` lies ahead on the way forward: the events in between have not arrived yet."""
    return current in _FORWARD and new in _FORWARD and _FORWARD.index(new) > _FORWARD.index(current) + 1
