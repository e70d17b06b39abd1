"""Container image references: distribution/reference's grammar, the registry a reference pulls from."""

from __future__ import annotations

import re
from typing import Final

__all__ = ["DEFAULT_REGISTRY", "NAME_MAX", "TAG", "problem", "registry", "split"]

# distribution/reference: an image name without a registry part is on Docker Hub.
DEFAULT_REGISTRY: Final = "docker.io"
# distribution/reference's NameTotalLengthMax.
NAME_MAX: Final = 255

# distribution/reference's grammar, spelled out with ASCII classes (Go's \w is ASCII-only).
_DOMAIN_COMPONENT = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
TAG: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")


def registry(reference: str) -> str:
    """The registry host[:port] an image reference pulls from (docker.io when it names none)."""
    first, slash, _ = reference.partition("/")
    # distribution/reference: the first component is a registry when it looks like a host.
    if slash and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        return first
    return DEFAULT_REGISTRY


def split(reference: str) -> tuple[str, str | None, str | None]:
    """`name[:tag][@digest]` → (name, tag or None, digest or None); a registry port is not a tag."""
    rest, at, digest = reference.partition("@")
    # A ':' after the last '/' starts a tag; one before it belongs to a registry port.
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        return rest[:colon], rest[colon + 1 :], digest if at else None
    return rest, None, digest if at else None


def problem(reference: str) -> tuple[str, str] | None:
    """What is wrong with an image reference (reason, message), or None when it is valid."""
    allowed = (
        "must be an image reference like nginx:1.27, ghcr.io/acme/web:v1.2.3 or "
        "registry.example.com:5000/team/app@sha256:<64 hex>; "
    )
    name, tag, digest = split(reference)
    if digest is not None and not _DIGEST.fullmatch(digest):
        return "INVALID_FORMAT", allowed + f"the digest {digest[:80]!r} is not sha256:<64 lowercase hex>"
    if tag is not None and not TAG.fullmatch(tag):
        return "INVALID_FORMAT", allowed + f"the tag {tag[:140]!r} is not [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}"
    if len(name) > NAME_MAX:
        return "TOO_LONG", allowed + f"the name must be at most {NAME_MAX} characters, got {len(name)}"
    if not _NAME.fullmatch(name):
        return "INVALID_FORMAT", allowed + (
            f"{name[:80]!r} is not a valid name (lowercase path components separated by '/', "
            "joined by '.', '_', '__' or '-', after an optional registry host[:port])"
        )
    return None
