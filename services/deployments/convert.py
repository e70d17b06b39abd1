"""Translation between the API's protobuf messages and the service's records."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from google.protobuf.message import Message
from sqlalchemy import Row
from sqlalchemy.orm.attributes import instance_state

from apphosting.v1 import deployments_pb2 as pb
from services.deployments.tables import Base, DeploymentRow, EventRow, ReleaseRow

# Optional scalar fields of the create request, carried over only when the caller set them.
_OPTIONAL_REQUEST_FIELDS = (
    "app_type",
    "cpu_request",
    "memory_request_mb",
    "replicas",
    "container_port",
    "docker_image",
    "storage_size_gb",
    "run_as_uid",
    "deployment_type",
    "helm_repo_url",
    "helm_chart_name",
    "helm_chart_version",
    "custom_values_yaml",
    "image_update_strategy",
    "image_update_constraint",
    "image_allow_tags",
    "image_ignore_tags",
    "kubernetes_version",
)
# Spec fields echoed in the Deployment message under the same name.
_SPEC_SCALARS = tuple(f for f in _OPTIONAL_REQUEST_FIELDS if f != "app_type")
# Observed fields of the record echoed under the same name.
_ROW_OPTIONALS = (
    "values_yaml",
    "git_path",
    "endpoint_url",
    "error_message",
    "source_namespace",
    "provider",
    "region",
    "cluster_status",
    "cluster_error",
    "location_id",
)

# What events change: the record's observed fields. An event stores the ones it changed (their
# values after it); the oldest kept event of a deployment stores them all, as the base the later
# ones are folded onto. The spec is not among them: it is the record's.
OBSERVED = (
    "status",
    "phase",
    "updated_at",
    "deleted_at",
    "is_adopted",
    *_ROW_OPTIONALS,
    "release",
    "healthy_release",
    "operation",
    "promoted_to",
    "image_updates_paused",
    "placement",
)
# Set when the record is made, never changed after.
_FIXED_OPTIONALS = ("promoted_from", "target_location")
_MOMENTS = ("updated_at", "deleted_at")
# The record's columns a Deployment is made of (row_to_proto): what a read for answers selects.
_RECORD_FIXED = (
    "id",
    "user_id",
    "cluster_id",
    "name",
    "app_type",
    "geographic_region",
    "created_at",
    "revision",
    "spec",
    *_FIXED_OPTIONALS,
)
RECORD_COLUMNS = (*_RECORD_FIXED, *OBSERVED)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)
# A deployment record: the ORM's, or a row or mapping of (at least) RECORD_COLUMNS read by name.
Record: TypeAlias = DeploymentRow | Row[Any] | Mapping[str, Any]

APP_TYPES = {
    "web_app": pb.APP_TYPE_WEB_APP,
    "api": pb.APP_TYPE_API,
    "database": pb.APP_TYPE_DATABASE,
    "static_site": pb.APP_TYPE_STATIC_SITE,
    "container": pb.APP_TYPE_CONTAINER,
    "helm": pb.APP_TYPE_HELM,
}
STATUSES: dict[str, pb.DeploymentStatus.ValueType] = {
    name.removeprefix("DEPLOYMENT_STATUS_").lower(): number
    for name, number in pb.DeploymentStatus.items()
    if number != pb.DEPLOYMENT_STATUS_UNSPECIFIED
}
STATUS_NAMES: dict[int, str] = {number: name for name, number in STATUSES.items()}


def has(message: Message, name: str) -> bool:
    """HasField for a field named at run time."""
    return message.HasField(name)


def clear(message: Message, name: str) -> None:
    """ClearField for a field named at run time."""
    message.ClearField(name)


def request_to_data(request: pb.CreateAppHostingDeploymentRequest) -> dict[str, Any]:
    """The fields the caller set, as the contract's JSON would hold them; unset optionals are absent."""
    data: dict[str, Any] = {
        "geographic_region": request.geographic_region,
        "deployment_name": request.deployment_name,
    }
    data.update(set_fields(request, _OPTIONAL_REQUEST_FIELDS))
    return data


def set_fields(message: Message, scalars: Iterable[str]) -> dict[str, Any]:
    """The optional `scalars` the message has set, and its config, environment_variables and volumes
    when it has such fields and they are set, as the contract's JSON holds them."""
    data: dict[str, Any] = {name: getattr(message, name) for name in scalars if has(message, name)}
    fields = message.DESCRIPTOR.fields_by_name
    # Any of the request, update and promote messages: read by name, whichever it is.
    spec: Any = message
    if "config" in fields and spec.HasField("config"):
        data["config"] = struct_to_python(spec.config)
    if "environment_variables" in fields and spec.environment_variables:
        data["environment_variables"] = list(spec.environment_variables)
    if "volumes" in fields and spec.volumes:
        data["volumes"] = [_volume_to_data(v) for v in spec.volumes]
    return data


