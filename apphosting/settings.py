"""Platform settings: the bounds a request must stay within and the Kubernetes versions offered."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# vCluster's own Kubernetes distro images (ghcr.io/loft-sh/kubernetes) for these minor versions.
KUBERNETES_VERSIONS: tuple[str, ...] = ("1.33", "1.34", "1.35", "1.36")
DEFAULT_KUBERNETES_VERSION = "1.36"

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///apphosting.db"


class Limits(BaseModel):
    """What one deployment may ask for; a request outside these bounds is rejected."""

    model_config = ConfigDict(frozen=True)

    cpu_request_max: float = Field(16.0, gt=0)
    memory_request_mb_min: int = Field(64, ge=1)
    memory_request_mb_max: int = Field(65_536, ge=1)
    replicas_max: int = Field(20, ge=1)
    storage_size_gb_max: int = Field(1_024, ge=1)
    volume_size_gb_max: int = Field(1_024, ge=1)
    volumes_max: int = Field(16, ge=0)
    environment_variables_max: int = Field(128, ge=0)
    environment_value_max_bytes: int = Field(32_768, ge=1)
    custom_values_yaml_max_bytes: int = Field(262_144, ge=1)
    config_max_bytes: int = Field(65_536, ge=1)
    kubernetes_versions: tuple[str, ...] = KUBERNETES_VERSIONS
