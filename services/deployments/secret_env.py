"""Secret environment values: checked, sealed at once, and kept in the spec only as envelopes or references.

A spec stores `secret_environment_variables` as a list of
``{"name", "version", "envelope"}`` (a sealed value) or ``{"name", "version", "secret_ref": {"name", "key"}}``
(a key of an existing Kubernetes Secret). No plaintext is ever stored: the servicer seals each value
as it arrives, before anything is validated further or written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from apphosting import secrets
from apphosting.settings import Limits
from apphosting.v1 import bus_pb2
from apphosting.v1 import deployments_pb2 as pb
from services.deployments import errors
from services.deployments.errors import FieldViolation
from services.deployments.validation.model import ENV_NAME, ENV_NAME_MAX

FIELD = "secret_environment_variables"
# A Secret's name (a DNS-1123 subdomain) and a key of its data, as the Kubernetes API validates them.
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_K8S_NAME_MAX = 253


def stored(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The sealed entries of a spec (empty when it has none)."""
    return list(spec.get(FIELD) or ())


def env_names(spec: Mapping[str, Any]) -> list[str]:
    return [entry.partition("=")[0] for entry in spec.get("environment_variables") or ()]


def seal(
    entries: Sequence[pb.SecretEnvironmentVariable],
    *,
    deployment_id: str,
    ring: secrets.KeyRing | None,
    limits: Limits,
    previous: Sequence[Mapping[str, Any]] = (),
    prefix: str = "",
    updating: bool = False,
    also: Sequence[FieldViolation] = (),
) -> list[dict[str, Any]]:
    """The stored form of `entries`, replacing `previous` (an update's mask replaces the set).

    An entry with a name alone keeps the stored one of that name (update only); a value equal to the
    stored one keeps its version, a changed value or reference goes one version up. INVALID_ARGUMENT
    naming each bad entry, after the violations `also` found elsewhere in the request; with no key file
    configured, values are refused (references are not).
    """
    violations: list[FieldViolation] = list(also)
    before = {entry["name"]: entry for entry in previous}
    seen: dict[str, int] = {}
    result: list[dict[str, Any]] = []
    if len(entries) > limits.environment_variables_max:
        violations.append(
            FieldViolation(
                prefix + FIELD,
                f"must have at most {limits.environment_variables_max} entries, got {len(entries)}",
                "TOO_MANY",
            )
        )
        raise errors.invalid_argument(violations)
    for index, entry in enumerate(entries):
        where = f"{prefix}{FIELD}[{index}]"
        name = entry.name
        if not name:
            violations.append(FieldViolation(f"{where}.name", "name is required", "REQUIRED"))
            continue
        if len(name) > ENV_NAME_MAX or not ENV_NAME.fullmatch(name):
            violations.append(
                FieldViolation(
                    f"{where}.name",
                    f"name {errors.echo(name)} must match [A-Za-z_][A-Za-z0-9_]* (at most {ENV_NAME_MAX} characters)",
                    "INVALID_FORMAT",
                )
            )
            continue
        if name in seen:
            violations.append(
                FieldViolation(
                    f"{where}.name",
                    f"{name} is set again (first at {prefix}{FIELD}[{seen[name]}]); each name once",
                    "DUPLICATE",
                )
            )
            continue
        seen[name] = index
        old = before.get(name)
        source = entry.WhichOneof("source")
        if source is None:
            if updating and old is not None:
                result.append(dict(old))
                continue
            violations.append(
                FieldViolation(
                    where,
                    f"{name} needs exactly one of value or secret_ref"
                    + (" (a name alone keeps a stored value; none is stored under this name)" if updating else ""),
                    "REQUIRED",
                )
            )
            continue
        version = int(old["version"]) if old is not None else 0
        if source == "secret_ref":
            ref = {"name": entry.secret_ref.name, "key": entry.secret_ref.key}
            found = _ref_violations(ref, f"{where}.secret_ref")
            if found:
                violations.extend(found)
                continue
            same = old is not None and old.get("secret_ref") == ref
            result.append({"name": name, "version": version if same else version + 1, "secret_ref": ref})
            continue
        size = len(entry.value.encode())
        if size > limits.environment_value_max_bytes:
            violations.append(
                FieldViolation(
                    f"{where}.value",
                    f"is {size} bytes; at most {limits.environment_value_max_bytes} are allowed",
                    "TOO_LONG",
                )
            )
            continue
        if ring is None:
            violations.append(
                FieldViolation(
                    f"{where}.value",
                    "secret values are not accepted here: the API runs without --secret-key-file "
                    "(a secret_ref to an existing Secret is)",
                    "NOT_SUPPORTED",
                )
            )
            continue
        if old is not None and "envelope" in old and _opens_to(ring, old["envelope"], deployment_id, name, entry.value):
            result.append(dict(old))
            continue
        result.append({"name": name, "version": version + 1, "envelope": ring.seal(entry.value, deployment_id, name)})
    if violations:
        raise errors.invalid_argument(violations)
    return result


