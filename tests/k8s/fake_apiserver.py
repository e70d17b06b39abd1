"""A fake Kubernetes API server on loopback: the REST semantics of the objects the driver touches.

It serves the host cluster at `/` and any number of virtual clusters at `/clusters/<name>/`, each
with its own objects. Create, get, list (with label selectors), replace, merge-patch and delete,
404 NotFound, 409 AlreadyExists and Conflict on a stale resourceVersion, the status subresource, the
scale subresource of Deployments and StatefulSets (autoscaling/v1 Scale),
finalizers and deletionTimestamp, namespaces that terminate and take their contents with them, and
the discovery documents `kubectl` needs. Tests can validate every written object (a validator
answers 422 Invalid like a real API server), make an admission webhook refuse objects, and make the
next calls fail with a server error.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

Obj = dict[str, Any]
Validator = Callable[[Obj], str | None]


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status: bool = True
    short: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


KINDS: tuple[Kind, ...] = (
    Kind("", "v1", "namespaces", "Namespace", namespaced=False, short=("ns",)),
    Kind("", "v1", "secrets", "Secret", status=False),
    Kind("", "v1", "configmaps", "ConfigMap", status=False, short=("cm",)),
    Kind("", "v1", "services", "Service", short=("svc",)),
    Kind("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", short=("pvc",)),
    Kind("", "v1", "pods", "Pod", short=("po",)),
    Kind("", "v1", "resourcequotas", "ResourceQuota", short=("quota",)),
    Kind("", "v1", "limitranges", "LimitRange", status=False, short=("limits",)),
    Kind("apps", "v1", "deployments", "Deployment", short=("deploy",)),
    Kind("apps", "v1", "statefulsets", "StatefulSet", short=("sts",)),
    Kind("apps", "v1", "replicasets", "ReplicaSet", short=("rs",)),
    Kind("networking.k8s.io", "v1", "ingresses", "Ingress", short=("ing",)),
    # Argo CD's CRD declares no status subresource: its controller writes status with the object.
    Kind("argoproj.io", "v1alpha1", "applications", "Application", status=False, short=("app", "apps")),
)
_BY_PLURAL = {(k.group, k.version, k.plural): k for k in KINDS}
_BY_KIND = {k.kind: k for k in KINDS}
_BY_PLURAL_ONLY = {k.plural: k for k in KINDS}
_SCALABLE = frozenset({"Deployment", "StatefulSet"})
_NAMESPACE_PATH = re.compile(
    r"^(?:/clusters/(?P<cluster>[a-z0-9-]+))?/api/v1/namespaces/(?P<name>[a-z0-9-]+)(?:/(?P<sub>status))?$"
)
_PATH = re.compile(
    r"^(?:/clusters/(?P<cluster>[a-z0-9-]+))?"
    r"(?:/api/(?P<core>v1)|/apis/(?P<group>[a-z0-9.-]+)/(?P<version>v[a-z0-9]+))"
    r"(?:/namespaces/(?P<ns>[a-z0-9-]+))?"
    r"(?:/(?P<plural>[a-z]+)(?:/(?P<name>[a-z0-9.-]+)(?:/(?P<sub>status|scale))?)?)?$"
)


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (strategic merge patches are treated the same: the driver sends maps)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


@dataclass
class _Rejection:
    kind: str
    name_contains: str
    code: int
    message: str


@dataclass
class FakeCluster:
    """The objects of one cluster; keys are (plural, namespace, name), namespace "" for cluster-scoped."""

    objects: dict[tuple[str, str, str], Obj] = field(default_factory=dict)


class FakeApiServer:
    """The server; every method is thread safe (the HTTP threads and the tests share the store)."""

    def __init__(self, *, validator: Validator | None = None) -> None:
        self.lock = threading.RLock()
        self.clusters: dict[str, FakeCluster] = {"": FakeCluster()}
        self.validator = validator
        self.rejections: list[_Rejection] = []
        self._failures: list[int] = []
        self._rv = 0
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-apiserver", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FakeApiServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def kubeconfig(self, cluster: str = "", name: str = "fake") -> str:
        server = f"{self.url}/clusters/{cluster}" if cluster else self.url
        return yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": name, "cluster": {"server": server}}],
                "users": [{"name": name, "user": {"token": f"token-{name}"}}],
                "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
                "current-context": name,
            }
        )

    def write_kubeconfig(self, path: Path, cluster: str = "") -> Path:
        path.write_text(self.kubeconfig(cluster))
        return path

    # -- test hooks -----------------------------------------------------------------------------

    def reject(self, kind: str, name_contains: str, message: str, code: int = 400) -> None:
        """Like an admission webhook: refuse creating or changing matching objects with `message`."""
        with self.lock:
            self.rejections.append(_Rejection(kind, name_contains, code, message))

    def fail_next(self, count: int, code: int = 503) -> None:
        """The next `count` requests fail with `code` (a transient server error by default)."""
        with self.lock:
            self._failures.extend([code] * count)

    def cluster(self, name: str = "") -> FakeCluster:
        with self.lock:
            return self.clusters.setdefault(name, FakeCluster())

    def objects(self, kind: str, namespace: str | None = None, cluster: str = "") -> list[Obj]:
        """Copies of the stored objects of a kind (in a namespace), sorted by namespace and name."""
        plural = _BY_KIND[kind].plural
        with self.lock:
            found = [
                copy.deepcopy(obj)
                for (p, ns, _), obj in sorted(self.cluster(cluster).objects.items())
                if p == plural and (namespace is None or ns == namespace)
            ]
        return found

    def get(self, kind: str, name: str, namespace: str = "", cluster: str = "") -> Obj | None:
        with self.lock:
            obj = self.cluster(cluster).objects.get((_BY_KIND[kind].plural, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def put(self, obj: Obj, cluster: str = "", *, validate: bool = True) -> Obj:
        """Creates or replaces an object as a controller would (no admission, validation optional)."""
        kind = _BY_KIND[obj["kind"]]
        ns = obj["metadata"].get("namespace", "") if kind.namespaced else ""
        with self.lock:
            existing = self.cluster(cluster).objects.get((kind.plural, ns, obj["metadata"]["name"]))
            if existing is None:
                return self.create(kind, ns, obj, cluster, admit=False, validate=validate)
            body = copy.deepcopy(obj)
            body["metadata"] = {**existing["metadata"], **body["metadata"]}
            body["metadata"].pop("resourceVersion", None)
            return self._write(kind, cluster, ns, body, existing, keep_status=False, admit=False, validate=validate)

    def set_status(self, kind: str, name: str, status: Obj, namespace: str = "", cluster: str = "") -> None:
        with self.lock:
            obj = self.cluster(cluster).objects[(_BY_KIND[kind].plural, namespace, name)]
            obj["status"] = merge_patch(obj.get("status") or {}, status)
            obj["metadata"]["resourceVersion"] = self._next_rv()

    def remove_finalizer(self, kind: str, name: str, finalizer: str, namespace: str = "", cluster: str = "") -> None:
        with self.lock:
            key = (_BY_KIND[kind].plural, namespace, name)
            obj = self.cluster(cluster).objects.get(key)
            if obj is None:
                return
            obj["metadata"]["finalizers"] = [f for f in obj["metadata"].get("finalizers", []) if f != finalizer]
            self._collect(cluster, key)

    def delete_object(self, kind: str, name: str, namespace: str = "", cluster: str = "") -> None:
        with self.lock:
            self._delete(_BY_KIND[kind], cluster, namespace, name)

    def settle(self) -> None:
        """Runs the namespace controller once: terminating namespaces lose their contents, then go."""
        with self.lock:
            for cluster_name, cluster in list(self.clusters.items()):
                for key, obj in list(cluster.objects.items()):
                    if key[0] == "namespaces" and obj["metadata"].get("deletionTimestamp"):
                        inside = [k for k in cluster.objects if k[1] == key[2]]
                        for plural, ns, name in inside:
                            self._delete(_BY_PLURAL_ONLY[plural], cluster_name, ns, name)
                        if not any(k[1] == key[2] for k in cluster.objects):
                            del cluster.objects[key]

    # -- the API --------------------------------------------------------------------------------

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _admit(self, kind: Kind, obj: Obj) -> None:
        name = obj.get("metadata", {}).get("name", "")
        for rejection in self.rejections:
            if rejection.kind == kind.kind and rejection.name_contains in name:
                raise ApiError(
                    rejection.code, "BadRequest" if rejection.code == 400 else "Forbidden", rejection.message
                )

    def _validate(self, kind: Kind, obj: Obj) -> None:
        if self.validator is None:
            return
        problem = self.validator(obj)
        if problem is not None:
            raise ApiError(422, "Invalid", f'{kind.kind} "{obj["metadata"].get("name", "")}" is invalid: {problem}')

    def create(
        self, kind: Kind, ns: str, body: Obj, cluster: str = "", *, admit: bool = True, validate: bool = True
    ) -> Obj:
        with self.lock:
            meta = body.setdefault("metadata", {})
            name = meta.get("name")
            if not name:
                raise ApiError(422, "Invalid", f"{kind.kind} is invalid: metadata.name: Required value")
            if body.get("kind") != kind.kind or body.get("apiVersion") != kind.api_version:
                raise ApiError(400, "BadRequest", f"the body is a {body.get('kind')}, not a {kind.kind}")
            objects = self.cluster(cluster).objects
            if kind.namespaced:
                if meta.get("namespace", ns) != ns:
                    raise ApiError(400, "BadRequest", "the namespace of the object does not match the URL")
                namespace = objects.get(("namespaces", "", ns))
                if namespace is None:
                    raise ApiError(404, "NotFound", f'namespaces "{ns}" not found')
                if namespace["metadata"].get("deletionTimestamp"):
                    raise ApiError(
                        403,
                        "Forbidden",
                        f'{kind.plural} "{name}" is forbidden: unable to create new content in namespace {ns} '
                        "because it is being terminated",
                    )
            if (kind.plural, ns, name) in objects:
                group = f".{kind.group}" if kind.group else ""
                raise ApiError(409, "AlreadyExists", f'{kind.plural}{group} "{name}" already exists')
            if admit:
                self._admit(kind, body)
            obj = copy.deepcopy(body)
            if kind.status and admit:
                obj.pop("status", None)
            self._server_fields(kind, obj, ns)
            obj["metadata"].update(
                uid=str(uuid.uuid4()), creationTimestamp=_now(), resourceVersion=self._next_rv(), generation=1
            )
            if validate:
                self._validate(kind, obj)
            objects[(kind.plural, ns, name)] = obj
            return copy.deepcopy(obj)

    def _server_fields(self, kind: Kind, obj: Obj, ns: str) -> None:
        meta = obj["metadata"]
        if kind.namespaced:
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        for key in ("uid", "creationTimestamp", "deletionTimestamp", "generation", "selfLink"):
            meta.pop(key, None)
        if kind.kind == "Secret" and "stringData" in obj:
            data = obj.setdefault("data", {})
            for key, value in obj.pop("stringData").items():
                data[key] = base64.b64encode(value.encode()).decode()
        if kind.kind == "Namespace":
            obj["status"] = {"phase": "Active"}
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]

    def _write(
        self,
        kind: Kind,
        cluster: str,
        ns: str,
        body: Obj,
        existing: Obj,
        *,
        keep_status: bool,
        admit: bool = True,
        validate: bool = True,
    ) -> Obj:
        meta = body.setdefault("metadata", {})
        sent_rv = meta.get("resourceVersion")
        if sent_rv and sent_rv != existing["metadata"]["resourceVersion"]:
            group = f".{kind.group}" if kind.group else ""
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {kind.plural}{group} "{meta.get("name")}": the object has been '
                "modified; please apply your changes to the latest version and try again",
            )
        if meta.get("name") != existing["metadata"]["name"]:
            raise ApiError(400, "BadRequest", "the name of the object does not match the URL")
        if admit:
            self._admit(kind, body)
        obj = copy.deepcopy(body)
        kept = {
            k: existing["metadata"][k]
            for k in ("uid", "creationTimestamp", "deletionTimestamp", "generation")
            if k in existing["metadata"]
        }
        self._server_fields(kind, obj, ns)
        obj["metadata"].update(kept)
        if keep_status:
            obj["status"] = copy.deepcopy(existing.get("status"))
            if obj["status"] is None:
                obj.pop("status")
        if kind.kind == "Namespace":
            obj["status"] = copy.deepcopy(existing["status"])
        if obj.get("spec") != existing.get("spec"):
            obj["metadata"]["generation"] = existing["metadata"].get("generation", 1) + 1
        if existing["metadata"].get("deletionTimestamp"):
            # Once deletion started, finalizers may only go.
            obj["metadata"]["finalizers"] = [
                f for f in obj["metadata"].get("finalizers", []) if f in existing["metadata"].get("finalizers", [])
            ]
        obj["metadata"]["resourceVersion"] = self._next_rv()
        if validate:
            self._validate(kind, obj)
        key = (kind.plural, ns, meta["name"])
        self.cluster(cluster).objects[key] = obj
        self._collect(cluster, key)
        return copy.deepcopy(obj)

    def _collect(self, cluster: str, key: tuple[str, str, str]) -> None:
        obj = self.cluster(cluster).objects.get(key)
        # Namespaces go only once empty (see `settle`); anything else goes with its last finalizer.
        finished = obj and obj["metadata"].get("deletionTimestamp") and not obj["metadata"].get("finalizers")
        if finished and key[0] != "namespaces":
            del self.cluster(cluster).objects[key]

    def _delete(self, kind: Kind, cluster: str, ns: str, name: str) -> Obj:
        objects = self.cluster(cluster).objects
        key = (kind.plural, ns, name)
        obj = objects.get(key)
        if obj is None:
            group = f".{kind.group}" if kind.group else ""
            raise ApiError(404, "NotFound", f'{kind.plural}{group} "{name}" not found')
        if kind.kind == "Namespace":
            obj["metadata"].setdefault("deletionTimestamp", _now())
            obj["status"] = {"phase": "Terminating"}
            obj["metadata"]["resourceVersion"] = self._next_rv()
            return copy.deepcopy(obj)
        if obj["metadata"].get("finalizers"):
            obj["metadata"].setdefault("deletionTimestamp", _now())
            obj["metadata"]["resourceVersion"] = self._next_rv()
            return copy.deepcopy(obj)
        del objects[key]
        return copy.deepcopy(obj)

    def handle(self, method: str, url: str, body: bytes, content_type: str) -> tuple[int, Obj]:
        """One request: (HTTP status, JSON body)."""
        parts = urlsplit(url)
        path = parts.path.rstrip("/") or "/"
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        with self.lock:
            self.requests.append((method, path))
            if self._failures:
                code = self._failures.pop(0)
                return code, ApiError(
                    code, "ServiceUnavailable", "the server is currently unable to handle the request"
                ).status()
        try:
            discovery = self._discovery(path)
            if discovery is not None:
                return 200, discovery
            return 200, self._resource(method, path, query, body, content_type)
        except ApiError as error:
            return error.code, error.status()

    def _discovery(self, path: str) -> Obj | None:
        path = re.sub(r"^/clusters/[a-z0-9-]+", "", path) or "/"
        if path == "/version":
            return {"major": "1", "minor": "36", "gitVersion": "v1.36.0-fake", "platform": "linux/amd64"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if path == "/apis":
            groups = sorted({(k.group, k.version) for k in KINDS if k.group})
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": g,
                        "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                        "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v},
                    }
                    for g, v in groups
                ],
            }
        match = re.fullmatch(r"/api/(v1)|/apis/([a-z0-9.-]+)/(v[a-z0-9]+)", path)
        if match is None:
            return None
        group, version = ("", "v1") if match.group(1) else (match.group(2), match.group(3))
        resources: list[Obj] = []
        for k in KINDS:
            if (k.group, k.version) != (group, version):
                continue
            verbs = ["create", "delete", "get", "list", "patch", "update"]
            resources.append(
                {
                    "name": k.plural,
                    "singularName": k.kind.lower(),
                    "namespaced": k.namespaced,
                    "kind": k.kind,
                    "verbs": verbs,
                    "shortNames": list(k.short),
                }
            )
            if k.status:
                resources.append(
                    {
                        "name": f"{k.plural}/status",
                        "singularName": "",
                        "namespaced": k.namespaced,
                        "kind": k.kind,
                        "verbs": ["get", "patch", "update"],
                    }
                )
        gv = f"{group}/{version}" if group else version
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}

    def _resource(self, method: str, path: str, query: dict[str, str], raw: bytes, content_type: str) -> Obj:
        namespace_path = _NAMESPACE_PATH.match(path)
        if namespace_path is not None:
            cluster = namespace_path.group("cluster") or ""
            kind, ns, name, sub = _BY_KIND["Namespace"], "", namespace_path.group("name"), namespace_path.group("sub")
        else:
            match = _PATH.match(path)
            if match is None or not match.group("plural"):
                raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
            cluster = match.group("cluster") or ""
            group, version = ("", "v1") if match.group("core") else (match.group("group"), match.group("version"))
            ns, name, sub = match.group("ns") or "", match.group("name"), match.group("sub")
            found = _BY_PLURAL.get((group, version, match.group("plural")))
            if found is None:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
            kind = found
        if not kind.namespaced and ns:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        if (sub == "status" and not kind.status) or (sub == "scale" and kind.kind not in _SCALABLE):
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        body: Any = json.loads(raw) if raw else None
        with self.lock:
            objects = self.cluster(cluster).objects
            if name is None:
                if method == "GET":
                    return self._list(kind, cluster, ns if kind.namespaced else None, query)
                if method == "POST":
                    return self.create(kind, ns, body, cluster)
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on a collection here")
            key = (kind.plural, ns, name)
            if method == "DELETE":
                return self._delete(kind, cluster, ns, name)
            existing = objects.get(key)
            if existing is None:
                group_suffix = f".{kind.group}" if kind.group else ""
                raise ApiError(404, "NotFound", f'{kind.plural}{group_suffix} "{name}" not found')
            if sub == "scale":
                if method == "PATCH" and "json-patch" in content_type:
                    raise ApiError(415, "UnsupportedMediaType", "this fake takes merge patches only")
                return self._scale(kind, cluster, ns, method, body, existing)
            if method == "GET":
                return copy.deepcopy(existing)
            if method == "PUT":
                new = body
            elif method == "PATCH":
                if "json-patch" in content_type:
                    raise ApiError(415, "UnsupportedMediaType", "this fake takes merge patches only")
                new = merge_patch(copy.deepcopy(existing), body)
                new["metadata"].pop("resourceVersion", None) if "resourceVersion" not in (
                    body.get("metadata") or {}
                ) else None
            else:
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")
            if sub == "status":
                # Only the status changes through the subresource.
                status = new.get("status")
                new = copy.deepcopy(existing)
                new["status"] = status
                new["metadata"]["resourceVersion"] = (body.get("metadata") or {}).get("resourceVersion")
                return self._write(kind, cluster, ns, new, existing, keep_status=False, admit=False)
            return self._write(kind, cluster, ns, new, existing, keep_status=kind.status)

    def _scale(self, kind: Kind, cluster: str, ns: str, method: str, body: Any, existing: Obj) -> Obj:
        """The scale subresource: reads or sets spec.replicas only, as autoscaling/v1 Scale."""
        if method in ("PUT", "PATCH"):
            replicas = ((body or {}).get("spec") or {}).get("replicas")
            if not isinstance(replicas, int) or replicas < 0:
                raise ApiError(422, "Invalid", "Scale is invalid: spec.replicas: must be a non-negative integer")
            new = copy.deepcopy(existing)
            new["spec"]["replicas"] = replicas
            new["metadata"].pop("resourceVersion", None)
            existing = self._write(kind, cluster, ns, new, existing, keep_status=True)
        elif method != "GET":
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on a scale subresource")
        meta = existing["metadata"]
        selector = ",".join(f"{k}={v}" for k, v in sorted(existing["spec"]["selector"]["matchLabels"].items()))
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                "name": meta["name"],
                "namespace": ns,
                "uid": meta.get("uid"),
                "resourceVersion": meta["resourceVersion"],
                "creationTimestamp": meta.get("creationTimestamp"),
            },
            "spec": {"replicas": existing["spec"].get("replicas", 1)},
            "status": {"replicas": (existing.get("status") or {}).get("replicas", 0), "selector": selector},
        }

    def _list(self, kind: Kind, cluster: str, ns: str | None, query: dict[str, str]) -> Obj:
        selector = query.get("labelSelector", "")
        items = [
            copy.deepcopy(obj)
            for (plural, o_ns, _), obj in sorted(self.cluster(cluster).objects.items())
            if plural == kind.plural
            and (ns is None or o_ns == ns)
            and _matches(obj["metadata"].get("labels") or {}, selector)
        ]
        for item in items:
            # Lists carry the kind once, at the top; kubectl and the client do not mind either way.
            item.setdefault("kind", kind.kind)
            item.setdefault("apiVersion", kind.api_version)
        return {
            "kind": f"{kind.kind}List",
            "apiVersion": kind.api_version,
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }


def _handler(server: FakeApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            code, body = server.handle(self.command, self.path, raw, self.headers.get("Content-Type", ""))
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        # http.server dispatches on these names.
        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve  # noqa: N815

        def log_message(self, format: str, *args: Any) -> None:
            return None

    return Handler
