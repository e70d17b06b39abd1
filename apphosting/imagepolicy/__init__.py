"""Argo CD Image Updater's image update policies as a pure library: strategies, constraints, tag filters."""

from apphosting.imagepolicy.select import (
    Candidate,
    Exclusion,
    Policy,
    Selection,
    Strategy,
    Verdict,
    parse_strategy,
    select_tag,
)
from apphosting.imagepolicy.semver import Constraint, ConstraintError, Version, parse_version
from apphosting.imagepolicy.tags import (
    AllowTags,
    IgnoreTags,
    PolicyError,
    compile_re2,
    glob_to_regex,
    parse_allow_tags,
    parse_ignore_tags,
)

__all__ = [
    "AllowTags",
    "Candidate",
    "Constraint",
    "ConstraintError",
    "Exclusion",
    "IgnoreTags",
    "Policy",
    "PolicyError",
    "Selection",
    "Strategy",
    "Verdict",
    "Version",
    "compile_re2",
    "glob_to_regex",
    "parse_allow_tags",
    "parse_ignore_tags",
    "parse_strategy",
    "parse_version",
    "select_tag",
]
