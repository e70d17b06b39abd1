"""Day-2 operations: when each is refused, and the change each makes to a deployment's desired state."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from google.protobuf import field_mask_pb2

from apphosting.v1 import deployments_pb2 as pb
from services.deployments import errors
from services.deployments.convert import _volume_to_data, etag, has, struct_to_python
from services.deployments.errors import FieldViolation, ServiceError
from services.deployments.lifecycle import ADOPTED_OPERATIONS, OPERATIONS, operation_allowed
from services.deployments.quotas import demand_of_spec
from services.deployments.store import EventInput, NewRelease
from services.deployments.tables import DeploymentRow

# What an update may change (AIP-134 update_mask paths); storage only grows, volumes are only added.
UPDATABLE = (
    "docker_image",
    "helm_chart_version",
    "custom_values_yaml",
    "config",
    "environment_variables",
    "secret_environment_variables",
    "cpu_request",
    "memory_request_mb",
    "replicas",
    "container_port",
    "image_update_strategy",
    "image_update_constraint",
    "image_allow_tags",
    "image_ignore_tags",
    "storage_size_gb",
    "volumes",
)
# An update that sets one of these turns automatic image updates on again after a rollback.
IMAGE_POLICY = ("image_update_strategy", "image_update_constraint", "image_allow_tags", "image_ignore_tags")
_FIELDS = frozenset(field.name for field in pb.Deployment.DESCRIPTOR.fields)
# Operations whose release is rolled out where the deployment runs.
_IN_PLACE = frozenset({"running"})
# Namespaces no deployment may adopt: the cluster's own, and the platform's vCluster namespaces.
_SYSTEM_NAMESPACE = re.compile(r"^(kube-.*|vc-[0-9a-f]{12}(-.*)?)$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_etag(row: DeploymentRow, given: str) -> None:
    """AIP-154: a given etag must be the record's current one."""
    current = etag(row.revision)
    if given and given != current:
        raise ServiceError(
            grpc.StatusCode.ABORTED,
            "ETAG_MISMATCH",
            f"etag {errors.echo(given)} is stale: the deployment changed since (now {current}); get it and try again",
            metadata={"etag": current},
        )


def check_idle(row: DeploymentRow, operation: str) -> None:
    """One operation at a time; a delete supersedes whatever is in flight."""
    if row.operation and operation != "delete":
        raise ServiceError(
            grpc.StatusCode.ABORTED,
            "OPERATION_IN_FLIGHT",
            f"{row.operation} of release {row.release} is in flight; watch the deployment and try again once it ends",
            metadata={"operation": row.operation, "release": str(row.release)},
        )


def check_allowed(row: DeploymentRow, operation: str) -> None:
    if operation_allowed(operation, row.status, adopted=row.is_adopted):
        return
    if row.is_adopted and operation not in ADOPTED_OPERATIONS:
        raise ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "ADOPTED",
            f"{operation} is not available for an adopted deployment: it is managed in place "
            "(delete releases it, or with force deletes its workloads)",
            metadata={"operation": operation},
        )
    allowed_from = ", ".join(sorted(OPERATIONS[operation]))
    raise ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "OPERATION_NOT_ALLOWED",
        f"{operation} is not allowed while the deployment is {row.status} (allowed from: {allowed_from})",
        metadata={"status": row.status, "operation": operation},
    )


def precheck(row: DeploymentRow, operation: str, given_etag: str, release: int | None = None) -> None:
    """Refusals common to every operation: a stale etag, another operation in flight, the lifecycle.

    With `release`, the record must still be at that release (the new spec was made from it).
    """
    check_etag(row, given_etag)
    check_idle(row, operation)
    check_allowed(row, operation)
    if release is not None and row.release != release:
        raise ServiceError(
            grpc.StatusCode.ABORTED,
            "CONCURRENT_CHANGE",
            f"the deployment moved to release {row.release} while this {operation} was checked; try again",
            metadata={"release": str(row.release)},
        )


def updated_spec(spec: Mapping[str, Any], deployment: pb.Deployment, mask: field_mask_pb2.FieldMask) -> dict[str, Any]:
    """The spec with the masked fields of `deployment`; INVALID_ARGUMENT naming each path that cannot be."""
    paths = list(mask.paths)
    if not paths:
        raise errors.invalid_field(
            "update_mask", "update_mask must name the fields to change, e.g. paths: [docker_image]", "REQUIRED"
        )
    violations: list[FieldViolation] = []
    for index, path in enumerate(paths):
        where = f"update_mask.paths[{index}]"
        if path in UPDATABLE:
            continue
        if path == "*":
            violations.append(
                FieldViolation(where, "a full replacement (*) is not supported; name each field", "NOT_ALLOWED")
            )
        elif path.split(".", 1)[0] in UPDATABLE:
            violations.append(
                FieldViolation(
                    where,
                    f"{errors.echo(path)}: a field is updated as a whole; name {path.split('.')[0]}",
                    "NOT_ALLOWED",
                )
            )
        elif path in _FIELDS or path == "deployment_name":
            violations.append(
                FieldViolation(
                    where,
                    f"{path} cannot be changed by an update (updatable: {', '.join(UPDATABLE)}); "
                    "promote the deployment to get a copy that differs in it",
                    "IMMUTABLE_FIELD",
                )
            )
        else:
            violations.append(
                FieldViolation(where, f"{errors.echo(path)} is not a field of Deployment", "UNKNOWN_FIELD")
            )
    if violations:
        raise errors.invalid_argument(violations)
    data = dict(spec)
    for path in dict.fromkeys(paths):
        if path == "secret_environment_variables":
            # Sealed by the servicer, which holds the key file and the stored envelopes.
            continue
        value: Any
        if path == "config":
            value = struct_to_python(deployment.config) if deployment.HasField("config") else None
        elif path == "environment_variables":
            value = list(deployment.environment_variables) or None
        elif path == "volumes":
            value = [_volume_to_data(volume) for volume in deployment.volumes] or None
        else:
            value = getattr(deployment, path) if has(deployment, path) else None
        data[path] = value
    return {key: value for key, value in data.items() if value is not None}


