"""The kubernetes driver: vClusters and apps on a real host cluster, delivered through git and Argo CD."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml

from apphosting import netguard, secrets
from apphosting.locations import LocationConfig
from apphosting.v1 import bus_pb2, deployments_pb2
from provisioner.driver import PermanentError, StepResult, TemporaryError

if TYPE_CHECKING:
    from provisioner.driver import Driver
from provisioner.kubernetes import render
from provisioner.kubernetes.api import KubeApi, Obj
from provisioner.kubernetes.gitops import GitOpsRepo
from provisioner.kubernetes.names import Names

_GROUP, _VERSION, _PLURAL = "argoproj.io", "v1alpha1", "applications"
_CLUSTER_SECRET_LABEL = "argocd.argoproj.io/secret-type"
# Application conditions that mean the spec itself can never work (a missing chart is one).
_PERMANENT_CONDITIONS = frozenset({"InvalidSpecError"})
# Who asks Argo CD for a sync, as its UI and audit log show it.
_SYNC_INITIATOR = "apphosting"
# The vcluster chart runs one control plane replica unless high availability is configured.
_CONTROL_PLANE_REPLICAS = 1


class KubernetesDriver:
    """Drives one location's host cluster; every object name comes from `Names`.

    The provisioner talks only to the host cluster's API. It installs the vCluster and the app as
    Argo CD Applications and reads their progress from the Applications' status, so it needs no
    network route into any vCluster; the vCluster's kubeconfig is handed to Argo CD as a cluster.
    """

    simulated = False

    def __init__(
        self,
        location: LocationConfig,
        *,
        api: KubeApi | None = None,
        repo: GitOpsRepo | None = None,
        poll_after: float | None = None,
        resolver: netguard.Resolver | None = None,
        secret_keys: secrets.KeyRing | None = None,
    ) -> None:
        self.location = location
        # Opens the job's sealed secret values, which go into the app's Secret through the API.
        self.secret_keys = secret_keys
        self.resolver = resolver or netguard.CachingResolver()
        if api is None:
            if location.kubeconfig is None:
                raise ValueError(f"location {location.id} has no kubeconfig")
            api = KubeApi.from_kubeconfig(location.kubeconfig, location.context)
        self.api = api
        if repo is None:
            if location.git_repo:
                repo = GitOpsRepo(location.git_repo, location.git_branch, token_file=location.git_token_file)
            else:
                repo = GitOpsRepo.local(Path(location.git_local_dir) / "apphosting.git", location.git_branch)
        self.repo = repo
        self.poll_after = location.poll_seconds if poll_after is None else poll_after

    def names(self, job: bus_pb2.ProvisionJob) -> Names:
        return Names.of(job.deployment, self.location)

    # -- create ---------------------------------------------------------------------------------

    async def ensure_namespace(self, job: bus_pb2.ProvisionJob) -> StepResult:
        names = self.names(job)
        body = render.namespace(names)
        what = f"namespace {names.namespace}"
        if await self.api.create(f"create {what}", self.api.core.create_namespace, body):
            return StepResult.done(f"host namespace {names.namespace} created (Pod Security restricted)")
        found = await self.api.get(f"read {what}", self.api.core.read_namespace, names.namespace)
        if found is None:
            raise TemporaryError(f"{what} was deleted while it was being created")
        if found.get("status", {}).get("phase") == "Terminating":
            return StepResult.retry(self.poll_after, f"{what} is still terminating from an earlier teardown")
        owner = found["metadata"].get("labels", {}).get(render.DEPLOYMENT_LABEL)
        if owner != names.deployment_id:
            raise PermanentError(f"{what} exists and belongs to {owner or 'someone else'}, not this deployment")
        wanted = body["metadata"]["labels"]
        if any(found["metadata"].get("labels", {}).get(k) != v for k, v in wanted.items()):
            # Someone relaxed the Pod Security labels: put them back.
            await self.api.call(
                f"label {what}", self.api.core.patch_namespace, names.namespace, {"metadata": {"labels": wanted}}
            )
            return StepResult.done(f"host namespace {names.namespace} already exists; labels restored")
        return StepResult.done(f"host namespace {names.namespace} already exists")

    async def _ensure_application(self, body: Obj, what: str) -> bool:
        """Creates the Application, or brings an existing one's spec, labels and annotations to `body`."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        if await self.api.create(
            f"create {what}",
            self.api.custom.create_namespaced_custom_object,
            _GROUP,
            _VERSION,
            namespace,
            _PLURAL,
            body,
        ):
            return True
        found = await self._application(namespace, name, what)
        if found is None:
            raise TemporaryError(f"{what} was deleted while it was being created")
        if found["metadata"].get("deletionTimestamp"):
            raise TemporaryError(f"{what} is still being deleted from an earlier teardown")
        meta = found["metadata"]
        if (
            found.get("spec") != body["spec"]
            or meta.get("annotations", {}) != body["metadata"].get("annotations", {})
            or any(meta.get("labels", {}).get(k) != v for k, v in body["metadata"]["labels"].items())
        ):
            patch = {"metadata": {"labels": body["metadata"]["labels"]}, "spec": body["spec"]}
            patch["metadata"]["annotations"] = body["metadata"].get("annotations") or None
            await self.api.call(
                f"update {what}",
                self.api.custom.patch_namespaced_custom_object,
                _GROUP,
                _VERSION,
                namespace,
                _PLURAL,
                name,
                patch,
            )
        return False

    async def _application(self, namespace: str, name: str, what: str) -> Obj | None:
        return await self.api.get(
            f"read {what}", self.api.custom.get_namespaced_custom_object, _GROUP, _VERSION, namespace, _PLURAL, name
        )

    async def ensure_vcluster(self, job: bus_pb2.ProvisionJob) -> StepResult:
        names = self.names(job)
        body = render.vcluster_application(job.deployment, names, self.location)
        tag = body["spec"]["source"]["helm"]["valuesObject"]["controlPlane"]["distro"]["k8s"]["image"]["tag"]
        what = f"Application {names.vcluster_application}"
        created = await self._ensure_application(body, what)
        state = "installing" if created else "already installed"
        return StepResult.done(
            f"vCluster {names.release} (Kubernetes {tag}, chart vcluster {self.location.vcluster_chart_version}) "
            f"{state} in {names.namespace} through Argo CD {what}"
        )

    async def _synced_application(self, name: str) -> tuple[Obj, StepResult | None]:
        """An Application this job made, and the failure it reports, if any; it must exist by now."""
        what = f"Application {name}"
        app = await self._application(self.location.argocd_namespace, name, what)
        if app is None:
            raise TemporaryError(f"{what} does not exist")
        return app, self._application_problem(app, what)

    def _application_problem(self, app: Obj, what: str) -> StepResult | None:
        """A failure reported on an Application, as a step result; None when there is none."""
        status = app.get("status") or {}
        for condition in status.get("conditions") or []:
            if condition.get("type") in _PERMANENT_CONDITIONS:
                return StepResult.fail(f"{what}: {condition.get('message', condition['type'])}", permanent=True)
        health = status.get("health") or {}
        if health.get("status") == "Degraded":
            return StepResult.fail(f"{what} is degraded: {health.get('message') or 'see Argo CD'}", permanent=True)
        operation = status.get("operationState") or {}
        if operation.get("phase") in ("Failed", "Error") and operation.get("retryCount", 0) >= 5:
            return StepResult.fail(f"{what} sync failed: {operation.get('message', '')}", permanent=True)
        return None

    @staticmethod
    def _progress(app: Obj) -> str:
        status = app.get("status") or {}
        sync = (status.get("sync") or {}).get("status", "Unknown")
        health = (status.get("health") or {}).get("status", "Unknown")
        errors = [c.get("message", "") for c in status.get("conditions") or [] if "Error" in c.get("type", "")]
        return f"sync {sync}, health {health}" + (f" ({'; '.join(errors)})" if errors else "")

    async def vcluster_ready(self, job: bus_pb2.ProvisionJob) -> StepResult:
        names = self.names(job)
        app, problem = await self._synced_application(names.vcluster_application)
        if problem is not None:
            return problem
        statefulset = await self.api.get(
            f"read StatefulSet {names.control_plane}",
            self.api.apps.read_namespaced_stateful_set,
            names.control_plane,
            names.namespace,
        )
        ready = (statefulset or {}).get("status", {}).get("readyReplicas") or 0
        if ready < 1:
            return StepResult.retry(
                self.poll_after, f"vCluster {names.release} control plane starting ({self._progress(app)})"
            )
        if await self._kubeconfig(names) is None:
            return StepResult.retry(
                self.poll_after, f"vCluster {names.release} ready, waiting for secret {names.kubeconfig_secret}"
            )
        return StepResult.done(f"vCluster {names.release} control plane ready ({ready} ready)")

    async def _kubeconfig(self, names: Names) -> str | None:
        secret = await self.api.get(
            f"read secret {names.kubeconfig_secret}",
            self.api.core.read_namespaced_secret,
            names.kubeconfig_secret,
            names.namespace,
        )
        encoded = ((secret or {}).get("data") or {}).get("config")
        return base64.b64decode(encoded).decode() if encoded else None

    async def read_kubeconfig(self, job: bus_pb2.ProvisionJob) -> StepResult:
        names = self.names(job)
        kubeconfig = await self._kubeconfig(names)
        if kubeconfig is None:
            raise TemporaryError(f"secret {names.kubeconfig_secret} has no key config yet")
        return StepResult.done(f"kubeconfig read from secret {names.kubeconfig_secret}", kubeconfig=kubeconfig)

    async def _ensure_secret_env(self, job: bus_pb2.ProvisionJob, names: Names) -> None:
        """Makes the app's Secret hold the job's secret values, opened here, written only through the API
        (the GitOps repository references it); removed when the deployment has none left."""
        namespace, name = names.namespace, names.secret_env
        what = f"secret {name}"
        found = await self.api.get(f"read {what}", self.api.core.read_namespaced_secret, name, namespace)
        if not job.sealed_secrets:
            if found is not None:
                await self.api.delete(f"delete {what}", self.api.core.delete_namespaced_secret, name, namespace)
            return
        if self.secret_keys is None:
            raise PermanentError(
                "the deployment has secret environment values and this provisioner runs without "
                "--secret-key-file (the API's key file) to open them"
            )
        data: dict[str, str] = {}
        for sealed in job.sealed_secrets:
            try:
                value = self.secret_keys.open(sealed.envelope, job.deployment.id, sealed.name)
            except secrets.SecretKeyError as failure:
                raise PermanentError(f"secret value {sealed.name} cannot be opened: {failure}") from None
            data[sealed.name] = base64.b64encode(value.encode()).decode()
        versions = ",".join(f"{s.name}={s.version}" for s in sorted(job.sealed_secrets, key=lambda s: s.name))
        body: Obj = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": render.labels(names),
                "annotations": {render.SECRET_ENV_VERSIONS: versions},
            },
            "data": data,
        }
        if found is None:
            if await self.api.create(f"create {what}", self.api.core.create_namespaced_secret, namespace, body):
                return
            found = await self.api.get(f"read {what}", self.api.core.read_namespaced_secret, name, namespace)
            if found is None:
                raise TemporaryError(f"{what} was deleted while it was being created")
        annotations = (found.get("metadata") or {}).get("annotations") or {}
        if found.get("data") == data and annotations.get(render.SECRET_ENV_VERSIONS) == versions:
            return
        replace = {**body, "metadata": {**body["metadata"], "resourceVersion": found["metadata"]["resourceVersion"]}}
        await self.api.call(f"update {what}", self.api.core.replace_namespaced_secret, name, namespace, replace)

    async def _register_cluster(self, names: Names, kubeconfig: str) -> None:
        """Tells Argo CD about the vCluster: a cluster secret made from its kubeconfig."""
        body = argocd_cluster_secret(names, self.location, kubeconfig)
        namespace = self.location.argocd_namespace
        what = f"Argo CD cluster secret {names.argocd_cluster_secret}"
        if await self.api.create(f"create {what}", self.api.core.create_namespaced_secret, namespace, body):
            return
        found = await self.api.get(
            f"read {what}", self.api.core.read_namespaced_secret, names.argocd_cluster_secret, namespace
        )
        if found is None:
            raise TemporaryError(f"{what} was deleted while it was being created")
        wanted = {k: base64.b64encode(v.encode()).decode() for k, v in body["stringData"].items()}
        if found.get("data") != wanted:
            # A replace carrying the resourceVersion we read: a concurrent change fails with 409 and is retried.
            replace = {
                **body,
                "metadata": {**body["metadata"], "resourceVersion": found["metadata"]["resourceVersion"]},
            }
            await self.api.call(
                f"update {what}",
                self.api.core.replace_namespaced_secret,
                names.argocd_cluster_secret,
                namespace,
                replace,
            )

    def _commit_files(self, path: str, files: Mapping[str, str], message: str) -> tuple[str, bool]:
        """Makes `path` hold `files`: (the commit that holds them, whether this call made it). Blocks."""
        _, current = self.repo.snapshot(path)
        if current == dict(files):
            commit = self.repo.last_change(path)
            if commit is not None:
                return commit, False
        return self.repo.write(path, files, message), True

    async def _commit(self, path: str, files: Mapping[str, str], message: str) -> tuple[str, bool]:
        return await asyncio.to_thread(self._commit_files, path, files, message)

    @staticmethod
    def _message(job: bus_pb2.ProvisionJob, names: Names, verb: str) -> str:
        release = f" release {job.release}" if job.release > 0 else ""
        return f"{names.release}: {verb} {names.app}{release} ({job.deployment.id})"

    async def _synced_at(self, app: Obj, commit: str) -> str | None:
        """The revision Argo CD last synced the Application to, when it holds `commit`; else None."""
        sync = (app.get("status") or {}).get("sync") or {}
        # A single source reports `revision`; several sources report `revisions`, one per source.
        revisions = [str(r) for r in [sync.get("revision"), *(sync.get("revisions") or [])] if r]
        for revision in revisions:
            if await asyncio.to_thread(self.repo.contains, commit, revision):
                return revision
        return None

    async def _request_sync(self, names: Names, app: Obj, release: int) -> str:
        """Asks Argo CD to sync the Application now (as `argocd app sync` does), unless a sync is running."""
        phase = ((app.get("status") or {}).get("operationState") or {}).get("phase")
        if app.get("operation") or phase == "Running":
            return "a sync is in progress"
        operation: Obj = {"initiatedBy": {"username": _SYNC_INITIATOR}, "sync": {"prune": True}}
        if release > 0:
            operation["info"] = [{"name": "release", "value": str(release)}]
        what = f"Application {names.app_application}"
        await self.api.call(
            f"sync {what}",
            self.api.custom.patch_namespaced_custom_object,
            _GROUP,
            _VERSION,
            self.location.argocd_namespace,
            _PLURAL,
            names.app_application,
            {"operation": operation},
        )
        return "sync requested"

    async def ensure_app(self, job: bus_pb2.ProvisionJob, kubeconfig: str) -> StepResult:
        """Commits the job's release under the git path (a new commit only when it differs from what is
        there) and has Argo CD sync it; `app_rollout` then waits for that commit to run healthy."""
        names = self.names(job)
        deployment = job.deployment
        if not kubeconfig:
            raise TemporaryError("no kubeconfig of the vCluster was handed to the app step")
        refused = await self._chart_host_refused(deployment)
        if refused is not None:
            return StepResult.fail(refused, permanent=True)
        await self._register_cluster(names, kubeconfig)
        await self._ensure_secret_env(job, names)
        files = render.app_files(deployment, names, self.location, release=job.release)
        commit, changed = await self._commit(names.git_path, files.files, self._message(job, names, "deploy"))
        body = render.app_application(deployment, names, self.location, self.repo.url, release=job.release)
        what = f"Application {names.app_application}"
        created = await self._ensure_application(body, what)
        state = "created" if created else "already present"
        sync = ""
        if not created:
            # A new Application syncs on its own; an existing one is told, instead of waiting for Argo CD's poll.
            app = await self._application(self.location.argocd_namespace, names.app_application, what)
            if app is not None and await self._synced_at(app, commit) is None:
                sync = f"; {await self._request_sync(names, app, job.release)}"
        release = f"release {job.release} of " if job.release > 0 else ""
        committed = "committed" if changed else "already committed"
        return StepResult.done(
            f"{release}app {names.app} {committed} to {names.git_path} at {commit[:12]}; Argo CD {what} {state}{sync}",
            git_path=names.git_path,
            values_yaml=files.values_yaml,
        )

    async def _chart_host_refused(self, deployment: deployments_pb2.Deployment) -> str | None:
        """Checks the chart's host again now: a name that was public at create time may point inward today.

        As at create time, a name that does not resolve passes: the chart fetch fails on its own.
        """
        if deployment.app_type != deployments_pb2.APP_TYPE_HELM or not deployment.helm_repo_url:
            return None
        host = urlsplit(deployment.helm_repo_url).hostname
        if not host:
            return None
        try:
            await netguard.resolve_public(host, resolver=self.resolver)
        except netguard.Refused as refused:
            return f"helm_repo_url is not fetched: {refused}"
        except netguard.Unresolvable:
            return None
        return None

    async def applied_release(self, job: bus_pb2.ProvisionJob) -> int:
        names = self.names(job)
        app = await self._application(self.location.argocd_namespace, names.app_application, "the app's Application")
        annotations = ((app or {}).get("metadata") or {}).get("annotations") or {}
        try:
            return int(annotations.get(render.RELEASE_ANNOTATION, 0))
        except ValueError:
            return 0

    async def app_rollout(self, job: bus_pb2.ProvisionJob, kubeconfig: str) -> StepResult:
        names = self.names(job)
        app, problem = await self._synced_application(names.app_application)
        if problem is not None:
            return problem
        commit = await asyncio.to_thread(self.repo.last_change, names.git_path)
        if commit is None:
            raise TemporaryError(f"git path {names.git_path} holds no commit of app {names.app}")
        release = f"release {job.release} " if job.release > 0 else ""
        if await self._synced_at(app, commit) is None:
            requested = await self._request_sync(names, app, job.release)
            return StepResult.retry(
                self.poll_after,
                f"app {names.app}: waiting for Argo CD to sync {release}(commit {commit[:12]}): {requested}; "
                f"{self._progress(app)}",
            )
        status = app.get("status") or {}
        synced = (status.get("sync") or {}).get("status") == "Synced"
        healthy = (status.get("health") or {}).get("status") == "Healthy"
        if not (synced and healthy):
            return StepResult.retry(self.poll_after, f"app {names.app} rolling out ({self._progress(app)})")
        if job.deployment.app_type != deployments_pb2.APP_TYPE_HELM:
            # Argo CD calls a Deployment healthy once its rollout is done and its replicas are available.
            deployment = _resource(status, "Deployment", names.app)
            if deployment is None or (deployment.get("health") or {}).get("status") != "Healthy":
                return StepResult.retry(self.poll_after, f"app {names.app}: Deployment not yet available")
        replicas = render.Resources.of(job.deployment).replicas
        return StepResult.done(
            f"app {names.app} {release}synced at {commit[:12]} and healthy: {replicas}/{replicas} replicas available"
        )

    async def endpoint(self, job: bus_pb2.ProvisionJob, kubeconfig: str) -> StepResult:
        names = self.names(job)
        host = names.host(render.base_domain(self.location))
        url = f"https://{host}"
        if job.deployment.app_type != deployments_pb2.APP_TYPE_HELM:
            what = f"Application {names.app_application}"
            app = await self._application(self.location.argocd_namespace, names.app_application, what)
            if app is None or _resource(app.get("status") or {}, "Ingress", names.app) is None:
                return StepResult.retry(self.poll_after, f"waiting for Ingress {names.app} of {host}")
        return StepResult.done(f"app answers at {url}", endpoint_url=url)

    # -- stop and start -------------------------------------------------------------------------

    async def stop_app(self, job: bus_pb2.ProvisionJob, kubeconfig: str) -> StepResult:
        """Commits the release with zero replicas and has Argo CD sync it; done once no pod of the app
        runs in the host namespace (vCluster syncs the app's pods there)."""
        names = self.names(job)
        files = render.app_files(job.deployment, names, self.location, release=job.release, stopped=True)
        commit, _ = await self._commit(names.git_path, files.files, self._message(job, names, "stop"))
        what = f"Application {names.app_application}"
        app = await self._application(self.location.argocd_namespace, names.app_application, what)
        if app is None:
            return StepResult.done(f"app {names.app} has no Application: nothing runs")
        if await self._synced_at(app, commit) is None:
            requested = await self._request_sync(names, app, job.release)
            return StepResult.retry(
                self.poll_after, f"app {names.app}: scaling to zero at commit {commit[:12]}: {requested}"
            )
        pods = await self.api.call(
            f"list pods of {names.app} in {names.namespace}",
            self.api.core.list_namespaced_pod,
            names.namespace,
            label_selector=names.app_pods_selector,
        )
        running = [str(p.metadata.name) for p in pods.items if p.metadata is not None]
        if running:
            return StepResult.retry(self.poll_after, f"app {names.app}: {len(running)} replica(s) still running")
        return StepResult.done(f"app {names.app} scaled to zero at commit {commit[:12]}; no replica runs")

    async def _scale_control_plane(self, names: Names, replicas: int) -> Obj | None:
        """Scales the vCluster's control plane StatefulSet (its scale subresource); None when it is absent."""
        what = f"StatefulSet {names.control_plane} in {names.namespace}"
        found = await self.api.get(
            f"read {what}", self.api.apps.read_namespaced_stateful_set, names.control_plane, names.namespace
        )
        if found is None:
            return None
        if (found.get("spec") or {}).get("replicas") != replicas:
            await self.api.call(
                f"scale {what}",
                self.api.apps.patch_namespaced_stateful_set_scale,
                names.control_plane,
                names.namespace,
                {"spec": {"replicas": replicas}},
            )
        return found

    async def sleep_vcluster(self, job: bus_pb2.ProvisionJob) -> StepResult:
        names = self.names(job)
        found = await self._scale_control_plane(names, 0)
        if found is None:
            return StepResult.done(f"vCluster {names.release} has no control plane running: asleep")
        status = found.get("status") or {}
        up = max(int(status.get("replicas") or 0), int(status.get("readyReplicas") or 0))
        if up:
            return StepResult.retry(self.poll_after, f"vCluster {names.release} control plane stopping ({up} left)")
        return StepResult.done(f"vCluster {names.release} asleep: control plane scaled to zero, volumes kept")

    async def wake_vcluster(self, job: bus_pb2.ProvisionJob) -> StepResult:
        names = self.names(job)
        found = await self._scale_control_plane(names, _CONTROL_PLANE_REPLICAS)
        if found is None:
            raise TemporaryError(
                f"vCluster {names.release}: StatefulSet {names.control_plane} not found in {names.namespace}"
            )
        return StepResult.done(f"vCluster {names.release} waking: control plane scaled to {_CONTROL_PLANE_REPLICAS}")

    # -- adoption -------------------------------------------------------------------------------

    async def adopt_namespace(self, job: bus_pb2.ProvisionJob) -> StepResult:
        """Labels the existing namespace with the deployment id (and managed-by, unless another tool
        claims it) and annotates it as adopted; nothing in it is created or changed."""
        names = self.names(job)
        namespace = job.deployment.source_namespace
        if not namespace:
            return StepResult.fail("an adoption names no source_namespace", permanent=True)
        what = f"namespace {namespace}"
        found = await self.api.get(f"read {what}", self.api.core.read_namespace, namespace)
        if found is None:
            return StepResult.fail(f"{what} does not exist on location {self.location.id}", permanent=True)
        meta = found["metadata"]
        if meta.get("deletionTimestamp"):
            return StepResult.fail(f"{what} on location {self.location.id} is being deleted", permanent=True)
        current = meta.get("labels") or {}
        owner = current.get(render.DEPLOYMENT_LABEL)
        if owner and owner != names.deployment_id:
            return StepResult.fail(f"{what} is already managed by deployment {owner}", permanent=True)
        wanted = {render.DEPLOYMENT_LABEL: names.deployment_id}
        if not any(current.get(k) for k in render.MANAGED_BY):
            wanted.update(render.MANAGED_BY)
        annotations = {render.ADOPTED_ANNOTATION: "true"}
        if all(current.get(k) == v for k, v in wanted.items()) and all(
            (meta.get("annotations") or {}).get(k) == v for k, v in annotations.items()
        ):
            return StepResult.done(f"{what} already adopted by this deployment")
        await self.api.call(
            f"label {what}",
            self.api.core.patch_namespace,
            namespace,
            {"metadata": {"labels": wanted, "annotations": annotations}},
        )
        return StepResult.done(f"{what} adopted as it is: labelled with the deployment id, its workloads untouched")

    async def release_namespace(self, job: bus_pb2.ProvisionJob) -> StepResult:
        names = self.names(job)
        what = f"namespace {names.namespace}"
        found = await self.api.get(f"read {what}", self.api.core.read_namespace, names.namespace)
        if found is None:
            return StepResult.done(f"{what} is gone already: nothing to release")
        meta = found["metadata"]
        labels = meta.get("labels") or {}
        if labels.get(render.DEPLOYMENT_LABEL) not in (None, names.deployment_id):
            return StepResult.done(f"{what} is managed by another deployment now: left as it is")
        drop_labels: dict[str, None] = {render.DEPLOYMENT_LABEL: None}
        drop_labels.update({k: None for k, v in render.MANAGED_BY.items() if labels.get(k) == v})
        present = [k for k in drop_labels if k in labels]
        if present or render.ADOPTED_ANNOTATION in (meta.get("annotations") or {}):
            await self.api.call(
                f"unlabel {what}",
                self.api.core.patch_namespace,
                names.namespace,
                {"metadata": {"labels": drop_labels, "annotations": {render.ADOPTED_ANNOTATION: None}}},
            )
        return StepResult.done(f"{what} released: no longer managed, its workloads left running")

    # -- delete ---------------------------------------------------------------------------------

    async def _delete_application(self, name: str) -> StepResult | None:
        """Deletes an Application; a retry result while Argo CD prunes what it deployed, None once gone."""
        namespace = self.location.argocd_namespace
        what = f"Application {name}"
        found = await self._application(namespace, name, what)
        if found is None:
            return None
        if not found["metadata"].get("deletionTimestamp"):
            await self.api.delete(
                f"delete {what}",
                self.api.custom.delete_namespaced_custom_object,
                _GROUP,
                _VERSION,
                namespace,
                _PLURAL,
                name,
            )
        return StepResult.retry(self.poll_after, f"{what} deleting: Argo CD is removing what it deployed")

    async def delete_app(self, job: bus_pb2.ProvisionJob) -> StepResult:
        names = self.names(job)
        waiting = await self._delete_application(names.app_application)
        if waiting is not None:
            return waiting
        removed = await asyncio.to_thread(
            self.repo.remove, names.git_path, f"{names.release}: remove {names.app} ({job.deployment.id})"
        )
        await self.api.delete(
            f"delete secret {names.argocd_cluster_secret}",
            self.api.core.delete_namespaced_secret,
            names.argocd_cluster_secret,
            self.location.argocd_namespace,
        )
        if await self.api.get(
            f"read secret {names.argocd_cluster_secret}",
            self.api.core.read_namespaced_secret,
            names.argocd_cluster_secret,
            self.location.argocd_namespace,
        ):
            return StepResult.retry(self.poll_after, f"Argo CD cluster secret {names.argocd_cluster_secret} deleting")
        if await asyncio.to_thread(self.repo.read, names.git_path) is not None:
            raise TemporaryError(f"git path {names.git_path} is still in {self.repo.url}")
        git = f"git path {names.git_path} removed" if removed else f"git path {names.git_path} already gone"
        return StepResult.done(f"app {names.app} deleted: Application {names.app_application} gone, {git}")

    async def delete_vcluster(self, job: bus_pb2.ProvisionJob) -> StepResult:
        names = self.names(job)
        waiting = await self._delete_application(names.vcluster_application)
        if waiting is not None:
            return waiting
        # Uninstalling a chart leaves its StatefulSet's volume claims behind; they go explicitly.
        listed = await self.api.call(
            f"list PVCs in {names.namespace}",
            self.api.core.list_namespaced_persistent_volume_claim,
            names.namespace,
        )
        claims = [str(item.metadata.name) for item in listed.items if item.metadata is not None]
        for claim in claims:
            await self.api.delete(
                f"delete PVC {claim}",
                self.api.core.delete_namespaced_persistent_volume_claim,
                claim,
                names.namespace,
            )
        if claims:
            return StepResult.retry(self.poll_after, f"vCluster {names.release}: deleting PVCs {', '.join(claims)}")
        return StepResult.done(f"vCluster {names.release} uninstalled; its PVCs are gone")

    async def delete_namespace(self, job: bus_pb2.ProvisionJob) -> StepResult:
        names = self.names(job)
        what = f"namespace {names.namespace}"
        found = await self.api.get(f"read {what}", self.api.core.read_namespace, names.namespace)
        if found is None:
            return StepResult.done(f"host namespace {names.namespace} deleted")
        if not found["metadata"].get("deletionTimestamp"):
            await self.api.delete(f"delete {what}", self.api.core.delete_namespace, names.namespace)
        return StepResult.retry(self.poll_after, f"host namespace {names.namespace} terminating")


