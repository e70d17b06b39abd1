"""Renders the objects, values and Argo CD Applications of one deployment as plain dicts."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from apphosting import health, images, resources, versions, yamlbounds
from apphosting.locations import LocationConfig
from apphosting.settings import Limits
from apphosting.v1 import deployments_pb2
from provisioner.driver import PermanentError
from provisioner.kubernetes.names import Names

Obj = dict[str, Any]

# The port of a request that leaves it unset (the contract gives no default for it).
DEFAULT_PORT = 8080

# What the vCluster itself runs in the host namespace besides the app (control plane and CoreDNS):
# the quota must leave room for it or the vCluster could not start its own pods.
_CONTROL_PLANE_CPU_M = 200
_CONTROL_PLANE_MEMORY_MI = 256
_COREDNS_CPU_M = 20
_COREDNS_MEMORY_MI = 64
_CONTROL_PLANE_STORAGE_GI = 5
# Any uid that is not root: the restricted profile only asks for non-root.
_CONTROL_PLANE_UID = 12345

MANAGED_BY = {"app.kubernetes.io/managed-by": "apphosting"}
DEPLOYMENT_LABEL = "apphosting.dev/deployment-id"
# The release an object was rendered from: on the app's objects and its Application.
RELEASE_ANNOTATION = "apphosting.dev/release"
# On the app's pod template: the checksum of its secret values' versions (a change rolls the pods).
SECRET_ENV_CHECKSUM = "apphosting.dev/secret-env-checksum"
# On the app's Secret: the name=version of each value it holds.
SECRET_ENV_VERSIONS = "apphosting.dev/secret-env-versions"
# On a namespace taken under management by adoption rather than created.
ADOPTED_ANNOTATION = "apphosting.dev/adopted"
HEALTH_CHECK_PATH = health.CHECK_PATH_KEY
CLUSTER_ISSUER_ANNOTATION = "cert-manager.io/cluster-issuer"
ARGOCD_FINALIZER = "resources-finalizer.argocd.argoproj.io"
ARGOCD_API_VERSION = "argoproj.io/v1alpha1"
IMAGE_UPDATER = "argocd-image-updater.argoproj.io"
# The alias of the app's image in Image Updater's image list.
IMAGE_ALIAS = "app"

_RESTRICTED_POD: Obj = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
_RESTRICTED_CONTAINER: Obj = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


@dataclass(frozen=True)
class Resources:
    """The resources a deployment asked for, with the driver's defaults filled in."""

    cpu_m: int
    memory_mi: int
    replicas: int
    storage_gi: int
    pvcs: int
    storage_size_gb: int | None
    volume_sizes_gb: tuple[int, ...]

    @classmethod
    def of(cls, d: deployments_pb2.Deployment) -> Resources:
        # The kernel's demand, so the pods request what placement reserved and the quota counted.
        demand = resources.demand_of(d)
        return cls(
            cpu_m=demand.cpu_millis,
            memory_mi=demand.memory_mb,
            replicas=demand.replicas,
            storage_gi=demand.storage_gb,
            pvcs=len(demand.volume_sizes_gb) + (0 if demand.storage_size_gb is None else 1),
            storage_size_gb=demand.storage_size_gb,
            volume_sizes_gb=demand.volume_sizes_gb,
        )


def labels(names: Names) -> dict[str, str]:
    return {**MANAGED_BY, DEPLOYMENT_LABEL: names.deployment_id}


def base_domain(location: LocationConfig) -> str:
    return location.base_domain or f"{location.id}.apps.internal"


def distro_tag(kubernetes_version: str) -> str:
    """The distro image tag for a requested version: `1.N` gets the pinned patch, `1.N.P` itself."""
    parsed = versions.parse(kubernetes_version or versions.DEFAULT_KUBERNETES_VERSION)
    if parsed is None or parsed[0] not in versions.DISTRO_TAGS:
        raise PermanentError(
            f"Kubernetes version {kubernetes_version!r} is not offered; "
            f"supported: {', '.join(versions.KUBERNETES_VERSIONS)}"
        )
    minor, patch = parsed
    return f"v{minor}{patch}" if patch else versions.DISTRO_TAGS[minor]


