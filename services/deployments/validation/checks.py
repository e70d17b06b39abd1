"""Small checks the field rules share, and the limits and regions a validation runs with."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

from pydantic import ValidationInfo

from apphosting.settings import Limits
from services.deployments.validation.violations import fail

__all__ = [
    "SPACE_OR_CONTROL",
    "context",
    "control_char",
    "limits_of",
    "max_chars",
    "no_control_chars",
    "no_outer_whitespace",
    "not_empty",
    "one_of",
    "shown",
    "within",
]

# How much of a value a message repeats: enough to recognise it, never so much that the error
# outgrows gRPC's metadata limits and reaches the client as RESOURCE_EXHAUSTED instead.
SHOWN_CHARS = 64


def context(info: ValidationInfo) -> Mapping[str, Any]:
    """The validation context (limits, regions), or nothing."""
    return info.context if isinstance(info.context, Mapping) else {}


def limits_of(info: ValidationInfo) -> Limits:
    """The bounds this validation runs with."""
    found = context(info).get("limits")
    # Without a context (a stored spec read back) the default bounds apply.
    return found if isinstance(found, Limits) else Limits()


def shown(value: str) -> str:
    """A value as a message quotes it: its repr, cut to a short prefix."""
    if len(value) <= SHOWN_CHARS:
        return repr(value)
    return f"{value[:SHOWN_CHARS]!r}... ({len(value)} characters)"


# The control characters (C0 and DEL); one search of a value instead of a test per character.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# Those and whitespace (`\s` is str.isspace's set).
SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")


def control_char(value: str, allowed: str = "") -> str | None:
    """The first control character of a value that `allowed` does not hold, or None."""
    return next((found.group() for found in _CONTROL_CHARS.finditer(value) if found.group() not in allowed), None)


def no_control_chars(value: str, allowed: str = "") -> str:
    if control_char(value, allowed) is not None:
        raise fail("INVALID_FORMAT", "must not contain control characters")
    return value


def no_outer_whitespace(value: str) -> str:
    if value != value.strip():
        raise fail("INVALID_FORMAT", "must not have leading or trailing whitespace (it is not stripped)")
    return value


def not_empty(value: str) -> str:
    if value == "":
        raise fail("INVALID_FORMAT", "must not be empty; leave the field unset instead")
    return value


def max_chars(value: str, maximum: int) -> str:
    if len(value) > maximum:
        raise fail("TOO_LONG", f"must be at most {maximum} characters, got {len(value)}")
    return value


def within(value: float, low: float, high: float, unit: str = "") -> None:
    if not low <= value <= high:
        raise fail("OUT_OF_RANGE", f"must be between {low} and {high}{unit}, got {value}")


def one_of(value: str, allowed: Collection[str], reason: str = "UNSUPPORTED") -> str:
    if value not in allowed:
        raise fail(reason, f"must be one of {', '.join(allowed)}; got {shown(value)}")
    return value