def _opens_to(ring: secrets.KeyRing, envelope: str, deployment_id: str, name: str, value: str) -> bool:
    try:
        return ring.open(envelope, deployment_id, name) == value
    except secrets.SecretKeyError:
        return False


def _ref_violations(ref: Mapping[str, str], where: str) -> list[FieldViolation]:
    found = []
    if not ref["name"]:
        found.append(FieldViolation(f"{where}.name", "name is required: the Secret to read", "REQUIRED"))
    elif len(ref["name"]) > _K8S_NAME_MAX or not _SECRET_NAME.fullmatch(ref["name"]):
        found.append(
            FieldViolation(
                f"{where}.name",
                f"{errors.echo(ref['name'])} is not a Kubernetes Secret name (DNS-1123 subdomain)",
                "INVALID_FORMAT",
            )
        )
    if not ref["key"]:
        found.append(FieldViolation(f"{where}.key", "key is required: the key of the Secret's data", "REQUIRED"))
    elif len(ref["key"]) > _K8S_NAME_MAX or not _SECRET_KEY.fullmatch(ref["key"]):
        found.append(
            FieldViolation(
                f"{where}.key",
                f"{errors.echo(ref['key'])} is not a Secret data key (letters, digits, '-', '_', '.')",
                "INVALID_FORMAT",
            )
        )
    return found


def overlap_violations(spec: Mapping[str, Any], prefix: str = "") -> list[FieldViolation]:
    """A name set both in environment_variables and as a secret."""
    secret_names = {entry["name"]: index for index, entry in enumerate(stored(spec))}
    return [
        FieldViolation(
            f"{prefix}{FIELD}[{secret_names[name]}].name",
            f"{name} is also set in environment_variables[{index}]; a name is plain or secret, not both",
            "DUPLICATE",
        )
        for index, name in enumerate(env_names(spec))
        if name in secret_names
    ]


def resealed(spec: Mapping[str, Any], source_id: str, target_id: str, ring: secrets.KeyRing | None) -> dict[str, Any]:
    """A spec copied from deployment `source_id` to `target_id` (a promote): each value sealed for the copy."""
    entries = stored(spec)
    if not any("envelope" in entry for entry in entries):
        return dict(spec)
    if ring is None:
        raise errors.invalid_field(
            FIELD, "the deployment has secret values and the API runs without --secret-key-file", "NOT_SUPPORTED"
        )
    copied = []
    for entry in entries:
        if "envelope" in entry:
            value = open_or_fail(ring, entry["envelope"], source_id, entry["name"])
            entry = {**entry, "envelope": ring.seal(value, target_id, entry["name"])}
        copied.append(entry)
    return {**spec, FIELD: copied}


def open_or_fail(ring: secrets.KeyRing, envelope: str, deployment_id: str, name: str) -> str:
    try:
        return ring.open(envelope, deployment_id, name)
    except secrets.SecretKeyError as failure:
        raise errors.secret_unopenable(name, str(failure)) from None


def sealed_for_bus(spec: Mapping[str, Any]) -> list[bus_pb2.SealedSecret]:
    """The spec's sealed values as a job carries them (references travel in the Deployment)."""
    return [
        bus_pb2.SealedSecret(name=entry["name"], version=int(entry["version"]), envelope=entry["envelope"].encode())
        for entry in stored(spec)
        if "envelope" in entry
    ]


def rewrapped(spec: Mapping[str, Any], ring: secrets.KeyRing) -> dict[str, Any] | None:
    """The spec with every envelope's data key wrapped by the sealing key; None when none changes."""
    entries = stored(spec)
    changed = False
    result = []
    for entry in entries:
        if "envelope" in entry:
            envelope = ring.rewrap(entry["envelope"])
            if envelope != entry["envelope"]:
                changed = True
                entry = {**entry, "envelope": envelope}
        result.append(entry)
    return {**spec, FIELD: result} if changed else None