def namespace(names: Names) -> Obj:
    """The host namespace; Pod Security `restricted` is enforced on everything in it."""
    pss = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "audit", "warn")}
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": names.namespace,
            "labels": {**labels(names), **pss, "pod-security.kubernetes.io/enforce-version": "latest"},
        },
    }


def vcluster_values(d: deployments_pb2.Deployment, names: Names, location: LocationConfig) -> Obj:
    """Values for the loft-sh vcluster chart: version, quota and limits from the request, restricted pods."""
    res = Resources.of(d)
    security = {
        "podSecurityContext": {**_RESTRICTED_POD, "runAsUser": _CONTROL_PLANE_UID, "fsGroup": _CONTROL_PLANE_UID},
        "containerSecurityContext": {**_RESTRICTED_CONTAINER, "runAsUser": _CONTROL_PLANE_UID},
    }
    # One extra pod of headroom, so a rolling update can surge without hitting the quota.
    pods = res.replicas + 1
    quota = {
        "requests.cpu": f"{res.cpu_m * pods + _CONTROL_PLANE_CPU_M + _COREDNS_CPU_M}m",
        "requests.memory": f"{res.memory_mi * pods + _CONTROL_PLANE_MEMORY_MI + _COREDNS_MEMORY_MI}Mi",
        "requests.storage": f"{res.storage_gi + _CONTROL_PLANE_STORAGE_GI}Gi",
        "count/persistentvolumeclaims": res.pvcs + 1,
        "count/pods": pods + 2,
        "services.nodeports": 0,
        "services.loadbalancers": 0,
    }
    persistence: Obj = {"volumeClaim": {"enabled": True, "size": f"{_CONTROL_PLANE_STORAGE_GI}Gi"}}
    if location.storage_class:
        persistence["volumeClaim"]["storageClass"] = location.storage_class
    return {
        "controlPlane": {
            "distro": {
                "k8s": {
                    "enabled": True,
                    "image": {
                        "registry": "ghcr.io",
                        "repository": "loft-sh/kubernetes",
                        "tag": distro_tag(d.kubernetes_version),
                    },
                }
            },
            "statefulSet": {
                "security": security,
                "resources": {
                    "requests": {"cpu": f"{_CONTROL_PLANE_CPU_M}m", "memory": f"{_CONTROL_PLANE_MEMORY_MI}Mi"},
                    "limits": {"memory": "2Gi"},
                },
                "persistence": persistence,
                "labels": labels(names),
            },
            "coredns": {
                "security": security,
                "deployment": {
                    "resources": {
                        "requests": {"cpu": f"{_COREDNS_CPU_M}m", "memory": f"{_COREDNS_MEMORY_MI}Mi"},
                        "limits": {"memory": f"{_COREDNS_MEMORY_MI * 2}Mi"},
                    }
                },
            },
        },
        "policies": {
            "podSecurityStandard": "restricted",
            "resourceQuota": {"enabled": True, "quota": quota},
            "limitRange": {
                "enabled": True,
                # Containers that set nothing get what the deployment asked for per replica.
                "default": {"cpu": f"{res.cpu_m}m", "memory": f"{res.memory_mi}Mi"},
                "defaultRequest": {"cpu": f"{res.cpu_m}m", "memory": f"{res.memory_mi}Mi"},
            },
        },
        "sync": {
            "toHost": {"ingresses": {"enabled": True}, "persistentVolumeClaims": {"enabled": True}},
            # The app's secret environment values: the one host Secret the driver writes, mapped in.
            "fromHost": {
                "secrets": {
                    "enabled": True,
                    "mappings": {"byName": {f"{names.namespace}/{names.secret_env}": f"default/{names.secret_env}"}},
                }
            },
        },
        # Argo CD, on the host, reaches the vCluster through its service; this server goes into `config`.
        "exportKubeConfig": {"server": f"https://{names.release}.{names.namespace}.svc:443"},
        "telemetry": {"enabled": False},
    }


