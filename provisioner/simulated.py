"""The simulated driver: the provisioning steps on in-memory state, with set timings and injected failures."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from apphosting import versions
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


class SimulatedState:
    """What the simulated clusters hold, in a SQLite file that outlives the provisioner processes.

    Several provisioners (and a restarted one) share the file as real workers share a real cluster:
    a create is an INSERT that only one of them wins, and every real creation is logged, so a test
    can prove that crashes and redeliveries created nothing twice.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS objects (kind TEXT, name TEXT, PRIMARY KEY (kind, name))")
            db.execute("CREATE TABLE IF NOT EXISTS creations (kind TEXT, name TEXT)")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def claim(self, kind: str, name: str) -> bool:
        """Creates the object; False when it already exists."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            created = db.execute("INSERT OR IGNORE INTO objects VALUES (?, ?)", (kind, name)).rowcount == 1
            if created:
                db.execute("INSERT INTO creations VALUES (?, ?)", (kind, name))
            db.execute("COMMIT")
            return created

    def exists(self, kind: str, name: str) -> bool:
        with self._connect() as db:
            return db.execute("SELECT 1 FROM objects WHERE kind = ? AND name = ?", (kind, name)).fetchone() is not None

    def remove(self, kind: str, name: str) -> bool:
        with self._connect() as db:
            return db.execute("DELETE FROM objects WHERE kind = ? AND name = ?", (kind, name)).rowcount == 1

    def remove_under(self, kind: str, prefix: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM objects WHERE kind = ? AND substr(name, 1, ?) = ?", (kind, len(prefix), prefix))

    def creations(self) -> Counter[str]:
        """How often each `kind/name` was really created."""
        with self._connect() as db:
            rows = db.execute("SELECT kind, name, count(*) FROM creations GROUP BY kind, name").fetchall()
        return Counter({f"{kind}/{name}": count for kind, name, count in rows})

    def live(self) -> set[str]:
        with self._connect() as db:
            return {f"{kind}/{name}" for kind, name in db.execute("SELECT kind, name FROM objects")}


def _app_source(deployment: deployments_pb2.Deployment) -> str:
    if deployment.HasField("docker_image") and deployment.docker_image:
        return f"image {deployment.docker_image}"
    chart = deployment.helm_chart_name or "unnamed"
    version = f":{deployment.helm_chart_version}" if deployment.helm_chart_version else ""
    repo = f"{deployment.helm_repo_url.rstrip('/')}/" if deployment.helm_repo_url else ""
    return f"chart {repo}{chart}{version}"


def _kubeconfig(name: str, namespace: str) -> str:
    return (
        f"# {_PREFIX}kubeconfig of vCluster {name}; no real cluster behind it\n"
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: {name}\n  cluster:\n    server: https://{name}.{namespace}.svc:443\n"
        f"contexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\n"
        f"current-context: {name}\n"
        f"users:\n- name: {name}\n  user:\n    token: simulated\n"
    )


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
        state: SimulatedState | None = None,
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
        # Without a state file, the in-memory maps above are the whole truth.
        self._state = state

    async def _claim(self, kind: str, name: str, present: bool) -> bool:
        """Creates an object unless it exists; True when this call created it."""
        if self._state is None:
            created = not present
        else:
            created = await asyncio.to_thread(self._state.claim, kind, name)
        if created:
            self.created_counts[f"{kind}/{name}"] += 1
        return created

    async def _exists(self, kind: str, name: str, present: bool) -> bool:
        if self._state is None or present:
            return present
        return await asyncio.to_thread(self._state.exists, kind, name)

    async def _remove(self, kind: str, name: str, present: bool) -> bool:
        if self._state is None:
            return present
        return await asyncio.to_thread(self._state.remove, kind, name) or present

    async def _work(self) -> None:
        # The simulated work of a step. In memory, state is checked and changed only after this
        # await, with no await in between; with a state file, the file's INSERT decides. Either way
        # concurrent jobs for one deployment cannot both create an object.
        if self.delay > 0:
            await self._sleep(self.delay)

    async def ensure_namespace(self, job: bus_pb2.ProvisionJob) -> StepResult:
        await self._work()
        name = host_namespace_name(job.deployment)
        created = await self._claim("namespace", name, name in self.namespaces)
        self.namespaces[name] = job.deployment.id
        if not created:
            return StepResult.done(f"{_PREFIX}host namespace {name} already exists")
        return StepResult.done(f"{_PREFIX}host namespace {name} created")

    async def ensure_vcluster(self, job: bus_pb2.ProvisionJob) -> StepResult:
        await self._work()
        namespace = host_namespace_name(job.deployment)
        name = vcluster_name(job.deployment)
        if not await self._exists("namespace", namespace, namespace in self.namespaces):
            raise TemporaryError(f"{_PREFIX}host namespace {namespace} does not exist")
        created = await self._claim("vcluster", name, name in self.vclusters)
        if not created:
            self.vclusters.setdefault(name, _VCluster(namespace, _kubeconfig(name, namespace), 0))
            return StepResult.done(f"{_PREFIX}vCluster {name} already installed in {namespace}")
        version = job.deployment.kubernetes_version or versions.DEFAULT_KUBERNETES_VERSION
        self.vclusters[name] = _VCluster(namespace, _kubeconfig(name, namespace), self.ready_polls)
        return StepResult.done(f"{_PREFIX}vCluster {name} (Kubernetes {version}) installed in {namespace}")

    async def vcluster_ready(self, job: bus_pb2.ProvisionJob) -> StepResult:
        await self._work()
        vcluster = await self._vcluster(job)
        if vcluster.polls_left > 0:
            vcluster.polls_left -= 1
            return StepResult.retry(self.poll_after, f"{_PREFIX}vCluster {vcluster_name(job.deployment)} starting")
        return StepResult.done(f"{_PREFIX}vCluster {vcluster_name(job.deployment)} API server is ready")

    async def read_kubeconfig(self, job: bus_pb2.ProvisionJob) -> StepResult:
        await self._work()
        name = vcluster_name(job.deployment)
        return StepResult.done(
            f"{_PREFIX}kubeconfig read from secret vc-{name}", kubeconfig=(await self._vcluster(job)).kubeconfig
        )

    async def ensure_app(self, job: bus_pb2.ProvisionJob, kubeconfig: str) -> StepResult:
        await self._work()
        deployment = job.deployment
        await self._vcluster(job)
        key = _app_key(deployment)
        source = _app_source(deployment)
        if await self._exists("app", key, key in self.apps):
            self.apps.setdefault(key, _App(source, 0))
            return StepResult.done(f"{_PREFIX}app {app_name(deployment)} ({source}) already deployed")
        if FAIL_PERMANENT_MARK in source:
            return StepResult.fail(self._bad_source(source), permanent=True)
        if FAIL_TEMPORARY_MARK in source:
            raise TemporaryError(f"{_PREFIX}simulated failure: registry timed out fetching {source} (i/o timeout)")
        # Drawn only for a new app, so a failure is decided once per deployment attempt, not per poll.
        if self.failure_rate > 0 and self._random.random() < self.failure_rate:
            return StepResult.fail(self._bad_source(source), permanent=True)
        if not await self._claim("app", key, key in self.apps):
            self.apps.setdefault(key, _App(source, 0))
            return StepResult.done(f"{_PREFIX}app {app_name(deployment)} ({source}) already deployed")
        self.apps[key] = _App(source, self.ready_polls)
        return StepResult.done(f"{_PREFIX}app {app_name(deployment)} ({source}) deployed")

    async def app_rollout(self, job: bus_pb2.ProvisionJob, kubeconfig: str) -> StepResult:
        await self._work()
        deployment = job.deployment
        key = _app_key(deployment)
        app = self.apps.get(key)
        if app is None and await self._exists("app", key, False):
            app = self.apps.setdefault(key, _App(_app_source(deployment), 0))
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
        if not await self._remove("app", key, self.apps.pop(key, None) is not None):
            return StepResult.done(f"{_PREFIX}app {app_name(job.deployment)} already gone")
        return StepResult.done(f"{_PREFIX}app {app_name(job.deployment)} deleted")

    async def delete_vcluster(self, job: bus_pb2.ProvisionJob) -> StepResult:
        await self._work()
        name = vcluster_name(job.deployment)
        # Uninstalling the vCluster takes whatever still ran inside it.
        for key in [key for key in self.apps if key.startswith(f"{name}/")]:
            del self.apps[key]
        if self._state is not None:
            await asyncio.to_thread(self._state.remove_under, "app", f"{name}/")
        if not await self._remove("vcluster", name, self.vclusters.pop(name, None) is not None):
            return StepResult.done(f"{_PREFIX}vCluster {name} already gone")
        return StepResult.done(f"{_PREFIX}vCluster {name} uninstalled")

    async def delete_namespace(self, job: bus_pb2.ProvisionJob) -> StepResult:
        await self._work()
        name = host_namespace_name(job.deployment)
        if not await self._remove("namespace", name, self.namespaces.pop(name, None) is not None):
            return StepResult.done(f"{_PREFIX}host namespace {name} already gone")
        return StepResult.done(f"{_PREFIX}host namespace {name} deleted")

    @staticmethod
    def endpoint_url(job: bus_pb2.ProvisionJob) -> str:
        """Where the simulated app answers: `https://<name>-<8 hex of id>.<location>.apps.example.test`."""
        location = job.location.id or "local"
        host = app_name(job.deployment)[:40].rstrip("-")
        return f"https://{host}-{deployment_key(job.deployment)[:8]}.{location}.apps.example.test"

    async def _vcluster(self, job: bus_pb2.ProvisionJob) -> _VCluster:
        name = vcluster_name(job.deployment)
        vcluster = self.vclusters.get(name)
        if vcluster is None and await self._exists("vcluster", name, False):
            # Installed by an earlier run of this job (another worker, or this one before a crash).
            namespace = host_namespace_name(job.deployment)
            vcluster = self.vclusters.setdefault(name, _VCluster(namespace, _kubeconfig(name, namespace), 0))
        if vcluster is None:
            raise TemporaryError(f"{_PREFIX}vCluster {name} does not exist")
        return vcluster

    @staticmethod
    def _bad_source(source: str) -> str:
        if source.startswith("image "):
            return f"{_PREFIX}simulated failure: {source} could not be pulled (ErrImagePull)"
        return f"{_PREFIX}simulated failure: {source} could not be fetched (chart not found)"
