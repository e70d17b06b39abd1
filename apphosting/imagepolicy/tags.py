"""Tag filters as Argo CD Image Updater applies them: RE2 allow-tags and filepath.Match ignore-tags."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

__all__ = [
    "AllowTags",
    "IgnoreTags",
    "PolicyError",
    "glob_to_regex",
    "parse_allow_tags",
    "parse_ignore_tags",
    "re2_to_python",
]


class PolicyError(ValueError):
    """An image update policy field that cannot be applied as the Go updater would."""


# Go's \s is [\t\n\f\r ]; Python's also takes \v. Named classes are ASCII in RE2.
_GO_SPACE = "\\t\\n\\f\\r "
_POSIX_CLASSES = {
    "alnum": "0-9A-Za-z",
    "alpha": "A-Za-z",
    "ascii": "\\x00-\\x7f",
    "blank": "\\t ",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "!-~",
    "lower": "a-z",
    "print": " -~",
    "punct": "!-/:-@\\[-`{-~",
    "space": "\\t\\n\\v\\f\\r ",
    "upper": "A-Z",
    "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}
_REPEAT = re.compile(r"\{([0-9]+)(,([0-9]*))?\}")
_HEX = "0123456789abcdefABCDEF"
_OCTAL = "01234567"
_MAX_REPEAT = 1000


def _class_literal(ch: str) -> str:
    # Escape everything that is not alphanumeric so Python never sees a nested-set or set-operation hint.
    return ch if ch.isascii() and ch.isalnum() else f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\U{ord(ch):08x}"


class _Translator:
    """One pass over an RE2 pattern, writing the Python pattern that matches the same tags."""

    def __init__(self, pattern: str) -> None:
        self.src = pattern
        self.i = 0
        self.out: list[str] = []
        # Per open group: whether (?m) is on, so '$' can keep Go's end-of-text meaning.
        self.multiline = [False]
        self.can_repeat = False

    def fail(self, why: str) -> PolicyError:
        return PolicyError(f"regexp {self.src!r}: {why}")

    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.src[j] if j < len(self.src) else ""

    def run(self) -> str:
        if self.src.startswith("(?") and (m := re.match(r"\(\?([imsU-]*)\)", self.src)):
            self._global_flags(m.group(1))
            self.i = m.end()
        while self.i < len(self.src):
            self._step()
        if len(self.multiline) != 1:
            raise self.fail("missing closing )")
        return "".join(self.out)

    def _global_flags(self, flags: str) -> None:
        on, _, off = flags.partition("-")
        if "U" in flags:
            raise self.fail("the U (ungreedy) flag has no Python equivalent")
        if not flags or flags.endswith("-") or "-" in off:
            raise self.fail("missing or invalid flags")
        if on:
            self.out.append(f"(?{on})")
        self.multiline[0] = "m" in on

    def _step(self) -> None:
        c = self.src[self.i]
        if c == "\\":
            self._escape()
        elif c == "[":
            self._class()
            self.can_repeat = True
        elif c == "(":
            self._group()
        elif c == ")":
            if len(self.multiline) == 1:
                raise self.fail("unexpected )")
            self.multiline.pop()
            self.out.append(")")
            self.i += 1
            self.can_repeat = True
        elif c in "*+?":
            self._repeat(c, 1)
        elif c == "{":
            m = _REPEAT.match(self.src, self.i)
            if m is None:
                # Not a repeat: RE2 reads it literally, where Python would read {,n} as a repeat.
                self.out.append("\\{")
                self.i += 1
                self.can_repeat = True
            else:
                low = int(m.group(1))
                high = low if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
                if low > _MAX_REPEAT or (high is not None and (high > _MAX_REPEAT or high < low)):
                    raise self.fail(f"invalid repeat count {m.group(0)} (RE2 allows at most {_MAX_REPEAT})")
                self._repeat(m.group(0), m.end() - self.i)
        elif c == "$":
            self.out.append("$" if self.multiline[-1] else "\\Z")
            self.i += 1
            self.can_repeat = False
        elif c == "^" or c == "|":
            self.out.append(c)
            self.i += 1
            self.can_repeat = False
        else:
            self.out.append(c)
            self.i += 1
            self.can_repeat = True

    def _repeat(self, op: str, width: int) -> None:
        if not self.can_repeat:
            raise self.fail(f"missing argument to repetition operator {op}")
        self.i += width
        if self.peek() == "?":
            op += "?"
            self.i += 1
        nxt = self.peek()
        if nxt in ("*", "+", "?") or (nxt == "{" and _REPEAT.match(self.src, self.i)):
            # Python 3.11 reads a*+ as possessive; RE2 refuses nested repetition.
            raise self.fail(f"invalid nested repetition operator {op}{nxt}")
        self.out.append(op)
        self.can_repeat = False

    def _group(self) -> None:
        rest = self.src[self.i :]
        self.can_repeat = False
        if not rest.startswith("(?"):
            self.out.append("(")
            self.i += 1
            self.multiline.append(self.multiline[-1])
            return
        if m := re.match(r"\(\?P?<([A-Za-z0-9_]+)>", rest):
            # Go takes (?P<name>) and (?<name>); Python 3.11 only the first.
            if m.group(1)[0].isdigit():
                raise self.fail(f"invalid named capture {m.group(0)}")
            self.out.append(f"(?P<{m.group(1)}>")
            self.i += m.end()
            self.multiline.append(self.multiline[-1])
            return
        if m := re.match(r"\(\?([imsU]*)(?:-([imsU]*))?([:)])", rest):
            on, off, end = m.group(1), m.group(2), m.group(3)
            if "U" in on + (off or ""):
                raise self.fail("the U (ungreedy) flag has no Python equivalent")
            if (off is not None and off == "") or (not on and not off):
                raise self.fail(f"missing or invalid flags in {m.group(0)}")
            if end == ")":
                raise self.fail(
                    f"flags {m.group(0)} in the middle of a pattern; "
                    "put them at the start or scope them as (?flags:...)"
                )
            multiline = ("m" in on) or (self.multiline[-1] and "m" not in (off or ""))
            self.out.append(f"(?{on}{'-' + off if off else ''}:")
            self.i += m.end()
            self.multiline.append(multiline)
            return
        if rest.startswith(("(?=", "(?!", "(?<=", "(?<!")):
            raise self.fail("lookaround assertions are not RE2")
        if rest.startswith("(?P="):
            raise self.fail("backreferences are not RE2")
        raise self.fail(f"unsupported group {rest[:4]!r}")

    def _escape(self) -> None:
        self.i += 1
        c = self.peek()
        self.i += 1
        self.can_repeat = True
        if c == "":
            raise self.fail("trailing backslash")
        if c == "A":
            self.out.append("\\A")
            self.can_repeat = False
        elif c == "z":
            # Go's end of text; Python 3.11 spells it \Z (and Go has no \Z).
            self.out.append("\\Z")
            self.can_repeat = False
        elif c in "bB":
            self.out.append("\\" + c)
            self.can_repeat = False
        elif c == "s":
            self.out.append(f"[{_GO_SPACE}]")
        elif c == "S":
            self.out.append(f"[^{_GO_SPACE}]")
        elif c in "dDwW":
            self.out.append("\\" + c)
        elif c == "Q":
            end = self.src.find("\\E", self.i)
            literal = self.src[self.i :] if end < 0 else self.src[self.i : end]
            self.i = len(self.src) if end < 0 else end + 2
            self.out.append("".join(_class_literal(ch) for ch in literal))
            self.can_repeat = literal != ""
        else:
            self.out.append(_class_literal(self._char_escape(c)))

    def _char_escape(self, c: str) -> str:
        """The character an escape stands for, in or out of a class (the cursor is past `c`)."""
        nxt = self.peek()
        if (c in "1234567" and (nxt == "" or nxt not in _OCTAL)) or c in "89":
            raise self.fail(f"\\{c} is a backreference, which RE2 does not support")
        if c in _OCTAL:
            # \0, \012, \12: octal in Go, where Python would read \12 as a backreference.
            digits = c
            while len(digits) < 3 and self.peek() in _OCTAL and self.peek():
                digits += self.peek()
                self.i += 1
            return chr(int(digits, 8))
        if c == "x":
            if self.peek() == "{":
                end = self.src.find("}", self.i)
                hexa = self.src[self.i + 1 : end] if end > 0 else ""
                if not hexa or any(h not in _HEX for h in hexa) or int(hexa, 16) > 0x10FFFF:
                    raise self.fail("invalid \\x{...} escape")
                self.i = end + 1
                return chr(int(hexa, 16))
            hexa = self.src[self.i : self.i + 2]
            if len(hexa) != 2 or any(h not in _HEX for h in hexa):
                raise self.fail("invalid \\x escape")
            self.i += 2
            return chr(int(hexa, 16))
        simple = {"a": "\a", "f": "\f", "t": "\t", "n": "\n", "r": "\r", "v": "\v"}
        if c in simple:
            return simple[c]
        if c in "pP":
            raise self.fail("Unicode classes \\p and \\P are not supported for tags (ASCII)")
        if c.isascii() and not c.isalnum():
            return c
        raise self.fail(f"invalid escape \\{c}")

    def _class(self) -> None:
        self.i += 1
        parts: list[str] = []
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        first = True
        while True:
            c = self.peek()
            if c == "":
                raise self.fail("missing closing ]")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            if c == "[" and self.peek(1) == ":":
                end = self.src.find(":]", self.i + 2)
                name = self.src[self.i + 2 : end] if end > 0 else ""
                if name.startswith("^") or name not in _POSIX_CLASSES:
                    raise self.fail(f"unsupported character class [:{name}:]")
                parts.append(_POSIX_CLASSES[name])
                self.i = end + 2
                continue
            if c == "\\" and self.peek(1) in "dDwWsS" and self.peek(1):
                letter = self.peek(1)
                self.i += 2
                if letter == "s":
                    parts.append(_GO_SPACE)
                elif letter == "S":
                    raise self.fail("\\S inside a class is not supported; write the class out")
                else:
                    parts.append("\\" + letter)
                continue
            if c == "\\" and self.peek(1) in "bpP" and self.peek(1):
                raise self.fail(f"\\{self.peek(1)} inside a character class is not supported")
            lo = self._class_char()
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.i += 1
                hi = self._class_char()
                if hi < lo:
                    raise self.fail(f"invalid character class range {lo}-{hi}")
                parts.append(f"{_class_literal(lo)}-{_class_literal(hi)}")
            else:
                parts.append(_class_literal(lo))
        self.out.append(("[^" if negated else "[") + "".join(parts) + "]")

    def _class_char(self) -> str:
        c = self.peek()
        self.i += 1
        if c == "\\":
            nxt = self.peek()
            self.i += 1
            if nxt == "":
                raise self.fail("trailing backslash")
            return self._char_escape(nxt)
        return c


def re2_to_python(pattern: str) -> re.Pattern[str]:
    """Compile an RE2 (Go regexp) pattern to a Python pattern that finds the same matches in tags.

    Raises PolicyError for what RE2 refuses (backreferences, lookaround, nested repetition) and for
    the few RE2 forms this translation does not cover (\\p classes, mid-pattern flags, (?U)).
    """
    translated = _Translator(pattern).run()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return re.compile(translated, re.ASCII)
        except (re.error, Warning) as exc:
            raise PolicyError(f"regexp {pattern!r} does not compile: {exc}") from None


@dataclass(frozen=True, slots=True)
class AllowTags:
    """image_allow_tags: 'any' or 'regexp:<re>', searched anywhere in the tag."""

    text: str
    _regex: re.Pattern[str] | None = field(repr=False, compare=False)

    def allows(self, tag: str) -> bool:
        return self._regex is None or self._regex.search(tag) is not None


def parse_allow_tags(value: str | None) -> AllowTags:
    """Parse image_allow_tags; None or empty means 'any'."""
    if value is None or value == "" or value == "any":
        return AllowTags("any", None)
    if value.startswith("regexp:"):
        return AllowTags(value, re2_to_python(value.removeprefix("regexp:")))
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
    """The Python regex (for fullmatch) equal to Go's filepath.Match on Unix.

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
            out.append(re.escape(pattern[i + 1]))
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
                out.append("(?s:.)" if negated else "(?!)")
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


@dataclass(frozen=True, slots=True)
class IgnoreTags:
    """image_ignore_tags: comma-separated filepath.Match globs; a lone '*' turns updates off."""

    patterns: tuple[str, ...]
    _compiled: tuple[re.Pattern[str], ...] = field(repr=False, compare=False)

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
    return IgnoreTags(patterns, tuple(re.compile(glob_to_regex(p), re.DOTALL) for p in patterns))
