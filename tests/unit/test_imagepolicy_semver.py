"""Masterminds semver v3 parsing, precedence and constraint checks, case by case."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from apphosting.imagepolicy import Constraint, ConstraintError, parse_version, semver


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("1.2.3", "1.2.3"),
        ("v1.2.3", "1.2.3"),
        ("1.0", "1.0.0"),
        ("v1.0", "1.0.0"),
        ("1", "1.0.0"),
        ("v1", "1.0.0"),
        ("1.2.beta", None),
        ("v1.2.beta", None),
        ("foo", None),
        ("1.2-5", "1.2.0-5"),
        ("v1.2-5", "1.2.0-5"),
        ("1.2-beta.5", "1.2.0-beta.5"),
        ("\n1.2", None),
        ("1.2.0-x.Y.0+metadata", "1.2.0-x.Y.0+metadata"),
        ("1.2.0-x.Y.0+metadata-width-hypen", "1.2.0-x.Y.0+metadata-width-hypen"),
        ("1.2.3-rc1-with-hypen", "1.2.3-rc1-with-hypen"),
        ("1.2.3.4", None),
        ("1.2.2147483648", "1.2.2147483648"),
        ("1.2147483648.3", "1.2147483648.3"),
        ("2147483648.3.0", "2147483648.3.0"),
        ("18446744073709551616.0.0", None),  # beyond uint64
        ("20221209-update-renovatejson-v4", "20221209.0.0-update-renovatejson-v4"),
        ("1.2.3-01", None),  # numeric pre-release identifier with a leading zero
        ("1.2.3-alpha.01", None),
        ("01.02.03", "1.2.3"),  # the non-strict parser allows leading zeros in the core
        ("V1.2.3", None),  # only a lowercase v
        ("1.2.3+", None),
        ("1.2.3-", None),
        ("1.2.3-a..b", None),
        ("latest", None),
        ("", None),
        (" 1.2.3", None),
        ("1.2.3 ", None),
        ("1.2.3\n", None),  # Go's $ is end of text; Python's would allow a trailing newline
        ("\u0661.\u0662.\u0663", None),  # Arabic-Indic digits: Go's [0-9] is ASCII
    ],
)
def test_parse_version(text: str, parsed: str | None) -> None:
    version = parse_version(text)
    assert (None if version is None else str(version)) == parsed
    if version is not None:
        assert version.original == text


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ("1.2.3", "1.5.1"),
        ("2.2.3", "3.0.0"),
        ("1.0.0-alpha", "1.0.0"),
        ("1.0.0-alpha", "1.0.0-alpha.1"),
        ("1.0.0-alpha.1", "1.0.0-alpha.beta"),
        ("1.0.0-alpha.beta", "1.0.0-beta"),
        ("1.0.0-beta", "1.0.0-beta.2"),
        ("1.0.0-beta.2", "1.0.0-beta.11"),  # numeric identifiers compare as numbers
        ("1.0.0-beta.11", "1.0.0-rc.1"),
        ("1.0.0-rc.1", "1.0.0"),
        ("1.2.3-beta.1", "1.2.3-beta.a"),  # numbers sort below words
        ("1.2.3-BETA", "1.2.3-alpha"),  # byte order: upper case first
        ("1.0.0-99", "1.0.0-103"),
        ("1.0.0-2", "1.0.0-18446744073709551616"),  # too big for uint64: a word
        ("1.2.9", "1.10.0"),
    ],
)
def test_precedence(lower: str, higher: str) -> None:
    low, high = parse_version(lower), parse_version(higher)
    assert low is not None
    assert high is not None
    assert low < high
    assert high > low
    assert low != high


@pytest.mark.parametrize(
    ("a", "b"),
    [("1.2.3", "v1.2.3"), ("1.2.3+build.1", "1.2.3+build.2"), ("1.2", "1.2.0"), ("1", "1.0.0+x")],
)
def test_equal_ignores_prefix_coercion_and_metadata(a: str, b: str) -> None:
    assert parse_version(a) == parse_version(b)


CHECKS = [
    # operators
    ("=2.0", "1.2.3", False),
    ("=2.0", "2.0.0", True),
    ("=2.0", "2.0.1", True),
    ("=2.0.0", "2.0.0", True),
    ("=2.0.0", "2.0.1", False),
    ("4.1", "4.1.0", True),
    ("4.1.x", "4.1.3", True),
    ("1.x", "1.4.0", True),
    ("!=4.1", "4.1.0", False),
    ("!=4.1", "5.1.0", True),
    ("!=4.x", "5.1.0", True),
    ("!=4.x", "4.1.0", False),
    ("!=4.1.x", "4.2.0", True),
    ("!=4.2.x", "4.2.3", False),
    (">1.1", "4.1.0", True),
    (">1.1", "1.1.0", False),
    (">0", "0.0.0", False),
    (">0", "1.0.0", True),
    (">0", "0.0.1-alpha", False),
    (">0.0", "0.0.1-alpha", False),
    (">0-0", "0.0.1-alpha", False),
    (">0.0-0", "0.0.1-alpha", False),
    (">0", "0.0.0-alpha", False),
    (">0-0", "0.0.0-alpha", False),
    (">0.0.0-0", "0.0.0-alpha", True),
    (">1.2.3-alpha.1", "1.2.3-alpha.2", True),
    (">1.2.3-alpha.1", "1.3.3-alpha.2", True),
    (">11", "11.1.0", False),
    (">11.1", "11.1.0", False),
    (">11.1", "11.1.1", False),
    (">11.1", "11.2.1", True),
    (">=11", "11.1.2", True),
    (">=11.1", "11.1.2", True),
    (">=11.1", "11.0.2", False),
    (">=1.1", "4.1.0", True),
    (">=1.1", "1.1.0", True),
    (">=1.1", "0.0.9", False),
    (">=0", "0.0.1-alpha", False),
    (">=0.0", "0.0.1-alpha", False),
    (">=0-0", "0.0.1-alpha", True),
    (">=0.0-0", "0.0.1-alpha", True),
    (">=0", "0.0.0-alpha", False),
    (">=0-0", "0.0.0-alpha", True),
    (">=0.0.0-0", "1.2.3", True),
    (">=0.0.0-0", "3.4.5-beta.1", True),
    ("<0", "0.0.0-alpha", False),
    ("<0-z", "0.0.0-alpha", True),
    (">=0", "0.0.0", True),
    ("=>1.1", "4.1.0", True),
    ("=>1.1", "1.1.0", True),
    ("=>1.1", "0.0.9", False),
    ("<1.1", "0.1.0", True),
    ("<1.1", "1.1.0", False),
    ("<1.1", "4.1.0", False),
    ("<1.1-alpha", "1.0.0-beta", True),
    ("<1.1", "1.0.0-beta", False),
    ("<=1.1", "0.1.0", True),
    ("<=1.1", "1.1.0", True),
    ("<=1.1", "1.1.1", True),  # a partial bound covers its patches
    ("<=1.1", "4.1.0", False),
    ("=<1.1", "0.1.0", True),
    ("=<1.1", "1.1.0", True),
    ("=<1.1", "4.1.0", False),
    ("<=1.1.0", "1.1.1", False),
    (">1.1, <2", "1.2.1", True),
    (">1.1, <2", "1.1.1", False),  # >1.1 means a later minor
    (">1.1, <3", "4.3.2", False),
    (">=1.1, <2, !=1.2.3", "1.2.3", False),
    (">=1.1, <2, !=1.2.3 || > 3", "4.1.2", True),
    (">=1.1, <2, !=1.2.3 || > 3", "1.2.3", False),
    (">=1.1, <2, !=1.2.3 || >= 3", "3.0.0", True),
    (">=1.1 <2 !=1.2.3", "1.2.3", False),  # space AND
    (">= 1.1 < 2", "1.5.0", True),
    (">=1.0 <2.0", "1.9.9", True),
    (">=1.0 <2.0", "2.0.0", False),
    ("> 1.0.0", "1.0.1", True),
    # wildcards
    ("*", "1.2.3", True),
    ("*", "1.2.3-beta", False),
    ("x", "0.0.1", True),
    ("X", "9.9.9", True),
    ("2.*", "2.9.1", True),
    ("2.*", "3.0.0", False),
    ("2.*.*", "2.1.0", True),
    ("1.2.*", "1.2.9", True),
    ("1.2.*", "1.3.0", False),
    ("1.2.x", "1.2.0-beta", False),
    (">=2.x", "3.1.0", True),
    (">=2.x", "1.9.0", False),
    ("<=2.x", "2.9.9", True),
    ("<=2.x", "3.0.0", False),
    ("<2.x", "1.9.9", True),
    ("<2.x", "2.0.0", False),
    # tilde
    ("~*", "2.1.1", True),
    ("~1", "2.1.1", False),
    ("~1", "1.3.5", True),
    ("~1", "1.3.5-beta", False),
    ("~1.x", "2.1.1", False),
    ("~1.x", "1.3.5", True),
    ("~1.3.6-alpha", "1.3.5-beta", False),
    ("~1.3.5-alpha", "1.3.5-beta", True),
    ("~1.3.5-beta", "1.3.5-alpha", False),
    ("~1.x", "1.3.5-beta", False),
    ("~1.3", "1.3.8", True),
    ("~1.3", "1.4.0", False),
    ("~1.2.3", "1.2.5", True),
    ("~1.2.3", "1.2.2", False),
    ("~1.2.3", "1.3.2", False),
    ("~1.1", "1.2.3", False),
    ("~1.3", "2.4.5", False),
    ("~2.0", "2.0.9", True),
    ("~2.0", "2.1.0", False),
    ("~>1.2", "1.2.9", True),
    ("~>1.2.3", "1.2.4", True),
    ("~0.0.0", "9.0.0", True),  # the library's any-version special case
    ("~0", "0.9.0", True),
    ("~0", "1.0.0", False),
    # caret
    ("^*", "1.2.3", False),  # v3's caret treats * as 0.0.0 without a dirty minor: only 0.0.0
    ("^*", "0.0.1", False),
    ("^*", "0.0.0", True),
    ("^1.2", "1.8.9", True),
    ("^1.2.3", "1.8.9", True),
    ("^1.2.3", "1.2.2", False),
    ("^1.2.3", "2.0.0", False),
    ("^1.2", "1.8.9-beta", False),
    ("^1.2.3-beta", "1.8.9-beta", True),  # a pre-release bound admits any later pre-release
    ("^1.2", "2.8.9", False),
    ("^1.2.3", "1.1.1", False),
    ("^1.2", "1.1.1", False),
    ("^1.x", "1.1.1", True),
    ("^2.x", "1.1.1", False),
    ("^1.x", "2.1.1", False),
    ("^1.x", "1.1.1-beta1", False),
    ("^1.1.2-beta1", "1.1.1", False),
    ("^1.2.x", "2.1.1", False),
    ("^1.2.3-beta.2", "1.2.3-beta.4", True),
    ("^1.2.3-beta.2", "1.2.3-beta.1", False),
    ("^0.2.3", "0.2.5", True),
    ("^0.2.3", "0.5.6", False),
    ("^0.2", "0.2.5", True),
    ("^0.2", "0.5.6", False),
    ("^0.0.3", "0.0.3", True),
    ("^0.0.3", "0.0.4", False),
    ("^0.0", "0.0.3", True),
    ("^0.0", "0.1.4", False),
    ("^0.0", "1.0.4", False),
    ("^0", "0.2.3", True),
    ("^0", "1.1.4", False),
    ("^0.2.3-beta.2", "0.2.3-beta.4", True),
    ("^0.2.3-beta.2", "0.2.4-beta.2", True),
    ("^0.2.3-beta.2", "0.3.4-beta.2", False),
    ("^0.2.3-beta.2", "0.2.3-beta.1", False),
    ("^0.0.3-beta", "0.0.3-pr.2", True),
    ("^0.0.3-beta", "0.0.4", False),
    ("^0.0.0", "0.0.0", True),
    ("^0.0.0", "0.0.1", False),
    # hyphen ranges
    ("1.1 - 2", "1.1.1", True),
    ("1.1 - 2", "2.1.0", True),  # "<= 2" covers all of 2.x
    ("1.1 - 3", "4.3.2", False),
    ("1.2 - 1.4.5", "1.2.0", True),
    ("1.2 - 1.4.5", "1.4.5", True),
    ("1.2 - 1.4.5", "1.4.6", False),
    ("1.2 - 1.4.5", "1.1.9", False),
    ("1.2.3 - 2.3.4", "2.3.4", True),
    ("1.2.3 - 2.3.4", "1.2.2", False),
    ("1.2.3 - 2.3", "2.3.9", True),
    ("1.2 - 1.4.5 || 3.x", "3.5.0", True),
    # OR
    ("1.0.0 || 2.0.0", "2.0.0", True),
    ("1.0.0 || 2.0.0", "1.5.0", False),
    ("<1.0 || >=2.0", "0.9.9", True),
    ("<1.0 || >=2.0", "1.9.9", False),
    # the Masterminds pre-release rule (not npm's): per AND group, any tuple
    (">=1.2.3-0", "2.0.0-rc.1", True),  # npm would refuse: different major.minor.patch
    (">=1.2.3-alpha <2.0.0", "1.9.0-beta", True),
    (">=1.2.3-alpha <2.0.0", "2.0.0-beta", True),  # 2.0.0-beta < 2.0.0
    (">=1.2.3 <2.0.0", "1.9.0-beta", False),
    (">=1.2.3 || >=1.0.0-0", "1.5.0-rc.1", True),  # only the second OR group admits it
    ("<2.0.0 >=1.0.0-0", "1.5.0-rc.1", True),
    # versions in constraints take a v
    ("v1.2.3", "1.2.3", True),
    ("^v1.2", "v1.9.0", True),
    (">= v2", "2.1.0", True),
]


@pytest.mark.parametrize(("constraint", "version", "expected"), CHECKS)
def test_constraint_check(constraint: str, version: str, expected: bool) -> None:
    parsed = parse_version(version)
    assert parsed is not None
    assert Constraint.parse(constraint).check(parsed) is expected


@pytest.mark.parametrize(
    "constraint",
    [
        "",
        "   ",
        "foo",
        "1.2.3.4",
        "> 1.2.3 <",
        ">>1.2",
        "=>=1.2",
        "^",
        "1.2 -1.4",  # a hyphen range needs spaces on both sides
        "1.2 ||",
        "|| 1.2",
        "1.2 | 1.3",
        ">1.2 ;<2",
        "1.2.3-01",  # the coerced version must itself be valid
        "1.x.3-",
        "1|2",  # '|' is a digit to the grammar, never to the number
        "xx",
        "1.2.3 - ",
    ],
)
def test_improper_constraints_are_refused(constraint: str) -> None:
    with pytest.raises(ConstraintError):
        Constraint.parse(constraint)


@pytest.mark.parametrize(
    "constraint",
    ["1.2.3", "^1.2", "~1.2.3", "1.x", ">= 1.0, < 2.0", ">=1.0 <2.0", "1.2 - 1.4.5", "^1 || ^2", "=>1", "~>1", " 1.2 "],
)
def test_proper_constraints_parse(constraint: str) -> None:
    assert Constraint.parse(constraint).text == constraint


@pytest.mark.parametrize(
    ("constraint", "proper"),
    [
        # Given the library's own patterns, a backtracking engine tries every way to split the runs
        # of spaces between terms (for years on the first), and reads a run of version characters or
        # spaces again from each of its positions (time quadratic in the length) on the others.
        ("1  " * 40 + "!", False),
        ("1  " * 340, True),
        (">= 1 ,  " * 120 + "<", False),
        ("x" * 1_000 + " y - 1", False),
        (" " * 1_000 + "!", False),
        ("1-1" * 300 + " - !", False),
        ("1 - 2 " * 150, True),
    ],
)
def test_constraints_are_read_without_backtracking(constraint: str, proper: bool) -> None:
    if proper:
        Constraint.parse(constraint)
    else:
        with pytest.raises(ConstraintError):
            Constraint.parse(constraint)


# The library's own range and validity patterns, as Go reads them: the oracle for the patterns the
# module uses, which must find the same ranges and accept the same constraints without backtracking.
_S, _OPS, _CV = semver._S, semver._OPS, semver._CV_NOGROUP
LIBRARY_RANGE = re.compile(rf"{_S}*({_CV}){_S}+-{_S}+({_CV}){_S}*")
LIBRARY_VALID = re.compile(rf"({_S}*(?:{_OPS}){_S}*{_CV}{_S}*)((?:{_S}+|,{_S}*)(?:{_OPS}){_S}*{_CV}{_S}*)*")
TOKENS = ["1", "2", "1.2", "1.2.3", "x", "X", "*", "v", "v1", "-", ",", "||", ">=", ">", "<", "<=", "=", "!="]
TOKENS += ["~", "^", "~>", "=>", "=<", "-alpha", "-1", ".1", "+b", "+meta.1", "a", "|"]
TOKENS += [" ", "  ", "\t", " - ", ", ", " || "]


def _same_reading(text: str) -> None:
    assert (semver._VALID.fullmatch(text) is None) == (LIBRARY_VALID.fullmatch(text) is None), text
    found = [(m.span(), m.groups()) for m in semver._RANGE.finditer(text)]
    assert found == [(m.span(), m.groups()) for m in LIBRARY_RANGE.finditer(text)], text


def test_the_linear_patterns_read_as_the_librarys_own() -> None:
    # Every string of up to four of the grammar's characters, then strings of its tokens.
    for size in range(5):
        for chars in itertools.product(" \t,1x-.+v>=<~^|*a", repeat=size):
            _same_reading("".join(chars))
    rng = random.Random(12)
    for _ in range(20_000):
        _same_reading("".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 9))))