def _resource(status: Obj, kind: str, name: str) -> Obj | None:
    for resource in status.get("resources") or []:
        if resource.get("kind") == kind and resource.get("name") == name:
            return dict(resource)
    return None


def argocd_cluster_secret(names: Names, location: LocationConfig, kubeconfig: str) -> Obj:
    """Argo CD's declarative cluster: server and credentials taken from the vCluster's kubeconfig."""
    try:
        parsed: Any = yaml.safe_load(kubeconfig)
        current = parsed.get("current-context") or parsed["contexts"][0]["name"]
        context = next(c["context"] for c in parsed["contexts"] if c["name"] == current)
        cluster = next(c["cluster"] for c in parsed["clusters"] if c["name"] == context["cluster"])
        user = next(u["user"] for u in parsed["users"] if u["name"] == context["user"])
    except (yaml.YAMLError, KeyError, IndexError, StopIteration, TypeError, AttributeError) as exc:
        raise TemporaryError(f"kubeconfig in secret {names.kubeconfig_secret} cannot be read: {exc!r}") from exc
    tls: dict[str, Any] = {}
    if cluster.get("certificate-authority-data"):
        tls["caData"] = cluster["certificate-authority-data"]
    if cluster.get("insecure-skip-tls-verify"):
        tls["insecure"] = True
    if user.get("client-certificate-data"):
        tls["certData"] = user["client-certificate-data"]
    if user.get("client-key-data"):
        tls["keyData"] = user["client-key-data"]
    cluster_config: dict[str, Any] = {"tlsClientConfig": tls}
    if user.get("token"):
        cluster_config["bearerToken"] = user["token"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": names.argocd_cluster_secret,
            "namespace": location.argocd_namespace,
            "labels": {**render.labels(names), _CLUSTER_SECRET_LABEL: "cluster"},
        },
        "type": "Opaque",
        "stringData": {"name": names.argocd_cluster, "server": cluster["server"], "config": json.dumps(cluster_config)},
    }


if TYPE_CHECKING:
    # The driver keeps the committed step protocol; mypy checks it here.
    _CHECKED: type[Driver] = KubernetesDriver
