"""Allow-tags (RE2) and ignore-tags (filepath.Match) as Go reads them, including where Python differs."""

from __future__ import annotations

import fnmatch
import re

import pytest

from apphosting.imagepolicy import PolicyError, compile_re2, parse_allow_tags, parse_ignore_tags


@pytest.mark.parametrize(
    ("allow", "tag", "allowed"),
    [
        (None, "anything", True),
        ("any", "anything", True),
        ("regexp:^[0-9]+\\.[0-9]+$", "1.2", True),
        ("regexp:^[0-9]+\\.[0-9]+$", "1.2.3", False),
        ("regexp:^v1\\.", "v1.2.0", True),
        ("regexp:^v1\\.", "v2.0.0", False),
        ("regexp:-alpine", "1.2.3-alpine", True),  # unanchored: found anywhere
        ("regexp:alpine", "alpine-1.2", True),
        ("regexp:^.*-alpine$", "1.2-alpine-slim", False),
        ("regexp:^master-[0-9a-f]{7}$", "master-1a2b3c4", True),
        ("regexp:^master-[0-9a-f]{7}$", "master-1a2b3c", False),
        ("regexp:(?i)^RC", "rc1", True),
        ("regexp:^(?i:rc)[0-9]", "Rc1", True),
        ("regexp:^(?P<major>[0-9]+)\\.", "10.1", True),
        ("regexp:^(?<major>[0-9]+)\\.", "10.1", True),  # Go 1.22 named group; Python 3.11 refuses it
        ("regexp:1\\z", "v1", True),  # Go's end of text; Python 3.11 has no \z
        ("regexp:1\\z", "v10", False),
        ("regexp:^a{,2}$", "a{,2}", True),  # literal in RE2, a repeat in Python 3.11
        ("regexp:^a{,2}$", "aa", False),
        ("regexp:^\\Qv1.2\\E$", "v1.2", True),  # \Q...\E quotes in RE2; Python has no \Q
        ("regexp:^\\Qv1.2\\E$", "v1x2", False),
        ("regexp:^[[:digit:]]+$", "123", True),  # POSIX class; Python would read [[:digit:] as a set
        ("regexp:^[[:alpha:]]+$", "abc", True),
        ("regexp:^[[:alpha:]]+$", "ab1", False),
        ("regexp:^\\x41$", "A", True),
        ("regexp:^\\x{41}$", "A", True),  # Go's braced hex
        ("regexp:^\\101$", "A", True),  # octal \101
        ("regexp:^a\\12?$", "a", True),  # \12 is octal (newline) in Go, a backreference in Python
        ("regexp:^\\d+$", "123", True),
        ("regexp:^\\w+$", "abc_1", True),
        ("regexp:^\\s*x$", "x", True),
        ("regexp:^v[^-]+$", "v1.2", True),
        ("regexp:^v[^-]+$", "v1.2-rc", False),
        ("regexp:^[a-c]+$", "cab", True),
        ("regexp:^[]a]+$", "]a", True),  # ']' first in a class is a literal
        ("regexp:^[a-]+$", "a-", True),  # '-' last is a literal
        ("regexp:^[[]$", "[", True),  # '[' in a class is a literal in RE2 (a FutureWarning in Python)
        ("regexp:^[a&&b]+$", "a&", True),
    ],
)
def test_allow_tags(allow: str | None, tag: str, allowed: bool) -> None:
    assert parse_allow_tags(allow).allows(tag) is allowed


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("(a)\\1", "invalid escape sequence"),  # no backreferences
        ("(?P<x>a)(?P=x)", "invalid perl operator"),
        ("a(?=b)", "invalid perl operator"),  # no lookaround
        ("a(?!b)", "invalid perl operator"),
        ("(?<=a)b", "invalid perl operator"),
        ("(?<!a)b", "invalid perl operator"),
        ("a++", "bad repetition operator"),  # possessive in Python 3.11
        ("a*+", "bad repetition operator"),
        ("a**", "bad repetition operator"),
        ("a{2}{3}", "bad repetition operator"),
        ("(?>a)", "invalid perl operator"),  # atomic group in Python 3.11
        ("a{1001}", "invalid repetition size"),
        ("a{2,1}", "invalid repetition size"),
        ("\\Z", "invalid escape sequence"),  # Python's end of text; not RE2
        ("\\u0041", "invalid escape sequence"),
        ("\\e", "invalid escape sequence"),
        ("\\8", "invalid escape sequence"),
        ("(?x)a b", "invalid perl operator"),
        ("(?(1)a|b)", "invalid perl operator"),
        ("(?#comment)", "invalid perl operator"),
        ("*a", "no argument for repetition operator"),
        ("a|*", "no argument for repetition operator"),
        ("(a", "missing )"),
        ("a)", "unexpected )"),
        ("[a", "missing ]"),
        ("[z-a]", "invalid character class range"),
        ("[[:foo:]]", "invalid character class range"),
        ("a\\", "trailing \\"),
        ("\\x4", "invalid escape sequence"),
        ("\\x{110000}", "invalid escape sequence"),
    ],
)
def test_allow_tags_refuses_what_go_refuses_with_the_reason(pattern: str, why: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(f"regexp {pattern!r} does not compile: {why}")):
        parse_allow_tags("regexp:" + pattern)


