"""Violations: what a broken rule reports, in the contract's field order, and pydantic's errors translated."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from pydantic_core import PydanticCustomError

__all__ = [
    "FIELD_ORDER",
    "VOLUME_FIELD_ORDER",
    "Loc",
    "SpecInvalid",
    "Violation",
    "fail",
    "from_pydantic",
    "in_field_order",
    "order",
    "path",
]

# The contract's field order: violations are reported in it so a client reads them top to bottom.
FIELD_ORDER: Final = (
    "geographic_region",
    "deployment_name",
    "app_type",
    "config",
    "cpu_request",
    "memory_request_mb",
    "replicas",
    "container_port",
    "environment_variables",
    "docker_image",
    "storage_size_gb",
    "volumes",
    "run_as_uid",
    "deployment_type",
    "helm_repo_url",
    "helm_chart_name",
    "helm_chart_version",
    "custom_values_yaml",
    "image_update_strategy",
    "image_update_constraint",
    "image_allow_tags",
    "image_ignore_tags",
    "kubernetes_version",
)
VOLUME_FIELD_ORDER: Final = ("path", "sizeGb", "purpose")

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Violation:
    """One broken rule: where (a field path), what is wrong and allowed, and a stable machine code."""

    field: str
    description: str
    reason: str


class SpecInvalid(Exception):
    """A create request broke one or more rules; `violations` holds all of them in request field order."""

    def __init__(self, violations: Collection[Violation]) -> None:
        self.violations: tuple[Violation, ...] = tuple(violations)
        super().__init__("; ".join(v.description for v in self.violations))


# Reasons are part of the API; pydantic's own error types are an implementation detail, so they are
# translated here and anything unforeseen falls back to a generic code instead of leaking through.
_PYDANTIC_REASONS: Final[Mapping[str, str]] = {
    "missing": "REQUIRED",
    "extra_forbidden": "UNKNOWN_FIELD",
    "finite_number": "INVALID_FORMAT",
}
_TYPE_NAMES: Final[Mapping[str, str]] = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "dict_type": "a JSON object",
    "list_type": "a list",
    "model_type": "an object with path, sizeGb and purpose",
    "model_attributes_type": "an object with path, sizeGb and purpose",
}


def fail(reason: str, message: str) -> PydanticCustomError:
    """The error a field rule raises: its type carries our reason verbatim; the path is added later."""
    # The message goes in as context, not as the template, so braces in user input are not placeholders.
    return PydanticCustomError(reason, "{detail}", {"detail": message})


def path(loc: Loc) -> str:
    """A location as the field path clients see: `volumes[0].path`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def order(loc: Loc) -> tuple[int, ...]:
    """Sort key of a location in the contract's field order."""
    key: list[int] = []
    for depth, part in enumerate(loc):
        if isinstance(part, int):
            key.append(part)
        else:
            fields = FIELD_ORDER if depth == 0 else VOLUME_FIELD_ORDER
            key.append(fields.index(part) if part in fields else len(fields))
    return tuple(key)


def from_pydantic(error: Mapping[str, Any]) -> tuple[Loc, str, str]:
    """One pydantic error as (location, reason, message)."""
    kind: str = error["type"]
    loc: Loc = tuple(error["loc"])
    if kind.isupper():
        return loc, kind, str(error["msg"])
    if kind in _TYPE_NAMES:
        return loc, "INVALID_TYPE", f"must be {_TYPE_NAMES[kind]}"
    reason = _PYDANTIC_REASONS.get(kind, "INVALID_VALUE")
    if reason == "REQUIRED":
        return loc, reason, "is required"
    if reason == "UNKNOWN_FIELD":
        known = VOLUME_FIELD_ORDER if len(loc) > 1 else FIELD_ORDER
        return loc, reason, f"is not a field of the request; the fields are {', '.join(known)}"
    message: str = error["msg"]
    return loc, reason, f"is invalid: {message[:1].lower()}{message[1:]}"


def in_field_order(violations: Sequence[Violation]) -> list[Violation]:
    """Violations sorted by their top-level field; stable, so entries of one field keep their order."""

    def top(violation: Violation) -> int:
        name = re.split(r"[.\[]", violation.field, maxsplit=1)[0]
        return FIELD_ORDER.index(name) if name in FIELD_ORDER else len(FIELD_ORDER)

    return sorted(violations, key=top)
