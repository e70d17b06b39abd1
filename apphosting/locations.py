"""The registry of locations (host clusters), loaded from a YAML file shared by the API and the scheduler."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_LOCATIONS_FILE = "locations.yaml"


class Capacity(BaseModel):
    """What a location can host in all: cpu cores, memory, storage and vCluster slots."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpu: float = Field(gt=0)
    memory_mb: int = Field(gt=0)
    storage_gb: int = Field(gt=0)
    vclusters: int = Field(gt=0)


class LocationConfig(BaseModel):
    """One host cluster and where it is."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    provider: str = Field(min_length=1)
    region: str = Field(min_length=1)
    geographic_region: str = Field(min_length=1)
    capacity: Capacity
    healthy: bool = True
    # Added to the score: lets an operator prefer (or drain) a location without editing capacity.
    weight: float = 0.0
    # Access to the real cluster; a location without it is served by the simulated driver.
    kubeconfig: str | None = None
    context: str | None = None
    # The rest configures the kubernetes driver and is ignored by the simulated one.
    # Apps answer at https://<app>-<8 hex of id>.<base_domain>; None: <id>.apps.internal.
    base_domain: str | None = Field(None, min_length=1, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    # The GitOps repository: a URL or path git and Argo CD both reach; None: a local bare repository
    # (created on first use) under git_local_dir, for single-machine setups and tests.
    git_repo: str | None = None
    git_local_dir: str = ".apphosting/gitops"
    git_branch: str = Field("main", min_length=1)
    # A file holding an HTTPS token for git_repo, so the secret never sits in the locations file.
    git_token_file: str | None = None
    # Where Argo CD runs, and the AppProject the deployments' Applications belong to.
    argocd_namespace: str = Field("argocd", min_length=1)
    argocd_project: str = Field("default", min_length=1)
    # Who updates the images of deployments with an image_update_strategy here. platform: our updater
    # (`apphosting updater`, docs/image-updates.md), through releases, history and a rollback's pin; the
    # Applications carry no Argo CD Image Updater annotations, so an Image Updater running on the cluster
    # leaves them alone. argocd: the Applications carry those annotations for an Argo CD Image Updater the
    # operator runs instead of ours (its git write-back bypasses our releases).
    image_updater: Literal["platform", "argocd"] = "platform"
    # The loft-sh vcluster chart the vClusters are installed from.
    vcluster_chart_repo: str = "https://charts.loft.sh"
    vcluster_chart_version: str = Field("0.35.3", min_length=1)
    # None: the host cluster's default StorageClass / IngressClass.
    storage_class: str | None = None
    ingress_class: str | None = None
    # TLS of the apps' Ingresses (their endpoints are promised as https://). tls_cluster_issuer: a
    # cert-manager ClusterIssuer that issues each app its own certificate (annotation
    # cert-manager.io/cluster-issuer, secret `<app>-tls`). tls_secret: the name of a wildcard
    # certificate's secret for *.base_domain that every Ingress names; it must be reachable where the
    # Ingress is served (ingress-nginx serves its --default-ssl-certificate when the named secret is
    # absent from the namespace). At most one of them; with neither the Ingress has no tls section
    # and TLS is left to whatever terminates in front of the ingress controller.
    tls_cluster_issuer: str | None = Field(None, min_length=1, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    tls_secret: str | None = Field(None, min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    # How often the driver looks again at something that is not ready yet.
    poll_seconds: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _one_tls_source(self) -> LocationConfig:
        if self.tls_cluster_issuer and self.tls_secret:
            raise ValueError(f"location {self.id}: set tls_cluster_issuer or tls_secret, not both")
        return self


class LocationsFile(BaseModel):
    """The whole file: a list of locations with unique ids."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    locations: tuple[LocationConfig, ...]

    @model_validator(mode="after")
    def _unique_ids(self) -> LocationsFile:
        seen: set[str] = set()
        for location in self.locations:
            if location.id in seen:
                raise ValueError(f"location id {location.id!r} is listed twice")
            seen.add(location.id)
        return self

    @property
    def geographic_regions(self) -> frozenset[str]:
        return frozenset(location.geographic_region for location in self.locations)


def load_locations(path: str | Path | None = None) -> LocationsFile:
    """Reads a locations file; None reads the sample one shipped with the package."""
    if path is None:
        text = resources.files("apphosting").joinpath(DEFAULT_LOCATIONS_FILE).read_text()
    else:
        text = Path(path).read_text()
    return LocationsFile.model_validate(yaml.safe_load(text))
