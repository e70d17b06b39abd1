"""The simulated driver: the provisioning steps on in-memory state, with set timings and injected failures."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from apphosting.v1 import bus_pb2, deployments_pb2
from provisioner.driver import (
    StepResult,
    TemporaryError,
    app_name,
    deployment_key,
    host_namespace_name,
    vcluster_name,
)

# Put in a docker image or chart name, these make the app step fail on purpose (for e2e tests).
FAIL_PERMANENT_MARK = "fail-permanent"
FAIL_TEMPORARY_MARK = "fail-temporary"

_PREFIX = "[simulated] "


@dataclass
class _VCluster:
    namespace: str
    kubeconfig: str
    # "Not yet" answers left before the API server counts as up.
    polls_left: int


@dataclass
class _App:
    source: str
    polls_left: int


def _app_source(deployment: deployments_pb2.Deployment) -> str:
    if deployment.HasField("docker_image") and deployment.docker_image:
        return f"image {deployment.docker_image}"
    chart = deployment.helm_chart_name or "unnamed"
    version = f":{deployment.helm_chart_version}" if deployment.helm_chart_version else ""
    repo = f"{deployment.helm_repo_url.rstrip('/')}/" if deployment.helm_repo_url else ""
    return f"chart {repo}{chart}{version}"


def _app_key(deployment: deployments_pb2.Deployment) -> str:
    return f"{vcluster_name(deployment)}/{app_name(deployment)}"


class SimulatedDriver:
    """A driver that touches no cluster; it says so in every message.

    `namespaces`, `vclusters` and `apps` hold what it has created, keyed by the deterministic
    names; `created_counts` counts real creations per `kind/name`, so a test can prove that a
    re-run job created nothing twice.
    """

    def __init__(
        self,
        delay: float = 0.0,
        failure_rate: float = 0.0,
        seed: int | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        *,
        ready_polls: int = 0,
        poll_after: float = 1.0,
    ) -> None:
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError("failure_rate must be between 0 and 1")
        self.simulated = True
        self.delay = delay
        self.failure_rate = failure_rate
        self.ready_polls = ready_polls
        self.poll_after = poll_after
        self.namespaces: dict[str, str] = {}
        self.vclusters: dict[str, _VCluster] = {}
        self.apps: dict[str, _App] = {}
        self.created_counts: Counter[str] = Counter()
        self._random = random.Random(seed)
        self._sleep = sleep

    async def _work(self) -> None:
        # The simulated work of a step. State is checked and changed only after this await, with
        # no await in between, so concurrent jobs for one deployment cannot both create an object.
        if self.delay > 0:
            await self._sleep(self.delay)

    async def ensure_namespace(self, job: bus_pb2.ProvisionJob) -> StepResult:
        await self._work()
        name = host_namespace_name(job.deployment)
        if name in self.namespaces:
            return StepResult.done(f"{_PREFIX}host namespace {name} already exists")
        self.namespaces[name] = job.deployment.id
        self.created_counts[f"namespace/{name}"] += 1
        return StepResult.done(f"{_PREFIX}host namespace {name} created")

    async def ensure_vcluster(self, job: bus_pb2.ProvisionJob) -> StepResult:
        await self._work()
        namespace = host_namespace_name(job.deployment)
        name = vcluster_name(job.deployment)
        if namespace not in self.namespaces:
            raise TemporaryError(f"{_PREFIX}host namespace {namespace} does not exist")
        if name in self.vclusters:
            return StepResult.done(f"{_PREFIX}vCluster {name} already installed in {namespace}")
        version = job.deployment.kubernetes_version or "default"
        kubeconfig = (
            f"# {_PREFIX}kubeconfig of vCluster {name}; no real cluster behind it\n"
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: {name}\n  cluster:\n    server: https://{name}.{namespace}.svc:443\n"
            f"contexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\n"
            f"current-context: {name}\n"
            f"users:\n- name: {name}\n  user:\n    token: simulated\n"
        )
        self.vclusters[name] = _VCluster(namespace, kubeconfig, self.ready_polls)
        self.created_counts[f"vcluster/{name}"] += 1
        return StepResult.done(f"{_PREFIX}vCluster {name} (Kubernetes {version}) installed in {namespace}")

    async def vcluster_ready(self, job: bus_pb2.ProvisionJob) -> StepResult:
        await self._work()
        vcluster = self._vcluster(job)
        if vcluster.polls_left > 0:
            vcluster.polls_left -= 1
            return StepResult.retry(self.poll_after, f"{_PREFIX}vCluster {vcluster_name(job.deployment)} starting")
        return StepResult.done(f"{_PREFIX}vCluster {vcluster_name(job.deployment)} API server is ready")

    async def read_kubeconfig(self, job: bus_pb2.ProvisionJob) -> StepResult:
        await self._work()
        name = vcluster_name(job.deployment)
        return StepResult.done(
            f"{_PREFIX}kubeconfig read from secret vc-{name}", kubeconfig=self._vcluster(job).kubeconfig
        )

    async def ensure_app(self, job: bus_pb2.ProvisionJob, kubeconfig: str) -> StepResult:
        await self._work()
        deployment = job.deployment
        self._vcluster(job)
        key = _app_key(deployment)
        source = _app_source(deployment)
        if key in self.apps:
            return StepResult.done(f"{_PREFIX}app {app_name(deployment)} ({source}) already deployed")
        if FAIL_PERMANENT_MARK in source:
            return StepResult.fail(self._bad_source(source), permanent=True)
        if FAIL_TEMPORARY_MARK in source:
            raise TemporaryError(f"{_PREFIX}simulated failure: registry timed out fetching {source} (i/o timeout)")
        # Drawn only for a new app, so a failure is decided once per deployment attempt, not per poll.
        if self.failure_rate > 0 and self._random.random() < self.failure_rate:
            return StepResult.fail(self._bad_source(source), permanent=True)
        self.apps[key] = _App(source, self.ready_polls)
        self.created_counts[f"app/{key}"] += 1
        return StepResult.done(f"{_PREFIX}app {app_name(deployment)} ({source}) deployed")

    async def app_rollout(self, job: bus_pb2.ProvisionJob, kubeconfig: str) -> StepResult:
        await self._work()
        deployment = job.deployment
        app = self.apps.get(_app_key(deployment))
        if app is None:
            raise TemporaryError(f"{_PREFIX}app {app_name(deployment)} is not deployed")
        replicas = deployment.replicas if deployment.HasField("replicas") else 1
        if app.polls_left > 0:
            app.polls_left -= 1
            return StepResult.retry(self.poll_after, f"{_PREFIX}app {app_name(deployment)} rolling out")
        return StepResult.done(f"{_PREFIX}app {app_name(deployment)} rolled out: {replicas}/{replicas} ready")

    async def endpoint(self, job: bus_pb2.ProvisionJob, kubeconfig: str) -> StepResult:
        await self._work()
        url = self.endpoint_url(job)
        return StepResult.done(f"{_PREFIX}app answers at {url}", endpoint_url=url)

    async def delete_app(self, job: bus_pb2.ProvisionJob) -> StepResult:
        await self._work()
        key = _app_key(job.deployment)
        if self.apps.pop(key, None) is None:
            return StepResult.done(f"{_PREFIX}app {app_name(job.deployment)} already gone")
        return StepResult.done(f"{_PREFIX}app {app_name(job.deployment)} deleted")

    async def delete_vcluster(self, job: bus_pb2.ProvisionJob) -> StepResult:
        await self._work()
        name = vcluster_name(job.deployment)
        # Uninstalling the vCluster takes whatever still ran inside it.
        for key in [key for key in self.apps if key.startswith(f"{name}/")]:
            del self.apps[key]
        if self.vclusters.pop(name, None) is None:
            return StepResult.done(f"{_PREFIX}vCluster {name} already gone")
        return StepResult.done(f"{_PREFIX}vCluster {name} uninstalled")

    async def delete_namespace(self, job: bus_pb2.ProvisionJob) -> StepResult:
        await self._work()
        name = host_namespace_name(job.deployment)
        if self.namespaces.pop(name, None) is None:
            return StepResult.done(f"{_PREFIX}host namespace {name} already gone")
        return StepResult.done(f"{_PREFIX}host namespace {name} deleted")

    @staticmethod
    def endpoint_url(job: bus_pb2.ProvisionJob) -> str:
        """Where the simulated app answers: `https://<name>-<8 hex of id>.<location>.apps.example.test`."""
        location = job.location.id or "local"
        host = app_name(job.deployment)[:40].rstrip("-")
        return f"https://{host}-{deployment_key(job.deployment)[:8]}.{location}.apps.example.test"

    def _vcluster(self, job: bus_pb2.ProvisionJob) -> _VCluster:
        name = vcluster_name(job.deployment)
        vcluster = self.vclusters.get(name)
        if vcluster is None:
            raise TemporaryError(f"{_PREFIX}vCluster {name} does not exist")
        return vcluster

    @staticmethod
    def _bad_source(source: str) -> str:
        if source.startswith("image "):
            return f"{_PREFIX}simulated failure: {source} could not be pulled (ErrImagePull)"
        return f"{_PREFIX}simulated failure: {source} could not be fetched (chart not found)"