def application(
    name: str,
    names: Names,
    location: LocationConfig,
    *,
    destination: Obj,
    sources: list[Obj],
    annotations: Mapping[str, str] | None = None,
) -> Obj:
    """An Argo CD Application that syncs automatically and prunes its resources when deleted."""
    metadata: Obj = {
        "name": name,
        "namespace": location.argocd_namespace,
        "labels": labels(names),
        # Deleting the Application then deletes what it deployed (cascading delete).
        "finalizers": [ARGOCD_FINALIZER],
    }
    if annotations:
        metadata["annotations"] = dict(annotations)
    spec: Obj = {
        "project": location.argocd_project,
        "destination": destination,
        "syncPolicy": {
            "automated": {"prune": True, "selfHeal": True},
            "syncOptions": ["CreateNamespace=true"],
            "retry": {"limit": 5, "backoff": {"duration": "5s", "factor": 2, "maxDuration": "3m"}},
        },
    }
    if len(sources) == 1:
        spec["source"] = sources[0]
    else:
        spec["sources"] = sources
    return {"apiVersion": ARGOCD_API_VERSION, "kind": "Application", "metadata": metadata, "spec": spec}


def vcluster_application(d: deployments_pb2.Deployment, names: Names, location: LocationConfig) -> Obj:
    """The vcluster chart, installed into the host namespace by Argo CD (no helm binary here)."""
    source = {
        "repoURL": location.vcluster_chart_repo,
        "chart": "vcluster",
        "targetRevision": location.vcluster_chart_version,
        "helm": {"releaseName": names.release, "valuesObject": vcluster_values(d, names, location)},
    }
    destination = {"server": "https://kubernetes.default.svc", "namespace": names.namespace}
    app = application(names.vcluster_application, names, location, destination=destination, sources=[source])
    # Sleep and wake scale the control plane directly; self-heal must not scale it back.
    app["spec"]["ignoreDifferences"] = [
        {"group": "apps", "kind": "StatefulSet", "name": names.control_plane, "jsonPointers": ["/spec/replicas"]}
    ]
    app["spec"]["syncPolicy"]["syncOptions"].append("RespectIgnoreDifferences=true")
    return app


def _quantity_resources(res: Resources) -> Obj:
    # No CPU limit (throttling hurts latency for nothing); memory limit = request, so pods are not OOM-killed
    # by a neighbour's burst.
    return {
        "requests": {"cpu": f"{res.cpu_m}m", "memory": f"{res.memory_mi}Mi"},
        "limits": {"memory": f"{res.memory_mi}Mi"},
    }


def _pod_security(d: deployments_pb2.Deployment) -> Obj:
    pod = dict(_RESTRICTED_POD)
    if d.HasField("run_as_uid"):
        pod.update(runAsUser=d.run_as_uid, runAsGroup=d.run_as_uid, fsGroup=d.run_as_uid)
    return pod


def _env(d: deployments_pb2.Deployment, names: Names) -> list[Obj]:
    """The plain values, then the secret ones by reference: to the app's Secret, or to the Secret a
    `secret_ref` names. A manifest never holds a secret value."""
    env: list[Obj] = [
        {"name": name, "value": value} for name, _, value in (e.partition("=") for e in d.environment_variables)
    ]
    for entry in d.secret_environment_variables:
        if entry.HasField("secret_ref"):
            ref = {"name": entry.secret_ref.name, "key": entry.secret_ref.key}
        else:
            ref = {"name": names.secret_env, "key": entry.name}
        env.append({"name": entry.name, "valueFrom": {"secretKeyRef": ref}})
    return env


