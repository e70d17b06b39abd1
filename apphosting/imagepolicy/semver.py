"""Semantic versions and constraints as the Masterminds semver library (v3) reads them."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import total_ordering

__all__ = ["Constraint", "ConstraintError", "Version", "parse_version"]

_UINT64_MAX = 2**64 - 1
# Go's \s is ASCII [\t\n\f\r ]; Python's str \s also takes \v and Unicode spaces.
_S = r"[\t\n\f\r ]"
_VERSION = re.compile(
    r"v?([0-9]+)(\.[0-9]+)?(\.[0-9]+)?"
    r"(-([0-9A-Za-z\-]+(\.[0-9A-Za-z\-]+)*))?"
    r"(\+([0-9A-Za-z\-]+(\.[0-9A-Za-z\-]+)*))?"
)
# The library's own constraint grammar, including its quirk that '|' is a "digit" of a segment.
_CV = (
    r"v?([0-9|xX*]+)(\.[0-9|xX*]+)?(\.[0-9|xX*]+)?"
    r"(-([0-9A-Za-z\-]+(\.[0-9A-Za-z\-]+)*))?"
    r"(\+([0-9A-Za-z\-]+(\.[0-9A-Za-z\-]+)*))?"
)
_CV_NOGROUP = re.sub(r"\((?!\?)", "(?:", _CV)
# Order matters: alternatives are tried left to right, as in the Go regexp.
_OPS = r"=||!=|>|<|>=|=>|<=|=<|~|~>|\^"
_CONSTRAINT = re.compile(rf"{_S}*({_OPS}){_S}*({_CV}){_S}*")
_FIND = re.compile(rf"(?:{_OPS}){_S}*{_CV_NOGROUP}")
# The library's range and validity patterns, written so that Python's backtracking cannot take more than
# linear time per start (Go's engine never backtracks). A version can neither start nor end with
# whitespace or ',' and its greedy reading is the only one a space, ',' or the end may follow, so it is
# matched atomically and the whitespace around it possessively; the runs of whitespace between terms,
# which the library's pattern may split in many ways, are read in one. The range search still starts at
# every position of a run, so a value of n characters costs up to n**2/2 steps of the engine's C loop:
# under a millisecond at the field's 1,024 characters, which is why longer values are not parsed.
_CV_ATOM = rf"(?>{_CV_NOGROUP})"
_RANGE = re.compile(rf"{_S}*+({_CV_ATOM}){_S}++-{_S}++({_CV_ATOM}){_S}*+")
_TERM = rf"(?:{_OPS}){_S}*+{_CV_ATOM}"
_VALID = re.compile(rf"{_S}*+{_TERM}(?:(?:{_S}++(?:,{_S}*+)?|,{_S}*+){_TERM})*+{_S}*+")
_ALNUM_HYPHEN = re.compile(r"[0-9A-Za-z-]*")


class ConstraintError(ValueError):
    """A constraint the Masterminds library would refuse to parse."""


def _prerelease_part_key(part: str) -> tuple[int, int, str]:
    # Numbers sort below words; a "number" too big for uint64 is compared as a word, as in Go.
    if part.isascii() and part.isdigit() and int(part) <= _UINT64_MAX:
        return (0, int(part), "")
    return (1, 0, part)


@total_ordering
@dataclass(frozen=True, slots=True, eq=False)
class Version:
    """A version as NewVersion coerces it: optional 'v', missing minor or patch read as 0."""

    major: int
    minor: int
    patch: int
    prerelease: str = ""
    metadata: str = ""
    original: str = field(default="", compare=False)
    _key: tuple[object, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Build metadata never counts; a release sorts above its pre-releases.
        pre: tuple[object, ...] = (
            (1,) if self.prerelease == "" else (0, tuple(_prerelease_part_key(p) for p in self.prerelease.split(".")))
        )
        object.__setattr__(self, "_key", (self.major, self.minor, self.patch, pre))

    @property
    def key(self) -> tuple[object, ...]:
        """A sort key with Masterminds precedence (Compare)."""
        return self._key

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __lt__(self, other: Version) -> bool:
        return self._key < other._key

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            text += f"-{self.prerelease}"
        if self.metadata:
            text += f"+{self.metadata}"
        return text


def parse_version(text: str) -> Version | None:
    """NewVersion (non-strict): the version, or None where Masterminds returns an error."""
    m = _VERSION.fullmatch(text)
    if m is None:
        return None
    major = int(m.group(1))
    minor = int(m.group(2)[1:]) if m.group(2) else 0
    patch = int(m.group(3)[1:]) if m.group(3) else 0
    if max(major, minor, patch) > _UINT64_MAX:
        return None
    pre = m.group(5) or ""
    for part in pre.split(".") if pre else ():
        if part.isdigit() and len(part) > 1 and part[0] == "0":
            return None
    return Version(major, minor, patch, pre, m.group(8) or "", text)


def _is_x(segment: str) -> bool:
    return segment in ("x", "X", "*")


@dataclass(frozen=True, slots=True)
class _Term:
    op: str
    con: Version
    dirty: bool
    minor_dirty: bool
    patch_dirty: bool

    def check(self, v: Version, include_pre: bool) -> bool:
        if v.prerelease and not include_pre:
            return False
        return _OP_FUNCS[self.op](v, self)


def _tilde(v: Version, c: _Term) -> bool:
    if v < c.con:
        return False
    con = c.con
    if con.major == 0 and con.minor == 0 and con.patch == 0 and not c.minor_dirty and not c.patch_dirty:
        return True
    if v.major != con.major:
        return False
    return not (v.minor != con.minor and not c.minor_dirty)


def _tilde_or_equal(v: Version, c: _Term) -> bool:
    return _tilde(v, c) if c.dirty else v == c.con


def _not_equal(v: Version, c: _Term) -> bool:
    con = c.con
    if c.dirty:
        if con.major != v.major:
            return True
        if con.minor != v.minor and not c.minor_dirty:
            return True
        if c.minor_dirty:
            return False
        if con.patch != v.patch and not c.patch_dirty:
            return True
        if c.patch_dirty:
            if v.prerelease or con.prerelease:
                return Version(0, 0, 0, v.prerelease) != Version(0, 0, 0, con.prerelease)
            return False
    return v != con


def _greater(v: Version, c: _Term) -> bool:
    con = c.con
    if not c.dirty:
        return v > con
    if v.major != con.major:
        return v.major > con.major
    if c.minor_dirty:
        return False
    if c.patch_dirty:
        return v.minor > con.minor
    return v > con


def _less(v: Version, c: _Term) -> bool:
    return v < c.con


def _greater_equal(v: Version, c: _Term) -> bool:
    return v >= c.con


def _less_equal(v: Version, c: _Term) -> bool:
    con = c.con
    if not c.dirty:
        return v <= con
    if v.major > con.major:
        return False
    return not (v.major == con.major and v.minor > con.minor and not c.minor_dirty)


def _caret(v: Version, c: _Term) -> bool:
    con = c.con
    if v < con:
        return False
    if con.major > 0 or c.minor_dirty:
        return v.major == con.major
    if v.major > 0:
        return False
    if con.minor > 0 or c.patch_dirty:
        return v.minor == con.minor
    if v.minor > 0:
        return False
    return v.patch == con.patch


_OP_FUNCS: dict[str, Callable[[Version, _Term], bool]] = {
    "": _tilde_or_equal,
    "=": _tilde_or_equal,
    "!=": _not_equal,
    ">": _greater,
    "<": _less,
    ">=": _greater_equal,
    "=>": _greater_equal,
    "<=": _less_equal,
    "=<": _less_equal,
    "~": _tilde,
    "~>": _tilde,
    "^": _caret,
}


def _parse_term(text: str) -> _Term:
    m = _CONSTRAINT.fullmatch(text)
    if m is None:
        raise ConstraintError(f"improper constraint: {text}")
    op, ver = m.group(1), m.group(2)
    major, minor, patch, pre = m.group(3), m.group(4) or "", m.group(5) or "", m.group(6) or ""
    dirty = minor_dirty = patch_dirty = False
    if _is_x(major):
        ver, dirty = f"0.0.0{pre}", True
    elif _is_x(minor[1:]) or minor == "":
        ver, dirty, minor_dirty = f"{major}.0.0{pre}", True, True
    elif _is_x(patch[1:]) or patch == "":
        ver, dirty, patch_dirty = f"{major}{minor}.0{pre}", True, True
    con = parse_version(ver)
    if con is None:
        raise ConstraintError(f"improper constraint: {text}")
    return _Term(op, con, dirty, minor_dirty, patch_dirty)


def _rewrite_ranges(text: str) -> str:
    out = text
    for m in _RANGE.finditer(text):
        out = out.replace(m.group(0), f">= {m.group(1)}, <= {m.group(2)} ", 1)
    return out


@dataclass(frozen=True, slots=True)
class Constraint:
    """A parsed constraint: OR groups of AND terms, checked as Masterminds Constraints.Check does."""

    text: str
    _groups: tuple[tuple[tuple[_Term, ...], bool], ...] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, text: str) -> Constraint:
        """NewConstraint: raises ConstraintError where the Go library returns an error."""
        groups: list[tuple[tuple[_Term, ...], bool]] = []
        for alternative in _rewrite_ranges(text).split("||"):
            if _VALID.fullmatch(alternative) is None:
                raise ConstraintError(f"improper constraint: {alternative}")
            terms = tuple(_parse_term(found) for found in _FIND.findall(alternative))
            # A pre-release in any term lets pre-releases into its whole AND group.
            groups.append((terms, any(t.con.prerelease for t in terms)))
        return cls(text, tuple(groups))

    @property
    def names_prerelease(self) -> bool:
        """Whether some OR group names a pre-release, so that pre-releases may match at all."""
        return any(include for _, include in self._groups)

    def check(self, version: Version) -> bool:
        """Whether `version` satisfies some OR group (all of its AND terms)."""
        return any(all(t.check(version, include_pre) for t in terms) for terms, include_pre in self._groups)