@pytest.mark.parametrize(
    ("pattern", "tag", "allowed"),
    [
        # Go's regexp takes these too.
        ("^\\pL+$", "abc", True),
        ("^\\pL+$", "ab1", False),
        ("(?U)^a+", "aaa", True),
        ("^a(?i)b$", "aB", True),
        ("^a(?i)b$", "AB", False),
        ("^[[:^alpha:]]+$", "123", True),
        ("^[[:^alpha:]]+$", "1a", False),
    ],
)
def test_allow_tags_take_what_go_takes(pattern: str, tag: str, allowed: bool) -> None:
    assert parse_allow_tags("regexp:" + pattern).allows(tag) is allowed


@pytest.mark.parametrize(
    ("allow", "ignore"),
    [
        # A backtracking engine tries every way to split the tag among the repeats: 2**128 ways for
        # the first, about 128**8 for the last.
        ("regexp:^(a|a)*c", ""),
        ("regexp:^(a*)*$", ""),
        ("regexp:(.*a){20}b", ""),
        ("any", "*a*a*a*a*a*a*a*a*b"),
    ],
)
def test_a_pattern_is_matched_in_time_linear_in_the_tag(allow: str, ignore: str) -> None:
    tag = "a" * 127 + "!"
    assert parse_allow_tags(allow).allows(tag) is (allow == "any")
    assert parse_ignore_tags(ignore).ignored_by(tag) is None


@pytest.mark.parametrize("value", ["all", "regex:^a", "Any", "glob:*"])
def test_allow_tags_other_forms_are_refused(value: str) -> None:
    with pytest.raises(PolicyError):
        parse_allow_tags(value)


def test_dollar_is_end_of_text_as_in_go() -> None:
    # Python's $ also matches before a final newline; Go's does not (without (?m)).
    assert re.search("^a$", "a\n") is not None
    assert compile_re2("^a$").search("a\n") is None
    assert compile_re2("(?m)^a$").search("a\nb") is not None
    assert compile_re2("(?m:a$)").search("a\nb") is not None


def test_space_class_is_gos() -> None:
    # Go's \s is [\t\n\f\r ]; Python's also matches \v.
    assert re.search(r"\s", "\v", re.ASCII) is not None
    assert compile_re2(r"\s").search("\v") is None
    assert compile_re2(r"[\s]").search("\v") is None
    assert compile_re2(r"\S").search("\v") is not None


def test_classes_are_ascii_as_in_go() -> None:
    assert re.search(r"^\d$", "٣") is not None
    assert compile_re2(r"^\d$").search("٣") is None
    assert compile_re2(r"^\w$").search("é") is None


IGNORE = [
    # pattern, tag, ignored
    ("*", "anything", True),
    ("latest", "latest", True),
    ("latest", "latest-1", False),  # a glob matches the whole tag
    ("*-rc*", "1.2.3-rc1", True),
    ("*-rc*", "1.2.3", False),
    ("*-alpha*,*-beta*", "1.0-beta.2", True),
    ("*-alpha*, *-beta*", "1.0-beta.2", True),  # items are trimmed
    ("v1.?", "v1.2", True),
    ("v1.?", "v1.10", False),
    ("v1.[0-4]", "v1.3", True),
    ("v1.[0-4]", "v1.5", False),
    ("v1.[^0-4]", "v1.5", True),  # Go negates with ^
    ("v1.[^0-4]", "v1.3", False),
    ("v1.[!0-4]", "v1.!", True),  # '!' is a literal to Go, a negation to fnmatch
    ("v1.[!0-4]", "v1.5", False),
    ("v1.[!0-4]", "v1.3", True),
    ("a\\*", "a*", True),  # '\' escapes in Go; fnmatch has no escape
    ("a\\*", "ab", False),
    ("a[\\]]", "a]", True),
    ("a*", "a/b", False),  # '*' stops at '/' in Go; fnmatch crosses it
    ("a?b", "a/b", False),
    ("**", "ab", True),  # no '**': just two stars
    ("[z-a]", "m", False),  # a reversed range is accepted by Go and matches nothing
    ("[^z-a]", "m", True),
    ("a.b", "axb", False),  # '.' is literal
    ("(x)", "(x)", True),
]


@pytest.mark.parametrize(("patterns", "tag", "ignored"), IGNORE)
def test_ignore_tags(patterns: str, tag: str, ignored: bool) -> None:
    assert (parse_ignore_tags(patterns).ignored_by(tag) is not None) is ignored


@pytest.mark.parametrize(
    ("pattern", "tag"),
    [("v1.[!0-4]", "v1.3"), ("a\\*", "a*"), ("a*", "a/b"), ("v1.[^0-4]", "v1.5")],
)
def test_fnmatch_would_disagree(pattern: str, tag: str) -> None:
    go = parse_ignore_tags(pattern).ignored_by(tag) is not None
    assert fnmatch.fnmatchcase(tag, pattern) is not go


@pytest.mark.parametrize("pattern", ["[", "a[", "[]", "[]a]", "[-a]", "[a-]", "a\\", "[\\", "[^]"])
def test_malformed_globs_are_refused(pattern: str) -> None:
    with pytest.raises(PolicyError, match="malformed"):
        parse_ignore_tags(pattern)


def test_ignore_reports_the_first_matching_pattern_and_star_disables() -> None:
    ignore = parse_ignore_tags("*-rc*,1.*")
    assert ignore.ignored_by("1.0-rc1") == "*-rc*"
    assert ignore.ignored_by("1.5") == "1.*"
    assert not ignore.disables_updates
    assert parse_ignore_tags("latest,*").disables_updates
    assert parse_ignore_tags(None).patterns == ()
    assert parse_ignore_tags("a,,b").patterns == ("a", "b")
