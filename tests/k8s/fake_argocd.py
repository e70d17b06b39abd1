"""A stand-in for Argo CD and the vcluster chart on the fake API server, for the driver's tests.

`reconcile()` does once what their controllers do continually: it installs the vcluster chart's
objects (control plane StatefulSet, its PVC, the kubeconfig secret `vc-<release>`) for a vcluster
Application, applies the manifests committed under an app Application's git path into the vCluster
(itself a cluster of the fake server, so a vCluster's kubeconfig really reaches it), reports sync
and health in the Applications' status, and prunes everything when an Application is deleted.
"""

from __future__ import annotations

import base64
import threading
from typing import Any

import yaml

from provisioner.kubernetes.gitops import GitOpsRepo
from tests.k8s.fake_apiserver import ApiError, FakeApiServer

Obj = dict[str, Any]
FINALIZER = "resources-finalizer.argocd.argoproj.io"


class FakeArgoCD:
    def __init__(self, server: FakeApiServer, namespace: str = "argocd", *, ready: bool = True) -> None:
        self.server = server
        self.namespace = namespace
        # False: control planes and Deployments stay unready until `mark_ready`.
        self.ready = ready
        self._repos: dict[str, GitOpsRepo] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, interval: float = 0.02) -> FakeArgoCD:
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
        else:
            self._app(app, deleting)
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
        self.server.put(
            {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": {"name": release, "namespace": ns, "labels": labels},
                "spec": {
                    "serviceName": f"{release}-headless",
                    "replicas": 1,
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
        ready = 1 if self.ready else 0
        self.server.set_status("StatefulSet", release, {"replicas": 1, "readyReplicas": ready}, ns)
        self.server.cluster(release)
        if self.server.get("Namespace", "default", cluster=release) is None:
            self.server.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}, release)
        if self.ready and self.server.get("Secret", f"vc-{release}", ns) is None:
            self.server.put(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": f"vc-{release}", "namespace": ns},
                    "type": "Opaque",
                    "stringData": {"config": self.server.kubeconfig(release, release)},
                }
            )
        health = "Healthy" if self.ready else "Progressing"
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

    def _app(self, app: Obj, deleting: bool) -> None:
        spec = app["spec"]
        resources: list[Obj] = list((app.get("status") or {}).get("resources") or [])
        if deleting:
            cluster = spec["destination"]["name"]
            for item in resources:
                if cluster in self.server.clusters and self.server.get(
                    item["kind"], item["name"], item.get("namespace", ""), cluster
                ):
                    self.server.delete_object(item["kind"], item["name"], item.get("namespace", ""), cluster)
            return
        cluster = self._cluster_of(app)
        ns = spec["destination"]["namespace"]
        manifests: list[Obj] = []
        if "source" in spec:
            source = spec["source"]
            files = self._repo(source["repoURL"]).read(source["path"])
            if files is None:
                raise ApiError(404, "NotFound", f"{source['path']}: app path does not exist")
            manifests = [yaml.safe_load(text) for name, text in files.items() if name != "kustomization.yaml"]
        else:
            values_ref = next(s for s in spec["sources"] if s.get("ref") == "values")
            chart = next(s for s in spec["sources"] if s.get("chart"))
            path = chart["helm"]["valueFiles"][0].removeprefix("$values/").rsplit("/", 1)[0]
            files = self._repo(values_ref["repoURL"]).read(path)
            if files is None or "values.yaml" not in files:
                raise ApiError(404, "NotFound", f"{path}/values.yaml: no such file")
        health = "Healthy" if self.ready else "Progressing"
        resources = []
        host_ns = self._host_namespace(cluster)
        for manifest in manifests:
            manifest["metadata"]["namespace"] = ns
            self.server.put(manifest, cluster)
            kind, name = manifest["kind"], manifest["metadata"]["name"]
            if kind == "Deployment" and self.ready:
                replicas = manifest["spec"]["replicas"]
                self.server.set_status(
                    kind,
                    name,
                    {"replicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas},
                    ns,
                    cluster,
                )
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
        self._status(
            app,
            {"sync": {"status": "Synced", "revision": "HEAD"}, "health": {"status": health}, "resources": resources},
        )

    def _host_namespace(self, release: str) -> str | None:
        for sts in self.server.objects("StatefulSet"):
            if sts["metadata"]["name"] == release:
                return str(sts["metadata"]["namespace"])
        return None
