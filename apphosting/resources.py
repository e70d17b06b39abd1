"""What a deployment asks of a cluster: cpu, memory, replicas and storage, with the defaults of unset fields.

The quota (API), the reservation (scheduler) and the rendered pod requests (provisioner) all read a
deployment's demand here, so they cannot disagree about what an unset field means.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from apphosting.v1 import deployments_pb2

__all__ = [
    "DEFAULT_CPU",
    "DEFAULT_MEMORY_MB",
    "DEFAULT_REPLICAS",
    "DEFAULT_VOLUME_SIZE_GB",
    "Demand",
    "demand",
    "demand_of",
]

# Per replica, when the request leaves them unset (the contract gives no defaults for these).
DEFAULT_CPU: Final = 0.25
DEFAULT_MEMORY_MB: Final = 256
DEFAULT_REPLICAS: Final = 1
# A volume without a size (deployments.proto, VolumeConfig.size_gb).
DEFAULT_VOLUME_SIZE_GB: Final = 10


@dataclass(frozen=True, slots=True)
class Demand:
    """A deployment's resources with every default filled in; cpu in millicores, so sums are exact."""

    cpu_millis: int
    memory_mb: int
    replicas: int
    # storage_size_gb (the app's data volume), then each volume's size, in request order.
    storage_size_gb: int | None
    volume_sizes_gb: tuple[int, ...]

    @property
    def total_cpu_millis(self) -> int:
        return self.cpu_millis * self.replicas

    @property
    def total_memory_mb(self) -> int:
        return self.memory_mb * self.replicas

    @property
    def storage_gb(self) -> int:
        return (self.storage_size_gb or 0) + sum(self.volume_sizes_gb)


def demand(
    *,
    cpu_request: float | None,
    memory_request_mb: int | None,
    replicas: int | None,
    storage_size_gb: int | None,
    volume_sizes_gb: Iterable[int | None],
) -> Demand:
    """The demand of a request's fields; None means unset."""
    cpu = DEFAULT_CPU if cpu_request is None else cpu_request
    return Demand(
        # Kubernetes quantities stop at millicores; validation refuses anything finer.
        cpu_millis=round(cpu * 1000),
        memory_mb=DEFAULT_MEMORY_MB if memory_request_mb is None else memory_request_mb,
        replicas=DEFAULT_REPLICAS if replicas is None else replicas,
        storage_size_gb=storage_size_gb,
        volume_sizes_gb=tuple(DEFAULT_VOLUME_SIZE_GB if size is None else size for size in volume_sizes_gb),
    )


def demand_of(d: deployments_pb2.Deployment) -> Demand:
    """The demand of a deployment message (proto3 optional: an absent field is unset)."""
    return demand(
        cpu_request=d.cpu_request if d.HasField("cpu_request") else None,
        memory_request_mb=d.memory_request_mb if d.HasField("memory_request_mb") else None,
        replicas=d.replicas if d.HasField("replicas") else None,
        storage_size_gb=d.storage_size_gb if d.HasField("storage_size_gb") else None,
        volume_sizes_gb=[v.size_gb if v.HasField("size_gb") else None for v in d.volumes],
    )
