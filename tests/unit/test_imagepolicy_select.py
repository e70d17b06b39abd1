"""Which tag each strategy picks, and the verdict it gives every candidate."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from apphosting.imagepolicy import Candidate, Exclusion, Policy, PolicyError, Strategy, parse_strategy, select_tag

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def tags(*names: str) -> list[Candidate]:
    return [Candidate(name) for name in names]


@pytest.mark.parametrize(
    ("name", "strategy"),
    [
        (None, Strategy.SEMVER),
        ("", Strategy.SEMVER),
        ("semver", Strategy.SEMVER),
        ("newest-build", Strategy.NEWEST_BUILD),
        ("latest", Strategy.NEWEST_BUILD),
        ("alphabetical", Strategy.ALPHABETICAL),
        ("name", Strategy.ALPHABETICAL),
        ("digest", Strategy.DIGEST),
    ],
)
def test_strategy_names_and_aliases(name: str | None, strategy: Strategy) -> None:
    assert parse_strategy(name) is strategy


def test_unknown_strategy_and_bad_fields_are_refused() -> None:
    for fields in (
        {"strategy": "newest"},
        {"strategy": "semver", "constraint": ">>1"},
        {"strategy": "digest"},
        {"allow_tags": "regexp:(a)\\1"},
        {"ignore_tags": "[a"},
    ):
        with pytest.raises(PolicyError):
            Policy.parse(**fields)


SEMVER_CASES = [
    # constraint, tags, current, winner
    (None, ["0.1", "0.5.1", "0.9", "1.0", "1.0.1", "1.1.2", "2.0.3"], "0.1", "2.0.3"),
    ("~1.0", ["0.1", "0.5.1", "0.9", "1.0", "1.0.1", "1.1.2", "2.0.3"], "0.1", "1.0.1"),
    ("^1.0", ["0.1", "0.5.1", "0.9", "1.0", "1.0.1", "1.1.2", "2.0.3"], "0.1", "1.1.2"),
    ("1.x", ["1.0.0", "1.9.0", "2.0.0"], "1.0.0", "1.9.0"),
    ("^1.2.3", ["1.2.3", "1.5.0", "1.10.0", "2.0.0"], "1.2.3", "1.10.0"),  # not lexical: 1.10 > 1.5
    (None, ["1.0.0", "1.1.0-rc1", "1.1.0-beta"], "1.0.0", "1.0.0"),  # no constraint: no pre-release
    (">=1.0.0-0", ["1.0.0", "1.1.0-rc1", "1.1.0-beta"], "1.0.0", "1.1.0-rc1"),
    ("^1.0.0", ["1.0.0", "1.1.0-rc1"], "1.0.0", "1.0.0"),
    ("v1.x", ["v1.0.0", "v1.2.0", "v2.0.0", "latest"], "v1.0.0", "v1.2.0"),  # the tag keeps its v
    (">=1.0 <2.0", ["1", "1.5", "2"], "1", "1.5"),  # partial versions are coerced
    ("1.2 - 1.4.5", ["1.1.0", "1.3.0", "1.4.5", "1.4.6"], "1.1.0", "1.4.5"),
    ("<1.0 || >=3.0", ["0.9.0", "2.0.0", "3.1.0"], "0.9.0", "3.1.0"),
    ("^2", ["1.0.0", "1.5.0"], "1.0.0", None),
    (None, ["1.0.0", "1.0.0+build.2", "v1.0.0"], "1.0.0", "1.0.0"),  # equal versions keep the current tag
    (None, ["1.0.0+build.2", "v1.0.0"], "0.9.0", "v1.0.0"),  # else the last by name
    ("^1.0", ["1.5.0"], "1.9.0", "1.5.0"),  # no "older than current" rule: the updater may go down
]


@pytest.mark.parametrize(("constraint", "names", "current", "winner"), SEMVER_CASES)
def test_semver(constraint: str | None, names: list[str], current: str, winner: str | None) -> None:
    result = select_tag(Policy.parse("semver", constraint), tags(*names), current)
    assert (result.winner.tag if result.winner else None) == winner
    assert result.changed is (winner is not None and winner != current)


def test_semver_verdicts_name_the_rule() -> None:
    policy = Policy.parse("semver", "^1.0", "regexp:^v?[0-9]", "*-debug,1.0.5")
    candidates = tags("latest", "1.0.5", "1.1.0-debug", "x1.0", "1.2.0-rc.1", "2.0.0", "1.3.0", "1.2.0")
    result = select_tag(policy, candidates, "1.0.0")
    verdicts = {v.candidate.tag: v for v in result.verdicts}
    assert [v.candidate.tag for v in result.verdicts] == [c.tag for c in candidates]
    assert verdicts["latest"].excluded is Exclusion.NOT_ALLOWED
    assert verdicts["1.0.5"].excluded is Exclusion.IGNORED
    assert "'1.0.5'" in verdicts["1.0.5"].reason
    assert verdicts["1.1.0-debug"].excluded is Exclusion.IGNORED
    assert "'*-debug'" in verdicts["1.1.0-debug"].reason
    assert verdicts["x1.0"].excluded is Exclusion.NOT_ALLOWED
    assert verdicts["1.2.0-rc.1"].excluded is Exclusion.PRERELEASE
    assert verdicts["2.0.0"].excluded is Exclusion.OUTSIDE_CONSTRAINT
    assert "'^1.0'" in verdicts["2.0.0"].reason
    assert verdicts["1.3.0"].kept
    assert verdicts["1.2.0"].kept
    assert result.winner == Candidate("1.3.0")
    assert result.changed
    assert "highest semantic version within '^1.0'" in result.why
    assert result.kept == (Candidate("1.3.0"), Candidate("1.2.0"))


def test_semver_without_constraint_names_not_semver_and_prerelease() -> None:
    result = select_tag(Policy.parse(), tags("main", "1.0.0", "1.1.0-alpha"), "1.0.0")
    rules = [v.excluded for v in result.verdicts]
    assert rules == [Exclusion.NOT_SEMVER, None, Exclusion.PRERELEASE]
    assert result.winner == Candidate("1.0.0")
    assert not result.changed
    assert "already deployed" in result.why


def test_semver_does_not_move_off_a_tag_that_is_not_a_version() -> None:
    result = select_tag(Policy.parse("semver"), tags("1.0.0", "2.0.0"), "latest")
    assert result.winner is None
    assert not result.changed
    assert "'latest' is not a semantic version" in result.why
    # No current tag at all is fine.
    assert select_tag(Policy.parse("semver"), tags("1.0.0", "2.0.0"), None).winner == Candidate("2.0.0")


def test_newest_build_by_created_time_then_name() -> None:
    candidates = [
        Candidate("a", T0),
        Candidate("b", T0 + timedelta(hours=2)),
        Candidate("c", T0 + timedelta(hours=1)),
        Candidate("d", None),
    ]
    result = select_tag(Policy.parse("latest"), candidates, "a")
    assert result.winner == candidates[1]
    assert result.changed
    assert "created 2024-01-01T02:00:00+00:00" in result.why
    assert result.verdicts[3].excluded is Exclusion.NO_CREATED_TIME
    # Two tags of one image (same time): the last by name, consistently.
    same = [Candidate("v2", T0), Candidate("v10", T0), Candidate("stable", T0)]
    assert select_tag(Policy.parse("newest-build"), same, None).winner == Candidate("v2", T0)


def test_newest_build_respects_filters() -> None:
    candidates = [Candidate("main-1", T0), Candidate("pr-7", T0 + timedelta(days=1)), Candidate("main-2", T0)]
    result = select_tag(Policy.parse("newest-build", None, "regexp:^main-"), candidates, "main-1")
    assert result.winner == Candidate("main-2", T0)


@pytest.mark.parametrize(
    ("names", "winner"),
    [
        (["a", "b", "c"], "c"),
        (["v9", "v10"], "v9"),  # byte order, not numeric
        (["Zeta", "alpha"], "alpha"),  # upper case sorts first
        (["2024-01-02", "2024-01-10", "2023-12-31"], "2024-01-10"),
        (["1.0", "1.0-rc1"], "1.0-rc1"),
        (["main-abc", "main-abd", "main"], "main-abd"),
    ],
)
def test_alphabetical(names: list[str], winner: str) -> None:
    result = select_tag(Policy.parse("name"), tags(*names), None)
    assert result.winner == Candidate(winner)
    assert result.why == "last in lexical (byte-wise) order"


def test_digest_follows_one_tag() -> None:
    candidates = [Candidate("latest", digest="sha256:new"), Candidate("v1", digest="sha256:old")]
    policy = Policy.parse("digest", "latest")
    moved = select_tag(policy, candidates, "latest", "sha256:old")
    assert moved.winner == candidates[0]
    assert moved.changed
    assert "now points at sha256:new" in moved.why
    assert moved.verdicts[1].excluded is Exclusion.NOT_FOLLOWED_TAG
    same = select_tag(policy, candidates, "latest", "sha256:new")
    assert same.winner == candidates[0]
    assert not same.changed
    unknown = select_tag(policy, candidates, "latest", None)
    assert unknown.changed
    gone = select_tag(policy, [Candidate("latest")], "latest", "sha256:old")
    assert gone.winner is None
    assert gone.verdicts[0].excluded is Exclusion.NO_DIGEST
    ignored = select_tag(Policy.parse("digest", "latest", None, "lat*"), candidates, "latest", "sha256:old")
    assert ignored.winner is None
    assert ignored.verdicts[0].excluded is Exclusion.IGNORED


@pytest.mark.parametrize("strategy", ["semver", "newest-build", "alphabetical"])
def test_star_ignore_disables_updates(strategy: str) -> None:
    result = select_tag(Policy.parse(strategy, None, None, "*"), [Candidate("1.0.0", T0)], None)
    assert result.winner is None
    assert not result.changed
    assert result.verdicts[0].excluded is Exclusion.UPDATES_DISABLED
    assert "updates are off" in result.why


def test_no_candidates() -> None:
    result = select_tag(Policy.parse(), [], "1.0.0")
    assert result.winner is None
    assert not result.changed
    assert result.verdicts == ()


def test_thousands_of_tags() -> None:
    candidates = [Candidate(f"{m}.{n}.{p}") for m in range(10) for n in range(30) for p in range(30)]
    candidates += [Candidate(f"build-{i}") for i in range(2000)]
    policy = Policy.parse("semver", ">=2.0 <9.x || ~1.2", "regexp:^[0-9]", "*.13,3.*.*")
    result = select_tag(policy, candidates, "1.2.0")
    assert result.winner == Candidate("8.29.29")  # <9.x is below 9.0.0; 3.*.* and *.13 are ignored
    assert len(result.verdicts) == len(candidates)
    assert sum(v.kept for v in result.verdicts) == 6 * 30 * 29 + 29
