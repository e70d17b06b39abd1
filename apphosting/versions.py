"""The Kubernetes versions a vCluster may run: which minors are offered, the default, and how to read one."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

__all__ = ["DEFAULT_KUBERNETES_VERSION", "DISTRO_TAGS", "KUBERNETES_VERSIONS", "parse"]

# vCluster's own Kubernetes distro images (ghcr.io/loft-sh/kubernetes), one pinned patch per supported
# minor: a request for "1.35" gets a known-good image, not whatever a floating tag points at today.
DISTRO_TAGS: Final[Mapping[str, str]] = {
    "1.33": "v1.33.4",
    "1.34": "v1.34.1",
    "1.35": "v1.35.0",
    "1.36": "v1.36.0",
}
KUBERNETES_VERSIONS: Final[tuple[str, ...]] = tuple(DISTRO_TAGS)
DEFAULT_KUBERNETES_VERSION: Final = "1.36"

_NUM = r"(?:0|[1-9][0-9]*)"
_VERSION = re.compile(rf"v?(1\.{_NUM})(\.{_NUM})?")


def parse(version: str) -> tuple[str, str | None] | None:
    """`1.N`, `v1.N`, `1.N.P` or `v1.N.P` → (`1.N`, `.P` or None); None when it is not one of those."""
    match = _VERSION.fullmatch(version)
    if match is None:
        return None
    return match.group(1), match.group(2)
