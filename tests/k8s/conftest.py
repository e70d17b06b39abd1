"""Fixtures of the kubernetes driver's tests: a cluster (the fakes, or a real one), a location on it.

By default the cluster is the fake API server with its controller loop (fake_argocd.py) running
beside it. With APPHOSTING_TEST_KUBECONFIG naming a real cluster with Argo CD installed, the same
tests run there (see docs/kubernetes.md, "Running the driver tests on a real cluster", for the git
and image settings they take); a test marked `fake_only` needs what only the fakes offer (an API
outage, an admission webhook) and is skipped there, with the reason its marker gives.

Tests read the cluster through its API (`Cluster.read`), never through the fake's store.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from kubernetes import client
from kubernetes import config as kube_config

from apphosting.locations import LocationConfig
from apphosting.nats_server import NatsServer
from provisioner.kubernetes.gitops import GitOpsRepo
from tests.k8s.fake_apiserver import KINDS, FakeApiServer
from tests.k8s.fake_argocd import FakeArgoCD
from tests.k8s.schemas import object_errors
from tests.support.stack import Stack

REAL_KUBECONFIG = os.environ.get("APPHOSTING_TEST_KUBECONFIG")
BASE_DOMAIN = os.environ.get("APPHOSTING_TEST_BASE_DOMAIN", "apps.test.example")
# The repository Argo CD reads: a local bare repository on the fakes; on a real cluster one it can reach.
GIT_REPO = os.environ.get("APPHOSTING_TEST_GIT_REPO", "")
GIT_TOKEN_FILE = os.environ.get("APPHOSTING_TEST_GIT_TOKEN_FILE", "")
# The app's image at release 1 and the one an update moves it to: on a real cluster, images that run
# as a non-root user and listen on 8080 (nginx-unprivileged does both).
IMAGE = os.environ.get("APPHOSTING_TEST_IMAGE", "ghcr.io/acme/shop:1.2.0")
IMAGE_V2 = os.environ.get("APPHOSTING_TEST_IMAGE_V2", "ghcr.io/acme/shop:1.3.0")
# A Helm chart Argo CD can fetch and that gets healthy with only `image.repository` and `image.tag` set.
HELM_REPO = os.environ.get("APPHOSTING_TEST_HELM_REPO", "https://charts.example.com/stable")
HELM_CHART = os.environ.get("APPHOSTING_TEST_HELM_CHART", "wordpress")
HELM_VERSION = os.environ.get("APPHOSTING_TEST_HELM_VERSION", "18.2.4")
# How long a wait for a cluster's condition may take: a real vCluster takes minutes to start.
WITHIN = 900.0 if REAL_KUBECONFIG else 120.0
# Seconds between two reads of a condition (and the driver's polls) on each kind of cluster.
POLL = 2.0 if REAL_KUBECONFIG else 0.05

T = TypeVar("T")
_KINDS = {kind.kind: kind for kind in KINDS}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fake_only(reason): needs the fakes' test hooks; skipped on a real cluster, for the reason given"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not REAL_KUBECONFIG:
        return
    for item in items:
        if "tests/k8s/" in item.nodeid and item.get_closest_marker("timeout") is None:
            # A real cluster's waits are long (WITHIN each): the suite's per-test limit is for the fakes.
            item.add_marker(pytest.mark.timeout(4 * WITHIN))
        marker = item.get_closest_marker("fake_only")
        if marker is not None:
            reason = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "needs the fakes")
            item.add_marker(pytest.mark.skip(reason=f"fake only: {reason}"))


class ClusterReader:
    """Reads and creates objects through a cluster's API, as kubectl would: the same on the fakes and a real cluster."""

    def __init__(self, kubeconfig: Path) -> None:
        configuration = client.Configuration()
        kube_config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)  # type: ignore[no-untyped-call]
        self.api_client = client.ApiClient(configuration)

    def close(self) -> None:
        self.api_client.close()  # type: ignore[no-untyped-call]

    @staticmethod
    def _path(kind: str, namespace: str, name: str = "") -> str:
        found = _KINDS[kind]
        base = f"/apis/{found.group}/{found.version}" if found.group else "/api/v1"
        scope = f"/namespaces/{namespace}" if found.namespaced and namespace else ""
        return f"{base}{scope}/{found.plural}" + (f"/{name}" if name else "")

    def _call(self, method: str, path: str, query: list[tuple[str, str]] | None = None, body: Any = None) -> Any:
        """One request with the kubeconfig's credentials; the JSON answer, None for 404 NotFound."""
        # The client's generic calls, untyped in its stubs.
        api: Any = self.api_client
        request = api.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params={"Accept": "application/json", "Content-Type": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = api.call_api(*request, _request_timeout=(5.0, 30.0))
        data = response.read()
        if response.status == 404:
            return None
        if response.status >= 400:
            raise AssertionError(f"{method} {path}: HTTP {response.status}: {data!r}")
        return json.loads(data)

    def get(self, kind: str, name: str, namespace: str = "") -> dict[str, Any] | None:
        """The object, None when it does not exist."""
        found = self._call("GET", self._path(kind, namespace, name))
        assert found is None or isinstance(found, dict)
        return found

    def list(self, kind: str, namespace: str = "", selector: str = "") -> list[dict[str, Any]]:
        """The objects of a kind (in a namespace, all namespaces with ""), matching a label selector."""
        query = [("labelSelector", selector)] if selector else []
        found = self._call("GET", self._path(kind, namespace), query)
        items = found["items"] if found is not None else []
        assert isinstance(items, list)
        return items

    def delete(self, kind: str, name: str, namespace: str = "") -> None:
        """Asks for the object's deletion; nothing when it is already gone."""
        self._call("DELETE", self._path(kind, namespace, name))

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        namespace = obj["metadata"].get("namespace", "")
        created = self._call("POST", self._path(obj["kind"], namespace), body=obj)
        assert isinstance(created, dict)
        return created


async def wait_for(what: str, probe: Callable[[], T | None], within: float = WITHIN) -> T:
    """Reads `probe` (blocking, run in a thread) until it answers something true; fails after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        answer = await asyncio.to_thread(probe)
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:.0f}s: {what} (last answer {answer!r})")
        await asyncio.sleep(POLL)


@dataclass
class Cluster:
    kubeconfig: Path
    fake: FakeApiServer | None
    argocd: FakeArgoCD | None
    read: ClusterReader = field(init=False)

    def __post_init__(self) -> None:
        self.read = ClusterReader(self.kubeconfig)

    @property
    def real(self) -> bool:
        return self.fake is None

    def need_fake(self) -> tuple[FakeApiServer, FakeArgoCD]:
        if self.fake is None or self.argocd is None:
            pytest.skip("needs the fake API server's test hooks; APPHOSTING_TEST_KUBECONFIG names a real cluster")
        return self.fake, self.argocd


def start_fakes() -> tuple[FakeApiServer, FakeArgoCD]:
    """The fake API server and its controller loop, running."""
    server = FakeApiServer(validator=object_errors).start()
    server.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "argocd"}})
    return server, FakeArgoCD(server).start()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    if REAL_KUBECONFIG:
        real = Cluster(Path(REAL_KUBECONFIG), None, None)
        try:
            yield real
        finally:
            real.read.close()
        return
    server, argocd = start_fakes()
    fake = Cluster(server.write_kubeconfig(tmp_path / "kubeconfig"), server, argocd)
    try:
        yield fake
    finally:
        fake.read.close()
        argocd.stop()
        server.stop()


def location_fields(kubeconfig: Path, git_dir: Path) -> dict[str, object]:
    """A location on the cluster; its GitOps repository is APPHOSTING_TEST_GIT_REPO when set, else local."""
    git: dict[str, object] = {"git_local_dir": str(git_dir)}
    if GIT_REPO:
        git = {"git_repo": GIT_REPO, **({"git_token_file": GIT_TOKEN_FILE} if GIT_TOKEN_FILE else {})}
    return {
        "id": "eu-k8s-a",
        "provider": "hetzner",
        "region": "eu-central-fsn1",
        "geographic_region": "eu",
        "capacity": {"cpu": 64, "memory_mb": 262144, "storage_gb": 4000, "vclusters": 100},
        "kubeconfig": str(kubeconfig),
        "base_domain": BASE_DOMAIN,
        **git,
    }


def location_config(kubeconfig: Path, git_dir: Path, **overrides: object) -> LocationConfig:
    fields = location_fields(kubeconfig, git_dir)
    fields.update(overrides)
    return LocationConfig.model_validate(fields)


@pytest.fixture
def location(cluster: Cluster, tmp_path: Path) -> LocationConfig:
    return location_config(cluster.kubeconfig, tmp_path / "gitops")


def git_repo(location: LocationConfig) -> GitOpsRepo:
    """The location's GitOps repository, as the driver opens it."""
    if location.git_repo:
        return GitOpsRepo(location.git_repo, location.git_branch, token_file=location.git_token_file)
    return GitOpsRepo.local(Path(location.git_local_dir) / "apphosting.git", location.git_branch)


def git_log(repo: GitOpsRepo) -> list[str]:
    """Commit subjects of the repository's branch, newest first, read from a fresh clone of it."""
    with tempfile.TemporaryDirectory(prefix="apphosting-test-git-") as tmp:
        # The repository's own credentials, passed the way it passes them to git.
        auth = {**os.environ, **repo._auth()}
        clone = ["git", "clone", "--quiet", "--bare", "--single-branch", "--branch", repo.branch, repo.url, tmp]
        subprocess.run(clone, capture_output=True, check=True, env=auth, timeout=120)
        log = ["git", "--git-dir", tmp, "log", "--format=%s", repo.branch]
        return subprocess.run(log, capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()


@dataclass
class K8sStack:
    """The pipeline (API, scheduler, provisioner added by the test) over one location on the cluster."""

    stack: Stack
    cluster: Cluster
    location: LocationConfig
    git_dir: Path

    @property
    def read(self) -> ClusterReader:
        return self.cluster.read

    @property
    def fake(self) -> FakeApiServer:
        """The fake API server (a test that uses it skips on a real cluster)."""
        return self.cluster.need_fake()[0]

    @property
    def argocd(self) -> FakeArgoCD:
        """The fakes' controller loop (a test that uses it skips on a real cluster)."""
        return self.cluster.need_fake()[1]

    @property
    def repo(self) -> Path:
        """The location's bare GitOps repository on the fakes (the driver's `git_local_dir`)."""
        return self.git_dir / "apphosting.git"

    @property
    def gitops(self) -> GitOpsRepo:
        """The location's GitOps repository, local or remote."""
        return git_repo(self.location)


@pytest.fixture
async def k8s_stack(
    cluster: Cluster, nats_server: NatsServer, database_url: str, tmp_path: Path
) -> AsyncIterator[K8sStack]:
    """The cluster (the fakes, or a real one), and a Stack whose only location is on it."""
    git_dir = tmp_path / "gitops"
    fields = {**location_fields(cluster.kubeconfig, git_dir), "poll_seconds": POLL}
    locations = tmp_path / "locations.yaml"
    locations.write_text(yaml.safe_dump({"locations": [fields]}))
    stack = Stack(nats_server, database_url, str(locations))
    try:
        yield K8sStack(stack, cluster, LocationConfig.model_validate(fields), git_dir)
    finally:
        await stack.close()
