"""Rules that span fields or list entries: what app_type requires, image-update pairs, duplicates, counts."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from apphosting import health, imagepolicy, images
from apphosting.settings import Limits
from services.deployments.validation.checks import control_char, shown
from services.deployments.validation.model import (
    APP_TYPES,
    ENV_NAME,
    ENV_NAME_MAX,
    ENV_VALUE_CONTROLS_ALLOWED,
    HELM_ONLY_FIELDS,
    IMAGE_UPDATE_FIELD_MAX,
    IMAGE_UPDATE_FIELDS,
    IMAGE_UPDATE_STRATEGIES,
)
from services.deployments.validation.violations import Loc

__all__ = ["cross_field", "judged_fields"]

# How much of each key a path into `config` repeats.
_KEY_SHOWN = 32
# What each app_type requires to be set (helm: the chart; any other: the image).
_HELM_REQUIRED = ("helm_repo_url", "helm_chart_name")
_IMAGE_REQUIRED = ("docker_image",)
# Fields every rule set needs besides those it checks: what the model requires, and those whose values
# decide which rules below apply.
_ALWAYS_JUDGED = ("geographic_region", "deployment_name", "app_type", "deployment_type")
# The fields a rule below pairs with each field: the image-update settings need an image and agree with
# each other; a database needs storage_size_gb or a volume.
_IMAGE_FIELDS = (*_IMAGE_REQUIRED, *IMAGE_UPDATE_FIELDS)
_PAIRED: dict[str, tuple[str, ...]] = {
    **{name: _IMAGE_FIELDS for name in _IMAGE_FIELDS},
    "storage_size_gb": ("volumes",),
    "volumes": ("storage_size_gb",),
}


def judged_fields(data: Mapping[str, Any], changed: Iterable[str]) -> list[str]:
    """The fields a change of `changed` in an otherwise valid spec is validated on: those, the fields the
    rules pair them with and the fields every rule needs (each once, in a stable order)."""
    app_type = data.get("app_type", "helm")
    names = [*_ALWAYS_JUDGED, *(_HELM_REQUIRED if app_type == "helm" else _IMAGE_REQUIRED)]
    for name in changed:
        names.append(name)
        names.extend(_PAIRED.get(name, ()))
    return list(dict.fromkeys(names))


def cross_field(data: Mapping[str, Any], limits: Limits) -> Iterator[tuple[Loc, str, str]]:
    """Rules spanning fields or list entries, on the raw data so they run even when fields are invalid."""
    config = data.get("config")
    if isinstance(config, Mapping):
        problem = health.check_path_problem(config.get(health.CHECK_PATH_KEY))
        if problem is not None:
            yield ("config", health.CHECK_PATH_KEY), "INVALID_VALUE", problem
        where = _non_finite(config, limits.config_max_depth)
        if where is not None:
            yield (
                ("config", *where),
                "INVALID_VALUE",
                "must be a finite number: JSON has no NaN or Infinity",
            )

    app_type = data.get("app_type", "helm")
    image_set = all(field in data for field in _IMAGE_REQUIRED)

    if app_type == "helm":
        for field in _HELM_REQUIRED:
            if field not in data:
                yield (field,), "REQUIRED", "is required when app_type is helm"
    elif isinstance(app_type, str) and app_type in APP_TYPES:
        if not image_set:
            yield ("docker_image",), "REQUIRED", f"is required when app_type is {app_type} (not helm)"
        for field in HELM_ONLY_FIELDS:
            if field in data:
                yield (
                    (field,),
                    "NOT_ALLOWED",
                    f"must not be set when app_type is {app_type}; it applies only to app_type helm",
                )
    if app_type == "database" and "storage_size_gb" not in data and not data.get("volumes"):
        yield (
            ("storage_size_gb",),
            "REQUIRED",
            "is required when app_type is database (it needs persistent storage): "
            "set storage_size_gb or at least one volume",
        )

    if not image_set:
        for field in IMAGE_UPDATE_FIELDS:
            if field in data:
                yield (
                    (field,),
                    "NOT_ALLOWED",
                    "must not be set without docker_image: there is no image to update",
                )
    strategy = data.get("image_update_strategy")
    constraint = data.get("image_update_constraint")
    if "image_update_constraint" in data and "image_update_strategy" not in data:
        yield (
            ("image_update_strategy",),
            "REQUIRED",
            f"is required when image_update_constraint is set; one of {', '.join(IMAGE_UPDATE_STRATEGIES)}",
        )
    elif strategy == "digest" and "image_update_constraint" not in data:
        yield (
            ("image_update_constraint",),
            "REQUIRED",
            "is required when image_update_strategy is digest: the tag whose digest to follow",
        )
    elif isinstance(constraint, str) and constraint.strip() == constraint != "":
        # A value over its bound is refused as TOO_LONG alone, and not parsed: the range search still reads a
        # run of version characters or spaces once from each of its positions (0.16 s at 20,000 characters).
        if strategy == "semver" and len(constraint) <= IMAGE_UPDATE_FIELD_MAX and not _constraint_ok(constraint):
            yield (
                ("image_update_constraint",),
                "INVALID_FORMAT",
                "must be a semver constraint such as ^1.2, ~1.2.3, '>=1.0 <2.0' or 1.x when "
                f"image_update_strategy is semver, got {constraint[:80]!r}",
            )
        elif strategy == "digest" and not images.TAG.fullmatch(constraint):
            yield (
                ("image_update_constraint",),
                "INVALID_FORMAT",
                f"must be an image tag when image_update_strategy is digest, got {constraint[:80]!r}",
            )
        elif strategy in ("newest-build", "alphabetical"):
            # Image Updater ignores it for these strategies; accepting it would mislead the user.
            yield (
                ("image_update_constraint",),
                "NOT_ALLOWED",
                f"must not be set with image_update_strategy {strategy}; it applies to semver and digest "
                "(use image_allow_tags to filter tags)",
            )

    env = data.get("environment_variables")
    if isinstance(env, list | tuple):
        if len(env) > limits.environment_variables_max:
            yield (
                ("environment_variables",),
                "TOO_LONG",
                f"must have at most {limits.environment_variables_max} entries, got {len(env)}",
            )
        total = sum(len(entry.encode(errors="replace")) for entry in env if isinstance(entry, str))
        if total > limits.environment_total_max_bytes:
            yield (
                ("environment_variables",),
                "TOO_LONG",
                f"must hold at most {limits.environment_total_max_bytes} bytes in all (UTF-8), got {total}",
            )
        first_seen: dict[str, int] = {}
        for index, entry in enumerate(env):
            if not isinstance(entry, str) or "=" not in entry:
                continue
            name = entry.partition("=")[0]
            if name in first_seen:
                yield (
                    ("environment_variables", index),
                    "DUPLICATE",
                    f"sets {shown(name)} again (first set at environment_variables[{first_seen[name]}]); "
                    "names must be unique",
                )
            else:
                first_seen[name] = index
            value = entry.partition("=")[2]
            bad = control_char(value, ENV_VALUE_CONTROLS_ALLOWED)
            if bad is not None and len(name) <= ENV_NAME_MAX and ENV_NAME.fullmatch(name):
                yield (
                    ("environment_variables", name),
                    "INVALID_FORMAT",
                    f"must not contain control characters other than tab and line breaks (found {bad!r})",
                )

    volumes = data.get("volumes")
    if isinstance(volumes, list | tuple):
        if len(volumes) > limits.volumes_max:
            yield (
                ("volumes",),
                "TOO_LONG",
                f"must have at most {limits.volumes_max} entries, got {len(volumes)}",
            )
        paths: dict[str, int] = {}
        for index, volume in enumerate(volumes):
            path = volume.get("path") if isinstance(volume, Mapping) else None
            if not isinstance(path, str) or path == "":
                continue
            if path in paths:
                yield (
                    ("volumes", index, "path"),
                    "DUPLICATE",
                    f"mounts {shown(path)} again (already used by volumes[{paths[path]}]); paths must be unique",
                )
            else:
                paths[path] = index


def _non_finite(config: Mapping[str, Any], max_depth: int) -> tuple[str | int, ...] | None:
    """The path to the first NaN or Infinity in `config` (keys cut short), or None; stops at `max_depth`."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(config, ())]
    while stack:
        item, where = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return where
        if len(where) >= max_depth:
            continue
        if isinstance(item, Mapping):
            children = [(value, (*where, str(key)[:_KEY_SHOWN])) for key, value in item.items()]
        elif isinstance(item, list):
            children = [(value, (*where, index)) for index, value in enumerate(item)]
        else:
            continue
        # Reversed, so the first key or entry is looked at first.
        stack.extend(reversed(children))
    return None


def _constraint_ok(text: str) -> bool:
    """Whether the updater can read `text` as a Masterminds semver constraint (apphosting.imagepolicy)."""
    try:
        imagepolicy.Constraint.parse(text)
    except imagepolicy.ConstraintError:
        return False
    return True
