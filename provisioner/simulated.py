"""The simulated driver: the provisioning steps on in-memory state, with set timings and injected failures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from apphosting import versions
from apphosting.v1 import bus_pb2, deployments_pb2
from provisioner.driver import (
    PermanentError,
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
# Put in a docker image or chart name, this deploys an app that never becomes available.
NEVER_HEALTHY_MARK = "never-healthy"

_PREFIX = "[simulated] "


@dataclass
class _VCluster:
    namespace: str
    kubeconfig: str
    # "Not yet" answers left before the API server counts as up.
    polls_left: int
    asleep: bool = False


@dataclass(frozen=True)
class _AppSpec:
    """What an app runs: the release and the part of its spec the simulation acts on."""

    release: int
    source: str
    replicas: int
    # The secret environment values by name and version only: the simulation never holds a value.
    secret_env: str = ""


@dataclass
class _App:
    spec: _AppSpec
    polls_left: int


class SimulatedState:
    """What the simulated clusters hold, in a SQLite file that outlives the provisioner processes.

    Several provisioners (and a restarted one) share the file as real workers share a real cluster:
    a create is an INSERT that only one of them wins, and every real creation is logged, so a test
    can prove that crashes and redeliveries created nothing twice.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        # One connection per thread, kept: opening the file (and setting WAL) for every call cost more
        # than the call's statements.
        self._local = threading.local()
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS objects (kind TEXT, name TEXT, PRIMARY KEY (kind, name))")
            db.execute("CREATE TABLE IF NOT EXISTS creations (kind TEXT, name TEXT)")
            # What an object is like now (an app's release and spec, a vCluster asleep), as JSON.
            db.execute(
                "CREATE TABLE IF NOT EXISTS attributes (kind TEXT, name TEXT, data TEXT, PRIMARY KEY (kind, name))"
            )
            # Objects that were there before any provisioner (namespaces to adopt), put in once.
            db.execute("CREATE TABLE IF NOT EXISTS seeded (kind TEXT, name TEXT, PRIMARY KEY (kind, name))")

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection (autocommit); a transaction a failure left open is rolled back."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            # Written through at each commit is enough: what a killed process committed is kept; the
            # simulated clusters need not outlive the machine.
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        try:
            yield db
        except BaseException:
            if db.in_transaction:
                db.rollback()
            raise

    def claim(self, kind: str, name: str, data: dict[str, Any] | None = None) -> bool:
        """Creates the object, with what it is like when `data` is given (in the same transaction, so a
        worker killed in between leaves no object without it); False when it already exists."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            created = db.execute("INSERT OR IGNORE INTO objects VALUES (?, ?)", (kind, name)).rowcount == 1
            if created:
                db.execute("INSERT INTO creations VALUES (?, ?)", (kind, name))
                if data is not None:
                    db.execute("INSERT OR REPLACE INTO attributes VALUES (?, ?, ?)", (kind, name, json.dumps(data)))
            db.execute("COMMIT")
            return created

    def exists(self, kind: str, name: str) -> bool:
        with self._db() as db:
            return db.execute("SELECT 1 FROM objects WHERE kind = ? AND name = ?", (kind, name)).fetchone() is not None

    def seed(self, kind: str, name: str) -> None:
        """Puts a pre-existing object in the first time it is named, without counting a creation;
        once removed, it stays removed."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            if db.execute("INSERT OR IGNORE INTO seeded VALUES (?, ?)", (kind, name)).rowcount == 1:
                db.execute("INSERT OR IGNORE INTO objects VALUES (?, ?)", (kind, name))
            db.execute("COMMIT")

    def look(self, kind: str, name: str) -> tuple[bool, dict[str, Any] | None]:
        """exists() and, when it does, attributes(): one call, for a caller that hops to a thread for each."""
        if not self.exists(kind, name):
            return False, None
        return True, self.attributes(kind, name)

    def attributes(self, kind: str, name: str) -> dict[str, Any] | None:
        """What the object is like, as last set; None when nothing was set."""
        with self._db() as db:
            row = db.execute("SELECT data FROM attributes WHERE kind = ? AND name = ?", (kind, name)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def set_attributes(self, kind: str, name: str, data: dict[str, Any]) -> None:
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO attributes VALUES (?, ?, ?)", (kind, name, json.dumps(data)))

    def remove(self, kind: str, name: str) -> bool:
        with self._db() as db:
            db.execute("DELETE FROM attributes WHERE kind = ? AND name = ?", (kind, name))
            return db.execute("DELETE FROM objects WHERE kind = ? AND name = ?", (kind, name)).rowcount == 1

    def remove_under(self, kind: str, prefix: str) -> None:
        with self._db() as db:
            for table in ("objects", "attributes"):
                db.execute(
                    f"DELETE FROM {table} WHERE kind = ? AND substr(name, 1, ?) = ?",
                    (kind, len(prefix), prefix),
                )

    def creations(self) -> Counter[str]:
        """How often each `kind/name` was really created."""
        with self._db() as db:
            rows = db.execute("SELECT kind, name, count(*) FROM creations GROUP BY kind, name").fetchall()
        return Counter({f"{kind}/{name}": count for kind, name, count in rows})

    def live(self) -> set[str]:
        with self._db() as db:
            return {f"{kind}/{name}" for kind, name in db.execute("SELECT kind, name FROM objects")}


def _app_source(deployment: deployments_pb2.Deployment) -> str:
    if deployment.HasField("docker_image") and deployment.docker_image:
        return f"image {deployment.docker_image}"
    chart = deployment.helm_chart_name or "unnamed"
    version = f":{deployment.helm_chart_version}" if deployment.helm_chart_version else ""
    repo = f"{deployment.helm_repo_url.rstrip('/')}/" if deployment.helm_repo_url else ""
    return f"chart {repo}{chart}{version}"


def _app_spec(job: bus_pb2.ProvisionJob) -> _AppSpec:
    deployment = job.deployment
    replicas = deployment.replicas if deployment.HasField("replicas") else 1
    secret_env = ",".join(
        f"{e.name}@v{e.version}" for e in sorted(deployment.secret_environment_variables, key=lambda e: e.name)
    )
    return _AppSpec(job.release, _app_source(deployment), replicas, secret_env)


def _attributes(spec: _AppSpec) -> dict[str, object]:
    """An app as the shared state keeps it; secret values appear only when it has some."""
    attributes = asdict(spec)
    if not spec.secret_env:
        del attributes["secret_env"]
    return attributes


def _changes(old: _AppSpec, new: _AppSpec) -> str:
    changed = [f"release {old.release} -> {new.release}"]
    if old.source != new.source:
        changed.append(f"{old.source} -> {new.source}")
    if old.replicas != new.replicas:
        changed.append(f"replicas {old.replicas} -> {new.replicas}")
    if old.secret_env != new.secret_env:
        changed.append(f"secret values {old.secret_env or 'none'} -> {new.secret_env or 'none'}")
    return ", ".join(changed)


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
    names; `created_counts` counts real creations per `kind/name` (an update is no creation), so a
    test can prove that a re-run job created nothing twice. `existing_namespaces` are there before
    any job, on every location, for adoption.
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
        existing_namespaces: Iterable[str] = (),
    ) -> None:
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError("failure_rate must be between 0 and 1")
        self.simulated = True
        self.delay = delay
        self.failure_rate = failure_rate
        self.ready_polls = ready_polls
        self.poll_after = poll_after
        # Namespace name -> the id of the deployment managing it ("" for an unmanaged one).
        self.namespaces: dict[str, str] = {}
        self.vclusters: dict[str, _VCluster] = {}
        self.apps: dict[str, _App] = {}
        self.created_counts: Counter[str] = Counter()
        self.existing_namespaces = frozenset(existing_namespaces)
        self._seeded: set[str] = set()
        self._random = random.Random(seed)
        self._sleep = sleep
        # Without a state file, the in-memory maps above are the whole truth.
        self._state = state

    async def _claim(self, kind: str, name: str, present: bool, data: dict[str, Any] | None = None) -> bool:
        """Creates an object unless it exists; True when this call created it."""
        if self._state is None:
            created = not present
        else:
            created = await asyncio.to_thread(self._state.claim, kind, name, data)
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

    async def _save(self, kind: str, name: str, data: dict[str, Any]) -> None:
        if self._state is not None:
            await asyncio.to_thread(self._state.set_attributes, kind, name, data)

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
        vcluster = await self._awake_vcluster(job)
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
        await self._awake_vcluster(job)
        key = _app_key(deployment)
        want = _app_spec(job)
        name = app_name(deployment)
        app = await self._app(job)
        if app is None:
            self._check_source(want.source)
            # Drawn only for a new app, so a failure is decided once per deployment attempt, not per poll.
            if self.failure_rate > 0 and self._random.random() < self.failure_rate:
                return StepResult.fail(self._bad_source(want.source), permanent=True)
            if await self._claim("app", key, key in self.apps, _attributes(want)):
                self.apps[key] = _App(want, self.ready_polls)
                return StepResult.done(f"{_PREFIX}app {name} ({want.source}) deployed as release {want.release}")
            # Another worker created it meanwhile; it is compared with the job's release below.
            app = await self._app(job)
            if app is None:
                raise TemporaryError(f"{_PREFIX}app {name} is being deployed by another worker")
        if app.spec == want:
            return StepResult.done(f"{_PREFIX}app {name} ({want.source}) already deployed as release {want.release}")
        if app.spec.source != want.source:
            self._check_source(want.source)
        changes = _changes(app.spec, want)
        app.spec = want
        app.polls_left = self.ready_polls
        await self._save("app", key, _attributes(want))
        return StepResult.done(f"{_PREFIX}app {name} updated: {changes}")

    async def applied_release(self, job: bus_pb2.ProvisionJob) -> int:
        app = await self._app(job)
        return app.spec.release if app is not None else 0

    async def app_rollout(self, job: bus_pb2.ProvisionJob, kubeconfig: str) -> StepResult:
        await self._work()
        name = app_name(job.deployment)
        app = await self._app(job)
        if app is None:
            raise TemporaryError(f"{_PREFIX}app {name} is not deployed")
        await self._awake_vcluster(job)
        spec = app.spec
        if spec.release != job.release:
            return StepResult.retry(
                self.poll_after, f"{_PREFIX}app {name} runs release {spec.release}, not yet {job.release}"
            )
        if NEVER_HEALTHY_MARK in spec.source:
            return StepResult.retry(
                self.poll_after,
                f"{_PREFIX}app {name} release {spec.release} ({spec.source}): 0/{spec.replicas} available",
            )
        if app.polls_left > 0:
            app.polls_left -= 1
            return StepResult.retry(self.poll_after, f"{_PREFIX}app {name} rolling out release {spec.release}")
        return StepResult.done(
            f"{_PREFIX}app {name} release {spec.release} rolled out: {spec.replicas}/{spec.replicas} ready"
        )

    async def stop_app(self, job: bus_pb2.ProvisionJob, kubeconfig: str) -> StepResult:
        await self._work()
        name = app_name(job.deployment)
        app = await self._app(job)
        if app is None:
            return StepResult.done(f"{_PREFIX}app {name} is not deployed; nothing to stop")
        if app.spec.replicas == 0:
            return StepResult.done(f"{_PREFIX}app {name} already stopped (0 replicas)")
        await self._awake_vcluster(job)
        app.spec = replace(app.spec, replicas=0)
        await self._save("app", _app_key(job.deployment), _attributes(app.spec))
        return StepResult.done(f"{_PREFIX}app {name} scaled to 0 replicas; its volumes and config are kept")

    async def sleep_vcluster(self, job: bus_pb2.ProvisionJob) -> StepResult:
        await self._work()
        name = vcluster_name(job.deployment)
        vcluster = await self._vcluster(job)
        if vcluster.asleep:
            return StepResult.done(f"{_PREFIX}vCluster {name} already asleep")
        vcluster.asleep = True
        await self._save("vcluster", name, {"asleep": True})
        return StepResult.done(f"{_PREFIX}vCluster {name} asleep: its control plane is scaled to 0")

    async def wake_vcluster(self, job: bus_pb2.ProvisionJob) -> StepResult:
        await self._work()
        name = vcluster_name(job.deployment)
        vcluster = await self._vcluster(job)
        if not vcluster.asleep:
            return StepResult.done(f"{_PREFIX}vCluster {name} already awake")
        vcluster.asleep = False
        vcluster.polls_left = self.ready_polls
        await self._save("vcluster", name, {"asleep": False})
        return StepResult.done(f"{_PREFIX}vCluster {name} woken: its control plane is scaled back up")

    async def adopt_namespace(self, job: bus_pb2.ProvisionJob) -> StepResult:
        await self._work()
        name = job.deployment.source_namespace
        location = job.location.id or "local"
        if not name:
            return StepResult.fail(f"{_PREFIX}no namespace to adopt: source_namespace is empty", permanent=True)
        if not await self._namespace_present(job, name):
            return StepResult.fail(
                f"{_PREFIX}namespace {name} does not exist on location {location}; nothing to adopt", permanent=True
            )
        if self.namespaces.get(name) == job.deployment.id:
            return StepResult.done(f"{_PREFIX}namespace {name} on {location} already adopted")
        self.namespaces[name] = job.deployment.id
        await self._save("namespace", self._namespace_key(job, name), {"managed_by": job.deployment.id})
        return StepResult.done(f"{_PREFIX}namespace {name} on {location} adopted; what runs there keeps running")

    async def release_namespace(self, job: bus_pb2.ProvisionJob) -> StepResult:
        await self._work()
        name = host_namespace_name(job.deployment)
        if not await self._namespace_present(job, name):
            return StepResult.done(f"{_PREFIX}namespace {name} already gone; nothing to give back")
        self.namespaces[name] = ""
        await self._save("namespace", self._namespace_key(job, name), {"managed_by": ""})
        return StepResult.done(f"{_PREFIX}namespace {name} given back unmanaged; its workloads keep running")

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
        if job.deployment.is_adopted:
            self._seed_in_memory(name)
        key = self._namespace_key(job, name)
        if key != name and self._state is not None:
            await asyncio.to_thread(self._state.seed, "namespace", key)
        if not await self._remove("namespace", key, self.namespaces.pop(name, None) is not None):
            return StepResult.done(f"{_PREFIX}host namespace {name} already gone")
        return StepResult.done(f"{_PREFIX}host namespace {name} deleted")

    @staticmethod
    def endpoint_url(job: bus_pb2.ProvisionJob) -> str:
        """Where the simulated app answers: `https://<name>-<8 hex of id>.<location>.apps.example.test`."""
        location = job.location.id or "local"
        host = app_name(job.deployment)[:40].rstrip("-")
        return f"https://{host}-{deployment_key(job.deployment)[:8]}.{location}.apps.example.test"

    def _namespace_key(self, job: bus_pb2.ProvisionJob, name: str) -> str:
        # Pre-existing namespaces are on every location, so a state file shared by the locations
        # tells them apart by location; a deployment's own namespace is named after its id already.
        if job.deployment.is_adopted or name in self.existing_namespaces:
            return f"{job.location.id or 'local'}/{name}"
        return name

    def _seed_in_memory(self, name: str) -> None:
        if name in self.existing_namespaces and name not in self._seeded:
            self._seeded.add(name)
            self.namespaces.setdefault(name, "")

    async def _namespace_present(self, job: bus_pb2.ProvisionJob, name: str) -> bool:
        self._seed_in_memory(name)
        if self._state is None:
            return name in self.namespaces
        key = self._namespace_key(job, name)
        if name in self.existing_namespaces:
            await asyncio.to_thread(self._state.seed, "namespace", key)
        present, data = await asyncio.to_thread(self._state.look, "namespace", key)
        if not present:
            self.namespaces.pop(name, None)
        else:
            self.namespaces[name] = str((data or {}).get("managed_by", ""))
        return present

    async def _app(self, job: bus_pb2.ProvisionJob) -> _App | None:
        """The app as it runs now; with a state file, as the file says (another worker may have changed it)."""
        key = _app_key(job.deployment)
        app = self.apps.get(key)
        if self._state is None:
            return app
        present, data = await asyncio.to_thread(self._state.look, "app", key)
        if not present:
            self.apps.pop(key, None)
            return None
        # An app from a file without attributes runs what the job asks for.
        spec = _AppSpec(**data) if data is not None else _app_spec(job)
        if app is None:
            app = self.apps.setdefault(key, _App(spec, 0))
        app.spec = spec
        return app

    async def _vcluster(self, job: bus_pb2.ProvisionJob) -> _VCluster:
        name = vcluster_name(job.deployment)
        vcluster = self.vclusters.get(name)
        if self._state is not None:
            present, data = await asyncio.to_thread(self._state.look, "vcluster", name)
            if vcluster is None and present:
                # Installed by an earlier run of this job (another worker, or this one before a crash).
                namespace = host_namespace_name(job.deployment)
                vcluster = self.vclusters.setdefault(name, _VCluster(namespace, _kubeconfig(name, namespace), 0))
            if vcluster is not None:
                # Another worker may have put it to sleep or woken it.
                vcluster.asleep = bool(data and data.get("asleep"))
        if vcluster is None:
            raise TemporaryError(f"{_PREFIX}vCluster {name} does not exist")
        return vcluster

    async def _awake_vcluster(self, job: bus_pb2.ProvisionJob) -> _VCluster:
        vcluster = await self._vcluster(job)
        if vcluster.asleep:
            raise TemporaryError(f"{_PREFIX}vCluster {vcluster_name(job.deployment)} asleep")
        return vcluster

    def _check_source(self, source: str) -> None:
        if FAIL_PERMANENT_MARK in source:
            raise PermanentError(self._bad_source(source))
        if FAIL_TEMPORARY_MARK in source:
            raise TemporaryError(f"{_PREFIX}simulated failure: registry timed out fetching {source} (i/o timeout)")

    @staticmethod
    def _bad_source(source: str) -> str:
        if source.startswith("image "):
            return f"{_PREFIX}simulated failure: {source} could not be pulled (ErrImagePull)"
        return f"{_PREFIX}simulated failure: {source} could not be fetched (chart not found)"
