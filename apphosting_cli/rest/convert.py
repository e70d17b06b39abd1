"""Between the gateway's JSON models and the gRPC messages: requests to protobuf, answers to the reference's JSON."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from apphosting.v1 import api_keys_pb2
from apphosting.v1 import deployments_pb2 as pb
from apphosting_cli.rest import models

NIL_UUID = "00000000-0000-0000-0000-000000000000"

Loc = list[str | int]


class Unsendable(Exception):
    """Values the JSON allows but protobuf cannot carry (an integer beyond int32, text that is not UTF-8)."""

    def __init__(self, locations: list[Loc]) -> None:
        super().__init__(f"{len(locations)} values cannot be sent")
        self.locations = locations


def fill(message: Message, data: Mapping[str, Any], loc: Loc) -> None:
    """Sets the fields of `message` from JSON values (None: left unset); raises Unsendable naming every bad one."""
    bad: list[Loc] = []
    _fill(message, data, loc, bad)
    if bad:
        raise Unsendable(bad)


def _fill(message: Message, data: Mapping[str, Any], loc: Loc, bad: list[Loc]) -> None:
    fields = message.DESCRIPTOR.fields_by_name
    for key, value in data.items():
        name = "size_gb" if key == "sizeGb" else key
        if value is None or name not in fields:
            continue
        field = fields[name]
        try:
            if field.message_type is not None and field.message_type.full_name == "google.protobuf.Struct":
                getattr(message, name).update(value)
            elif field.message_type is not None and field.is_repeated:
                for index, item in enumerate(value):
                    _fill(getattr(message, name).add(), item, [*loc, key, index], bad)
            elif field.message_type is not None:
                _fill(getattr(message, name), value, [*loc, key], bad)
            elif field.is_repeated:
                getattr(message, name).extend(value)
            else:
                setattr(message, name, value)
        except (ValueError, TypeError, OverflowError, UnicodeError):
            bad.append([*loc, key])


def create_request(body: models.AppHostingDeploymentCreate) -> pb.CreateAppHostingDeploymentRequest:
    request = pb.CreateAppHostingDeploymentRequest()
    # Only what the caller sent: the API applies the contract's defaults itself, as it does for gRPC.
    fill(request, body.model_dump(exclude_unset=True), ["body"])
    return request


def _enum(value: str, prefix: str) -> str:
    return value.removeprefix(prefix).lower()


def _volumes(volumes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"path": volume.get("path", ""), "sizeGb": volume.get("size_gb", 10), "purpose": volume.get("purpose")}
        for volume in volumes
    ]


def deployment(message: pb.Deployment) -> models.DeploymentResponse:
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    for key in ("id", "user_id", "cluster_id"):
        # A validate_only answer describes a deployment that does not exist yet: it has no ids.
        data[key] = data.get(key) or NIL_UUID
    data["app_type"] = _enum(data.get("app_type", "APP_TYPE_CONTAINER"), "APP_TYPE_")
    data["status"] = _enum(data.get("status", "DEPLOYMENT_STATUS_PENDING"), "DEPLOYMENT_STATUS_")
    data.setdefault("created_at", "1970-01-01T00:00:00Z")
    data.setdefault("updated_at", data["created_at"])
    if "volumes" in data:
        data["volumes"] = _volumes(data["volumes"])
    return models.DeploymentResponse.model_validate(data)


def release(message: pb.Release) -> models.ReleaseResponse:
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    spec = data.get("spec", {})
    spec.pop("request_id", None)
    spec.pop("validate_only", None)
    if "volumes" in spec:
        spec["volumes"] = _volumes(spec["volumes"])
    data["spec"] = spec
    data.setdefault("create_time", "1970-01-01T00:00:00Z")
    data.setdefault("number", 0)
    data.setdefault("operation", "")
    data.setdefault("healthy", False)
    return models.ReleaseResponse.model_validate(data)


def image_preview(message: pb.PreviewImageUpdateResponse) -> models.ImageUpdatePreview:
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return models.ImageUpdatePreview.model_validate(data)


def event(message: pb.DeploymentEvent) -> models.DeploymentEvent:
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    data["status"] = _enum(data["status"], "DEPLOYMENT_STATUS_")
    if data["status"] == "unspecified":
        data["status"] = "pending"
    data["time"] = data.get("time") or "1970-01-01T00:00:00Z"
    data["deployment_id"] = data["deployment_id"] or NIL_UUID
    return models.DeploymentEvent.model_validate(data)


def watch_item(item: pb.WatchDeploymentResponse) -> models.WatchEvent:
    return models.WatchEvent(
        deployment=deployment(item.deployment), event=event(item.event) if item.HasField("event") else None
    )


def api_key(message: api_keys_pb2.ApiKey) -> models.ApiKeyResponse:
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    data.setdefault("read_only", False)
    return models.ApiKeyResponse.model_validate(data)


def api_key_created(message: api_keys_pb2.CreateApiKeyResponse) -> models.ApiKeyCreated:
    return models.ApiKeyCreated(**api_key(message.api_key).model_dump(), key=message.key)
