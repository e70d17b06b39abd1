"""Validation of a create request: every rule of the REST contract plus the platform's bounds, all at once."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from apphosting import netguard
from apphosting.settings import Limits
from services.deployments.validation.cross_field import cross_field
from services.deployments.validation.model import MAX_CHARS, DeploymentSpec
from services.deployments.validation.violations import (
    Loc,
    SpecInvalid,
    Violation,
    from_pydantic,
    in_field_order,
    order,
    path,
)

__all__ = ["validate_create", "validate_create_resolving"]


def _without_unset(data: Mapping[str, Any]) -> dict[str, Any]:
    # A null is how JSON and proto3 optional say "not set", so it means the field's default.
    cleaned = {key: value for key, value in data.items() if value is not None}
    volumes = cleaned.get("volumes")
    if isinstance(volumes, list | tuple):
        cleaned["volumes"] = [
            {k: v for k, v in volume.items() if v is not None} if isinstance(volume, Mapping) else volume
            for volume in volumes
        ]
    return cleaned


def validate_create(data: Mapping[str, Any], *, limits: Limits, regions: Collection[str]) -> DeploymentSpec:
    """Checks a create request; raises SpecInvalid listing every violation, in request field order.

    `data` holds only the fields the caller set; volumes entries are dicts with path, sizeGb, purpose.
    """
    cleaned = _without_unset(data)
    found: list[tuple[Loc, str, str]] = []
    spec: DeploymentSpec | None = None
    try:
        spec = DeploymentSpec.model_validate(cleaned, context={"limits": limits, "regions": regions})
    except ValidationError as exc:
        found.extend(from_pydantic(error) for error in exc.errors(include_url=False, include_input=False))
    # A field over its length bound gets that one violation: no other rule has judged all of it.
    oversized = {loc for loc, reason, _ in found if reason == "TOO_LONG" and len(loc) == 1 and loc[0] in MAX_CHARS}
    found.extend(item for item in cross_field(cleaned, limits) if item[0][:1] not in oversized)
    if found or spec is None:
        found.sort(key=lambda item: order(item[0]))
        raise SpecInvalid([Violation(path(loc), f"{path(loc)} {message}", reason) for loc, reason, message in found])
    return spec


async def validate_create_resolving(
    data: Mapping[str, Any],
    *,
    limits: Limits,
    regions: Collection[str],
    resolver: netguard.Resolver | None = None,
) -> DeploymentSpec:
    """validate_create, plus what `helm_repo_url`'s host name resolves to now (it must be a public address).

    A name that does not resolve is let through: DNS may be briefly unavailable, and whatever fetches
    the chart checks the name again at the time of use (`apphosting.netguard.resolve_public`).
    """
    violations: list[Violation] = []
    spec: DeploymentSpec | None = None
    try:
        spec = validate_create(data, limits=limits, regions=regions)
    except SpecInvalid as invalid:
        violations.extend(invalid.violations)
    url = data.get("helm_repo_url")
    if isinstance(url, str) and not any(v.field == "helm_repo_url" for v in violations):
        host = urlsplit(url).hostname
        if host:
            try:
                await netguard.resolve_public(host, allowed=limits.helm_repo_hosts, resolver=resolver)
            except netguard.Refused as refused:
                violations.append(
                    Violation(
                        "helm_repo_url",
                        f"helm_repo_url must name a public host the platform may fetch from; {refused}",
                        "NOT_ALLOWED",
                    )
                )
            except netguard.Unresolvable:
                pass
    if violations or spec is None:
        raise SpecInvalid(in_field_order(violations))
    return spec