def secret_env_checksum(d: deployments_pb2.Deployment) -> str | None:
    """A checksum of the secret values' names, versions and references: a pod template annotation, so a
    changed value rolls the pods (a Secret's change alone restarts nothing). None when there are none."""
    if not d.secret_environment_variables:
        return None
    parts = sorted(
        f"{e.name}:{e.version}:{e.secret_ref.name}/{e.secret_ref.key}"
        if e.HasField("secret_ref")
        else f"{e.name}:{e.version}"
        for e in d.secret_environment_variables
    )
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _pod_metadata(d: deployments_pb2.Deployment, pod_labels: Obj) -> Obj:
    metadata: Obj = {"labels": pod_labels}
    checksum = secret_env_checksum(d)
    if checksum is not None:
        metadata["annotations"] = {SECRET_ENV_CHECKSUM: checksum}
    return metadata


def health_check_path(d: deployments_pb2.Deployment) -> str | None:
    """The HTTP path of `config.health_check_path`, or None when the config names none."""
    value = d.config.fields.get(HEALTH_CHECK_PATH) if d.HasField("config") else None
    if value is None or value.WhichOneof("kind") == "null_value":
        return None
    path = value.string_value if value.WhichOneof("kind") == "string_value" else value
    problem = health.check_path_problem(path)
    if problem is not None:
        raise PermanentError(f"config.{HEALTH_CHECK_PATH} {problem}")
    return value.string_value


def probes(d: deployments_pb2.Deployment) -> tuple[Obj, Obj]:
    """Readiness and liveness probes: an HTTP GET of `config.health_check_path` on the app's port when
    the config names one, else a TCP connection to it."""
    path = health_check_path(d)
    check: Obj = {"httpGet": {"path": path, "port": "http"}} if path else {"tcpSocket": {"port": "http"}}
    readiness = {**copy.deepcopy(check), "periodSeconds": 5, "failureThreshold": 3}
    # Liveness is slower to give up than readiness: a busy app is taken out of rotation, not restarted.
    liveness = {**copy.deepcopy(check), "initialDelaySeconds": 15, "periodSeconds": 10, "failureThreshold": 6}
    return readiness, liveness


def ingress_tls(names: Names, location: LocationConfig) -> tuple[dict[str, str], list[Obj]]:
    """The Ingress annotations and `tls` section of an app: cert-manager, a wildcard secret, or none."""
    host = names.host(base_domain(location))
    if location.tls_cluster_issuer:
        secret = f"{names.app}-tls"[:253]
        return {CLUSTER_ISSUER_ANNOTATION: location.tls_cluster_issuer}, [{"hosts": [host], "secretName": secret}]
    if location.tls_secret:
        return {}, [{"hosts": [host], "secretName": location.tls_secret}]
    return {}, []


def _release_annotations(release: int) -> dict[str, str]:
    # Release 0 is a job from before releases existed: its objects stay as they were rendered then.
    return {RELEASE_ANNOTATION: str(release)} if release > 0 else {}


def _pvc(name: str, size_gi: int, names: Names, location: LocationConfig) -> Obj:
    spec: Obj = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": f"{size_gi}Gi"}}}
    if location.storage_class:
        spec["storageClassName"] = location.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "labels": {**labels(names), "app.kubernetes.io/name": names.app}},
        "spec": spec,
    }


