"""Choosing the tag an image update policy would deploy, with the rule behind every verdict."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from apphosting.imagepolicy.semver import Constraint, ConstraintError, Version, parse_version
from apphosting.imagepolicy.tags import AllowTags, IgnoreTags, PolicyError, parse_allow_tags, parse_ignore_tags

__all__ = ["Candidate", "Exclusion", "Policy", "Selection", "Strategy", "Verdict", "parse_strategy", "select_tag"]


class Strategy(StrEnum):
    SEMVER = "semver"
    NEWEST_BUILD = "newest-build"
    ALPHABETICAL = "alphabetical"
    DIGEST = "digest"


_STRATEGY_NAMES = {
    "": Strategy.SEMVER,
    "semver": Strategy.SEMVER,
    "newest-build": Strategy.NEWEST_BUILD,
    "latest": Strategy.NEWEST_BUILD,
    "alphabetical": Strategy.ALPHABETICAL,
    "name": Strategy.ALPHABETICAL,
    "digest": Strategy.DIGEST,
}


def parse_strategy(value: str | None) -> Strategy:
    """The strategy a name stands for; None or '' is semver, 'latest' and 'name' are aliases."""
    try:
        return _STRATEGY_NAMES[value or ""]
    except KeyError:
        raise PolicyError(
            f"unknown update strategy {value!r}; one of semver, newest-build, alphabetical, digest"
        ) from None


class Exclusion(StrEnum):
    """Why a candidate tag was not kept, in the order the rules are applied."""

    UPDATES_DISABLED = "updates-disabled"
    IGNORED = "ignored"
    NOT_ALLOWED = "not-allowed"
    NOT_SEMVER = "not-semver"
    PRERELEASE = "prerelease"
    OUTSIDE_CONSTRAINT = "outside-constraint"
    NO_CREATED_TIME = "no-created-time"
    NOT_FOLLOWED_TAG = "not-followed-tag"
    NO_DIGEST = "no-digest"


@dataclass(frozen=True, slots=True)
class Candidate:
    """A tag in the repository, with what the registry said about it where known."""

    tag: str
    created: datetime | None = None
    digest: str | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    candidate: Candidate
    excluded: Exclusion | None
    reason: str

    @property
    def kept(self) -> bool:
        return self.excluded is None


@dataclass(frozen=True, slots=True)
class Policy:
    """The four image_update_* fields, parsed once."""

    strategy: Strategy
    constraint: Constraint | None
    follow_tag: str | None
    allow: AllowTags
    ignore: IgnoreTags

    @classmethod
    def parse(
        cls,
        strategy: str | None = None,
        constraint: str | None = None,
        allow_tags: str | None = None,
        ignore_tags: str | None = None,
    ) -> Policy:
        """Parse the fields as stored; raises PolicyError where the updater could not apply them."""
        parsed = parse_strategy(strategy)
        semver_constraint: Constraint | None = None
        follow: str | None = None
        if parsed is Strategy.SEMVER and constraint:
            try:
                semver_constraint = Constraint.parse(constraint)
            except ConstraintError as exc:
                raise PolicyError(f"constraint {constraint!r}: {exc}") from None
        elif parsed is Strategy.DIGEST:
            if not constraint:
                raise PolicyError("the digest strategy needs the tag to follow as its constraint")
            follow = constraint
        return cls(parsed, semver_constraint, follow, parse_allow_tags(allow_tags), parse_ignore_tags(ignore_tags))


@dataclass(frozen=True, slots=True)
class Selection:
    """Every candidate's verdict (in the order given), the winner and why, and whether it is a change."""

    verdicts: tuple[Verdict, ...]
    winner: Candidate | None
    why: str
    changed: bool

    @property
    def kept(self) -> tuple[Candidate, ...]:
        return tuple(v.candidate for v in self.verdicts if v.kept)


