"""Fixtures of the kubernetes driver's tests: the fake API server, the fake Argo CD, a location on them.

With APPHOSTING_TEST_KUBECONFIG naming a real cluster (kind or k3d with Argo CD installed), the
`cluster` fixture gives that cluster instead, and tests that need the fake's hooks skip.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from apphosting.locations import Capacity, LocationConfig
from apphosting.nats_server import NatsServer
from tests.k8s.fake_apiserver import FakeApiServer
from tests.k8s.fake_argocd import FakeArgoCD
from tests.k8s.schemas import object_errors
from tests.support.stack import Stack

REAL_KUBECONFIG = os.environ.get("APPHOSTING_TEST_KUBECONFIG")
BASE_DOMAIN = "apps.test.example"


@dataclass
class Cluster:
    kubeconfig: Path
    fake: FakeApiServer | None
    argocd: FakeArgoCD | None

    def need_fake(self) -> tuple[FakeApiServer, FakeArgoCD]:
        if self.fake is None or self.argocd is None:
            pytest.skip("needs the fake API server's test hooks; APPHOSTING_TEST_KUBECONFIG names a real cluster")
        return self.fake, self.argocd


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    if REAL_KUBECONFIG:
        yield Cluster(Path(REAL_KUBECONFIG), None, None)
        return
    validator = object_errors
    server = FakeApiServer(validator=validator).start()
    server.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "argocd"}})
    argocd = FakeArgoCD(server)
    try:
        yield Cluster(server.write_kubeconfig(tmp_path / "kubeconfig"), server, argocd)
    finally:
        argocd.stop()
        server.stop()


def location_config(kubeconfig: Path, git_dir: Path, **overrides: object) -> LocationConfig:
    fields: dict[str, object] = {
        "id": "eu-k8s-a",
        "provider": "hetzner",
        "region": "eu-central-fsn1",
        "geographic_region": "eu",
        "capacity": Capacity(cpu=64, memory_mb=262144, storage_gb=4000, vclusters=100),
        "kubeconfig": str(kubeconfig),
        "base_domain": BASE_DOMAIN,
        "git_local_dir": str(git_dir),
    }
    fields.update(overrides)
    return LocationConfig.model_validate(fields)


@pytest.fixture
def location(cluster: Cluster, tmp_path: Path) -> LocationConfig:
    return location_config(cluster.kubeconfig, tmp_path / "gitops")


@dataclass
class K8sStack:
    """The pipeline (API, scheduler, provisioner added by the test) over one location on the fakes."""

    stack: Stack
    fake: FakeApiServer
    argocd: FakeArgoCD
    git_dir: Path

    @property
    def repo(self) -> Path:
        """The location's bare GitOps repository (the driver's `git_local_dir`)."""
        return self.git_dir / "apphosting.git"


@pytest.fixture
async def k8s_stack(nats_server: NatsServer, database_url: str, tmp_path: Path) -> AsyncIterator[K8sStack]:
    """The fake API server with a running fake Argo CD, and a Stack whose only location is on them."""
    server = FakeApiServer(validator=object_errors).start()
    server.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "argocd"}})
    argocd = FakeArgoCD(server).start()
    git_dir = tmp_path / "gitops"
    location = {
        "id": "eu-k8s-a",
        "provider": "hetzner",
        "region": "eu-central-fsn1",
        "geographic_region": "eu",
        "capacity": {"cpu": 64, "memory_mb": 262144, "storage_gb": 4000, "vclusters": 100},
        "kubeconfig": str(server.write_kubeconfig(tmp_path / "kubeconfig")),
        "base_domain": BASE_DOMAIN,
        "git_local_dir": str(git_dir),
        "poll_seconds": 0.05,
    }
    locations = tmp_path / "locations.yaml"
    locations.write_text(yaml.safe_dump({"locations": [location]}))
    stack = Stack(nats_server, database_url, str(locations))
    try:
        yield K8sStack(stack, server, argocd, git_dir)
    finally:
        try:
            await stack.close()
        finally:
            argocd.stop()
            server.stop()