def docker_manifests(
    d: deployments_pb2.Deployment, names: Names, location: LocationConfig, *, release: int = 0, stopped: bool = False
) -> list[Obj]:
    """Deployment, a PVC per volume (and for storage_size_gb), Service and Ingress of a container app.

    Every object carries the release it was rendered from (annotation apphosting.dev/release), not
    the pod template, so a release that changes nothing else restarts nothing. `stopped`: zero replicas.
    Containers get readiness and liveness probes (see `probes`; `config.health_check_path` makes them
    HTTP). The Ingress gets TLS as the location says (see `ingress_tls`)."""
    res = Resources.of(d)
    port = d.container_port if d.HasField("container_port") else DEFAULT_PORT
    selector = {"app.kubernetes.io/name": names.app, "app.kubernetes.io/instance": names.app}
    meta_labels = {**labels(names), **selector}
    claims: list[tuple[str, str, int]] = [
        (f"{names.app}-vol-{i}"[:63], v.path, size)
        for i, (v, size) in enumerate(zip(d.volumes, res.volume_sizes_gb, strict=True))
    ]
    if res.storage_size_gb is not None:
        # storage_size_gb is the app's data volume; /data unless a named volume already sits there.
        taken = {path for _, path, _ in claims}
        path = "/data" if "/data" not in taken else "/var/lib/app-data"
        claims.append((f"{names.app}-data"[:63], path, res.storage_size_gb))
    container: Obj = {
        "name": "app",
        "image": d.docker_image,
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "resources": _quantity_resources(res),
        "securityContext": dict(_RESTRICTED_CONTAINER),
    }
    container["readinessProbe"], container["livenessProbe"] = probes(d)
    if d.environment_variables or d.secret_environment_variables:
        container["env"] = _env(d, names)
    if claims:
        container["volumeMounts"] = [{"name": f"vol-{i}", "mountPath": path} for i, (_, path, _) in enumerate(claims)]
    pod_spec: Obj = {
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(d),
        "containers": [container],
    }
    if claims:
        pod_spec["volumes"] = [
            {"name": f"vol-{i}", "persistentVolumeClaim": {"claimName": claim}}
            for i, (claim, _, _) in enumerate(claims)
        ]
    deployment: Obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": names.app, "labels": meta_labels},
        "spec": {
            "replicas": 0 if stopped else res.replicas,
            "revisionHistoryLimit": 3,
            # ReadWriteOnce volumes cannot be attached to the old and the new pod at once.
            "strategy": {"type": "Recreate"} if claims else {"type": "RollingUpdate"},
            "selector": {"matchLabels": selector},
            "template": {"metadata": _pod_metadata(d, meta_labels), "spec": pod_spec},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": names.app, "labels": meta_labels},
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    ingress_spec: Obj = {
        "rules": [
            {
                "host": names.host(base_domain(location)),
                "http": {
                    "paths": [
                        {
                            "path": "/",
                            "pathType": "Prefix",
                            "backend": {"service": {"name": names.app, "port": {"name": "http"}}},
                        }
                    ]
                },
            }
        ]
    }
    if location.ingress_class:
        ingress_spec["ingressClassName"] = location.ingress_class
    tls_annotations, tls = ingress_tls(names, location)
    if tls:
        ingress_spec["tls"] = tls
    ingress: Obj = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": names.app, "labels": meta_labels},
        "spec": ingress_spec,
    }
    if tls_annotations:
        ingress["metadata"]["annotations"] = tls_annotations
    pvcs = [_pvc(claim, size, names, location) for claim, _, size in claims]
    manifests = [deployment, *pvcs, service, ingress]
    for manifest in manifests:
        annotations = {**manifest["metadata"].get("annotations", {}), **_release_annotations(release)}
        if annotations:
            manifest["metadata"]["annotations"] = annotations
    return manifests


def split_image(image: str) -> tuple[str, str | None]:
    """`repo[:tag][@digest]` → (repo, tag or None); a registry port is not a tag."""
    name, tag, _ = images.split(image)
    return name, tag


def kustomization(d: deployments_pb2.Deployment, manifests: list[Obj]) -> Obj:
    """The kustomization of a docker app: Image Updater writes tags back only to Helm or Kustomize sources."""
    files = [manifest_file(m) for m in manifests]
    repo, tag, digest = images.split(d.docker_image)
    image: Obj = {"name": repo}
    if digest is not None:
        image["digest"] = digest
    elif tag:
        image["newTag"] = tag
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": files,
        "images": [image],
    }