def _filter(policy: Policy, candidate: Candidate) -> tuple[Exclusion | None, str, Version | None]:
    tag = candidate.tag
    if policy.ignore.disables_updates:
        return Exclusion.UPDATES_DISABLED, "ignore-tags is '*': updates are off", None
    pattern = policy.ignore.ignored_by(tag)
    if pattern is not None:
        return Exclusion.IGNORED, f"ignored by pattern {pattern!r}", None
    if not policy.allow.allows(tag):
        return Exclusion.NOT_ALLOWED, f"not allowed by {policy.allow.text!r}", None
    strategy = policy.strategy
    if strategy is Strategy.SEMVER:
        version = parse_version(tag)
        if version is None:
            return Exclusion.NOT_SEMVER, "not a semantic version", None
        if policy.constraint is None:
            if version.prerelease:
                return Exclusion.PRERELEASE, "a pre-release, and there is no constraint asking for one", None
        elif not policy.constraint.check(version):
            if version.prerelease and not any(include for _, include in policy.constraint._groups):
                return (
                    Exclusion.PRERELEASE,
                    f"a pre-release, and constraint {policy.constraint.text!r} names none",
                    None,
                )
            return Exclusion.OUTSIDE_CONSTRAINT, f"outside constraint {policy.constraint.text!r}", None
        return None, f"kept: version {version}", version
    if strategy is Strategy.NEWEST_BUILD and candidate.created is None:
        return Exclusion.NO_CREATED_TIME, "the image config has no created time", None
    if strategy is Strategy.DIGEST:
        if tag != policy.follow_tag:
            return Exclusion.NOT_FOLLOWED_TAG, f"not the followed tag {policy.follow_tag!r}", None
        if candidate.digest is None:
            return Exclusion.NO_DIGEST, "the registry gave no digest for it", None
    return None, "kept", None


def select_tag(
    policy: Policy,
    candidates: list[Candidate] | tuple[Candidate, ...],
    current_tag: str | None,
    current_digest: str | None = None,
) -> Selection:
    """Apply the policy to the repository's tags as Argo CD Image Updater does; pure, O(n log n)."""
    verdicts: list[Verdict] = []
    kept: list[tuple[Candidate, Version | None]] = []
    for candidate in candidates:
        excluded, reason, version = _filter(policy, candidate)
        verdicts.append(Verdict(candidate, excluded, reason))
        if excluded is None:
            kept.append((candidate, version))
    done = tuple(verdicts)

    if policy.ignore.disables_updates:
        return Selection(done, None, "ignore-tags is '*': updates are off for this image", False)
    if policy.strategy is Strategy.SEMVER and current_tag and parse_version(current_tag) is None:
        # The Go updater refuses to move off a tag that is not a version under this strategy.
        return Selection(done, None, f"the current tag {current_tag!r} is not a semantic version", False)
    if not kept:
        return Selection(done, None, "no candidate tag is left after the rules", False)

    strategy = policy.strategy
    if strategy is Strategy.SEMVER:
        # Equal versions (1.2.3, v1.2.3, 1.2.3+b) keep the current tag, else the last by name.
        best, version = max(kept, key=lambda cv: (cv[1].key if cv[1] else (), cv[0].tag == current_tag, cv[0].tag))
        within = f" within {policy.constraint.text!r}" if policy.constraint else ""
        why = f"highest semantic version{within}: {version}"
    elif strategy is Strategy.NEWEST_BUILD:
        best = max((c for c, _ in kept), key=lambda c: (c.created, c.tag))
        created = best.created.isoformat() if best.created else "?"
        why = f"most recently built: created {created}"
    elif strategy is Strategy.ALPHABETICAL:
        best = max((c for c, _ in kept), key=lambda c: c.tag.encode())
        why = "last in lexical (byte-wise) order"
    else:
        best = kept[0][0]
        if current_digest is None or best.digest != current_digest:
            why = f"tag {best.tag!r} now points at {best.digest}"
            return Selection(done, best, why, True)
        return Selection(done, best, f"tag {best.tag!r} still points at {best.digest}", False)

    changed = best.tag != current_tag
    if not changed:
        why += " (already deployed)"
    return Selection(done, best, why, changed)
