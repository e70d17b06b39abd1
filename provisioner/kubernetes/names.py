"""Deterministic names of everything the kubernetes driver creates for one deployment."""

from __future__ import annotations

import re
from dataclasses import dataclass

from apphosting.locations import LocationConfig
from apphosting.v1 import deployments_pb2
from provisioner.driver import app_name, deployment_key, host_namespace_name

_NOT_LABEL_CHARS = re.compile(r"[^a-z0-9-]+")
# Helm release names stay within 53 characters so the names the chart derives still fit a label.
_RELEASE_MAX = 53
# Argo CD copies the Application name into the label app.kubernetes.io/instance (63 characters).
_APPLICATION_MAX = 63
_KEY_LEN = 12


def _clean(part: str) -> str:
    return _NOT_LABEL_CHARS.sub("-", part.lower()).strip("-")


@dataclass(frozen=True)
class Names:
    """Every name derived from one deployment; equal inputs give equal names, on any worker."""

    deployment_id: str
    key: str
    namespace: str
    release: str
    app: str
    location_id: str

    @classmethod
    def of(cls, deployment: deployments_pb2.Deployment, location: LocationConfig) -> Names:
        key = deployment_key(deployment)
        # The key goes last and is never cut, so two deployments never share a release name.
        stem = _clean(deployment.name)[: _RELEASE_MAX - _KEY_LEN - 1].rstrip("-")
        release = f"{stem}-{key}" if stem else key
        return cls(
            deployment_id=deployment.id,
            key=key,
            namespace=host_namespace_name(deployment),
            release=release,
            app=app_name(deployment),
            location_id=location.id,
        )

    @property
    def kubeconfig_secret(self) -> str:
        """The secret the vcluster chart writes its kubeconfig to (key `config`).

        The release name does not start with "vc-", so this reads `vc-<name>-<key>`, not `vc-vc-…`.
        """
        return f"vc-{self.release}"

    @property
    def control_plane(self) -> str:
        """The vCluster's control plane StatefulSet, named after the release by the chart."""
        return self.release

    @property
    def app_pods_selector(self) -> str:
        """The host pods vCluster synced from the app's namespace of this vCluster (labels the syncer sets)."""
        return f"vcluster.loft.sh/managed-by={self.release},vcluster.loft.sh/namespace=default"

    @property
    def secret_env(self) -> str:
        """The Secret holding the app's secret environment values: made by the driver in the host namespace
        through the API (never in git), and synced into the vCluster's `default` namespace under this name."""
        return f"{self.app}-secret-env"

    @property
    def vcluster_application(self) -> str:
        return f"{self.release}-vcluster"[:_APPLICATION_MAX]

    @property
    def app_application(self) -> str:
        return f"{self.release}-app"[:_APPLICATION_MAX]

    @property
    def argocd_cluster(self) -> str:
        """The name Argo CD knows the vCluster by (its cluster secret is `cluster-<this>`)."""
        return self.release

    @property
    def argocd_cluster_secret(self) -> str:
        return f"cluster-{self.release}"

    @property
    def git_path(self) -> str:
        """Where the app's values or manifests live in the GitOps repository."""
        return f"deployments/{self.location_id}/{self.release}"

    def host(self, base_domain: str) -> str:
        """The app's public host name: `<app>-<8 hex of id>.<base domain>`."""
        return f"{self.app[:40].rstrip('-')}-{self.key[:8]}.{base_domain}"