def struct_to_python(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as JSON-like Python, keeping NaN and Infinity (MessageToDict raises on them) for validation to name."""
    return {key: _value_to_python(value) for key, value in struct.fields.items()}


def _value_to_python(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return struct_to_python(value.struct_value)
    if kind == "list_value":
        return [_value_to_python(item) for item in value.list_value.values]
    if kind is None or kind == "null_value":
        return None
    return getattr(value, kind)


def _volume_to_data(volume: pb.VolumeConfig) -> dict[str, Any]:
    data: dict[str, Any] = {"path": volume.path}
    if volume.HasField("size_gb"):
        data["sizeGb"] = volume.size_gb
    if volume.HasField("purpose"):
        data["purpose"] = volume.purpose
    return data


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    """What Timestamp.FromDatetime makes (a naive moment is UTC), for a fraction of its cost."""
    return timestamp_pb2.Timestamp(**_timestamp_fields(moment))


def _timestamp_fields(moment: datetime) -> dict[str, int]:
    """A Timestamp's fields, for a constructor to fill the message in place instead of copying one in."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return {"seconds": (moment - _EPOCH) // _SECOND, "nanos": moment.microsecond * 1000}


def columns_of(row: Base, names: Iterable[str]) -> dict[str, Any]:
    """The named columns of an ORM row. A value the row holds is read from its `__dict__`, as its attribute
    reads a loaded one, for a fraction of the attribute's cost; only what a stored row does not hold (a
    column not loaded yet) goes through the attribute."""
    held = row.__dict__
    if instance_state(row).key is None:
        # A row no session has stored or loaded (a create's, an applied change's): a column it was not
        # given reads as None, as through its attribute, which would load nothing.
        return {name: held.get(name) for name in names}
    return {name: held[name] if name in held else getattr(row, name) for name in names}


def observed_of(row: DeploymentRow) -> dict[str, Any]:
    """The record's observed fields as an event stores them (JSON: moments as ISO 8601)."""
    values = columns_of(row, OBSERVED)
    for name, value in values.items():
        if isinstance(value, datetime):
            values[name] = value.isoformat()
    return values


def changed(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """The observed fields whose values differ, with their values in `after`."""
    return {name: value for name, value in after.items() if name not in before or before[name] != value}


def fold(state: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """The observed fields after a change: what it set over what held before."""
    state.update(changes)
    return state


def etag(revision: int) -> str:
    """The etag of a record at a revision (AIP-154): any change of the record changes it."""
    return f"r{revision}"


def placement_to_proto(value: Mapping[str, Any] | None) -> pb.PlacementExplanation | None:
    if not value:
        return None
    try:
        # What placement_to_json wrote: field names the message knows, values of their types.
        return pb.PlacementExplanation(**value)
    except (TypeError, ValueError):
        # Anything else (a field this version does not know, NaN spelled as JSON text) as the JSON mapping reads it.
        return json_format.ParseDict(dict(value), pb.PlacementExplanation(), ignore_unknown_fields=True)


def placement_to_json(explanation: pb.PlacementExplanation) -> dict[str, Any]:
    return json_format.MessageToDict(explanation, preserving_proto_field_name=True)


def row_to_proto(
    row: Record,
    observed: Mapping[str, Any] | None = None,
    revision: int = 0,
    spec: Mapping[str, Any] | None = None,
    *,
    add_to: RepeatedCompositeFieldContainer[pb.Deployment] | None = None,
) -> pb.Deployment:
    """The Deployment of a record (a DeploymentRow, or a row or mapping of RECORD_COLUMNS read without the ORM);
    with `observed` (as an event stores it), as of `revision`, with `spec` (its release's) when given,
    else the record's. With `add_to`, the message is made as that repeated field's new last element:
    appending a finished message would copy it."""
    # A Core row's mapping reads a column for a fraction of what an attribute costs on either kind.
    record: Mapping[Any, Any]
    if isinstance(row, DeploymentRow):
        record = columns_of(row, RECORD_COLUMNS if observed is None else _RECORD_FIXED)
    elif isinstance(row, Row):
        record = row._mapping
    else:
        record = row
    if observed is None:
        # The record holds its observed fields under their own names.
        state: Mapping[Any, Any] = record
        revision = record["revision"]
    else:
        state = {
            name: datetime.fromisoformat(value) if name in _MOMENTS and value is not None else value
            for name, value in observed.items()
        }
    if spec is None:
        spec = record["spec"]
    operation = state.get("operation")
    deleted_at = state["deleted_at"]
    volumes = spec.get("volumes")
    # Every field is given to one constructor call: setting them one by one costs a call each. A field
    # given None is left unset, so the optional ones are passed as they are, without a test each.
    fields: dict[str, Any] = {
        "id": record["id"],
        "user_id": record["user_id"],
        "cluster_id": record["cluster_id"],
        "name": record["name"],
        "app_type": APP_TYPES[record["app_type"]],
        "status": STATUSES[state["status"]],
        "is_adopted": state["is_adopted"],
        "created_at": _timestamp_fields(record["created_at"]),
        "updated_at": _timestamp_fields(state["updated_at"]),
        "deleted_at": None if deleted_at is None else _timestamp_fields(deleted_at),
        "geographic_region": record["geographic_region"],
        "revision": revision,
        "phase": state["phase"],
        "etag": etag(revision),
        "release": state.get("release") or 1,
        "healthy_release": state.get("healthy_release") or 0,
        "reconciling": bool(operation),
        "operation": operation or "",
        "image_updates_paused": bool(state.get("image_updates_paused")),
        "promoted_from": record["promoted_from"],
        "target_location": record["target_location"],
        "promoted_to": state.get("promoted_to"),
        "environment_variables": spec.get("environment_variables") or None,
        "secret_environment_variables": secret_entries(spec) if spec.get("secret_environment_variables") else None,
        "volumes": [_volume_fields(volume) for volume in volumes] if volumes else None,
        # A Struct given a mapping is filled as Struct.update fills it; set even when empty, as the stored spec has it.
        "config": spec.get("config"),
        "placement": placement_to_proto(state.get("placement")),
    }
    fields.update(zip(_SPEC_SCALARS, map(spec.get, _SPEC_SCALARS), strict=True))
    fields.update(zip(_ROW_OPTIONALS, map(state.get, _ROW_OPTIONALS), strict=True))
    return pb.Deployment(**fields) if add_to is None else add_to.add(**fields)


def _volume_fields(volume: Mapping[str, Any]) -> dict[str, Any]:
    fields = {"path": volume["path"], "size_gb": volume["size_gb"]}
    if volume.get("purpose") is not None:
        fields["purpose"] = volume["purpose"]
    return fields


def secret_entries(spec: Mapping[str, Any]) -> list[pb.SecretEnvironmentVariable]:
    """A spec's secret environment values as answers carry them: names, versions and references, never a value."""
    entries = []
    for stored in spec.get("secret_environment_variables") or ():
        entry = pb.SecretEnvironmentVariable(name=stored["name"], version=int(stored["version"]))
        if stored.get("secret_ref") is not None:
            entry.secret_ref.name = stored["secret_ref"]["name"]
            entry.secret_ref.key = stored["secret_ref"]["key"]
        entries.append(entry)
    return entries


def spec_to_request(spec: Mapping[str, Any]) -> pb.CreateAppHostingDeploymentRequest:
    """A stored spec in the shape of the create request (a release's spec)."""
    request = pb.CreateAppHostingDeploymentRequest(
        geographic_region=spec.get("geographic_region", ""), deployment_name=spec.get("deployment_name", "")
    )
    for name in _OPTIONAL_REQUEST_FIELDS:
        if spec.get(name) is not None:
            setattr(request, name, spec[name])
    if spec.get("config") is not None:
        request.config.update(spec["config"])
    request.environment_variables.extend(spec.get("environment_variables") or ())
    request.secret_environment_variables.extend(secret_entries(spec))
    for volume in spec.get("volumes") or ():
        entry = request.volumes.add(path=volume["path"], size_gb=volume["size_gb"])
        if volume.get("purpose") is not None:
            entry.purpose = volume["purpose"]
    return request


def release_to_proto(release: ReleaseRow) -> pb.Release:
    return pb.Release(
        deployment_id=release.deployment_id,
        number=release.number,
        spec=spec_to_request(release.spec or {}),
        operation=release.operation,
        actor=release.actor or "",
        reason=release.reason,
        create_time=timestamp(release.created_at),
        healthy=release.healthy,
        rollback_of=release.rollback_of or 0,
    )


def event_to_proto(event: EventRow) -> pb.DeploymentEvent:
    return pb.DeploymentEvent(
        deployment_id=event.deployment_id,
        revision=event.revision,
        status=STATUSES[event.status],
        phase=event.phase,
        message=event.message,
        source=event.source,
        simulated=event.simulated,
        time=timestamp(event.time),
        final=event.final,
        actor=event.actor or "",
        operation=event.operation or "",
        release=event.release or 0,
    )
