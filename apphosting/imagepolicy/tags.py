"""Tag filters as Argo CD Image Updater applies them: RE2 allow-tags and filepath.Match ignore-tags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import re2

__all__ = [
    "AllowTags",
    "IgnoreTags",
    "Pattern",
    "PolicyError",
    "compile_re2",
    "glob_to_regex",
    "parse_allow_tags",
    "parse_ignore_tags",
]


class PolicyError(ValueError):
    """An image update policy field that cannot be applied as the Go updater would."""


# A pattern RE2 refuses is answered with PolicyError; RE2 would also write each refusal to stderr.
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


class Pattern(Protocol):
    """A compiled RE2 pattern, as far as tag filters use one."""

    def search(self, text: str) -> object | None: ...

    def fullmatch(self, text: str) -> object | None: ...


def compile_re2(pattern: str) -> Pattern:
    """Compile a Go regexp (RE2 syntax) with RE2 itself: it accepts and refuses what Go's regexp
    does, finds the same matches, and takes time linear in the tag whatever the pattern.

    Raises PolicyError with RE2's reason where Go's regexp.Compile would return an error.
    """
    try:
        compiled: Pattern = re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise PolicyError(f"regexp {pattern!r} does not compile: {reason}") from None
    return compiled


def _class_literal(ch: str) -> str:
    # Escape everything that is not alphanumeric, in RE2's \x{...} form.
    return ch if ch.isascii() and ch.isalnum() else f"\\x{{{ord(ch):x}}}"


@dataclass(frozen=True, slots=True)
class AllowTags:
    """image_allow_tags: 'any' or 'regexp:<re>', searched anywhere in the tag."""

    text: str
    _regex: Pattern | None = field(repr=False, compare=False)

    def allows(self, tag: str) -> bool:
        return self._regex is None or self._regex.search(tag) is not None


def parse_allow_tags(value: str | None) -> AllowTags:
    """Parse image_allow_tags; None or empty means 'any'."""
    if value is None or value == "" or value == "any":
        return AllowTags("any", None)
    if value.startswith("regexp:"):
        return AllowTags(value, compile_re2(value.removeprefix("regexp:")))
    raise PolicyError(f"allow-tags must be 'any' or 'regexp:<pattern>', got {value!r}")


def _glob_char(pattern: str, i: int) -> tuple[str, int]:
    """One class member of a filepath.Match class, honouring '\\' escapes."""
    if i >= len(pattern) or pattern[i] in "-]":
        raise PolicyError(f"glob {pattern!r} is malformed (bad character class)")
    if pattern[i] == "\\":
        i += 1
        if i >= len(pattern):
            raise PolicyError(f"glob {pattern!r} is malformed (trailing backslash)")
    return pattern[i], i + 1


def glob_to_regex(pattern: str) -> str:
    """The RE2 pattern (for fullmatch) equal to Go's filepath.Match on Unix.

    '*' and '?' never match '/'; '[^...]' negates and '!' is a literal; '\\' escapes; there is no '**'.
    Raises PolicyError where Go returns ErrBadPattern.
    """
    out: list[str] = []
    i = 0
    n = len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            while i < n and pattern[i] == "*":
                i += 1
            out.append("[^/]*")
            continue
        if c == "?":
            out.append("[^/]")
            i += 1
        elif c == "\\":
            if i + 1 >= n:
                raise PolicyError(f"glob {pattern!r} is malformed (trailing backslash)")
            out.append(_class_literal(pattern[i + 1]))
            i += 2
        elif c == "[":
            i += 1
            negated = i < n and pattern[i] == "^"
            if negated:
                i += 1
            ranges: list[str] = []
            count = 0
            while True:
                if i < n and pattern[i] == "]" and count > 0:
                    i += 1
                    break
                lo, i = _glob_char(pattern, i)
                hi = lo
                if i < n and pattern[i] == "-":
                    hi, i = _glob_char(pattern, i + 1)
                count += 1
                # Go accepts a reversed range, which then matches nothing.
                if lo <= hi:
                    ranges.append(f"{_class_literal(lo)}-{_class_literal(hi)}")
            if ranges:
                out.append(("[^" if negated else "[") + "".join(ranges) + "]")
            else:
                # RE2 has no (?!): an empty class matches nothing.
                out.append("(?s:.)" if negated else "[^\\x00-\\x{10ffff}]")
        else:
            out.append(_class_literal(c))
            i += 1
    return "".join(out)


@dataclass(frozen=True, slots=True)
class IgnoreTags:
    """image_ignore_tags: comma-separated filepath.Match globs; a lone '*' turns updates off."""

    patterns: tuple[str, ...]
    _compiled: tuple[Pattern, ...] = field(repr=False, compare=False)

    @property
    def disables_updates(self) -> bool:
        return "*" in self.patterns

    def ignored_by(self, tag: str) -> str | None:
        """The first pattern that matches the whole tag, or None."""
        for pattern, regex in zip(self.patterns, self._compiled, strict=True):
            if regex.fullmatch(tag) is not None:
                return pattern
        return None


def parse_ignore_tags(value: str | None) -> IgnoreTags:
    """Parse image_ignore_tags; items are trimmed and empty items dropped, as the updater does."""
    patterns = tuple(p.strip() for p in (value or "").split(",") if p.strip())
    return IgnoreTags(patterns, tuple(compile_re2(glob_to_regex(p)) for p in patterns))