def growth_violations(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str) -> list[FieldViolation]:
    """Storage is never shrunk: storage_size_gb only grows, volumes are only added."""
    found = []
    before, after = old.get("storage_size_gb"), new.get("storage_size_gb")
    if before is not None and (after is None or after < before):
        found.append(
            FieldViolation(
                f"{prefix}storage_size_gb",
                f"storage_size_gb can only grow: it is {before} GiB, asked {after if after is not None else 'unset'} "
                "(a volume is never shrunk: its data would not fit)",
                "CANNOT_SHRINK",
            )
        )
    kept = {volume["path"]: volume for volume in new.get("volumes") or ()}
    for volume in old.get("volumes") or ():
        now = kept.get(volume["path"])
        size = volume.get("size_gb")
        if now is None:
            found.append(
                FieldViolation(
                    f"{prefix}volumes",
                    f"volume {volume['path']} cannot be removed by an update (volumes are only added)",
                    "CANNOT_SHRINK",
                )
            )
        elif now.get("size_gb", size) != size:
            found.append(
                FieldViolation(
                    f"{prefix}volumes",
                    f"volume {volume['path']} keeps its size ({size} GiB); add a volume for more room",
                    "CANNOT_SHRINK",
                )
            )
    return found


def release_change(
    row: DeploymentRow,
    *,
    operation: str,
    spec: dict[str, Any],
    actor: str,
    reason: str,
    rollback_of: int | None = None,
    images: bool | None = None,
) -> EventInput:
    """A new release with `spec`: rolled out now when the deployment runs, else by its next start or retry.

    `images` True turns automatic image updates on again, False pauses them (a rollback).
    """
    number = row.release + 1
    demand = demand_of_spec(spec)
    rolls_out = row.status in _IN_PLACE
    record: dict[str, Any] = {
        "spec": spec,
        "release": number,
        "operation": operation if rolls_out else None,
        "cpu_millis": demand.cpu_millis,
        "memory_mb": demand.memory_mb,
        "storage_gb": demand.storage_gb,
    }
    if rolls_out:
        record["error_message"] = None
    if images is not None:
        record["image_updates_paused"] = not images
    when = "rolling out" if rolls_out else f"recorded; it rolls out when the {row.status} deployment next starts"
    if row.status in ("failed", "error"):
        when = "recorded; retry the deployment to roll it out"
    of = f" (the spec of release {rollback_of})" if rollback_of is not None else ""
    return EventInput(
        event_id=f"api:{row.id}:{operation}:{row.revision}",
        status=row.status,
        phase=f"{operation}_requested",
        message=f"{operation} requested: release {number}{of}, {when}" + (f"; reason: {reason}" if reason else ""),
        source="api",
        actor=actor,
        operation=operation,
        release=number,
        record=record,
        new_release=NewRelease(spec=spec, operation=operation, actor=actor, reason=reason, rollback_of=rollback_of),
    )


def request_change(
    row: DeploymentRow, *, operation: str, status: str, actor: str, reason: str, record: Mapping[str, Any] = {}
) -> EventInput:
    """An operation that keeps the release: stop, start, delete, promote, migrate."""
    return EventInput(
        event_id=f"api:{row.id}:{operation}:{row.revision}",
        status=status,
        phase=f"{operation}_requested",
        message=f"{operation} requested" + (f"; reason: {reason}" if reason else ""),
        source="api",
        actor=actor,
        operation=operation,
        release=row.release,
        record={"operation": operation, **record},
    )


def adopt_violations(namespace: str, location: str, known: Iterable[str]) -> list[FieldViolation]:
    found = []
    if not location:
        found.append(FieldViolation("location", "location is required: the id of the host cluster", "REQUIRED"))
    elif location not in set(known):
        found.append(
            FieldViolation("location", f"location {errors.echo(location)} is not a known location", "NOT_FOUND")
        )
    if not namespace:
        found.append(FieldViolation("source_namespace", "source_namespace is required", "REQUIRED"))
    elif len(namespace) > 63 or not _LABEL.fullmatch(namespace):
        found.append(
            FieldViolation(
                "source_namespace",
                f"source_namespace must be a Kubernetes namespace name (DNS-1123 label), got {errors.echo(namespace)}",
                "INVALID_FORMAT",
            )
        )
    elif _SYSTEM_NAMESPACE.fullmatch(namespace):
        found.append(
            FieldViolation(
                "source_namespace",
                f"{namespace} belongs to the cluster or the platform (kube-*, vc-<id>) and cannot be adopted",
                "NOT_ALLOWED",
            )
        )
    return found
