"""Per-user quotas: how many deployments, and how much cpu, memory and storage they may hold in all."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from apphosting import resources
from services.deployments import defaults, errors
from services.deployments.tables import DeploymentRow
from services.deployments.validation import DeploymentSpec


class Quotas(BaseModel):
    """What one user's live deployments may hold together; None means no limit."""

    model_config = ConfigDict(frozen=True)

    deployments: int | None = Field(defaults.QUOTA_DEPLOYMENTS, ge=0)
    cpu: float | None = Field(defaults.QUOTA_CPU, ge=0)
    memory_mb: int | None = Field(defaults.QUOTA_MEMORY_MB, ge=0)
    storage_gb: int | None = Field(defaults.QUOTA_STORAGE_GB, ge=0)
    # Bytes the deployments' records and their kept history take in the database, in MiB (2^20).
    stored_mb: int | None = Field(defaults.QUOTA_STORED_MB, ge=0)

    @property
    def enforced(self) -> bool:
        limits = (self.deployments, self.cpu, self.memory_mb, self.storage_gb, self.stored_mb)
        return any(limit is not None for limit in limits)


UNLIMITED = Quotas(deployments=None, cpu=None, memory_mb=None, storage_gb=None, stored_mb=None)

_MIB = 1 << 20


@dataclass(frozen=True)
class Usage:
    """Resources held by deployments: cpu in millicores, so sums are exact."""

    deployments: int = 0
    cpu_millis: int = 0
    memory_mb: int = 0
    storage_gb: int = 0
    # Database bytes: what the store counts for each record and its history.
    stored_bytes: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.deployments + other.deployments,
            self.cpu_millis + other.cpu_millis,
            self.memory_mb + other.memory_mb,
            self.storage_gb + other.storage_gb,
            self.stored_bytes + other.stored_bytes,
        )

    def __sub__(self, other: Usage) -> Usage:
        return Usage(
            self.deployments - other.deployments,
            self.cpu_millis - other.cpu_millis,
            self.memory_mb - other.memory_mb,
            self.storage_gb - other.storage_gb,
            self.stored_bytes - other.stored_bytes,
        )


def demand_of(spec: DeploymentSpec) -> Usage:
    """What one deployment holds: per-replica cpu and memory times replicas, its storage plus its volumes."""
    return demand_of_spec(spec.model_dump(mode="json"))


def demand_of_spec(spec: Mapping[str, Any]) -> Usage:
    """demand_of for a stored spec (a release's, as the store keeps it)."""
    # The kernel's demand, so a quota counts what placement reserves and the pods request.
    demand = resources.demand(
        cpu_request=spec.get("cpu_request"),
        memory_request_mb=spec.get("memory_request_mb"),
        replicas=spec.get("replicas"),
        storage_size_gb=spec.get("storage_size_gb"),
        volume_sizes_gb=[volume.get("size_gb") for volume in spec.get("volumes") or ()],
    )
    return Usage(
        deployments=1,
        cpu_millis=demand.total_cpu_millis,
        memory_mb=demand.total_memory_mb,
        storage_gb=demand.storage_gb,
    )


def held(row: DeploymentRow) -> Usage:
    """What a record holds now: the demand of its current release, from the columns the store keeps."""
    return Usage(1, row.cpu_millis, row.memory_mb, row.storage_gb, 0)


def check(quotas: Quotas, used: Usage, demand: Usage) -> None:
    """Raises RESOURCE_EXHAUSTED (ErrorInfo QUOTA_EXCEEDED) for the first quota `demand` would exceed."""
    if quotas.deployments is not None and used.deployments + demand.deployments > quotas.deployments:
        raise errors.quota_exceeded("deployments", "", quotas.deployments, used.deployments, demand.deployments)
    if quotas.cpu is not None and used.cpu_millis + demand.cpu_millis > round(quotas.cpu * 1000):
        raise errors.quota_exceeded("cpu", " cores", quotas.cpu, used.cpu_millis / 1000, demand.cpu_millis / 1000)
    if quotas.memory_mb is not None and used.memory_mb + demand.memory_mb > quotas.memory_mb:
        raise errors.quota_exceeded("memory_mb", " MB", quotas.memory_mb, used.memory_mb, demand.memory_mb)
    if quotas.storage_gb is not None and used.storage_gb + demand.storage_gb > quotas.storage_gb:
        raise errors.quota_exceeded("storage_gb", " GiB", quotas.storage_gb, used.storage_gb, demand.storage_gb)
    if quotas.stored_mb is not None and used.stored_bytes + demand.stored_bytes > quotas.stored_mb * _MIB:
        used_mib, demand_mib = round(used.stored_bytes / _MIB, 3), round(demand.stored_bytes / _MIB, 3)
        raise errors.quota_exceeded("stored_mb", " MiB", quotas.stored_mb, used_mib, demand_mib)
