"""Platform settings: the bounds a request must stay within and the Kubernetes versions offered."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# Re-exported: the versions' home is apphosting.versions.
from apphosting.versions import DEFAULT_KUBERNETES_VERSION, KUBERNETES_VERSIONS

__all__ = [
    "DEFAULT_DATABASE_URL",
    "DEFAULT_KUBERNETES_VERSION",
    "DEFAULT_LISTEN",
    "DEFAULT_REPORT_WINDOW",
    "KUBERNETES_VERSIONS",
    "Limits",
]

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///apphosting.db"
# Seconds a provisioner holds a finished step's event for the next step to carry (0: each on its own).
DEFAULT_REPORT_WINDOW = 0.25


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
    # Nesting of objects and lists in `config`; deeper documents are refused before anything walks them.
    config_max_depth: int = Field(32, ge=1)
    # custom_values_yaml: nesting, `*alias` uses, and nodes once every alias is expanded. The last
    # bounds what a consumer (Helm, a JSON encoder) would build: a billion-laughs document is small
    # but expands to ~10^9 nodes. 200 000 is above what an alias-free document of the byte limit holds.
    # libyaml, which composes the document, nests no deeper than 1,000 levels.
    custom_values_yaml_max_depth: int = Field(64, ge=1, le=1000)
    custom_values_yaml_max_aliases: int = Field(64, ge=0)
    custom_values_yaml_max_nodes: int = Field(200_000, ge=1)
    # All environment variables together (NAME=value, UTF-8), so a request stays well under the API's
    # request size limit and a field, not the transport, names what is too big.
    environment_total_max_bytes: int = Field(262_144, ge=1)
    # Allow-lists; empty allows any. Entries are host names (or host:port for registries), or
    # `*.example.com` for every subdomain. An image without a registry is on docker.io.
    helm_repo_hosts: tuple[str, ...] = ()
    image_registries: tuple[str, ...] = ()
    kubernetes_versions: tuple[str, ...] = KUBERNETES_VERSIONS