def manifest_file(manifest: Obj) -> str:
    return f"{manifest['kind'].lower()}-{manifest['metadata']['name']}.yaml"


def deep_merge(base: Obj, over: Mapping[str, Any]) -> Obj:
    """Helm's merge of values: maps merge key by key, anything else in `over` replaces; null deletes."""
    merged = copy.deepcopy(base)
    for key, value in over.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def platform_helm_values(
    d: deployments_pb2.Deployment, names: Names, location: LocationConfig, *, stopped: bool = False
) -> Obj:
    """What the platform sets for a chart, in the layout of `helm create` charts (most charts follow it).

    Probes are set only when `config.health_check_path` names a path: a chart's own are better than a guess.
    """
    res = Resources.of(d)
    values: Obj = {
        "replicaCount": 0 if stopped else res.replicas,
        "resources": _quantity_resources(res),
        "podSecurityContext": _pod_security(d),
        "securityContext": dict(_RESTRICTED_CONTAINER),
        "ingress": {
            "enabled": True,
            "hosts": [{"host": names.host(base_domain(location)), "paths": [{"path": "/", "pathType": "Prefix"}]}],
        },
    }
    if location.ingress_class:
        values["ingress"]["className"] = location.ingress_class
    tls_annotations, tls = ingress_tls(names, location)
    if tls:
        values["ingress"]["tls"] = tls
    if tls_annotations:
        values["ingress"]["annotations"] = tls_annotations
    if health_check_path(d):
        values["readinessProbe"], values["livenessProbe"] = probes(d)
    if d.HasField("container_port"):
        values["service"] = {"port": d.container_port}
    if d.HasField("docker_image"):
        repo, tag = split_image(d.docker_image)
        values["image"] = {"repository": repo, **({"tag": tag} if tag else {})}
    if d.environment_variables or d.secret_environment_variables:
        values["env"] = _env(d, names)
    checksum = secret_env_checksum(d)
    if checksum is not None:
        values["podAnnotations"] = {SECRET_ENV_CHECKSUM: checksum}
    if d.HasField("storage_size_gb"):
        values["persistence"] = {"enabled": True, "size": f"{d.storage_size_gb}Gi"}
    return values


def helm_values(d: deployments_pb2.Deployment, names: Names, location: LocationConfig, *, stopped: bool = False) -> Obj:
    """The platform's values with `custom_values_yaml` merged over them; `stopped` wins over both."""
    try:
        # The same bounds the API checked at create: a stored document is read as it was judged.
        custom = yamlbounds.load(d.custom_values_yaml, Limits()) if d.custom_values_yaml else None
    except (yaml.YAMLError, ValueError) as exc:
        raise PermanentError(f"custom_values_yaml cannot be read: {str(exc)[:200]}") from None
    if custom is not None and not isinstance(custom, dict):
        raise PermanentError("custom_values_yaml must be a YAML mapping")
    merged = deep_merge(platform_helm_values(d, names, location, stopped=stopped), custom or {})
    if stopped:
        merged["replicaCount"] = 0
    return merged


