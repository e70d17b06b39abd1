"""The REST gateway's JSON: the reference's AppHostingDeploymentCreate and DeploymentResponse, and the day-2 bodies."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class AppType(StrEnum):
    web_app = "web_app"
    api = "api"
    database = "database"
    static_site = "static_site"
    container = "container"
    helm = "helm"


class DeploymentStatus(StrEnum):
    pending = "pending"
    provisioning = "provisioning"
    promoting = "promoting"
    running = "running"
    stopped = "stopped"
    failed = "failed"
    error = "error"
    migrating = "migrating"
    deleting = "deleting"


class VolumeConfig(BaseModel):
    """Volume configuration for persistent storage."""

    # Unknown keys are refused as the gRPC API refuses them, instead of being dropped silently.
    model_config = ConfigDict(extra="forbid")

    path: str
    sizeGb: int = 10  # noqa: N815  (the contract's name)
    purpose: str | None = None


class SecretKeyReference(BaseModel):
    """One key of a Kubernetes Secret that already exists in the app's namespace."""

    model_config = ConfigDict(extra="forbid")

    name: str
    key: str


class SecretEnvironmentVariable(BaseModel):
    """A secret environment value: `value` (sealed at once, never returned) or `secret_ref`; on update,
    a name alone keeps the value stored under that name."""

    model_config = ConfigDict(extra="forbid")

    name: str
    value: str | None = None
    secret_ref: SecretKeyReference | None = None


class SecretEnvironmentVariableInfo(BaseModel):
    """A secret environment value as answers show it: its name, version and reference, never its value."""

    name: str
    version: int = 0
    secret_ref: SecretKeyReference | None = None


class AppHostingDeploymentCreate(BaseModel):
    """Request for creating an App Hosting deployment on shared infrastructure."""

    model_config = ConfigDict(extra="forbid")

    geographic_region: str
    deployment_name: str
    app_type: str = "helm"
    config: dict[str, Any] | None = None
    cpu_request: float | None = None
    memory_request_mb: int | None = None
    replicas: int | None = None
    container_port: int | None = None
    environment_variables: list[str] | None = None
    docker_image: str | None = None
    storage_size_gb: int | None = None
    volumes: list[VolumeConfig] | None = None
    run_as_uid: int | None = None
    deployment_type: str = "docker"
    helm_repo_url: str | None = None
    helm_chart_name: str | None = None
    helm_chart_version: str | None = None
    custom_values_yaml: str | None = None
    image_update_strategy: str | None = None
    image_update_constraint: str | None = None
    image_allow_tags: str | None = None
    image_ignore_tags: str | None = None
    kubernetes_version: str | None = None
    secret_environment_variables: list[SecretEnvironmentVariable] | None = None


class DeploymentResponse(BaseModel):
    """The reference's DeploymentResponse, then the fields of our API it does not name."""

    id: uuid.UUID
    user_id: uuid.UUID
    cluster_id: uuid.UUID
    name: str
    app_type: AppType
    status: DeploymentStatus
    config: dict[str, Any] | None = None
    values_yaml: str | None = None
    git_path: str | None = None
    endpoint_url: str | None = None
    error_message: str | None = None
    cpu_request: float | None = None
    memory_request_mb: int | None = None
    replicas: int | None = None
    container_port: int | None = None
    storage_size_gb: int | None = None
    deployment_type: str | None = None
    helm_repo_url: str | None = None
    helm_chart_name: str | None = None
    helm_chart_version: str | None = None
    custom_values_yaml: str | None = None
    image_update_strategy: str | None = None
    image_update_constraint: str | None = None
    image_allow_tags: str | None = None
    image_ignore_tags: str | None = None
    is_adopted: bool = False
    source_namespace: str | None = None
    created_at: datetime
    updated_at: datetime
    provider: str | None = None
    region: str | None = None
    cluster_status: str | None = None
    cluster_error: str | None = None

    geographic_region: str | None = None
    environment_variables: list[str] | None = None
    secret_environment_variables: list[SecretEnvironmentVariableInfo] | None = None
    docker_image: str | None = None
    volumes: list[VolumeConfig] | None = None
    run_as_uid: int | None = None
    kubernetes_version: str | None = None
    revision: int = Field(0, description="Increases with every change; the events stream resumes from it.")
    phase: str | None = None
    etag: str | None = Field(None, description="Send it back as If-Match to refuse a stale change (409).")
    release: int = 0
    healthy_release: int = 0
    reconciling: bool = False
    operation: str | None = None
    location_id: str | None = None
    image_updates_paused: bool = False
    promoted_from: str | None = None
    promoted_to: str | None = None
    target_location: str | None = None
    deleted_at: datetime | None = None


class ErrorBody(BaseModel):
    """Any refusal other than a validation error: the API's message and its stable reason."""

    detail: str
    reason: str


