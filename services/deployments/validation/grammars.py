"""Grammars of the version and tag-filter fields: SemVer 2.0, Masterminds constraints, RE2, tag globs."""

from __future__ import annotations

import re

__all__ = ["SEMVER", "glob_brackets_closed", "re2_unsupported", "semver_constraint_ok"]

_NUM = r"(?:0|[1-9][0-9]*)"
_PRERELEASE_ID = r"(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
SEMVER = re.compile(
    rf"v?{_NUM}\.{_NUM}\.{_NUM}"
    rf"(?:-{_PRERELEASE_ID}(?:\.{_PRERELEASE_ID})*)?"
    r"(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?"
)

# Masterminds/semver (what Image Updater uses) constraints: versions may be partial or wildcards.
_CONSTRAINT_OP = r"(?:!=|>=|=>|<=|=<|~>|\^|=|>|<|~)"
_CONSTRAINT_VERSION = (
    r"v?(?:[0-9]+|[xX*])(?:\.(?:[0-9]+|[xX*])){0,2}"
    r"(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?"
)
_CONSTRAINT_TERM = re.compile(rf"{_CONSTRAINT_OP}?{_CONSTRAINT_VERSION}")
_CONSTRAINT_HYPHEN_RANGE = re.compile(rf"{_CONSTRAINT_VERSION}\s+-\s+{_CONSTRAINT_VERSION}")
# Image Updater compiles allow-tags with Go's RE2, which has neither lookaround nor backreferences.
_RE2_UNSUPPORTED = re.compile(r"\(\?<?[=!]|(?<!\\)(?:\\\\)*\\[1-9]")


def re2_unsupported(pattern: str) -> bool:
    """Whether a Python-valid pattern uses what RE2 lacks (lookaround, backreferences)."""
    return _RE2_UNSUPPORTED.search(pattern) is not None


def glob_brackets_closed(pattern: str) -> bool:
    depth_open = False
    escaped = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "[":
            depth_open = True
        elif char == "]":
            depth_open = False
    return not depth_open


def semver_constraint_ok(value: str) -> bool:
    """Whether `value` is a Masterminds/semver constraint such as ^1.2, '>=1.0 <2.0' or 1.x."""
    for alternative in value.split("||"):
        alternative = alternative.strip()
        if alternative == "":
            return False
        if _CONSTRAINT_HYPHEN_RANGE.fullmatch(alternative):
            continue
        # ">= 1.0" is one comparison: glue operators to their version before splitting on spaces.
        glued = re.sub(rf"({_CONSTRAINT_OP})\s+", r"\1", alternative)
        terms = re.split(r"\s*,\s*|\s+", glued)
        if not terms or not all(_CONSTRAINT_TERM.fullmatch(term) for term in terms):
            return False
    return True
