"""A stand-in for the controllers of a cluster with Argo CD, on the fake API server, for the driver's tests.

Started, it runs a controller loop that does continually what the real controllers do, so a test
only acts through the driver and waits for the conditions a real cluster would show:

- the vcluster chart (through its Application): the control plane StatefulSet and its PVC, whose
  replica becomes ready on a later pass than the one that created it, then the kubeconfig secret
  `vc-<release>`; an asleep vCluster (control plane at zero) answers no sync;
- Argo CD: it applies the manifests committed under an app Application's git path into the vCluster
  (itself a cluster of the fake server, so a vCluster's kubeconfig really reaches it), reports the
  git commit it synced to (`status.sync.revision`, or `revisions` for several sources), sync status
  and health, runs a sync requested through the Application's `operation` field and records it in
  `operationState`, leaves the control plane's replicas alone (the driver's Applications ignore
  them) and prunes everything when an Application is deleted. Like a real Argo CD between its polls
  of git, it syncs an Application's new commits only when asked to (`auto_sync` follows every one);
- the Deployment controller and vCluster's syncer: a ReplicaSet per pod template (older ones scaled
  to zero), a Deployment's status (observedGeneration, replicas, readyReplicas, availableReplicas,
  its Available condition) and its pods, which appear
  in the host namespace as vCluster syncs them there, ready, or gone once it is scaled to zero;
  PVCs and Ingresses are synced there too under vCluster's translated names.

Failures are configured up front, through the same objects a real cluster would see:

- an image whose name holds `never-healthy` runs but never gets ready (as an image that does not
  exist never does on a real cluster); one holding `crash-loop` keeps restarting (CrashLoopBackOff);
- a Helm chart named `fails-to-sync` fails every sync attempt, as Argo CD reports a chart whose
  install fails: `operationState` Failed, its retry count growing to the Application's retry limit;
- `ready = False` keeps every control plane and Deployment unready (the vCluster never starts).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import threading
from datetime import UTC, datetime
from typing import Any

import yaml

from provisioner.kubernetes.gitops import GitOpsRepo
from tests.k8s.fake_apiserver import ApiError, FakeApiServer

Obj = dict[str, Any]
FINALIZER = "resources-finalizer.argocd.argoproj.io"
# Failure injection, configured up front through what a test deploys (see the module's docstring).
NEVER_HEALTHY = "never-healthy"
CRASH_LOOP = "crash-loop"
FAILING_CHART = "fails-to-sync"
# The sync retries of the driver's Applications (their syncPolicy.retry.limit).
_SYNC_RETRY_LIMIT = 5


class FakeArgoCD:
    def __init__(self, server: FakeApiServer, namespace: str = "argocd", *, ready: bool = True) -> None:
        self.server = server
        self.namespace = namespace
        # False: control planes and Deployments stay unready until `mark_ready`.
        self.ready = ready
        # False: an Application that has synced once syncs again only when an operation asks for it
        # (a real Argo CD polls git every few minutes); True: it follows every commit at once.
        self.auto_sync = False
        # Every sync requested through `operation`: (Application name, its info as a dict).
        self.sync_requests: list[tuple[str, dict[str, str]]] = []
        self._repos: dict[str, GitOpsRepo] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, interval: float = 0.05) -> FakeArgoCD:
        def loop() -> None:
            while not self._stop.wait(interval):
                self.reconcile()

        self._thread = threading.Thread(target=loop, name="fake-argocd", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def mark_ready(self) -> None:
        self.ready = True
        self.reconcile()

    def reconcile(self) -> None:
        with self.server.lock:
            for app in self.server.objects("Application", self.namespace):
                try:
                    self._reconcile(app)
                except ApiError as error:
                    self._status(app, {"conditions": [{"type": "ComparisonError", "message": error.message}]})
            self.server.settle()

    def _status(self, app: Obj, status: Obj) -> None:
        self.server.set_status("Application", app["metadata"]["name"], status, self.namespace)

    def _reconcile(self, app: Obj) -> None:
        spec = app["spec"]
        source = spec.get("source") or spec["sources"][0]
        deleting = bool(app["metadata"].get("deletionTimestamp"))
        if source.get("chart") == "vcluster":
            self._vcluster(app, source, deleting)
            self._finish(app, deleting)
            return
        chart = next((s for s in spec.get("sources") or [] if s.get("chart")), None)
        if chart is not None and chart["chart"] == FAILING_CHART and not deleting:
            self._failing_sync(app)
            return
        operation = app.get("operation")
        if operation is not None:
            info = {i["name"]: i["value"] for i in operation.get("info") or []}
            self.sync_requests.append((app["metadata"]["name"], info))
            # Argo CD clears the request as it takes it up, so a failed sync is not retried for ever.
            taken = copy.deepcopy(app)
            taken.pop("operation")
            self.server.put(taken)
        synced_once = bool(((app.get("status") or {}).get("sync") or {}).get("revision")) or bool(
            ((app.get("status") or {}).get("sync") or {}).get("revisions")
        )
        if deleting or operation is not None or self.auto_sync or not synced_once:
            revision = self._app(app, deleting)
            if operation is not None and revision is not None:
                now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                self._status(
                    app,
                    {
                        "operationState": {
                            "operation": operation,
                            "phase": "Succeeded",
                            "message": "successfully synced (all tasks run)",
                            "startedAt": now,
                            "finishedAt": now,
                            "syncResult": {"revision": revision},
                        }
                    },
                )
        self._finish(app, deleting)

    def _failing_sync(self, app: Obj) -> None:
        """A sync whose install fails: Argo CD retries it up to the retry limit, then reports it Failed."""
        state = (app.get("status") or {}).get("operationState") or {}
        attempt = min(int(state.get("retryCount", -1)) + 1, _SYNC_RETRY_LIMIT)
        failed = attempt >= _SYNC_RETRY_LIMIT
        message = f"chart {FAILING_CHART}: one or more objects failed to apply"
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._status(
            app,
            {
                "sync": {"status": "OutOfSync"},
                "health": {"status": "Missing"},
                "operationState": {
                    "operation": {"sync": {"prune": True}, "retry": {"limit": _SYNC_RETRY_LIMIT}},
                    "phase": "Failed" if failed else "Running",
                    "message": message if failed else f"Retrying attempt #{attempt} ({message})",
                    "retryCount": attempt,
                    "startedAt": now,
                    **({"finishedAt": now} if failed else {}),
                },
            },
        )
        if app.get("operation") is not None:
            taken = copy.deepcopy(app)
            taken.pop("operation")
            self.server.put(taken)

    def _finish(self, app: Obj, deleting: bool) -> None:
        if deleting:
            self.server.remove_finalizer("Application", app["metadata"]["name"], FINALIZER, self.namespace)

    # -- the vcluster chart ---------------------------------------------------------------------

    def _vcluster(self, app: Obj, source: Obj, deleting: bool) -> None:
        release = source["helm"]["releaseName"]
        ns = app["spec"]["destination"]["namespace"]
        if deleting:
            for kind, name in (("StatefulSet", release), ("Service", release), ("Secret", f"vc-{release}")):
                if self.server.get(kind, name, ns) is not None:
                    self.server.delete_object(kind, name, ns)
            # Helm uninstall leaves the StatefulSet's claim (and claims synced from inside) behind.
            self.server.clusters.pop(release, None)
            return
        if self.server.get("Namespace", ns) is None:
            raise ApiError(404, "NotFound", f'namespaces "{ns}" not found')
        labels = {"app": "vcluster", "release": release}
        existing = self.server.get("StatefulSet", release, ns)
        # The Application ignores the control plane's replicas: sleep and wake set them.
        replicas = 1 if existing is None else existing["spec"]["replicas"]
        self.server.put(
            {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": {"name": release, "namespace": ns, "labels": labels},
                "spec": {
                    "serviceName": f"{release}-headless",
                    "replicas": replicas,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {"containers": [{"name": "syncer", "image": "ghcr.io/loft-sh/vcluster-oss:0.35.3"}]},
                    },
                },
            }
        )
        self.server.put(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": f"data-{release}-0", "namespace": ns, "labels": labels},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "5Gi"}}},
            }
        )
        # The control plane's pod starts after the pass that created its StatefulSet.
        ready = replicas if self.ready and existing is not None else 0
        self.server.set_status("StatefulSet", release, {"replicas": replicas, "readyReplicas": ready}, ns)
        self.server.cluster(release)
        if self.server.get("Namespace", "default", cluster=release) is None:
            self.server.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}, release)
        if ready and self.server.get("Secret", f"vc-{release}", ns) is None:
            self.server.put(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": f"vc-{release}", "namespace": ns},
                    "type": "Opaque",
                    "stringData": {"config": self.server.kubeconfig(release, release)},
                }
            )
        health = "Healthy" if ready == replicas else "Progressing"
        self._status(
            app,
            {
                "sync": {"status": "Synced", "revision": source["targetRevision"]},
                "health": {"status": health},
                "resources": [
                    {
                        "group": "apps",
                        "version": "v1",
                        "kind": "StatefulSet",
                        "namespace": ns,
                        "name": release,
                        "status": "Synced",
                        "health": {"status": health},
                    },
                ],
            },
        )

    # -- apps from git --------------------------------------------------------------------------

    def _repo(self, url: str) -> GitOpsRepo:
        if url not in self._repos:
            self._repos[url] = GitOpsRepo(url)
        return self._repos[url]

    def _cluster_of(self, app: Obj) -> str:
        name = app["spec"]["destination"]["name"]
        for secret in self.server.objects("Secret", self.namespace):
            labels = secret["metadata"].get("labels") or {}
            is_cluster = labels.get("argocd.argoproj.io/secret-type") == "cluster"
            if is_cluster and base64.b64decode(secret["data"]["name"]).decode() == name:
                server = base64.b64decode(secret["data"]["server"]).decode()
                # The fake's vCluster kubeconfigs point at /clusters/<release> of this server.
                return server.rsplit("/clusters/", 1)[-1]
        raise ApiError(404, "NotFound", f"cluster {name!r} is not registered with Argo CD")

    def _app(self, app: Obj, deleting: bool) -> str | None:
        """Syncs an app Application; the git commit it synced to (None while deleting)."""
        spec = app["spec"]
        resources: list[Obj] = list((app.get("status") or {}).get("resources") or [])
        if deleting:
            cluster = spec["destination"]["name"]
            for item in resources:
                item_ns = item.get("namespace", "")
                if cluster in self.server.clusters and self.server.get(item["kind"], item["name"], item_ns, cluster):
                    self.server.delete_object(item["kind"], item["name"], item_ns, cluster)
                    # The garbage collector takes what the object owned.
                    for owned in (
                        self._replica_sets(item["name"], item_ns, cluster) if item["kind"] == "Deployment" else []
                    ):
                        self.server.delete_object("ReplicaSet", owned["metadata"]["name"], item_ns, cluster)
            host_ns = self._host_namespace(cluster)
            if host_ns is not None:
                for pod in self._synced_pods(host_ns, cluster):
                    self.server.delete_object("Pod", pod["metadata"]["name"], host_ns)
            return None
        cluster = self._cluster_of(app)
        host_ns = self._host_namespace(cluster)
        control_plane = self.server.get("StatefulSet", cluster, host_ns) if host_ns is not None else None
        if control_plane is not None and control_plane["spec"]["replicas"] == 0:
            raise ApiError(503, "ServiceUnavailable", f"vCluster {cluster} is asleep: its API server does not answer")
        ns = spec["destination"]["namespace"]
        manifests: list[Obj] = []
        sync: Obj
        if "source" in spec:
            source = spec["source"]
            revision, files = self._repo(source["repoURL"]).snapshot(source["path"])
            if files is None or revision is None:
                raise ApiError(404, "NotFound", f"{source['path']}: app path does not exist")
            manifests = [yaml.safe_load(text) for name, text in files.items() if name != "kustomization.yaml"]
            sync = {"status": "Synced", "revision": revision}
        else:
            values_ref = next(s for s in spec["sources"] if s.get("ref") == "values")
            chart = next(s for s in spec["sources"] if s.get("chart"))
            path = chart["helm"]["valueFiles"][0].removeprefix("$values/").rsplit("/", 1)[0]
            revision, files = self._repo(values_ref["repoURL"]).snapshot(path)
            if files is None or revision is None or "values.yaml" not in files:
                raise ApiError(404, "NotFound", f"{path}/values.yaml: no such file")
            # One revision per source, in the order of `sources`.
            sync = {
                "status": "Synced",
                "revisions": [chart["targetRevision"] if s is chart else revision for s in spec["sources"]],
            }
        health = "Healthy" if self.ready else "Progressing"
        resources = []
        for manifest in manifests:
            manifest["metadata"]["namespace"] = ns
            self.server.put(manifest, cluster)
            kind, name = manifest["kind"], manifest["metadata"]["name"]
            if kind == "Deployment":
                images = [c["image"] for c in manifest["spec"]["template"]["spec"]["containers"]]
                crashing = any(CRASH_LOOP in image for image in images)
                available = self.ready and not crashing and not any(NEVER_HEALTHY in image for image in images)
                wanted = manifest["spec"].get("replicas", 1)
                if not available and wanted:
                    health = "Progressing"
                self._deployment_controller(manifest, cluster, available)
                if host_ns is not None:
                    self._sync_pods(manifest, wanted, host_ns, cluster, ready=available, crashing=crashing)
            if kind in ("PersistentVolumeClaim", "Ingress") and host_ns is not None:
                # vCluster syncs these to the host namespace under translated names.
                synced = {
                    **manifest,
                    "metadata": {
                        **manifest["metadata"],
                        "name": f"{name}-x-{ns}-x-{cluster}"[:63],
                        "namespace": host_ns,
                    },
                }
                self.server.put(synced)
            group, _, version = manifest["apiVersion"].rpartition("/")
            resources.append(
                {
                    "group": group,
                    "version": version,
                    "kind": kind,
                    "namespace": ns,
                    "name": name,
                    "status": "Synced",
                    "health": {"status": health},
                }
            )
        if health != "Healthy":
            for resource in resources:
                if resource["kind"] == "Deployment":
                    resource["health"] = {"status": health}
        self._status(
            app,
            {"sync": sync, "health": {"status": health}, "resources": resources, "conditions": None},
        )
        return revision

    @staticmethod
    def _template_hash(template: Obj) -> str:
        return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]

    def _deployment_controller(self, deployment: Obj, cluster: str, available: bool) -> None:
        """What the Deployment controller does for the Deployment's generation: one ReplicaSet per pod
        template (the current one at the wanted replicas, older ones at zero) and the status it reports."""
        ns, name = deployment["metadata"]["namespace"], deployment["metadata"]["name"]
        stored = self.server.get("Deployment", name, ns, cluster)
        assert stored is not None
        wanted = deployment["spec"].get("replicas", 1)
        ready = wanted if available else 0
        template = deployment["spec"]["template"]
        template_hash = self._template_hash(template)
        current = f"{name}-{template_hash}"
        owner = {"apiVersion": "apps/v1", "kind": "Deployment", "name": name, "uid": stored["metadata"]["uid"]}
        for replica_set in self._replica_sets(name, ns, cluster):
            if replica_set["metadata"]["name"] != current and replica_set["spec"]["replicas"]:
                replica_set["spec"]["replicas"] = 0
                self.server.put(replica_set, cluster)
                self.server.set_status("ReplicaSet", replica_set["metadata"]["name"], {"replicas": 0}, ns, cluster)
        labels = {**template["metadata"].get("labels", {}), "pod-template-hash": template_hash}
        selector = {**deployment["spec"]["selector"]["matchLabels"], "pod-template-hash": template_hash}
        self.server.put(
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "metadata": {"name": current, "namespace": ns, "labels": labels, "ownerReferences": [owner]},
                "spec": {
                    "replicas": wanted,
                    "selector": {"matchLabels": selector},
                    "template": {**template, "metadata": {**template["metadata"], "labels": labels}},
                },
            },
            cluster,
        )
        self.server.set_status(
            "ReplicaSet",
            current,
            {"replicas": wanted, "readyReplicas": ready, "availableReplicas": ready},
            ns,
            cluster,
        )
        condition = {
            "type": "Available",
            "status": "True" if ready >= wanted else "False",
            "reason": "MinimumReplicasAvailable" if ready >= wanted else "MinimumReplicasUnavailable",
            "message": f"Deployment has {ready} of {wanted} replicas available.",
        }
        status = {
            "observedGeneration": stored["metadata"]["generation"],
            "replicas": wanted,
            "updatedReplicas": wanted,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "unavailableReplicas": wanted - ready,
            "conditions": [condition],
        }
        self.server.set_status("Deployment", name, status, ns, cluster)

    def _replica_sets(self, deployment: str, ns: str, cluster: str) -> list[Obj]:
        return [
            replica_set
            for replica_set in self.server.objects("ReplicaSet", ns, cluster)
            if any(o.get("name") == deployment for o in replica_set["metadata"].get("ownerReferences") or [])
        ]

    @staticmethod
    def _pod_status(template: Obj, ready: bool, crashing: bool) -> Obj:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        containers = []
        for container in template["spec"]["containers"]:
            state: Obj = {"running": {"startedAt": now}}
            if crashing:
                state = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting failed container"}}
            containers.append(
                {
                    "name": container["name"],
                    "image": container["image"],
                    "imageID": "",
                    "ready": ready,
                    "started": not crashing,
                    "restartCount": 3 if crashing else 0,
                    "state": state,
                }
            )
        return {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": containers,
        }

    @staticmethod
    def _pod_labels(ns: str, cluster: str) -> dict[str, str]:
        return {"vcluster.loft.sh/managed-by": cluster, "vcluster.loft.sh/namespace": ns}

    def _synced_pods(self, host_ns: str, cluster: str) -> list[Obj]:
        return [
            pod
            for pod in self.server.objects("Pod", host_ns)
            if (pod["metadata"].get("labels") or {}).get("vcluster.loft.sh/managed-by") == cluster
        ]

    def _sync_pods(
        self, deployment: Obj, replicas: int, host_ns: str, cluster: str, *, ready: bool, crashing: bool
    ) -> None:
        """The Deployment's pods as vCluster shows them on the host: `replicas` of its current template
        (a changed template replaces them, as a rollout does), with their readiness."""
        ns, name = deployment["metadata"]["namespace"], deployment["metadata"]["name"]
        template = deployment["spec"]["template"]
        template_hash = self._template_hash(template)
        wanted = {f"{name}-{template_hash}-{i}-x-{ns}-x-{cluster}"[:63] for i in range(replicas)}
        status = self._pod_status(template, ready, crashing)
        for pod in self._synced_pods(host_ns, cluster):
            if pod["metadata"]["name"] not in wanted:
                self.server.delete_object("Pod", pod["metadata"]["name"], host_ns)
        for pod_name in sorted(wanted):
            current = self.server.get("Pod", pod_name, host_ns)
            if current is None:
                labels = {
                    **template["metadata"].get("labels", {}),
                    **self._pod_labels(ns, cluster),
                    "pod-template-hash": template_hash,
                }
                self.server.put(
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "metadata": {"name": pod_name, "namespace": host_ns, "labels": labels},
                        "spec": copy.deepcopy(template["spec"]),
                    }
                )
            ready_now = [c.get("status") for c in (current or {}).get("status", {}).get("conditions") or []]
            if current is None or ready_now != [status["conditions"][0]["status"]]:
                self.server.set_status("Pod", pod_name, status, host_ns)

    def _host_namespace(self, release: str) -> str | None:
        for sts in self.server.objects("StatefulSet"):
            if sts["metadata"]["name"] == release:
                return str(sts["metadata"]["namespace"])
        return None