class DeploymentUpdate(BaseModel):
    """The fields to change; the keys present are the update mask, a null clears a field."""

    model_config = ConfigDict(extra="forbid")

    docker_image: str | None = None
    helm_chart_version: str | None = None
    custom_values_yaml: str | None = None
    config: dict[str, Any] | None = None
    environment_variables: list[str] | None = None
    secret_environment_variables: list[SecretEnvironmentVariable] | None = None
    cpu_request: float | None = None
    memory_request_mb: int | None = None
    replicas: int | None = None
    container_port: int | None = None
    image_update_strategy: str | None = None
    image_update_constraint: str | None = None
    image_allow_tags: str | None = None
    image_ignore_tags: str | None = None
    storage_size_gb: int | None = None
    volumes: list[VolumeConfig] | None = None


class ScaleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: int


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    release: int = Field(0, description="The release to apply again; 0: the newest healthy one before the current.")


class PromoteOverrides(BaseModel):
    """The fields of the copy that differ from the source's (proto PromoteOverrides)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    config: dict[str, Any] | None = None
    cpu_request: float | None = None
    memory_request_mb: int | None = None
    replicas: int | None = None
    container_port: int | None = None
    storage_size_gb: int | None = None
    environment_variables: list[str] | None = None
    docker_image: str | None = None
    volumes: list[VolumeConfig] | None = None
    helm_chart_version: str | None = None
    custom_values_yaml: str | None = None
    image_update_strategy: str | None = None
    image_update_constraint: str | None = None
    image_allow_tags: str | None = None
    image_ignore_tags: str | None = None


class PromoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target_cluster_id: str | None = Field(None, description="The location for the copy; none: the scheduler picks.")
    target_geographic_region: str | None = Field(None, description="None: the source's geographic region.")
    new_name: str | None = None
    delete_source: bool = False
    overrides: PromoteOverrides | None = None


class PromoteResponse(BaseModel):
    source: DeploymentResponse
    target: DeploymentResponse


class AdoptBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    location: str
    source_namespace: str
    deployment_name: str | None = None
    app_type: str | None = None
    cpu_request: float | None = None
    memory_request_mb: int | None = None
    replicas: int | None = None
    container_port: int | None = None
    docker_image: str | None = None
    storage_size_gb: int | None = None


class ReleaseResponse(BaseModel):
    deployment_id: uuid.UUID
    number: int
    spec: dict[str, Any]
    operation: str
    actor: str | None = None
    reason: str | None = None
    create_time: datetime
    healthy: bool
    rollback_of: int = 0


class ImageTagCandidate(BaseModel):
    tag: str
    kept: bool
    # The rule that excluded it (ignored, not-allowed, not-semver, ...); empty when kept.
    excluded_by: str = ""
    detail: str = ""
    digest: str = ""
    created: datetime | None = None


class ImageUpdatePreview(BaseModel):
    """What the image updater would do now, and why (PreviewImageUpdate); nothing is written."""

    deployment_id: uuid.UUID
    repository: str
    strategy: str
    constraint: str | None = None
    allow_tags: str | None = None
    ignore_tags: str | None = None
    current_tag: str = ""
    current_digest: str = ""
    candidates: list[ImageTagCandidate]
    winner: str = ""
    winner_digest: str = ""
    reason: str = ""
    would_update: bool
    paused: bool
    new_docker_image: str = ""
    new_release: int = 0


class DeploymentEvent(BaseModel):
    deployment_id: uuid.UUID
    revision: int
    status: DeploymentStatus
    phase: str
    message: str
    source: str
    simulated: bool
    time: datetime
    final: bool
    actor: str | None = None
    operation: str | None = None
    release: int = 0


class WatchEvent(BaseModel):
    """One `data:` line of the events stream: the deployment after a change, and the change (none first)."""

    deployment: DeploymentResponse
    event: DeploymentEvent | None = None


class ApiKeyCreate(BaseModel):
    """POST /api-keys: the key to make."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="What the key is for (ci, nightly-deploys); 1 to 100 characters.")
    read_only: bool = Field(False, description="Only get, list and watch.")
    # The API bounds it (two years); here only to what the field can carry.
    ttl_seconds: int = Field(0, ge=-(2**63), le=2**63 - 1, description="Seconds until it expires; 0: never.")


class ApiKeyResponse(BaseModel):
    """An API key as kept: never its secret."""

    id: uuid.UUID
    user_id: uuid.UUID
    name: str
    prefix: str
    read_only: bool
    create_time: datetime
    expire_time: datetime | None = None
    last_used_time: datetime | None = None
    revoke_time: datetime | None = None


class ApiKeyCreated(ApiKeyResponse):
    """The answer of POST /api-keys: the only time the key is shown."""

    key: str = Field(description="Send as `Authorization: Bearer <key>`; it is not shown again.")
