"""The kubernetes driver: vClusters through Argo CD, apps through git and Argo CD, on real host clusters."""

from provisioner.kubernetes.api import KubeApi
from provisioner.kubernetes.driver import KubernetesDriver, argocd_cluster_secret
from provisioner.kubernetes.gitops import GitOpsRepo
from provisioner.kubernetes.names import Names

__all__ = ["GitOpsRepo", "KubeApi", "KubernetesDriver", "Names", "argocd_cluster_secret"]