def image_updater_annotations(d: deployments_pb2.Deployment, helm: bool) -> dict[str, str]:
    """Argo CD Image Updater annotations for the app's image, for a location whose image_updater is argocd;
    none when no update policy was asked for, or while a rollback paused image updates (automation must
    not undo it)."""
    if not d.HasField("docker_image") or not d.HasField("image_update_strategy") or d.image_updates_paused:
        return {}
    repo, _ = split_image(d.docker_image)
    strategy = d.image_update_strategy
    # semver takes a version constraint and digest the tag to follow, both after the image name;
    # newest-build and alphabetical pick among all tags (narrowed by allow-tags).
    constraint = d.image_update_constraint if d.HasField("image_update_constraint") else ""
    entry = f"{IMAGE_ALIAS}={repo}:{constraint}" if constraint else f"{IMAGE_ALIAS}={repo}"
    prefix = f"{IMAGE_UPDATER}/{IMAGE_ALIAS}"
    out = {
        f"{IMAGE_UPDATER}/image-list": entry,
        f"{prefix}.update-strategy": strategy,
        # Committing the new tag keeps git the source of truth (the default would patch the Application only).
        f"{IMAGE_UPDATER}/write-back-method": "git",
    }
    if d.HasField("image_allow_tags"):
        out[f"{prefix}.allow-tags"] = d.image_allow_tags
    if d.HasField("image_ignore_tags"):
        out[f"{prefix}.ignore-tags"] = d.image_ignore_tags
    if helm:
        out[f"{prefix}.helm.image-name"] = "image.repository"
        out[f"{prefix}.helm.image-tag"] = "image.tag"
    return out


def app_application(
    d: deployments_pb2.Deployment, names: Names, location: LocationConfig, repo_url: str, *, release: int = 0
) -> Obj:
    """The app's Application: the git path (docker) or the chart with values from git (helm)."""
    helm = d.app_type == deployments_pb2.APP_TYPE_HELM
    destination = {"name": names.argocd_cluster, "namespace": "default"}
    # Only where the location leaves image updates to Argo CD Image Updater: under the platform's own
    # updater both would update the same app.
    annotations = image_updater_annotations(d, helm) if location.image_updater == "argocd" else {}
    if helm:
        annotations = {**annotations, f"{IMAGE_UPDATER}/git-branch": location.git_branch} if annotations else {}
        annotations.update(_release_annotations(release))
        chart_repo = d.helm_repo_url.removeprefix("oci://")
        chart: Obj = {
            "repoURL": chart_repo,
            "chart": d.helm_chart_name,
            "targetRevision": d.helm_chart_version or "*",
            "helm": {"releaseName": names.app, "valueFiles": [f"$values/{names.git_path}/values.yaml"]},
        }
        values_ref = {"repoURL": repo_url, "targetRevision": location.git_branch, "ref": "values"}
        return application(
            names.app_application,
            names,
            location,
            destination=destination,
            sources=[chart, values_ref],
            annotations=annotations,
        )
    if annotations:
        annotations[f"{IMAGE_UPDATER}/git-branch"] = location.git_branch
    annotations.update(_release_annotations(release))
    source = {"repoURL": repo_url, "targetRevision": location.git_branch, "path": names.git_path}
    return application(
        names.app_application, names, location, destination=destination, sources=[source], annotations=annotations
    )


def dump_all(documents: list[Obj]) -> str:
    return yaml.safe_dump_all(documents, sort_keys=False)


def dump(document: Obj) -> str:
    return yaml.safe_dump(document, sort_keys=False)


@dataclass(frozen=True)
class AppFiles:
    """What goes under the git path, and what the record shows as `values_yaml`."""

    files: dict[str, str]
    values_yaml: str


def app_files(
    d: deployments_pb2.Deployment, names: Names, location: LocationConfig, *, release: int = 0, stopped: bool = False
) -> AppFiles:
    """The files of one release under the git path; a chart's values.yaml names the release in a comment."""
    if d.app_type == deployments_pb2.APP_TYPE_HELM:
        values = dump(helm_values(d, names, location, stopped=stopped))
        header = f"# {RELEASE_ANNOTATION}: {release}\n" if release > 0 else ""
        return AppFiles({"values.yaml": header + values}, values)
    manifests = docker_manifests(d, names, location, release=release, stopped=stopped)
    files = {manifest_file(m): dump(m) for m in manifests}
    files["kustomization.yaml"] = dump(kustomization(d, manifests))
    return AppFiles(files, dump_all(manifests))
