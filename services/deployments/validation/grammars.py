"""The grammar of chart versions: SemVer 2.0 (image update policies are read by apphosting.imagepolicy)."""

from __future__ import annotations

import re

__all__ = ["SEMVER"]

_NUM = r"(?:0|[1-9][0-9]*)"
_PRERELEASE_ID = r"(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
SEMVER = re.compile(
    rf"v?{_NUM}\.{_NUM}\.{_NUM}"
    rf"(?:-{_PRERELEASE_ID}(?:\.{_PRERELEASE_ID})*)?"
    r"(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?"
)
